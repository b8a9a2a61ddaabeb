"""Rating data: id maps (raw ids <-> dense indices), sparse rating storage and splits.

Everything here is numpy; nothing is copied per rating in Python. A :class:`Ratings` holds the observed
entries of the N x M rating matrix as three parallel arrays (COO); :meth:`Ratings.csr` turns it into compressed
rows for the solvers. Ten million ratings take 160 MB as COO (int64 + int64 + float32 would be 200 MB; users and
items are stored as int64 for torch indexing), well within a single machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd


class DataError(ValueError):
    """Raised when rating or id data is inconsistent (unknown ids, mismatched lengths, empty input)."""


@dataclass(frozen=True)
class IdMap:
    """A bijection between raw ids (any hashable scalar: int or str) and dense indices ``0..len-1``.

    ``raw_ids[i]`` is the raw id of dense index ``i``. Built with :meth:`from_values` (sorted, unique).
    """

    raw_ids: np.ndarray

    @classmethod
    def from_values(cls, values: Iterable | np.ndarray | pd.Series) -> "IdMap":
        """Build a map from the distinct values of ``values`` (sorted, so the map does not depend on row order)."""
        uniq = pd.unique(pd.Series(np.asarray(values)))
        try:
            uniq = np.sort(np.asarray(uniq))
        except TypeError:  # mixed types: keep the order of first appearance
            uniq = np.asarray(uniq, dtype=object)
        return cls(uniq)

    def __len__(self) -> int:
        return int(len(self.raw_ids))

    def _lookup(self) -> pd.Index:
        return pd.Index(self.raw_ids)

    def to_index(self, raw: Sequence | np.ndarray | pd.Series, *, unknown: str = "raise") -> np.ndarray:
        """Dense indices of ``raw`` ids. ``unknown='raise'`` fails on an id not in the map; ``'minus_one'`` maps it to -1."""
        raw_arr = np.asarray(raw)
        idx = self._lookup().get_indexer(raw_arr).astype(np.int64)
        if unknown == "raise" and (idx < 0).any():
            missing = raw_arr[idx < 0][:5].tolist()
            raise DataError(f"{int((idx < 0).sum())} id(s) not in the id map, e.g. {missing}")
        if unknown not in ("raise", "minus_one"):
            raise ValueError(f"unknown must be 'raise' or 'minus_one', not {unknown!r}")
        return idx

    def to_raw(self, index: Sequence[int] | np.ndarray) -> np.ndarray:
        """Raw ids of dense indices."""
        return self.raw_ids[np.asarray(index, dtype=np.int64)]

    def extend(self, values: Iterable) -> "IdMap":
        """A map that keeps every existing index and appends the ids of ``values`` it does not know yet."""
        candidates = pd.unique(pd.Series(np.asarray(list(values))))
        new = candidates[self._lookup().get_indexer(candidates) < 0]
        if len(new) == 0:
            return self
        # Fixed-width strings (e.g. a map read back from a bundle) must widen, not truncate the new ids: cast to the
        # kind ("U"/"S") only and let concatenate pick the wider width.
        kind = self.raw_ids.dtype.kind
        new = new.astype(kind) if kind in "US" else new.astype(self.raw_ids.dtype, copy=False)
        return IdMap(np.concatenate([self.raw_ids, new]))

    def to_list(self) -> list:
        """Raw ids as plain Python values (for JSON)."""
        return self.raw_ids.tolist()


@dataclass(frozen=True)
class CSR:
    """Compressed sparse rows: row ``r`` holds ``indices[indptr[r]:indptr[r+1]]`` with values ``data[...]``."""

    indptr: np.ndarray  # int64, n_rows + 1
    indices: np.ndarray  # int64, nnz
    data: np.ndarray  # float32, nnz
    n_rows: int
    n_cols: int

    def counts(self) -> np.ndarray:
        """Number of stored entries per row."""
        return np.diff(self.indptr)

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Column indices and values of row ``r``."""
        lo, hi = self.indptr[r], self.indptr[r + 1]
        return self.indices[lo:hi], self.data[lo:hi]


