"""MLflow calls retry transient failures only, and a training run survives its tracking server being restarted.

* :func:`tasks.tracking.is_transient` / :func:`tasks.tracking.with_retries` on real exceptions: what MLflow raises
  for a refused connection, a 5xx/429 answer and SQLite's "database is locked" is retried with bounded backoff;
  a 4xx answer (``RESOURCE_ALREADY_EXISTS``, ``INVALID_PARAMETER_VALUE``) fails at once.
* A real ``mlflow server`` (SQLite + artifact directory in a temp dir) and the real training flow pointed at it.
  When the first per-iteration metric reaches the store, the test SIGKILLs the server's process group, waits a few
  seconds and starts it again on the same port. MLflow's own HTTP retries are off for this test
  (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``): every failure reaches the pipeline's retries, the stricter case. The run
  must finish, and every parameter, metric step, artifact and the model version must be there exactly once.
"""

from __future__ import annotations

import logging
import signal
import sqlite3
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

from tasks.tracking import RetryPolicy, is_transient, start_run, with_retries
from tests.server_support import PYTHON, STARTUP_TIMEOUT_S, Started, base_env, free_port, wait_for

# ------------------------------------------------------------------------------------------------------------------
# Which failures are retried (real exceptions, no server needed)
# ------------------------------------------------------------------------------------------------------------------


def refused_port_error() -> MlflowException:
    """What the MLflow client raises when nothing listens on the tracking server's port (HTTP retries off)."""
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        with pytest.raises(MlflowException) as info:
            MlflowClient(tracking_uri=uri).search_experiments()
    return info.value


def locked_store_error(tmp_path: Path) -> BaseException:
    """What a local SQLite store raises while another connection holds the write lock."""
    db = tmp_path / "locked.db"
    uri = f"sqlite:///{db}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("locked")
    holder = sqlite3.connect(db, timeout=0.1)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
            with pytest.raises(Exception) as info:
                MlflowClient(tracking_uri=f"{uri}?timeout=0.1").create_run(experiment)
        return info.value
    finally:
        holder.rollback()
        holder.close()


def test_transient_failures_are_recognised_and_real_errors_are_not(tmp_path: Path) -> None:
    refused = refused_port_error()
    assert "Connection refused" in str(refused) or "Max retries" in str(refused)
    assert is_transient(refused)
    assert is_transient(RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "restarting"}))  # 503
    assert is_transient(RestException({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "slow down"}))  # 429
    assert is_transient(RestException({"error_code": "INTERNAL_ERROR", "message": "boom"}))  # 500
    assert is_transient(ConnectionResetError(104, "Connection reset by peer"))
    assert is_transient(TimeoutError("read timed out"))
    locked = locked_store_error(tmp_path)
    assert "locked" in str(locked).lower(), repr(locked)
    assert is_transient(locked)
    for code in ("RESOURCE_ALREADY_EXISTS", "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST",
                 "PERMISSION_DENIED", "UNAUTHENTICATED"):
        assert not is_transient(RestException({"error_code": code, "message": "no"})), code
    assert not is_transient(MlflowException("Invalid metric name: ''", error_code="INVALID_PARAMETER_VALUE"))
    assert not is_transient(ValueError("a bug"))
    assert not is_transient(KeyError("connection refused"))  # words alone, outside an MLflow error, mean nothing


def test_with_retries_backs_off_within_a_bounded_wait_and_fails_fast_on_real_errors() -> None:
    policy = RetryPolicy(first_delay_s=0.5, factor=2.0, max_delay_s=3.0, max_total_wait_s=10.0)
    assert list(policy.delays()) == [0.5, 1.0, 2.0, 3.0, 3.0, 0.5]
    slept: list[float] = []
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise ConnectionRefusedError(111, "Connection refused")
        return "done"

    assert with_retries(flaky, "flaky", policy, sleep=slept.append) == "done"
    assert slept == [0.5, 1.0, 2.0]

    slept.clear()
    down = ConnectionRefusedError(111, "Connection refused")
    with pytest.raises(ConnectionRefusedError) as info:
        with_retries(lambda: (_ for _ in ()).throw(down), "always down", policy, sleep=slept.append)
    assert sum(slept) == pytest.approx(10.0) and len(slept) == 6
    assert any("gave up after 7 attempts" in note for note in info.value.__notes__)

    slept.clear()
    calls.clear()

    def exists() -> None:
        calls.append(1)
        raise RestException({"error_code": "RESOURCE_ALREADY_EXISTS", "message": "Experiment 'x' already exists."})

    with pytest.raises(RestException):
        with_retries(exists, "create", policy, sleep=slept.append)
    assert calls == [1] and slept == []


