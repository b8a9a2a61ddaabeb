"""Prefect tasks for batch scoring: top-N per user in shards, committed as one Parquet partition per run date.

Layout under the output directory::

    run_date=2026-11-25/part-00000.parquet ... _manifest.json     (committed; what readers read)
    _staging/run_date=2026-11-25/part-*.parquet, _plan.json        (work in progress; never read)
    _staging/run_date=2026-11-25/_seen/shard=<i>/                  (shard i's rated pairs, dense indices)

Each shard writes its part atomically (a temporary file renamed to ``part-<shard index>``) into the staging
directory; the commit writes the manifest last and renames the whole directory into place, so a crash leaves
nothing a reader would take for a complete result. ``_plan.json`` records what the staged parts belong to (model
version, ``n``, the shard ranges): a rerun with the same plan keeps the parts of the shards that finished and scores
only the others; any other plan (a new champion, another shard size or ``n``) clears the staging directory first.
Either way every user is in exactly one committed part.

Shards may run in other processes (a Dask cluster): the downloaded model and the staging directory must be at the
same path on storage every worker sees (the local disk for a local cluster, a shared filesystem for a remote one). Each worker process loads the model
once (:func:`_scorer`) and each shard reads only its own users' rated pairs, so a worker's memory is the model's
factors plus one block of scores, however large the seen table is.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from prefect import get_run_logger, task

from convmf_core.atomic import replace_directory
from convmf_core.data import IdMap, Ratings
from convmf_core.ingest import write_parquet_atomic
from convmf_core.models.base import ScoringFactors
from convmf_core.persistence import load_model
from convmf_core.topn import TopN, top_n
from tasks.register import ChampionModel

SCORES_SCHEMA = pa.schema([pa.field("user_id", pa.string(), nullable=False),
                           pa.field("rank", pa.int32(), nullable=False),
                           pa.field("item_id", pa.string(), nullable=False),
                           pa.field("score", pa.float32(), nullable=False)])
PLAN_FILE = "_plan.json"
SEEN_DIR = "_seen"
_PLAN_FORMAT = 1  # bump when a part's content changes for the same plan, so old staged parts are not reused
_SEEN_SCHEMA = pa.schema([("shard", pa.int32()), ("user", pa.int64()), ("item", pa.int64())])
_SEEN_BATCH_ROWS = 1 << 20


def partition_name(run_date: dt.date) -> str:
    """The partition directory of a run date (Hive style)."""
    return f"run_date={run_date.isoformat()}"


def part_name(shard_index: int) -> str:
    """The file of a shard's part: one name per shard index, so a rerun replaces a part instead of adding one."""
    return f"part-{shard_index:05d}.parquet"


def user_shards(n_users: int, users_per_shard: int) -> list[tuple[int, int]]:
    """Half-open ranges of user indices, ``users_per_shard`` each (the last may be shorter)."""
    return [(s, min(n_users, s + users_per_shard)) for s in range(0, n_users, users_per_shard)]


# ------------------------------------------------------------------------------------------------------------------
# The model, loaded once per process
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scorer:
    """What a shard needs from a bundle: the id maps and the scoring factors (not the CNN, not the raw tensors)."""

    user_map: IdMap
    item_map: IdMap
    factors: ScoringFactors


_SCORER_LOCK = threading.Lock()
_SCORER_CACHE: dict[str, object] = {}


def _scorer(bundle_dir: Path) -> _Scorer:
    """The bundle's scorer, loaded (checksums verified) once per process and shared by the shards it runs: the
    threads of the default runner share one copy, each Dask worker process holds one. A new bundle replaces it."""
    bundle_dir = Path(bundle_dir).resolve()
    key = f"{bundle_dir}:{(bundle_dir / 'manifest.json').stat().st_mtime_ns}"
    with _SCORER_LOCK:
        if _SCORER_CACHE.get("key") != key:
            _SCORER_CACHE.clear()  # release the previous model before loading the next
            bundle = load_model(bundle_dir)
            if bundle.user_map is None or bundle.item_map is None:
                raise ValueError(f"the model bundle {bundle_dir} has no id maps: scores need raw ids")
            _SCORER_CACHE.update(key=key, scorer=_Scorer(bundle.user_map, bundle.item_map,
                                                         bundle.model.scoring_factors()))
        return _SCORER_CACHE["scorer"]  # type: ignore[return-value]


