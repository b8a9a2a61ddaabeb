"""The training flow: ingest -> tokenize -> train -> evaluate -> register -> promote."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow

from flows.params import TrainingParams
from tasks.ingest import builtin_catalogue, ingest_files
from tasks.register import promote_model, register_model
from tasks.registry import ModelVersionInfo, PromotionDecision
from tasks.tokenize import tokenize_items
from tasks.tracking import RunRef, end_run, start_run
from tasks.evaluate import evaluate_model
from tasks.train import SplitSpec, TrainedModel, train_convmf


@dataclass(frozen=True)
class TrainingResult:
    """What a training run produced: its MLflow run, model, test metrics, version and promotion decision."""

    run: RunRef
    trained: TrainedModel
    metrics: dict[str, float]
    version: ModelVersionInfo
    decision: PromotionDecision


def input_files(params: TrainingParams):
    """The ratings and items files: the built-in catalogue (generated on first use) or the given paths."""
    data, home = params.data, params.storage.home_dir()
    if data.source == "builtin":
        return builtin_catalogue(data.builtin_users, data.builtin_items, data.builtin_seed, home)
    return data.ratings_path, data.items_path


@flow(name="convmf-training", log_prints=True)
def training_flow(params: TrainingParams = TrainingParams()) -> TrainingResult:
    """Train ConvMF on the configured data, evaluate it, register it, and promote it if it beats the champion."""
    home, storage = params.storage.home_dir(), params.storage
    run = start_run(storage.resolved_tracking_uri(), storage.experiment, storage.artifact_root(), "training",
                    {"model_name": params.model_name})
    try:
        ratings_file, items_file = input_files(params)
        ingested = ingest_files(ratings_file, items_file, params.data.ingest_config(), home, run)
        tokenized = tokenize_items(ingested, params.text.config(), home, run)
        split = SplitSpec(params.split.validation_fraction, params.split.test_fraction,
                          params.split.cold_item_fraction, params.split.seed)
        trained = train_convmf(ingested, tokenized, params.model.config(), split, home, run)
        metrics = evaluate_model(trained, params.eval_n, run)
        version = register_model(trained, metrics, params.model_name, ingested.content_hash, run)
        decision = promote_model(version, trained, run)
    except BaseException:
        end_run(run, "FAILED")  # else the MLflow run would stay RUNNING forever
        raise
    end_run(run)
    return TrainingResult(run, trained, metrics, version, decision)
