"""ConvMF (Kim et al., RecSys 2016): ALS matrix factorisation whose item factors are pulled toward cnn(W, X_j).

The ALS loop is :class:`~convmf_core.models.als_mf.ALSFactorModel`'s; this class supplies the prior
theta_j = cnn(W, X_j) and its update (eq. 9, in :mod:`convmf_core.cnn`).

Items without text (an empty document after preprocessing) get no prior: their v_j is purely collaborative, as
in PMF. Items with text but no training rating get v_j = theta_j (eq. 8 with no ratings), so a new item is scored
from its description alone; :meth:`ConvMF.embed_items` does the same for items described after training.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convmf_core.cnn import TextCNN, build_cnn, embed, make_optimizer, train_epochs
from convmf_core.config import ConvMFConfig
from convmf_core.data import Ratings
from convmf_core.models.als_mf import ALSFactorModel
from convmf_core.models.base import ModelFitError, NotFittedError, ProgressCallback, resolve_device
from convmf_core.models.warm_start import WarmStart
from convmf_core.text import Documents


class ConvMF(ALSFactorModel):
    """ConvMF with the uniform model API; ``fit`` also takes the items' encoded descriptions."""

    def __init__(self, config: ConvMFConfig = ConvMFConfig()) -> None:
        super().__init__(config.als, config.seed, config.device)
        self.config = config
        self.cnn_: TextCNN | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._documents: Documents | None = None
        self.item_has_text_: torch.Tensor | None = None

    def fit(self, train: Ratings, validation: Ratings | None = None, *, documents: Documents,
            vocabulary_size: int | None = None, word_vectors: np.ndarray | None = None,
            callback: ProgressCallback | None = None, checkpoint_path: str | Path | None = None,
            resume: bool = False, warm_start: WarmStart | None = None) -> "ConvMF":
        """Alternate eq. 7, eq. 8 and eq. 9 until validation RMSE stops improving.

        ``documents[j]`` is item j's encoded description (``len(documents) == train.n_items``);
        ``vocabulary_size`` is the number of words (without padding; default: the largest id in ``documents``);
        ``word_vectors`` ((vocabulary_size + 1) x embedding_dim) start the embedding from pretrained vectors.
        With ``checkpoint_path``, state is saved after every iteration; ``resume=True`` continues from it.
        ``warm_start`` (:func:`~convmf_core.models.warm_start.warm_start_from`) starts U, V, the biases and the CNN
        from a previous model; ``documents`` must then be encoded with that model's vocabulary (same word ids), and
        ``word_vectors`` are ignored (the embedding comes from the previous CNN). The CNN's optimiser starts afresh
        (its state is not part of a saved model).
        """
        if len(documents) != train.n_items:
            raise ModelFitError(f"{len(documents)} documents for {train.n_items} items: give one (possibly empty) "
                                "document per item")
        if vocabulary_size is None and warm_start is not None and warm_start.vocabulary_size is not None:
            vocabulary_size = warm_start.vocabulary_size  # the kept vocabulary
        n_words = int(vocabulary_size if vocabulary_size is not None else (documents.ids.max() if len(documents.ids) else 0))
        if len(documents.ids) and int(documents.ids.max()) > n_words:
            raise ModelFitError(f"documents use word id {int(documents.ids.max())}, beyond the {n_words}-word "
                                "vocabulary")
        self._documents = documents
        self.vocabulary_size_ = n_words
        device = resolve_device(self.device)
        self.cnn_ = build_cnn(n_words + 1, self.als.n_factors, self.config.cnn, seed=self.seed,
                              pretrained_embeddings=None if warm_start is not None else word_vectors).to(device)
        if warm_start is not None:
            warm_start.check_shapes(train.n_users, train.n_items, self.als.n_factors)
            self._load_warm_cnn(warm_start, n_words)
        self._optimizer = make_optimizer(self.cnn_, self.config.cnn)
        self.item_has_text_ = torch.as_tensor(documents.has_text())
        self._fit_als(train, validation, callback, checkpoint_path, resume, warm_start)
        self.cnn_.eval()
        return self

    def _load_warm_cnn(self, warm_start: WarmStart, n_words: int) -> None:
        """The previous CNN's weights (same vocabulary, same architecture), or a clear error saying what differs."""
        if warm_start.cnn_state is None:
            raise ModelFitError("the warm start has no CNN weights (it comes from a model without text): use a "
                                "full fit, or warm-start a PMF")
        if warm_start.vocabulary_size is not None and warm_start.vocabulary_size != n_words:
            raise ModelFitError(f"the warm start's CNN was built for {warm_start.vocabulary_size} words, the documents "
                                f"use {n_words}: encode them with the previous model's vocabulary, or refit")
        try:
            self.cnn_.load_state_dict(warm_start.cnn_state)
        except RuntimeError as exc:  # a different architecture (CNNConfig changed)
            raise ModelFitError(f"the warm start's CNN does not match this configuration's CNN: {exc}") from exc

    # ----- hooks -------------------------------------------------------------------------------------------
    def _text_items(self) -> np.ndarray:
        return np.flatnonzero(self.item_has_text_.numpy())

    def _init_prior(self, n_items: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
        theta = torch.zeros(n_items, self.als.n_factors, device=device)
        items = self._text_items()
        theta[torch.as_tensor(items, device=device)] = embed(self.cnn_, self._documents, items, device)
        return theta  # the untrained CNN's output, as the authors' code starts V

    def _prior_mask(self) -> torch.Tensor:
        return self.item_has_text_.to(self.cnn_.projection.weight.device)

    def _warmup_iterations(self) -> int:
        return self.config.warmup_iterations

    def _warmup_epochs(self) -> int | None:
        return self.config.warmup_cnn_epochs

    def _warm_start_epochs(self) -> int | None:
        return self.config.warm_start_cnn_epochs

    def _min_iterations(self) -> int:
        return self.config.min_iterations

    def _warm_start_step(self) -> int:
        return self.config.warm_start_decay_steps

    def _update_prior(self, V: torch.Tensor, item_weight: torch.Tensor, rated: torch.Tensor,
                      generator: torch.Generator, epochs: int | None,
                      step: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config.cnn
        epochs = cfg.epochs_per_iteration if epochs is None else epochs
        device = V.device
        # The step size of the step-th eq. 9 update decays: lr_t = lr * decay^t. V is the CNN's moving target; with
        # a constant step the CNN keeps chasing it and V still moves ~10% per outer iteration after 30 (ML-100K),
        # so validation RMSE jitters by ~0.02 and early stopping picks a lucky draw. With the decay the alternation
        # settles (V moves <0.1% per iteration after ~25) and refits from other seeds land close together.
        learning_rate = cfg.learning_rate * cfg.learning_rate_decay ** max(step, 0)
        for group in self._optimizer.param_groups:
            group["lr"] = learning_rate
        # eq. 9 targets: items with text and at least one rating (an unrated item's v_j is theta_j already).
        train_items = np.flatnonzero(self.item_has_text_.numpy() & rated.cpu().numpy())
        t0 = time.perf_counter()
        cnn_loss = train_epochs(self.cnn_, self._optimizer, self._documents, train_items, V,
                                item_weight if self.als.item_weighting else None, epochs, cfg.batch_size, generator)
        t_cnn = time.perf_counter() - t0
        theta = self._init_prior(V.shape[0], device, generator)
        return theta, {"cnn_loss": cnn_loss, "cnn_seconds": t_cnn, "cnn_learning_rate": learning_rate,
                       "cnn_seconds_per_epoch": t_cnn / max(epochs, 1)}

    def _extra_state(self) -> dict[str, Any]:
        return {"cnn": self.cnn_.state_dict(), "optimizer": self._optimizer.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.cnn_.load_state_dict(state["cnn"])
        self._optimizer.load_state_dict(state["optimizer"])

    # ----- text-only scoring -------------------------------------------------------------------------------
    def embed_items(self, documents: Documents) -> torch.Tensor:
        """theta = cnn(W, X) for new documents (eval mode, CPU tensor): the factors of items described after
        training, which have no ratings. Word ids must come from this model's vocabulary."""
        if self.cnn_ is None:
            raise NotFittedError("ConvMF is not fitted: call fit() or load a saved model")
        if len(documents.ids) and int(documents.ids.max()) > self.vocabulary_size_:
            raise ValueError("documents use word ids beyond this model's vocabulary")
        device = self.cnn_.projection.weight.device
        items = np.flatnonzero(documents.has_text())
        out = torch.zeros(len(documents), self.als.n_factors)
        out[torch.as_tensor(items)] = embed(self.cnn_, documents, items, device).cpu()
        return out
