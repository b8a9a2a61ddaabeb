"""MLflow tracking for the pipeline: one run per training flow, addressed by id (no process-wide active run).

Tasks log through an :class:`mlflow.tracking.MlflowClient` bound to the run's tracking URI, so concurrent tasks
never race on MLflow's global "active run".

Every call to the tracking server goes through :func:`with_retries`: transient failures (connection refused or
reset, timeouts, HTTP 5xx and 429, SQLite's "database is locked") are retried with exponential backoff and a
bounded total wait (:class:`RetryPolicy`); real errors (HTTP 4xx such as ``RESOURCE_ALREADY_EXISTS``,
``INVALID_PARAMETER_VALUE``, 401/403) fail at once. A retry may follow a request that did reach the server (the
connection broke before the answer came back), so every write here is idempotent:

* metrics are built once, with an explicit step and timestamp, before the first attempt: the store keeps one row
  per (key, step, timestamp, value), so sending the same batch again adds nothing;
* parameters are write-once with the same value, tags and artifacts overwrite the same key or path;
* a run is created with a client token tag and, on a retry, looked up by that token before creating another;
* an experiment that "already exists" after a retry is read back by name.

MLflow's own HTTP client retries too (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7, backoff factor 2): what it
gives up on reaches :func:`with_retries`.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

T = TypeVar("T")
_log = logging.getLogger(__name__)

# Environment variable: an upper bound, in seconds, on the total wait of one call's retries (overrides the default).
MAX_WAIT_ENV = "CONVMF_MLFLOW_RETRY_MAX_WAIT_S"
# Run tag holding the client-side token of create_run (finds the run a lost answer created).
CLIENT_TOKEN_TAG = "convmf_client_token"

# Words of an error message (lower case) that mark a transient failure when no typed exception says so: MLflow
# turns transport errors into MlflowException("API request to ... failed with exception <text>").
TRANSIENT_MESSAGES = (
    "database is locked", "database table is locked", "connection refused", "connection reset",
    "connection aborted", "remote end closed", "remotedisconnected", "broken pipe", "timed out",
    "read timeout", "connect timeout", "failed to establish a new connection", "max retries exceeded",
    "temporarily unavailable", "service unavailable", "bad gateway", "gateway timeout", "too many 5",
    "too many 429", "too many requests",
)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: waits of ``first_delay_s``, times ``factor`` each retry, each at most ``max_delay_s``,
    until their sum reaches ``max_total_wait_s`` (then the last error is raised)."""

    first_delay_s: float = 0.5
    factor: float = 2.0
    max_delay_s: float = 15.0
    max_total_wait_s: float = 120.0

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        """The default policy, with ``$CONVMF_MLFLOW_RETRY_MAX_WAIT_S`` as the total wait when it is set."""
        raw = os.environ.get(MAX_WAIT_ENV, "").strip()
        if not raw:
            return cls()
        try:
            total = float(raw)
        except ValueError:
            raise ValueError(f"${MAX_WAIT_ENV} must be a number of seconds, not {raw!r}") from None
        if not (math.isfinite(total) and total >= 0):
            raise ValueError(f"${MAX_WAIT_ENV} must be a non-negative number of seconds, not {raw!r}")
        return cls(max_total_wait_s=total)

    def delays(self) -> Iterator[float]:
        """The wait before each retry, in order; the sum never exceeds ``max_total_wait_s``."""
        waited, delay = 0.0, self.first_delay_s
        while waited < self.max_total_wait_s - 1e-9:
            step = min(delay, self.max_delay_s, self.max_total_wait_s - waited)
            yield step
            waited += step
            delay *= self.factor


def _causes(exc: BaseException, limit: int = 10) -> Iterator[BaseException]:
    """``exc``, then what it was raised from or while handling (``__cause__`` / ``__context__``)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < limit:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _http_status(exc: MlflowException) -> int:
    try:
        return int(exc.get_http_status_code())
    except (TypeError, ValueError):  # pragma: no cover - every MlflowException maps its code to a status
        return 500


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth a retry: the server or store was briefly unavailable, not the request wrong.

    Transient: connection refused/reset/aborted, timeouts, HTTP 5xx and 429 answers, SQLite "database is locked"
    (also when wrapped in an ``MlflowException``). Not transient: HTTP 4xx answers (``RESOURCE_ALREADY_EXISTS``,
    ``RESOURCE_DOES_NOT_EXIST``, ``INVALID_PARAMETER_VALUE``, 401, 403 ...) and every other error.
    """
    import requests  # mlflow's HTTP client; imported here to keep this module's import light
    import sqlalchemy.exc
    import urllib3.exceptions

    for error in _causes(exc):
        if isinstance(error, RestException):  # the server answered: its status decides
            status = _http_status(error)
            return status == 429 or status >= 500
        if isinstance(error, MlflowException):
            status = _http_status(error)
            message = str(error.message).lower()
            if 400 <= status < 500 and status != 429:
                return "database is locked" in message  # a local store may report a lock as a bad request
            if any(word in message for word in TRANSIENT_MESSAGES):
                return True
            if message.startswith("api request to endpoint") and (status == 429 or status >= 500):
                return True  # a non-JSON 5xx/429 answer (a proxy, a restarting server)
            continue  # look at what it wrapped
        if isinstance(error, (ConnectionError, TimeoutError, socket.timeout)):
            return True
        if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                              requests.exceptions.ChunkedEncodingError, requests.exceptions.RetryError,
                              urllib3.exceptions.ProtocolError, urllib3.exceptions.NewConnectionError,
                              urllib3.exceptions.MaxRetryError, urllib3.exceptions.TimeoutError)):
            return True
        if isinstance(error, (sqlite3.OperationalError, sqlalchemy.exc.OperationalError)):
            text = str(error).lower()
            return "locked" in text or "busy" in text
    return False


