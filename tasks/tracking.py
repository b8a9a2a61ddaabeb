"""MLflow tracking for the pipeline: one run per training flow, addressed by id (no process-wide active run).

Tasks log through an :class:`mlflow.tracking.MlflowClient` bound to the run's tracking URI, so concurrent tasks
never race on MLflow's global "active run". Calls retry with backoff on transient failures (a server briefly down,
SQLite's "database is locked").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

T = TypeVar("T")
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)


def with_retries(call: Callable[[], T], what: str, delays: tuple[float, ...] = RETRY_DELAYS_S) -> T:
    """Run ``call``; on an exception retry after each delay in turn, then re-raise the last error."""
    for attempt, delay in enumerate((*delays, None)):
        try:
            return call()
        except Exception:  # noqa: BLE001 - any transport or store error is worth one more try
            if delay is None:
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def mlflow_key(name: str) -> str:
    """A metric name MLflow accepts: ``recall@10`` becomes ``recall_at_10``."""
    return name.replace("@", "_at_")


@dataclass(frozen=True)
class RunRef:
    """An MLflow run by id, with the tracking URI it lives in (what tasks pass to each other)."""

    tracking_uri: str
    run_id: str

    def client(self) -> MlflowClient:
        """A client bound to this run's tracking URI (and registry)."""
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log finite metrics in one batch (NaN/inf are skipped: MLflow stores them poorly and they mean 'none')."""
        ts = int(time.time() * 1000)
        batch = [Metric(mlflow_key(k), float(v), ts, step or 0) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        if batch:
            with_retries(lambda: self.client().log_batch(self.run_id, metrics=batch), "log metrics")

    def log_params(self, params: dict[str, Any]) -> None:
        """Log parameters (values stringified, MLflow's limit of 6000 characters applied)."""
        batch = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for s in range(0, len(batch), 100):
            with_retries(lambda: self.client().log_batch(self.run_id, params=batch[s:s + 100]), "log params")

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set run tags."""
        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        with_retries(lambda: self.client().log_batch(self.run_id, tags=batch), "set tags")

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a local file or directory as an artifact of the run."""
        client = self.client()
        if Path(path).is_dir():
            with_retries(lambda: client.log_artifacts(self.run_id, str(path), artifact_path), "log artifacts")
        else:
            with_retries(lambda: client.log_artifact(self.run_id, str(path), artifact_path), "log artifact")

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store ``text`` as an artifact file."""
        with_retries(lambda: self.client().log_text(self.run_id, text, artifact_file), "log text")


def start_run(tracking_uri: str, experiment: str, artifact_root: Path, run_name: str,
              tags: dict[str, str]) -> RunRef:
    """Create the experiment if needed and a new run in it.

    With a local store (``sqlite:``/``file:``) a new experiment keeps its artifacts under ``artifact_root``;
    with a tracking server, the server decides.
    """
    uri = tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def experiment_id() -> str:
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            return found.experiment_id
        location = Path(artifact_root).as_uri() if uri.startswith(("sqlite:", "file:")) else None
        return client.create_experiment(experiment, artifact_location=location)

    exp = with_retries(experiment_id, "create experiment")
    run = with_retries(lambda: client.create_run(exp, run_name=run_name, tags=tags), "create run")
    return RunRef(uri, run.info.run_id)


def end_run(run: RunRef, status: str = "FINISHED") -> None:
    """Mark the run finished (or FAILED)."""
    with_retries(lambda: run.client().set_terminated(run.run_id, status=status), "end run")
