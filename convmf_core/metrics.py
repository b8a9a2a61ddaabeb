"""Rating-prediction and top-N ranking metrics, and a one-call evaluation of a fitted model.

All ranking metrics are computed on the whole ``[users, n]`` recommendation matrix at once: a recommended
(user, item) pair is relevant when its key ``user * n_items + item`` is among the sorted keys of the relevant
ratings (binary search), so there is no Python loop per user.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from convmf_core.data import Ratings
from convmf_core.topn import TopN

RANKING_METRICS: tuple[str, ...] = ("precision", "recall", "ndcg", "map", "hit_rate")


class EvaluableModel(Protocol):
    """What :func:`evaluate` needs from a model (see :class:`convmf_core.models.base.Recommender`)."""

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:  # pragma: no cover - protocol
        ...

    def recommend(self, users: np.ndarray, n: int = 10, *, exclude: Ratings | None = None,
                  items: np.ndarray | None = None, block_size: int = 1024) -> TopN:  # pragma: no cover - protocol
        ...


def _paired(predicted: np.ndarray, actual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(predicted, dtype=np.float64).ravel()
    a = np.asarray(actual, dtype=np.float64).ravel()
    if p.shape != a.shape:
        raise ValueError(f"predicted and actual differ in length: {p.shape[0]} vs {a.shape[0]}")
    return p, a


def rmse(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Root mean squared error (``nan`` for empty input)."""
    p, a = _paired(predicted, actual)
    if p.size == 0:
        return float("nan")
    return float(np.sqrt(np.mean((p - a) ** 2)))


