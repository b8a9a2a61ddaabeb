"""Tests of rating and ranking metrics on hand-computed examples, and of ``evaluate`` with a fake model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from convmf_core.data import Ratings
from convmf_core.metrics import catalog_coverage, evaluate, mae, ranking_metrics, rmse
from convmf_core.topn import TopN, top_n

LOG2_3 = math.log2(3.0)


def _topn(users: list[int], items: list[list[int]]) -> TopN:
    items_arr = np.array(items, dtype=np.int64)
    scores = np.where(items_arr >= 0, 1.0, -np.inf).astype(np.float32)
    return TopN(np.array(users), items_arr, scores)


def test_rmse_mae_simple() -> None:
    # errors 0, 0, -2: rmse = sqrt(4 / 3), mae = 2 / 3
    assert rmse(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 5.0])) == pytest.approx(math.sqrt(4 / 3))
    assert mae(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 5.0])) == pytest.approx(2 / 3)
    assert rmse(np.array([2.5]), np.array([2.5])) == 0.0
    assert math.isnan(rmse(np.array([]), np.array([])))
    assert math.isnan(mae(np.array([]), np.array([])))
    with pytest.raises(ValueError):
        rmse(np.array([1.0, 2.0]), np.array([1.0]))


def _ranking_example() -> tuple[TopN, Ratings]:
    # n = 3, 6 items.
    # user 0: list [1, 2, 3], relevant {1, 3}       -> hits [1, 0, 1]
    # user 1: list [4, 5, 0], relevant {0, 1, 2, 3} -> hits [0, 0, 1]
    # user 2: list [0, 1, 2], no relevant items     -> not evaluated
    # user 3: list [0, 1, 5], relevant {2} (rated 2) -> hits [0, 0, 0]
    recommended = _topn([0, 1, 2, 3], [[1, 2, 3], [4, 5, 0], [0, 1, 2], [0, 1, 5]])
    users = [0, 0, 1, 1, 1, 1, 3]
    items = [1, 3, 0, 1, 2, 3, 2]
    values = [5, 4, 5, 5, 4, 5, 2]
    return recommended, Ratings(np.array(users), np.array(items), np.array(values, dtype=np.float32), 4, 6)


def test_ranking_metrics_hand_computed() -> None:
    recommended, relevant = _ranking_example()
    got = ranking_metrics(recommended, relevant, 3)
    # user 0: P = 2/3, R = 2/2 = 1, DCG = 1/log2(2) + 1/log2(4) = 1.5, IDCG (2 hits) = 1 + 1/log2(3) = 1.63093,
    #         NDCG = 0.919721, AP = (1/1 + 2/3) / min(2, 3) = 0.833333, hit = 1
    # user 1: P = 1/3, R = 1/4, DCG = 1/log2(4) = 0.5, IDCG (min(4, 3) = 3 hits) = 1 + 0.63093 + 0.5 = 2.13093,
    #         NDCG = 0.234639, AP = (1/3) / 3 = 0.111111, hit = 1
    # user 3: all zero.  Means over 3 users:
    ndcg0 = 1.5 / (1 + 1 / LOG2_3)
    ndcg1 = 0.5 / (1.5 + 1 / LOG2_3)
    assert ndcg0 == pytest.approx(0.919721, abs=1e-6) and ndcg1 == pytest.approx(0.234639, abs=1e-6)
    assert got["precision@3"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)  # 0.333333
    assert got["recall@3"] == pytest.approx((1 + 0.25 + 0) / 3)  # 0.416667
    assert got["ndcg@3"] == pytest.approx((0.919721 + 0.234639) / 3, abs=1e-6)  # 0.384787
    assert got["map@3"] == pytest.approx((0.833333 + 0.111111) / 3, abs=1e-6)  # 0.314815
    assert got["hit_rate@3"] == pytest.approx(2 / 3)
    assert got["n_users_evaluated"] == 3


def test_ranking_metrics_threshold_drops_users_without_relevant_items() -> None:
    recommended, relevant = _ranking_example()
    got = ranking_metrics(recommended, relevant, 3, relevance_threshold=4.0)
    # user 3's only rating (2) is below the threshold: users 0 and 1 remain, their relevant sets unchanged.
    assert got["n_users_evaluated"] == 2
    assert got["precision@3"] == pytest.approx(0.5)  # (2/3 + 1/3) / 2
    assert got["recall@3"] == pytest.approx(0.625)  # (1 + 1/4) / 2
    assert got["ndcg@3"] == pytest.approx((0.919721 + 0.234639) / 2, abs=1e-6)  # 0.577180
    assert got["map@3"] == pytest.approx((0.833333 + 0.111111) / 2, abs=1e-6)  # 0.472222
    assert got["hit_rate@3"] == 1.0


def test_ranking_metrics_cutoff_and_padding() -> None:
    # One user, relevant {2, 7}; list [5, 2, -1, -1] (padded); at n = 1 only item 5 counts -> no hit.
    relevant = Ratings(np.array([0, 0]), np.array([2, 7]), np.array([5.0, 5.0], dtype=np.float32), 1, 8)
    rec = _topn([0], [[5, 2, -1, -1]])
    at1 = ranking_metrics(rec, relevant, 1)
    assert at1["precision@1"] == 0.0 and at1["hit_rate@1"] == 0.0 and at1["ndcg@1"] == 0.0
    at4 = ranking_metrics(rec, relevant, 4)
    # hits [0, 1, 0, 0]: P = 1/4, R = 1/2, NDCG = (1/log2 3) / (1 + 1/log2 3) = 0.386853, AP = (1/2) / 2 = 0.25
    assert at4["precision@4"] == pytest.approx(0.25)
    assert at4["recall@4"] == pytest.approx(0.5)
    assert at4["ndcg@4"] == pytest.approx(0.386853, abs=1e-6)
    assert at4["map@4"] == pytest.approx(0.25)
    # n longer than the stored lists: missing slots count as misses (P = 1/6).
    assert ranking_metrics(rec, relevant, 6)["precision@6"] == pytest.approx(1 / 6)


def test_ranking_metrics_no_relevant_users_is_nan() -> None:
    relevant = Ratings(np.array([1]), np.array([0]), np.array([3.0], dtype=np.float32), 2, 3)
    got = ranking_metrics(_topn([0], [[0, 1]]), relevant, 2)
    assert got["n_users_evaluated"] == 0
    assert all(math.isnan(got[k]) for k in ("precision@2", "recall@2", "ndcg@2", "map@2", "hit_rate@2"))
    with pytest.raises(ValueError):
        ranking_metrics(_topn([0], [[0, 1]]), relevant, 0)


def test_catalog_coverage() -> None:
    # items {0, 1} of 4 appear -> 0.5; padding (-1) is not an item
    assert catalog_coverage(_topn([0, 1], [[0, 1], [1, -1]]), 4) == 0.5
    assert catalog_coverage(_topn([0, 1], [[0, 1], [2, 3]]), 4) == 1.0
    empty = TopN(np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.int64), np.zeros((0, 2), dtype=np.float32))
    assert math.isnan(catalog_coverage(empty, 4))


class FakeModel:
    """Test double: predicts ``item + 1``; ranks items by descending index (same for every user)."""

    def __init__(self, n_users: int, n_items: int) -> None:
        self.n_users, self.n_items = n_users, n_items
        self.recommend_calls: list[dict] = []

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return np.asarray(items, dtype=np.float32) + 1.0

    def recommend(self, users: np.ndarray, n: int = 10, *, exclude: Ratings | None = None,
                  items: np.ndarray | None = None, block_size: int = 1024) -> TopN:
        self.recommend_calls.append({"users": np.asarray(users), "exclude": exclude, "items": items})
        user_f = torch.ones((self.n_users, 1))
        item_f = torch.arange(self.n_items, dtype=torch.float32)[:, None]
        return top_n(user_f, item_f, np.asarray(users, dtype=np.int64), n,
                     exclude=exclude.csr() if exclude is not None else None, candidate_items=items,
                     block_size=block_size)


def _ratings(rows: list[tuple[int, int, float]], n_users: int = 3, n_items: int = 6) -> Ratings:
    u, i, v = zip(*rows) if rows else ((), (), ())
    return Ratings(np.array(u, dtype=np.int64), np.array(i, dtype=np.int64), np.array(v, dtype=np.float32),
                   n_users, n_items)


def test_evaluate_with_cold_slice() -> None:
    train = _ratings([(0, 0, 3), (0, 4, 5), (1, 1, 2), (2, 2, 4)])  # items 3 and 5 have no training rating
    test = _ratings([(0, 3, 4), (0, 1, 2), (1, 5, 5), (1, 4, 5)])
    model = FakeModel(3, 6)
    got = evaluate(model, train, test, n=2, cold_items=np.array([3, 5]), block_size=1)
    # predictions item + 1 = 4, 2, 6, 5 vs 4, 2, 5, 5: errors 0, 0, 1, 0 -> rmse 0.5, mae 0.25
    assert got["rmse"] == pytest.approx(0.5)
    assert got["mae"] == pytest.approx(0.25)
    # user 0 (train {0, 4}) gets [5, 3], relevant {3, 1}: hits [0, 1] -> P 1/2, R 1/2, NDCG 0.386853, AP 0.25
    # user 1 (train {1}) gets [5, 4], relevant {5, 4}: hits [1, 1] -> P 1, R 1, NDCG 1, AP 1
    assert got["precision@2"] == pytest.approx(0.75)
    assert got["recall@2"] == pytest.approx(0.75)
    assert got["ndcg@2"] == pytest.approx((0.386853 + 1) / 2, abs=1e-6)  # 0.693426
    assert got["map@2"] == pytest.approx(0.625)
    assert got["hit_rate@2"] == 1.0
    assert got["n_users_evaluated"] == 2
    assert got["coverage@2"] == pytest.approx(0.5)  # {5, 3, 4} of 6 items
    # Cold slice: test ratings (0, 3, 4) and (1, 5, 5); predictions 4 and 6 -> rmse sqrt(1/2), mae 0.5
    assert got["n_cold_test_ratings"] == 2
    assert got["cold_rmse"] == pytest.approx(math.sqrt(0.5))
    assert got["cold_mae"] == pytest.approx(0.5)
    # candidates {3, 5}: user 0 gets [5, 3], relevant {3}: hits [0, 1] -> P 1/2, R 1, NDCG 1/log2(3) = 0.630930,
    #   AP = (1/2) / min(1, 2) = 0.5; user 1 gets [5, 3], relevant {5}: hits [1, 0] -> P 1/2, R 1, NDCG 1, AP 1
    assert got["cold_precision@2"] == pytest.approx(0.5)
    assert got["cold_recall@2"] == pytest.approx(1.0)
    assert got["cold_ndcg@2"] == pytest.approx((0.630930 + 1) / 2, abs=1e-6)  # 0.815465
    assert got["cold_map@2"] == pytest.approx(0.75)
    assert got["cold_hit_rate@2"] == 1.0
    assert got["cold_coverage@2"] == pytest.approx(1.0)  # both cold items recommended
    # The warm call excluded the training ratings; the cold call restricted candidates to the cold items.
    assert model.recommend_calls[0]["exclude"] is train and model.recommend_calls[0]["items"] is None
    np.testing.assert_array_equal(model.recommend_calls[1]["items"], [3, 5])


def test_evaluate_empty_slices_give_nan() -> None:
    train = _ratings([(0, 0, 3), (1, 1, 2)])
    test = _ratings([(0, 2, 4)])
    got = evaluate(FakeModel(3, 6), train, test, n=3, cold_items=np.array([5]))  # item 5 has no test rating
    assert got["rmse"] == pytest.approx(1.0)  # predicted 3 vs 4
    assert got["n_cold_test_ratings"] == 0
    for key in ("cold_rmse", "cold_mae", "cold_precision@3", "cold_recall@3", "cold_ndcg@3", "cold_map@3",
                "cold_hit_rate@3", "cold_coverage@3"):
        assert math.isnan(got[key]), key
    empty = evaluate(FakeModel(3, 6), train, _ratings([]), n=3)
    assert math.isnan(empty["rmse"]) and math.isnan(empty["ndcg@3"]) and math.isnan(empty["coverage@3"])
    assert empty["n_users_evaluated"] == 0


def test_evaluate_relevance_threshold() -> None:
    train = _ratings([(0, 0, 3)])
    test = _ratings([(0, 5, 2), (0, 4, 5)])
    # FakeModel lists [5, 4] for user 0. Without threshold both are relevant -> P 1; with threshold 4 only
    # item 4 (rank 2) is relevant -> P 1/2, NDCG = (1/log2 3) / 1 = 0.630930
    assert evaluate(FakeModel(3, 6), train, test, n=2)["precision@2"] == pytest.approx(1.0)
    got = evaluate(FakeModel(3, 6), train, test, n=2, relevance_threshold=4.0)
    assert got["precision@2"] == pytest.approx(0.5)
    assert got["ndcg@2"] == pytest.approx(0.630930, abs=1e-6)
