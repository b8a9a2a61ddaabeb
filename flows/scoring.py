"""The batch scoring flow: registry lookup -> top-N for every user in mapped shards -> one Parquet partition."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, unmapped

from flows.params import ScoringParams
from tasks.register import lookup_model
from tasks.score import commit_scores, count_users, partition_name, score_shard, user_shards


@flow(name="convmf-scoring", log_prints=True)
def scoring_flow(params: ScoringParams = ScoringParams()) -> Path:
    """Score every user with ``models:/<model_name>@<alias>`` and write ``scores/<model>/run_date=<date>/``."""
    home = params.storage.home_dir()
    out_dir = home / "scores" / params.model_name
    partition = partition_name(params.resolved_run_date())
    staging = out_dir / "_staging" / partition
    model = lookup_model(params.model_name, params.alias, params.storage.resolved_tracking_uri(), home / "registry-cache")
    shards = user_shards(count_users(model), params.users_per_shard)
    parts = score_shard.map(unmapped(model), shards, range(len(shards)), unmapped(params.n),
                            unmapped(params.block_size), unmapped(staging))
    return commit_scores(parts.result(), staging, out_dir / partition, model, params.n)
