"""A local, production-like stack on one machine: ``convmf stack up`` / ``down`` / ``status``.

``up`` starts a Prefect server and an MLflow tracking server (SQLite store + artifact directory, one web worker)
on 127.0.0.1, creates the ``gpu`` and ``cpu`` process work pools, deploys ``prefect.yaml`` from the project root
(``prefect --no-prompt deploy --all``) and starts one process worker per pool. Every process is started in its
own session (process group), and its PID, ports and log file go to ``<home>/stack/state.json`` as soon as it
starts, so that ``down`` can stop whatever ``up`` left, even after a failed start.

``down`` stops the workers first (a Prefect worker whose server is gone hangs), then both servers: SIGTERM to the
process group, a wait, a second SIGTERM (a process worker ignores the first one while it winds down), a wait, then
SIGKILL. It returns once no process of any group is left.

Both servers bind 127.0.0.1 unless told otherwise. Binding any other interface requires authentication on both
(``up`` refuses to start without credentials), and ``auth=True`` turns it on for loopback too:

* Prefect: ``PREFECT_SERVER_API_AUTH_STRING`` (``user:password``) on the server; ``PREFECT_API_AUTH_STRING`` for the
  CLI calls of ``up`` and for the workers, whose flow runs inherit it.
* MLflow: ``mlflow server --app-name basic-auth`` with an auth config (``MLFLOW_AUTH_CONFIG_PATH``: default
  permission, its own user database ``<home>/stack/mlflow-auth.db``, the admin's name); the admin's password goes
  to the server only through ``MLFLOW_AUTH_ADMIN_PASSWORD`` in its environment, so it is written to no file of the
  stack. Clients use ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``.
* Credentials come from ``$CONVMF_STACK_USERNAME`` / ``$CONVMF_STACK_PASSWORD`` or from a file (``--credentials-file``,
  one line ``user:password``) that only its owner can read (mode 0600) and that is not inside the project checkout.
  Workers get them through their process environment, never through deployment parameters or job variables
  (which the Prefect server stores). The state file records that auth is on and the user, not the password.

The ``gpu`` pool gets a concurrency limit of 1 (:data:`POOL_CONCURRENCY`): ``retrain`` and ``nightly-retrain`` both
run there, so a run of one waits (state Scheduled, shown as Late) while a run of the other is Pending or Running.

Everything is configurable through :class:`StackConfig` (``convmf stack up --help`` lists the flags, and
:meth:`StackConfig.from_env` the environment variables). Linux/macOS only (process groups and signals).
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import secrets
import signal
import stat
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

PROJECT_ROOT = Path(__file__).resolve().parent.parent
POOLS = ("gpu", "cpu")
DEPLOYMENTS = ("convmf-nightly/nightly-retrain", "convmf-training/retrain", "convmf-scoring/score")
# Work-pool concurrency limits: one flow run at a time on the gpu pool, whichever deployment it comes from
# (retrain and nightly-retrain); further runs wait in the pool's queue, oldest first (Prefect's ENQUEUE behaviour).
POOL_CONCURRENCY = {"gpu": 1}
STATE_FILE = "state.json"
TEARDOWN_FILE = "last-teardown.json"
# Offline machines: Prefect's telemetry otherwise logs tracebacks (and can lock its SQLite database). MLflow's job
# runner (GenAI scorer jobs: 8 extra processes) is not used by this pipeline and is off unless set otherwise.
QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
DEFAULT_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

# Environment variables read by StackConfig.from_env (flags of ``convmf stack up`` override them).
ENV_VARS = {
    "home": "CONVMF_HOME",
    "host": "CONVMF_STACK_HOST",
    "prefect_port": "CONVMF_PREFECT_PORT",
    "mlflow_port": "CONVMF_MLFLOW_PORT",
    "backend_store_uri": "CONVMF_MLFLOW_BACKEND_STORE_URI",
    "artifacts_destination": "CONVMF_MLFLOW_ARTIFACTS_DESTINATION",
    "prefect_home": "CONVMF_PREFECT_HOME",
    "log_dir": "CONVMF_STACK_LOG_DIR",
    "timezone": "CONVMF_TIMEZONE",
    "gpu_devices": "CONVMF_GPU_DEVICES",
    "startup_timeout_s": "CONVMF_STACK_STARTUP_TIMEOUT",
    "stop_timeout_s": "CONVMF_STACK_STOP_TIMEOUT",
    "auth": "CONVMF_STACK_AUTH",
    "credentials_file": "CONVMF_STACK_CREDENTIALS_FILE",
}
# Credentials from the environment (a credentials file, when given, wins). Never passed on to the stack's processes.
USERNAME_ENV = "CONVMF_STACK_USERNAME"
PASSWORD_ENV = "CONVMF_STACK_PASSWORD"
MIN_PASSWORD_LENGTH = 12  # MLflow's basic-auth password policy
MLFLOW_AUTH_DB = "mlflow-auth.db"
MLFLOW_AUTH_INI = "mlflow-auth.ini"
# StackConfig's Path fields: strings in the environment and in the state file.
_PATH_FIELDS = ("home", "prefect_home", "log_dir", "project_root", "credentials_file")


class StackError(RuntimeError):
    """The stack could not be started, or its state file is unusable."""


@dataclass(frozen=True)
class StackConfig:
    """Where the stack keeps its files and which ports it binds.

    ``backend_store_uri``, ``artifacts_destination``, ``prefect_home`` and ``log_dir`` default to
    ``<home>/stack/{mlflow.db, mlartifacts, prefect, logs}``.
    """

    home: Path
    host: str = "127.0.0.1"
    prefect_port: int = 4200
    mlflow_port: int = 5000
    backend_store_uri: str | None = None
    artifacts_destination: str | None = None
    prefect_home: Path | None = None
    log_dir: Path | None = None
    timezone: str = "UTC"
    gpu_devices: str = "0"
    project_root: Path = PROJECT_ROOT
    startup_timeout_s: float = 240.0
    stop_timeout_s: float = 10.0
    auth: bool = False  # authentication on loopback too (always on for any other interface)
    credentials_file: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "StackConfig":
        """Defaults, then the ``CONVMF_*`` variables of :data:`ENV_VARS`, then ``overrides`` (``None`` = unset)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, var in ENV_VARS.items():
            if env.get(var):
                values[name] = env[var]
        values.update({k: v for k, v in overrides.items() if v is not None})
        values.setdefault("home", Path.cwd() / "convmf-data")
        kinds = {"prefect_port": int, "mlflow_port": int, "startup_timeout_s": float, "stop_timeout_s": float,
                 "auth": _flag, **dict.fromkeys(_PATH_FIELDS, Path)}
        for name, kind in kinds.items():
            if name in values and values[name] is not None:
                values[name] = kind(values[name])
        config = cls(**values)
        return replace(config, home=config.home.expanduser().resolve())

    @property
    def stack_dir(self) -> Path:
        """``<home>/stack``: the state file and, by default, the stores and logs."""
        return self.home / "stack"

    @property
    def state_path(self) -> Path:
        """The state file that ``down`` and ``status`` read."""
        return self.stack_dir / STATE_FILE

    def resolved_log_dir(self) -> Path:
        """Where each process's log file goes."""
        return (self.log_dir or self.stack_dir / "logs").expanduser().resolve()

    def resolved_prefect_home(self) -> Path:
        """``PREFECT_HOME`` of every stack process: the Prefect server's SQLite database lives there."""
        return (self.prefect_home or self.stack_dir / "prefect").expanduser().resolve()

    def resolved_backend_store_uri(self) -> str:
        """The MLflow server's tracking and registry store."""
        return self.backend_store_uri or f"sqlite:///{self.stack_dir / 'mlflow.db'}"

    def resolved_artifacts_destination(self) -> str:
        """Where the MLflow server stores the artifacts that clients upload through it."""
        return self.artifacts_destination or str(self.stack_dir / "mlartifacts")

    @property
    def prefect_url(self) -> str:
        """The Prefect server (UI) address."""
        return f"http://{_url_host(self.host)}:{self.prefect_port}"

    @property
    def prefect_api_url(self) -> str:
        """``PREFECT_API_URL`` for clients and workers."""
        return f"{self.prefect_url}/api"

    @property
    def mlflow_url(self) -> str:
        """The MLflow tracking server (UI and ``MLFLOW_TRACKING_URI``)."""
        return f"http://{_url_host(self.host)}:{self.mlflow_port}"

    @property
    def auth_required(self) -> bool:
        """Whether both servers require credentials: asked for with ``auth``, or bound beyond loopback."""
        return self.auth or not is_loopback(self.host)

    def mlflow_auth_paths(self) -> tuple[Path, Path]:
        """The MLflow auth app's config file and user database (under ``<home>/stack``)."""
        return self.stack_dir / MLFLOW_AUTH_INI, self.stack_dir / MLFLOW_AUTH_DB


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise StackError(f"${ENV_VARS['auth']} must be true or false, not {value!r}")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback name or address (only this machine can connect)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost: may resolve to any interface


