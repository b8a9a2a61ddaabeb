"""Rating-prediction, top-N ranking and beyond-accuracy metrics, a one-call evaluation of a fitted model, and the
rules of the champion/challenger gate.

All ranking metrics are computed on the whole ``[users, n]`` recommendation matrix at once: a recommended
(user, item) pair is relevant when its key ``user * n_items + item`` is among the sorted keys of the relevant
ratings (binary search), so there is no Python loop per user.

Beyond accuracy (what the lists look like, whatever the held-out ratings say): catalogue coverage@N, novelty
(mean self-information of the recommended items under the training popularity), intra-list diversity (mean
pairwise cosine distance of a list's items in an item embedding, for ConvMF the CNN's own theta_j = cnn(W, X_j))
and popularity bias (share of recommendations from the most-rated 10% of the catalogue).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Protocol

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


# ------------------------------------------------------------------------------------------------------------------
# Beyond accuracy
# ------------------------------------------------------------------------------------------------------------------

HEAD_SHARE = 0.1  # popularity bias: the "head" is this share of the catalogue, the most-rated items


def _slots(recommended: TopN, n: int) -> np.ndarray:
    """The filled item slots among the first ``n`` of every list (padding ``-1`` dropped), flattened."""
    items = recommended.items[:, :n]
    return items[items >= 0]


def item_popularity(train: Ratings) -> np.ndarray:
    """Training ratings per item (``int64``, length ``n_items``): the popularity the beyond-accuracy metrics use."""
    return train.item_counts().astype(np.int64)


def popularity_share(popularity: np.ndarray) -> np.ndarray:
    """Each item's share of the ratings, add-one smoothed so that an unrated (cold) item has a finite share:
    ``p_i = (c_i + 1) / (sum_j c_j + n_items)``."""
    counts = np.asarray(popularity, dtype=np.float64)
    return (counts + 1.0) / (counts.sum() + len(counts))


def novelty(recommended: TopN, popularity: np.ndarray, n: int) -> float:
    """Mean self-information ``-log2 p_i`` (bits) of the recommended items, over every filled slot of the top-``n``
    lists; ``p_i`` is :func:`popularity_share`. Higher: less popular items. ``nan`` when nothing is recommended."""
    slots = _slots(recommended, n)
    if slots.size == 0:
        return float("nan")
    return float(np.mean(-np.log2(popularity_share(popularity)[slots])))


def head_items(popularity: np.ndarray, share: float = HEAD_SHARE) -> np.ndarray:
    """Boolean mask of the "head": the ``ceil(share * n_items)`` most-rated items (ties broken by the lower index;
    items without any rating are never in it)."""
    counts = np.asarray(popularity, dtype=np.int64)
    k = int(math.ceil(share * len(counts)))
    mask = np.zeros(len(counts), dtype=bool)
    mask[np.argsort(-counts, kind="stable")[:k]] = True
    return mask & (counts > 0)


def popularity_bias(recommended: TopN, popularity: np.ndarray, n: int, share: float = HEAD_SHARE) -> float:
    """Share of the filled top-``n`` slots taken by :func:`head_items` (``nan`` when nothing is recommended)."""
    slots = _slots(recommended, n)
    if slots.size == 0:
        return float("nan")
    return float(np.mean(head_items(popularity, share)[slots]))


def intra_list_diversity(recommended: TopN, embeddings: np.ndarray, n: int) -> float:
    """Mean over lists of the mean pairwise cosine distance ``1 - cos(e_a, e_b)`` between the items of each top-``n``
    list. Items whose embedding is all zeros (no text: no CNN embedding) are left out of the pairs; lists with fewer
    than two embedded items are left out. ``nan`` when no list qualifies."""
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] < 1:
        raise ValueError(f"embeddings must be a [n_items, d] matrix, got shape {emb.shape}")
    items = recommended.items[:, :n]
    if items.size and items.max() >= emb.shape[0]:
        raise ValueError(f"recommended item index out of range [0, {emb.shape[0]})")
    norms = np.linalg.norm(emb, axis=1)
    unit = np.divide(emb, norms[:, None], out=np.zeros_like(emb), where=norms[:, None] > 0)
    valid = (items >= 0) & (norms[np.maximum(items, 0)] > 0)  # [U, n]
    vectors = unit[np.maximum(items, 0)] * valid[..., None]  # [U, n, d], invalid slots zeroed
    cosine = np.einsum("und,umd->unm", vectors, vectors)
    pair = valid[:, :, None] & valid[:, None, :] & ~np.eye(items.shape[1], dtype=bool)[None]
    n_pairs = pair.sum(axis=(1, 2))
    keep = n_pairs > 0
    if not keep.any():
        return float("nan")
    mean_distance = ((1.0 - cosine) * pair).sum(axis=(1, 2))[keep] / n_pairs[keep]
    return float(np.mean(mean_distance))


def center_embeddings(embeddings: np.ndarray) -> np.ndarray:
    """``embeddings`` minus their mean over the rows that are not all zeros (those stay zero: no embedding).

    The CNN's theta_j share a large common component (on ML-100K the mean pairwise cosine of raw theta is 0.9997),
    so cosine distances between raw embeddings are all near 0; measured from the catalogue's mean description they
    tell lists of similar items from lists of different ones."""
    emb = np.asarray(embeddings, dtype=np.float64)
    present = np.linalg.norm(emb, axis=1) > 0
    if not present.any():
        return emb.copy()
    return np.where(present[:, None], emb - emb[present].mean(axis=0), 0.0)


def beyond_accuracy(recommended: TopN, popularity: np.ndarray, n: int, *, catalog_size: int,
                    embeddings: np.ndarray | None = None, head_share: float = HEAD_SHARE) -> dict[str, float]:
    """``coverage@n`` (share of ``catalog_size`` items recommended), ``novelty@n``, ``diversity@n`` (``nan``
    without ``embeddings``) and ``popularity_bias@n`` of a set of top-``n`` lists."""
    top = TopN(recommended.users, recommended.items[:, :n], recommended.scores[:, :n])
    return {f"coverage@{n}": catalog_coverage(top, catalog_size),
            f"novelty@{n}": novelty(top, popularity, n),
            f"diversity@{n}": (intra_list_diversity(top, embeddings, n) if embeddings is not None
                               else float("nan")),
            f"popularity_bias@{n}": popularity_bias(top, popularity, n, head_share)}


BEYOND_ACCURACY: tuple[str, ...] = ("coverage", "novelty", "diversity", "popularity_bias")


def _slice_metrics(model: EvaluableModel, train: Ratings, test: Ratings, n: int, *, candidates: np.ndarray | None,
                   relevance_threshold: float | None, block_size: int, popularity: np.ndarray,
                   embeddings: np.ndarray | None = None) -> tuple[dict[str, float], TopN | None]:
    """rmse/mae, ranking metrics and beyond-accuracy metrics at n of ``model`` on one test slice (``nan`` when the
    slice is empty), and the slice's top-``n`` lists (None when it has no user)."""
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
        out.update({f"{name}@{n}": float("nan") for name in BEYOND_ACCURACY})
        return out, None
    rec = model.recommend(users, n, exclude=train, items=candidates, block_size=block_size)
    out.update(ranking_metrics(rec, test, n, relevance_threshold=relevance_threshold))
    catalog = train.n_items if candidates is None else len(candidates)
    out.update(beyond_accuracy(rec, popularity, n, catalog_size=catalog, embeddings=embeddings))
    return out, rec


