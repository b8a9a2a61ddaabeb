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
from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from convmf_core.data import Ratings, Split
from convmf_core.metrics import GatePolicy, cold_items_of, evaluate, higher_is_better
from convmf_core.models.base import Recommender, ScoringFactors
from convmf_core.persistence import ModelBundle, load_model, read_manifest
from tasks.registry import (CHAMPION_ALIAS, ModelVersionInfo, PromotionDecision, alias_move_markdown, alias_moves,
                            bundle_rmse, get_alias_version, log_model_version, promote, rollback_champion)
from tasks.train import TrainedModel, read_split
from tasks.tracking import RunRef, mlflow_key, with_retries

PROMOTION_METRIC = "validation_rmse"


def use_tracking_uri(uri: str) -> None:
    """Point MLflow's fluent API and registry at ``uri``."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


@task(name="register")
def register_model(trained: TrainedModel, metrics: dict[str, float], model_name: str, data_hash: str,
                   run: RunRef) -> ModelVersionInfo:
    """Log the bundle as a pyfunc (from code, no pickle) in the training run and register a new version (tagged
    with its validation and test RMSE, data, device, text encoder and any fallback to a simpler model)."""
    use_tracking_uri(run.tracking_uri)
    facts = read_manifest(trained.bundle_dir).get("metadata", {})
    tags = {PROMOTION_METRIC: repr(trained.best_validation_rmse), "data_hash": data_hash,
            "test_rmse": repr(metrics.get("rmse", float("nan"))), "device": trained.device,
            **{key: str(facts[key]) for key in ("encoder", "fallback") if facts.get(key)}}
    seen = pd.read_parquet(trained.seen_path)
    # Retried on transient failures (server down, database locked); a retry after a registration that reached the
    # server finds that version (by run id) instead of registering a second one.
    info = with_retries(lambda: log_model_version(trained.bundle_dir, model_name=model_name, run_id=run.run_id,
                                                  tags=tags, seen=seen), "model registration")
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


def _load_trained(trained: TrainedModel) -> tuple[ModelBundle, Split]:
    """The run's bundle and its split (read once per promotion)."""
    bundle = load_model(trained.bundle_dir)
    split, _ = read_split(trained.split_dir, bundle.model.n_users, bundle.model.n_items)
    return bundle, split


def validation_set(trained: TrainedModel) -> ValidationSet:
    """This run's validation split (dense indices of its id maps) as raw ids, with the training mean."""
    return _validation_of(*_load_trained(trained))


def _validation_of(bundle: ModelBundle, split: Split) -> ValidationSet:
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


class _FixedFactors(Recommender):
    """A fitted model given as its :class:`ScoringFactors` (predict / recommend of the shared model API)."""

    def __init__(self, factors: ScoringFactors) -> None:
        self._factors = factors

    def fit(self, train: Ratings, validation: Ratings | None = None, *, callback=None) -> "_FixedFactors":
        """Not trainable: it only scores."""
        raise NotImplementedError("a re-indexed model scores only")

    def scoring_factors(self) -> ScoringFactors:
        """The factors it was built from."""
        return self._factors


def reindexed_model(bundle: ModelBundle, user_ids: np.ndarray, item_ids: np.ndarray) -> Recommender:
    """``bundle``'s model in another run's index space: row ``u`` scores raw user ``user_ids[u]`` and column ``j``
    raw item ``item_ids[j]``. Ids the bundle never saw get its average user / item row (global mean plus average
    biases and factors), exactly as the served pyfunc scores them, so another run's metrics apply unchanged."""
    f = bundle.model.scoring_factors()
    users = torch.cat([f.user, f.user.mean(dim=0, keepdim=True)])
    items = torch.cat([f.item, f.item.mean(dim=0, keepdim=True)])
    u = bundle.user_map.to_index(np.asarray(user_ids), unknown="minus_one")
    i = bundle.item_map.to_index(np.asarray(item_ids), unknown="minus_one")
    u[u < 0] = len(f.user)
    i[i < 0] = len(f.item)
    return _FixedFactors(ScoringFactors(users[torch.as_tensor(u)], items[torch.as_tensor(i)], f.offset, f.clip))


def gate_figures(model: Recommender, split: Split, policy: GatePolicy) -> dict[str, float]:
    """The figures of :meth:`GatePolicy.figure_keys` of ``model`` on ``split.validation`` (lists exclude each
    user's training items; the cold slice is the items with no training rating, ranked among themselves)."""
    cold = cold_items_of(split.train)
    measured = evaluate(model, split.train, split.validation, n=policy.n, cold_items=cold)
    return {key: float(measured[key]) for key in policy.figure_keys()}