# ------------------------------------------------------------------------------------------------------------------
# Credentials
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """One user and password for both servers (never printed: the password is left out of ``repr``)."""

    username: str
    password: str = field(repr=False)
    source: str = ""

    @property
    def auth_string(self) -> str:
        """Prefect's ``user:password`` auth string."""
        return f"{self.username}:{self.password}"

    def headers(self) -> dict[str, str]:
        """The HTTP basic-auth header both servers accept."""
        token = base64.b64encode(self.auth_string.encode()).decode()
        return {"Authorization": f"Basic {token}"}


def _check_credentials(username: str, password: str, source: str) -> Credentials:
    if not username or ":" in username or any(c.isspace() for c in username):
        raise StackError(f"{source}: the user name must be non-empty, without ':' or spaces")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise StackError(f"{source}: the password must have at least {MIN_PASSWORD_LENGTH} characters "
                         "(MLflow's basic-auth policy)")
    return Credentials(username, password, source)


def read_credentials_file(path: Path, project_root: Path = PROJECT_ROOT) -> Credentials:
    """``user:password`` from the first non-empty, non-comment line of ``path``.

    Refused: a file others can read or write (mode must be 0600 or stricter), a file that is not a regular file,
    and a file inside the project checkout (credentials never live in the repository).
    """
    path = Path(path).expanduser()
    try:
        info = path.lstat()
    except FileNotFoundError:
        raise StackError(f"credentials file {path} does not exist") from None
    if not stat.S_ISREG(info.st_mode):
        raise StackError(f"credentials file {path} is not a regular file (a symbolic link or a directory)")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise StackError(f"credentials file {path} is readable or writable by group or others (mode {mode:04o}): "
                         f"run `chmod 600 {path}`")
    resolved, root = path.resolve(), Path(project_root).resolve()
    if resolved == root or root in resolved.parents:
        raise StackError(f"credentials file {path} is inside the project checkout {root}: keep credentials out of "
                         "the repository (e.g. ~/.config/convmf/stack-credentials, mode 0600)")
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        username, sep, password = line.partition(":")
        if not sep:
            raise StackError(f"{path}, line {number}: expected user:password")
        return _check_credentials(username.strip(), password, f"{path}, line {number}")
    raise StackError(f"credentials file {path} holds no user:password line")


