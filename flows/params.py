"""Flow parameters as validated pydantic models: a bad value fails before any work starts, and the Prefect UI
renders each model as a form.

Every path and URI has a local default resolved when a run starts (never at import time): the working directory
is ``$CONVMF_HOME`` or ``./convmf-data`` under the current directory; MLflow defaults to
``$MLFLOW_TRACKING_URI`` or ``sqlite:///<home>/mlflow.db`` with artifacts under ``<home>/mlartifacts``.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from convmf_core.config import ConvMFConfig, TextConfig
from convmf_core.ingest import IngestConfig

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# A Dask scheduler: tcp://host:port (or tls://, ws://, wss://, ucx://), or host:port.
DASK_ADDRESS_PATTERN = r"^((tcp|tls|ws|wss|ucx)://)?[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5}$"


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageParams(_Params):
    """Where the pipeline keeps its files and tracks its runs."""

    home: str | None = Field(None, description="Working directory (default $CONVMF_HOME or ./convmf-data)")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default $MLFLOW_TRACKING_URI or "
                                                        "sqlite:///<home>/mlflow.db)")
    experiment: str = Field("convmf", pattern=NAME_PATTERN, description="MLflow experiment name")

    def home_dir(self) -> Path:
        """The resolved working directory (created if needed)."""
        path = Path(self.home or os.environ.get("CONVMF_HOME") or Path.cwd() / "convmf-data").resolve()
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
    ratings_path: str | None = Field(None, description="Ratings file (CSV/TSV/JSONL/Parquet/MovieLens)")
    items_path: str | None = Field(None, description="Item descriptions file")
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet", "movielens-100k", "movielens-1m",
                    "movielens-latest"] = "auto"
    rating_min: float = 1.0
    rating_max: float = 5.0
    builtin_users: int = Field(600, ge=10, le=1_000_000)
    builtin_items: int = Field(500, ge=10, le=1_000_000)
    builtin_seed: int = 0

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
    """ConvMF hyperparameters; defaults are the library's (:class:`convmf_core.config.ConvMFConfig`)."""

    n_factors: int = Field(_LIBRARY.als.n_factors, ge=1, le=512)
    lambda_u: float = Field(_LIBRARY.als.lambda_u, gt=0)
    lambda_v: float = Field(_LIBRARY.als.lambda_v, gt=0)
    use_bias: bool = _LIBRARY.als.use_bias
    item_weighting: bool = _LIBRARY.als.item_weighting
    max_iterations: int = Field(_LIBRARY.als.max_iterations, ge=1, le=500)
    patience: int = Field(_LIBRARY.als.patience, ge=1, le=50)
    warmup_iterations: int = Field(_LIBRARY.warmup_iterations, ge=0, le=500)
    cnn_epochs_per_iteration: int = Field(_LIBRARY.cnn.epochs_per_iteration, ge=1, le=50)
    embedding_dim: int = Field(_LIBRARY.cnn.embedding_dim, ge=2, le=1024)
    n_filters: int = Field(_LIBRARY.cnn.n_filters, ge=1, le=1024)
    hidden_dim: int = Field(_LIBRARY.cnn.hidden_dim, ge=1, le=2048)
    dropout: float = Field(_LIBRARY.cnn.dropout, ge=0.0, lt=1.0)
    batch_size: int = Field(_LIBRARY.cnn.batch_size, ge=1, le=8192)
    learning_rate: float = Field(_LIBRARY.cnn.learning_rate, gt=0, le=1.0)
    seed: int = _LIBRARY.seed
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def config(self) -> ConvMFConfig:
        """As the library's :class:`ConvMFConfig` (settings not exposed here keep the library's defaults)."""
        return replace(
            _LIBRARY,
            als=replace(_LIBRARY.als, n_factors=self.n_factors, lambda_u=self.lambda_u, lambda_v=self.lambda_v,
                        use_bias=self.use_bias, item_weighting=self.item_weighting,
                        max_iterations=self.max_iterations, patience=self.patience),
            cnn=replace(_LIBRARY.cnn, embedding_dim=self.embedding_dim, n_filters=self.n_filters,
                        hidden_dim=self.hidden_dim, dropout=self.dropout,
                        epochs_per_iteration=self.cnn_epochs_per_iteration, batch_size=self.batch_size,
                        learning_rate=self.learning_rate),
            warmup_iterations=self.warmup_iterations, seed=self.seed, device=self.device)


