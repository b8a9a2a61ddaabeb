"""Flow parameters as validated pydantic models: a bad value fails before any work starts, and the Prefect UI
renders each model as a form.

Every path and URI has a local default resolved when a run starts (never at import time): the working directory
is ``$CONVMF_HOME`` or ``./convmf-data`` under the current directory; MLflow defaults to
``$MLFLOW_TRACKING_URI`` or ``sqlite:///<home>/mlflow.db`` with artifacts under ``<home>/mlartifacts``.

Parameters are untrusted input (anyone with the Prefect UI can set them), so they are confined at validation, before
any work starts:

* **Paths** (``data.ratings_path``, ``data.items_path``, ``model.word_vectors`` when it is a file, ``storage.home``,
  a local ``storage.tracking_uri``) never contain a ``..`` component. The allowed roots are ``$CONVMF_DATA_ROOTS``
  (directories separated by ``os.pathsep``). When it is set, ``storage.home`` and the data files (word vectors
  included) must lie under one of them; when it is unset, ``storage.home`` is the operator's choice and data files
  must lie under the working directory (home) or the current directory. Paths are compared after resolving
  symbolic links.
* **Names** (model, alias, experiment) match :data:`NAME_PATTERN`; **sizes** (top-N, batch sizes, epochs,
  iterations, users per shard, seeds ...) have upper bounds.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import replace
from urllib.parse import urlparse
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from convmf_core.config import ConvMFConfig, RefitPolicy, TextConfig
from convmf_core.data import DAY_SECONDS, time_split
from convmf_core.ingest import IngestConfig
from convmf_core.metrics import GATE_METRIC_PATTERN, GatePolicy
from convmf_core.vectors import PACKAGED_VECTORS

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# A Dask scheduler: tcp://host:port (or tls://, ws://, wss://, ucx://), or host:port.
DASK_ADDRESS_PATTERN = r"^((tcp|tls|ws|wss|ucx)://)?[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5}$"
DATA_ROOTS_ENV = "CONVMF_DATA_ROOTS"
MAX_PATH_LENGTH = 4096
MAX_SEED = 2**32 - 1


def configured_roots() -> list[Path] | None:
    """The directories of ``$CONVMF_DATA_ROOTS`` (resolved), or ``None`` when it is unset or empty."""
    raw = os.environ.get(DATA_ROOTS_ENV, "")
    roots = [Path(entry).expanduser().resolve() for entry in raw.split(os.pathsep) if entry.strip()]
    return roots or None


def _no_parent_components(value: str | None, what: str) -> str | None:
    """Refuse ``..`` anywhere in a path parameter (and NUL bytes)."""
    if value is None:
        return value
    if "\x00" in value:
        raise ValueError(f"{what} contains a NUL byte")
    if ".." in Path(value).parts or ".." in value.replace("\\", "/").split("/"):
        raise ValueError(f"{what}={value!r}: '..' components are not allowed in paths")
    return value


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def confine_path(value: str, what: str, roots: list[Path]) -> Path:
    """``value`` (relative paths are taken from the current directory) resolved, if it lies under one of ``roots``;
    otherwise a ``ValueError`` that names the parameter, the path and the allowed roots."""
    _no_parent_components(value, what)
    path = Path(value).expanduser()
    resolved = (path if path.is_absolute() else Path.cwd() / path).resolve()
    if not _under(resolved, roots):
        allowed = ", ".join(str(r) for r in roots)
        raise ValueError(f"{what}={value!r} is outside the allowed roots ({allowed}); put the file under one of them "
                         f"or add its directory to ${DATA_ROOTS_ENV} (separated by {os.pathsep!r})")
    return resolved


def _local_store_path(uri: str) -> str | None:
    """The local path of a ``sqlite:///`` or ``file:`` tracking URI, or of a bare path; ``None`` for a server URI."""
    if uri.startswith("sqlite:///"):
        return uri[len("sqlite:///"):] or None  # sqlite:////abs/path -> /abs/path; sqlite:///rel -> rel
    if uri.startswith("file:"):
        return urlparse(uri).path or None
    if "://" in uri:
        return None
    return uri


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageParams(_Params):
    """Where the pipeline keeps its files and tracks its runs."""

    home: str | None = Field(None, max_length=MAX_PATH_LENGTH,
                             description="Working directory (default $CONVMF_HOME or ./convmf-data); under "
                                         "$CONVMF_DATA_ROOTS when that is set")
    tracking_uri: str | None = Field(None, max_length=MAX_PATH_LENGTH,
                                     description="MLflow tracking URI (default $MLFLOW_TRACKING_URI or "
                                                 "sqlite:///<home>/mlflow.db); a local store must lie under home, "
                                                 "the current directory or $CONVMF_DATA_ROOTS")
    experiment: str = Field("convmf", pattern=NAME_PATTERN, description="MLflow experiment name")

    @field_validator("home")
    @classmethod
    def _home_has_no_parent(cls, value: str | None) -> str | None:
        return _no_parent_components(value, "storage.home")

    @model_validator(mode="after")
    def _confined(self) -> "StorageParams":
        roots = configured_roots()
        if self.home is not None and roots is not None:
            confine_path(self.home, "storage.home", roots)
        if self.tracking_uri is not None:
            local = _local_store_path(self.tracking_uri)
            if local is not None:
                confine_path(local, f"storage.tracking_uri ({self.tracking_uri!r}) local store", self.allowed_roots())
        return self

    def home_path(self) -> Path:
        """The resolved working directory (not created)."""
        return Path(self.home or os.environ.get("CONVMF_HOME") or Path.cwd() / "convmf-data").expanduser().resolve()

    def allowed_roots(self) -> list[Path]:
        """Where path parameters may point: ``$CONVMF_DATA_ROOTS`` when set, else home and the current directory."""
        return configured_roots() or [self.home_path(), Path.cwd().resolve()]

    def home_dir(self) -> Path:
        """The resolved working directory (created if needed)."""
        path = self.home_path()
        path.mkdir(parents=True, exist_ok=True)
        return path

    def resolved_tracking_uri(self) -> str:
        """The MLflow tracking URI this run uses."""
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.home_dir() / 'mlflow.db'}"

    def artifact_root(self) -> Path:
        """Where a new local experiment stores its artifacts."""
        return self.home_dir() / "mlartifacts"


