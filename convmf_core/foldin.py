"""Fold-in without retraining: new users from their ratings (eq. 7), new items from their text (theta_j).

A fitted ALS model (PMF or ConvMF) fixes the item side: factors V, item biases c, the global mean mu and the ridge
terms. With V fixed, a user's factors have the closed form of eq. 7 (Kim et al. 2016)

    x_i = (Y_i^T Y_i + Lambda)^-1 Y_i^T t_i,   Y_i rows y_j = [v_j, 1],  t_ij = r_ij - mu - c_j,
                                               Lambda = diag(lambda_U, ..., lambda_U, lambda_bias)

where x_i = [u_i, b_i] (the bias column rides along exactly as in the ALS solver, ``convmf_core.als``; without
biases it is dropped, mu = 0 and c = 0). One k x k (k+1 with biases) solve per user; :func:`fold_in_users` solves
any number of users in one batched Cholesky call through :func:`convmf_core.als.solve_ridge`.

**A known user with new ratings.** The model keeps x_old = [u_i, b_i] and (in the served model) which items the
user rated, not the rating values. :func:`fold_in_users` with ``previous`` and ``history`` solves

    x_new = (Y_O^T Y_O + Y_N^T Y_N + Lambda)^-1 (Y_O^T t^_O + Y_N^T t_N + Lambda x_old)

with O the history items not rated again (their targets t^_j = y_j . x_old, the model's own belief) and N the new
ratings. When x_old is the eq. 7 solution of the old ratings against the same V, this equals eq. 7 on old and new
ratings together, with a re-rated item's newest rating replacing the old one (up to the old residual of that item);
with no new rating it returns x_old unchanged.

Implicit-feedback models (``ALSConfig.confidence``) treat every rated item as preference 1 with confidence a and
every other item with confidence b, as in training; their history is then exact (values are all 1) and no prior is
needed.

**A new item.** Its factor is the text encoder's prediction from its description, theta_j, encoded with the
model's own vocabulary (out-of-vocabulary words are deleted, as in training), and its bias is the text's prior mean
theta_j^c (0 without the bias channel): exactly what the trained model holds for a catalogue item with text and no
rating (eq. 8 with no ratings). A description with no known word gets v_j = 0, c_j = 0: it is scored from mu and
the user's bias only.

**A model with posterior averaging** (``ALSConfig.gibbs``) predicts the mean over S kept draws (V^(s), c^(s)). A
user is folded in against every draw (eq. 7 once per draw, each against its own V^(s), with the draw's own previous
u_i^(s) for a known user), and scored by the stacked rows of :mod:`convmf_core.gibbs`: the mean over draws of
u_i^(s)T v_j^(s) + b_i^(s) + c_j^(s). A new item holds theta_j in every draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from convmf_core.als import SparseRows, solve_ridge
from convmf_core.data import CSR, Ratings
from convmf_core.models.als_mf import ALSFactorModel
from convmf_core.models.base import NotFittedError
from convmf_core.models.convmf import ConvMF
from convmf_core.text import Documents, Vocabulary, encode_documents

__all__ = ["FoldInError", "ItemSide", "NewItems", "UserFactors", "embed_new_items", "fold_in_users"]


class FoldInError(ValueError):
    """A fold-in request the model cannot answer: wrong model kind, bad shapes, bad ratings or bad text."""


def _stack(per_sample: torch.Tensor) -> torch.Tensor:
    """(S x B x d) rows -> (B x S d), each block scaled by 1/sqrt(S): the stacked factor model of convmf_core.gibbs."""
    s = per_sample.shape[0]
    return per_sample.permute(1, 0, 2).reshape(per_sample.shape[1], -1) / math.sqrt(s)


@dataclass(frozen=True, eq=False)
class UserFactors:
    """Users' factors ``factors`` (B x k) and biases ``bias`` (B); zeros for a model without biases. For a model
    with posterior averaging, ``factor_samples`` (S x B x k) and ``bias_samples`` (S x B) hold one solve per draw
    and ``factors`` / ``bias`` their means."""

    factors: torch.Tensor
    bias: torch.Tensor
    factor_samples: torch.Tensor | None = None
    bias_samples: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.factors.shape[0])

    def sample(self, s: int) -> "UserFactors":
        """Draw ``s``'s factors as a point :class:`UserFactors`."""
        return UserFactors(self.factor_samples[s], self.bias_samples[s])

    def scoring_rows(self) -> torch.Tensor:
        """``[u_i, b_i, 1]`` (stacked over draws when sampled): the user rows of
        :class:`~convmf_core.models.base.ScoringFactors`."""
        if self.factor_samples is not None:
            ones = torch.ones_like(self.bias_samples).unsqueeze(2)
            return _stack(torch.cat([self.factor_samples, self.bias_samples.unsqueeze(2), ones], 2))
        return torch.cat([self.factors, self.bias.unsqueeze(1), torch.ones(len(self), 1)], 1)

    @classmethod
    def of_model(cls, model: ALSFactorModel, known: np.ndarray) -> "UserFactors":
        """The fitted factors of the model's users ``known`` (dense indices; -1 = a new user, zeros)."""
        rows = torch.as_tensor(np.where(known >= 0, known, 0))
        mask = torch.as_tensor(known >= 0)
        factors = torch.where(mask.unsqueeze(1), model.user_factors_[rows].float(), 0.0)
        bias = torch.where(mask, model.user_bias_[rows].float(), 0.0)
        samples = getattr(model, "samples_", None)
        if samples is None:
            return cls(factors, bias)
        f_s = torch.where(mask.view(1, -1, 1), samples.user[:, rows].float(), 0.0)
        b_s = torch.where(mask.view(1, -1), samples.user_bias[:, rows].float(), 0.0)
        return cls(factors, bias, f_s, b_s)


