"""Tests of the time-based split (convmf_core.data.time_split): windows, disjointness, errors, no leak."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convmf_core.config import TextConfig
from convmf_core.data import (DAY_SECONDS, DataError, IdMap, Ratings, default_time_cutoff, ratings_from_frame,
                              seen_before, time_split)
from convmf_core.synthetic import SyntheticConfig, generate_catalogue
from convmf_core.text import build_vocabulary

WEEK = 7 * DAY_SECONDS


def _keys(r: Ratings) -> np.ndarray:
    return r.users * r.n_items + r.items


@pytest.fixture(scope="module")
def synthetic():
    """A 60-day synthetic catalogue with timestamps, as the library's inputs."""
    data = generate_catalogue(SyntheticConfig(n_users=80, n_items=60, n_topics=4, ratings_per_user=15,
                                              words_per_description=15, seed=3))
    users, items = IdMap.from_values(data.ratings["user_id"]), IdMap.from_values(data.items["item_id"])
    return data, users, items, ratings_from_frame(data.ratings, users, items), data.ratings["timestamp"].to_numpy()


def test_windows_are_right_and_disjoint(synthetic) -> None:
    _, _, _, ratings, ts = synthetic
    cutoff = int(ts.min()) + 30 * DAY_SECONDS
    split = time_split(ratings, ts, cutoff=cutoff, validation_seconds=WEEK, test_seconds=2 * WEEK)
    by_key = dict(zip(_keys(ratings).tolist(), ts.tolist()))  # one rating per (user, item) in the catalogue
    train_t = np.array([by_key[k] for k in _keys(split.train).tolist()])
    val_t = np.array([by_key[k] for k in _keys(split.validation).tolist()])
    test_t = np.array([by_key[k] for k in _keys(split.test).tolist()])
    assert train_t.max() < cutoff
    assert val_t.min() >= cutoff and val_t.max() < cutoff + WEEK
    assert test_t.min() >= cutoff + WEEK and test_t.max() < cutoff + 3 * WEEK
    # disjoint, and together exactly the ratings up to the end of the test window
    keys = [set(_keys(s).tolist()) for s in (split.train, split.validation, split.test)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert len(split.train) + len(split.validation) + len(split.test) == int((ts < cutoff + 3 * WEEK).sum())
    assert (split.train.n_users, split.train.n_items) == (ratings.n_users, ratings.n_items)


def test_default_cutoff_holds_out_the_last_two_windows(synthetic) -> None:
    _, _, _, ratings, ts = synthetic
    split = time_split(ratings, ts)
    cutoff = default_time_cutoff(ts)
    assert cutoff == int(ts.max()) + 1 - 2 * WEEK
    assert len(split.train) == int((ts < cutoff).sum())
    assert len(split.test) == int((ts >= cutoff + WEEK).sum())  # the newest rating is in the test window
    assert len(split.train) + len(split.validation) + len(split.test) == len(ratings)


def test_seen_before_marks_users_and_items_with_a_training_rating(synthetic) -> None:
    _, _, _, ratings, ts = synthetic
    split = time_split(ratings, ts, cutoff=int(ts.min()) + 3 * DAY_SECONDS)
    users, items = seen_before(split)
    first_user_t = np.full(ratings.n_users, np.iinfo(np.int64).max)
    np.minimum.at(first_user_t, ratings.users, ts)
    np.testing.assert_array_equal(users, first_user_t < int(ts.min()) + 3 * DAY_SECONDS)
    assert 0 < items.sum() < ratings.n_items  # some items are first rated after the cutoff


@pytest.mark.parametrize("bad", [np.nan, None, "yesterday"])
def test_missing_or_non_numeric_timestamps_name_the_rows(bad) -> None:
    ratings = Ratings(np.array([0, 1, 1]), np.array([0, 0, 1]), np.array([3.0, 4.0, 5.0]), 2, 2)
    ts = np.array([100, bad, 300], dtype=object)
    with pytest.raises(DataError, match=r"missing or non-numeric timestamp.*row\(s\) \[1\]"):
        time_split(ratings, ts, cutoff=200, validation_seconds=50, test_seconds=50)


def test_datetimes_are_read_as_unix_seconds() -> None:
    ratings = Ratings(np.array([0, 1, 1]), np.array([0, 0, 1]), np.array([3.0, 4.0, 5.0]), 2, 2)
    seconds = np.array([0, DAY_SECONDS, 2 * DAY_SECONDS])
    expected = time_split(ratings, seconds, cutoff=DAY_SECONDS, validation_seconds=DAY_SECONDS,
                          test_seconds=DAY_SECONDS)
    naive = pd.Series(pd.to_datetime(seconds, unit="s"))
    aware = naive.dt.tz_localize("UTC").dt.tz_convert("Europe/Paris")  # same instants, another zone
    for ts in (naive.to_numpy(), naive, aware):
        split = time_split(ratings, ts, cutoff=DAY_SECONDS, validation_seconds=DAY_SECONDS, test_seconds=DAY_SECONDS)
        for a, b in zip((split.train, split.validation, split.test), (expected.train, expected.validation, expected.test)):
            np.testing.assert_array_equal(a.users, b.users)
            np.testing.assert_array_equal(a.items, b.items)
    with pytest.raises(DataError, match=r"missing timestamp.*row\(s\) \[1\]"):
        time_split(ratings, np.array(["1970-01-01", "NaT", "1970-01-03"], dtype="datetime64[s]"))


def test_timestamps_must_match_the_ratings() -> None:
    ratings = Ratings(np.array([0, 1]), np.array([0, 1]), np.array([3.0, 4.0]), 2, 2)
    with pytest.raises(DataError, match="1 timestamp"):
        time_split(ratings, np.array([5]))


@pytest.mark.parametrize("cutoff,window", [(100, "train"), (250, "validation"), (120, "test")])
def test_an_empty_window_is_an_error_naming_it(cutoff: int, window: str) -> None:
    # ratings at t = 100, 150, 200 (numeric strings, as read from a CSV, are accepted)
    ratings = Ratings(np.array([0, 1, 1]), np.array([0, 0, 1]), np.array([3.0, 4.0, 5.0]), 2, 2)
    ts = np.array(["100", "150", "200"], dtype=object)
    with pytest.raises(DataError, match=f"the {window} window"):
        time_split(ratings, ts, cutoff=cutoff, validation_seconds=40, test_seconds=40)


def test_window_lengths_must_be_positive() -> None:
    ratings = Ratings(np.array([0]), np.array([0]), np.array([3.0]), 1, 1)
    with pytest.raises(ValueError, match="must be > 0"):
        time_split(ratings, np.array([1]), validation_seconds=0)


def test_a_word_seen_only_after_the_cutoff_is_not_in_the_vocabulary(synthetic) -> None:
    """The library's part of 'nothing from the future leaks': a vocabulary built from the descriptions of the items
    known before the cutoff (seen_before) cannot contain a word that only a later item uses."""
    data, _, items, ratings, ts = synthetic
    cutoff = int(ts.min()) + 20 * DAY_SECONDS
    split = time_split(ratings, ts, cutoff=cutoff)
    _, known_items = seen_before(split)
    texts = data.items.set_index("item_id").loc[items.raw_ids, "description"].tolist()
    late = int(np.flatnonzero(~known_items & (ratings.item_counts() > 0))[0])  # first rated after the cutoff
    texts[late] = texts[late] + " zyxplanted"
    vocab = build_vocabulary([t for t, known in zip(texts, known_items) if known], TextConfig())
    assert "zyxplanted" not in vocab
    assert "zyxplanted" in build_vocabulary(texts, TextConfig())  # (it would be, were the future included)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=3, max_size=60), st.integers(1, 300), st.integers(1, 300),
       st.integers(0, 1000))
def test_every_rating_lands_in_exactly_its_window(times: list[int], val: int, test: int, cutoff: int) -> None:
    n = len(times)
    ratings = Ratings(np.arange(n) % 5, np.arange(n) // 5, np.ones(n), 5, (n - 1) // 5 + 1)
    ts = np.asarray(times, dtype=np.int64)
    expected = [(ts < cutoff).sum(), ((ts >= cutoff) & (ts < cutoff + val)).sum(),
                ((ts >= cutoff + val) & (ts < cutoff + val + test)).sum()]
    if min(expected) == 0:
        with pytest.raises(DataError):
            time_split(ratings, ts, cutoff=cutoff, validation_seconds=val, test_seconds=test)
        return
    split = time_split(ratings, ts, cutoff=cutoff, validation_seconds=val, test_seconds=test)
    assert [len(split.train), len(split.validation), len(split.test)] == expected
