"""The training flow: ingest -> split -> warm start or full fit -> tokenize -> train -> evaluate -> register ->
promote.

Run directly (``retrain``, ``convmf train``) it defaults to the paper's random split and a full fit; the nightly
flow passes its own defaults (a time-based split and a warm start from the champion): see
:class:`flows.params.FlowDefaults`. Tokenization is mapped over shards of items on the task runner of
``params.tokenize`` (threads by default, Dask optional), like scoring's shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger, unmapped

from convmf_core.config import TextConfig
from flows.params import RETRAIN_DEFAULTS, SplitParams, TokenizeParams, TrainingParams
from flows.scoring import shard_task_runner
from tasks.guards import check_data_gate, config_hash, find_identical_version, tag_config_hash
from tasks.ingest import IngestedData, builtin_catalogue, ingest_files
from tasks.register import promote_model, register_model
from tasks.registry import ModelVersionInfo, PromotionDecision
from tasks.tokenize import (TokenizedData, VocabularySource, count_terms_shard, encode_shard, item_shards,
                            log_tokenized, merge_vocabulary, read_descriptions, tokenize_cache, write_tokens)
from tasks.tracking import RunRef, end_run, start_run
from tasks.evaluate import evaluate_model, look_at_lists
from tasks.train import SplitSpec, TrainedModel, resolve_split, train_convmf
from tasks.warm_start import WarmStartPlan, plan_warm_start


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


def split_spec(split: SplitParams) -> SplitSpec:
    """The task-level split specification of the (resolved) split parameters."""
    return SplitSpec(split.validation_fraction, split.test_fraction, split.cold_item_fraction, split.seed,
                     kind=split.kind or "random", validation_seconds=split.validation_seconds(),
                     test_seconds=split.test_seconds(), cutoff=split.cutoff_seconds())


def vocabulary_source(split: SplitSpec, warm: WarmStartPlan) -> VocabularySource:
    """The champion's vocabulary for a warm start; otherwise one built from what is known before the cutoff (a
    time-based split) or from every item (the paper's random split)."""
    if warm.mode == "warm":
        return VocabularySource(given=warm.vocabulary, given_from=warm.describe())
    return VocabularySource(known_before=split.cutoff if split.kind == "time" else None)


def tokenize_mapped(ingested: IngestedData, text: TextConfig, source: VocabularySource, items_per_shard: int,
                    cache: TokenizedData) -> TokenizedData:
    """Count the terms of the vocabulary's corpus and encode every description, shard by shard on the running
    flow's task runner; the merge keeps the shards' order (the result is the single-process one)."""
    item_ids, texts, corpus = read_descriptions(ingested, source)
    # Object arrays, not lists: Prefect walks list arguments element by element (about 1 s per 200k strings, several
    # times per task), and leaves arrays alone.
    texts, item_ids = np.asarray(texts, dtype=object), np.asarray(item_ids, dtype=object)
    vocabulary = source.given
    if vocabulary is None:
        corpus_texts = [texts[corpus[a:b]] for a, b in item_shards(len(corpus), items_per_shard)]
        vocabulary = merge_vocabulary(count_terms_shard.map(corpus_texts, unmapped(text)).result(), text)
    shards = [texts[a:b] for a, b in item_shards(len(texts), items_per_shard)]
    parts = encode_shard.map(shards, unmapped(vocabulary), unmapped(text.max_length)).result()
    return write_tokens(cache, item_ids, source, len(corpus), vocabulary, parts)


@flow(name="convmf-tokenize-shards", validate_parameters=False)
def tokenize_shards(ingested: IngestedData, text: TextConfig, source: VocabularySource, items_per_shard: int,
                    cache: TokenizedData) -> TokenizedData:
    """:func:`tokenize_mapped` as a subflow, so that its shards run on the task runner it is given."""
    return tokenize_mapped(ingested, text, source, items_per_shard, cache)


def tokenize_catalogue(ingested: IngestedData, text: TextConfig, source: VocabularySource, runner: TokenizeParams,
                       home: Path, run: RunRef) -> TokenizedData:
    """The vocabulary and encoded documents: from the cache when this catalogue, these text settings and this
    vocabulary source were tokenized before, else by :func:`tokenize_shards` on ``runner``'s task runner (a
    catalogue of one shard is tokenized in this flow: no subflow, no cluster)."""
    cache = tokenize_cache(ingested, text, source, home)
    if not cache.cache_hit:
        if ingested.counts["items"]["rows_accepted"] <= runner.items_per_shard:
            cache = tokenize_mapped(ingested, text, source, runner.items_per_shard, cache)
        else:
            shards = tokenize_shards.with_options(task_runner=shard_task_runner(runner))
            cache = shards(ingested, text, source, runner.items_per_shard, cache)
    return log_tokenized(cache, text, source, run)


@flow(name="convmf-training", log_prints=True)
def training_flow(params: TrainingParams = TrainingParams()) -> TrainingResult:
    """Train ConvMF on the configured data, evaluate it, register it, and promote it if it beats the champion.

    Before training: a version already registered from the same data and configuration ends the run as a no-op
    (idempotent reruns), and the sanity gate stops a run whose input collapsed (``DataGateError``; the MLflow run
    ends FAILED with the tag ``gate_reason``, the champion stays) unless ``params.override_gate``. Parameters left
    null take ``retrain``'s defaults (random split, full fit) unless the caller resolved them (the nightly flow).
    """
    params = params.with_defaults(RETRAIN_DEFAULTS)
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
        split = resolve_split(ingested.ratings_path, split_spec(params.split), ingested.counts["ratings"]["file"])
        text, model = params.text.config(), params.model.config()
        warm = plan_warm_start(ingested, params.warm_start.enabled, params.warm_start.alias,
                               params.warm_start.policy(), text, model,
                               split.cutoff if split.kind == "time" else None, params.model_name,
                               home / "models" / run.run_id / "warm-start", run)
        tokenized = tokenize_catalogue(ingested, text, vocabulary_source(split, warm), params.tokenize, home, run)
        trained = train_convmf(ingested, tokenized, model, split, home, run, warm)
        metrics = evaluate_model(trained, params.eval_n, run, tokenized)
        version = register_model(trained, metrics, params.model_name, ingested.content_hash, run)
        tag_config_hash(version, digest, run)  # what a rerun of this data and configuration looks for
        gate = params.gate_policy()
        decision = promote_model(version, trained, run, gate)
        look_at_lists(trained, ingested, run, params.model_name, gate.metric)
    except BaseException:
        end_run(run, "FAILED")  # else the MLflow run would stay RUNNING forever
        raise
    end_run(run)
    return TrainingResult(run, trained, metrics, version, decision)