@dataclass(frozen=True, eq=False)
class NewItems:
    """Items described after training: ``factors`` = theta_j (B x k), ``bias`` = c_j = theta_j^c (the text encoder's
    bias channel; 0 without it), ``has_text`` says which descriptions kept at least one vocabulary word (the others
    have theta_j = 0 and c_j = 0)."""

    factors: torch.Tensor
    bias: torch.Tensor
    has_text: np.ndarray
    n_samples: int = 0  # the model's kept draws (0: a point model); every draw holds the same theta_j

    def __len__(self) -> int:
        return int(self.factors.shape[0])

    def scoring_rows(self) -> torch.Tensor:
        """``[v_j, 1, c_j]`` (repeated over the draws, stacked, when sampled): the item rows of
        :class:`~convmf_core.models.base.ScoringFactors`."""
        row = torch.cat([self.factors, torch.ones(len(self), 1), self.bias.unsqueeze(1)], 1)
        return _stack(row.expand(self.n_samples, -1, -1)) if self.n_samples else row


@dataclass(frozen=True, eq=False)
class ItemSide:
    """What eq. 7 solves against: a fitted model's item factors V (M x k), item biases c (M), mu and ridge terms."""

    factors: torch.Tensor
    bias: torch.Tensor
    global_mean: float
    lambda_u: float
    lambda_bias: float
    use_bias: bool
    confidence: tuple[float, float] | None = None
    factor_samples: torch.Tensor | None = None  # S x M x k, with posterior averaging
    bias_samples: torch.Tensor | None = None  # S x M

    @property
    def n_samples(self) -> int:
        """Kept draws (0: a point model)."""
        return 0 if self.factor_samples is None else int(self.factor_samples.shape[0])

    def sample(self, s: int) -> "ItemSide":
        """Draw ``s``'s item side as a point :class:`ItemSide`."""
        return ItemSide(self.factor_samples[s], self.bias_samples[s], self.global_mean, self.lambda_u,
                        self.lambda_bias, self.use_bias, self.confidence)

    @classmethod
    def of(cls, model: ALSFactorModel) -> "ItemSide":
        """The fixed item side of a fitted PMF or ConvMF (SGD MF has no lambda_U: fold-in is refused)."""
        if not isinstance(model, ALSFactorModel):
            raise FoldInError(f"fold-in needs an ALS model (PMF or ConvMF) with a lambda_U; got {type(model).__name__}")
        if model.item_factors_ is None:
            raise NotFittedError(f"{type(model).__name__} is not fitted: call fit() or load a saved model")
        cfg = model.als
        use_bias = cfg.use_bias and cfg.confidence is None  # the solver's rule (_ALSProblem)
        samples = getattr(model, "samples_", None)
        # a sampled model's users were drawn with the sampler's ridge terms; fold-in solves with the same ones
        lambda_u, lambda_bias = ((cfg.gibbs.lambda_u, cfg.gibbs.lambda_bias) if samples is not None
                                 else (cfg.lambda_u, cfg.lambda_bias))
        return cls(model.item_factors_.detach().cpu().float(), model.item_bias_.detach().cpu().float(),
                   float(model.global_mean_) if use_bias else 0.0, float(lambda_u), float(lambda_bias),
                   use_bias, None if cfg.confidence is None else tuple(cfg.confidence),
                   None if samples is None else samples.item.float(),
                   None if samples is None else samples.item_bias.float())

    @property
    def n_items(self) -> int:
        """Number of items (columns the ratings may refer to)."""
        return int(self.factors.shape[0])

    def with_items(self, new: NewItems) -> "ItemSide":
        """This side with ``new`` appended (indices ``n_items ..``), so users can rate items described today."""
        if len(new) and new.factors.shape[1] != self.factors.shape[1]:
            raise FoldInError(f"new items have {new.factors.shape[1]} factors, the model has {self.factors.shape[1]}")
        f_s = b_s = None
        if self.factor_samples is not None:
            s = self.n_samples
            f_s = torch.cat([self.factor_samples, new.factors.float().expand(s, -1, -1)], 1)
            b_s = torch.cat([self.bias_samples, new.bias.float().expand(s, -1)], 1)
        return ItemSide(torch.cat([self.factors, new.factors.float()]), torch.cat([self.bias, new.bias.float()]),
                        self.global_mean, self.lambda_u, self.lambda_bias, self.use_bias, self.confidence, f_s, b_s)

    def design(self) -> torch.Tensor:
        """Y: rows [v_j, 1] with biases, v_j without."""
        if not self.use_bias:
            return self.factors
        return torch.cat([self.factors, torch.ones(self.n_items, 1)], 1)

    def ridge(self) -> torch.Tensor:
        """diag(Lambda): lambda_U per factor (and lambda_bias for the bias column)."""
        k = int(self.factors.shape[1])
        reg = torch.full((k + self.use_bias,), self.lambda_u)
        if self.use_bias:
            reg[k] = self.lambda_bias
        return reg


