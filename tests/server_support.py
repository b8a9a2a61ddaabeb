"""Helpers for the tests that start real servers and workers (test_deployments, test_mlflow_restart): free ports,
process groups, polling, the environment of the processes a test starts, and their stopping."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
STARTUP_TIMEOUT_S = 240.0



def free_port() -> int:
    """A port nothing listens on now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_state(pid: int) -> tuple[str, int] | None:
    """``(state, pgid)`` of a live process, from /proc; ``None`` if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[2])


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    state = proc_state(pid)
    return state is not None and state[0] not in ("Z", "X")


def processes_in_groups(pgids: set[int]) -> set[int]:
    """Live processes whose process group is one of ``pgids``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            state = proc_state(int(entry.name))
            if state and state[0] not in ("Z", "X") and state[1] in pgids:
                found.add(int(entry.name))
    return found


def kill_group(pgid: int, wait_s: float = 10.0) -> None:
    """SIGTERM the group, twice if needed, then SIGKILL (a Prefect worker ignores the first SIGTERM)."""
    for signum in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, signum)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.waitpid(pgid, os.WNOHANG)  # reap our own child (the group leader)
            except ChildProcessError:
                pass
            if not processes_in_groups({pgid}):
                return
            time.sleep(0.2)


def wait_for(what: str, ready: Callable[[], Any], timeout_s: float, procs: Sequence[subprocess.Popen] = (),
             logs: Sequence[Path] = (), interval_s: float = 0.5) -> Any:
    """Poll ``ready()`` until it returns something truthy; fail early if one of ``procs`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = ready()
        except (httpx.HTTPError, OSError):
            value = None
        if value:
            return value
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"{proc.args} exited ({proc.returncode}) while waiting for {what}\n{tails(logs)}")
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tails(logs)}")


def tails(logs: Sequence[Path], lines: int = 40) -> str:
    out = []
    for log in logs:
        text = log.read_text(errors="replace").splitlines() if log.is_file() else ["(missing)"]
        out.append(f"--- {log} ---\n" + "\n".join(text[-lines:]))
    return "\n".join(out)


def base_env(prefect_home: Path, api_url: str) -> dict[str, str]:
    """Environment of the processes a test starts: quiet, its own PREFECT_HOME, pointed at its own server."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "PREFECT_HOME": str(prefect_home), "PREFECT_API_URL": api_url}
    env.pop("PREFECT_PROFILE", None)
    env["PATH"] = str(Path(PYTHON).parent) + os.pathsep + env.get("PATH", "")
    return env


@dataclass
class Started:
    """Processes started by a fixture, stopped by its finalizer in reverse order."""

    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def start(self, command: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, cwd=str(cwd), start_new_session=True)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            kill_group(proc.pid)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