class DataParams(_Params):
    """The input data: the built-in generated catalogue, or ratings + item description files."""

    source: Literal["builtin", "files"] = Field("builtin", description="'builtin' generates a catalogue whose "
                                                "ratings depend on its descriptions; 'files' reads the paths below")
    ratings_path: str | None = Field(None, max_length=MAX_PATH_LENGTH,
                                     description="Ratings file (CSV/TSV/JSONL/Parquet/MovieLens), under home, the "
                                                 "current directory or $CONVMF_DATA_ROOTS")
    items_path: str | None = Field(None, max_length=MAX_PATH_LENGTH, description="Item descriptions file (same roots)")
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet", "movielens-100k", "movielens-1m",
                    "movielens-latest"] = "auto"
    rating_min: float = 1.0
    rating_max: float = 5.0
    builtin_users: int = Field(600, ge=10, le=1_000_000)
    builtin_items: int = Field(500, ge=10, le=1_000_000)
    builtin_seed: int = Field(0, ge=0, le=MAX_SEED)

    @field_validator("ratings_path", "items_path")
    @classmethod
    def _no_parent(cls, value: str | None, info) -> str | None:
        return _no_parent_components(value, f"data.{info.field_name}")

    @model_validator(mode="after")
    def _paths_for_files(self) -> "DataParams":
        if self.source == "files" and not (self.ratings_path and self.items_path):
            raise ValueError("source='files' needs both ratings_path and items_path")
        if self.rating_min >= self.rating_max:
            raise ValueError("rating_min must be below rating_max")
        return self

    def ingest_config(self) -> IngestConfig:
        """The library's ingest settings for these parameters."""
        return IngestConfig(rating_min=self.rating_min, rating_max=self.rating_max, format=self.format)


