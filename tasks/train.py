"""Prefect tasks: resolve and apply the split (the paper's random one, or time-based), fit ConvMF (CUDA when present,
CPU otherwise; from scratch or warm-started from the champion), save the model bundle.

Per-iteration figures go to MLflow (``step=`` the outer iteration) and to the Prefect log as they happen, and so do
the Gibbs sweeps of posterior averaging (``gibbs_*`` metrics, their steps continuing after the ALS iterations). At
the end: the learning curve (an image artifact), the text prior's held-out R^2, the word vectors' coverage, the
posterior samples' cost and any fallback to a simpler model (metrics, tags and the bundle's metadata).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import get_run_logger, task

from convmf_core.config import ConvMFConfig, config_to_dict
from convmf_core.data import (DAY_SECONDS, DataError, IdMap, Ratings, Split, cold_item_split, default_time_cutoff,
                              random_split, ratings_from_frame, time_split)
from convmf_core.ingest import write_parquet_atomic
from convmf_core.models.als_mf import load_checkpoint
from convmf_core.models.base import IterationReport, ModelFitError, resolve_device
from convmf_core.models.convmf import ConvMF
from convmf_core.models.warm_start import warm_start_from
from convmf_core.persistence import load_model, save_model
from convmf_core.vectors import VectorCoverage
from tasks.ingest import IngestedData
from tasks.tokenize import TokenizedData
from tasks.tracking import RunRef, with_retries
from tasks.warm_start import WarmStartPlan

GIBBS_LOG_EVERY = 25  # posterior-averaging sweeps between two log lines (MLflow gets every sweep)


@dataclass(frozen=True)
class SplitSpec:
    """How the ratings are split. ``kind='random'``: the paper's random 80/10/10 (fractions, seed), optionally with a
    share of cold items held out. ``kind='time'``: train before ``cutoff`` (Unix seconds; ``None`` until
    :func:`resolve_split` fixes it from the data), validate on the ``validation_seconds`` after it, test on the
    ``test_seconds`` after that."""

    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    cold_item_fraction: float = 0.0
    seed: int = 0
    kind: str = "random"
    validation_seconds: int = 7 * DAY_SECONDS
    test_seconds: int = 7 * DAY_SECONDS
    cutoff: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("random", "time"):
            raise ValueError(f"split kind must be 'random' or 'time', not {self.kind!r}")


@dataclass(frozen=True)
class TrainedModel:
    """Where a fitted model and its split live, and its headline figures."""

    bundle_dir: Path
    split_dir: Path
    seen_path: Path
    best_validation_rmse: float
    best_iteration: int
    iterations: int
    fit_seconds: float
    device: str


def checkpoint_key(data_hash: str, tokenize_key: str, config: ConvMFConfig, split: SplitSpec,
                   device: str, warm_from: str | None = None) -> str:
    """sha256 of everything that determines the fitted model: the data, the tokenization, the model configuration
    (with the device it resolved to), the split (with its resolved cutoff) and the model a warm start begins from.
    A rerun of the same training finds the same checkpoint."""
    spec = {"data_hash": data_hash, "tokenize_key": tokenize_key, "config": config_to_dict(config),
            "device": device, "split": asdict(split)}
    if warm_from is not None:
        spec["warm_from"] = warm_from
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def checkpoint_path_for(home: Path, key: str) -> Path:
    """Where the training checkpoint of :func:`checkpoint_key` ``key`` lives (shared by every run of that key)."""
    return Path(home) / "checkpoints" / f"{key}.pt"


def checkpoint_iteration(path: Path) -> int | None:
    """The last completed iteration in a usable checkpoint at ``path`` (``None``: absent or unreadable, and an
    unreadable one is removed so that training starts afresh)."""
    if not path.is_file():
        return None
    try:
        return int(load_checkpoint(path)["iteration"])
    except (ModelFitError, KeyError, ValueError):
        path.unlink(missing_ok=True)
        return None


def close_interrupted_run(checkpoint: Path, run: RunRef) -> str | None:
    """Record ``run`` as the owner of ``checkpoint`` (a JSON file beside it); when another run owned it - a run
    that was killed, since a finished one deletes its checkpoint - mark that run FAILED (if still RUNNING) and tag
    it ``resumed_by_run``, so that a reader never takes it for one in progress. Returns the previous owner's id."""
    owner = checkpoint.with_suffix(".owner.json")
    previous = None
    if owner.is_file():
        try:
            previous = json.loads(owner.read_text()).get("mlflow_run_id")
        except (OSError, ValueError, AttributeError):
            previous = None
    if previous and previous != run.run_id:
        try:
            client = run.client()
            if with_retries(lambda: client.get_run(previous).info.status, "get run") == "RUNNING":
                with_retries(lambda: client.set_tag(previous, "resumed_by_run", run.run_id), "set tag")
                with_retries(lambda: client.set_terminated(previous, status="FAILED"), "end run")
        except Exception:  # noqa: BLE001 - a run of another store or a deleted one: nothing to close
            pass
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    tmp = owner.with_name(f".{owner.name}.tmp")
    tmp.write_text(json.dumps({"mlflow_run_id": run.run_id}))
    tmp.replace(owner)
    return previous if previous != run.run_id else None


