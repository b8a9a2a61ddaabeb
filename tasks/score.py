"""Prefect tasks for batch scoring: top-N per user in shards, committed as one Parquet partition per run date.

Layout under the output directory::

    run_date=2026-11-25/part-00000.parquet ... _manifest.json     (committed; what readers read)
    _staging/run_date=2026-11-25/...                               (work in progress; never read)

Each shard writes its part atomically into the staging directory; the commit writes the manifest last and renames
the whole directory into place, so a crash leaves nothing a reader would take for a complete result.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from prefect import get_run_logger, task

from convmf_core.data import Ratings
from convmf_core.ingest import write_parquet_atomic
from convmf_core.persistence import load_model
from tasks.register import ChampionModel

SCORES_SCHEMA = pa.schema([pa.field("user_id", pa.string(), nullable=False),
                           pa.field("rank", pa.int32(), nullable=False),
                           pa.field("item_id", pa.string(), nullable=False),
                           pa.field("score", pa.float32(), nullable=False)])


def partition_name(run_date: dt.date) -> str:
    """The partition directory of a run date (Hive style)."""
    return f"run_date={run_date.isoformat()}"


def user_shards(n_users: int, users_per_shard: int) -> list[tuple[int, int]]:
    """Half-open ranges of user indices, ``users_per_shard`` each (the last may be shorter)."""
    return [(s, min(n_users, s + users_per_shard)) for s in range(0, n_users, users_per_shard)]


@task(name="count-users")
def count_users(model: ChampionModel) -> int:
    """How many users the model knows (each gets a list)."""
    bundle = load_model(model.bundle_dir)
    return len(bundle.user_map) if bundle.user_map is not None else bundle.model.n_users


@task(name="score-shard")
def score_shard(model: ChampionModel, shard: tuple[int, int], shard_index: int, n: int, block_size: int,
                staging_dir: Path) -> Path:
    """Top-``n`` unseen items for users ``shard[0]..shard[1]-1`` to ``part-<index>.parquet`` (atomically).

    Every catalogue item is eligible, including items described but never rated (scored from their text).
    """
    bundle = load_model(model.bundle_dir)
    users = np.arange(*shard, dtype=np.int64)
    exclude = None
    if model.seen_path is not None:
        seen = pd.read_parquet(model.seen_path)
        u = bundle.user_map.to_index(seen["user_id"].astype(str).to_numpy(dtype=object), unknown="minus_one")
        i = bundle.item_map.to_index(seen["item_id"].astype(str).to_numpy(dtype=object), unknown="minus_one")
        keep = (u >= shard[0]) & (u < shard[1]) & (i >= 0)
        exclude = Ratings(u[keep], i[keep], np.ones(int(keep.sum()), np.float32), bundle.model.n_users,
                          bundle.model.n_items)
    top = bundle.model.recommend(users, n, exclude=exclude, block_size=block_size)
    frame = top.to_frame(bundle.user_map, bundle.item_map)
    frame = frame.astype({"user_id": str, "item_id": str, "rank": np.int32, "score": np.float32})
    path = write_parquet_atomic(frame, Path(staging_dir) / f"part-{shard_index:05d}.parquet", SCORES_SCHEMA)
    get_run_logger().info("shard %d: %d users, %d rows", shard_index, len(users), len(frame))
    return path


@task(name="commit-scores")
def commit_scores(parts: list[Path], staging_dir: Path, final_dir: Path, model: ChampionModel, n: int) -> Path:
    """Check the parts, write ``_manifest.json`` last, and rename the staging partition into place (replacing a
    previous output for the same date)."""
    staging_dir, final_dir = Path(staging_dir), Path(final_dir)
    expected = sorted(Path(p).name for p in parts)
    present = sorted(p.name for p in staging_dir.glob("part-*.parquet"))
    if expected != present:
        raise RuntimeError(f"staging {staging_dir} holds {present}, expected {expected}: not committing")
    rows = int(sum(pd.read_parquet(p, columns=["rank"]).shape[0] for p in parts))
    manifest = {"model_name": model.name, "model_version": model.version, "n": n, "parts": expected, "rows": rows,
                "committed_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    tmp = staging_dir / "._manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, staging_dir / "_manifest.json")
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final_dir, old)
    os.replace(staging_dir, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    get_run_logger().info("committed %d rows in %d parts to %s", rows, len(parts), final_dir)
    return final_dir
