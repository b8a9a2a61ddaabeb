"""Prefect tasks around the MLflow model registry: register a trained model, promote it, find the champion.

The registry helpers in :mod:`tasks.registry` use MLflow's process-wide tracking URI; these tasks set it from the
run they work for before calling them (a flow process talks to one tracking server).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tasks.registry import (CHAMPION_ALIAS, ModelVersionInfo, PromotionDecision, get_alias_version,
                            log_model_version, promote)
from tasks.train import TrainedModel
from tasks.tracking import RunRef, with_retries

PROMOTION_METRIC = "validation_rmse"


def use_tracking_uri(uri: str) -> None:
    """Point MLflow's fluent API and registry at ``uri``."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


@task(name="register")
def register_model(trained: TrainedModel, metrics: dict[str, float], model_name: str, data_hash: str,
                   run: RunRef) -> ModelVersionInfo:
    """Log the bundle as a pyfunc (from code, no pickle) in the training run and register a new version."""
    use_tracking_uri(run.tracking_uri)
    tags = {PROMOTION_METRIC: repr(trained.best_validation_rmse), "data_hash": data_hash,
            "test_rmse": repr(metrics.get("rmse", float("nan"))), "device": trained.device}
    info = log_model_version(trained.bundle_dir, model_name=model_name, run_id=run.run_id, tags=tags,
                             seen=pd.read_parquet(trained.seen_path))
    get_run_logger().info("registered %s version %s", model_name, info.version)
    return info


@task(name="promote")
def promote_model(version: ModelVersionInfo, trained: TrainedModel, run: RunRef) -> PromotionDecision:
    """Move ``champion`` to the new version only if its validation RMSE beats the champion's (or there is none);
    otherwise alias it ``challenger``. NaN metrics never win. The reasoning goes to a markdown artifact."""
    use_tracking_uri(run.tracking_uri)
    value = trained.best_validation_rmse
    decision = promote(version.name, version.version, PROMOTION_METRIC, value if math.isfinite(value) else float("nan"))
    get_run_logger().info("promotion of %s v%s: %s", version.name, version.version, decision.reason)
    run.set_tags({"promotion": "champion" if decision.promoted else "challenger", "promotion_reason": decision.reason})
    create_markdown_artifact(decision.markdown, key="promotion", description="Champion/challenger decision")
    return decision


@dataclass(frozen=True)
class ChampionModel:
    """A registry version downloaded for scoring: the bundle directory and the training pairs to exclude."""

    name: str
    version: str
    bundle_dir: Path
    seen_path: Path | None


@task(name="lookup-model")
def lookup_model(model_name: str, alias: str, tracking_uri: str, destination: Path) -> ChampionModel:
    """Resolve ``models:/<name>@<alias>`` and download its bundle (and seen pairs) to ``destination``."""
    use_tracking_uri(tracking_uri)
    found = with_retries(lambda: get_alias_version(model_name, alias), "registry lookup")
    if found is None:
        raise LookupError(f"no model version of {model_name!r} has the alias {alias!r}: run the training flow first "
                          f"(it sets '{CHAMPION_ALIAS}')")
    target = Path(destination) / f"{model_name}-v{found.version}"
    artifacts = with_retries(lambda: mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{model_name}/{found.version}", dst_path=str(target)), "download model")
    root = Path(artifacts)
    bundle = next(p.parent for p in root.rglob("manifest.json"))
    seen = next(iter(root.rglob("seen.parquet")), None)
    get_run_logger().info("scoring with %s version %s (alias %s)", model_name, found.version, alias)
    return ChampionModel(model_name, str(found.version), bundle, seen)