def load_credentials(config: StackConfig, env: Mapping[str, str] | None = None) -> Credentials | None:
    """The stack's credentials when auth is required (``None`` otherwise): the config's credentials file, else
    ``$CONVMF_STACK_USERNAME`` / ``$CONVMF_STACK_PASSWORD``; a clear error when neither is there."""
    env = os.environ if env is None else env
    if not config.auth_required:
        return None
    if config.credentials_file is not None:
        return read_credentials_file(config.credentials_file, config.project_root)
    if env.get(USERNAME_ENV) and env.get(PASSWORD_ENV):
        return _check_credentials(env[USERNAME_ENV], env[PASSWORD_ENV], f"${USERNAME_ENV}/${PASSWORD_ENV}")
    why = (f"binding to {config.host} (not loopback)" if not is_loopback(config.host)
           else "authentication was asked for (--auth)")
    raise StackError(f"{why} requires authentication on both servers, but no credentials were given: set "
                     f"${USERNAME_ENV} and ${PASSWORD_ENV}, or pass --credentials-file FILE "
                     f"(${ENV_VARS['credentials_file']}; one line user:password, mode 0600, outside the project)")


@dataclass(frozen=True)
class ProcessRecord:
    """One long-running process of the stack, the leader of its own process group."""

    name: str
    role: str  # "server" or "worker"
    pid: int
    log: str
    command: list[str]
    start_ticks: int | None = None  # /proc start time: tells our process from a later one with a reused PID

    @property
    def pgid(self) -> int:
        """Its process group (it was started in a new session, so the group id is its PID)."""
        return self.pid


# ------------------------------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------------------------------


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, pgid, start_ticks)`` of a process from ``/proc`` (``None`` if it does not exist or no /proc)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces and parentheses
    return fields[0], int(fields[2]), int(fields[19])