class TextParams(_Params):
    """Text preprocessing (the paper's defaults)."""

    max_length: int = Field(TextConfig().max_length, ge=1, le=5_000)
    max_df: float = Field(TextConfig().max_df, gt=0.0, le=1.0)
    vocab_size: int = Field(TextConfig().vocab_size, ge=1, le=200_000)

    def config(self) -> TextConfig:
        """As the library's :class:`TextConfig`."""
        return TextConfig(max_length=self.max_length, max_df=self.max_df, vocab_size=self.vocab_size)


_LIBRARY = ConvMFConfig()  # the library's defaults (chosen on ML-100K validation), the one place they live


class ModelParams(_Params):
    """ConvMF hyperparameters; defaults are the library's (:class:`convmf_core.config.ConvMFConfig`).

    The text encoder: ``encoder='linear'`` (fixed document vectors, closed-form ridge map) or ``'cnn'`` (the paper's
    document CNN); with ``word_vectors`` set the CNN's embedding starts from them (ConvMF+), with ``null`` at random
    (the paper's ConvMF). ``posterior_samples`` > 0 averages that many Gibbs draws after the ALS fit.
    """

    n_factors: int = Field(_LIBRARY.als.n_factors, ge=1, le=512, description="Latent factors per user and item (k)")
    lambda_u: float = Field(_LIBRARY.als.lambda_u, gt=0, description="Ridge on the user factors (ALS)")
    lambda_v: float = Field(_LIBRARY.als.lambda_v, gt=0, description="Ridge pulling item factors to the text prior")
    use_bias: bool = Field(_LIBRARY.als.use_bias, description="Global mean and user/item biases")
    item_weighting: bool = Field(_LIBRARY.als.item_weighting, description="Weight lambda_v by each item's rating "
                                 "count (the authors' code)")
    max_iterations: int = Field(_LIBRARY.als.max_iterations, ge=1, le=500, description="Outer iterations at most")
    patience: int = Field(_LIBRARY.als.patience, ge=1, le=50, description="Outer iterations without a new best "
                          "validation RMSE before stopping")
    min_iterations: int = Field(_LIBRARY.min_iterations, ge=1, le=500,
                                description="Early stopping keeps the best iteration from this one on")
    warm_start_max_iterations: int = Field(_LIBRARY.als.warm_start_max_iterations, ge=1, le=500,
                                           description="Outer iterations of a warm-started fit at most")
    warm_start_patience: int = Field(_LIBRARY.als.warm_start_patience, ge=1, le=50,
                                     description="Early-stopping patience of a warm-started fit")
    warmup_iterations: int = Field(_LIBRARY.warmup_iterations, ge=0, le=500, description="ALS-only iterations "
                                   "before the text prior is first fitted")
    encoder: Literal["linear", "cnn"] = Field(_LIBRARY.encoder, description="Text encoder of the item prior: "
                                              "'linear' (document vectors, closed-form ridge map) or 'cnn' (the "
                                              "paper's document CNN; ConvMF+ when word_vectors is set)")
    word_vectors: str | None = Field(_LIBRARY.word_vectors, min_length=1, max_length=MAX_PATH_LENGTH,
                                     description=f"Pretrained word vectors: {PACKAGED_VECTORS!r} (the packaged GloVe "
                                                 "6B 50-d) or an existing GloVe-format text file under home, the "
                                                 "current directory or $CONVMF_DATA_ROOTS; null: none (the CNN "
                                                 "starts at random, the linear encoder uses tf-idf SVD features)")
    bias_prior: bool = Field(_LIBRARY.bias_prior, description="The text also predicts each item's bias (its prior "
                             "mean), not only its factors")
    ridge_alpha: float = Field(_LIBRARY.linear.alpha, gt=0, le=1e9,
                               description="linear encoder: ridge penalty of the map from document vectors")
    svd_dim: int = Field(_LIBRARY.linear.svd_dim, ge=0, le=1024,
                         description="linear encoder: tf-idf SVD components added to the document vectors")
    posterior_samples: int = Field(_LIBRARY.als.gibbs.samples, ge=0, le=1000,
                                   description="Gibbs draws averaged after the ALS fit (0: the ALS point estimate)")
    burn_in: int = Field(_LIBRARY.als.gibbs.burn_in, ge=0, le=1000,
                         description="Gibbs sweeps discarded before the kept draws")
    gibbs_lambda_u: float = Field(_LIBRARY.als.gibbs.lambda_u, gt=0,
                                  description="Ridge on the user factors while sampling")
    gibbs_lambda_v: float = Field(_LIBRARY.als.gibbs.lambda_v, gt=0,
                                  description="Ridge on the item factors (around the text prior) while sampling")
    fallback: bool = Field(_LIBRARY.als.fallback, description="Keep biases alone (or the global mean) when the "
                           "fitted model is worse on validation: a catalogue too small for the factors")
    cnn_epochs_per_iteration: int = Field(_LIBRARY.cnn.epochs_per_iteration, ge=1, le=50,
                                          description="cnn: epochs of the CNN per outer iteration")
    embedding_dim: int = Field(_LIBRARY.cnn.embedding_dim, ge=2, le=1024, description="cnn: word embedding size "
                               "(the pretrained vectors' own size when word_vectors is set)")
    n_filters: int = Field(_LIBRARY.cnn.n_filters, ge=1, le=1024, description="cnn: filters per window size")
    hidden_dim: int = Field(_LIBRARY.cnn.hidden_dim, ge=1, le=2048, description="cnn: hidden layer size")
    dropout: float = Field(_LIBRARY.cnn.dropout, ge=0.0, lt=1.0, description="cnn: drop probability in training")
    batch_size: int = Field(_LIBRARY.cnn.batch_size, ge=1, le=8192, description="cnn: items per minibatch")
    learning_rate: float = Field(_LIBRARY.cnn.learning_rate, gt=0, le=1.0, description="cnn: first step size")
    learning_rate_decay: float = Field(_LIBRARY.cnn.learning_rate_decay, gt=0, le=1.0,
                                       description="cnn: the step size is multiplied by this every outer "
                                                   "iteration")
    seed: int = Field(_LIBRARY.seed, ge=0, le=MAX_SEED, description="Seed of the model's initialisation")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto': CUDA when available, else CPU")

    @field_validator("word_vectors")
    @classmethod
    def _vectors_exist(cls, value: str | None) -> str | None:
        """The packaged vectors, or a file that exists (no ``..`` components; confined by :class:`TrainingParams`)."""
        if value is None or value == PACKAGED_VECTORS:
            return value
        _no_parent_components(value, "model.word_vectors")
        if not Path(value).expanduser().is_file():
            raise ValueError(f"model.word_vectors={value!r}: no such file; give {PACKAGED_VECTORS!r} (the packaged "
                             "GloVe 6B 50-d vectors), the path of a GloVe-format text file, or null for none")
        return value

    def word_vectors_path(self) -> str | None:
        """``word_vectors`` when it names a file (not the packaged vectors), else ``None``."""
        return None if self.word_vectors in (None, PACKAGED_VECTORS) else self.word_vectors

    def config(self) -> ConvMFConfig:
        """As the library's :class:`ConvMFConfig` (settings not exposed here keep the library's defaults)."""
        als = _LIBRARY.als
        return replace(
            _LIBRARY,
            als=replace(als, n_factors=self.n_factors, lambda_u=self.lambda_u, lambda_v=self.lambda_v,
                        use_bias=self.use_bias, item_weighting=self.item_weighting,
                        max_iterations=self.max_iterations, patience=self.patience,
                        warm_start_max_iterations=self.warm_start_max_iterations,
                        warm_start_patience=self.warm_start_patience, fallback=self.fallback,
                        gibbs=replace(als.gibbs, samples=self.posterior_samples, burn_in=self.burn_in,
                                      lambda_u=self.gibbs_lambda_u, lambda_v=self.gibbs_lambda_v)),
            cnn=replace(_LIBRARY.cnn, embedding_dim=self.embedding_dim, n_filters=self.n_filters,
                        hidden_dim=self.hidden_dim, dropout=self.dropout,
                        epochs_per_iteration=self.cnn_epochs_per_iteration, batch_size=self.batch_size,
                        learning_rate=self.learning_rate, learning_rate_decay=self.learning_rate_decay),
            encoder=self.encoder, linear=replace(_LIBRARY.linear, alpha=self.ridge_alpha, svd_dim=self.svd_dim),
            word_vectors=self.word_vectors, bias_prior=self.bias_prior,
            min_iterations=self.min_iterations, warmup_iterations=self.warmup_iterations, seed=self.seed,
            device=self.device)