def evaluate(model: EvaluableModel, train: Ratings, test: Ratings, *, n: int = 10,
             cold_items: np.ndarray | None = None, relevance_threshold: float | None = None,
             block_size: int = 1024, embeddings: np.ndarray | None = None) -> dict[str, float]:
    """Evaluate a fitted model on ``test``: ``rmse``, ``mae``, ranking metrics at ``n`` and the beyond-accuracy
    metrics ``coverage@{n}``, ``novelty@{n}``, ``diversity@{n}`` (with ``embeddings``, one row per item, e.g.
    ``ConvMF.embed_items``) and ``popularity_bias@{n}`` (popularity = training ratings per item).

    Ranking lists are computed for every user in ``test`` with their ``train`` items excluded. When ``cold_items``
    (items without training ratings) is given, the same metrics are computed on the test ratings of cold items with
    only cold items as candidates, under ``cold_``-prefixed keys (``cold_coverage@{n}`` is the share of cold items
    recommended), plus ``n_cold_test_ratings`` and ``cold_item_share@{n}``, the share of the unrestricted lists'
    slots that hold a cold item. Empty slices yield ``nan`` metrics.
    """
    if (train.n_users, train.n_items) != (test.n_users, test.n_items):
        raise ValueError(f"train ({train.n_users} x {train.n_items}) and test ({test.n_users} x {test.n_items}) "
                         "ratings must share one matrix shape")
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if embeddings is not None and len(embeddings) != test.n_items:
        raise ValueError(f"{len(embeddings)} item embeddings for {test.n_items} items")
    popularity = item_popularity(train)
    results, rec = _slice_metrics(model, train, test, int(n), candidates=None, relevance_threshold=relevance_threshold,
                                  block_size=block_size, popularity=popularity, embeddings=embeddings)
    results["n_test_ratings"] = float(len(test))
    if cold_items is not None:
        cold = np.unique(np.asarray(cold_items, dtype=np.int64))
        if cold.size and (cold[0] < 0 or cold[-1] >= test.n_items):
            raise ValueError(f"cold item index out of range [0, {test.n_items})")
        cold_test = test.subset(np.isin(test.items, cold))
        cold_results, _ = _slice_metrics(model, train, cold_test, int(n), candidates=cold,
                                         relevance_threshold=relevance_threshold, block_size=block_size,
                                         popularity=popularity, embeddings=embeddings)
        results.update({f"cold_{key}": value for key, value in cold_results.items()})
        results["n_cold_test_ratings"] = float(len(cold_test))
        results[f"cold_item_share@{n}"] = _cold_share(rec, int(n), cold)
    return results


