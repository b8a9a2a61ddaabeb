"""The authenticated stack: ``convmf stack up`` with credentials, real servers, a real worker, and a secret scan.

* Credentials are checked before anything starts: a non-loopback host without credentials, a credentials file that
  others can read, or one inside the project checkout is refused with a message that says what to do.
* One module-scoped stack (``stack.up`` with ``auth=True`` on free loopback ports): requests without credentials,
  or with a wrong password, get 401 from both servers; the health checks stay open.
* With credentials, the ``retrain`` deployment runs on the stack's gpu worker (which got the credentials through
  its environment only), and ``models:/<name>@champion`` loads through the authenticated MLflow server.
* Then the stack is stopped and every file under its home (MLflow's SQLite store and auth database, the artifact
  store, the Prefect database, every log, the models and data) is searched for the password, for ``user:password``
  and for its base64 form (the basic-auth header): none may appear.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import pandas as pd
import pytest

from flows import stack
from tests.test_deployments import (RETRAIN_PARAMS, ROOT, RUN_TIMEOUT_S, STARTUP_TIMEOUT_S, TERMINAL,
                                    create_flow_run, free_port, kill_group, tails, wait_for)

USERNAME = "convmf-admin"
MODEL_NAME = "auth-test"


def write_credentials(path: Path, username: str, password: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# stack credentials\n{username}:{password}\n")
    path.chmod(mode)
    return path


# ------------------------------------------------------------------------------------------------------------------
# Credentials: where they may come from (no server)
# ------------------------------------------------------------------------------------------------------------------


def test_loopback_needs_no_credentials_unless_asked(tmp_path: Path) -> None:
    assert stack.load_credentials(stack.StackConfig(home=tmp_path), env={}) is None
    assert stack.load_credentials(stack.StackConfig(home=tmp_path, host="::1"), env={}) is None
    with pytest.raises(stack.StackError, match="asked for"):
        stack.load_credentials(stack.StackConfig(home=tmp_path, auth=True), env={})
    config = stack.StackConfig.from_env({"CONVMF_STACK_AUTH": "true"}, home=tmp_path)
    assert config.auth and config.auth_required
    found = stack.load_credentials(config, env={stack.USERNAME_ENV: "ops", stack.PASSWORD_ENV: "a-long-password"})
    assert (found.username, found.password) == ("ops", "a-long-password")
    assert "a-long-password" not in repr(found)


def test_binding_beyond_loopback_requires_credentials_and_starts_nothing(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "192.0.2.10", "myhost.example"):
        config = stack.StackConfig(home=tmp_path / host, host=host, prefect_port=free_port(),
                                   mlflow_port=free_port())
        assert config.auth_required
        with pytest.raises(stack.StackError, match=rf"binding to {host} .*requires authentication"):
            stack.up(config)
        assert not config.state_path.exists() and not config.stack_dir.exists()


def test_credentials_file_must_be_private_and_outside_the_project(tmp_path: Path) -> None:
    good = write_credentials(tmp_path / "creds", "ops", "correct-horse-battery")
    config = stack.StackConfig(home=tmp_path, auth=True, credentials_file=good)
    assert stack.load_credentials(config, env={}).auth_string == "ops:correct-horse-battery"
    for mode in (0o640, 0o604, 0o660):
        good.chmod(mode)
        with pytest.raises(stack.StackError, match=rf"group or others \(mode 0{mode:o}\).*chmod 600"):
            stack.load_credentials(config, env={})
    good.chmod(0o600)
    short = write_credentials(tmp_path / "short", "ops", "short")
    with pytest.raises(stack.StackError, match="line 2: the password must have at least 12"):
        stack.read_credentials_file(short)
    bad = tmp_path / "bad"
    bad.write_text("no-colon-here\n")
    bad.chmod(0o600)
    with pytest.raises(stack.StackError, match="line 1: expected user:password"):
        stack.read_credentials_file(bad)
    link = tmp_path / "link"
    link.symlink_to(good)
    with pytest.raises(stack.StackError, match="not a regular file"):
        stack.read_credentials_file(link)
    # A file inside the repository is refused even with mode 0600 (checked against a stand-in project root).
    project = tmp_path / "project"
    inside = write_credentials(project / "deployments" / "creds", "ops", "correct-horse-battery")
    with pytest.raises(stack.StackError, match="inside the project checkout"):
        stack.read_credentials_file(inside, project_root=project)
    assert stack.read_credentials_file(good, project_root=ROOT).username == "ops"


# ------------------------------------------------------------------------------------------------------------------
# One authenticated stack for the rest of the module
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class AuthStack:
    config: stack.StackConfig
    state: dict[str, Any]
    credentials: stack.Credentials
    credentials_file: Path

    def prefect(self, path: str, body: Any = None, auth: bool = True) -> httpx.Response:
        url = f"{self.config.prefect_api_url}{path}"
        headers = self.credentials.headers() if auth else {}
        if body is None:
            return httpx.get(url, headers=headers, timeout=30)
        return httpx.post(url, json=body, headers=headers, timeout=30)

    def logs(self) -> list[Path]:
        return [Path(p["log"]) for p in self.state["processes"]]


@pytest.fixture(scope="module")
def auth_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthStack]:
    base = tmp_path_factory.mktemp("auth-stack")
    password = f"pw-{secrets.token_urlsafe(18)}"  # fresh per run: a hit in the scan can only come from this run
    creds_file = write_credentials(base / "private" / "stack-credentials", USERNAME, password)
    config = stack.StackConfig(home=base / "home", prefect_port=free_port(), mlflow_port=free_port(), auth=True,
                               credentials_file=creds_file, startup_timeout_s=STARTUP_TIMEOUT_S,
                               stop_timeout_s=5.0)
    state: dict[str, Any] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PREFECT_WORKER_QUERY_SECONDS", "2")  # workers inherit it: runs are picked up sooner
        for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "CONVMF_HOME"):
            mp.delenv(key, raising=False)
        try:
            t0 = time.monotonic()
            state = stack.up(config)
            print(f"\nauthenticated stack up in {time.monotonic() - t0:.1f} s: {state['timings_s']}")
            yield AuthStack(config, state, stack.read_credentials_file(creds_file), creds_file)
        finally:
            if config.state_path.is_file():
                pgids = [p["pid"] for p in json.loads(config.state_path.read_text())["processes"]]
                stack.down(config.home, stop_timeout_s=5.0)
                for pgid in pgids:
                    kill_group(pgid, wait_s=5)


@pytest.mark.slow
def test_requests_without_credentials_get_401_on_both_servers(auth_stack: AuthStack) -> None:
    assert auth_stack.state["auth"] == {"enabled": True, "username": USERNAME,
                                        "credentials_from": f"{auth_stack.credentials_file}, line 2"}
    mlflow = f"{auth_stack.config.mlflow_url}/api/2.0/mlflow"
    wrong = stack.Credentials(USERNAME, "not-the-password-at-all").headers()
    for headers in ({}, wrong):
        assert httpx.post(f"{auth_stack.config.prefect_api_url}/deployments/filter", json={}, headers=headers,
                          timeout=30).status_code == 401
        assert httpx.get(f"{mlflow}/experiments/search", params={"max_results": 1}, headers=headers,
                         timeout=30).status_code == 401
        assert httpx.get(f"{mlflow}/registered-models/alias", params={"name": MODEL_NAME, "alias": "champion"},
                         headers=headers, timeout=30).status_code == 401
    assert auth_stack.prefect("/deployments/filter", {}).status_code == 200
    assert httpx.get(f"{mlflow}/experiments/search", params={"max_results": 1},
                     headers=auth_stack.credentials.headers(), timeout=30).status_code == 200
    # Health checks stay open (probes carry no credentials); they reveal nothing else.
    assert httpx.get(f"{auth_stack.config.prefect_api_url}/health", timeout=30).status_code == 200
    assert httpx.get(f"{auth_stack.config.mlflow_url}/health", timeout=30).status_code == 200
    # `convmf stack status` reads the credentials again and sees both workers.
    report = stack.status(auth_stack.config.home)
    assert report["running"] and report["workers_online"] == {"gpu": ["convmf-gpu"], "cpu": ["convmf-cpu"]}
    # The MLflow auth config holds no password, and only its owner can read it.
    ini, _ = auth_stack.config.mlflow_auth_paths()
    assert stat.S_IMODE(ini.stat().st_mode) == 0o600
    assert auth_stack.credentials.password not in ini.read_text()


@pytest.fixture(scope="module")
def retrained(auth_stack: AuthStack) -> dict[str, Any]:
    """The ``retrain`` deployment, triggered through the authenticated API and run by the stack's gpu worker."""
    deployment = auth_stack.prefect("/deployments/name/convmf-training/retrain")
    assert deployment.status_code == 200, deployment.text
    params = {**RETRAIN_PARAMS, "model_name": MODEL_NAME}
    run_id = create_flow_run(lambda path, body: auth_stack.prefect(path, body), deployment.json()["id"],
                             {"params": params})
    t0 = time.monotonic()

    def finished() -> dict[str, Any] | None:
        run = auth_stack.prefect(f"/flow_runs/{run_id}").json()
        return run if run["state_type"] in TERMINAL else None

    run = wait_for("the retrain run to finish", finished, RUN_TIMEOUT_S, logs=auth_stack.logs(), interval_s=1.0)
    print(f"\nauthenticated retrain: {run['state_type']} after {time.monotonic() - t0:.1f} s")
    assert run["state_type"] == "COMPLETED", tails(auth_stack.logs())
    return run


