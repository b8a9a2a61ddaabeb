"""Prefect task: decide whether this training warm-starts from the registry's champion or refits from scratch.

A warm start (issue 7) keeps the champion's vocabulary (this run's documents are encoded with it), starts the CNN
from its weights and the users and items it knows from their factors. It is refused, with the reason, when:

* it is off (``warm_start.enabled=false``), or no version carries the alias;
* the champion cannot seed this configuration: not a ConvMF, another k, another CNN architecture, no vocabulary;
* under a time-based split, the champion was trained on ratings at or after this run's cutoff (or does not record
  when its training data ends): starting from it would leak this run's validation window into training;
* :func:`convmf_core.models.warm_start.refit_reason` finds the text settings changed, or too many new items, or
  too many out-of-vocabulary words in the new items' descriptions, or the champion already ends a chain of
  ``max_warm_starts`` warm starts (the bundle's ``warm_starts`` metadata; thresholds: ``RefitPolicy``).

The decision goes to the Prefect log, the MLflow tags ``fit_mode`` (``warm`` / ``full``) and ``fit_mode_reason``,
and metrics ``warm_start_oov_share`` / ``warm_start_new_item_share`` when they were computed.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from convmf_core.config import ConvMFConfig, RefitPolicy, TextConfig
from convmf_core.models.convmf import ConvMF
from convmf_core.models.warm_start import oov_share, refit_reason
from convmf_core.persistence import ModelBundle, load_model
from convmf_core.text import Vocabulary
from tasks.ingest import IngestedData
from tasks.tracking import RunRef, with_retries

# What the CNN's weights depend on: a warm start needs the same architecture.
_CNN_SHAPE_FIELDS = ("embedding_dim", "window_sizes", "n_filters", "hidden_dim")


@dataclass(frozen=True)
class WarmStartPlan:
    """``mode='warm'``: start from ``model_name`` version ``version`` (its bundle at ``bundle_dir``, its vocabulary
    kept); ``mode='full'``: a fit from scratch. ``reason`` says why, with the figures."""

    mode: Literal["warm", "full"]
    reason: str
    model_name: str | None = None
    version: str | None = None
    bundle_dir: Path | None = None
    download_dir: Path | None = None
    source_key: str | None = None  # name, version and manifest checksum: part of the checkpoint key
    vocabulary: Vocabulary | None = None

    def describe(self) -> str:
        """``<name> version <v>`` of the model a warm start begins from (or ``a full fit``)."""
        return f"{self.model_name} version {self.version}" if self.mode == "warm" else "a full fit"

    def discard_download(self) -> None:
        """Remove the downloaded bundle (once the fit has read it)."""
        if self.download_dir is not None:
            shutil.rmtree(self.download_dir, ignore_errors=True)


def incompatibility(bundle: ModelBundle, config: ConvMFConfig, text: TextConfig) -> str | None:
    """Why ``bundle`` cannot seed a fit with ``config`` (None when it can)."""
    model = bundle.model
    if not isinstance(model, ConvMF):
        return f"the champion is a {type(model).__name__}, not a ConvMF"
    if bundle.vocabulary is None:
        return "the champion's bundle holds no vocabulary"
    if model.als.n_factors != config.als.n_factors:
        return f"the number of factors changed ({model.als.n_factors} -> {config.als.n_factors})"
    if model.config.encoder != config.encoder:
        return f"the text encoder changed ({model.config.encoder} -> {config.encoder})"
    wants_bias_channel = config.bias_prior and config.als.use_bias and config.als.confidence is None
    if model.bias_channel != wants_bias_channel:
        return f"the text prior's bias channel changed ({model.bias_channel} -> {wants_bias_channel})"
    changed = [f"{name} {getattr(model.config.cnn, name)} -> {getattr(config.cnn, name)}"
               for name in _CNN_SHAPE_FIELDS if getattr(model.config.cnn, name) != getattr(config.cnn, name)]
    if changed:
        return "the CNN architecture changed (" + ", ".join(changed) + ")"
    return None


def leak(metadata: dict, cutoff: int | None) -> str | None:
    """Why starting from a model with bundle ``metadata`` would leak ratings at or after ``cutoff`` into training
    (None when it would not, or when there is no cutoff: a random split)."""
    if cutoff is None:
        return None
    last = metadata.get("train_max_timestamp")
    if last is None:
        return ("the champion does not record when its training ratings end (it was not trained on a time-based "
                "split), so it may have seen this run's validation window")
    if int(last) >= cutoff:
        return (f"the champion was trained on ratings up to {int(last)}, at or after this run's cutoff {cutoff}: "
                "starting from it would leak the validation window into training")
    return None


def _manifest_checksum(bundle_dir: Path) -> str:
    return hashlib.sha256((Path(bundle_dir) / "manifest.json").read_bytes()).hexdigest()[:16]


def new_items(ingested: IngestedData, item_ids: list[str] | set[str], cutoff: int | None) -> tuple[list, int]:
    """The descriptions of the items this run knows (rated before ``cutoff`` under a time split; every item
    otherwise) that are not in ``item_ids`` (the champion's items), and how many items this run knows."""
    from tasks.tokenize import items_known_before  # tasks.tokenize is heavier to import than this module needs

    items = pd.read_parquet(ingested.items_path, columns=["item_id", "text"])
    ids = items["item_id"].astype(str)
    if cutoff is not None:
        items = items[ids.isin(items_known_before(ingested.ratings_path, cutoff)).to_numpy()]
        ids = items["item_id"].astype(str)
    known_before = set(str(i) for i in item_ids)
    fresh = items[~ids.isin(known_before).to_numpy()]
    return fresh["text"].tolist(), len(items)


@task(name="plan-warm-start", cache_policy=NO_CACHE)
def plan_warm_start(ingested: IngestedData, enabled: bool, alias: str, policy: RefitPolicy, text: TextConfig,
                    config: ConvMFConfig, cutoff: int | None, model_name: str, destination: Path,
                    run: RunRef) -> WarmStartPlan:
    """Warm start from ``models:/<model_name>@<alias>`` when it can seed this run, else a full fit; says why."""
    from tasks.register import download_version, use_tracking_uri  # tasks.register imports tasks.train
    from tasks.registry import get_alias_version

    logger = get_run_logger()
    plan = None
    if not enabled:
        plan = WarmStartPlan("full", "full refit: warm start is off (warm_start.enabled=false)")
    else:
        use_tracking_uri(run.tracking_uri)
        found = with_retries(lambda: get_alias_version(model_name, alias), "registry lookup")
        if found is None:
            plan = WarmStartPlan("full", f"full fit: no version of {model_name!r} has the alias {alias!r} yet")
    if plan is None:
        version = str(found.version)
        target = Path(destination)
        bundle_dir, _ = download_version(model_name, version, target)
        bundle = load_model(bundle_dir)
        why = incompatibility(bundle, config, text) or leak(bundle.metadata, cutoff)
        figures: dict[str, float] = {}
        if why is None:
            new_texts, n_items = new_items(ingested, bundle.item_map.to_list(), cutoff)
            figures = {"warm_start_oov_share": oov_share(bundle.vocabulary, new_texts, text),
                       "warm_start_new_item_share": len(new_texts) / n_items if n_items else 0.0}
            why = refit_reason(bundle.vocabulary, new_texts, len(new_texts), n_items, policy, text,
                               warm_starts=int(bundle.metadata.get("warm_starts", 0)))
            detail = (f"{len(new_texts)} new of {n_items} items, "
                      f"{figures['warm_start_oov_share']:.1%} of their words out of vocabulary")
        run.log_metrics(figures)
        if why is not None:
            shutil.rmtree(target, ignore_errors=True)
            plan = WarmStartPlan("full", f"full refit instead of a warm start from {model_name} version {version}: "
                                         f"{why}", model_name, version)
        else:
            plan = WarmStartPlan("warm", f"warm start from {model_name} version {version} (alias {alias}): {detail}",
                                 model_name, version, bundle_dir, target,
                                 f"{model_name}/v{version}/{_manifest_checksum(bundle_dir)}", bundle.vocabulary)
    logger.info("%s", plan.reason)
    run.log_params({"warm_start.enabled": enabled, "warm_start.alias": alias,
                    "warm_start.max_oov_share": policy.max_oov_share,
                    "warm_start.max_new_item_share": policy.max_new_item_share,
                    "warm_start.max_warm_starts": policy.max_warm_starts})
    run.set_tags({"fit_mode": plan.mode, "fit_mode_reason": plan.reason[:5000],
                  **({"warm_start_version": plan.version} if plan.mode == "warm" else {})})
    return plan