SplitKind = Literal["random", "time"]
_TIME_SPLIT_DAYS = time_split.__kwdefaults__["validation_seconds"] / DAY_SECONDS  # the library's window (7 days)


class SplitParams(_Params):
    """How the ratings are split into train / validation / test.

    ``kind='random'``: the paper's seeded random 80/10/10 (the fractions, cold items and seed below); the default
    of ``retrain`` / ``convmf train`` and of the paper benchmark. ``kind='time'``: train on the ratings before a
    cutoff, validate on the ``validation_days`` after it, test on the ``test_days`` after that; the default of the
    nightly flow. Nothing after the cutoff reaches training, the vocabulary included. ``kind=null`` takes the flow's
    default.
    """

    kind: SplitKind | None = Field(None, description="'random' (the paper's 80/10/10) or 'time' (train before a "
                                   "cutoff); null: the flow's default ('time' nightly, 'random' for retrain)")
    validation_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="random: share of ratings to validation")
    test_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="random: share of ratings to test")
    cold_item_fraction: float = Field(0.05, ge=0.0, lt=0.5, description="random: share of rated items whose ratings "
                                      "all go to validation/test, to measure cold-start quality (0 = the paper's "
                                      "split); a time split has its own cold items (first rated after the cutoff)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="random: the split's seed")
    validation_days: float = Field(_TIME_SPLIT_DAYS, gt=0.0, le=3650.0,
                                   description="time: length of the validation window after the cutoff")
    test_days: float = Field(_TIME_SPLIT_DAYS, gt=0.0, le=3650.0,
                             description="time: length of the test window after the validation window")
    cutoff: dt.datetime | None = Field(None, description="time: first instant not used for training (UTC when no "
                                       "zone is given); default: the newest rating's time minus both windows")

    def validation_seconds(self) -> int:
        """The validation window in whole seconds."""
        return int(round(self.validation_days * DAY_SECONDS))

    def test_seconds(self) -> int:
        """The test window in whole seconds."""
        return int(round(self.test_days * DAY_SECONDS))

    def cutoff_seconds(self) -> int | None:
        """The explicit cutoff as Unix seconds (naive datetimes are UTC), or ``None`` for the default."""
        if self.cutoff is None:
            return None
        cutoff = self.cutoff if self.cutoff.tzinfo else self.cutoff.replace(tzinfo=dt.timezone.utc)
        return int(cutoff.timestamp())


class WarmStartParams(_Params):
    """Start training from the registry's champion instead of from scratch (issue 7, "Warm start").

    Users and items the champion knows keep their factors, the CNN starts from its weights and its vocabulary is
    kept; new items start at theta_j = cnn(W, X_j), new users are solved from their ratings (eq. 7). A full refit
    (fresh vocabulary and weights) runs instead when ``enabled`` is false, when there is no champion, when the
    champion cannot seed this configuration (k or the CNN changed, it saw ratings after this run's cutoff), or when
    a threshold below is passed. The run says which it did and why (Prefect log, MLflow tags ``fit_mode`` and
    ``fit_mode_reason``). With the random split there is no cutoff to check against: a champion trained on the same
    ratings has seen some of this run's validation ratings, so a warm ``retrain`` judges itself optimistically.
    """

    enabled: bool | None = Field(None, description="null: the flow's default (on for the nightly flow, off for "
                                 "retrain); false: always a full refit")
    alias: str = Field("champion", pattern=NAME_PATTERN, description="Registry alias of the model to start from")
    max_oov_share: float = Field(RefitPolicy().max_oov_share, ge=0.0, le=1.0,
                                 description="Refit when more than this share of the new items' words is outside "
                                             "the kept vocabulary")
    max_new_item_share: float = Field(RefitPolicy().max_new_item_share, ge=0.0, le=1.0,
                                      description="Refit when more than this share of the items is new")
    max_warm_starts: int = Field(RefitPolicy().max_warm_starts, ge=0, le=10_000,
                                 description="Refit when the champion already ends this many warm starts in a row "
                                             "(0: every fit is a full fit)")

    def policy(self) -> RefitPolicy:
        """As the library's :class:`RefitPolicy`."""
        return RefitPolicy(max_oov_share=self.max_oov_share, max_new_item_share=self.max_new_item_share,
                           max_warm_starts=self.max_warm_starts)


class ShardRunnerParams(_Params):
    """Where mapped shards run: threads in the flow's process (default) or a Dask cluster. The result is the same
    whichever runs it."""

    task_runner: Literal["threads", "dask"] = Field("threads", description="'threads': shards run in the flow's "
                                                    "process; 'dask': on a Dask cluster (local or dask_address)")
    threads: int = Field(2, ge=1, le=64, description="threads: shards run at once in the flow's process")
    dask_address: str | None = Field(None, pattern=DASK_ADDRESS_PATTERN,
                                     description="dask: scheduler of an existing cluster, e.g. tcp://10.0.0.5:8786 "
                                                 "(default $CONVMF_DASK_ADDRESS; unset: a local cluster)")
    dask_workers: int = Field(2, ge=1, le=256, description="dask, local cluster: worker processes")
    threads_per_worker: int = Field(1, ge=1, le=64, description="dask, local cluster: shards at once per worker")

    @model_validator(mode="after")
    def _address_needs_dask(self) -> "ShardRunnerParams":
        if self.dask_address and self.task_runner != "dask":
            raise ValueError("dask_address is only used with task_runner='dask'")
        return self

    def resolved_dask_address(self) -> str | None:
        """The scheduler to connect to, or ``None`` for a local cluster of ``dask_workers`` processes."""
        address = self.dask_address or os.environ.get("CONVMF_DASK_ADDRESS") or None
        if address is not None and not re.fullmatch(DASK_ADDRESS_PATTERN, address):
            raise ValueError(f"CONVMF_DASK_ADDRESS={address!r} is not a Dask scheduler address (tcp://host:port)")
        return address


class TokenizeParams(ShardRunnerParams):
    """How tokenization of a large catalogue is spread: the document-frequency count and the encoding are mapped
    over shards of ``items_per_shard`` items on the chosen task runner (issue 4). The vocabulary and documents are
    identical to a single-process run, so these settings are not part of the model's configuration."""

    items_per_shard: int = Field(50_000, ge=1, le=10_000_000, description="Items per mapped tokenize task")


class FlowDefaults(BaseModel):
    """What a flow takes for the parameters left null: the nightly flow and ``retrain`` differ (issue 7)."""

    model_config = ConfigDict(frozen=True)

    split_kind: SplitKind
    warm_start: bool
    gate_metric: str = Field("rmse", pattern=GATE_METRIC_PATTERN)


# The gate: retrain keeps the paper's RMSE; the nightly run judges what users see, the top-10 ranking (NDCG@10).
RETRAIN_DEFAULTS = FlowDefaults(split_kind="random", warm_start=False, gate_metric="rmse")
NIGHTLY_DEFAULTS = FlowDefaults(split_kind="time", warm_start=True, gate_metric="ndcg@10")
_GATE = GatePolicy()  # the gate's tolerances: their defaults live in convmf_core.metrics.GatePolicy


class TrainingParams(_Params):
    """Parameters of the training flow: ingest -> tokenize -> train -> evaluate -> register -> promote."""

    model_name: str = Field("convmf", pattern=NAME_PATTERN, description="Registered model name in MLflow")
    data: DataParams = DataParams()
    text: TextParams = TextParams()
    model: ModelParams = ModelParams()
    split: SplitParams = SplitParams()
    warm_start: WarmStartParams = WarmStartParams()
    tokenize: TokenizeParams = TokenizeParams()
    eval_n: int = Field(10, ge=1, le=1000, description="N of the top-N metrics")
    storage: StorageParams = StorageParams()

    # The sanity gate before training (tasks/guards.py): a collapsed or badly broken input stops the run.
    gate_max_ratings_drop: float = Field(0.5, ge=0.0, le=1.0, description="Stop before training when accepted "
                                         "ratings fell by more than this share against the last successful run")
    gate_max_quarantine_share: float = Field(0.2, ge=0.0, le=1.0, description="Stop before training when more "
                                             "than this share of a file's rows was quarantined")
    override_gate: bool = Field(False, description="Train even when the sanity gate fails (a deliberate "
                                "catalogue change); the failure is still logged and tagged")
    # The champion/challenger gate (tasks/register.py promote_model): both models on this run's validation split.
    gate_metric: str | None = Field(None, pattern=GATE_METRIC_PATTERN, description="'rmse' or 'ndcg@N': the "
                                    "challenger must beat the champion on it (null: the flow's default, nightly "
                                    "ndcg@10, retrain rmse)")
    gate_other_tolerance: float = Field(_GATE.other_tolerance, ge=0.0, le=1.0, description="Refuse a challenger "
                                        "worse than the champion by more than this share on the other metric")
    gate_cold_tolerance: float = Field(_GATE.cold_tolerance, ge=0.0, le=1.0, description="Refuse a challenger "
                                       "worse than the champion by more than this share on the gate metric "
                                       "measured on the cold-item slice")

    @model_validator(mode="after")
    def _data_paths_confined(self) -> "TrainingParams":
        """Data files (and a word-vectors file) must lie under home, the current directory, or $CONVMF_DATA_ROOTS
        when that is set."""
        roots = self.storage.allowed_roots()
        for name in ("ratings_path", "items_path"):
            value = getattr(self.data, name)
            if value is not None:
                confine_path(value, f"data.{name}", roots)
        if self.model.word_vectors_path() is not None:
            confine_path(self.model.word_vectors_path(), "model.word_vectors", roots)
        return self

    def with_defaults(self, defaults: FlowDefaults) -> "TrainingParams":
        """These parameters with the null ones (split kind, warm start, gate metric) set to the flow's defaults."""
        update = {}
        if self.split.kind is None:
            update["split"] = self.split.model_copy(update={"kind": defaults.split_kind})
        if self.warm_start.enabled is None:
            update["warm_start"] = self.warm_start.model_copy(update={"enabled": defaults.warm_start})
        if self.gate_metric is None:
            update["gate_metric"] = defaults.gate_metric
        return self.model_copy(update=update) if update else self

    def gate_policy(self) -> GatePolicy:
        """The gate as the library's :class:`GatePolicy` (an unset metric is retrain's default, RMSE)."""
        return GatePolicy(metric=self.gate_metric or RETRAIN_DEFAULTS.gate_metric,
                          other_tolerance=self.gate_other_tolerance, cold_tolerance=self.gate_cold_tolerance,
                          other_n=self.eval_n)


class ScoringParams(ShardRunnerParams):
    """Parameters of the batch scoring flow: registry lookup -> top-N per user -> Parquet (the shards run on the
    task runner of :class:`ShardRunnerParams`)."""

    model_name: str = Field("convmf", pattern=NAME_PATTERN)
    alias: str = Field("champion", pattern=NAME_PATTERN, description="Registry alias to score with")
    n: int = Field(100, ge=1, le=1000, description="Items per user")
    users_per_shard: int = Field(5000, ge=1, le=10_000_000, description="Users per mapped scoring task")
    block_size: int = Field(1024, ge=1, le=65_536, description="Users per matrix product inside a shard")
    run_date: dt.date | None = Field(None, description="Partition date of the output (default: today, UTC)")
    storage: StorageParams = StorageParams()

    def resolved_run_date(self) -> dt.date:
        """The output partition's date."""
        return self.run_date or dt.datetime.now(dt.timezone.utc).date()


class NightlyParams(_Params):
    """The nightly flow: training, then scoring with whatever the registry's champion is afterwards."""

    training: TrainingParams = TrainingParams()
    scoring: ScoringParams = ScoringParams()

    def training_params(self) -> TrainingParams:
        """The training settings with the nightly defaults for what is left null: a time-based split and a warm
        start from the champion (``retrain`` defaults to the paper's random split and a full fit)."""
        return self.training.with_defaults(NIGHTLY_DEFAULTS)

    def scoring_params(self) -> ScoringParams:
        """Scoring settings bound to the trained model's name and storage (one registry, one working directory)."""
        return self.scoring.model_copy(update={"model_name": self.training.model_name,
                                               "storage": self.training.storage})
