"""Text encoders: what turns an item's description into the prior mean of its factors (and, beyond the paper, of
its bias). One interface, two implementations:

* ``cnn`` (:class:`convmf_core.cnn.CNNEncoder`): the paper's document CNN, trained by gradient steps (eq. 9);
* ``linear`` (:class:`convmf_core.linear_encoder.LinearEncoder`): fixed document vectors and a ridge map refitted
  in closed form.

ConvMF's item update (eq. 8) pulls (v_j, c_j) toward ``encoder.prior()[j]``; after every V step the encoder is
refitted to the new (v_j, c_j) of the rated items with text (:meth:`TextEncoder.fit`). Each encoder also says how
well the text predicts the factors of items it was *not* fitted on (:meth:`TextEncoder.heldout_r2`), so a user can
see whether the text carries signal on their catalogue.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from convmf_core.text import Documents


class TextEncoder(ABC):
    """Maps documents to ``output_dim`` numbers: the prior mean of [v_j (k), c_j (with the bias channel)]."""

    output_dim: int

    @abstractmethod
    def fit(self, targets: torch.Tensor, items: np.ndarray, weights: torch.Tensor | None,
            generator: torch.Generator, epochs: int | None, step: int) -> dict[str, float]:
        """Fit to ``targets[items]`` (rows indexed by item; ``weights`` per item or None); ``epochs`` and ``step``
        drive gradient-trained encoders (per-iteration epoch count, step-size schedule) and are ignored by
        closed-form ones. Returns figures for the iteration report."""

    @abstractmethod
    def prior(self) -> torch.Tensor:
        """The prior mean for every training item (rows of items without text are arbitrary: the caller masks)."""

    @abstractmethod
    def embed(self, documents: Documents) -> torch.Tensor:
        """The prior mean for other documents encoded with the same vocabulary (a CPU tensor; empty documents get
        the encoder's output for no text, which the caller replaces)."""

    @abstractmethod
    def heldout_r2(self, targets: torch.Tensor, items: np.ndarray, generator: torch.Generator) -> dict[str, float]:
        """R^2 of the prior on items it was not fitted on: ``prior_heldout_r2`` (the factor columns pooled) and,
        with the bias channel, ``prior_heldout_r2_bias``."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything :meth:`embed` needs, as CPU tensors (saved in model bundles and checkpoints)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""


def r2_scores(truth: torch.Tensor, prediction: torch.Tensor, reference: torch.Tensor, k: int) -> dict[str, float]:
    """R^2 = 1 - SSE / SST of ``prediction`` against ``truth``, the factor columns (``:k``) pooled and the bias
    column (``k``, when present) apart; SST is taken around ``reference`` (the mean of the rows fitted on)."""
    err = (truth - prediction).double() ** 2
    tot = (truth - reference).double() ** 2
    out = {"prior_heldout_r2": float(1.0 - err[:, :k].sum() / tot[:, :k].sum().clamp_min(1e-12))}
    if truth.shape[1] > k:
        out["prior_heldout_r2_bias"] = float(1.0 - err[:, k:].sum() / tot[:, k:].sum().clamp_min(1e-12))
    return out


def heldout_split(items: np.ndarray, folds: int, generator: torch.Generator) -> list[np.ndarray]:
    """``items`` in ``folds`` seeded, near-equal parts (for held-out R^2)."""
    order = items[torch.randperm(len(items), generator=generator).numpy()]
    return [part for part in np.array_split(order, max(2, folds)) if len(part)]