@task(name="count-users")
def count_users(model: ChampionModel) -> int:
    """How many users the model knows (each gets a list)."""
    return len(_scorer(model.bundle_dir).user_map)


# ------------------------------------------------------------------------------------------------------------------
# Staging: the plan, the seen pairs by shard, the parts, the commit
# ------------------------------------------------------------------------------------------------------------------


def _plan(model: ChampionModel, shards: list[tuple[int, int]], n: int) -> dict:
    ranges = json.dumps([[int(lo), int(hi)] for lo, hi in shards]).encode()
    return {"format": _PLAN_FORMAT, "model_name": model.name, "model_version": str(model.version), "n": int(n),
            "n_shards": len(shards), "shards_sha256": hashlib.sha256(ranges).hexdigest()}


def _write_json_atomic(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


@task(name="open-staging")
def open_staging(staging_dir: Path, model: ChampionModel, shards: list[tuple[int, int]], n: int) -> Path:
    """Make ``staging_dir`` ready for this run's parts and return it.

    If it holds an interrupted run of the same plan (same model version, ``n`` and shard ranges), its finished parts
    are kept (only temporary files are removed) and only the missing shards will be scored. Anything else (another
    plan, no plan) is removed first, so no stale part, e.g. from a run with more shards, can reach the commit.
    """
    staging_dir, logger = Path(staging_dir), get_run_logger()
    plan, plan_path = _plan(model, shards, n), staging_dir / PLAN_FILE
    try:
        previous = json.loads(plan_path.read_text())
    except (OSError, ValueError):
        previous = None
    if previous == plan:
        for stray in staging_dir.glob(".*"):  # temporary files of writes a crash interrupted
            shutil.rmtree(stray) if stray.is_dir() else stray.unlink()
        kept = len(list(staging_dir.glob("part-*.parquet")))
        logger.info("resuming %s: %d of %d parts already scored", staging_dir, kept, len(shards))
        return staging_dir
    if staging_dir.exists():
        logger.info("clearing %s: left by a run with another plan (%s)", staging_dir,
                    "none recorded" if previous is None else {k: v for k, v in previous.items() if plan.get(k) != v})
        shutil.rmtree(staging_dir)
    staging_dir.mkdir(parents=True)
    _write_json_atomic(plan_path, plan)
    return staging_dir


def _as_map_ids(column: pa.Array, id_map: IdMap) -> np.ndarray:
    """Raw ids read from Parquet in the type of the id map (this pipeline's maps hold strings: ``42`` -> ``"42"``)."""
    if id_map.raw_ids.dtype.kind in "iu":
        try:
            return column.cast(pa.int64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass  # ids that are not integers: none of them is in the map
    return column.cast(pa.string()).to_numpy(zero_copy_only=False)


@task(name="index-seen")
def index_seen(model: ChampionModel, users_per_shard: int, staging_dir: Path) -> Path | None:
    """Split the model's seen pairs by shard, once: ``_seen/shard=<i>/`` holds dense (user, item) indices of shard
    ``i``'s users, so each shard reads only its own pairs. Streams the seen file in batches of ~1M rows (memory
    does not grow with its size); pairs of unknown users or items are dropped. ``None`` when the model has none."""
    if model.seen_path is None:
        return None
    out, logger = Path(staging_dir) / SEEN_DIR, get_run_logger()
    done = out / "_SUCCESS"
    if done.is_file():  # an interrupted run of the same plan (open_staging clears any other) already split them
        return out
    shutil.rmtree(out, ignore_errors=True)
    scorer = _scorer(model.bundle_dir)
    users, items = pd.Index(scorer.user_map.raw_ids), pd.Index(scorer.item_map.raw_ids)  # one hash table each
    counts = {"read": 0, "kept": 0}

    def batches():
        source = pq.ParquetFile(model.seen_path)
        for batch in source.iter_batches(batch_size=_SEEN_BATCH_ROWS, columns=["user_id", "item_id"]):
            u = users.get_indexer(_as_map_ids(batch.column("user_id"), scorer.user_map)).astype(np.int64)
            i = items.get_indexer(_as_map_ids(batch.column("item_id"), scorer.item_map)).astype(np.int64)
            keep = (u >= 0) & (i >= 0)
            counts["read"] += len(u)
            counts["kept"] += int(keep.sum())
            u, i = u[keep], i[keep]
            yield pa.record_batch([pa.array(u // users_per_shard, pa.int32()), pa.array(u), pa.array(i)],
                                  schema=_SEEN_SCHEMA)

    ds.write_dataset(batches(), out, schema=_SEEN_SCHEMA, format="parquet",
                     partitioning=ds.partitioning(pa.schema([_SEEN_SCHEMA.field("shard")]), flavor="hive"),
                     basename_template="part-{i}.parquet", existing_data_behavior="overwrite_or_ignore")
    done.touch()
    logger.info("seen pairs split by shard: %d read, %d of known users and items", counts["read"], counts["kept"])
    return out


def _shard_seen(seen_dir: Path, shard_index: int, shard: tuple[int, int], n_items: int) -> Ratings:
    """Shard ``shard_index``'s seen pairs, users relative to the shard's first user."""
    lo, hi = shard
    directory = Path(seen_dir) / f"shard={shard_index}"
    if directory.is_dir():
        table = ds.dataset(directory, format="parquet").to_table(columns=["user", "item"])
        u, i = table.column("user").to_numpy() - lo, table.column("item").to_numpy()
    else:  # none of the shard's users has rated anything known
        u = i = np.zeros(0, dtype=np.int64)
    return Ratings(u, i, np.ones(len(u), np.float32), hi - lo, n_items)


@task(name="score-shard")
def score_shard(model: ChampionModel, shard: tuple[int, int], shard_index: int, n: int, block_size: int,
                staging_dir: Path, seen_dir: Path | None = None) -> Path:
    """Top-``n`` unseen items for users ``shard[0]..shard[1]-1`` to ``part-<index>.parquet`` (atomically).

    Every catalogue item is eligible, including items described but never rated (scored from their text); the
    pairs under ``seen_dir`` (:func:`index_seen`) are left out. A part already staged (by an interrupted run of the
    same plan, see :func:`open_staging`) is kept as it is.
    """
    path, logger = Path(staging_dir) / part_name(shard_index), get_run_logger()
    if path.is_file():
        logger.info("shard %d: part kept from an interrupted run of the same plan", shard_index)
        return path
    scorer = _scorer(model.bundle_dir)
    factors, (lo, hi) = scorer.factors, shard
    n_items = int(factors.item.shape[0])
    exclude = _shard_seen(seen_dir, shard_index, shard, n_items).csr() if seen_dir is not None else None
    top = top_n(factors.user[lo:hi], factors.item, np.arange(hi - lo, dtype=np.int64), n, offset=factors.offset,
                exclude=exclude, block_size=block_size)
    top = TopN(top.users + lo, top.items, top.scores)
    frame = top.to_frame(scorer.user_map, scorer.item_map)
    frame = frame.astype({"user_id": str, "item_id": str, "rank": np.int32, "score": np.float32})
    write_parquet_atomic(frame, path, SCORES_SCHEMA)
    logger.info("shard %d: %d users, %d rows", shard_index, hi - lo, len(frame))
    return path


@task(name="commit-scores")
def commit_scores(parts: list[Path], staging_dir: Path, final_dir: Path, model: ChampionModel, n: int) -> Path:
    """Check the parts, write ``_manifest.json`` last, and rename the staging partition into place (replacing a
    previous output for the same date)."""
    staging_dir, final_dir = Path(staging_dir), Path(final_dir)
    expected = sorted(Path(p).name for p in parts)
    present = sorted(p.name for p in staging_dir.glob("part-*.parquet"))
    if expected != present or len(set(expected)) != len(expected):
        raise RuntimeError(f"staging {staging_dir} holds {present}, expected {expected}: not committing")
    rows = int(sum(pq.ParquetFile(staging_dir / name).metadata.num_rows for name in expected))
    # What only staging needs goes first: a crash from here on leaves no plan, so a rerun starts afresh.
    (staging_dir / PLAN_FILE).unlink(missing_ok=True)
    shutil.rmtree(staging_dir / SEEN_DIR, ignore_errors=True)
    manifest = {"model_name": model.name, "model_version": model.version, "n": n, "parts": expected, "rows": rows,
                "committed_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    _write_json_atomic(staging_dir / "_manifest.json", manifest)
    replace_directory(staging_dir, final_dir)
    get_run_logger().info("committed %d rows in %d parts to %s", rows, len(parts), final_dir)
    return final_dir