class SplitParams(_Params):
    """The paper's random split of the ratings into train / validation / test."""

    validation_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    cold_item_fraction: float = Field(0.05, ge=0.0, lt=0.5, description="Share of rated items whose ratings all go "
                                      "to validation/test, to measure cold-start quality (0 = the paper's split)")
    seed: int = 0


class TrainingParams(_Params):
    """Parameters of the training flow: ingest -> tokenize -> train -> evaluate -> register -> promote."""

    model_name: str = Field("convmf", pattern=NAME_PATTERN, description="Registered model name in MLflow")
    data: DataParams = DataParams()
    text: TextParams = TextParams()
    model: ModelParams = ModelParams()
    split: SplitParams = SplitParams()
    eval_n: int = Field(10, ge=1, le=1000, description="N of the top-N metrics")
    storage: StorageParams = StorageParams()


class ScoringParams(_Params):
    """Parameters of the batch scoring flow: registry lookup -> top-N per user -> Parquet."""

    model_name: str = Field("convmf", pattern=NAME_PATTERN)
    alias: str = Field("champion", pattern=NAME_PATTERN, description="Registry alias to score with")
    n: int = Field(100, ge=1, le=1000, description="Items per user")
    users_per_shard: int = Field(5000, ge=1, le=10_000_000, description="Users per mapped scoring task")
    block_size: int = Field(1024, ge=1, le=65_536, description="Users per matrix product inside a shard")
    run_date: dt.date | None = Field(None, description="Partition date of the output (default: today, UTC)")
    storage: StorageParams = StorageParams()
    # Where the shards run. The output is the same whichever runner scores it.
    task_runner: Literal["threads", "dask"] = Field("threads", description="'threads': shards run in the flow's "
                                                    "process; 'dask': on a Dask cluster (local or dask_address)")
    threads: int = Field(2, ge=1, le=64, description="threads: shards scored at once in the flow's process")
    dask_address: str | None = Field(None, pattern=DASK_ADDRESS_PATTERN,
                                     description="dask: scheduler of an existing cluster, e.g. tcp://10.0.0.5:8786 "
                                                 "(default $CONVMF_DASK_ADDRESS; unset: a local cluster)")
    dask_workers: int = Field(2, ge=1, le=256, description="dask, local cluster: worker processes")
    threads_per_worker: int = Field(1, ge=1, le=64, description="dask, local cluster: shards at once per worker")

    @model_validator(mode="after")
    def _address_needs_dask(self) -> "ScoringParams":
        if self.dask_address and self.task_runner != "dask":
            raise ValueError("dask_address is only used with task_runner='dask'")
        return self

    def resolved_run_date(self) -> dt.date:
        """The output partition's date."""
        return self.run_date or dt.datetime.now(dt.timezone.utc).date()

    def resolved_dask_address(self) -> str | None:
        """The scheduler to connect to, or ``None`` for a local cluster of ``dask_workers`` processes."""
        address = self.dask_address or os.environ.get("CONVMF_DASK_ADDRESS") or None
        if address is not None and not re.fullmatch(DASK_ADDRESS_PATTERN, address):
            raise ValueError(f"CONVMF_DASK_ADDRESS={address!r} is not a Dask scheduler address (tcp://host:port)")
        return address


class NightlyParams(_Params):
    """The nightly flow: training, then scoring with whatever the registry's champion is afterwards."""

    training: TrainingParams = TrainingParams()
    scoring: ScoringParams = ScoringParams()

    def scoring_params(self) -> ScoringParams:
        """Scoring settings bound to the trained model's name and storage (one registry, one working directory)."""
        return self.scoring.model_copy(update={"model_name": self.training.model_name,
                                               "storage": self.training.storage})