def rating_timestamps(ratings_path: Path, source: str | None = None, frame: pd.DataFrame | None = None
                      ) -> np.ndarray:
    """Every rating's timestamp (Unix seconds, in file order), for a time-based split; a :class:`DataError` naming
    ``source`` (the original file) and the first rows when some rating has none. ``frame``: the ratings of
    ``ratings_path`` already read (the file is not read again)."""
    ts = (pd.read_parquet(ratings_path, columns=["timestamp"]) if frame is None else frame)["timestamp"]
    missing = np.flatnonzero(ts.isna().to_numpy())
    if missing.size:
        raise DataError(f"{source or ratings_path}: {missing.size} of {len(ts)} rating(s) have no timestamp (e.g. "
                        f"accepted row(s) {(missing[:5] + 1).tolist()}); a time-based split needs one on every "
                        "rating: add them, or use split.kind='random'")
    return ts.to_numpy(dtype=np.int64)


@task(name="resolve-split")
def resolve_split(ratings_path: Path, spec: SplitSpec, source: str | None = None) -> SplitSpec:
    """``spec`` with its cutoff fixed: for a time-based split without one, the newest rating's time minus both
    windows (:func:`convmf_core.data.default_time_cutoff`). The tokenizer and the checkpoint key need it before
    training starts."""
    if spec.kind != "time":
        return spec
    cutoff = spec.cutoff
    if cutoff is None:
        cutoff = default_time_cutoff(rating_timestamps(ratings_path, source),
                                     validation_seconds=spec.validation_seconds, test_seconds=spec.test_seconds)
    resolved = replace(spec, cutoff=int(cutoff))
    get_run_logger().info("time-based split: train before %s, validate until %s, test until %s (UTC)",
                          *(_utc(resolved.cutoff + s) for s in (0, spec.validation_seconds,
                                                                 spec.validation_seconds + spec.test_seconds)))
    return resolved


def _utc(seconds: int) -> str:
    return pd.Timestamp(seconds, unit="s", tz="UTC").isoformat()


def split_ratings(ratings: Ratings, spec: SplitSpec, timestamps: np.ndarray | None = None) -> tuple[Split, np.ndarray]:
    """The split and the cold items (items with validation or test ratings but no training rating: under a time
    split, items first rated after the cutoff; for the paper's split, none unless ``cold_item_fraction``)."""
    if spec.kind == "time":
        if timestamps is None:
            raise ValueError("a time-based split needs the ratings' timestamps")
        split = time_split(ratings, timestamps, cutoff=spec.cutoff, validation_seconds=spec.validation_seconds,
                           test_seconds=spec.test_seconds)
        held_out = np.union1d(split.validation.items, split.test.items)
        return split, np.setdiff1d(held_out, split.train.items).astype(np.int64)
    fractions = (1.0 - spec.validation_fraction - spec.test_fraction, spec.validation_fraction, spec.test_fraction)
    if spec.cold_item_fraction > 0:
        return cold_item_split(ratings, spec.cold_item_fraction, fractions, seed=spec.seed)
    return random_split(ratings, fractions, seed=spec.seed), np.zeros(0, dtype=np.int64)


def write_split(split: Split, cold_items: np.ndarray, directory: Path) -> Path:
    """train/validation/test as Parquet of dense indices (and the cold items), each file written atomically."""
    for name, part in (("train", split.train), ("validation", split.validation), ("test", split.test)):
        write_parquet_atomic(pd.DataFrame({"user": part.users, "item": part.items, "rating": part.values}),
                             directory / f"{name}.parquet")
    write_parquet_atomic(pd.DataFrame({"item": cold_items.astype(np.int64)}), directory / "cold_items.parquet")
    return directory