def _start_ticks(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return stat[2] if stat else None


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``.

    Reads ``/proc`` where there is one; elsewhere, ``[pgid]`` while the group can be signalled.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat and stat[1] == pgid and stat[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def is_running(record: ProcessRecord) -> bool:
    """Whether any process of the record's group is alive (and the group is still ours, not a reused id)."""
    if record.start_ticks is not None:
        ticks = _start_ticks(record.pid)
        if ticks is not None and ticks != record.start_ticks:
            return False  # the PID now belongs to another process: ours is long gone
    return bool(group_members(record.pgid))


def _reap(pid: int) -> None:
    """Collect the exit status of our own child (started in this process), so that it leaves no zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        pass


def stop_groups(records: Iterable[ProcessRecord], timeout_s: float = 10.0,
                kill_timeout_s: float = 10.0) -> dict[str, str]:
    """Stop the process groups of ``records`` together and wait until none of their processes is left.

    SIGTERM, wait up to ``timeout_s``; SIGTERM again, wait up to ``timeout_s``; then SIGKILL and wait up to
    ``kill_timeout_s``. Returns, for each record, how it ended: ``"not running"``, ``"SIGTERM"``,
    ``"second SIGTERM"``, ``"SIGKILL"`` or ``"still running"`` (only if even SIGKILL did not end it in time).
    """
    records = list(records)
    outcome = {r.name: "not running" for r in records}
    alive = [r for r in records if is_running(r)]
    steps = ((signal.SIGTERM, "SIGTERM", timeout_s), (signal.SIGTERM, "second SIGTERM", timeout_s),
             (signal.SIGKILL, "SIGKILL", kill_timeout_s))
    for signum, label, wait_s in steps:
        if not alive:
            break
        for r in alive:
            try:
                os.killpg(r.pgid, signum)
            except (ProcessLookupError, PermissionError):
                pass
            outcome[r.name] = label
        deadline = time.monotonic() + wait_s
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            for r in alive:
                _reap(r.pid)
            alive = [r for r in alive if is_running(r)]
    for r in alive:
        outcome[r.name] = "still running"
    return outcome


def stop_in_order(records: Iterable[ProcessRecord], timeout_s: float = 10.0) -> dict[str, str]:
    """Stop the workers first (a Prefect worker whose server is gone hangs), then the servers; see
    :func:`stop_groups` for each step and the outcomes returned."""
    records = list(records)
    stopped = stop_groups([r for r in records if r.role == "worker"], timeout_s)
    stopped.update(stop_groups([r for r in records if r.role != "worker"], timeout_s))
    return stopped


# Variables that carry credentials: dropped from the inherited environment, then set only where needed.
_SECRET_VARS = (USERNAME_ENV, PASSWORD_ENV, "PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING",
                "PREFECT_API_KEY", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
                "MLFLOW_AUTH_CONFIG_PATH")


def client_environment(credentials: Credentials | None) -> dict[str, str]:
    """What a client of an authenticated stack needs (Prefect CLI, workers and their flow runs, MLflow clients)."""
    if credentials is None:
        return {}
    return {"PREFECT_API_AUTH_STRING": credentials.auth_string,
            "MLFLOW_TRACKING_USERNAME": credentials.username, "MLFLOW_TRACKING_PASSWORD": credentials.password}


def _mlflow_server_auth(config: StackConfig, credentials: Credentials) -> dict[str, str]:
    """Write the MLflow auth app's config (no password in it) and return the server's auth environment."""
    ini, db = config.mlflow_auth_paths()
    text = ("# Written by `convmf stack up` (flows/stack.py). The admin password is not stored here: the server\n"
            "# gets it through MLFLOW_AUTH_ADMIN_PASSWORD, and keeps only its hash in the database below.\n"
            "[mlflow]\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = sqlite:///{db}\n"
            f"admin_username = {credentials.username}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "# One server process: a cached credential check is never stale (a password change through the API\n"
            "# clears it), and it saves a PBKDF2 hash per request.\n"
            "auth_cache_ttl_seconds = 300\n")
    ini.parent.mkdir(parents=True, exist_ok=True)
    tmp = ini.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.chmod(0o600)
    os.replace(tmp, ini)
    return {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_USERNAME": credentials.username,
            "MLFLOW_AUTH_ADMIN_PASSWORD": credentials.password,
            # CSRF key of the auth app's sign-up form: one server process, so a fresh key per start is enough.
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}


def _environment(config: StackConfig) -> dict[str, str]:
    """The environment of every stack process: ours (without credentials), quiet, pointed at this stack's servers
    and stores. Credentials are added per process (:func:`client_environment`, the servers' own variables)."""
    inherited = {k: v for k, v in os.environ.items() if k not in _SECRET_VARS}
    env = {**DEFAULT_ENV, **inherited, **QUIET_ENV}
    env.update({
        "PREFECT_HOME": str(config.resolved_prefect_home()),
        "PREFECT_API_URL": config.prefect_api_url,
        "MLFLOW_TRACKING_URI": config.mlflow_url,
        "CONVMF_HOME": str(config.home),
        # Read by prefect.yaml's build steps when deploying.
        "CONVMF_TIMEZONE": config.timezone,
        "CONVMF_GPU_DEVICES": config.gpu_devices,
        "CONVMF_PROJECT_ROOT": str(config.project_root),
    })
    env.pop("PREFECT_PROFILE", None)  # a profile of the user's own PREFECT_HOME does not exist in ours
    # Console scripts of this environment (uvicorn, prefect, mlflow) on PATH: MLflow execs some of them by name.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def _spawn(name: str, role: str, command: list[str], env: Mapping[str, str], log_path: Path,
           cwd: Path) -> tuple[subprocess.Popen, ProcessRecord]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n===== {dt.datetime.now().isoformat(timespec='seconds')} {' '.join(command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(env), cwd=str(cwd), start_new_session=True)
    return proc, ProcessRecord(name, role, proc.pid, str(log_path), command, _start_ticks(proc.pid))


def _tail(path: str | Path, lines: int = 25) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def port_is_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound now (nothing listens there)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As the servers bind: connections of a stopped server in TIME_WAIT do not count, a listener does.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _http(url: str, body: Any = None, timeout_s: float = 5.0,
          credentials: Credentials | None = None) -> tuple[int, Any]:
    """GET (or POST ``body`` as JSON) ``url``, with basic auth when ``credentials`` are given; returns the status
    and the decoded JSON or text body."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(credentials.headers() if credentials else {})}
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            raw = response.read().decode(errors="replace")
            status = response.status
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def _healthy(url: str) -> bool:
    try:
        return _http(url, timeout_s=3.0)[0] == 200
    except (OSError, urllib.error.URLError):
        return False


def prefect_healthy(config: StackConfig) -> bool:
    """Whether the Prefect server answers its health check."""
    return _healthy(f"{config.prefect_api_url}/health")


def mlflow_healthy(config: StackConfig) -> bool:
    """Whether the MLflow server answers its health check."""
    return _healthy(f"{config.mlflow_url}/health")


def online_workers(config: StackConfig, pool: str, credentials: Credentials | None = None) -> list[str]:
    """Names of the workers the Prefect server sees ONLINE on ``pool``."""
    try:
        status, workers = _http(f"{config.prefect_api_url}/work_pools/{pool}/workers/filter", body={},
                                credentials=credentials)
    except (OSError, urllib.error.URLError):
        return []
    if status != 200 or not isinstance(workers, list):
        return []
    return [w["name"] for w in workers if w.get("status") == "ONLINE"]


def check_auth(config: StackConfig, credentials: Credentials) -> None:
    """Both servers refuse a request without credentials (401) and accept one with them; else :class:`StackError`.

    An MLflow auth database created earlier keeps the admin password it was created with (MLflow reads the
    configured one only to create the admin): a different password then gets 401, and the error says so.
    """
    probes = (("Prefect", f"{config.prefect_api_url}/work_pools/filter", {}),
              ("MLflow", f"{config.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1", None))
    for what, url, body in probes:
        anonymous = _http(url, body=body)[0]
        if anonymous != 401:
            raise StackError(f"the {what} server answered {anonymous} to a request without credentials "
                             f"({url}): authentication is not on")
        status, answer = _http(url, body=body, credentials=credentials)
        if status != 200:
            hint = ""
            if what == "MLflow" and status == 401:
                hint = (f": its user database {config.mlflow_auth_paths()[1]} holds user {credentials.username!r} "
                        "with another password (MLflow sets the admin password only when it creates the user); "
                        "use that password, or remove the database to create the user again")
            raise StackError(f"the {what} server refused the stack's credentials ({status}){hint}")


def _wait(what: str, ready: Callable[[], bool], watched: list[tuple[subprocess.Popen, ProcessRecord]],
          timeout_s: float) -> float:
    """Poll ``ready()`` until true; fail early if a watched process exits. Returns the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if ready():
            return time.monotonic() - t0
        for proc, record in watched:
            if proc.poll() is not None:
                raise StackError(f"{record.name} exited with code {proc.returncode} while waiting for {what}; "
                                 f"last lines of {record.log}:\n{_tail(record.log)}")
        time.sleep(0.5)
    raise StackError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _run(command: list[str], env: Mapping[str, str], cwd: Path, log_path: Path, timeout_s: float) -> None:
    """Run a short command to completion, appending its output to ``log_path``; raise on failure."""
    with open(log_path, "ab") as log:
        log.write(f"\n===== {dt.datetime.now().isoformat(timespec='seconds')} {' '.join(command)}\n".encode())
        log.flush()
        try:
            rc = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(env), cwd=str(cwd), timeout=timeout_s).returncode
        except subprocess.TimeoutExpired as exc:
            raise StackError(f"{' '.join(command)} did not finish in {timeout_s:.0f} s (log: {log_path})") from exc
    if rc != 0:
        raise StackError(f"{' '.join(command)} failed with code {rc}; last lines of {log_path}:\n{_tail(log_path)}")


# ------------------------------------------------------------------------------------------------------------------
# State
# ------------------------------------------------------------------------------------------------------------------


def _write_state(config: StackConfig, state: dict[str, Any]) -> None:
    config.stack_dir.mkdir(parents=True, exist_ok=True)
    tmp = config.state_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=1, default=str))
    os.replace(tmp, config.state_path)


