"""Tests of id maps, rating storage and the split protocols (convmf_core.data)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from convmf_core.data import (DataError, IdMap, Ratings, Split, cold_item_split, random_split, ratings_from_frame,
                              split_given_test)


def _keys(r: Ratings) -> np.ndarray:
    return r.users * r.n_items + r.items


def _random_ratings(n_users: int = 40, n_items: int = 30, density: float = 0.3, seed: int = 0) -> Ratings:
    rng = np.random.default_rng(seed)
    mask = rng.random((n_users, n_items)) < density
    users, items = np.nonzero(mask)
    perm = rng.permutation(len(users))  # unsorted COO, as read from a file
    values = rng.integers(1, 6, size=len(users)).astype(np.float32)
    return Ratings(users[perm], items[perm], values, n_users, n_items)


# ----- IdMap ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [[30, 10, 20, 10, 30], ["b", "a", "c", "a"]])
def test_id_map_round_trip(raw: list) -> None:
    m = IdMap.from_values(raw)
    assert len(m) == len(set(raw))
    assert m.to_list() == sorted(set(raw))  # sorted, unique: independent of row order
    idx = m.to_index(raw)
    assert idx.dtype == np.int64
    assert m.to_raw(idx).tolist() == raw
    np.testing.assert_array_equal(m.to_index(m.to_raw(np.arange(len(m)))), np.arange(len(m)))
    assert IdMap.from_values(list(reversed(raw))).to_list() == m.to_list()


def test_id_map_unknown_ids() -> None:
    m = IdMap.from_values([1, 2, 3])
    with pytest.raises(DataError, match="not in the id map"):
        m.to_index([2, 99])
    np.testing.assert_array_equal(m.to_index([2, 99, 1], unknown="minus_one"), [1, -1, 0])
    with pytest.raises(ValueError):
        m.to_index([1], unknown="ignore")


def test_id_map_extend_keeps_indices() -> None:
    m = IdMap.from_values([10, 20, 30])
    e = m.extend([40, 20, 5, 40])
    assert e.to_list()[:3] == [10, 20, 30]  # existing indices untouched
    assert e.to_list()[3:] == [40, 5]  # new ids appended in order of first appearance
    np.testing.assert_array_equal(e.to_index([10, 20, 30, 40, 5]), [0, 1, 2, 3, 4])
    assert m.extend([10, 30]) is m  # nothing new: the same map


def test_id_map_extend_fixed_width_strings_does_not_truncate() -> None:
    # A map rebuilt from a list of strings (as a saved bundle is read back) has a fixed-width string dtype.
    m = IdMap(np.asarray(["a1", "a2"]))
    e = m.extend(["a10", "a2"])
    assert e.to_list() == ["a1", "a2", "a10"]
    np.testing.assert_array_equal(e.to_index(["a10", "a1"]), [2, 0])


def test_ratings_from_frame_maps_raw_ids() -> None:
    frame = pd.DataFrame({"user_id": ["u2", "u1"], "item_id": [7, 9], "rating": [4, 2]})
    r = ratings_from_frame(frame, IdMap.from_values(["u1", "u2"]), IdMap.from_values([7, 8, 9]))
    assert (r.n_users, r.n_items) == (2, 3)
    assert r.users.tolist() == [1, 0] and r.items.tolist() == [0, 2] and r.values.tolist() == [4.0, 2.0]
    with pytest.raises(DataError):
        ratings_from_frame(frame, IdMap.from_values(["u1"]), IdMap.from_values([7, 8, 9]))


# ----- Ratings -------------------------------------------------------------------------------------------------


def test_ratings_validation_errors() -> None:
    with pytest.raises(DataError, match="same length"):
        Ratings(np.array([0, 1]), np.array([0]), np.array([1.0, 2.0]), 2, 2)
    with pytest.raises(DataError, match="user index"):
        Ratings(np.array([0, 2]), np.array([0, 1]), np.array([1.0, 2.0]), 2, 2)
    with pytest.raises(DataError, match="user index"):
        Ratings(np.array([-1, 0]), np.array([0, 1]), np.array([1.0, 2.0]), 2, 2)
    with pytest.raises(DataError, match="item index"):
        Ratings(np.array([0, 1]), np.array([0, 5]), np.array([1.0, 2.0]), 2, 2)
    with pytest.raises(DataError, match="finite"):
        Ratings(np.array([0, 1]), np.array([0, 1]), np.array([1.0, np.nan]), 2, 2)
    r = Ratings([0, 1], [1, 0], [3, 4], 2, 2)  # lists are coerced
    assert r.users.dtype == np.int64 and r.items.dtype == np.int64 and r.values.dtype == np.float32
    assert len(Ratings(np.zeros(0), np.zeros(0), np.zeros(0), 3, 3)) == 0


def test_csr_matches_dense() -> None:
    r = _random_ratings()
    dense = np.zeros((r.n_users, r.n_items), dtype=np.float32)
    dense[r.users, r.items] = r.values
    for csr, expected in ((r.csr(), dense), (r.transpose().csr(), dense.T)):
        assert csr.indptr.shape == (expected.shape[0] + 1,) and csr.indptr[0] == 0 and csr.indptr[-1] == len(r)
        rebuilt = np.zeros_like(expected)
        for row in range(csr.n_rows):
            cols, vals = csr.row(row)
            assert np.all(np.diff(cols) > 0)  # sorted, no duplicates within a row
            rebuilt[row, cols] = vals
        np.testing.assert_array_equal(rebuilt, expected)
        np.testing.assert_array_equal(csr.counts(), (expected != 0).sum(axis=1))
    np.testing.assert_array_equal(r.csr().counts(), r.user_counts())
    np.testing.assert_array_equal(r.transpose().csr().counts(), r.item_counts())


def test_concat_requires_same_shape() -> None:
    a, b = _random_ratings(seed=1), _random_ratings(seed=2)
    assert len(a.concat(b)) == len(a) + len(b)
    with pytest.raises(DataError):
        a.concat(_random_ratings(n_users=41))


# ----- splits --------------------------------------------------------------------------------------------------


def _assert_partition(split: Split, ratings: Ratings) -> None:
    parts = [_keys(split.train), _keys(split.validation), _keys(split.test)]
    everything = np.concatenate(parts)
    assert len(np.unique(everything)) == len(everything), "parts overlap"
    np.testing.assert_array_equal(np.sort(everything), np.sort(_keys(ratings)))
    for part in (split.train, split.validation, split.test):  # values travel with their pair
        lookup = dict(zip(_keys(ratings).tolist(), ratings.values.tolist()))
        assert [lookup[k] for k in _keys(part).tolist()] == part.values.tolist()


def test_random_split_protocol(catalogue) -> None:
    ratings = catalogue.ratings
    split = random_split(ratings, (0.8, 0.1, 0.1), seed=0)
    n = len(ratings)
    _assert_partition(split, ratings)
    assert abs(len(split.train) / n - 0.8) < 0.02
    assert abs(len(split.validation) / n - 0.1) < 0.02
    assert abs(len(split.test) / n - 0.1) < 0.02
    rated_users, rated_items = ratings.user_counts() > 0, ratings.item_counts() > 0
    assert np.all(split.train.user_counts()[rated_users] > 0)
    assert np.all(split.train.item_counts()[rated_items] > 0)
    assert (split.train.n_users, split.train.n_items) == (ratings.n_users, ratings.n_items)


def test_random_split_is_seeded(catalogue) -> None:
    a = random_split(catalogue.ratings, seed=3)
    b = random_split(catalogue.ratings, seed=3)
    c = random_split(catalogue.ratings, seed=4)
    for x, y in ((a.train, b.train), (a.validation, b.validation), (a.test, b.test)):
        np.testing.assert_array_equal(_keys(x), _keys(y))
    assert not np.array_equal(np.sort(_keys(a.test)), np.sort(_keys(c.test)))


def test_random_split_keeps_a_training_rating_when_data_is_sparse() -> None:
    # Every user and item has only a couple of ratings: the reservation must still give each one in train.
    r = _random_ratings(n_users=50, n_items=50, density=0.04, seed=5)
    split = random_split(r, (0.4, 0.3, 0.3), seed=1)
    _assert_partition(split, r)
    assert np.all(split.train.user_counts()[r.user_counts() > 0] > 0)
    assert np.all(split.train.item_counts()[r.item_counts() > 0] > 0)


def test_random_split_rejects_bad_input(catalogue) -> None:
    with pytest.raises(ValueError):
        random_split(catalogue.ratings, (0.5, 0.5, 0.5))
    with pytest.raises(ValueError):
        random_split(catalogue.ratings, (1.2, -0.1, -0.1))
    with pytest.raises(DataError):
        random_split(Ratings(np.zeros(0), np.zeros(0), np.zeros(0), 2, 2))


def test_split_given_test(catalogue) -> None:
    outer = random_split(catalogue.ratings, (0.8, 0.0, 0.2), seed=0)
    train_and_val, test = outer.train, outer.test
    split = split_given_test(train_and_val, test, validation_fraction=0.1, seed=0)
    assert split.test is test
    joined = np.concatenate([_keys(split.train), _keys(split.validation)])
    assert len(np.unique(joined)) == len(joined)
    np.testing.assert_array_equal(np.sort(joined), np.sort(_keys(train_and_val)))
    assert abs(len(split.validation) / len(train_and_val) - 0.1) < 0.02
    assert np.all(split.train.user_counts()[train_and_val.user_counts() > 0] > 0)
    assert np.all(split.train.item_counts()[train_and_val.item_counts() > 0] > 0)


def test_cold_item_split(catalogue) -> None:
    ratings = catalogue.ratings
    split, cold = cold_item_split(ratings, cold_fraction=0.2, seed=0)
    rated = np.flatnonzero(ratings.item_counts() > 0)
    assert len(cold) == round(0.2 * len(rated))
    assert np.all(np.isin(cold, rated))  # cold items are rated items
    assert np.all(split.train.item_counts()[cold] == 0)  # ... with no training rating
    _assert_partition(split, ratings)
    held_out = split.validation.concat(split.test)
    np.testing.assert_array_equal(held_out.item_counts()[cold], ratings.item_counts()[cold])
    # each cold item goes wholly to validation or wholly to test
    assert not np.any((split.validation.item_counts()[cold] > 0) & (split.test.item_counts()[cold] > 0))
    warm_rated = np.setdiff1d(rated, cold)
    assert np.all(split.train.item_counts()[warm_rated] > 0)
    again, cold_again = cold_item_split(ratings, cold_fraction=0.2, seed=0)
    np.testing.assert_array_equal(cold, cold_again)
    np.testing.assert_array_equal(_keys(split.test), _keys(again.test))
    _, other = cold_item_split(ratings, cold_fraction=0.2, seed=1)
    assert not np.array_equal(cold, other)