@pytest.mark.slow
def test_a_flow_run_through_the_worker_and_the_model_lookup_work_with_credentials(
        auth_stack: AuthStack, retrained: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    # The credentials reached the flow run through the worker's environment only: the deployment and the run
    # (what the Prefect server stores) carry none.
    deployment = auth_stack.prefect("/deployments/name/convmf-training/retrain").json()
    stored = json.dumps([deployment["job_variables"], deployment["parameters"], retrained["parameters"],
                         retrained.get("job_variables")])
    assert auth_stack.credentials.password not in stored and "AUTH_STRING" not in stored
    assert "MLFLOW_TRACKING_PASSWORD" not in stored

    uri = f"models:/{MODEL_NAME}@champion"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    mlflow.set_tracking_uri(auth_stack.config.mlflow_url)
    mlflow.set_registry_uri(auth_stack.config.mlflow_url)
    try:
        with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
            mlflow.pyfunc.load_model(uri)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", auth_stack.credentials.username)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", auth_stack.credentials.password)
        model = mlflow.pyfunc.load_model(uri)
        top = model.predict(pd.DataFrame({"user_id": ["u0001", "u0002"], "n": [3, 3]}))
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    assert len(top) == 6 and set(top.columns) >= {"user_id", "rank", "item_id", "score"}