def read_state(home: Path | str) -> dict[str, Any] | None:
    """The state file of the stack under ``home`` (``None`` when no stack was started there)."""
    path = Path(home).expanduser().resolve() / "stack" / STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise StackError(f"{path} is not valid JSON: {exc}") from exc


def records_of(state: Mapping[str, Any]) -> list[ProcessRecord]:
    """The processes a state file lists."""
    return [ProcessRecord(**p) for p in state.get("processes", [])]


def pool_concurrency_command(pool: str, limit: int, python: str = sys.executable) -> list[str]:
    """The Prefect CLI call that limits work pool ``pool`` to ``limit`` concurrent flow runs."""
    return [python, "-m", "prefect", "work-pool", "set-concurrency-limit", pool, str(limit)]


def _config_of(state: Mapping[str, Any]) -> StackConfig:
    c = dict(state["config"])
    for key in _PATH_FIELDS:
        if c.get(key) is not None:
            c[key] = Path(c[key])
    return StackConfig(**c)


# ------------------------------------------------------------------------------------------------------------------
# up / down / status
# ------------------------------------------------------------------------------------------------------------------


def up(config: StackConfig, echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Start the stack (servers, pools, deployments, workers) and return its state (also in ``state.json``).

    Fails with :class:`StackError` if a stack is already running under the same home, a port is taken, the
    project's ``prefect.yaml`` is missing, authentication is required but no usable credentials are given
    (:func:`load_credentials`), or a step fails or times out; whatever was started is stopped then.
    """
    say = echo or (lambda message: None)
    credentials = load_credentials(config)  # before anything starts: no credentials, no stack
    existing = read_state(config.home)
    if existing and any(is_running(r) for r in records_of(existing)):
        raise StackError(f"a stack is already running from {config.state_path}: run `convmf stack down` first")
    if not (config.project_root / "prefect.yaml").is_file():
        raise StackError(f"no prefect.yaml in {config.project_root}: the stack deploys from the project checkout")
    for what, port in (("Prefect", config.prefect_port), ("MLflow", config.mlflow_port)):
        if not port_is_free(config.host, port):
            raise StackError(f"port {port} on {config.host} ({what}) is in use: pick another one "
                             f"(--{what.lower()}-port or ${ENV_VARS[what.lower() + '_port']})")
    logs = config.resolved_log_dir()
    for directory in (config.stack_dir, logs, config.resolved_prefect_home()):
        directory.mkdir(parents=True, exist_ok=True)
    artifacts = config.resolved_artifacts_destination()
    if "://" not in artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
    env = _environment(config)
    clients = {**env, **client_environment(credentials)}  # CLI calls and workers (flow runs inherit it)
    prefect_env = dict(env)
    mlflow_env = dict(env)
    mlflow_auth: list[str] = []
    if credentials is not None:
        prefect_env.update({"PREFECT_SERVER_API_AUTH_STRING": credentials.auth_string,
                            "PREFECT_API_AUTH_STRING": credentials.auth_string})
        mlflow_env.update(_mlflow_server_auth(config, credentials))
        mlflow_auth = ["--app-name", "basic-auth"]
    if not is_loopback(config.host) and config.host not in ("0.0.0.0", "::", "") \
            and "MLFLOW_SERVER_ALLOWED_HOSTS" not in mlflow_env:
        # MLflow answers only requests whose Host header it knows (DNS-rebinding protection): add this address.
        # For 0.0.0.0 / :: set MLFLOW_SERVER_ALLOWED_HOSTS yourself (the names clients will use).
        host, port = _url_host(config.host), config.mlflow_port
        mlflow_env["MLFLOW_SERVER_ALLOWED_HOSTS"] = ",".join(
            [host, f"{host}:{port}", "localhost", f"localhost:{port}", "127.0.0.1", f"127.0.0.1:{port}"])
    python = sys.executable
    timings: dict[str, float] = {}
    state: dict[str, Any] = {
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(config),
        "prefect": {"url": config.prefect_url, "api_url": config.prefect_api_url, "port": config.prefect_port,
                    "home": str(config.resolved_prefect_home())},
        "mlflow": {"url": config.mlflow_url, "port": config.mlflow_port,
                   "backend_store_uri": config.resolved_backend_store_uri(), "artifacts_destination": artifacts},
        "log_dir": str(logs),
        "auth": {"enabled": credentials is not None, "username": credentials.username if credentials else None,
                 "credentials_from": credentials.source if credentials else None},
        "pools": list(POOLS),
        "pool_concurrency": dict(POOL_CONCURRENCY),
        "deployments": list(DEPLOYMENTS),
        "processes": [],
        "timings_s": timings,
    }
    started: list[tuple[subprocess.Popen, ProcessRecord]] = []
    helpers: list[subprocess.Popen] = []  # short-lived commands (work-pool create), killed if `up` is interrupted

    def start(name: str, role: str, command: list[str],
              environment: Mapping[str, str]) -> tuple[subprocess.Popen, ProcessRecord]:
        proc, record = _spawn(name, role, command, environment, logs / f"{name}.log", config.project_root)
        started.append((proc, record))
        state["processes"].append(asdict(record))
        _write_state(config, state)  # at once: a failed or interrupted start can still be torn down
        return proc, record

    t_start = time.monotonic()
    try:
        say(f"starting Prefect server on {config.prefect_url} and MLflow server on {config.mlflow_url}")
        prefect = start("prefect-server", "server", [python, "-m", "prefect", "server", "start", "--host", config.host,
                                                     "--port", str(config.prefect_port)], prefect_env)
        mlflow = start("mlflow-server", "server", [
            python, "-m", "mlflow", "server", "--host", config.host, "--port", str(config.mlflow_port),
            "--workers", "1", "--backend-store-uri", config.resolved_backend_store_uri(),
            "--artifacts-destination", artifacts, *mlflow_auth], mlflow_env)
        timings["prefect_server"] = _wait("the Prefect server's health check", lambda: prefect_healthy(config),
                                          [prefect], config.startup_timeout_s)
        timings["mlflow_server"] = _wait("the MLflow server's health check", lambda: mlflow_healthy(config),
                                         [mlflow], config.startup_timeout_s)
        if credentials is not None:
            check_auth(config, credentials)
            say(f"both servers require authentication (user {credentials.username}, from {credentials.source})")
        say(f"servers healthy after {time.monotonic() - t_start:.0f} s; creating work pools {', '.join(POOLS)}")
        t0 = time.monotonic()
        pools = [subprocess.Popen([python, "-m", "prefect", "work-pool", "create", pool, "--type", "process",
                                   "--overwrite"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, env=clients, cwd=str(config.project_root))
                 for pool in POOLS]
        helpers.extend(pools)
        for pool, proc in zip(POOLS, pools):
            try:
                out, _ = proc.communicate(timeout=config.startup_timeout_s)
            except subprocess.TimeoutExpired as exc:
                proc.kill()
                raise StackError(f"creating work pool {pool} did not finish in {config.startup_timeout_s:.0f} s") \
                    from exc
            (logs / f"pool-{pool}.log").write_bytes(out or b"")
            if proc.returncode != 0:
                raise StackError(f"creating work pool {pool} failed:\n{(out or b'').decode(errors='replace')[-2000:]}")
        for pool, limit in POOL_CONCURRENCY.items():
            _run(pool_concurrency_command(pool, limit, python), clients, config.project_root,
                 logs / f"pool-{pool}.log", config.startup_timeout_s)
        timings["pools"] = time.monotonic() - t0
        say("deploying prefect.yaml (prefect --no-prompt deploy --all)")
        t0 = time.monotonic()
        _run([python, "-m", "prefect", "--no-prompt", "deploy", "--all"], clients, config.project_root,
             logs / "deploy.log", config.startup_timeout_s)
        missing = [name for name in DEPLOYMENTS
                   if _http(f"{config.prefect_api_url}/deployments/name/{name}", credentials=credentials)[0] != 200]
        if missing:
            raise StackError(f"prefect deploy did not create {missing}; see {logs / 'deploy.log'}")
        timings["deploy"] = time.monotonic() - t0
        say("starting one process worker per pool")
        t0 = time.monotonic()
        workers = [start(f"worker-{pool}", "worker", [python, "-m", "prefect", "worker", "start", "--pool", pool,
                                                      "--type", "process", "--name", f"convmf-{pool}"], clients)
                   for pool in POOLS]
        for pool, worker in zip(POOLS, workers):
            _wait(f"worker convmf-{pool} to come online",
                  lambda p=pool: f"convmf-{p}" in online_workers(config, p, credentials),
                  [worker], config.startup_timeout_s)
        timings["workers"] = time.monotonic() - t0
        timings["total"] = time.monotonic() - t_start
        state["ready_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        _write_state(config, state)
    except BaseException:
        for helper in helpers:
            if helper.poll() is None:
                helper.kill()
                helper.wait()
        stop_in_order([r for _, r in started], config.stop_timeout_s)
        for proc, _ in started:
            _reap(proc.pid)
        raise
    return state


def down(home: Path | str, stop_timeout_s: float | None = None) -> dict[str, Any]:
    """Stop the stack under ``home``: workers first, then the servers. Returns what happened (also written to
    ``<home>/stack/last-teardown.json``); the state file is removed once no process is left."""
    state = read_state(home)
    if state is None:
        return {"stopped": {}, "seconds": 0.0, "note": "no stack state: nothing to stop"}
    config = _config_of(state)
    timeout = config.stop_timeout_s if stop_timeout_s is None else stop_timeout_s
    records = records_of(state)
    t0 = time.monotonic()
    stopped = stop_in_order(records, timeout)
    left = {r.name: group_members(r.pgid) for r in records if is_running(r)}
    report = {"stopped": stopped, "left": left, "seconds": round(time.monotonic() - t0, 2),
              "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    (config.stack_dir / TEARDOWN_FILE).write_text(json.dumps(report, indent=1))
    if not left:
        config.state_path.unlink(missing_ok=True)
    return report


def status(home: Path | str) -> dict[str, Any]:
    """Whether each process of the stack under ``home`` runs, whether the servers answer, which workers are online."""
    state = read_state(home)
    if state is None:
        return {"running": False, "note": f"no stack state under {Path(home).expanduser().resolve() / 'stack'}"}
    config = _config_of(state)
    processes = {r.name: {"pid": r.pid, "running": is_running(r), "log": r.log} for r in records_of(state)}
    credentials, note = None, None
    if state.get("auth", {}).get("enabled"):
        try:
            credentials = load_credentials(replace(config, auth=True))
        except StackError as exc:
            note = f"workers unknown: {exc}"
    workers = {pool: online_workers(config, pool, credentials) for pool in state.get("pools", POOLS)}
    report: dict[str, Any] = {
        "running": all(p["running"] for p in processes.values()) and bool(processes),
        "prefect": {"url": config.prefect_url, "healthy": prefect_healthy(config)},
        "mlflow": {"url": config.mlflow_url, "healthy": mlflow_healthy(config)},
        "workers_online": workers,
        "auth": state.get("auth", {"enabled": False}),
        "processes": processes,
        "state_file": str(config.state_path),
    }
    if note:
        report["note"] = note
    return report