def _cold_share(rec: TopN | None, n: int, cold: np.ndarray) -> float:
    """Share of the filled slots of the unrestricted top-``n`` lists ``rec`` (test users, training items excluded;
    the lists :func:`evaluate` already ranked) that hold a cold item."""
    slots = _slots(rec, n) if rec is not None else np.zeros(0, dtype=np.int64)
    return float(np.mean(np.isin(slots, cold))) if slots.size else float("nan")


def cold_items_of(train: Ratings) -> np.ndarray:
    """The items with no training rating (the cold-item slice of a split), sorted."""
    return np.flatnonzero(item_popularity(train) == 0).astype(np.int64)


# ------------------------------------------------------------------------------------------------------------------
# The champion/challenger gate
# ------------------------------------------------------------------------------------------------------------------

GATE_METRIC_PATTERN = r"^(rmse|ndcg@[1-9][0-9]{0,2})$"


def parse_gate_metric(name: str) -> int | None:
    """``None`` for ``"rmse"``, N for ``"ndcg@N"`` (1 <= N <= 999); any other name is a ``ValueError``."""
    if not isinstance(name, str) or not re.fullmatch(GATE_METRIC_PATTERN, name):
        raise ValueError(f"gate metric must be 'rmse' or 'ndcg@N' (N from 1 to 999), got {name!r}")
    return None if name == "rmse" else int(name.split("@", 1)[1])


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` (optionally ``cold_``-prefixed) is better: ranking metrics yes, errors
    (rmse, mae) no."""
    base = metric.removeprefix("cold_").split("@", 1)[0]
    return base not in ("rmse", "mae")


@dataclass(frozen=True)
class GatePolicy:
    """How a challenger is judged against the champion, both measured on the challenger's validation split.

    It must strictly beat the champion on ``metric`` (``"rmse"`` or ``"ndcg@N"``), and it must not regress by more
    than ``other_tolerance`` (relative to the champion's figure) on the other metric (NDCG@``other_n`` when the gate
    is RMSE, RMSE when the gate is NDCG), nor by more than ``cold_tolerance`` on the gate metric measured on the
    cold-item slice (items with no training rating, ranked among themselves).
    """

    metric: str = "rmse"
    other_tolerance: float = 0.02
    cold_tolerance: float = 0.05
    other_n: int = 10

    def __post_init__(self) -> None:
        parse_gate_metric(self.metric)
        for name in ("other_tolerance", "cold_tolerance"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be a share between 0 and 1, got {value!r}")
        if not (isinstance(self.other_n, int) and 1 <= self.other_n <= 1000):
            raise ValueError(f"other_n must be an integer from 1 to 1000, got {self.other_n!r}")

    @property
    def n(self) -> int:
        """N of the NDCG figure (the gate's own N when the gate is NDCG)."""
        return parse_gate_metric(self.metric) or self.other_n

    @property
    def other(self) -> str:
        """The guard-rail metric: NDCG@N when the gate is RMSE, RMSE otherwise."""
        return f"ndcg@{self.n}" if self.metric == "rmse" else "rmse"

    def figure_keys(self) -> tuple[str, ...]:
        """The figures both models are measured on: the gate metric, the other one, and both on the cold slice."""
        return (self.metric, self.other, f"cold_{self.metric}", f"cold_{self.other}")

    def guards(self) -> tuple[tuple[str, float], ...]:
        """(metric, relative tolerance) of each guard rail."""
        return ((self.other, self.other_tolerance), (f"cold_{self.metric}", self.cold_tolerance))


def regression_limit(champion: float, tolerance: float, metric: str) -> float:
    """The worst value of ``metric`` a challenger may have: the champion's figure worsened by ``tolerance`` of its
    magnitude (``champion * (1 - tol)`` for higher-is-better metrics, ``champion * (1 + tol)`` for errors)."""
    slack = tolerance * abs(champion)
    return champion - slack if higher_is_better(metric) else champion + slack


def guard_violations(candidate: Mapping[str, float], champion: Mapping[str, float],
                     policy: GatePolicy) -> tuple[list[str], list[str]]:
    """Check the guard rails of ``policy``: ``(violations, notes)``. A guard whose champion figure is missing or
    not finite (e.g. no cold item in the split) is skipped with a note; a non-finite challenger figure against a
    finite champion figure is a violation."""
    violations: list[str] = []
    notes: list[str] = []
    for metric, tolerance in policy.guards():
        mine, theirs = candidate.get(metric), champion.get(metric)
        if theirs is None or not math.isfinite(theirs):
            notes.append(f"{metric} not checked (no finite figure for the champion)")
            continue
        if mine is None or not math.isfinite(mine):
            violations.append(f"{metric} is {mine} against the champion's {theirs:.4f}")
            continue
        limit = regression_limit(theirs, tolerance, metric)
        worse = mine < limit if higher_is_better(metric) else mine > limit
        if worse:
            bound = ">=" if higher_is_better(metric) else "<="
            violations.append(f"{metric} {mine:.4f} regresses beyond the {tolerance:.0%} tolerance against the "
                              f"champion's {theirs:.4f} (needs {bound} {limit:.4f})")
    return violations, notes
