"""Warm start: begin a fit from the previous model, and decide when a full refit is needed instead.

A nightly retrain sees yesterday's data plus a day of new ratings, users and items. Starting ALS from yesterday's
factors (and the CNN from yesterday's weights) lands next to the optimum after a few outer iterations instead of the
dozens a fit from random factors needs. :func:`warm_start_from` maps the previous model onto today's id maps;
``fit(..., warm_start=...)`` of :class:`~convmf_core.models.convmf.ConvMF` and
:class:`~convmf_core.models.als_mf.PMF` use it:

* users and items the previous model knows keep their factors and biases (mapped through the id maps);
* new items start at v_j = theta_j = cnn(W, X_j) with the previous CNN weights (no text: the usual random start);
* new users need no start: the first half-step of every outer iteration solves all users with V fixed (eq. 7),
  so a new user's u_i is the exact eq. 7 solution of their ratings against the warm V.

The vocabulary is kept (the caller encodes today's documents with the previous vocabulary), so the CNN's embedding
rows still mean the same words. :func:`refit_reason` says when that is no longer good enough.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from convmf_core.config import RefitPolicy, TextConfig
from convmf_core.data import IdMap
from convmf_core.models.als_mf import ALSFactorModel
from convmf_core.models.base import ModelFitError
from convmf_core.text import ENGLISH_STOP_WORDS, Vocabulary, _tokens

__all__ = ["RefitPolicy", "WarmStart", "oov_share", "refit_reason", "warm_start_from"]


@dataclass(frozen=True, eq=False)
class WarmStart:
    """The previous model's parameters and, for each dense index of today's maps, where it was before.

    ``user_source[i]`` is the previous index of today's user ``i`` (-1: a new user); ``item_source`` likewise.
    Tensors are the previous model's, on the CPU: ``user_factors`` (N_prev x k), ``item_factors`` (M_prev x k),
    ``user_bias`` (N_prev), ``item_bias`` (M_prev); ``cnn_state`` is the previous text encoder's ``state_dict``
    (the CNN's or the linear map's; None for PMF) and ``vocabulary_size`` the number of words it was built for.
    """

    user_factors: torch.Tensor
    item_factors: torch.Tensor
    user_bias: torch.Tensor
    item_bias: torch.Tensor
    user_source: np.ndarray
    item_source: np.ndarray
    cnn_state: dict[str, torch.Tensor] | None = None
    vocabulary_size: int | None = None

    def __post_init__(self) -> None:
        for name, n_prev in (("user_source", self.user_factors.shape[0]), ("item_source", self.item_factors.shape[0])):
            src = np.ascontiguousarray(getattr(self, name), dtype=np.int64)
            if src.ndim != 1 or (src.size and (src.min() < -1 or src.max() >= n_prev)):
                raise ValueError(f"WarmStart.{name} must hold previous indices in [0, {n_prev}) or -1")
            src.setflags(write=False)
            object.__setattr__(self, name, src)

    @property
    def n_factors(self) -> int:
        """k of the previous model."""
        return int(self.item_factors.shape[1])

    @property
    def new_users(self) -> np.ndarray:
        """Today's dense indices of users the previous model did not know."""
        return np.flatnonzero(self.user_source < 0)

    @property
    def new_items(self) -> np.ndarray:
        """Today's dense indices of items the previous model did not know."""
        return np.flatnonzero(self.item_source < 0)

    def summary(self) -> dict[str, int]:
        """Counts for logs: known and new users and items."""
        return {"warm_users": int((self.user_source >= 0).sum()), "new_users": int(self.new_users.size),
                "warm_items": int((self.item_source >= 0).sum()), "new_items": int(self.new_items.size)}

    def check_shapes(self, n_users: int, n_items: int, n_factors: int) -> None:
        """Raise :class:`ModelFitError` when this warm start does not fit a fit of that shape."""
        if len(self.user_source) != n_users or len(self.item_source) != n_items:
            raise ModelFitError(f"warm start is for {len(self.user_source)} users x {len(self.item_source)} items, "
                                f"the training data has {n_users} x {n_items}: build it with today's id maps")
        if self.n_factors != n_factors:
            raise ModelFitError(f"warm start has k={self.n_factors} factors, the configuration asks for "
                                f"{n_factors}: a change of k needs a full refit")

    def initial(self, source: np.ndarray, previous: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        """Rows of ``previous`` where ``source >= 0``, else rows of ``fresh`` (same device and dtype as ``fresh``)."""
        out = fresh.clone()
        known = np.flatnonzero(source >= 0)
        if known.size:
            idx = torch.as_tensor(known, device=fresh.device)
            out[idx] = previous[torch.as_tensor(source[known])].to(device=fresh.device, dtype=fresh.dtype)
        return out


def _comparable(ids: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Raw ids as strings when the two maps disagree on type (e.g. ints in memory, strings read from a bundle)."""
    if ids.dtype.kind == other.dtype.kind or (ids.dtype.kind in "iu" and other.dtype.kind in "iu"):
        return ids
    return np.asarray([str(x) for x in ids.tolist()], dtype=object)


def _sources(previous: IdMap, current: IdMap) -> np.ndarray:
    prev_ids = _comparable(previous.raw_ids, current.raw_ids)
    cur_ids = _comparable(current.raw_ids, previous.raw_ids)
    return IdMap(prev_ids).to_index(cur_ids, unknown="minus_one")


def warm_start_from(previous: ALSFactorModel, previous_users: IdMap, previous_items: IdMap, users: IdMap,
                    items: IdMap) -> WarmStart:
    """A :class:`WarmStart` from a fitted (or loaded) ConvMF or PMF and the id maps it was trained with, for a fit
    over ``users`` x ``items``. Ids are matched by value (as strings when one map holds ints and the other str)."""
    if getattr(previous, "user_factors_", None) is None:
        raise ModelFitError("warm start needs a fitted model: the previous model has no factors")
    if len(previous_users) != previous.user_factors_.shape[0] or len(previous_items) != previous.item_factors_.shape[0]:
        raise ModelFitError(f"the previous id maps ({len(previous_users)} users, {len(previous_items)} items) do not "
                            f"match the previous model ({previous.user_factors_.shape[0]} x "
                            f"{previous.item_factors_.shape[0]})")
    encoder = getattr(previous, "encoder_", None)
    state: dict[str, Any] | None = None
    if encoder is not None:
        state = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    return WarmStart(previous.user_factors_.detach().cpu(), previous.item_factors_.detach().cpu(),
                     previous.user_bias_.detach().cpu(), previous.item_bias_.detach().cpu(),
                     _sources(previous_users, users), _sources(previous_items, items), state,
                     getattr(previous, "vocabulary_size_", None) if encoder is not None else None)


def oov_share(vocabulary: Vocabulary, texts: Sequence[str | None], text_config: TextConfig = TextConfig()) -> float:
    """The share of the words of ``texts`` (the first ``max_length`` tokens of each, stop words removed as when the
    vocabulary is built) that are not in ``vocabulary``; 0.0 when the texts have no word."""
    stop = ENGLISH_STOP_WORDS if text_config.remove_stop_words else frozenset()
    total = unknown = 0
    for text in texts:
        words = [w for w in _tokens(text, text_config.max_length) if w not in stop]
        total += len(words)
        unknown += sum(1 for w in words if w not in vocabulary)
    return unknown / total if total else 0.0


def refit_reason(vocabulary: Vocabulary, new_item_texts: Sequence[str | None], n_new_items: int, n_items: int,
                 policy: RefitPolicy = RefitPolicy(), text_config: TextConfig = TextConfig(),
                 warm_starts: int = 0) -> str | None:
    """None when a warm start with the kept ``vocabulary`` is fine; otherwise why a full refit is needed, with the
    figures. Checked: the text settings changed since the vocabulary was built; the share of new items
    (``n_new_items / n_items``) is above ``policy.max_new_item_share``; the out-of-vocabulary share of the new items'
    words (:func:`oov_share`) is above ``policy.max_oov_share``; the previous model already ends a chain of
    ``warm_starts`` warm starts since its last full fit, and one more would pass ``policy.max_warm_starts``."""
    reasons = []
    if warm_starts >= policy.max_warm_starts:
        reasons.append(f"the previous model ends a chain of {warm_starts} warm start(s) since its last full fit "
                       f"(max_warm_starts {policy.max_warm_starts})")
    if vocabulary.config is not None and vocabulary.config != text_config:
        reasons.append(f"the text settings changed since the vocabulary was built ({vocabulary.config} -> "
                       f"{text_config})")
    if n_items > 0:
        new_share = n_new_items / n_items
        if new_share > policy.max_new_item_share:
            reasons.append(f"{n_new_items} of {n_items} items are new ({new_share:.1%} > max_new_item_share "
                           f"{policy.max_new_item_share:.1%})")
    share = oov_share(vocabulary, new_item_texts, text_config)
    if share > policy.max_oov_share:
        reasons.append(f"{share:.1%} of the words in the {len(new_item_texts)} new description(s) are not in the "
                       f"kept {len(vocabulary)}-word vocabulary (> max_oov_share {policy.max_oov_share:.1%})")
    return "; ".join(reasons) if reasons else None