def _dedupe_last(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Indices of the last occurrence of every (user, item) pair, in the original order."""
    if len(users) == 0:
        return np.zeros(0, dtype=np.int64)
    key = users.astype(np.int64) * (int(items.max()) + 1) + items
    reversed_first = np.unique(key[::-1], return_index=True)[1]
    return np.sort(len(key) - 1 - reversed_first)


def fold_in_users(side: ItemSide, ratings: Ratings, *, previous: UserFactors | None = None,
                  history: CSR | None = None, block_rows: int = 4096) -> UserFactors:
    """Solve eq. 7 for ``ratings.n_users`` users against the fixed ``side`` (module docstring).

    ``ratings`` holds the new ratings, ``users`` indexing the B users to solve (0..B-1), ``items`` indexing
    ``side``; a pair given twice keeps its last rating. ``previous`` (B rows; zeros for new users) and ``history``
    (a B-row CSR of each user's already-known items, values unused) turn it into the known-user update. A user with
    no rating at all gets x = 0 (explicit) or the solve of no observation (implicit), i.e. the ridge's prior.
    A side with posterior draws solves every draw (``previous`` must then hold the draws' factors too).
    """
    if side.n_samples:
        if previous is not None and previous.factor_samples is None:
            raise FoldInError("the model averages posterior draws: previous factors must hold one row per draw "
                              "(UserFactors.of_model)")
        per_draw = [fold_in_users(side.sample(s), ratings, previous=None if previous is None else previous.sample(s),
                                  history=history, block_rows=block_rows) for s in range(side.n_samples)]
        f_s = torch.stack([u.factors for u in per_draw])
        b_s = torch.stack([u.bias for u in per_draw])
        return UserFactors(f_s.mean(0), b_s.mean(0), f_s, b_s)
    B = ratings.n_users
    if ratings.n_items != side.n_items:
        raise FoldInError(f"the ratings have {ratings.n_items} item columns, the model has {side.n_items} items")
    if previous is not None and len(previous) != B:
        raise FoldInError(f"previous has {len(previous)} users, the ratings have {B}")
    if history is not None:
        if history.n_rows != B or history.n_cols > side.n_items:
            raise FoldInError(f"history is {history.n_rows} x {history.n_cols}; expected {B} rows and at most "
                              f"{side.n_items} columns")
        if previous is None and side.confidence is None:
            raise FoldInError("history without previous factors: the known user's targets come from previous")
    keep = _dedupe_last(ratings.users, ratings.items)
    users, items, values = ratings.users[keep], ratings.items[keep], ratings.values[keep].astype(np.float32)
    implicit = side.confidence is not None
    V = side.factors
    if implicit:
        values = np.ones(len(users), dtype=np.float32)  # preference 1, as in training
    else:  # t_ij = r_ij - mu - c_j
        values = values - side.global_mean - (side.bias[torch.as_tensor(items)].numpy() if side.use_bias else 0.0)
    if history is not None and len(history.indices):
        h_users = np.repeat(np.arange(B, dtype=np.int64), np.diff(history.indptr))
        h_items = history.indices.astype(np.int64)
        rated_again = np.isin(h_users * side.n_items + h_items, users * side.n_items + items)
        h_users, h_items = h_users[~rated_again], h_items[~rated_again]
        if implicit:
            h_values = np.ones(len(h_users), dtype=np.float32)
        else:  # t^_j = y_j . x_old = v_j . u_old + b_old (the model's own belief about the old rating)
            h_values = ((V[torch.as_tensor(h_items)] * previous.factors[torch.as_tensor(h_users)]).sum(1)
                        + (previous.bias[torch.as_tensor(h_users)] if side.use_bias else 0.0)).numpy()
        users, items = np.concatenate([users, h_users]), np.concatenate([items, h_items])
        values = np.concatenate([values, h_values.astype(np.float32)])
    rows = SparseRows.from_csr(Ratings(users, items, values, B, side.n_items).csr(), torch.device("cpu"))
    prior = None
    if previous is not None and not implicit:
        prior = previous.factors.float()
        if side.use_bias:
            prior = torch.cat([prior, previous.bias.float().unsqueeze(1)], 1)
    with torch.no_grad():
        X = solve_ridge(rows, side.design(), side.ridge(), prior, confidence=side.confidence, block_rows=block_rows)
    k = int(V.shape[1])
    bias = X[:, k].clone() if side.use_bias else torch.zeros(B)
    return UserFactors(X[:, :k].clone(), bias)


def embed_new_items(model: ConvMF, texts: Sequence[str | None], vocabulary: Vocabulary, *,
                    max_length: int | None = None) -> NewItems:
    """theta_j (the text encoder's prediction) for items described after training, and c_j = theta_j^c (0 without
    the bias channel; module docstring).

    ``texts`` are raw descriptions, encoded with ``vocabulary`` (the model's own) and cut to ``max_length`` raw
    words (default: the vocabulary's text settings, else 300), exactly as the training documents were.
    """
    if not isinstance(model, ConvMF):
        raise FoldInError(f"a {type(model).__name__} has no text encoder: it cannot score items from their description")
    if model.encoder_ is None:
        raise NotFittedError("ConvMF is not fitted: call fit() or load a saved model")
    if len(vocabulary) != model.vocabulary_size_:
        raise FoldInError(f"the vocabulary has {len(vocabulary)} words, the model's encoder was trained on "
                          f"{model.vocabulary_size_}: use the vocabulary saved with the model")
    bad = [i for i, t in enumerate(texts) if t is not None and not isinstance(t, str)]
    if bad:
        raise FoldInError(f"descriptions must be strings; entry {bad[0]} is a {type(texts[bad[0]]).__name__}")
    if max_length is None:
        max_length = vocabulary.config.max_length if vocabulary.config is not None else 300
    documents: Documents = encode_documents(list(texts), vocabulary, max_length)
    with torch.no_grad():
        theta = model.embed_items(documents).detach().float()
    k = model.als.n_factors
    bias = theta[:, k].clone() if theta.shape[1] > k else torch.zeros(len(documents))  # theta_j^c: the bias channel
    samples = getattr(model, "samples_", None)
    return NewItems(theta[:, :k].clone(), bias, documents.has_text(), 0 if samples is None else samples.n_samples)