def mae(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Mean absolute error (``nan`` for empty input)."""
    p, a = _paired(predicted, actual)
    if p.size == 0:
        return float("nan")
    return float(np.mean(np.abs(p - a)))


def _nan_ranking(n: int) -> dict[str, float]:
    out = {f"{name}@{n}": float("nan") for name in RANKING_METRICS}
    out["n_users_evaluated"] = 0.0
    return out


def ranking_metrics(recommended: TopN, relevant: Ratings, n: int, *,
                    relevance_threshold: float | None = None) -> dict[str, float]:
    """Precision, recall, NDCG, MAP and hit rate at ``n``, averaged over the recommended users with a relevant item.

    A user's relevant items are their ratings in ``relevant`` (only those ``>= relevance_threshold`` when given).
    Only the first ``n`` slots of each list count (padded slots never hit). Precision divides by ``n``; NDCG uses
    binary gains with a ``log2(rank + 1)`` discount and an ideal DCG over ``min(|relevant|, n)`` hits; MAP is AP@n
    normalised by ``min(|relevant|, n)``. Also returns ``n_users_evaluated``; all metrics are ``nan`` when no user
    qualifies.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    n = int(n)
    rel = relevant
    if relevance_threshold is not None:
        rel = relevant.subset(relevant.values >= relevance_threshold)
    n_items = int(relevant.n_items)
    users = recommended.users
    if users.size and (users.min() < 0 or users.max() >= relevant.n_users):
        raise ValueError(f"recommended user index out of range [0, {relevant.n_users})")
    if len(users) == 0 or len(rel) == 0:
        return _nan_ranking(n)

    keys = np.unique(rel.users * n_items + rel.items)  # sorted, duplicates (same pair twice) removed
    n_rel_per_user = np.bincount(keys // n_items, minlength=relevant.n_users)
    n_rel = n_rel_per_user[users]
    evaluated = n_rel > 0
    n_eval = int(evaluated.sum())
    if n_eval == 0:
        return _nan_ranking(n)

    items = recommended.items[evaluated, :n]
    n_rel = n_rel[evaluated].astype(np.float64)
    k = items.shape[1]
    if k < n:  # a shorter list counts as padded
        items = np.concatenate([items, np.full((items.shape[0], n - k), -1, dtype=np.int64)], axis=1)
    query = users[evaluated][:, None] * n_items + items
    pos = np.searchsorted(keys, query)
    hits = (items >= 0) & (items < n_items) & (keys[np.minimum(pos, len(keys) - 1)] == query)
    hits_f = hits.astype(np.float64)

    n_hits = hits_f.sum(axis=1)
    ideal_len = np.minimum(n_rel, n).astype(np.int64)
    discount = 1.0 / np.log2(np.arange(2, n + 2, dtype=np.float64))  # rank 1..n
    dcg = hits_f @ discount
    idcg = np.cumsum(discount)[ideal_len - 1]
    precision_at_rank = np.cumsum(hits_f, axis=1) / np.arange(1, n + 1, dtype=np.float64)
    ap = (precision_at_rank * hits_f).sum(axis=1) / ideal_len

    return {
        f"precision@{n}": float(np.mean(n_hits / n)),
        f"recall@{n}": float(np.mean(n_hits / n_rel)),
        f"ndcg@{n}": float(np.mean(dcg / idcg)),
        f"map@{n}": float(np.mean(ap)),
        f"hit_rate@{n}": float(np.mean(n_hits > 0)),
        "n_users_evaluated": float(n_eval),
    }


def catalog_coverage(recommended: TopN, n_items: int) -> float:
    """Share of the ``n_items`` items that appear in at least one list (``nan`` when there are no lists/items)."""
    if n_items <= 0 or len(recommended.users) == 0:
        return float("nan")
    items = recommended.items[recommended.items >= 0]
    return float(len(np.unique(items)) / n_items)


def _slice_metrics(model: EvaluableModel, train: Ratings, test: Ratings, n: int, *, candidates: np.ndarray | None,
                   relevance_threshold: float | None, block_size: int) -> dict[str, float]:
    """rmse/mae, ranking metrics and coverage@n of ``model`` on one test slice (``nan`` when the slice is empty)."""
    out: dict[str, float] = {}
    if len(test):
        pred = np.asarray(model.predict(test.users, test.items))
        out["rmse"] = rmse(pred, test.values)
        out["mae"] = mae(pred, test.values)
    else:
        out["rmse"] = out["mae"] = float("nan")

    users = np.unique(test.users)
    if len(users) == 0:
        out.update(_nan_ranking(n))
        out[f"coverage@{n}"] = float("nan")
        return out
    rec = model.recommend(users, n, exclude=train, items=candidates, block_size=block_size)
    out.update(ranking_metrics(rec, test, n, relevance_threshold=relevance_threshold))
    catalog = train.n_items if candidates is None else len(candidates)
    out[f"coverage@{n}"] = catalog_coverage(rec, catalog)
    return out


def evaluate(model: EvaluableModel, train: Ratings, test: Ratings, *, n: int = 10,
             cold_items: np.ndarray | None = None, relevance_threshold: float | None = None,
             block_size: int = 1024) -> dict[str, float]:
    """Evaluate a fitted model on ``test``: ``rmse``, ``mae``, ranking metrics at ``n`` and ``coverage@{n}``.

    Ranking lists are computed for every user in ``test`` with their ``train`` items excluded. When ``cold_items``
    (items without training ratings) is given, the same metrics are computed on the test ratings of cold items with
    only cold items as candidates, under ``cold_``-prefixed keys (``cold_coverage@{n}`` is the share of cold items
    recommended), plus ``n_cold_test_ratings``. Empty slices yield ``nan`` metrics.
    """
    if (train.n_users, train.n_items) != (test.n_users, test.n_items):
        raise ValueError(f"train ({train.n_users} x {train.n_items}) and test ({test.n_users} x {test.n_items}) "
                         "ratings must share one matrix shape")
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    results = _slice_metrics(model, train, test, int(n), candidates=None,
                             relevance_threshold=relevance_threshold, block_size=block_size)
    results["n_test_ratings"] = float(len(test))
    if cold_items is not None:
        cold = np.unique(np.asarray(cold_items, dtype=np.int64))
        if cold.size and (cold[0] < 0 or cold[-1] >= test.n_items):
            raise ValueError(f"cold item index out of range [0, {test.n_items})")
        cold_test = test.subset(np.isin(test.items, cold))
        cold_results = _slice_metrics(model, train, cold_test, int(n), candidates=cold,
                                      relevance_threshold=relevance_threshold, block_size=block_size)
        results.update({f"cold_{key}": value for key, value in cold_results.items()})
        results["n_cold_test_ratings"] = float(len(cold_test))
    return results