def read_split(directory: Path, n_users: int, n_items: int) -> tuple[Split, np.ndarray]:
    """What :func:`write_split` wrote."""
    parts = []
    for name in ("train", "validation", "test"):
        f = pd.read_parquet(directory / f"{name}.parquet")
        parts.append(Ratings(f["user"].to_numpy(), f["item"].to_numpy(), f["rating"].to_numpy(), n_users, n_items))
    cold = pd.read_parquet(directory / "cold_items.parquet")["item"].to_numpy()
    return Split(*parts), cold


def new_figure(figsize: tuple[float, float] = (7, 3.2)):
    """A matplotlib figure that needs no display (the Agg backend); write it with :func:`save_figure`."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def save_figure(fig, path: Path) -> Path:
    """Lay out ``fig`` and write it to ``path`` (its directory created); returns ``path``."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def learning_curve_png(history: list[IterationReport], path: Path,
                       sampling: list[IterationReport] | None = None) -> Path:
    """Plot train loss and validation RMSE per iteration to ``path`` (matplotlib, no display needed); with
    ``sampling`` (Gibbs sweeps), the running posterior average's validation RMSE after the ALS curve."""
    fig = new_figure()
    ax1, ax2 = fig.subplots(1, 2)
    it = [h.iteration for h in history]
    ax1.plot(it, [h.train_loss for h in history], marker="o")
    ax1.set(title="train loss (per rating)", xlabel="iteration")
    ax2.plot(it, [h.validation_rmse if h.validation_rmse is not None else np.nan for h in history], marker="o",
             color="tab:orange", label="ALS")
    kept = [h for h in sampling or [] if h.validation_rmse is not None]  # the burn-in has no average yet
    if kept:
        ax2.plot([h.iteration for h in kept], [h.validation_rmse for h in kept], color="tab:green",
                 label="posterior average")
        ax2.legend(fontsize=7)
    ax2.set(title="validation RMSE", xlabel="iteration (then Gibbs sweep)" if kept else "iteration")
    return save_figure(fig, path)


def config_params(config: ConvMFConfig) -> dict[str, Any]:
    """The model configuration as flat MLflow parameters: ``als.*``, ``gibbs.*`` (``als.gibbs``), ``cnn.*``,
    ``linear.*`` and the top-level settings (encoder, word_vectors, bias_prior ...). ``device`` is left out: the
    run logs the device it resolved to."""
    out: dict[str, Any] = {}
    for key, value in config_to_dict(config).items():
        if key == "device":
            continue
        if not isinstance(value, dict):
            out[key] = value
            continue
        for name, inner in value.items():
            if isinstance(inner, dict):  # a section within a section: als.gibbs -> gibbs.*
                out.update({f"{name}.{k}": v for k, v in inner.items()})
            else:
                out[f"{key}.{name}"] = inner
    return out


def coverage_summary(coverage: dict[str, Any]) -> str:
    """One line on how many vocabulary words had a pretrained vector (:meth:`VectorCoverage.summary`)."""
    return VectorCoverage(**{**coverage, "oov_examples": tuple(coverage.get("oov_examples", ()))}).summary()


def samples_megabytes(model: ConvMF) -> float:
    """Memory of the kept posterior draws (0 without posterior averaging)."""
    samples = getattr(model, "samples_", None)
    if samples is None:
        return 0.0
    return sum(t.element_size() * t.nelement() for t in samples.to_dict().values()) / 2**20


def fit_facts(model: ConvMF) -> tuple[dict[str, float], dict[str, str]]:
    """Metrics and tags of what a fit found beyond its RMSE: the text prior's held-out R^2, the pretrained vectors'
    coverage, posterior averaging (draws, seconds a sweep, memory) and a fallback to a simpler model."""
    samples = getattr(model, "samples_", None)
    metrics: dict[str, float] = {**(getattr(model, "prior_report_", None) or {}),
                                 "posterior_samples": 0 if samples is None else samples.n_samples,
                                 "gibbs_sweeps": len(getattr(model, "sampling_history_", [])),
                                 "samples_memory_mb": samples_megabytes(model),
                                 "fallback": float(getattr(model, "fallback_", None) is not None)}
    seconds = getattr(model, "sampling_seconds_per_sweep_", None)
    if seconds is not None:
        metrics["gibbs_seconds_per_sweep"] = seconds
    tags: dict[str, str] = {"encoder": model.config.encoder}
    coverage = getattr(model, "vector_coverage_", None)
    if coverage:
        metrics.update({f"vector_coverage_{k}": coverage[k] for k in ("n_words", "found", "oov", "oov_share")
                        if k in coverage})
        tags["vector_coverage"] = coverage_summary(coverage)[:5000]
    if getattr(model, "fallback_", None):
        tags["fallback"] = model.fallback_
    return metrics, tags


