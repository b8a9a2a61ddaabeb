"""Blocked top-N recommendation from factor matrices.

Scores for a block of users against every candidate item are computed as one matrix product (``U_b @ V_c.T``),
the (user, item) pairs to exclude (typically each user's training items) are masked to ``-inf`` in one vectorised
scatter per block, and :func:`torch.topk` picks the best ``n``. Peak memory is ``block_size x n_candidates`` scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from convmf_core.data import CSR


class _RawIdMap(Protocol):
    """Anything that turns dense indices into raw ids (e.g. :class:`convmf_core.data.IdMap`)."""

    def to_raw(self, index: np.ndarray) -> Any:  # pragma: no cover - protocol
        ...


@dataclass(frozen=True)
class TopN:
    """Top-N lists: row ``r`` holds the best items of user ``users[r]``, best first.

    ``items`` is ``-1`` and ``scores`` is ``-inf`` in the slots left over when fewer than ``n`` candidates remain
    (after exclusion / candidate restriction); such padding is always at the end of a row.
    """

    users: np.ndarray  # int64 [U]
    items: np.ndarray  # int64 [U, n]
    scores: np.ndarray  # float32 [U, n]

    def __post_init__(self) -> None:
        object.__setattr__(self, "users", np.ascontiguousarray(self.users, dtype=np.int64))
        object.__setattr__(self, "items", np.ascontiguousarray(self.items, dtype=np.int64))
        object.__setattr__(self, "scores", np.ascontiguousarray(self.scores, dtype=np.float32))
        if self.users.ndim != 1:
            raise ValueError("TopN.users must be one-dimensional")
        if self.items.ndim != 2 or self.items.shape[0] != len(self.users):
            raise ValueError(f"TopN.items must have shape (len(users), n), got {self.items.shape}")
        if self.scores.shape != self.items.shape:
            raise ValueError(f"TopN.scores shape {self.scores.shape} differs from items shape {self.items.shape}")

    @property
    def n(self) -> int:
        """List length (number of slots per user, padded ones included)."""
        return int(self.items.shape[1])

    def __len__(self) -> int:
        return int(len(self.users))

    def to_frame(self, user_map: _RawIdMap | None = None, item_map: _RawIdMap | None = None) -> pd.DataFrame:
        """Long table with columns ``user_id``, ``rank`` (1-based), ``item_id``, ``score``; padded slots dropped.

        When id maps (objects with ``.to_raw(index_array)``) are given, raw ids replace the dense indices.
        """
        n_users, n = self.items.shape
        valid = self.items >= 0
        users = np.repeat(self.users, n).reshape(n_users, n)[valid]
        ranks = np.tile(np.arange(1, n + 1, dtype=np.int64), n_users).reshape(n_users, n)[valid]
        items = self.items[valid]
        scores = self.scores[valid]
        user_ids = np.asarray(user_map.to_raw(users)) if user_map is not None else users
        item_ids = np.asarray(item_map.to_raw(items)) if item_map is not None else items
        return pd.DataFrame({"user_id": user_ids, "rank": ranks, "item_id": item_ids, "score": scores})


def _exclusion_pairs(exclude: CSR, block_users: np.ndarray, position: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Row-in-block and candidate-column indices of the excluded pairs of a user block (no per-user loop)."""
    starts = exclude.indptr[block_users]
    counts = exclude.indptr[block_users + 1] - starts
    total = int(counts.sum())
    if total == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    # Flat positions into exclude.indices: for each user, starts[u] + 0..counts[u]-1.
    row_first = np.cumsum(counts) - counts
    flat = np.arange(total, dtype=np.int64) + np.repeat(starts - row_first, counts)
    rows = np.repeat(np.arange(len(block_users), dtype=np.int64), counts)
    cols = exclude.indices[flat]
    if position is not None:
        cols = position[cols]
        keep = cols >= 0
        rows, cols = rows[keep], cols[keep]
    return rows, cols


