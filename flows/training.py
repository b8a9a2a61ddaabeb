"""The training flow: ingest -> tokenize -> train -> evaluate -> register -> promote."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import flow, get_run_logger

from flows.params import TrainingParams
from tasks.guards import check_data_gate, config_hash, find_identical_version, tag_config_hash
from tasks.ingest import builtin_catalogue, ingest_files
from tasks.register import promote_model, register_model
from tasks.registry import ModelVersionInfo, PromotionDecision
from tasks.tokenize import tokenize_items
from tasks.tracking import RunRef, end_run, start_run
from tasks.evaluate import evaluate_model
from tasks.train import SplitSpec, TrainedModel, train_convmf


@dataclass(frozen=True)
class TrainingResult:
    """What a training run produced: its MLflow run, model, test metrics, version and promotion decision.

    A rerun on the data and configuration of an already registered version trains nothing: ``skipped`` says so,
    ``version`` is that existing version, and ``trained`` and ``decision`` are ``None``.
    """

    run: RunRef
    trained: TrainedModel | None
    metrics: dict[str, float]
    version: ModelVersionInfo
    decision: PromotionDecision | None
    skipped: str | None = None


def input_files(params: TrainingParams):
    """The ratings and items files: the built-in catalogue (generated on first use) or the given paths."""
    data, home = params.data, params.storage.home_dir()
    if data.source == "builtin":
        return builtin_catalogue(data.builtin_users, data.builtin_items, data.builtin_seed, home)
    return data.ratings_path, data.items_path


@flow(name="convmf-training", log_prints=True)
def training_flow(params: TrainingParams = TrainingParams()) -> TrainingResult:
    """Train ConvMF on the configured data, evaluate it, register it, and promote it if it beats the champion.

    Before training: a version already registered from the same data and configuration ends the run as a no-op
    (idempotent reruns), and the sanity gate stops a run whose input collapsed (``DataGateError``; the MLflow run
    ends FAILED with the tag ``gate_reason``, the champion stays) unless ``params.override_gate``.
    """
    home, storage = params.storage.home_dir(), params.storage
    digest = config_hash(params)
    run = start_run(storage.resolved_tracking_uri(), storage.experiment, storage.artifact_root(), "training",
                    {"model_name": params.model_name, "config_hash": digest})
    try:
        ratings_file, items_file = input_files(params)
        ingested = ingest_files(ratings_file, items_file, params.data.ingest_config(), home, run)
        existing = find_identical_version(params.model_name, ingested.content_hash, digest, run)
        if existing is not None:
            message = f"identical data and configuration as version {existing.version}: skipped"
            get_run_logger().info("%s (data %s, configuration %s): nothing trained, registered or promoted",
                                  message, ingested.content_hash[:12], digest[:12])
            run.set_tags({"skipped": message, "skipped_identical_version": existing.version})
            end_run(run)
            return TrainingResult(run, None, {}, existing, None, skipped=message)
        check_data_gate(ingested.counts, params.model_name, params.gate_max_ratings_drop,
                        params.gate_max_quarantine_share, params.override_gate, run)
        tokenized = tokenize_items(ingested, params.text.config(), home, run)
        split = SplitSpec(params.split.validation_fraction, params.split.test_fraction,
                          params.split.cold_item_fraction, params.split.seed)
        trained = train_convmf(ingested, tokenized, params.model.config(), split, home, run)
        metrics = evaluate_model(trained, params.eval_n, run)
        version = register_model(trained, metrics, params.model_name, ingested.content_hash, run)
        tag_config_hash(version, digest, run)  # what a rerun of this data and configuration looks for
        decision = promote_model(version, trained, run)
    except BaseException:
        end_run(run, "FAILED")  # else the MLflow run would stay RUNNING forever
        raise
    end_run(run)
    return TrainingResult(run, trained, metrics, version, decision)
