"""Prefect tasks around the MLflow model registry: register a trained model, promote it, find the champion.

The registry helpers in :mod:`tasks.registry` use MLflow's process-wide tracking URI; these tasks set it from the
run they work for before calling them (a flow process talks to one tracking server).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.entities.model_registry import ModelVersion
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from convmf_core.persistence import load_model
from tasks.registry import (CHAMPION_ALIAS, ModelVersionInfo, PromotionDecision, bundle_rmse, get_alias_version,
                            log_model_version, promote)
from tasks.train import TrainedModel, read_split
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


@dataclass(frozen=True)
class ValidationSet:
    """A run's validation ratings by raw id (so another model's id maps can read them) and the training mean."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    ratings: np.ndarray
    global_mean: float  # mean training rating: the global-mean predictor's constant

    def baseline_rmse(self) -> float:
        """RMSE of predicting the training mean for every validation rating."""
        if len(self.ratings) == 0:
            return float("nan")
        return float(np.sqrt(np.mean((self.ratings.astype(np.float64) - self.global_mean) ** 2)))


def validation_set(trained: TrainedModel) -> ValidationSet:
    """This run's validation split (dense indices of its id maps) as raw ids, with the training mean."""
    bundle = load_model(trained.bundle_dir)
    split, _ = read_split(trained.split_dir, bundle.model.n_users, bundle.model.n_items)
    v, train = split.validation, split.train
    return ValidationSet(bundle.user_map.to_raw(v.users), bundle.item_map.to_raw(v.items),
                         np.asarray(v.values, dtype=np.float64), float(np.mean(np.asarray(train.values, np.float64))))


def model_problems(bundle_dir: Path, validation: ValidationSet) -> list[str]:
    """Why a bundle must never be champion: non-finite factors, biases or offset, or non-finite predictions on the
    validation split (empty when none)."""
    factors = load_model(bundle_dir).model.scoring_factors()
    problems = [f"the model's {name} factors hold NaN or infinite values"
                for name, tensor in (("user", factors.user), ("item", factors.item))
                if not bool(torch.isfinite(tensor).all())]
    if not math.isfinite(float(factors.offset)):
        problems.append(f"the model's global offset is {factors.offset}")
    if not problems and len(validation.ratings):
        rmse = bundle_rmse(bundle_dir, validation.user_ids, validation.item_ids, validation.ratings)
        if not math.isfinite(rmse):
            problems.append(f"its predictions on the validation split give RMSE {rmse}")
    return problems


def download_version(model_name: str, version: str, destination: Path) -> tuple[Path, Path | None]:
    """Download registry version ``version``'s bundle (and seen pairs) under ``destination``."""
    target = Path(destination) / f"{model_name}-v{version}"
    artifacts = with_retries(lambda: mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{model_name}/{version}", dst_path=str(target)), "download model")
    root = Path(artifacts)
    bundle = next(p.parent for p in root.rglob("manifest.json"))
    return bundle, next(iter(root.rglob("seen.parquet")), None)


def champion_evaluator(model_name: str, validation: ValidationSet,
                       destination: Path) -> Callable[[ModelVersion], float]:
    """``champion_metric`` for :func:`tasks.registry.promote`: downloads a version's bundle and computes its RMSE on
    ``validation`` (ids it does not know are predicted with its fallback, as the served model does)."""

    def evaluate(found: ModelVersion) -> float:
        bundle, _ = download_version(model_name, str(found.version), destination)
        return bundle_rmse(bundle, validation.user_ids, validation.item_ids, validation.ratings)

    return evaluate


@task(name="promote")
def promote_model(version: ModelVersionInfo, trained: TrainedModel, run: RunRef) -> PromotionDecision:
    """Move ``champion`` to the new version only if its validation RMSE beats the champion's evaluated on this
    run's validation split (like with like), and beats the global-mean predictor on the same split; otherwise
    alias it ``challenger``. NaN/inf metrics, factors or predictions never win. The record (both figures, the
    baseline, time, run, previous version, reason) goes to model-version tags and a markdown artifact."""
    use_tracking_uri(run.tracking_uri)
    logger = get_run_logger()
    value = trained.best_validation_rmse
    validation = validation_set(trained)
    baseline = validation.baseline_rmse()
    problems = model_problems(trained.bundle_dir, validation)
    downloads = trained.split_dir.parent / "champion"
    try:
        decision = promote(version.name, version.version, PROMOTION_METRIC,
                           value if math.isfinite(value) else float("nan"),
                           champion_metric=champion_evaluator(version.name, validation, downloads),
                           baseline_value=baseline, problems=problems, run_id=run.run_id)
    finally:
        shutil.rmtree(downloads, ignore_errors=True)
    logger.info("promotion of %s v%s: %s", version.name, version.version, decision.reason)
    run.log_metrics({"global_mean_validation_rmse": baseline,
                     "champion_validation_rmse_on_this_split": decision.champion_value
                     if decision.champion_value_source == "this run's validation split" else None})
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
    bundle, seen = download_version(model_name, str(found.version), destination)
    get_run_logger().info("scoring with %s version %s (alias %s)", model_name, found.version, alias)
    return ChampionModel(model_name, str(found.version), bundle, seen)