def top_n(user_factors: torch.Tensor, item_factors: torch.Tensor, users: np.ndarray, n: int, *,
          offset: float = 0.0, exclude: CSR | None = None, candidate_items: np.ndarray | None = None,
          block_size: int = 1024, device: torch.device | str | None = None) -> TopN:
    """The ``n`` highest-scoring items per user, with ``score = user_factors[u] @ item_factors[j] + offset``.

    ``exclude`` (rows by user, e.g. the training ratings' CSR) removes each user's listed items; ``candidate_items``
    restricts the ranking to those item indices (deduplicated). Users are processed ``block_size`` at a time on
    ``device`` (default: the factors' device). Rows with fewer than ``n`` remaining candidates are padded with
    item ``-1`` / score ``-inf``. Results are numpy arrays on the CPU.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    n = int(n)
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
    block_size = int(block_size)
    if user_factors.ndim != 2 or item_factors.ndim != 2:
        raise ValueError("user_factors and item_factors must be 2-D tensors")
    if user_factors.shape[1] != item_factors.shape[1]:
        raise ValueError(f"factor dimensions differ: users have {user_factors.shape[1]}, "
                         f"items have {item_factors.shape[1]}")
    n_users_total, n_items_total = int(user_factors.shape[0]), int(item_factors.shape[0])

    users_arr = np.asarray(users)
    if users_arr.ndim != 1:
        raise ValueError("users must be a one-dimensional array of user indices")
    if users_arr.size and not np.issubdtype(users_arr.dtype, np.integer):
        raise ValueError(f"users must be integer indices, got dtype {users_arr.dtype}")
    users_arr = users_arr.astype(np.int64, copy=False)
    if users_arr.size and (users_arr.min() < 0 or users_arr.max() >= n_users_total):
        raise ValueError(f"user index out of range [0, {n_users_total})")

    position: np.ndarray | None = None
    if candidate_items is not None:
        cand = np.asarray(candidate_items)
        if cand.ndim != 1:
            raise ValueError("candidate_items must be a one-dimensional array of item indices")
        if cand.size and not np.issubdtype(cand.dtype, np.integer):
            raise ValueError(f"candidate_items must be integer indices, got dtype {cand.dtype}")
        cand = np.unique(cand.astype(np.int64, copy=False))
        if cand.size and (cand[0] < 0 or cand[-1] >= n_items_total):
            raise ValueError(f"candidate item index out of range [0, {n_items_total})")
        position = np.full(n_items_total, -1, dtype=np.int64)
        position[cand] = np.arange(len(cand), dtype=np.int64)
    else:
        cand = None
    n_cand = n_items_total if cand is None else len(cand)

    if exclude is not None:
        if exclude.n_cols != n_items_total:
            raise ValueError(f"exclude has {exclude.n_cols} columns but there are {n_items_total} items")
        if users_arr.size and users_arr.max() >= exclude.n_rows:
            raise ValueError(f"user index out of range of exclude's {exclude.n_rows} rows")

    n_out = len(users_arr)
    out_items = np.full((n_out, n), -1, dtype=np.int64)
    out_scores = np.full((n_out, n), -np.inf, dtype=np.float32)
    k = min(n, n_cand)
    if n_out == 0 or k == 0:
        return TopN(users_arr, out_items, out_scores)

    dev = torch.device(device) if device is not None else user_factors.device
    with torch.no_grad():
        items_t = item_factors
        if cand is not None:
            items_t = items_t[torch.as_tensor(cand, device=items_t.device)]
        items_t = items_t.to(dev)
        cand_t = torch.as_tensor(cand, device=dev) if cand is not None else None
        for lo in range(0, n_out, block_size):
            block = users_arr[lo:lo + block_size]
            u = user_factors[torch.as_tensor(block, device=user_factors.device)].to(dev, dtype=items_t.dtype)
            scores = u @ items_t.T
            if offset:
                scores += offset
            if exclude is not None:
                rows, cols = _exclusion_pairs(exclude, block, position)
                if len(rows):
                    scores[torch.as_tensor(rows, device=dev), torch.as_tensor(cols, device=dev)] = float("-inf")
            top_scores, top_pos = torch.topk(scores, k, dim=1, largest=True, sorted=True)
            top_items = cand_t[top_pos] if cand_t is not None else top_pos
            s = top_scores.to(torch.float32).cpu().numpy()
            it = top_items.cpu().numpy().astype(np.int64, copy=False)
            it = np.where(np.isneginf(s), -1, it)  # excluded items that surfaced only because too few were left
            out_items[lo:lo + len(block), :k] = it
            out_scores[lo:lo + len(block), :k] = s
    return TopN(users_arr, out_items, out_scores)
