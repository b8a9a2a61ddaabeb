"""Beyond-accuracy metrics (convmf_core.metrics): hand-computed values, and on a real fitted ConvMF the diversity of
its lists in its own CNN text embedding against a plain per-list loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from convmf_core.data import Ratings, Split
from convmf_core.metrics import (GatePolicy, beyond_accuracy, center_embeddings, cold_items_of, evaluate, guard_violations, head_items,
                                 intra_list_diversity, item_popularity, novelty, parse_gate_metric, popularity_bias,
                                 popularity_share, regression_limit)
from convmf_core.topn import TopN, top_n

# Five items rated 3, 1, 0, 0, 0 times in training: add-one shares (c + 1) / (4 + 5) = 4/9, 2/9, 1/9, 1/9, 1/9.
POPULARITY = np.array([3, 1, 0, 0, 0])
# Embeddings: items 0 and 1 orthogonal, item 2 at 45 degrees to both, item 3 without text (zero), item 4 = item 0.
EMBEDDINGS = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0], [2.0, 0.0]])


def lists(items: list[list[int]]) -> TopN:
    arr = np.array(items, dtype=np.int64)
    return TopN(np.arange(len(items)), arr, np.where(arr >= 0, 1.0, -np.inf).astype(np.float32))


def test_popularity_novelty_and_bias_hand_computed() -> None:
    train = Ratings(np.array([0, 1, 2, 0]), np.array([0, 0, 0, 1]), np.ones(4, dtype=np.float32), 3, 5)
    np.testing.assert_array_equal(item_popularity(train), POPULARITY)
    np.testing.assert_allclose(popularity_share(POPULARITY), [4 / 9, 2 / 9, 1 / 9, 1 / 9, 1 / 9])
    np.testing.assert_array_equal(cold_items_of(train), [2, 3, 4])

    rec = lists([[0, 1, -1], [0, 2, 3]])  # filled slots: 0, 1, 0, 2, 3 (padding is not a recommendation)
    # -log2 p = log2 9 - log2 (c + 1): 1.169925, 2.169925, 1.169925, 3.169925, 3.169925 -> mean 2.169925
    assert novelty(rec, POPULARITY, 3) == pytest.approx(math.log2(9) - (2 + 1 + 2 + 0 + 0) / 5)
    assert novelty(rec, POPULARITY, 1) == pytest.approx(math.log2(9 / 4))  # first slots only: item 0 twice
    # Head = ceil(0.1 * 5) = 1 item, the most rated (item 0): 2 of the 5 filled slots.
    np.testing.assert_array_equal(head_items(POPULARITY), [True, False, False, False, False])
    assert popularity_bias(rec, POPULARITY, 3) == pytest.approx(2 / 5)
    assert popularity_bias(rec, POPULARITY, 3, share=0.4) == pytest.approx(3 / 5)  # head {0, 1}

    got = beyond_accuracy(rec, POPULARITY, 3, catalog_size=5, embeddings=EMBEDDINGS)
    assert got == pytest.approx({"coverage@3": 4 / 5, "novelty@3": math.log2(9) - 1.0,
                                 "diversity@3": (1.0 + (1 - 1 / math.sqrt(2))) / 2, "popularity_bias@3": 2 / 5})
    assert math.isnan(beyond_accuracy(rec, POPULARITY, 3, catalog_size=5)["diversity@3"])
    empty = lists([[-1, -1]])
    assert math.isnan(novelty(empty, POPULARITY, 2)) and math.isnan(popularity_bias(empty, POPULARITY, 2))


def test_head_ties_and_unrated_items() -> None:
    # ceil(0.34 * 3) = 2 items; ties go to the lower index; an unrated item is never "popular".
    np.testing.assert_array_equal(head_items(np.array([2, 2, 1]), 0.34), [True, True, False])
    np.testing.assert_array_equal(head_items(np.array([1, 2, 2]), 0.34), [False, True, True])
    np.testing.assert_array_equal(head_items(np.array([0, 0, 5]), 0.7), [False, False, True])


def test_intra_list_diversity_hand_computed() -> None:
    # List [0, 1]: orthogonal -> distance 1. List [0, 2, 3]: item 3 has no embedding, pair (0, 2) -> 1 - 1/sqrt 2.
    # List [0, 4]: same direction (different length) -> 0. List [3, 1]: one embedded item -> left out.
    rec = lists([[0, 1, -1], [0, 2, 3], [0, 4, -1], [3, 1, -1]])
    assert intra_list_diversity(rec, EMBEDDINGS, 3) == pytest.approx((1.0 + (1 - 1 / math.sqrt(2)) + 0.0) / 3)
    # Cut at n = 1: no list has a pair.
    assert math.isnan(intra_list_diversity(rec, EMBEDDINGS, 1))
    # Opposite directions are the farthest: distance 2.
    assert intra_list_diversity(lists([[0, 1]]), np.array([[1.0, 0.0], [-3.0, 0.0]]), 2) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="out of range"):
        intra_list_diversity(lists([[0, 7]]), EMBEDDINGS, 2)


def test_centred_embeddings_keep_missing_ones_missing() -> None:
    # Rows 0, 1, 3 have an embedding, mean (2, 1); row 2 (no text) stays zero and out of the pairs.
    centred = center_embeddings(np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 0.0], [2.0, 3.0]]))
    np.testing.assert_allclose(centred, [[-1, -1], [1, -1], [0, 0], [0, 2]])
    # Raw rows 0 and 1 point the same way (distance 0); centred they are at 90 degrees (distance 1).
    assert intra_list_diversity(lists([[0, 1]]), np.array([[1.0, 0.0], [3.0, 0.0], [0, 0], [2, 3]]), 2) == 0.0
    assert intra_list_diversity(lists([[0, 1, 2]]), centred, 3) == pytest.approx(1.0)


class FixedLists:
    """Test double with the model API evaluate() needs: predicts 3, ranks items by descending index."""

    def __init__(self, n_users: int, n_items: int) -> None:
        self.n_users, self.n_items = n_users, n_items

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        return np.full(len(users), 3.0, dtype=np.float32)

    def recommend(self, users, n=10, *, exclude=None, items=None, block_size=1024) -> TopN:
        return top_n(torch.ones((self.n_users, 1)), torch.arange(self.n_items, dtype=torch.float32)[:, None],
                     np.asarray(users), n, exclude=exclude.csr() if exclude is not None else None,
                     candidate_items=items)


def test_evaluate_reports_beyond_accuracy_on_all_and_cold_items() -> None:
    # Training: items 0 (3 ratings) and 1 (1 rating); items 2, 3, 4 are cold. Test users 0 and 1.
    train = Ratings(np.array([0, 1, 2, 0]), np.array([0, 0, 0, 1]), np.full(4, 4.0, dtype=np.float32), 3, 5)
    test = Ratings(np.array([0, 1]), np.array([4, 2]), np.full(2, 5.0, dtype=np.float32), 3, 5)
    got = evaluate(FixedLists(3, 5), train, test, n=2, cold_items=cold_items_of(train), embeddings=EMBEDDINGS)
    # Lists (descending index, training items excluded): user 0 [4, 3], user 1 [4, 3]. Slots 4, 3, 4, 3: all cold.
    assert got["coverage@2"] == pytest.approx(2 / 5)
    assert got["novelty@2"] == pytest.approx(math.log2(9))
    assert got["popularity_bias@2"] == 0.0
    assert math.isnan(got["diversity@2"])  # item 3 has no embedding: no pair in either list
    assert got["cold_item_share@2"] == 1.0
    # Cold slice: candidates {2, 3, 4}: the same lists; coverage is over the 3 cold items.
    assert got["cold_coverage@2"] == pytest.approx(2 / 3)
    assert got["cold_novelty@2"] == pytest.approx(math.log2(9)) and got["cold_popularity_bias@2"] == 0.0
    with pytest.raises(ValueError, match="item embeddings for 5 items"):
        evaluate(FixedLists(3, 5), train, test, n=2, embeddings=EMBEDDINGS[:3])


def test_diversity_of_a_real_convmf_in_its_own_text_embedding(fitted, catalogue, split: Split) -> None:
    model = fitted["convmf"].model
    theta = model.embed_items(catalogue.documents).numpy().astype(np.float64)
    users = np.unique(split.test.users)
    rec = model.recommend(users, 10, exclude=split.train)
    # A plain loop: for each list, mean of 1 - cos over the ordered pairs of items that have text.
    per_list = []
    for row in rec.items:
        vectors = [theta[j] for j in row if j >= 0 and np.linalg.norm(theta[j]) > 0]
        distances = [1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
                     for p, a in enumerate(vectors) for q, b in enumerate(vectors) if p != q]
        if distances:
            per_list.append(np.mean(distances))
    expected = float(np.mean(per_list))
    got = evaluate(model, split.train, split.test, n=10, embeddings=theta)
    assert got["diversity@10"] == pytest.approx(expected, rel=1e-6)
    assert 0.0 < expected < 2.0
    # Items without text (the catalogue has some) really have a zero embedding and are left out.
    assert (~catalogue.documents.has_text()).any()
    assert np.all(theta[~catalogue.documents.has_text()] == 0)
    assert 0 < got["novelty@10"] and 0 <= got["popularity_bias@10"] <= 1 and 0 < got["coverage@10"] <= 1


def test_gate_policy_and_guard_rails_hand_computed() -> None:
    assert parse_gate_metric("rmse") is None and parse_gate_metric("ndcg@10") == 10
    for bad in ("ndcg@0", "ndcg", "recall@10", "RMSE", "ndcg@1000"):
        with pytest.raises(ValueError, match="gate metric must be"):
            parse_gate_metric(bad)
    with pytest.raises(ValueError, match="other_tolerance"):
        GatePolicy(other_tolerance=1.5)
    ndcg = GatePolicy("ndcg@5", other_tolerance=0.02, cold_tolerance=0.10)
    assert ndcg.figure_keys() == ("ndcg@5", "rmse", "cold_ndcg@5", "cold_rmse")
    assert GatePolicy("rmse", other_n=20).figure_keys() == ("rmse", "ndcg@20", "cold_rmse", "cold_ndcg@20")
    # Limits: rmse 1.0 may grow 2% -> 1.02; cold ndcg 0.40 may fall 10% -> 0.36.
    assert regression_limit(1.0, 0.02, "rmse") == pytest.approx(1.02)
    assert regression_limit(0.40, 0.10, "cold_ndcg@5") == pytest.approx(0.36)
    champion = {"ndcg@5": 0.30, "rmse": 1.00, "cold_ndcg@5": 0.40, "cold_rmse": 1.10}
    ok = {"ndcg@5": 0.35, "rmse": 1.019, "cold_ndcg@5": 0.361, "cold_rmse": 2.0}  # cold_rmse is not a guard
    assert guard_violations(ok, champion, ndcg) == ([], [])
    bad = {"ndcg@5": 0.35, "rmse": 1.03, "cold_ndcg@5": 0.35, "cold_rmse": 1.0}
    violations, _ = guard_violations(bad, champion, ndcg)
    assert violations == [
        "rmse 1.0300 regresses beyond the 2% tolerance against the champion's 1.0000 (needs <= 1.0200)",
        "cold_ndcg@5 0.3500 regresses beyond the 10% tolerance against the champion's 0.4000 (needs >= 0.3600)"]
    # No cold item in the split: the cold guard is skipped with a note; a NaN challenger figure is a violation.
    violations, notes = guard_violations({**ok, "cold_ndcg@5": float("nan")}, {**champion, "cold_ndcg@5": float("nan")},
                                         ndcg)
    assert violations == [] and notes == ["cold_ndcg@5 not checked (no finite figure for the champion)"]
    violations, _ = guard_violations({**ok, "rmse": float("nan")}, champion, ndcg)
    assert violations == ["rmse is nan against the champion's 1.0000"]
