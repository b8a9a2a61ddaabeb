"""The one model API every recommender here honours (Cornac-style): ``fit``, ``predict``, ``score``, ``recommend``.

A fitted model reduces to :class:`ScoringFactors`: a user matrix, an item matrix and a constant such that the
predicted rating of (i, j) is ``offset + user[i] @ item[j]`` (biases are folded in as extra columns). Prediction,
full score rows and blocked top-N are implemented once here on top of that, so baselines and ConvMF cannot drift.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from convmf_core.data import Ratings
from convmf_core.topn import TopN, top_n

logger = logging.getLogger("convmf_core")


class ModelFitError(RuntimeError):
    """Raised when training diverges (NaN or infinite loss/factors) or is asked something it cannot do."""


class NotFittedError(RuntimeError):
    """Raised when a model is used before ``fit`` (or ``load``)."""


@dataclass(frozen=True)
class IterationReport:
    """Progress of one outer training iteration, handed to the ``callback`` of ``fit``."""

    iteration: int
    train_loss: float
    validation_rmse: float | None
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)


ProgressCallback = Callable[[IterationReport], None]


@dataclass(frozen=True)
class ScoringFactors:
    """``rating(i, j) = offset + user[i] @ item[j]``, clipped to ``clip`` when set. Tensors live on the CPU."""

    user: torch.Tensor
    item: torch.Tensor
    offset: float = 0.0
    clip: tuple[float, float] | None = None


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to :class:`torch.device`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Recommender(ABC):
    """Base class: subclasses implement :meth:`fit` and :meth:`scoring_factors`; the rest is shared."""

    @abstractmethod
    def fit(self, train: Ratings, validation: Ratings | None = None, *,
            callback: ProgressCallback | None = None) -> "Recommender":
        """Learn from ``train``; early-stop on ``validation`` RMSE when given. Returns ``self``."""

    @abstractmethod
    def scoring_factors(self) -> ScoringFactors:
        """The fitted model as factors (raises :class:`NotFittedError` before ``fit``)."""

    @property
    def best_validation_rmse_(self) -> float | None:
        """Validation RMSE of the model as fitted: the averaged posterior's when sampled (``validation_rmse_``),
        else the kept iteration's (``history_[best_iteration_ - 1]``); None without a validation set."""
        final = getattr(self, "validation_rmse_", None)
        if final is not None:
            return float(final)
        history, best = getattr(self, "history_", []), int(getattr(self, "best_iteration_", 0))
        return history[best - 1].validation_rmse if 1 <= best <= len(history) else None

    @property
    def n_items(self) -> int:
        """Number of items the model scores."""
        return int(self.scoring_factors().item.shape[0])

    @property
    def n_users(self) -> int:
        """Number of users the model knows."""
        return int(self.scoring_factors().user.shape[0])

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Predicted ratings for the (user, item) index pairs."""
        f = self.scoring_factors()
        u = torch.from_numpy(np.array(users, dtype=np.int64))  # a copy: pandas 3 hands out read-only arrays
        i = torch.from_numpy(np.array(items, dtype=np.int64))
        pred = (f.user[u] * f.item[i]).sum(dim=1) + f.offset
        if f.clip is not None:
            pred = pred.clamp(*f.clip)
        return pred.numpy().astype(np.float32)

    def score(self, users: np.ndarray) -> np.ndarray:
        """Predicted ratings of every item for each user in ``users``: shape ``(len(users), n_items)``."""
        f = self.scoring_factors()
        u = torch.from_numpy(np.array(users, dtype=np.int64))  # a copy: pandas 3 hands out read-only arrays
        scores = f.user[u] @ f.item.T + f.offset
        return scores.numpy()

    def recommend(self, users: np.ndarray, n: int = 10, *, exclude: Ratings | None = None,
                  items: np.ndarray | None = None, block_size: int = 1024) -> TopN:
        """The ``n`` best items for each user, excluding the items each user has in ``exclude`` (e.g. the training
        ratings) and restricted to ``items`` when given; computed in user blocks so memory stays bounded."""
        f = self.scoring_factors()
        return top_n(f.user, f.item, np.asarray(users, dtype=np.int64), n, offset=f.offset,
                     exclude=exclude.csr() if exclude is not None else None, candidate_items=items,
                     block_size=block_size)