def _warn(message: str, *args: Any) -> None:
    """To the Prefect run log when called inside a flow or task run, else to this module's logger."""
    try:
        from prefect import get_run_logger

        get_run_logger().warning(message, *args)
    except Exception:  # noqa: BLE001 - no run context (a plain script, a test): the module logger
        _log.warning(message, *args)


def with_retries(call: Callable[[], T], what: str, policy: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """Run ``call``; retry transient failures (:func:`is_transient`) after each delay of ``policy`` (default:
    :meth:`RetryPolicy.from_env`); re-raise a real error at once and the last transient one when the wait budget
    is spent. ``call`` must be idempotent: it may run again after an attempt that reached the server."""
    policy = policy or RetryPolicy.from_env()
    delays = policy.delays()
    attempt, waited = 0, 0.0
    while True:
        attempt += 1
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            delay = next(delays, None)
            if delay is None:
                exc.add_note(f"{what}: gave up after {attempt} attempts and {waited:.1f} s of waiting "
                             f"(transient failures; budget {policy.max_total_wait_s:.0f} s, ${MAX_WAIT_ENV})")
                raise
            _warn("MLflow %s failed (%s: %s); retry %d in %.1f s", what, type(exc).__name__,
                  str(exc).splitlines()[0][:200] if str(exc) else "", attempt, delay)
            sleep(delay)
            waited += delay


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
        """Log finite metrics in one batch (NaN/inf are skipped: MLflow stores them poorly and they mean 'none').

        The batch (step and timestamp included) is built once, so a retry sends identical rows, which the store
        keeps once.
        """
        ts = int(time.time() * 1000)
        batch = [Metric(mlflow_key(k), float(v), ts, step or 0) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        if batch:
            with_retries(lambda: self.client().log_batch(self.run_id, metrics=batch), "log metrics")

    def log_params(self, params: dict[str, Any]) -> None:
        """Log parameters (values stringified, MLflow's limit of 6000 characters applied)."""
        batch = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for s in range(0, len(batch), 100):
            chunk = batch[s:s + 100]
            with_retries(lambda: self.client().log_batch(self.run_id, params=chunk), "log params")

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set run tags."""
        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        with_retries(lambda: self.client().log_batch(self.run_id, tags=batch), "set tags")

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a local file or directory as an artifact of the run (a retry overwrites the same paths)."""
        client = self.client()
        if Path(path).is_dir():
            with_retries(lambda: client.log_artifacts(self.run_id, str(path), artifact_path), "log artifacts")
        else:
            with_retries(lambda: client.log_artifact(self.run_id, str(path), artifact_path), "log artifact")

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store ``text`` as an artifact file."""
        with_retries(lambda: self.client().log_text(self.run_id, text, artifact_file), "log text")


def _experiment_id(client: MlflowClient, experiment: str, location: str | None) -> str:
    """The experiment's id, created if missing (a create that lost its answer is found by name)."""
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(experiment, artifact_location=location)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        found = client.get_experiment_by_name(experiment)  # created by an earlier attempt or another run
        if found is None:
            raise
        return found.experiment_id


def start_run(tracking_uri: str, experiment: str, artifact_root: Path, run_name: str,
              tags: dict[str, str]) -> RunRef:
    """Create the experiment if needed and a new run in it.

    With a local store (``sqlite:``/``file:``) a new experiment keeps its artifacts under ``artifact_root``;
    with a tracking server, the server decides. The run carries a client token (tag ``convmf_client_token``):
    when an attempt's answer is lost, the retry finds the run that attempt created instead of creating a second.
    """
    uri = tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    location = Path(artifact_root).as_uri() if uri.startswith(("sqlite:", "file:")) else None
    exp = with_retries(lambda: _experiment_id(client, experiment, location), "create experiment")
    token = uuid.uuid4().hex
    attempts = [0]

    def create() -> Any:
        if attempts[0]:
            found = client.search_runs([exp], filter_string=f"tags.{CLIENT_TOKEN_TAG} = '{token}'", max_results=2)
            if found:
                return found[0]
        attempts[0] += 1
        return client.create_run(exp, run_name=run_name, tags={**tags, CLIENT_TOKEN_TAG: token})

    run = with_retries(create, "create run")
    return RunRef(uri, run.info.run_id)


def end_run(run: RunRef, status: str = "FINISHED") -> None:
    """Mark the run finished (or FAILED)."""
    with_retries(lambda: run.client().set_terminated(run.run_id, status=status), "end run")
