"""Deployments, work pools and the local stack, with real components.

* ``prefect.yaml``, the Kubernetes / Docker base job templates and the Dockerfiles are checked for syntax and
  schema (Docker, Kubernetes and CUDA cannot run on these machines).
* :class:`TestDeploymentsOnARealServer`: a Prefect server and an MLflow server started here on free loopback
  ports; ``prefect --no-prompt deploy --all`` from the project's ``prefect.yaml``; the nightly schedule and the
  scheduled runs the server's scheduler creates; a real process worker running the ``retrain`` deployment with
  non-default parameters, checked in MLflow; ``retrain`` and ``nightly-retrain`` triggered together run one after
  the other (the gpu pool's concurrency limit of 1, as ``convmf stack up`` sets it).
* ``convmf stack up`` then ``convmf stack down``: every process of the stack is gone afterwards.

Every process a test starts is in its own process group and is stopped in a fixture finalizer, even on failure.
Timeouts are generous: on a busy 2-core machine a server takes 10-30 s to start and a flow run 20-60 s.
"""

from __future__ import annotations

import ast
import json
import os
import re
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import yaml

from flows import stack
from flows.cli import build_parser, main
from tasks.ingest import builtin_catalogue_dir
from tests.server_support import (PYTHON, ROOT, STARTUP_TIMEOUT_S, Started, alive, base_env, free_port, kill_group,
                                  processes_in_groups, tails, wait_for)

RUN_TIMEOUT_S = 420.0
TIMEZONE = "Europe/Berlin"  # not the default (UTC): shows the time zone is configurable
DEPLOYMENTS = {"nightly-retrain": ("convmf-nightly", "flows/nightly.py:nightly_flow", "gpu"),
               "retrain": ("convmf-training", "flows/training.py:training_flow", "gpu"),
               "score": ("convmf-scoring", "flows/scoring.py:scoring_flow", "cpu")}
# Non-default, tiny: 60 users x 50 items, 3 factors, a tiny CNN, 2 outer iterations.
RETRAIN_PARAMS = {"model_name": "retrain-test",
                  "data": {"source": "builtin", "builtin_users": 60, "builtin_items": 50},
                  "model": {"n_factors": 3, "embedding_dim": 8, "n_filters": 4, "hidden_dim": 8,
                            "max_iterations": 2, "cnn_epochs_per_iteration": 1, "batch_size": 16, "device": "cpu",
                            "posterior_samples": 10, "burn_in": 5},
                  "eval_n": 5}
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def create_flow_run(post: Callable[[str, Any], httpx.Response], deployment_id: str,
                    parameters: dict[str, Any], timeout_s: float = 120.0) -> str:
    """Trigger a deployment run through the API (as the UI's Run button does) and return the run's id.

    A busy SQLite-backed Prefect server answers 503 while its database is locked: the request is sent again with
    the same idempotency key, so it creates one run at most.
    """
    body = {"parameters": parameters, "idempotency_key": uuid.uuid4().hex}
    deadline = time.monotonic() + timeout_s
    while True:
        response = post(f"/deployments/{deployment_id}/create_flow_run", body)
        if response.status_code < 500 or time.monotonic() > deadline:
            assert response.status_code == 201, response.text
            return response.json()["id"]
        time.sleep(1.0)


def cli(args: list[str], env: dict[str, str], timeout_s: float = STARTUP_TIMEOUT_S,
        cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=str(cwd), capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL)


# ------------------------------------------------------------------------------------------------------------------
# prefect.yaml, templates, Dockerfiles: syntax and schema (no server)
# ------------------------------------------------------------------------------------------------------------------


