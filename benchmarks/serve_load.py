"""Serving load test: ``mlflow models serve`` of the champion on loopback, hit by a bounded client.

By default it trains a small ConvMF on the built-in synthetic catalogue (1,000 users x 1,500 items, k=10), logs it
to a throwaway MLflow SQLite store in a temporary directory and aliases it ``champion``; ``--model-uri`` and
``--tracking-uri`` serve an existing model instead (e.g. ``models:/convmf@champion`` and
``sqlite:///convmf-data/mlflow.db``). The server is started exactly as the README says::

    MLFLOW_TRACKING_URI=... mlflow models serve -m models:/<name>@champion --env-manager local -h 127.0.0.1 -p PORT

Then ``--requests`` requests (default 2,000) go out from ``--concurrency`` threads (default 8), each thread on its
own keep-alive ``http.client`` connection, cycling through a mix of valid bodies: top-N (``dataframe_split`` and
``dataframe_records``), rating prediction, fold-in of a new user's ratings, and top-N with a new item described by
its text. A request is an error unless it answers 200 with a JSON ``predictions`` list. Afterwards every malformed
body of :func:`malformed_bodies` is sent once: each must get a 4xx, never a 5xx.

Prints one table (requests, concurrency, errors, p50/p99 latency in ms, requests/s, malformed 4xx/5xx) with a
baseline in the same run (one client at a time, a tenth of the requests) and the throughput ratio against it, then
the figures per request kind and, with ``--json PATH``, writes the figures for ``benchmarks/reliability.py``. Timings
taken while other jobs share the machine are contended: say so when you quote them.

    .venv/bin/python benchmarks/serve_load.py --requests 2000 --concurrency 8
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
for _key, _value in {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(_key, _value)

JSON = "application/json"


# ------------------------------------------------------------------------------------------------------------------
# The server
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class Server:
    """A running ``mlflow models serve`` process (its own process group) on 127.0.0.1:``port``."""

    process: subprocess.Popen
    port: int
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def free_port() -> int:
    """A TCP port that is free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model_uri: str, tracking_uri: str, log_path: Path, *, port: int | None = None,
                 timeout_s: float = 240.0, workers: int = 1) -> Server:
    """Start ``mlflow models serve -m model_uri --env-manager local`` and wait until ``/ping`` answers 200.

    The venv's ``bin`` goes first on PATH (the server runs ``python`` and ``mlflow`` from it) and
    ``MLFLOW_TRACKING_URI`` names the store that resolves ``models:/`` URIs. Raises RuntimeError, with the end of
    the log, when the server exits or does not answer within ``timeout_s``; the process is then stopped.
    """
    port = port or free_port()
    bin_dir = Path(sys.executable).parent
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": path,
           "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env["MLFLOW_REGISTRY_URI"] = tracking_uri  # the registry that resolves models:/ URIs is the same store
    cmd = [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
           "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, cwd=str(ROOT))
    server = Server(process, port, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited with {process.returncode}:\n{server.log_tail()}")
        try:
            status, _ = request(port, "GET", "/ping", None, timeout=5)
            if status == 200:
                return server
        except OSError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"mlflow models serve did not answer /ping within {timeout_s:.0f} s:\n{server.log_tail()}")


def live_group_members(pgid: int) -> list[int]:
    """PIDs of the processes of group ``pgid`` that are still running (zombies, already dead, are not counted)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            alive.append(int(stat.parent.name))
    return alive


def stop_server(server: Server, timeout_s: float = 20.0) -> None:
    """SIGTERM to the server's process group, SIGKILL after ``timeout_s``; returns when no process of the group runs.

    The uvicorn worker is a child of the ``mlflow`` process in the same group, so the whole group is signalled."""
    pgid = server.process.pid
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if server.process.poll() is not None and not live_group_members(pgid):
                return
            time.sleep(0.1)
    server.process.wait()


def request(port: int, method: str, path: str, body: bytes | None, *, content_type: str = JSON,
            timeout: float = 60.0, connection: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:
    """One HTTP request to 127.0.0.1:``port``; returns (status, body). Reuses ``connection`` when given."""
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": content_type} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if connection is None:
            conn.close()


def invoke(port: int, payload: Any, **kwargs: Any) -> tuple[int, Any]:
    """POST ``payload`` (JSON-encoded) to ``/invocations``; returns (status, decoded JSON or the raw text)."""
    status, raw = request(port, "POST", "/invocations", json.dumps(payload).encode(), **kwargs)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


# ------------------------------------------------------------------------------------------------------------------
# Request bodies
# ------------------------------------------------------------------------------------------------------------------


def valid_bodies(user_ids: Sequence[Any], item_ids: Sequence[Any], new_item_id: Any,
                 new_description: str) -> list[tuple[str, bytes]]:
    """(kind, JSON body) pairs of well-formed requests for a model that knows ``user_ids`` and ``item_ids``."""
    u = [_plain(x) for x in user_ids]
    i = [_plain(x) for x in item_ids]
    bodies: list[tuple[str, dict]] = []
    for k in range(len(u)):
        bodies.append(("top-N split", {"dataframe_split": {"columns": ["user_id", "n"], "data": [[u[k], 10]]}}))
        bodies.append(("top-N records", {"dataframe_records": [{"user_id": u[k], "n": 20}]}))
        bodies.append(("rating", {"dataframe_records": [{"user_id": u[k], "item_id": i[(k + j) % len(i)]}
                                                         for j in range(5)]}))
        bodies.append(("fold-in", {"dataframe_records": [
            {"user_id": f"new-user-{k}" if isinstance(u[k], str) else 10_000_000 + k,
             "item_id": i[(3 * k + j) % len(i)], "rating": float(1 + (k + j) % 5), "n": 10} for j in range(3)]}))
        bodies.append(("new item", {"dataframe_records": [{"user_id": u[k], "n": 10},
                                                           {"item_id": new_item_id, "description": new_description}]}))
    return [(kind, json.dumps(body).encode()) for kind, body in bodies]


def malformed_bodies(user_id: Any, item_id: Any) -> list[tuple[str, bytes, str]]:
    """(name, body, content type) of requests the server must refuse with a 4xx (never a 5xx)."""
    u, i = _plain(user_id), _plain(item_id)

    def records(*rows: dict) -> bytes:
        return json.dumps({"dataframe_records": list(rows)}).encode()

    cases = [
        ("not JSON", b"{this is not json", JSON),
        ("empty body", b"", JSON),
        ("binary garbage", bytes(range(256)), JSON),
        ("JSON list, no wrapper key", b"[1, 2, 3]", JSON),
        ("unknown wrapper key", json.dumps({"rows": [{"user_id": u}]}).encode(), JSON),
        ("split: data wider than columns",
         json.dumps({"dataframe_split": {"columns": ["user_id"], "data": [[u, 5, 7]]}}).encode(), JSON),
        ("split: data not a list", json.dumps({"dataframe_split": {"columns": ["user_id"], "data": 5}}).encode(), JSON),
        ("records: not a list", json.dumps({"dataframe_records": "user 1"}).encode(), JSON),
        ("missing user_id", records({"n": 3}), JSON),
        ("null user_id", records({"user_id": None, "n": 3}), JSON),
        ("n = 0", records({"user_id": u, "n": 0}), JSON),
        ("n negative", records({"user_id": u, "n": -5}), JSON),
        ("n fractional", records({"user_id": u, "n": 2.5}), JSON),
        ("n text", records({"user_id": u, "n": "ten"}), JSON),
        ("n boolean", records({"user_id": u, "n": True}), JSON),
        ("n huge", records({"user_id": u, "n": 10 ** 12}), JSON),
        ("n 1e308", b'{"dataframe_records": [{"user_id": %s, "n": 1e308}]}' % json.dumps(u).encode(), JSON),
        ("n a list", records({"user_id": u, "n": [3]}), JSON),
        ("user_id a list", records({"user_id": [u, u]}), JSON),
        ("user_id an object", records({"user_id": {"id": u}}), JSON),
        ("user_id boolean", records({"user_id": True}), JSON),
        ("item_id boolean", records({"user_id": u, "item_id": False}), JSON),
        ("rating text", records({"user_id": u, "item_id": i, "rating": "great"}), JSON),
        ("rating out of range", records({"user_id": u, "item_id": i, "rating": 1000}), JSON),
        ("fold-in row without rating", records({"user_id": u, "item_id": i, "rating": 4}, {"user_id": u, "item_id": i}),
         JSON),
        ("description with a user_id", records({"user_id": u, "item_id": "x", "description": "a film"}), JSON),
        ("description a number", records({"user_id": u}, {"item_id": i, "description": 42}), JSON),
        ("description only, no user row", records({"item_id": "x", "description": "a film"}), JSON),
        ("unknown_ids param wrong", json.dumps({"dataframe_records": [{"user_id": u}],
                                                 "params": {"unknown_ids": "guess"}}).encode(), JSON),
        ("wrong content type", b"user_id\n1\n", "text/plain"),
        ("CSV without user_id", b"n\n3\n", "text/csv"),
    ]
    return cases


def _plain(value: Any) -> Any:
    """numpy scalars as plain Python values (for JSON)."""
    return value.item() if hasattr(value, "item") else value


# ------------------------------------------------------------------------------------------------------------------
# The load test
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """Figures of one load test (latencies in ms, by request kind too)."""

    requests: int
    concurrency: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    by_kind: dict[str, list[float]] = field(default_factory=dict)
    error_examples: list[str] = field(default_factory=list)

    @staticmethod
    def percentile(values: Sequence[float], q: float) -> float:
        """The ``q``-th percentile (nearest rank) of ``values``; NaN when empty."""
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))]

    def figures(self) -> dict[str, Any]:
        """The JSON figures (``requests``, ``concurrency``, ``errors``, ``p50_ms``, ``p99_ms``, ``throughput_rps``)."""
        return {"requests": self.requests, "concurrency": self.concurrency, "errors": self.errors,
                "p50_ms": self.percentile(self.latencies_ms, 50), "p99_ms": self.percentile(self.latencies_ms, 99),
                "throughput_rps": self.requests / self.seconds if self.seconds > 0 else float("nan"),
                "seconds": self.seconds,
                "by_kind": {k: {"requests": len(v), "p50_ms": self.percentile(v, 50), "p99_ms": self.percentile(v, 99)}
                            for k, v in sorted(self.by_kind.items())}}


def load_test(port: int, bodies: Sequence[tuple[str, bytes]], requests: int, concurrency: int,
              timeout_s: float = 60.0) -> LoadResult:
    """Send ``requests`` requests from ``concurrency`` threads (bounded: each waits for its answer before sending
    the next), cycling through ``bodies``. An error is anything but a 200 with a ``predictions`` list."""
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    by_kind: dict[str, list[float]] = {}
    errors: list[str] = []

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
        try:
            while True:
                n = next(counter)
                if n >= requests:
                    return
                kind, body = bodies[n % len(bodies)]
                t0 = time.perf_counter()
                try:
                    status, raw = request(port, "POST", "/invocations", body, connection=conn)
                    ok = status == 200 and isinstance(json.loads(raw).get("predictions"), list)
                    problem = "" if ok else f"{kind}: HTTP {status}: {raw[:200]!r}"
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
                    problem = f"{kind}: {type(exc).__name__}: {exc}"
                ms = (time.perf_counter() - t0) * 1000
                with lock:
                    latencies.append(ms)
                    by_kind.setdefault(kind, []).append(ms)
                    if problem:
                        errors.append(problem)
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    return LoadResult(requests, concurrency, len(errors), seconds, latencies, by_kind, errors[:5])


def check_malformed(port: int, cases: Sequence[tuple[str, bytes, str]]) -> list[tuple[str, int]]:
    """(name, HTTP status) of each malformed body, sent once each."""
    return [(name, request(port, "POST", "/invocations", body, content_type=ctype)[0]) for name, body, ctype in cases]


# ------------------------------------------------------------------------------------------------------------------
# A small model to serve
# ------------------------------------------------------------------------------------------------------------------


def train_and_register(workdir: Path, model_name: str = "convmf-serve-bench", n_users: int = 1000,
                       n_items: int = 1500) -> tuple[str, str]:
    """Train a small ConvMF on the synthetic catalogue, log it to a SQLite store under ``workdir`` and alias it
    ``champion``. Returns (model URI, tracking URI)."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from convmf_core.config import ALSConfig, CNNConfig, ConvMFConfig, TextConfig
    from convmf_core.data import IdMap, random_split, ratings_from_frame
    from convmf_core.models.convmf import ConvMF
    from convmf_core.persistence import save_model
    from convmf_core.synthetic import SyntheticConfig, generate_catalogue
    from convmf_core.text import build_vocabulary, encode_documents
    from tasks.registry import log_model_version

    data = generate_catalogue(SyntheticConfig(n_users=n_users, n_items=n_items))
    user_map = IdMap.from_values(data.ratings["user_id"])
    item_map = IdMap.from_values(data.items["item_id"])
    split = random_split(ratings_from_frame(data.ratings, user_map, item_map), seed=0)
    texts = data.items.set_index("item_id").loc[item_map.raw_ids, "description"].tolist()
    vocabulary = build_vocabulary(texts, TextConfig(vocab_size=2000))
    config = ConvMFConfig(als=ALSConfig(n_factors=10, max_iterations=3),
                          cnn=CNNConfig(embedding_dim=32, n_filters=16, hidden_dim=32, epochs_per_iteration=1),
                          device="cpu")
    model = ConvMF(config).fit(split.train, split.validation, documents=encode_documents(texts, vocabulary),
                               vocabulary_size=len(vocabulary))
    bundle = save_model(model, workdir / "bundle", vocabulary=vocabulary, user_map=user_map, item_map=item_map)
    seen = pd.DataFrame({"user_id": user_map.to_raw(split.train.users), "item_id": item_map.to_raw(split.train.items)})
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    experiment = mlflow.create_experiment("serve-load", artifact_location=(workdir / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        info = log_model_version(bundle, model_name=model_name, run_id=run.info.run_id, tags={}, seen=seen)
    MlflowClient().set_registered_model_alias(model_name, "champion", info.version)
    return f"models:/{model_name}@champion", tracking_uri


def model_ids(model_uri: str, tracking_uri: str) -> tuple[list[Any], list[Any], str]:
    """Some user and item ids of the served model, and one of its item descriptions' worth of vocabulary."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    scorer = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()._scorer
    users = scorer.user_map.raw_ids[:: max(1, len(scorer.user_map) // 50)][:50].tolist()
    items = scorer.item_map.raw_ids[:: max(1, len(scorer.item_map) // 50)][:50].tolist()
    words = list(scorer.vocabulary.words[:40]) if scorer.vocabulary is not None else ["new"]
    return users, items, " ".join(words)


def main(argv: list[str] | None = None) -> None:
    """Serve, load-test, check malformed bodies, print the table (and write ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-uri", help="serve this model (default: train and register a small one)")
    parser.add_argument("--tracking-uri", help="MLflow tracking/registry URI of --model-uri")
    parser.add_argument("--requests", type=int, default=2000, help="requests to send (default 2000)")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent client threads (default 8)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of the server (default 1)")
    parser.add_argument("--startup-timeout", type=float, default=240.0, help="seconds to wait for /ping")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if bool(args.model_uri) != bool(args.tracking_uri):
        parser.error("--model-uri and --tracking-uri go together")
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="convmf-serve-") as tmp:
        workdir = Path(tmp)
        t0 = time.perf_counter()
        if args.model_uri:
            model_uri, tracking_uri = args.model_uri, args.tracking_uri
        else:
            model_uri, tracking_uri = train_and_register(workdir)
        prepared = time.perf_counter() - t0
        users, items, words = model_ids(model_uri, tracking_uri)
        new_item = "new-item-bench" if isinstance(items[0], str) else 10_000_000
        bodies = valid_bodies(users, items, new_item, words)
        t0 = time.perf_counter()
        server = start_server(model_uri, tracking_uri, workdir / "server.log", timeout_s=args.startup_timeout,
                              workers=args.workers)
        startup = time.perf_counter() - t0
        try:
            load_test(server.port, bodies[:20], min(40, args.requests), min(2, args.concurrency))  # warm-up
            # Baseline in the same run: one client at a time (no queueing), a tenth of the requests.
            baseline = load_test(server.port, bodies, min(args.requests, max(50, args.requests // 10)), 1)
            result = load_test(server.port, bodies, args.requests, args.concurrency)
            malformed = check_malformed(server.port, malformed_bodies(users[0], items[0]))
        finally:
            stop_server(server)

    figures = result.figures()
    base = baseline.figures()
    figures["baseline_concurrency_1"] = {k: base[k] for k in ("requests", "errors", "p50_ms", "p99_ms",
                                                              "throughput_rps")}
    figures.update({"malformed_total": len(malformed),
                    "malformed_4xx": sum(400 <= s < 500 for _, s in malformed),
                    "malformed_5xx": sum(s >= 500 for _, s in malformed),
                    "malformed_other": [(n, s) for n, s in malformed if not 400 <= s < 500],
                    "server_startup_s": startup, "model_prepare_s": prepared, "model_uri": model_uri,
                    "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
                    "load_average_before": load_before, "load_average_after": os.getloadavg()[0]})
    print(f"\nServing {model_uri} with `mlflow models serve --env-manager local` ({args.workers} worker) on "
          f"{figures['machine']}; 1-min load average {load_before:.1f} before, {figures['load_average_after']:.1f} "
          f"after (above ~0.5 the figures are contended); "
          f"server start {startup:.1f} s\n")
    print("| run | requests | concurrency | errors | p50 ms | p99 ms | req/s | req/s vs baseline "
          "| malformed -> 4xx | malformed -> 5xx |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| baseline | {base['requests']} | 1 | {base['errors']} | {base['p50_ms']:.1f} | {base['p99_ms']:.1f} | "
          f"{base['throughput_rps']:.1f} | 1.00x | | |")
    print(f"| load | {figures['requests']} | {figures['concurrency']} | {figures['errors']} | "
          f"{figures['p50_ms']:.1f} | {figures['p99_ms']:.1f} | {figures['throughput_rps']:.1f} | "
          f"{figures['throughput_rps'] / base['throughput_rps']:.2f}x | {figures['malformed_4xx']}/{len(malformed)} | "
          f"{figures['malformed_5xx']} |")
    print("\n| request kind | requests | p50 ms | p99 ms |\n|---|---:|---:|---:|")
    for kind, f in figures["by_kind"].items():
        print(f"| {kind} | {f['requests']} | {f['p50_ms']:.1f} | {f['p99_ms']:.1f} |")
    if result.error_examples:
        print("\nerrors, e.g.:\n  " + "\n  ".join(result.error_examples))
    if figures["malformed_other"]:
        print(f"\nmalformed bodies not answered with a 4xx: {figures['malformed_other']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp_json = args.json.with_name(f".{args.json.name}.tmp")
        tmp_json.write_text(json.dumps(figures, indent=1, default=str))
        os.replace(tmp_json, args.json)


if __name__ == "__main__":
    main()
