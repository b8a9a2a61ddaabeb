"""Tests of blocked top-N against a brute-force numpy ranking."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from convmf_core.data import IdMap, Ratings
from convmf_core.topn import TopN, top_n

N_USERS, N_ITEMS, DIM = 37, 23, 4


def _random_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Ratings]:
    rng = np.random.default_rng(seed)
    user = torch.as_tensor(rng.normal(size=(N_USERS, DIM)))  # float64: no near-ties between torch and numpy
    item = torch.as_tensor(rng.normal(size=(N_ITEMS, DIM)))
    mask = rng.random((N_USERS, N_ITEMS)) < 0.3
    mask[3, :] = True  # user 3 has rated everything: nothing is left to recommend
    u, i = np.nonzero(mask)
    train = Ratings(u, i, rng.integers(1, 6, size=len(u)).astype(np.float32), N_USERS, N_ITEMS)
    return user, item, train


def _brute_force(user: torch.Tensor, item: torch.Tensor, users: np.ndarray, n: int, offset: float,
                 exclude: Ratings | None, candidates: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    scores = user.numpy()[users] @ item.numpy().T + offset
    if exclude is not None:
        dense = np.zeros((N_USERS, N_ITEMS), dtype=bool)
        dense[exclude.users, exclude.items] = True
        scores[dense[users]] = -np.inf
    cand = np.arange(N_ITEMS) if candidates is None else np.unique(candidates)
    scores = scores[:, cand]
    order = np.argsort(-scores, axis=1, kind="stable")[:, :n]
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_items = np.where(np.isneginf(top_scores), -1, cand[order])
    pad = n - top_items.shape[1]
    if pad > 0:
        top_items = np.pad(top_items, ((0, 0), (0, pad)), constant_values=-1)
        top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return top_items, top_scores


@pytest.mark.parametrize("use_exclude", [False, True])
@pytest.mark.parametrize("use_candidates", [False, True])
@pytest.mark.parametrize("block_size", [1, 5, 1024])
@pytest.mark.parametrize("n", [3, 10, 30])
def test_top_n_matches_brute_force(use_exclude: bool, use_candidates: bool, block_size: int, n: int) -> None:
    user, item, train = _random_problem()
    users = np.array([5, 0, 3, 36, 5, 12, 7, 20, 1, 30, 2], dtype=np.int64)  # unordered, with a repeat
    candidates = np.array([17, 2, 9, 4, 22, 0, 11, 9]) if use_candidates else None  # 7 distinct (9 repeated)
    exclude = train if use_exclude else None
    result = top_n(user, item, users, n, offset=3.5, exclude=exclude.csr() if exclude is not None else None,
                   candidate_items=candidates, block_size=block_size)
    expected_items, expected_scores = _brute_force(user, item, users, n, 3.5, exclude, candidates)

    assert result.items.dtype == np.int64 and result.scores.dtype == np.float32
    assert result.items.shape == (len(users), n) and result.scores.shape == (len(users), n)
    np.testing.assert_array_equal(result.users, users)
    np.testing.assert_array_equal(result.items, expected_items)
    np.testing.assert_allclose(result.scores, expected_scores.astype(np.float32), rtol=1e-6, atol=1e-6)
    # Scores are non-increasing down each list (-inf >= -inf holds for padding).
    assert np.all(result.scores[:, :-1] >= result.scores[:, 1:])


def test_padding_when_n_exceeds_candidates() -> None:
    user, item, train = _random_problem()
    candidates = np.array([1, 4, 6])
    result = top_n(user, item, np.array([0, 3, 8]), 5, exclude=train.csr(), candidate_items=candidates)
    for row, u in enumerate([0, 3, 8]):
        left = np.setdiff1d(candidates, train.items[train.users == u])
        assert set(result.items[row][result.items[row] >= 0]) == set(left.tolist())
        assert np.all(result.items[row, len(left):] == -1)
        assert np.all(np.isneginf(result.scores[row, len(left):]))
        assert np.all(np.isfinite(result.scores[row, :len(left)]))
    assert np.all(result.items[1] == -1)  # user 3 rated every item


def test_exclusion_removes_training_items() -> None:
    user, item, train = _random_problem(seed=1)
    users = np.arange(N_USERS)
    result = top_n(user, item, users, N_ITEMS, exclude=train.csr(), block_size=4)
    for u in users:
        rated = set(train.items[train.users == u].tolist())
        listed = set(result.items[u][result.items[u] >= 0].tolist())
        assert not (rated & listed)
        assert listed == set(range(N_ITEMS)) - rated  # everything else is still listed


def test_device_and_float32_factors() -> None:
    user, item, _ = _random_problem()
    result = top_n(user.float(), item.float(), np.array([2, 4]), 4, device="cpu")
    expected = np.argsort(-(user.numpy()[[2, 4]] @ item.numpy().T), axis=1)[:, :4]
    np.testing.assert_array_equal(result.items, expected)


def test_empty_users() -> None:
    user, item, _ = _random_problem()
    result = top_n(user, item, np.zeros(0, dtype=np.int64), 4)
    assert result.items.shape == (0, 4) and result.scores.shape == (0, 4)
    assert result.to_frame().empty


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 0}, "n must be"),
    ({"users": np.array([0, N_USERS])}, "user index out of range"),
    ({"users": np.array([-1])}, "user index out of range"),
    ({"candidate_items": np.array([0, N_ITEMS])}, "candidate item index out of range"),
    ({"block_size": 0}, "block_size"),
])
def test_top_n_validation(kwargs: dict, message: str) -> None:
    user, item, _ = _random_problem()
    args = {"users": np.array([0, 1]), "n": 3}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        top_n(user, item, args.pop("users"), args.pop("n"), **args)


def test_top_n_rejects_mismatched_dims_and_exclude_shape() -> None:
    user, item, train = _random_problem()
    with pytest.raises(ValueError, match="factor dimensions differ"):
        top_n(user, item[:, :2], np.array([0]), 3)
    wrong = Ratings(train.users, train.items, train.values, N_USERS, N_ITEMS + 1)
    with pytest.raises(ValueError, match="columns"):
        top_n(user, item, np.array([0]), 3, exclude=wrong.csr())


def test_to_frame_with_id_maps_drops_padding() -> None:
    top = TopN(users=np.array([1, 0]),
               items=np.array([[2, 0, -1], [1, -1, -1]]),
               scores=np.array([[4.5, 3.0, -np.inf], [2.0, -np.inf, -np.inf]], dtype=np.float32))
    user_map = IdMap(np.array(["alice", "bob"], dtype=object))
    item_map = IdMap(np.array([100, 200, 300]))
    frame = top.to_frame(user_map, item_map)
    expected = pd.DataFrame({"user_id": ["bob", "bob", "alice"], "rank": [1, 2, 1],
                             "item_id": [300, 100, 200], "score": np.array([4.5, 3.0, 2.0], dtype=np.float32)})
    assert list(frame.columns) == ["user_id", "rank", "item_id", "score"]
    assert frame["user_id"].tolist() == expected["user_id"].tolist()
    assert frame["rank"].tolist() == [1, 2, 1]
    assert frame["item_id"].tolist() == [300, 100, 200]
    np.testing.assert_allclose(frame["score"].to_numpy(), expected["score"].to_numpy())
    # Without maps: dense indices.
    plain = top.to_frame()
    assert plain["user_id"].tolist() == [1, 1, 0] and plain["item_id"].tolist() == [2, 0, 1]


def test_topn_rejects_inconsistent_shapes() -> None:
    with pytest.raises(ValueError):
        TopN(users=np.array([0, 1]), items=np.zeros((3, 2)), scores=np.zeros((3, 2)))
