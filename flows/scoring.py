"""The batch scoring flow: registry lookup -> top-N for every user in mapped shards -> one Parquet partition.

The shards run on the task runner the parameters choose (``ScoringParams.task_runner``): threads in the flow's
process by default, or a Dask cluster (a temporary local one, or an existing scheduler's address). A flow's task
runner is fixed when the flow is defined, so the mapped shards live in a small subflow, ``score_shards``, that
``scoring_flow`` runs with ``with_options(task_runner=...)``; the result is the same Parquet rows either way.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, unmapped
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.params import ScoringParams, ShardRunnerParams
from tasks.register import ChampionModel, lookup_model
from tasks.score import (commit_scores, count_users, index_seen, open_staging, partition_name, score_shard,
                         user_shards)


def shard_task_runner(params: ShardRunnerParams) -> TaskRunner:
    """The task runner ``params`` ask for, scoring's or tokenization's (a fresh, unstarted one: the subflow starts
    and stops it)."""
    if params.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=params.threads)
    from prefect_dask import DaskTaskRunner  # imported only when asked for: dask is heavy to import

    address = params.resolved_dask_address()
    if address is not None:
        return DaskTaskRunner(address=address)
    # Worker processes, not threads: a shard's numpy/pandas work holds the GIL. Dask starts each worker with
    # OMP_NUM_THREADS=1, so torch uses one core per running shard. No dashboard (and no fixed port to collide on).
    return DaskTaskRunner(cluster_kwargs={"n_workers": params.dask_workers,
                                          "threads_per_worker": params.threads_per_worker,
                                          "processes": True, "dashboard_address": None})


@flow(name="convmf-score-shards")
def score_shards(model: ChampionModel, shards: list[tuple[int, int]], n: int, block_size: int, staging: Path,
                 seen: Path | None) -> list[Path]:
    """Score every shard to its staged part, in parallel on this flow's task runner."""
    parts = score_shard.map(unmapped(model), shards, range(len(shards)), unmapped(n), unmapped(block_size),
                            unmapped(staging), unmapped(seen))
    return parts.result()


@flow(name="convmf-scoring", log_prints=True)
def scoring_flow(params: ScoringParams = ScoringParams()) -> Path:
    """Score every user with ``models:/<model_name>@<alias>`` and write ``scores/<model>/run_date=<date>/``."""
    home = params.storage.home_dir()
    out_dir = home / "scores" / params.model_name
    partition = partition_name(params.resolved_run_date())
    model = lookup_model(params.model_name, params.alias, params.storage.resolved_tracking_uri(), home / "registry-cache")
    shards = user_shards(count_users(model), params.users_per_shard)
    # Keeps the parts of an interrupted run of the same plan; clears anything else (stale parts never get committed).
    staging = open_staging(out_dir / "_staging" / partition, model, shards, params.n)
    seen = index_seen(model, params.users_per_shard, staging)
    score_all = score_shards.with_options(task_runner=shard_task_runner(params))
    parts = score_all(model, shards, params.n, params.block_size, staging, seen)
    return commit_scores(parts, staging, out_dir / partition, model, params.n)