def load_prefect_yaml() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def test_prefect_yaml_defines_the_three_deployments_through_aliases() -> None:
    from prefect.cli.deploy._models import PrefectYamlModel  # what `prefect deploy` validates the file with

    raw = load_prefect_yaml()
    model = PrefectYamlModel.model_validate(raw)
    assert [d.name for d in model.deployments] == list(DEPLOYMENTS)
    by_name = {d["name"]: d for d in raw["deployments"]}
    for name, (_, entrypoint, pool) in DEPLOYMENTS.items():
        d = by_name[name]
        assert d["entrypoint"] == entrypoint and d["work_pool"]["name"] == pool
        path, function = entrypoint.split(":")
        defined = {n.name for n in ast.parse((ROOT / path).read_text()).body if isinstance(n, ast.FunctionDef)}
        assert function in defined, f"{entrypoint}: no function {function}"
        env = d["work_pool"]["job_variables"]["env"]
        assert {"MLFLOW_TRACKING_URI", "CONVMF_HOME", "CUDA_VISIBLE_DEVICES", "PREFECT_SERVER_ANALYTICS_ENABLED",
                "MLFLOW_DISABLE_TELEMETRY"} <= set(env)
        assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false" and env["MLFLOW_DISABLE_TELEMETRY"] == "true"
        assert set(d["parameters"]) == {"params"}, "each flow takes one pydantic model, given as a dict"
    # YAML aliases of the definitions block: one object, reused.
    definitions = raw["definitions"]
    gpu_pool = definitions["work_pools"]["gpu"]
    assert by_name["nightly-retrain"]["work_pool"] is by_name["retrain"]["work_pool"] is gpu_pool
    assert by_name["retrain"]["parameters"]["params"] is definitions["parameters"]["training"]
    assert by_name["nightly-retrain"]["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    assert by_name["retrain"]["concurrency_limit"] is by_name["nightly-retrain"]["concurrency_limit"]
    [schedule] = by_name["nightly-retrain"]["schedules"]
    assert schedule["cron"] == "0 2 * * *" and schedule["timezone"] == "{{ timezone.stdout }}"
    assert by_name["retrain"]["schedules"] == [] and by_name["score"]["schedules"] == []
    assert raw["pull"] == [{"prefect.deployments.steps.set_working_directory":
                            {"directory": "{{ project-root.stdout }}"}}]


def test_deployment_parameters_are_valid_flow_parameters() -> None:
    from flows.params import NightlyParams, ScoringParams, TrainingParams

    by_name = {d["name"]: d for d in load_prefect_yaml()["deployments"]}
    nightly = NightlyParams.model_validate(by_name["nightly-retrain"]["parameters"]["params"])
    training = TrainingParams.model_validate(by_name["retrain"]["parameters"]["params"])
    scoring = ScoringParams.model_validate(by_name["score"]["parameters"]["params"])
    assert nightly.training == training and nightly.scoring == scoring
    # Storage is left to the job variables' environment (MLFLOW_TRACKING_URI, CONVMF_HOME), not fixed here.
    assert training.storage.home is None and training.storage.tracking_uri is None
    TrainingParams.model_validate(RETRAIN_PARAMS)


# The fields the Kubernetes / Docker workers' job configurations accept (prefect-kubernetes / prefect-docker,
# not installed here): a job_configuration key outside these would be rejected by the worker.
K8S_FIELDS = {"command", "env", "labels", "name", "namespace", "job_manifest", "cluster_config",
              "job_watch_timeout_seconds", "pod_watch_timeout_seconds", "stream_output"}
DOCKER_FIELDS = {"command", "env", "labels", "name", "image", "registry_credentials", "image_pull_policy", "networks",
                 "network_mode", "auto_remove", "volumes", "stream_output", "mem_limit", "memswap_limit",
                 "privileged", "container_create_kwargs"}


def render_template(template: dict[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job configuration a worker would get: placeholders filled with the variables' defaults (+ overrides)."""
    from prefect.utilities.templating import apply_values

    values = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
    values.update(overrides or {})
    return apply_values(template["job_configuration"], values)


@pytest.mark.parametrize("name, allowed", [("kubernetes-gpu-pool.json", K8S_FIELDS),
                                           ("docker-gpu-pool.json", DOCKER_FIELDS)])
def test_base_job_templates_are_valid(name: str, allowed: set[str]) -> None:
    import jsonschema
    from prefect.server.schemas.actions import WorkPoolCreate

    template = json.loads((ROOT / "deployments" / name).read_text())
    assert set(template) == {"job_configuration", "variables"}
    assert set(template["job_configuration"]) <= allowed
    # The server's own check: both parts present, every {{ placeholder }} declared in the variables schema.
    WorkPoolCreate(name="t", type=name.split("-")[0], base_job_template=template)
    schema = template["variables"]
    jsonschema.Draft202012Validator.check_schema(schema)
    defaults = {k: v["default"] for k, v in schema["properties"].items() if "default" in v}
    jsonschema.Draft202012Validator(schema).validate({"env": {"A": "b"}, "labels": {}, **defaults})
    assert render_template(template)  # every placeholder resolves


def test_kubernetes_template_requests_a_gpu_on_gpu_nodes() -> None:
    template = json.loads((ROOT / "deployments" / "kubernetes-gpu-pool.json").read_text())
    manifest = render_template(template, {"env": {"CUDA_VISIBLE_DEVICES": "0"}, "labels": {}})["job_manifest"]
    assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
    pod = manifest["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"] == "convmf-worker:cuda"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["restartPolicy"] == "Never"
    mounts = {m["name"] for m in container["volumeMounts"]}
    assert mounts == {v["name"] for v in pod["volumes"]}


def test_docker_template_requests_gpus() -> None:
    template = json.loads((ROOT / "deployments" / "docker-gpu-pool.json").read_text())
    config = render_template(template)
    requests = config["container_create_kwargs"]["device_requests"]
    assert requests == [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]
    docker = pytest.importorskip("docker")  # docker-py (no daemon needed) builds the request Docker would get
    host_config = docker.types.HostConfig(version="1.44", device_requests=requests,
                                          shm_size=config["container_create_kwargs"]["shm_size"])
    assert host_config["DeviceRequests"][0]["Capabilities"] == [["gpu"]]
    assert host_config["DeviceRequests"][0]["Count"] == -1


DOCKERFILE_INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
                           "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: comments dropped, backslash continuations joined."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continuation are skipped by Docker too
        pending += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            keyword, _, rest = pending.strip().partition(" ")
            out.append((keyword, rest.strip()))
            pending = ""
    assert not pending, f"{path}: the last line continues into nothing"
    return out


@pytest.mark.parametrize("name, pool", [("Dockerfile.cpu", "cpu"), ("Dockerfile.cuda", "gpu")])
def test_dockerfiles_parse(name: str, pool: str) -> None:
    path = ROOT / "deployments" / name
    assert path.read_text().startswith("# syntax=docker/dockerfile:1")
    instructions = dockerfile_instructions(path)
    keywords = [k for k, _ in instructions]
    assert all(k in DOCKERFILE_INSTRUCTIONS for k in keywords), keywords
    assert all(k.isupper() for k in keywords)
    first = next(k for k in keywords if k != "ARG")
    assert first == "FROM", "only ARG may come before FROM"
    for keyword, args in instructions:
        if keyword == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{name}: COPY {source} does not exist in the build context"
        if keyword in ("CMD", "ENTRYPOINT", "VOLUME") and args.startswith("["):
            json.loads(args)  # exec form must be a JSON array
    cmd = json.loads(dict(instructions)["CMD"])
    assert cmd[:3] == ["prefect", "worker", "start"] and cmd[cmd.index("--pool") + 1] == pool
    env = " ".join(a for k, a in instructions if k == "ENV")
    assert "CONVMF_PROJECT_ROOT=/opt/convmf" in env and "PREFECT_SERVER_ANALYTICS_ENABLED=false" in env
    ignore = (ROOT / "deployments" / f"{name}.dockerignore").read_text()
    assert "!flows/**" in ignore


def test_stack_cli_has_up_down_status_and_keeps_the_other_commands() -> None:
    parser = build_parser()
    args = parser.parse_args(["stack", "up", "--home", "/tmp/x", "--prefect-port", "4300", "--mlflow-port", "5300",
                              "--timezone", "Asia/Tokyo", "--timeout", "60"])
    assert (args.stack_command, args.prefect_port, args.mlflow_port, args.startup_timeout_s) == ("up", 4300, 5300, 60)
    assert parser.parse_args(["stack", "down", "--timeout", "3"]).stop_timeout_s == 3
    args = parser.parse_args(["stack", "up", "--auth", "--credentials-file", "/etc/convmf/creds"])
    assert (args.auth, args.credentials_file) == (True, "/etc/convmf/creds")
    assert parser.parse_args(["stack", "up"]).auth is None  # unset: $CONVMF_STACK_AUTH or the default decides
    assert parser.parse_args(["stack", "status", "--json"]).json
    for command in (["demo"], ["train"], ["nightly"], ["score"], ["rollback"]):
        assert parser.parse_args(command).command == command[0]
    for command in (["stack", "--help"], ["stack", "up", "--help"], ["stack", "down", "--help"],
                    ["stack", "status", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args(command)
        assert exit_info.value.code == 0


def test_stack_config_reads_flags_over_environment(tmp_path: Path) -> None:
    env = {"CONVMF_HOME": str(tmp_path / "env-home"), "CONVMF_PREFECT_PORT": "4999", "CONVMF_MLFLOW_PORT": "5999",
           "CONVMF_TIMEZONE": "Asia/Tokyo"}
    config = stack.StackConfig.from_env(env, mlflow_port=5111, timezone=None)
    assert config.home == (tmp_path / "env-home").resolve()
    assert (config.prefect_port, config.mlflow_port, config.timezone) == (4999, 5111, "Asia/Tokyo")
    assert config.host == "127.0.0.1"
    assert config.resolved_backend_store_uri() == f"sqlite:///{config.home / 'stack' / 'mlflow.db'}"
    assert config.resolved_log_dir() == config.home / "stack" / "logs"
    assert config.prefect_api_url == "http://127.0.0.1:4999/api"


def test_stack_up_refuses_a_port_in_use_and_starts_nothing(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = stack.StackConfig(home=tmp_path, prefect_port=taken.getsockname()[1], mlflow_port=free_port())
        with pytest.raises(stack.StackError, match="in use"):
            stack.up(config)
    assert not config.state_path.exists()


def test_stack_down_and_status_without_a_stack(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stack", "down", "--home", str(tmp_path)]) == 0
    assert "nothing to stop" in capsys.readouterr().out
    assert main(["stack", "status", "--home", str(tmp_path)]) == 3
    assert "no stack state" in capsys.readouterr().out


STUBBORN = """
import os, signal, subprocess, sys, time
mode = sys.argv[1]
seen = []
def on_term(signum, frame):
    seen.append(signum)
    if mode == "second-sigterm" and len(seen) >= 2:
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term if mode != "sigterm" else signal.SIG_DFL)
if mode != "sigterm":
    # A child in the same process group that ignores SIGTERM: only the group's SIGKILL (or its parent) ends it.
    subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                      "time.sleep(600)"])
print("ready", flush=True)
while True:
    time.sleep(0.1)
"""


def test_stop_groups_escalates_sigterm_then_sigkill_and_leaves_nothing(tmp_path: Path) -> None:
    """A process that exits on SIGTERM, one (like a Prefect process worker) that needs a second SIGTERM, one that
    ignores SIGTERM altogether; each with a child in its group."""
    records, procs = [], []
    for mode in ("sigterm", "second-sigterm", "ignore"):
        proc = subprocess.Popen([PYTHON, "-c", STUBBORN, mode], stdout=subprocess.PIPE, start_new_session=True)
        assert proc.stdout.readline().strip() == b"ready"
        procs.append(proc)
        records.append(stack.ProcessRecord(mode, "worker", proc.pid, str(tmp_path / "log"), [],
                                           stack._start_ticks(proc.pid)))
    pgids = {r.pgid for r in records}
    wait_for("the children to start", lambda: len(processes_in_groups(pgids)) == 5, 30.0)
    try:
        outcome = stack.stop_groups(records, timeout_s=1.5, kill_timeout_s=10.0)
        assert outcome == {"sigterm": "SIGTERM", "second-sigterm": "SIGKILL", "ignore": "SIGKILL"}
        assert not processes_in_groups(pgids)
        assert not any(stack.is_running(r) for r in records)
        assert stack.stop_groups(records) == {r.name: "not running" for r in records}
    finally:
        for proc in procs:
            kill_group(proc.pid, wait_s=2)
            proc.wait(timeout=10)
            proc.stdout.close()


def test_stop_groups_second_sigterm_is_enough_for_a_worker_like_process(tmp_path: Path) -> None:
    proc = subprocess.Popen([PYTHON, "-c", STUBBORN.replace('if mode != "sigterm":', "if False:"),
                             "second-sigterm"], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout.readline().strip() == b"ready"
    record = stack.ProcessRecord("w", "worker", proc.pid, str(tmp_path / "log"), [], stack._start_ticks(proc.pid))
    try:
        assert stack.stop_groups([record], timeout_s=1.5) == {"w": "second SIGTERM"}
        assert proc.wait(timeout=10) == 0
    finally:
        kill_group(proc.pid, wait_s=2)
        proc.stdout.close()


def test_stop_in_order_stops_workers_before_servers(tmp_path: Path) -> None:
    script = ("import signal, sys, time\n"
              "def on_term(signum, frame):\n"
              "    open(sys.argv[1], 'w').write(repr(time.time()))\n"
              "    sys.exit(0)\n"
              "signal.signal(signal.SIGTERM, on_term)\n"
              "print('ready', flush=True)\n"
              "while True:\n"
              "    time.sleep(0.1)\n")
    records, procs = [], []
    for name, role in (("server", "server"), ("worker", "worker")):  # the server is listed first
        proc = subprocess.Popen([PYTHON, "-c", script, str(tmp_path / name)], stdout=subprocess.PIPE,
                                start_new_session=True)
        assert proc.stdout.readline().strip() == b"ready"
        procs.append(proc)
        records.append(stack.ProcessRecord(name, role, proc.pid, "", [], stack._start_ticks(proc.pid)))
    try:
        assert stack.stop_in_order(records, timeout_s=10.0) == {"worker": "SIGTERM", "server": "SIGTERM"}
        assert float((tmp_path / "worker").read_text()) < float((tmp_path / "server").read_text())
    finally:
        for proc in procs:
            kill_group(proc.pid, wait_s=2)
            proc.wait(timeout=10)
            proc.stdout.close()


@pytest.mark.slow
def test_a_failed_stack_up_stops_what_it_started(tmp_path: Path) -> None:
    """MLflow cannot start (a store URI it does not know): the Prefect server started beside it is stopped too."""
    config = stack.StackConfig(home=tmp_path / "home", prefect_port=free_port(), mlflow_port=free_port(),
                               backend_store_uri="nosuchscheme://nowhere", startup_timeout_s=STARTUP_TIMEOUT_S,
                               stop_timeout_s=5.0)
    try:
        with pytest.raises(stack.StackError, match="mlflow-server exited"):
            stack.up(config)
        state = json.loads(config.state_path.read_text())
        assert [p["name"] for p in state["processes"]] == ["prefect-server", "mlflow-server"]
        assert not processes_in_groups({p["pid"] for p in state["processes"]})
    finally:
        if config.state_path.is_file():
            for p in json.loads(config.state_path.read_text())["processes"]:
                kill_group(p["pid"], wait_s=5)


# ------------------------------------------------------------------------------------------------------------------
# A real Prefect server + MLflow server, `prefect deploy --all`, a real process worker
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class Servers:
    prefect_url: str
    mlflow_url: str
    env: dict[str, str]
    home: Path
    artifacts: Path
    logs: Path
    started: Started

    def api(self, path: str, body: Any = None) -> Any:
        url = f"{self.prefect_url}/api{path}"
        response = httpx.get(url, timeout=10) if body is None else httpx.post(url, json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: Any) -> httpx.Response:
        return httpx.post(f"{self.prefect_url}/api{path}", json=body, timeout=30)


@pytest.fixture(scope="class")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    base = tmp_path_factory.mktemp("deploy-servers")
    prefect_port, mlflow_port = free_port(), free_port()
    prefect_url, mlflow_url = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
    env = base_env(base / "prefect-home", f"{prefect_url}/api")
    logs = base / "logs"
    logs.mkdir()
    started = Started()
    try:
        prefect = started.start([PYTHON, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                                 str(prefect_port)], env, logs / "prefect-server.log")
        mlflow = started.start([PYTHON, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                                str(mlflow_port), "--workers", "1", "--backend-store-uri",
                                f"sqlite:///{base / 'mlflow.db'}", "--artifacts-destination",
                                str(base / "mlartifacts")], env, logs / "mlflow-server.log")
        t0 = time.monotonic()
        wait_for("the Prefect server", lambda: httpx.get(f"{prefect_url}/api/health", timeout=3).status_code
                 == 200, STARTUP_TIMEOUT_S, [prefect], started.logs)
        wait_for("the MLflow server", lambda: httpx.get(f"{mlflow_url}/health", timeout=3).status_code == 200,
                 STARTUP_TIMEOUT_S, [mlflow], started.logs)
        print(f"\nservers healthy in {time.monotonic() - t0:.1f} s")
        yield Servers(prefect_url, mlflow_url, env, base / "home", base / "mlartifacts", logs, started)
    finally:
        started.stop()

@pytest.fixture(scope="class")
def deployed(servers: Servers) -> dict[str, Any]:
    """Both process pools, then `prefect --no-prompt deploy --all` from the project root."""
    for pool in ("gpu", "cpu"):
        result = cli([PYTHON, "-m", "prefect", "work-pool", "create", pool, "--type", "process"], servers.env)
        assert result.returncode == 0, result.stdout + result.stderr
    for pool, limit in stack.POOL_CONCURRENCY.items():  # what `convmf stack up` runs
        result = cli(stack.pool_concurrency_command(pool, limit, PYTHON), servers.env)
        assert result.returncode == 0, result.stdout + result.stderr
    env = {**servers.env, "CONVMF_TIMEZONE": TIMEZONE, "MLFLOW_TRACKING_URI": servers.mlflow_url,
           "CONVMF_HOME": str(servers.home), "CONVMF_GPU_DEVICES": "0"}
    env.pop("CONVMF_PROJECT_ROOT", None)
    before = (ROOT / "prefect.yaml").read_text()
    t0 = time.monotonic()
    result = cli([PYTHON, "-m", "prefect", "--no-prompt", "deploy", "--all"], env)
    deployed_at = time.monotonic()
    print(f"\nprefect deploy --all: {deployed_at - t0:.1f} s")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (ROOT / "prefect.yaml").read_text() == before, "prefect deploy must not rewrite prefect.yaml"
    out = {name: servers.api(f"/deployments/name/{flow}/{name}") for name, (flow, _, _) in DEPLOYMENTS.items()}
    out["_deployed_at"] = deployed_at
    return out

@pytest.fixture(scope="class")
def gpu_worker(servers: Servers, deployed: dict[str, Any]) -> Iterator[Path]:
    """A process worker on the gpu pool (stopped before the servers: this fixture depends on them)."""
    log = servers.logs / "worker-gpu.log"
    env = {**servers.env, "PREFECT_WORKER_QUERY_SECONDS": "2"}
    proc = servers.started.start([PYTHON, "-m", "prefect", "worker", "start", "--pool", "gpu", "--type",
                                  "process", "--name", "test-gpu"], env, log)
    try:
        wait_for("the gpu worker to come online", lambda: any(
            w["name"] == "test-gpu" and w["status"] == "ONLINE"
            for w in servers.api("/work_pools/gpu/workers/filter", {})), STARTUP_TIMEOUT_S, [proc], [log])
        yield log
    finally:
        kill_group(proc.pid)


@pytest.mark.slow
class TestDeploymentsOnARealServer:
    """Fixtures are per class: the servers stop before the stack test below starts its own."""

    def test_deploy_all_creates_the_three_deployments(self, servers: Servers, deployed: dict[str, Any]) -> None:
        for name, (flow, entrypoint, pool) in DEPLOYMENTS.items():
            d = deployed[name]
            assert d["entrypoint"] == entrypoint and d["work_pool_name"] == pool
            assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
            env = d["job_variables"]["env"]
            assert env["MLFLOW_TRACKING_URI"] == servers.mlflow_url and env["CONVMF_HOME"] == str(servers.home)
            assert env["CUDA_VISIBLE_DEVICES"] == ("0" if pool == "gpu" else "")
            assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false" and env["MLFLOW_DISABLE_TELEMETRY"] == "true"
            assert d["enforce_parameter_schema"] is True
            assert list(d["parameter_openapi_schema"]["properties"]) == ["params"]
        for name in ("nightly-retrain", "retrain"):
            assert deployed[name]["global_concurrency_limit"]["limit"] == 1
            assert deployed[name]["concurrency_options"]["collision_strategy"] == "ENQUEUE"
        assert deployed["retrain"]["parameters"]["params"]["model_name"] == "convmf"
        assert deployed["nightly-retrain"]["parameters"]["params"]["scoring"]["alias"] == "champion"
        assert deployed["score"]["parameters"]["params"] == {"model_name": "convmf", "alias": "champion", "n": 100}

    def test_the_kubernetes_and_docker_templates_are_accepted_by_the_server(self, servers: Servers) -> None:
        for name in ("kubernetes-gpu-pool.json", "docker-gpu-pool.json"):
            kind = name.split("-")[0]
            template = json.loads((ROOT / "deployments" / name).read_text())
            created = servers.api("/work_pools/", {"name": f"{kind}-gpu", "type": kind,
                                                   "base_job_template": template})
            assert created["base_job_template"] == template

    def test_nightly_schedule_and_the_scheduler_creating_runs(self, servers: Servers,
                                                               deployed: dict[str, Any]) -> None:
        nightly = deployed["nightly-retrain"]
        [schedule] = nightly["schedules"]
        assert schedule["schedule"]["cron"] == "0 2 * * *"
        assert schedule["schedule"]["timezone"] == TIMEZONE
        assert schedule["active"] is True
        assert deployed["retrain"]["schedules"] == [] and deployed["score"]["schedules"] == []

        def scheduled_runs() -> list[dict[str, Any]]:
            return servers.api("/flow_runs/filter", {"flow_runs": {
                "deployment_id": {"any_": [nightly["id"]]}, "state": {"type": {"any_": ["SCHEDULED"]}}}})

        runs = wait_for("the scheduler to create nightly runs", scheduled_runs, 90.0, interval_s=1.0)
        print(f"\nscheduled runs of nightly-retrain: {len(runs)} within "
              f"{time.monotonic() - deployed['_deployed_at']:.1f} s of the deploy")
        from zoneinfo import ZoneInfo
        from datetime import datetime

        for run in runs:
            local = datetime.fromisoformat(run["expected_start_time"].replace("Z", "+00:00")).astimezone(
                ZoneInfo(TIMEZONE))
            assert (local.hour, local.minute) == (2, 0), run["expected_start_time"]

    def test_invalid_parameters_are_rejected_before_a_run_exists(self, servers: Servers,
                                                                  deployed: dict[str, Any]) -> None:
        bad = json.dumps({"params": {"model": {"n_factors": 0}}})
        result = cli([PYTHON, "-m", "prefect", "deployment", "run", "convmf-training/retrain", "--params", bad],
                     servers.env)
        assert result.returncode != 0
        runs = servers.api("/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployed["retrain"]["id"]]}}})
        assert runs == []

    def test_retrain_on_a_process_worker_with_non_default_parameters(self, servers: Servers,
                                                                     deployed: dict[str, Any],
                                                                     gpu_worker: Path) -> None:
        from mlflow import MlflowClient

        t0 = time.monotonic()
        result = cli([PYTHON, "-m", "prefect", "deployment", "run", "convmf-training/retrain",
                      "--params", json.dumps({"params": RETRAIN_PARAMS})], servers.env)
        assert result.returncode == 0, result.stdout + result.stderr
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", result.stdout).group(1)

        def finished() -> dict[str, Any] | None:
            run = servers.api(f"/flow_runs/{run_id}")
            return run if run["state_type"] in TERMINAL else None

        run = wait_for("the retrain run to finish", finished, RUN_TIMEOUT_S, logs=[gpu_worker], interval_s=1.0)
        print(f"\nretrain run: {run['state_type']} {time.monotonic() - t0:.1f} s after `deployment run` "
              f"(flow run time {run['total_run_time']:.1f} s)")
        assert run["state_type"] == "COMPLETED", tails([gpu_worker])
        assert run["parameters"] == {"params": RETRAIN_PARAMS}
        # The job variables reached the run: CONVMF_HOME decided where the built-in catalogue was written.
        assert (builtin_catalogue_dir(servers.home, 60, 50, 0) / "ratings.csv").is_file()

        client = MlflowClient(tracking_uri=servers.mlflow_url, registry_uri=servers.mlflow_url)
        [version] = client.search_model_versions("name='retrain-test'")
        assert version.version == "1"
        assert client.get_model_version_by_alias("retrain-test", "champion").version == "1"
        mlflow_run = client.get_run(version.run_id)
        assert mlflow_run.info.status == "FINISHED"
        params = mlflow_run.data.params
        expected = {"als.n_factors": "3", "als.max_iterations": "2", "cnn.embedding_dim": "8", "cnn.n_filters": "4",
                    "cnn.hidden_dim": "8", "cnn.epochs_per_iteration": "1", "cnn.batch_size": "16",
                    "n_users": "60", "n_items": "50", "device": "cpu"}
        assert {k: params.get(k) for k in expected} == expected
        assert mlflow_run.data.tags["model_name"] == "retrain-test"
        # Artifacts went through the tracking server into its --artifacts-destination.
        assert any(servers.artifacts.rglob("MLmodel")), "the model's files are not in the artifact store"

    def test_retrain_and_nightly_retrain_triggered_together_do_not_overlap(self, servers: Servers,
                                                                          deployed: dict[str, Any],
                                                                          gpu_worker: Path) -> None:
        """A UI trigger of ``retrain`` while ``nightly-retrain`` runs: each deployment's own limit does not see the
        other's runs, the gpu pool's limit does. Both runs complete; the second starts after the first ended."""
        assert servers.api("/work_pools/gpu")["concurrency_limit"] == stack.POOL_CONCURRENCY["gpu"] == 1
        nightly_training = {**RETRAIN_PARAMS, "model_name": "overlap-nightly"}
        triggers = {"nightly-retrain": {"params": {"training": nightly_training,
                                                   "scoring": {"alias": "champion", "n": 5}}},
                    "retrain": {"params": {**RETRAIN_PARAMS, "model_name": "overlap-retrain"}}}
        t0 = time.monotonic()
        run_ids = {}
        for name, parameters in triggers.items():  # at once, as a UI click during the nightly run would
            run_ids[name] = create_flow_run(servers.post, deployed[name]["id"], parameters)

        def both_finished() -> dict[str, dict[str, Any]] | None:
            runs = {name: servers.api(f"/flow_runs/{run_id}") for name, run_id in run_ids.items()}
            return runs if all(r["state_type"] in TERMINAL for r in runs.values()) else None

        runs = wait_for("both runs to finish", both_finished, 2 * RUN_TIMEOUT_S, logs=[gpu_worker], interval_s=1.0)
        assert {name: r["state_type"] for name, r in runs.items()} == {n: "COMPLETED" for n in triggers}, \
            tails([gpu_worker])
        from datetime import datetime

        spans = sorted((datetime.fromisoformat(r["start_time"]), datetime.fromisoformat(r["end_time"]), name)
                       for name, r in runs.items())
        (first_start, first_end, first), (second_start, second_end, second) = spans
        print(f"\n{first} ran {first_start:%H:%M:%S.%f}-{first_end:%H:%M:%S.%f}, {second} "
              f"{second_start:%H:%M:%S.%f}-{second_end:%H:%M:%S.%f}; both done {time.monotonic() - t0:.1f} s "
              "after the triggers")
        assert first_end <= second_start, f"{first} and {second} overlapped"


# ------------------------------------------------------------------------------------------------------------------
# convmf stack up / down
# ------------------------------------------------------------------------------------------------------------------


def convmf_command() -> list[str]:
    script = Path(PYTHON).with_name("convmf")
    return [str(script)] if script.is_file() else [PYTHON, "-m", "flows.cli"]


@pytest.mark.slow
def test_stack_up_then_down_leaves_no_process_behind(tmp_path: Path) -> None:
    home = tmp_path / "home"
    prefect_port, mlflow_port = free_port(), free_port()
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "CONVMF_HOME"):
        env.pop(key, None)
    pgids: set[int] = set()
    try:
        t0 = time.monotonic()
        # From another directory: the stack finds the project's prefect.yaml itself.
        up = cli(convmf_command() + ["stack", "up", "--home", str(home), "--prefect-port", str(prefect_port),
                                     "--mlflow-port", str(mlflow_port), "--timezone", "Asia/Tokyo"], env,
                 timeout_s=3 * STARTUP_TIMEOUT_S, cwd=tmp_path)
        up_s = time.monotonic() - t0
        state_path = home / "stack" / "state.json"
        if state_path.is_file():
            pgids = {p["pid"] for p in json.loads(state_path.read_text())["processes"]}
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads(state_path.read_text())
        names = [p["name"] for p in state["processes"]]
        assert names == ["prefect-server", "mlflow-server", "worker-gpu", "worker-cpu"]
        assert state["prefect"]["port"] == prefect_port and state["mlflow"]["port"] == mlflow_port
        assert all(Path(p["log"]).is_file() for p in state["processes"])
        assert all(alive(p["pid"]) for p in state["processes"])
        prefect_url, mlflow_url = f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}"
        assert httpx.get(f"{mlflow_url}/health", timeout=10).status_code == 200
        nightly = httpx.get(f"{prefect_url}/api/deployments/name/convmf-nightly/nightly-retrain", timeout=10).json()
        assert nightly["schedules"][0]["schedule"]["timezone"] == "Asia/Tokyo"
        assert nightly["job_variables"]["env"]["MLFLOW_TRACKING_URI"] == mlflow_url
        assert nightly["job_variables"]["env"]["CONVMF_HOME"] == str(home.resolve())
        pools = {pool: httpx.get(f"{prefect_url}/api/work_pools/{pool}", timeout=10).json() for pool in ("gpu", "cpu")}
        assert (pools["gpu"]["concurrency_limit"], pools["cpu"]["concurrency_limit"]) == (1, None)
        assert state["auth"]["enabled"] is False  # loopback, no --auth: no credentials needed

        status = cli(convmf_command() + ["stack", "status", "--home", str(home), "--json"], env)
        assert status.returncode == 0, status.stdout + status.stderr
        report = json.loads(status.stdout)
        assert report["running"] and report["prefect"]["healthy"] and report["mlflow"]["healthy"]
        assert report["workers_online"] == {"gpu": ["convmf-gpu"], "cpu": ["convmf-cpu"]}

        every_pid = processes_in_groups(pgids)  # servers' and workers' children included
        assert len(every_pid) >= 4
        t0 = time.monotonic()
        down = cli(convmf_command() + ["stack", "down", "--home", str(home)], env, cwd=tmp_path)
        down_s = time.monotonic() - t0
        assert down.returncode == 0, down.stdout + down.stderr
        print(f"\nstack up {up_s:.1f} s ({state['timings_s']}), down {down_s:.1f} s, {len(every_pid)} processes; "
              f"{json.loads((home / 'stack' / 'last-teardown.json').read_text())['stopped']}")
        assert not [pid for pid in every_pid if alive(pid)], "processes left after stack down"
        assert not processes_in_groups(pgids)
        assert not state_path.exists()
        assert stack.port_is_free("127.0.0.1", prefect_port) and stack.port_is_free("127.0.0.1", mlflow_port)
        # Idempotent: a second down finds nothing to stop.
        again = cli(convmf_command() + ["stack", "down", "--home", str(home)], env, cwd=tmp_path)
        assert again.returncode == 0 and "nothing to stop" in again.stdout
    finally:
        if (home / "stack" / "state.json").is_file():
            stack.down(home, stop_timeout_s=5)
        for pgid in pgids:
            kill_group(pgid, wait_s=5)