@task(name="train")
def train_convmf(ingested: IngestedData, tokenized: TokenizedData, config: ConvMFConfig, split: SplitSpec,
                 home: Path, run: RunRef, warm: WarmStartPlan | None = None) -> TrainedModel:
    """Fit ConvMF on the ingested ratings and tokenized descriptions; save the bundle under ``home/models``.

    With a ``warm`` plan in mode ``warm``, the fit starts from that model (its factors mapped through the id maps,
    its CNN; the documents are already encoded with its vocabulary); otherwise from scratch."""
    logger = get_run_logger()
    device = resolve_device(config.device)
    item_ids, documents, vocabulary = tokenized.load()
    item_map = IdMap(np.asarray(item_ids, dtype=object))
    ratings_frame = pd.read_parquet(ingested.ratings_path)
    user_map = IdMap.from_values(ratings_frame["user_id"].astype(str).to_numpy(dtype=object))
    ratings = ratings_from_frame(ratings_frame, user_map, item_map)
    timestamps = None
    if split.kind == "time":
        timestamps = rating_timestamps(ingested.ratings_path, ingested.counts.get("ratings", {}).get("file"),
                                       frame=ratings_frame)
    data_split, cold_items = split_ratings(ratings, split, timestamps)
    out = Path(home) / "models" / run.run_id
    split_dir = write_split(data_split, cold_items, out / "split")
    train = data_split.train
    # Pairs the served lists leave out: everything each user has rated (validation and test ratings included: the
    # split is for measuring the model, not a reason to recommend an item the user has already rated).
    seen = pd.DataFrame({"user_id": user_map.to_raw(ratings.users), "item_id": item_map.to_raw(ratings.items)})
    seen_path = write_parquet_atomic(seen, out / "seen.parquet")
    run.log_params({**config_params(config), "device": str(device),
                    "split.validation_fraction": split.validation_fraction,
                    "split.test_fraction": split.test_fraction, "split.cold_item_fraction": split.cold_item_fraction,
                    "split.seed": split.seed, "split.kind": split.kind, "n_users": len(user_map),
                    "n_items": len(item_map), "n_train": len(train), "n_validation": len(data_split.validation),
                    "n_test": len(data_split.test), "n_cold_items": len(cold_items),
                    **({"split.cutoff": _utc(split.cutoff), "split.validation_seconds": split.validation_seconds,
                        "split.test_seconds": split.test_seconds} if split.kind == "time" else {})})
    logger.info("training ConvMF on %s: %d users, %d items, %d/%d/%d ratings", device, len(user_map),
                len(item_map), len(train), len(data_split.validation), len(data_split.test))

    def log_iteration(r: IterationReport) -> None:
        run.log_metrics({"train_loss": r.train_loss, "validation_rmse": r.validation_rmse,
                         "iteration_seconds": r.seconds, **r.extra}, step=r.iteration)

    def log_sweep(r: IterationReport) -> None:
        # Its own keys: validation_rmse stays the ALS curve (one point per outer iteration). NaN/None are skipped.
        run.log_metrics({"gibbs_validation_rmse": r.validation_rmse, "gibbs_sweep_seconds": r.seconds, **r.extra},
                        step=r.iteration)

    def report(r: IterationReport) -> None:
        rmse = "n/a" if r.validation_rmse is None else f"{r.validation_rmse:.4f}"
        if "gibbs_sweep" in r.extra:  # a Gibbs sweep of posterior averaging (no train loss; no RMSE in burn-in)
            sweep, gibbs = int(r.extra["gibbs_sweep"]), config.als.gibbs
            sweeps = gibbs.samples + (gibbs.warm_start_burn_in if warm_start is not None else gibbs.burn_in)
            if sweep % GIBBS_LOG_EVERY == 0 or sweep == sweeps:  # every sweep goes to MLflow, every 25th to the log
                logger.info("Gibbs sweep %d of %d (%d kept): validation RMSE of the average %s, %.2f s", sweep, sweeps,
                            int(r.extra.get("gibbs_kept", 0)), rmse, r.seconds)
            log_sweep(r)
            return
        logger.info("iteration %d: train loss %.4f, validation RMSE %s, %.2f s", r.iteration, r.train_loss, rmse,
                    r.seconds)
        log_iteration(r)

    # The checkpoint is keyed on what determines the model, not on this run: a run killed mid-training (SIGKILL,
    # a lost machine) and started again - a new flow run, a new MLflow run - resumes where it stopped.
    warm_start, warm_from, warm_starts = None, None, 0  # warm_starts: this model's place in a chain of warm starts
    if warm is not None and warm.mode == "warm":
        previous = load_model(warm.bundle_dir)
        warm_start = warm_start_from(previous.model, previous.user_map, previous.item_map, user_map, item_map)
        warm_starts = int(previous.metadata.get("warm_starts", 0)) + 1
        warm.discard_download()  # everything needed is in memory now
        warm_from = warm.source_key
        counts = warm_start.summary()
        logger.info("warm start from %s: %d known and %d new users, %d known and %d new items", warm.describe(),
                    counts["warm_users"], counts["new_users"], counts["warm_items"], counts["new_items"])
        run.log_metrics({f"warm_start_{k}": v for k, v in counts.items()})
    checkpoint = checkpoint_path_for(home, checkpoint_key(ingested.content_hash, tokenized.cache_key, config, split,
                                                          str(device), warm_from))
    resumed_from = checkpoint_iteration(checkpoint)
    interrupted = close_interrupted_run(checkpoint, run)
    if resumed_from is not None:
        logger.info("resuming training from checkpoint %s after iteration %d (interrupted MLflow run %s)",
                    checkpoint, resumed_from, interrupted)
        run.set_tags({"resumed_from_iteration": resumed_from, "resumed_from_checkpoint": checkpoint.name,
                      **({"resumed_from_run": interrupted} if interrupted else {})})
    t0 = time.perf_counter()
    model = ConvMF(config).fit(train, data_split.validation, documents=documents, vocabulary=vocabulary,
                               callback=report, checkpoint_path=checkpoint, resume=resumed_from is not None,
                               warm_start=warm_start)
    fit_seconds = time.perf_counter() - t0
    for r in model.history_[:resumed_from or 0]:  # iterations the interrupted run did: this run's curve is whole
        log_iteration(r)
    best = float("nan") if model.best_validation_rmse_ is None else model.best_validation_rmse_
    facts, fact_tags = fit_facts(model)
    if "vector_coverage" in fact_tags:
        logger.info("word vectors: %s", fact_tags["vector_coverage"])
    if model.fallback_:
        logger.warning("fallback to a simpler model: %s", model.fallback_)
    bundle = save_model(model, out / "bundle", vocabulary=vocabulary, user_map=user_map, item_map=item_map,
                        metadata={"data_hash": ingested.content_hash, "tokenize_key": tokenized.cache_key,
                                  "mlflow_run_id": run.run_id, "best_validation_rmse": best, "split_kind": split.kind,
                                  "split_cutoff": split.cutoff,
                                  # a later warm start checks that this model saw nothing after its own cutoff
                                  "train_max_timestamp": None if timestamps is None else
                                  int(timestamps[timestamps < split.cutoff].max(initial=-1)),
                                  "fit_mode": "warm" if warm_start is not None else "full",
                                  "warm_start_from": warm_from, "warm_starts": warm_starts,
                                  "encoder": config.encoder, "word_vectors": config.word_vectors,
                                  "fallback": model.fallback_, "prior_report": model.prior_report_ or {},
                                  "vector_coverage": model.vector_coverage_,
                                  "posterior_samples": int(facts["posterior_samples"])})
    checkpoint.unlink(missing_ok=True)  # the bundle is saved: the next run of this key trains afresh
    checkpoint.with_suffix(".owner.json").unlink(missing_ok=True)
    run.log_metrics({"best_validation_rmse": best, "best_iteration": model.best_iteration_,
                     "fit_seconds": fit_seconds, "iterations": len(model.history_), "warm_starts": warm_starts,
                     **facts})
    run.set_tags(fact_tags)
    run.log_artifact(learning_curve_png(model.history_, out / "learning_curve.png", model.sampling_history_),
                     "plots")
    logger.info("fitted in %.1f s: validation RMSE %.4f (best iteration %d%s)", fit_seconds, best,
                model.best_iteration_, f", average of {int(facts['posterior_samples'])} posterior draws"
                if facts["posterior_samples"] else "")
    return TrainedModel(bundle, split_dir, seen_path, best, model.best_iteration_, len(model.history_), fit_seconds,
                        str(device))