def champion_figures_evaluator(model_name: str, mine: ModelBundle, split: Split, policy: GatePolicy,
                               destination: Path) -> Callable[[ModelVersion], dict[str, float]]:
    """``champion_metric`` for :func:`tasks.registry.promote` with a gate policy: downloads a version's bundle and
    measures it on this run's validation ``split``, in the index space of this run's bundle ``mine``
    (:func:`reindexed_model`)."""

    def measure(found: ModelVersion) -> dict[str, float]:
        bundle_dir, _ = download_version(model_name, str(found.version), destination)
        champion = reindexed_model(load_model(bundle_dir), mine.user_map.raw_ids, mine.item_map.raw_ids)
        return gate_figures(champion, split, policy)

    return measure


@task(name="promote")
def promote_model(version: ModelVersionInfo, trained: TrainedModel, run: RunRef,
                  policy: GatePolicy = GatePolicy()) -> PromotionDecision:
    """Move ``champion`` to the new version only if it beats the champion on ``policy.metric`` (RMSE or NDCG@N),
    both measured on this run's validation split (like with like), without regressing beyond the policy's
    tolerances on the other metric or on the cold-item slice, and beats the global-mean predictor's RMSE on the
    same split; otherwise alias it ``challenger``. NaN/inf metrics, factors or predictions never win. The record
    (both models' figures, the baseline, time, run, previous version, reason) goes to model-version tags, the
    ``promotion`` markdown artifact and the run's ``promotion/decision.md``."""
    use_tracking_uri(run.tracking_uri)
    logger = get_run_logger()
    mine, split = _load_trained(trained)
    validation = _validation_of(mine, split)
    baseline = validation.baseline_rmse()
    problems = model_problems(trained.bundle_dir, validation)
    figures = gate_figures(mine.model, split, policy)  # the challenger's own figures
    value = figures[policy.metric]
    downloads = trained.split_dir.parent / "champion"
    try:
        decision = promote(version.name, version.version, f"validation_{mlflow_key(policy.metric)}",
                           value if math.isfinite(value) else float("nan"),
                           higher_is_better=higher_is_better(policy.metric),
                           champion_metric=champion_figures_evaluator(version.name, mine, split, policy, downloads),
                           baseline_value=baseline, problems=problems, run_id=run.run_id, policy=policy,
                           candidate_figures=figures)
    finally:
        shutil.rmtree(downloads, ignore_errors=True)
    logger.info("promotion of %s v%s (gate %s): %s", version.name, version.version, policy.metric, decision.reason)
    reevaluated = decision.champion_value_source == "this run's validation split"
    champion = decision.champion_figures or {}
    run.log_metrics({"global_mean_validation_rmse": baseline,
                     "champion_validation_rmse_on_this_split": champion.get("rmse") if reevaluated else None,
                     **{f"gate_candidate_{k}": v for k, v in figures.items()},
                     **{f"gate_champion_{k}": v for k, v in champion.items()}})
    run.set_tags({"promotion": "champion" if decision.promoted else "challenger", "promotion_reason": decision.reason,
                  "gate_metric": policy.metric})
    run.log_text(decision.markdown, "promotion/decision.md")
    create_markdown_artifact(decision.markdown, key="promotion", description="Champion/challenger decision")
    moves = alias_moves(decision.promoted, decision.candidate_version, decision.previous_version)
    create_markdown_artifact(alias_move_markdown(version.name, moves, decision.time, decision.reason),
                             key="alias-move", description=f"Alias moves of {version.name}")  # every move, one key
    return decision


@dataclass(frozen=True)
class AliasMove:
    """A recorded alias move: which alias, from and to which version, when, and the markdown record."""

    model_name: str
    alias: str
    from_version: str
    to_version: str
    time: str
    markdown: str


@task(name="rollback")
def rollback_model(model_name: str, tracking_uri: str) -> AliasMove:
    """``convmf rollback``: point ``champion`` back at the version it replaced (:func:`rollback_champion`), and
    record the move in the ``alias-move`` markdown artifact and as ``promotion/rollback-<time>.md`` in the MLflow
    runs of both versions."""
    use_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    current = get_alias_version(model_name, CHAMPION_ALIAS)
    from_version = None if current is None else str(current.version)
    to_version = rollback_champion(model_name)
    when = client.get_model_version(model_name, to_version).tags.get("promotion.restored_time", "")
    reason = f"`convmf rollback`: version {from_version} rolled back to the champion it replaced"
    markdown = "\n".join([f"### Model `{model_name}`: champion rolled back to version {to_version}", "",
                           alias_move_markdown(model_name, [(CHAMPION_ALIAS, to_version, from_version)], when, reason),
                           "", f"Version {from_version} is tagged `promotion.decision = rolled_back`; version "
                           f"{to_version} `promotion.restored_from = {from_version}`."])
    for version in (from_version, to_version):
        run_id = client.get_model_version(model_name, version).run_id
        if run_id:
            stamp = when.replace(":", "").replace("+", "Z")
            with_retries(lambda: client.log_text(run_id, markdown, f"promotion/rollback-{stamp}.md"), "log text")
    create_markdown_artifact(markdown, key="alias-move", description=f"Alias move of {model_name}")
    return AliasMove(model_name, CHAMPION_ALIAS, from_version or "", to_version, when, markdown)


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