def test_start_run_after_a_lost_answer_does_not_create_a_second_run(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The first create_run reaches the store, but its answer is lost (the connection breaks): the retry finds the
    run by its client token instead of creating another."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    real_create = MlflowClient.create_run
    lost = []

    def create_then_lose_the_answer(self: MlflowClient, *args, **kwargs):
        run = real_create(self, *args, **kwargs)
        if not lost:
            lost.append(run.info.run_id)
            raise ConnectionResetError(104, "Connection reset by peer")
        return run

    monkeypatch.setattr(MlflowClient, "create_run", create_then_lose_the_answer)
    monkeypatch.setenv("CONVMF_MLFLOW_RETRY_MAX_WAIT_S", "5")
    ref = start_run(uri, "lost-answer", tmp_path / "artifacts", "training", {"model_name": "m"})
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("lost-answer").experiment_id])
    assert [r.info.run_id for r in runs] == lost == [ref.run_id]


# ------------------------------------------------------------------------------------------------------------------
# A real MLflow server, killed and restarted during a training run
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class MlflowServer:
    """One ``mlflow server`` on a fixed port that the test can kill and start again."""

    base: Path
    port: int
    started: Started = field(default_factory=Started)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db(self) -> Path:
        return self.base / "mlflow.db"

    @property
    def artifacts(self) -> Path:
        return self.base / "mlartifacts"

    @property
    def log(self) -> Path:
        return self.base / "mlflow-server.log"

    def start(self) -> float:
        """Start the server and wait for its health check; returns the seconds it took."""
        env = base_env(self.base / "prefect-home", "http://127.0.0.1:9/api")  # no Prefect server is involved
        t0 = time.monotonic()
        self.proc = self.started.start([PYTHON, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                                        str(self.port), "--workers", "1", "--backend-store-uri",
                                        f"sqlite:///{self.db}", "--artifacts-destination", str(self.artifacts)],
                                       env, self.log)
        wait_for("the MLflow server", lambda: httpx.get(f"{self.url}/health", timeout=3).status_code == 200,
                 STARTUP_TIMEOUT_S, [self.proc], [self.log])
        return time.monotonic() - t0

    def kill(self) -> None:
        """SIGKILL the server's whole process group (uvicorn and its worker), as a crash would."""
        assert self.proc is not None
        import os

        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        wait_for("the killed server's port to be free", lambda: _port_closed(self.port), 30.0)


