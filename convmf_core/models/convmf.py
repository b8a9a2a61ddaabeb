"""ConvMF (Kim et al., RecSys 2016): ALS matrix factorisation whose item factors are pulled toward a text encoder's
prediction theta_j from item j's description - and, beyond the paper, whose item biases are pulled toward the
text's prediction theta_j^c.

The ALS loop is :class:`~convmf_core.models.als_mf.ALSFactorModel`'s; this class supplies the prior and its update
through a :class:`~convmf_core.encoders.TextEncoder`: the paper's CNN (eq. 9, :mod:`convmf_core.cnn`; ConvMF+ when
its embedding starts from pretrained vectors) or the linear encoder (eq. 9', :mod:`convmf_core.linear_encoder`).

Items without text (an empty document after preprocessing) get no prior: their v_j is purely collaborative, as
in PMF. Items with text but no training rating get v_j = theta_j and c_j = theta_j^c (eq. 8 with no ratings), so a
new item is scored from its description alone; :meth:`ConvMF.embed_items` does the same for items described after
training.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convmf_core.cnn import CNNEncoder
from convmf_core.config import ConvMFConfig
from convmf_core.data import Ratings
from convmf_core.encoders import TextEncoder
from convmf_core.linear_encoder import DocumentFeatures, LinearEncoder
from convmf_core.models.als_mf import ALSFactorModel
from convmf_core.models.base import ModelFitError, NotFittedError, ProgressCallback, resolve_device
from convmf_core.models.warm_start import WarmStart
from convmf_core.text import Documents, Vocabulary

logger = logging.getLogger("convmf_core.convmf")


class ConvMF(ALSFactorModel):
    """ConvMF with the uniform model API; ``fit`` also takes the items' encoded descriptions.

    Fitted state beyond :class:`ALSFactorModel`'s: ``encoder_`` (the text encoder), ``item_has_text_``,
    ``vocabulary_size_``, ``vector_coverage_`` (how many vocabulary words the pretrained vectors know, or None),
    ``prior_report_`` (the prior's held-out R^2).
    """

    def __init__(self, config: ConvMFConfig = ConvMFConfig()) -> None:
        super().__init__(config.als, config.seed, config.device)
        self.config = config
        self.encoder_: TextEncoder | None = None
        self.item_has_text_: torch.Tensor | None = None
        self.vector_coverage_: dict[str, Any] | None = None

    @property
    def cnn_(self) -> torch.nn.Module | None:
        """The document CNN (``encoder="cnn"``), else None."""
        return self.encoder_.model if isinstance(self.encoder_, CNNEncoder) else None

    @property
    def bias_channel(self) -> bool:
        """Whether the text also gives the prior mean of the item bias (``bias_prior`` with biases on)."""
        return self.config.bias_prior and self.als.use_bias and self.als.confidence is None

    def fit(self, train: Ratings, validation: Ratings | None = None, *, documents: Documents,
            vocabulary: Vocabulary | None = None, vocabulary_size: int | None = None,
            word_vectors: np.ndarray | None = None, callback: ProgressCallback | None = None,
            checkpoint_path: str | Path | None = None, resume: bool = False,
            warm_start: WarmStart | None = None) -> "ConvMF":
        """Alternate eq. 7, eq. 8 and the encoder's update (eq. 9 / 9') until validation RMSE stops improving;
        then, with ``als.gibbs.samples``, average the posterior.

        ``documents[j]`` is item j's encoded description (``len(documents) == train.n_items``); ``vocabulary`` (the
        one that encoded them) lets the model look its words up in ``config.word_vectors``; ``vocabulary_size`` is
        the number of words when no vocabulary is given (default: the largest id in ``documents``);
        ``word_vectors`` ((vocabulary_size + 1) x dim) overrides the configured vectors with a ready matrix.
        With ``checkpoint_path``, state is saved after every iteration; ``resume=True`` continues from it.
        ``warm_start`` (:func:`~convmf_core.models.warm_start.warm_start_from`) starts U, V, the biases and the
        encoder from a previous model; ``documents`` must then be encoded with that model's vocabulary.
        """
        if len(documents) != train.n_items:
            raise ModelFitError(f"{len(documents)} documents for {train.n_items} items: give one (possibly empty) "
                                "document per item")
        if vocabulary is not None:
            vocabulary_size = len(vocabulary)
        if vocabulary_size is None and warm_start is not None and warm_start.vocabulary_size is not None:
            vocabulary_size = warm_start.vocabulary_size  # the kept vocabulary
        n_words = int(vocabulary_size if vocabulary_size is not None else (documents.ids.max() if len(documents.ids) else 0))
        if len(documents.ids) and int(documents.ids.max()) > n_words:
            raise ModelFitError(f"documents use word id {int(documents.ids.max())}, beyond the {n_words}-word "
                                "vocabulary")
        self.vocabulary_size_ = n_words
        device = resolve_device(self.device)
        if warm_start is not None:
            warm_start.check_shapes(train.n_users, train.n_items, self.als.n_factors)
            self.encoder_ = self._warm_encoder(warm_start, documents, n_words, device)
        else:
            self.encoder_ = self._new_encoder(documents, n_words, vocabulary, word_vectors, device)
        self.item_has_text_ = torch.as_tensor(documents.has_text())
        self._fit_als(train, validation, callback, checkpoint_path, resume, warm_start)
        if isinstance(self.encoder_, CNNEncoder):
            self.encoder_.model.eval()
        return self

    def _pretrained(self, vocabulary: Vocabulary | None, word_vectors: np.ndarray | None,
                    n_words: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(matrix [n_words + 1, dim], found mask) of the pretrained vectors for the vocabulary, or (None, None)."""
        if word_vectors is not None:
            matrix = np.asarray(word_vectors, dtype=np.float32)
            if matrix.shape[0] != n_words + 1:
                raise ModelFitError(f"word_vectors have {matrix.shape[0]} rows, the vocabulary needs {n_words + 1}")
            found = np.abs(matrix).sum(1) > 0  # rows left at zero have no vector
            n_found = int(found[1:].sum())
            from convmf_core.vectors import VectorCoverage

            self.vector_coverage_ = VectorCoverage(n_words, n_found, 0, n_words - n_found,
                                                   (n_words - n_found) / n_words if n_words else 0.0, (),
                                                   "a word-vector matrix given to fit()").to_dict()
            return matrix, found
        if self.config.word_vectors is None:
            return None, None
        if vocabulary is None:
            logger.warning("no vocabulary given to fit(): the pretrained vectors %r are not used (pass vocabulary=)",
                           self.config.word_vectors)
            return None, None
        from convmf_core.vectors import load_vectors  # reads the package's files once per process

        matrix, found, coverage = load_vectors(self.config.word_vectors).for_vocabulary(vocabulary, seed=self.seed)
        self.vector_coverage_ = coverage.to_dict()
        logger.info("%s", coverage.summary())
        return matrix, found

    def _new_encoder(self, documents: Documents, n_words: int, vocabulary: Vocabulary | None,
                     word_vectors: np.ndarray | None, device: torch.device) -> TextEncoder:
        """The configured encoder for a fit from scratch."""
        matrix, found = self._pretrained(vocabulary, word_vectors, n_words)
        k, cfg = self.als.n_factors, self.config
        if cfg.encoder == "cnn":
            return CNNEncoder(documents, n_words, k, self.bias_channel, cfg.cnn, seed=self.seed, device=device,
                              pretrained=matrix)
        if cfg.encoder != "linear":
            raise ModelFitError(f"unknown encoder {cfg.encoder!r}; use 'linear' or 'cnn'")
        svd_dim = cfg.linear.svd_dim if matrix is not None else max(cfg.linear.svd_dim, cfg.linear.fallback_svd_dim)
        features = DocumentFeatures.fit(documents, n_words, matrix, found, svd_dim, self.seed)
        return LinearEncoder(features, documents, k, self.bias_channel, cfg.linear, device)

    def _warm_encoder(self, warm_start: WarmStart, documents: Documents, n_words: int,
                      device: torch.device) -> TextEncoder:
        """The previous model's encoder (same vocabulary, same architecture), or a clear error saying what differs."""
        state = warm_start.cnn_state
        if state is None:
            raise ModelFitError("the warm start has no text encoder (it comes from a model without text): use a "
                                "full fit, or warm-start a PMF")
        if warm_start.vocabulary_size is not None and warm_start.vocabulary_size != n_words:
            raise ModelFitError(f"the warm start's encoder was built for {warm_start.vocabulary_size} words, the "
                                f"documents use {n_words}: encode them with the previous model's vocabulary, or refit")
        kind = "cnn" if any(key.startswith("cnn.") for key in state) else "linear"
        if kind != self.config.encoder:
            raise ModelFitError(f"the warm start's encoder is {kind!r}, the configuration asks for "
                                f"{self.config.encoder!r}: a change of encoder needs a full refit")
        out_dim = int(state["cnn.projection.weight"].shape[0] if kind == "cnn" else state["weight"].shape[1])
        if out_dim != self.als.n_factors + int(self.bias_channel):
            raise ModelFitError(f"the warm start's encoder predicts {out_dim} columns, this configuration "
                                f"{self.als.n_factors + int(self.bias_channel)} (k and the bias channel, bias_prior): "
                                "a change of either needs a full refit")
        try:
            encoder = encoder_from_state(state, self.config, n_words, documents, device)
        except (RuntimeError, KeyError) as exc:  # a different architecture (CNNConfig, k or the bias channel changed)
            raise ModelFitError(f"the warm start's encoder does not match this configuration's: {exc}") from exc
        return encoder

    # ----- hooks -------------------------------------------------------------------------------------------
    def _init_prior(self, n_items: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
        # CNN: the untrained network's output, as the authors' code starts V; linear: the map starts at 0
        return self.encoder_.prior().to(device)

    def _start_at_prior(self) -> bool:
        return isinstance(self.encoder_, CNNEncoder)  # the linear map starts at 0: V = 0 would be a saddle point

    def _prior_mask(self) -> torch.Tensor:
        return self.item_has_text_.to(self.encoder_.device)

    def _warmup_iterations(self) -> int:
        return self.config.warmup_iterations

    def _warmup_epochs(self) -> int | None:
        return self.config.warmup_cnn_epochs

    def _warm_start_epochs(self) -> int | None:
        return self.config.warm_start_cnn_epochs

    def _min_iterations(self) -> int:
        # the closed-form prior has no step schedule: any iteration of a linear fit is a settled point
        return self.config.min_iterations if self.config.encoder == "cnn" else 1

    def _warm_start_step(self) -> int:
        return self.config.warm_start_decay_steps

    def _refit_prior_when_sampling(self) -> bool:
        return isinstance(self.encoder_, LinearEncoder)

    def _targets(self, V: torch.Tensor, item_bias: torch.Tensor) -> torch.Tensor:
        """What the encoder predicts: [v_j, c_j] with the bias channel, v_j without."""
        return torch.cat([V, item_bias.unsqueeze(1)], 1) if self.bias_channel else V

    def _fitted_items(self, rated: torch.Tensor) -> np.ndarray:
        """Items the encoder learns from: with text and at least one rating (an unrated item's v_j is its prior)."""
        return np.flatnonzero(self.item_has_text_.numpy() & rated.cpu().numpy())

    def _update_prior(self, V: torch.Tensor, item_bias: torch.Tensor, item_weight: torch.Tensor,
                      rated: torch.Tensor, generator: torch.Generator, epochs: int | None,
                      step: int) -> tuple[torch.Tensor, dict[str, float]]:
        items = self._fitted_items(rated)
        weights = item_weight if self.als.item_weighting else None
        extra = self.encoder_.fit(self._targets(V, item_bias), items, weights, generator, epochs, step) \
            if len(items) else {}
        return self.encoder_.prior().to(V.device), extra

    def _prior_report(self, V: torch.Tensor, item_bias: torch.Tensor, rated: torch.Tensor,
                      generator: torch.Generator) -> dict[str, float]:
        items = self._fitted_items(rated)
        if len(items) < 10:
            return {}
        report = self.encoder_.heldout_r2(self._targets(V, item_bias), items, generator)
        logger.info("text prior on items it was not fitted on: R^2 %s", ", ".join(f"{k} {v:.3f}"
                                                                                   for k, v in report.items()))
        return report

    def _extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"encoder": {k: v.clone() for k, v in self.encoder_.state_dict().items()}}
        if isinstance(self.encoder_, CNNEncoder):
            state["optimizer"] = self.encoder_.optimizer.state_dict()
        return state

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.encoder_.load_state_dict(state["encoder"])
        if "optimizer" in state and isinstance(self.encoder_, CNNEncoder):
            self.encoder_.optimizer.load_state_dict(state["optimizer"])

    # ----- text-only scoring -------------------------------------------------------------------------------
    def embed_items(self, documents: Documents) -> torch.Tensor:
        """The prior [theta_j (, theta_j^c)] for new documents (a CPU tensor; zeros for documents with no known
        word): the factors (and bias) of items described after training, which have no ratings. Word ids must come
        from this model's vocabulary."""
        if self.encoder_ is None:
            raise NotFittedError("ConvMF is not fitted: call fit() or load a saved model")
        if len(documents.ids) and int(documents.ids.max()) > self.vocabulary_size_:
            raise ValueError("documents use word ids beyond this model's vocabulary")
        with torch.no_grad():
            out = self.encoder_.embed(documents).detach().cpu().float()
        return out * torch.as_tensor(documents.has_text()).unsqueeze(1)


def encoder_from_state(state: dict[str, Any], config: ConvMFConfig, n_words: int, documents: Documents | None,
                       device: torch.device | str = "cpu") -> TextEncoder:
    """Rebuild a saved encoder (bundle or warm start) from its :meth:`TextEncoder.state_dict`; ``documents`` are
    the training documents of a fit that continues from it (None for a loaded model that only embeds)."""
    k = config.als.n_factors
    if any(key.startswith("cnn.") for key in state):
        out_rows = int(state["cnn.projection.weight"].shape[0])
        encoder = CNNEncoder(documents, n_words, k, out_rows > k, config.cnn, seed=config.seed, device=device,
                             embedding_dim=int(state["cnn.embedding.weight"].shape[1]))
    else:
        features = DocumentFeatures.from_state({key[len("features."):]: v for key, v in state.items()
                                                if key.startswith("features.")})
        encoder = LinearEncoder(features, documents, k, int(state["weight"].shape[1]) > k, config.linear, device)
    encoder.load_state_dict(state)
    return encoder
