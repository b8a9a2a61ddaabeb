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

**A new item.** Its factor is the CNN's embedding of its description, theta_j = cnn(W, X_j), encoded with the
model's own vocabulary (out-of-vocabulary words are deleted, as in training), and its bias is c_j = 0: exactly what
the trained model holds for a catalogue item with text and no rating (eq. 8 with no ratings, the bias's prior mean).
A description with no known word gets v_j = 0, c_j = 0: it is scored from mu and the user's bias only.
"""

from __future__ import annotations

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


@dataclass(frozen=True, eq=False)
class UserFactors:
    """Users' factors ``factors`` (B x k) and biases ``bias`` (B); zeros for a model without biases."""

    factors: torch.Tensor
    bias: torch.Tensor

    def __len__(self) -> int:
        return int(self.factors.shape[0])

    def scoring_rows(self) -> torch.Tensor:
        """``[u_i, b_i, 1]``: the user rows of :class:`~convmf_core.models.base.ScoringFactors`."""
        return torch.cat([self.factors, self.bias.unsqueeze(1), torch.ones(len(self), 1)], 1)


@dataclass(frozen=True, eq=False)
class NewItems:
    """Items described after training: ``factors`` = theta_j (B x k), ``bias`` = c_j = 0, ``has_text`` says which
    descriptions kept at least one vocabulary word (the others have theta_j = 0)."""

    factors: torch.Tensor
    bias: torch.Tensor
    has_text: np.ndarray

    def __len__(self) -> int:
        return int(self.factors.shape[0])

    def scoring_rows(self) -> torch.Tensor:
        """``[v_j, 1, c_j]``: the item rows of :class:`~convmf_core.models.base.ScoringFactors`."""
        return torch.cat([self.factors, torch.ones(len(self), 1), self.bias.unsqueeze(1)], 1)


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

    @classmethod
    def of(cls, model: ALSFactorModel) -> "ItemSide":
        """The fixed item side of a fitted PMF or ConvMF (SGD MF has no lambda_U: fold-in is refused)."""
        if not isinstance(model, ALSFactorModel):
            raise FoldInError(f"fold-in needs an ALS model (PMF or ConvMF) with a lambda_U; got {type(model).__name__}")
        if model.item_factors_ is None:
            raise NotFittedError(f"{type(model).__name__} is not fitted: call fit() or load a saved model")
        cfg = model.als
        use_bias = cfg.use_bias and cfg.confidence is None  # the solver's rule (_ALSProblem)
        return cls(model.item_factors_.detach().cpu().float(), model.item_bias_.detach().cpu().float(),
                   float(model.global_mean_) if use_bias else 0.0, float(cfg.lambda_u), float(cfg.lambda_bias),
                   use_bias, None if cfg.confidence is None else tuple(cfg.confidence))

    @property
    def n_items(self) -> int:
        """Number of items (columns the ratings may refer to)."""
        return int(self.factors.shape[0])

    def with_items(self, new: NewItems) -> "ItemSide":
        """This side with ``new`` appended (indices ``n_items ..``), so users can rate items described today."""
        if len(new) and new.factors.shape[1] != self.factors.shape[1]:
            raise FoldInError(f"new items have {new.factors.shape[1]} factors, the model has {self.factors.shape[1]}")
        return ItemSide(torch.cat([self.factors, new.factors.float()]), torch.cat([self.bias, new.bias.float()]),
                        self.global_mean, self.lambda_u, self.lambda_bias, self.use_bias, self.confidence)

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
    """
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
    """theta_j = cnn(W, X_j) for items described after training; c_j = 0 (module docstring).

    ``texts`` are raw descriptions, encoded with ``vocabulary`` (the model's own) and cut to ``max_length`` raw
    words (default: the vocabulary's text settings, else 300), exactly as the training documents were.
    """
    if not isinstance(model, ConvMF):
        raise FoldInError(f"a {type(model).__name__} has no text CNN: it cannot score items from their description")
    if model.cnn_ is None:
        raise NotFittedError("ConvMF is not fitted: call fit() or load a saved model")
    if len(vocabulary) != model.vocabulary_size_:
        raise FoldInError(f"the vocabulary has {len(vocabulary)} words, the model's CNN was trained on "
                          f"{model.vocabulary_size_}: use the vocabulary saved with the model")
    bad = [i for i, t in enumerate(texts) if t is not None and not isinstance(t, str)]
    if bad:
        raise FoldInError(f"descriptions must be strings; entry {bad[0]} is a {type(texts[bad[0]]).__name__}")
    if max_length is None:
        max_length = vocabulary.config.max_length if vocabulary.config is not None else 300
    documents: Documents = encode_documents(list(texts), vocabulary, max_length)
    with torch.no_grad():
        theta = model.embed_items(documents).detach().float()
    return NewItems(theta, torch.zeros(len(documents)), documents.has_text())