# ------------------------------------------------------------------------------------------------------------------
# The secret scan
# ------------------------------------------------------------------------------------------------------------------


def secret_forms(credentials: stack.Credentials) -> dict[str, bytes]:
    """Every form in which the password could have been written down."""
    pair = credentials.auth_string.encode()
    return {"password": credentials.password.encode(), "user:password": pair,
            "base64(user:password)": base64.b64encode(pair),
            "base64(user:password), URL-safe": base64.urlsafe_b64encode(pair),
            "password as UTF-16": credentials.password.encode("utf-16-le")}


def scan(root: Path, forms: dict[str, bytes]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Every regular file under ``root`` and the (file, form) pairs where a form occurs."""
    files, hits = [], []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            files.append(path)
            data = path.read_bytes()
            hits.extend((str(path), name) for name, form in forms.items() if form in data)
    return files, hits


def test_the_scan_finds_a_planted_secret(tmp_path: Path) -> None:
    """The scanner is not blind: the password planted in a SQLite database, a log and base64 in a JSON file."""
    import sqlite3

    creds = stack.Credentials("ops", "planted-password-123")
    with sqlite3.connect(tmp_path / "a.db") as conn:
        conn.execute("CREATE TABLE logs (message TEXT)")
        conn.execute("INSERT INTO logs VALUES (?)", ("connecting with planted-password-123",))
    (tmp_path / "x.log").write_text("clean\n")
    (tmp_path / "h.json").write_text(json.dumps({"Authorization": creds.headers()["Authorization"]}))
    _, hits = scan(tmp_path, secret_forms(creds))
    found = {name for _, name in hits}
    assert {"password", "base64(user:password)"} <= found and "user:password" not in found
    assert {Path(f).name for f, _ in hits} == {"a.db", "h.json"}


@pytest.mark.slow
def test_no_secret_in_the_stores_artifacts_databases_or_logs(auth_stack: AuthStack,
                                                              retrained: dict[str, Any]) -> None:
    home = auth_stack.config.home
    report = stack.down(home, stop_timeout_s=5.0)  # closes the databases (SQLite WAL checkpointed)
    assert not report["left"]
    files, hits = scan(home, secret_forms(auth_stack.credentials))
    names = {p.name for p in files}
    suffixes = {p.suffix for p in files}
    print(f"\nsecret scan: {len(files)} files, {sum(p.stat().st_size for p in files) / 1e6:.1f} MB under {home}")
    # What was searched: both servers' databases, MLflow's auth database and artifact store, every process's log.
    assert {"mlflow.db", "mlflow-auth.db", "prefect.db", "MLmodel", "deploy.log", "prefect-server.log",
            "mlflow-server.log", "worker-gpu.log", "worker-cpu.log"} <= names, sorted(names)
    assert ".parquet" in suffixes and ".png" in suffixes
    assert any(auth_stack.config.resolved_artifacts_destination() in str(p) for p in files)
    assert hits == [], f"the password appears in: {hits}"
    # The credentials file itself (outside the stack's home) does hold it: the scan would have found a copy.
    _, own = scan(auth_stack.credentials_file.parent, secret_forms(auth_stack.credentials))
    assert ("password" in {name for _, name in own}) and os.stat(auth_stack.credentials_file).st_mode & 0o077 == 0