def _port_closed(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
    except httpx.HTTPError:
        return True
    return False


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-restart"), free_port())
    try:
        server.start()
        yield server
    finally:
        server.started.stop()


def _count_metric_rows(db: Path, key: str) -> int:
    """Rows of metric ``key`` in the server's SQLite store, read-only (the server may be writing)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0) as conn:
            return conn.execute("SELECT count(*) FROM metrics WHERE key = ?", (key,)).fetchone()[0]
    except sqlite3.Error:
        return 0


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append((time.time(), record.getMessage()))


@pytest.mark.slow
def test_training_run_survives_an_mlflow_server_restart(mlflow_server: MlflowServer, prefect_harness: None,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.params import DataParams, ModelParams, StorageParams, TrainingParams
    from flows.training import training_flow

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # every failure reaches the pipeline's retries
    monkeypatch.setenv("CONVMF_MLFLOW_RETRY_MAX_WAIT_S", str(STARTUP_TIMEOUT_S))
    model_name = "restart-test"
    iterations = 6
    params = TrainingParams(
        model_name=model_name, data=DataParams(builtin_users=60, builtin_items=50),
        model=ModelParams(n_factors=3, embedding_dim=8, n_filters=4, hidden_dim=8, max_iterations=iterations,
                          patience=iterations, cnn_epochs_per_iteration=1, batch_size=16, device="cpu",
                          posterior_samples=10, burn_in=5),
        storage=StorageParams(home=str(tmp_path / "home"), tracking_uri=mlflow_server.url), eval_n=5)

    events: dict[str, float] = {}
    failures: list[BaseException] = []
    stop = threading.Event()

    def crash_and_restart() -> None:
        try:
            deadline = time.monotonic() + 300
            while _count_metric_rows(mlflow_server.db, "train_loss") == 0:  # the first iteration was logged
                if stop.is_set() or time.monotonic() > deadline:
                    return
                time.sleep(0.05)
            mlflow_server.kill()
            events["killed"] = time.time()
            time.sleep(3.0)
            events["restarting"] = time.time()
            events["restart_s"] = mlflow_server.start()
            events["up"] = time.time()
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failures.append(exc)

    records = _Records()
    loggers = [logging.getLogger(name) for name in ("prefect.task_runs", "prefect.flow_runs", "tasks.tracking")]
    for logger in loggers:
        logger.addHandler(records)
    chaos = threading.Thread(target=crash_and_restart, name="mlflow-chaos", daemon=True)
    chaos.start()
    t0 = time.time()
    try:
        result = training_flow(params)
    finally:
        stop.set()
        chaos.join(timeout=STARTUP_TIMEOUT_S)
        for logger in loggers:
            logger.removeHandler(records)
    finished = time.time()
    assert not failures, failures
    assert {"killed", "up"} <= set(events), f"the server was not restarted during the run: {events}"
    assert t0 < events["killed"] < events["up"] < finished
    retries = [m for t, m in records.messages if "retry" in m and events["killed"] <= t <= events["up"] + 1]
    print(f"\nrun {finished - t0:.1f} s; server down {events['up'] - events['killed']:.1f} s "
          f"(restart {events['restart_s']:.1f} s); {len(retries)} retries logged, e.g. {retries[:1]}")
    assert retries, "no call was retried while the server was down"

    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name(params.storage.experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [result.run.run_id], "one MLflow run, not two"
    run = client.get_run(result.run.run_id)
    assert run.info.status == "FINISHED"

    # Parameters: the configuration as given.
    logged = run.data.params
    expected = {"als.n_factors": "3", "als.max_iterations": str(iterations), "cnn.embedding_dim": "8",
                "cnn.n_filters": "4", "n_users": "60", "n_items": "50", "device": "cpu"}
    assert {k: logged.get(k) for k in expected} == expected

    # Metrics: every (key, step) exactly once in the store, and every iteration's figures there.
    with sqlite3.connect(f"file:{mlflow_server.db}?mode=ro", uri=True) as conn:
        duplicated = conn.execute("SELECT key, step, count(*) FROM metrics WHERE run_uuid = ? GROUP BY key, step "
                                  "HAVING count(*) > 1", (run.info.run_id,)).fetchall()
        n_metric_rows = conn.execute("SELECT count(*) FROM metrics WHERE run_uuid = ?",
                                     (run.info.run_id,)).fetchone()[0]
    assert duplicated == [], f"metrics logged twice: {duplicated}"
    assert result.trained is not None
    for key in ("train_loss", "validation_rmse", "iteration_seconds"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == sorted(set(steps)) and len(steps) == result.trained.iterations, (key, steps)
    assert {"test_rmse", "best_validation_rmse"} <= set(run.data.metrics)

    # Artifacts: the learning curve and the model, each file once, in the server's artifact store.
    def files(path: str | None = None) -> list[str]:
        out = []
        for entry in client.list_artifacts(run.info.run_id, path):
            out.extend(files(entry.path) if entry.is_dir else [entry.path])
        return out

    artifacts = files()
    assert len(artifacts) == len(set(artifacts))
    assert "plots/learning_curve.png" in artifacts
    stored = [p for p in mlflow_server.artifacts.rglob("*") if p.is_file()]
    assert any(p.name == "learning_curve.png" for p in stored) and any(p.name == "MLmodel" for p in stored)

    # The model version: registered once, from this run.
    versions = client.search_model_versions(f"name = '{model_name}'")
    assert [(v.version, v.run_id) for v in versions] == [("1", run.info.run_id)]
    print(f"{n_metric_rows} metric rows, {len(logged)} params, {len(artifacts)} run artifacts, 1 model version")
