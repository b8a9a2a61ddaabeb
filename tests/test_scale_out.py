"""Scale-out scoring: the shards on a real ``distributed.LocalCluster`` (through prefect-dask's ``DaskTaskRunner``)
give exactly the Parquet rows of the threaded run; a rerun after a failed shard, or over stale staged parts, leaves
every user exactly once; the new scoring parameters are validated.

Real components only: a Prefect test server (session fixture), an MLflow SQLite registry in tmp holding a tiny PMF
as champion, real Dask worker processes. Nothing is mocked except one deliberately failing write.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

import tasks.score
from convmf_core.config import ALSConfig, PMFConfig
from convmf_core.data import IdMap, Ratings
from convmf_core.models.als_mf import PMF
from convmf_core.persistence import save_model
from flows.params import ScoringParams, StorageParams
from flows.scoring import scoring_flow, shard_task_runner
from tasks.register import use_tracking_uri
from tasks.registry import log_model_version, promote
from tasks.score import PLAN_FILE, SEEN_DIR
from tests.pipeline_support import new_storage, sigkill_child_when

# MLflow 3.17's input-example validation compares DataFrame columns with a range, which pandas 3.1 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Operation with range is deprecated")

MODEL = "convmf-scale"
N_USERS, N_ITEMS, PER_USER = 130, 90, 12
N = 15
SHARD = 25  # 130 users -> 6 shards, the last one short
BASE = dict(model_name=MODEL, n=N, users_per_shard=SHARD, block_size=16)


@dataclass(frozen=True)
class Champion:
    storage: StorageParams
    home: Path
    seen: pd.DataFrame
    model: PMF
    user_map: IdMap
    item_map: IdMap


@pytest.fixture(scope="module")
def champion(mlflow_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Champion]:
    """A tiny PMF registered as ``MODEL@champion`` in a private MLflow store, with its training pairs as seen."""
    home = tmp_path_factory.mktemp("scale-out")
    storage = new_storage(mlflow_template, home)

    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(N_USERS), PER_USER)
    items = np.concatenate([rng.choice(N_ITEMS - 5, PER_USER, replace=False) for _ in range(N_USERS)])  # 5 unrated
    ratings = Ratings(users, items, rng.integers(1, 6, len(users)).astype(np.float32), N_USERS, N_ITEMS)
    user_map = IdMap(np.array([f"u{u:04d}" for u in range(N_USERS)]))
    item_map = IdMap(np.array([f"i{i:03d}" for i in range(N_ITEMS)]))
    model = PMF(PMFConfig(als=ALSConfig(n_factors=4, max_iterations=3, patience=100), seed=0, device="cpu"))
    model.fit(ratings)
    bundle = save_model(model, home / "bundle", user_map=user_map, item_map=item_map)
    seen = pd.DataFrame({"user_id": user_map.to_raw(users), "item_id": item_map.to_raw(items)})

    use_tracking_uri(storage.resolved_tracking_uri())
    try:
        experiment = mlflow.create_experiment("scale-out", artifact_location=(home / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run:
            info = log_model_version(bundle, model_name=MODEL, run_id=run.info.run_id,
                                     tags={"validation_rmse": "1.0"}, seen=seen)
        assert promote(MODEL, info.version, "validation_rmse", 1.0).promoted
        yield Champion(storage, home, seen, model, user_map, item_map)
    finally:
        mlflow.set_registry_uri(None)
        mlflow.set_tracking_uri(None)


def read_scores(partition: Path) -> pd.DataFrame:
    """The committed rows (the parts the manifest lists), in a canonical order."""
    manifest = json.loads((partition / "_manifest.json").read_text())
    assert sorted(p.name for p in partition.iterdir()) == sorted(manifest["parts"] + ["_manifest.json"])
    frame = pd.concat([pd.read_parquet(partition / p) for p in manifest["parts"]], ignore_index=True)
    assert manifest["rows"] == len(frame)
    return frame.sort_values(["user_id", "rank"], ignore_index=True)


def check_complete(scores: pd.DataFrame, champ: Champion) -> None:
    """Every user exactly once with ranks 1..N, no seen pair, the right items in the right order."""
    assert scores["user_id"].nunique() == N_USERS
    assert (scores.groupby("user_id")["rank"].apply(list) == [list(range(1, N + 1))] * N_USERS).all()
    assert not scores.duplicated(["user_id", "item_id"]).any()
    seen = set(zip(champ.seen["user_id"], champ.seen["item_id"]))
    assert not seen & set(zip(scores["user_id"], scores["item_id"]))
    # An independent ranking: numpy on the model's factors, all users at once.
    f = champ.model.scoring_factors()
    dense = f.user.numpy() @ f.item.numpy().T + f.offset
    dense[champ.user_map.to_index(champ.seen["user_id"]), champ.item_map.to_index(champ.seen["item_id"])] = -np.inf
    best = np.argsort(-dense, axis=1, kind="stable")[:, :N]
    expected = champ.item_map.to_raw(best.ravel())
    np.testing.assert_array_equal(scores["item_id"].to_numpy(dtype=object), expected)
    np.testing.assert_allclose(scores["score"], np.take_along_axis(dense, best, 1).ravel(), rtol=1e-5, atol=1e-5)


def params(champ: Champion, day: int, **extra) -> ScoringParams:
    return ScoringParams(**{**BASE, "run_date": dt.date(2026, 3, day), "storage": champ.storage, **extra})


def staging_of(champ: Champion, day: int) -> Path:
    return champ.home / "scores" / MODEL / "_staging" / f"run_date=2026-03-{day:02d}"


@pytest.fixture(scope="module")
def threaded(prefect_harness: None, champion: Champion) -> pd.DataFrame:
    """The single-process reference: the default thread runner."""
    partition = scoring_flow(params(champion, 1))
    assert not staging_of(champion, 1).exists()
    return read_scores(partition)


def test_threaded_scores_are_complete(threaded: pd.DataFrame, champion: Champion) -> None:
    check_complete(threaded, champion)


def test_dask_local_cluster_gives_the_same_rows(threaded: pd.DataFrame, champion: Champion) -> None:
    partition = scoring_flow(params(champion, 2, task_runner="dask", dask_workers=2, threads_per_worker=1))
    pd.testing.assert_frame_equal(read_scores(partition), threaded)  # exact: same ids, ranks and float32 scores


def test_dask_existing_cluster_address_gives_the_same_rows(threaded: pd.DataFrame, champion: Champion) -> None:
    from distributed import Client, LocalCluster

    # One worker is enough to show the path; the local-cluster test above runs two.
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        partition = scoring_flow(params(champion, 3, task_runner="dask", dask_address=cluster.scheduler_address))
        with Client(cluster) as client:  # the scheduler saw the six shards
            prefixes = client.run_on_scheduler(lambda dask_scheduler: {
                name: sum(prefix.state_counts.values()) for name, prefix in dask_scheduler.task_prefixes.items()})
    assert prefixes.get("score_shard", 0) >= 6
    pd.testing.assert_frame_equal(read_scores(partition), threaded)


def test_rerun_after_a_failed_shard_scores_only_the_missing_ones(threaded: pd.DataFrame, champion: Champion,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = tasks.score.write_parquet_atomic

    def failing_write(frame, path, schema=None):
        if Path(path).name == "part-00002.parquet":
            raise OSError("disk full (simulated)")
        return real_write(frame, path, schema)

    monkeypatch.setattr(tasks.score, "write_parquet_atomic", failing_write)
    with pytest.raises(Exception, match="simulated"):
        scoring_flow(params(champion, 4))
    monkeypatch.undo()

    staging = staging_of(champion, 4)
    staged = sorted(p.name for p in staging.glob("part-*.parquet"))
    assert "part-00002.parquet" not in staged and staged  # the other shards finished and stay staged
    assert not (staging.parent.parent / "run_date=2026-03-04").exists()  # nothing committed
    # The seen pairs were split once by shard: each shard's directory holds only its own users.
    for shard_dir in (staging / SEEN_DIR).glob("shard=*"):
        index = int(shard_dir.name.split("=")[1])
        users = pd.read_parquet(shard_dir)["user"]
        assert users.between(index * SHARD, (index + 1) * SHARD - 1).all()
    # Also lose one finished part (e.g. a worker's disk): it must be scored again, not missed.
    (staging / "part-00000.parquet").unlink()
    kept = {name: (staging / name).stat().st_mtime_ns for name in staged if name != "part-00000.parquet"}

    partition = scoring_flow(params(champion, 4))
    scores = read_scores(partition)
    pd.testing.assert_frame_equal(scores, threaded)
    for name, mtime in kept.items():  # finished shards were kept, not scored again
        assert (partition / name).stat().st_mtime_ns == mtime
    assert not staging.exists()


def test_rerun_with_another_plan_clears_stale_parts(threaded: pd.DataFrame, champion: Champion) -> None:
    # A crashed earlier run with smaller shards (and its own plan) left 13 parts for the same date.
    staging = staging_of(champion, 5)
    staging.mkdir(parents=True)
    stale = pd.DataFrame({"user_id": ["u0000"], "rank": [1], "item_id": ["i000"], "score": [9.0]})
    for index in range(13):
        stale.to_parquet(staging / f"part-{index:05d}.parquet")
    (staging / PLAN_FILE).write_text(json.dumps({"format": 1, "model_name": MODEL, "model_version": "1", "n": N,
                                                 "n_shards": 13, "shards_sha256": "0" * 64}))
    partition = scoring_flow(params(champion, 5))  # 6 shards of 25
    assert sorted(p.name for p in partition.glob("part-*")) == [f"part-{i:05d}.parquet" for i in range(6)]
    pd.testing.assert_frame_equal(read_scores(partition), threaded)

    # Staged parts with no plan at all (an older layout, or a hand-made directory) are not trusted either.
    staging.mkdir(parents=True)
    pd.DataFrame({"user_id": ["u0000"], "rank": [1], "item_id": ["i000"], "score": [9.0]}).to_parquet(
        staging / "part-00009.parquet")
    pd.testing.assert_frame_equal(read_scores(scoring_flow(params(champion, 5))), threaded)


# One scoring process, SIGKILLed by the test (the parameters arrive as JSON, as a deployment would pass them).
SCORING_CHILD = """
import sys
from flows.params import ScoringParams
from flows.scoring import scoring_flow
scoring_flow(ScoringParams.model_validate_json(sys.argv[1]))
"""


def test_scoring_killed_mid_way_commits_nothing_and_the_rerun_completes(threaded: pd.DataFrame, champion: Champion,
                                                                       tmp_path: Path) -> None:
    killed = params(champion, 6, users_per_shard=1)  # 130 one-user shards: the kill lands mid-way
    staging, final = staging_of(champion, 6), staging_of(champion, 6).parent.parent / "run_date=2026-03-06"
    sigkill_child_when(SCORING_CHILD, killed.model_dump_json(), tmp_path / "scoring-child.log",
                       lambda: len(list(staging.glob("part-*.parquet"))) >= 3, "staged part", poll_s=0.01)

    staged = {p.name: p.stat().st_mtime_ns for p in staging.glob("part-*.parquet")}
    assert 3 <= len(staged) < N_USERS  # killed mid-way: parts left to do
    assert not final.exists()  # nothing a reader would take for a result: no partition, no manifest
    # A part being written at the kill stays a hidden temporary file, never a part-*.parquet a reader would take.
    assert all(p.name.startswith(".") for p in staging.glob("*.tmp"))
    for name in staged:
        pd.read_parquet(staging / name)  # every staged part is whole

    partition = scoring_flow(killed)  # the rerun scores only the missing shards
    pd.testing.assert_frame_equal(read_scores(partition), threaded)  # every user exactly once, same rows
    for name, mtime in staged.items():
        assert (partition / name).stat().st_mtime_ns == mtime, f"{name} was scored again"
    assert not staging.exists()


# ------------------------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------------------------


def test_default_is_threads_in_process() -> None:
    from prefect.task_runners import ThreadPoolTaskRunner

    p = ScoringParams()
    assert p.task_runner == "threads" and p.dask_address is None
    runner = shard_task_runner(p.model_copy(update={"threads": 3}))
    assert isinstance(runner, ThreadPoolTaskRunner) and runner._max_workers == 3


def test_dask_runner_local_cluster_or_address(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect_dask import DaskTaskRunner

    monkeypatch.delenv("CONVMF_DASK_ADDRESS", raising=False)
    local = shard_task_runner(ScoringParams(task_runner="dask", dask_workers=3, threads_per_worker=2))
    assert isinstance(local, DaskTaskRunner) and local.address is None
    assert local.cluster_kwargs == {"n_workers": 3, "threads_per_worker": 2, "processes": True,
                                    "dashboard_address": None}
    remote = shard_task_runner(ScoringParams(task_runner="dask", dask_address="tcp://10.0.0.5:8786"))
    assert remote.address == "tcp://10.0.0.5:8786" and not remote.cluster_kwargs
    # The address may come from the environment (a work pool's job variables) instead of the parameters.
    monkeypatch.setenv("CONVMF_DASK_ADDRESS", "scheduler.internal:8786")
    assert shard_task_runner(ScoringParams(task_runner="dask")).address == "scheduler.internal:8786"
    assert not isinstance(shard_task_runner(ScoringParams()), DaskTaskRunner)  # the address alone picks no runner
    monkeypatch.setenv("CONVMF_DASK_ADDRESS", "not an address")
    with pytest.raises(ValueError, match="CONVMF_DASK_ADDRESS"):
        ScoringParams(task_runner="dask").resolved_dask_address()


@pytest.mark.parametrize("bad", [
    {"task_runner": "ray"},
    {"task_runner": "dask", "dask_address": "http://scheduler:8786"},
    {"task_runner": "dask", "dask_address": "scheduler"},
    {"task_runner": "dask", "dask_address": "tcp://host:8786; rm -rf /"},
    {"dask_address": "tcp://10.0.0.5:8786"},  # an address with the thread runner: a mistake, not ignored
    {"dask_workers": 0}, {"dask_workers": 257}, {"threads_per_worker": 0}, {"threads": 0}, {"threads": 65},
    {"dask_workers": "two"}, {"unknown_option": 1},
])
def test_scoring_params_reject(bad: dict) -> None:
    with pytest.raises(ValidationError):
        ScoringParams.model_validate(bad)


def test_scoring_params_from_json() -> None:
    """What a deployment or the UI sends: JSON, validated into the same model."""
    p = ScoringParams.model_validate_json('{"task_runner": "dask", "dask_address": "tls://[::1]:8786", '
                                          '"dask_workers": 4}')
    assert p.task_runner == "dask" and p.dask_address == "tls://[::1]:8786" and p.dask_workers == 4
    assert ScoringParams.model_validate(p.model_dump(mode="json")) == p