@dataclass(frozen=True)
class Ratings:
    """Observed ratings of an ``n_users x n_items`` matrix as parallel arrays (dense indices, not raw ids)."""

    users: np.ndarray  # int64
    items: np.ndarray  # int64
    values: np.ndarray  # float32
    n_users: int
    n_items: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "users", np.ascontiguousarray(self.users, dtype=np.int64))
        object.__setattr__(self, "items", np.ascontiguousarray(self.items, dtype=np.int64))
        object.__setattr__(self, "values", np.ascontiguousarray(self.values, dtype=np.float32))
        if not (len(self.users) == len(self.items) == len(self.values)):
            raise DataError("users, items and values must have the same length")
        if len(self.users):
            if self.users.min() < 0 or self.users.max() >= self.n_users:
                raise DataError(f"user index out of range [0, {self.n_users})")
            if self.items.min() < 0 or self.items.max() >= self.n_items:
                raise DataError(f"item index out of range [0, {self.n_items})")
        if not np.isfinite(self.values).all():
            raise DataError("ratings must be finite numbers")

    def __len__(self) -> int:
        return int(len(self.values))

    def subset(self, mask_or_index: np.ndarray) -> "Ratings":
        """The ratings selected by a boolean mask or an index array (same matrix shape)."""
        return Ratings(self.users[mask_or_index], self.items[mask_or_index], self.values[mask_or_index],
                       self.n_users, self.n_items)

    def transpose(self) -> "Ratings":
        """The item x user view of the same ratings."""
        return Ratings(self.items, self.users, self.values, self.n_items, self.n_users)

    def csr(self) -> CSR:
        """Compressed rows by user (use ``transpose().csr()`` for rows by item). Columns sorted within a row."""
        order = np.lexsort((self.items, self.users))
        counts = np.bincount(self.users, minlength=self.n_users)
        indptr = np.zeros(self.n_users + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return CSR(indptr, self.items[order], self.values[order], self.n_users, self.n_items)

    def user_counts(self) -> np.ndarray:
        """Ratings per user (length ``n_users``)."""
        return np.bincount(self.users, minlength=self.n_users)

    def item_counts(self) -> np.ndarray:
        """Ratings per item (length ``n_items``)."""
        return np.bincount(self.items, minlength=self.n_items)

    def mean(self) -> float:
        """Mean rating (0.0 when empty)."""
        return float(self.values.mean()) if len(self) else 0.0

    def concat(self, other: "Ratings") -> "Ratings":
        """Ratings of both sets (same matrix shape required)."""
        if (self.n_users, self.n_items) != (other.n_users, other.n_items):
            raise DataError("cannot concatenate ratings of different matrix shapes")
        return Ratings(np.concatenate([self.users, other.users]), np.concatenate([self.items, other.items]),
                       np.concatenate([self.values, other.values]), self.n_users, self.n_items)


@dataclass(frozen=True)
class Split:
    """Train / validation / test ratings over one matrix shape."""

    train: Ratings
    validation: Ratings
    test: Ratings


def ratings_from_frame(frame: pd.DataFrame, user_map: IdMap, item_map: IdMap, *, user_col: str = "user_id",
                       item_col: str = "item_id", rating_col: str = "rating") -> Ratings:
    """Ratings from a frame of raw ids; every id must be in the maps (a :class:`DataError` names the unknown ones)."""
    return Ratings(user_map.to_index(frame[user_col].to_numpy()), item_map.to_index(frame[item_col].to_numpy()),
                   frame[rating_col].to_numpy(dtype=np.float32), len(user_map), len(item_map))


def random_split(ratings: Ratings, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), *,
                 seed: int = 0) -> Split:
    """The paper's protocol: a seeded random split in which every user and item with a rating keeps one in train.

    One rating of every user and one of every item (chosen at random) are reserved for training first; the rest are
    shuffled and cut so that the overall shares match ``fractions`` as closely as the reservation allows.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"fractions must be three non-negative shares summing to 1, got {fractions}")
    n = len(ratings)
    if n == 0:
        raise DataError("cannot split an empty rating set")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    # First occurrence in a random order = one random rating per user / per item.
    _, first_user = np.unique(ratings.users[perm], return_index=True)
    _, first_item = np.unique(ratings.items[perm], return_index=True)
    reserved = np.zeros(n, dtype=bool)
    reserved[perm[first_user]] = True
    reserved[perm[first_item]] = True
    rest = perm[~reserved[perm]]
    n_val = int(round(fractions[1] * n))
    n_test = int(round(fractions[2] * n))
    n_val = min(n_val, len(rest))
    n_test = min(n_test, len(rest) - n_val)
    val_idx = rest[:n_val]
    test_idx = rest[n_val:n_val + n_test]
    train_mask = np.ones(n, dtype=bool)
    train_mask[val_idx] = False
    train_mask[test_idx] = False
    return Split(ratings.subset(train_mask), ratings.subset(np.sort(val_idx)), ratings.subset(np.sort(test_idx)))


def split_given_test(train_and_val: Ratings, test: Ratings, *, validation_fraction: float = 0.1,
                     seed: int = 0) -> Split:
    """A split from given train/test files (e.g. MovieLens ``u1.base``/``u1.test``): validation carved from train.

    The carve keeps one training rating per user and item, as :func:`random_split`.
    """
    inner = random_split(train_and_val, (1.0 - validation_fraction, validation_fraction, 0.0), seed=seed)
    return Split(inner.train, inner.validation, test)


def cold_item_split(ratings: Ratings, cold_fraction: float = 0.2, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                    *, seed: int = 0) -> tuple[Split, np.ndarray]:
    """A cold-start protocol: a share of the rated items loses all its ratings to validation/test.

    Returns the split and the indices of the cold items (rated, but with no training rating). The warm items are
    split as :func:`random_split`; each cold item's ratings go to validation or test at random, item by item.
    """
    rng = np.random.default_rng(seed)
    rated = np.unique(ratings.items)
    cold = np.sort(rng.choice(rated, size=int(round(cold_fraction * len(rated))), replace=False))
    is_cold = np.isin(ratings.items, cold)
    warm = random_split(ratings.subset(~is_cold), fractions, seed=seed)
    cold_ratings = ratings.subset(is_cold)
    to_val_items = cold[rng.random(len(cold)) < fractions[1] / max(fractions[1] + fractions[2], 1e-12)]
    in_val = np.isin(cold_ratings.items, to_val_items)
    return (Split(warm.train, warm.validation.concat(cold_ratings.subset(in_val)),
                  warm.test.concat(cold_ratings.subset(~in_val))), cold)


DAY_SECONDS = 86_400


def _check_timestamps(ratings: Ratings, timestamps: np.ndarray | pd.Series) -> np.ndarray:
    """``timestamps`` as int64 seconds, one per rating; a :class:`DataError` when any is missing or not a number.

    Integers and numeric strings are seconds; datetimes (numpy ``datetime64`` or a pandas datetime column, with or
    without a time zone) are converted to Unix seconds."""
    if isinstance(timestamps, pd.Series) and isinstance(timestamps.dtype, pd.DatetimeTZDtype):
        timestamps = timestamps.dt.tz_convert("UTC").dt.tz_localize(None)
    raw = np.asarray(timestamps)
    if raw.ndim != 1 or len(raw) != len(ratings):
        raise DataError(f"time split: {raw.size} timestamp(s) for {len(ratings)} rating(s); give one per rating")
    if raw.dtype.kind in "iu":
        return raw.astype(np.int64)
    if raw.dtype.kind == "M":
        bad = np.flatnonzero(np.isnat(raw))
        if bad.size:
            raise DataError(f"time split: {bad.size} rating(s) have a missing timestamp, e.g. at row(s) "
                            f"{bad[:5].tolist()}; ingest quarantines such rows")
        return raw.astype("datetime64[s]").astype(np.int64)
    numeric = pd.to_numeric(pd.Series(raw), errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(numeric))
    if bad.size:
        raise DataError(f"time split: {bad.size} rating(s) have a missing or non-numeric timestamp, e.g. at row(s) "
                        f"{bad[:5].tolist()} (values {raw[bad[:5]].tolist()}); ingest quarantines such rows")
    return np.floor(numeric).astype(np.int64)


def default_time_cutoff(timestamps: np.ndarray, *, validation_seconds: int = 7 * DAY_SECONDS,
                        test_seconds: int = 7 * DAY_SECONDS) -> int:
    """The cutoff :func:`time_split` uses by default: the last ``validation_seconds + test_seconds`` of the data
    (up to and including the newest rating) are held out, i.e. ``max(timestamp) + 1 - validation - test``.
    Missing timestamps are ignored here (:func:`time_split` refuses them)."""
    ts = np.asarray(timestamps)
    if ts.size == 0:
        raise DataError("time split: no timestamps")
    if ts.dtype.kind == "M":
        ts = ts[~np.isnat(ts)].astype("datetime64[s]").astype(np.int64)
    else:
        ts = pd.to_numeric(pd.Series(ts), errors="coerce").dropna().to_numpy()
    if ts.size == 0:
        raise DataError("time split: no valid timestamp")
    return int(np.max(ts)) + 1 - int(validation_seconds) - int(test_seconds)


def time_split(ratings: Ratings, timestamps: np.ndarray | pd.Series, *, cutoff: int | None = None,
               validation_seconds: int = 7 * DAY_SECONDS, test_seconds: int = 7 * DAY_SECONDS) -> Split:
    """Train on the past, validate and test on the windows after it (nothing from the future reaches training).

    train = ``timestamp < cutoff``; validation = ``cutoff <= timestamp < cutoff + validation_seconds``; test = the
    ``test_seconds`` after that. Ratings later than the test window are left out (only possible with an explicit
    ``cutoff``). ``cutoff`` defaults to :func:`default_time_cutoff` (the newest rating closes the test window).
    ``timestamps[r]`` is rating ``r``'s time: seconds (Unix time, or any integer clock) or datetimes.

    Users and items first seen after the cutoff keep their index (the matrix shape is unchanged) but have no
    training rating; use ``split.train.user_counts() > 0`` / ``item_counts() > 0`` (or :func:`seen_before`) to
    tell them apart. Choices: a missing or non-numeric timestamp is an error, not dropped silently (the ingest
    step quarantines such rows before they get here); an empty train, validation or test window is an error naming
    the window and its time range, so a run never validates on nothing.
    """
    if validation_seconds <= 0 or test_seconds <= 0:
        raise ValueError(f"validation_seconds and test_seconds must be > 0, got {validation_seconds}, {test_seconds}")
    if len(ratings) == 0:
        raise DataError("cannot split an empty rating set")
    ts = _check_timestamps(ratings, timestamps)
    if cutoff is None:
        cutoff = default_time_cutoff(ts, validation_seconds=validation_seconds, test_seconds=test_seconds)
    cutoff = int(cutoff)
    val_end = cutoff + int(validation_seconds)
    test_end = val_end + int(test_seconds)
    windows = {"train": (None, cutoff), "validation": (cutoff, val_end), "test": (val_end, test_end)}
    masks = {"train": ts < cutoff, "validation": (ts >= cutoff) & (ts < val_end),
             "test": (ts >= val_end) & (ts < test_end)}
    for name, mask in masks.items():
        if not mask.any():
            lo, hi = windows[name]
            span = f"[{'-inf' if lo is None else lo}, {hi})"
            raise DataError(f"time split: the {name} window {span} holds no rating (timestamps run from "
                            f"{int(ts.min())} to {int(ts.max())}); move the cutoff or widen the windows")
    return Split(ratings.subset(masks["train"]), ratings.subset(masks["validation"]), ratings.subset(masks["test"]))


def seen_before(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (users, items) of the users and items with at least one training rating: under a time split,
    the ones known before the cutoff; the others are new (cold) in validation and test."""
    return split.train.user_counts() > 0, split.train.item_counts() > 0
