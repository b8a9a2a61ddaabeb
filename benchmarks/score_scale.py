"""Scale-out scoring benchmark: top-N for a generated catalogue far larger than ML-100K, through the scoring flow's
own shard path, on the default thread runner and on Dask LocalClusters of 1 and 2 worker processes.

Not run by CI (minutes, gigabytes). Defaults: 1M users x 100k items, k=50, top-100; ``--users 100000`` for a
scaled-down run (per-user cost does not depend on the number of users, so time scales linearly)::

    .venv/bin/python benchmarks/score_scale.py --users 100000

What runs is what the flow runs after its registry lookup: ``open_staging`` -> ``index_seen`` -> the
``score_shards`` subflow (``score_shard`` mapped over the shards, each writing its Parquet part) on the task runner
``flows.scoring.shard_task_runner`` builds from ``ScoringParams``. A throwaway Prefect server is started for the
run. Each configuration runs in a fresh child process (so peak memory is its own); a Dask configuration's
cluster is started before the clock starts and its workers report their own peak RSS. The model is a random PMF
bundle (factors plus the two bias columns: the matrix products have k+2 = 52 columns) with string ids, and
``--seen-per-user`` random rated items per user that the lists must leave out.

The table gives users/s, seconds, peak RSS per worker process, the ratio to the thread-runner baseline and the
FLOP floor: 2*U*I*(k+2) flops at the GFLOP/s of a 4096^3 fp32 matmul measured in the same run: on all torch threads
for the thread runner, one thread times the worker count for Dask.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
for _key, _value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                     "DO_NOT_TRACK": "1", "PREFECT_LOGGING_LEVEL": "WARNING"}.items():
    os.environ.setdefault(_key, _value)

import numpy as np  # noqa: E402


# ------------------------------------------------------------------------------------------------------------------
# Data: a random model bundle and seen pairs
# ------------------------------------------------------------------------------------------------------------------


def make_data(workdir: Path, n_users: int, n_items: int, k: int, seen_per_user: int, seed: int = 0) -> dict:
    """Write ``workdir/bundle`` (a PMF bundle with random factors and string id maps) and ``seen.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from convmf_core.config import ALSConfig, PMFConfig
    from convmf_core.data import IdMap
    from convmf_core.models.als_mf import PMF
    from convmf_core.persistence import save_model

    spec = {"users": n_users, "items": n_items, "k": k, "seen_per_user": seen_per_user, "seed": seed}
    stamp = workdir / "data.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return spec
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    model = PMF(PMFConfig(als=ALSConfig(n_factors=k), seed=seed, device="cpu"))
    model.user_factors_ = torch.randn(n_users, k, generator=generator) / k ** 0.5
    model.item_factors_ = torch.randn(n_items, k, generator=generator)
    model.user_bias_ = 0.1 * torch.randn(n_users, generator=generator)
    model.item_bias_ = 0.1 * torch.randn(n_items, generator=generator)
    model.global_mean_, model.rating_range_ = 3.5, (1.0, 5.0)
    user_ids = np.char.add("u", np.char.zfill(np.arange(n_users).astype(str), 8))
    item_ids = np.char.add("i", np.char.zfill(np.arange(n_items).astype(str), 7))
    save_model(model, workdir / "bundle", user_map=IdMap(user_ids), item_map=IdMap(item_ids))
    rng = np.random.default_rng(seed)
    schema = pa.schema([("user_id", pa.string()), ("item_id", pa.string())])
    with pq.ParquetWriter(workdir / "seen.parquet", schema) as writer:
        chunk = max(1, 1_000_000 // max(seen_per_user, 1))
        for lo in range(0, n_users if seen_per_user else 0, chunk):
            users = np.repeat(np.arange(lo, min(n_users, lo + chunk)), seen_per_user)
            items = rng.integers(0, n_items, len(users))
            writer.write_table(pa.table({"user_id": user_ids[users], "item_id": item_ids[items]}, schema=schema))
    stamp.write_text(json.dumps(spec))
    return spec


def matmul_gflops(threads: int, size: int = 4096, repeats: int = 3) -> float:
    """fp32 GFLOP/s of a size^3 matrix product through torch on ``threads`` threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e9
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------------------------
# One configuration, in a child process
# ------------------------------------------------------------------------------------------------------------------


def run_config(workdir: Path, config: dict) -> dict:
    """Score every user once with ``config`` (``runner``: threads/dask, ``workers``, ``threads``); return timings."""
    from prefect import flow

    from flows.params import ScoringParams
    from flows.scoring import score_shards, shard_task_runner
    from tasks.register import ChampionModel
    from tasks.score import count_users, index_seen, open_staging, user_shards

    spec = json.loads((workdir / "data.json").read_text())
    model = ChampionModel("bench", "1", workdir / "bundle", workdir / "seen.parquet" if spec["seen_per_user"] else None)
    staging = workdir / "scores" / f"_staging/{config['name']}"
    cluster = client = None
    if config["runner"] == "dask":
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=config["workers"], threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
        params = ScoringParams(task_runner="dask", dask_address=cluster.scheduler_address, n=config["n"],
                               users_per_shard=config["users_per_shard"], block_size=config["block_size"])
    else:
        params = ScoringParams(task_runner="threads", threads=config["threads"], n=config["n"],
                               users_per_shard=config["users_per_shard"], block_size=config["block_size"])

    @flow(name="score-scale-benchmark")
    def bench() -> dict:
        shards = user_shards(count_users(model), params.users_per_shard)
        where = open_staging(staging, model, shards, params.n)
        start = time.perf_counter()
        seen = index_seen(model, params.users_per_shard, where)
        seen_seconds = time.perf_counter() - start
        start = time.perf_counter()
        parts = score_shards.with_options(task_runner=shard_task_runner(params))(
            model, shards, params.n, params.block_size, where, seen)
        return {"seconds": time.perf_counter() - start, "seen_seconds": seen_seconds, "parts": len(parts),
                "rows": sum(_rows(p) for p in parts)}

    try:
        result = bench()
        if client is not None:
            rss = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            result["worker_peak_rss"] = sorted(rss.values())
        else:
            result["worker_peak_rss"] = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]
    finally:
        if client is not None:
            client.close()
            cluster.close()
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def child_main(args: argparse.Namespace) -> None:
    result = run_config(Path(args.workdir), json.loads(args.child))
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------------------------


def run_child(workdir: Path, config: dict, env: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--workdir", str(workdir), "--child", json.dumps(config)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"configuration {config['name']} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--factors", type=int, default=50, help="k (the products have k+2 columns: two biases)")
    parser.add_argument("--n", type=int, default=100, help="items per user")
    parser.add_argument("--seen-per-user", type=int, default=10, help="random rated items per user to leave out")
    parser.add_argument("--shards", type=int, default=20, help="number of shards (users per shard = users/shards)")
    parser.add_argument("--block-size", type=int, default=1024, help="users per matrix product")
    parser.add_argument("--threads", type=int, default=None, help="baseline thread runner's shards at once "
                        "(default: ScoringParams' default)")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="Dask worker counts")
    parser.add_argument("--no-threads", action="store_true", help="skip the thread-runner baseline (ratios are "
                        "then to the first Dask configuration)")
    parser.add_argument("--workdir", default=None, help="where data and parts go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args)
        return 0

    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from flows.params import ScoringParams

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="convmf-score-scale-"))
    users_per_shard = -(-args.users // args.shards)
    threads = args.threads or ScoringParams().threads
    started = time.perf_counter()
    make_data(workdir / "data", args.users, args.items, args.factors, args.seen_per_user)
    print(f"data: {args.users:,} users x {args.items:,} items, k={args.factors}, {args.seen_per_user} seen/user "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    import torch

    cpus = torch.get_num_threads()  # what the thread runner's torch uses; a Dask worker's torch uses 1
    gflops = {1: matmul_gflops(1), cpus: matmul_gflops(cpus)}
    print(f"4096^3 fp32 matmul: {gflops[1]:.0f} GFLOP/s on 1 thread, {gflops[cpus]:.0f} on {cpus}", flush=True)

    common = {"n": args.n, "users_per_shard": users_per_shard, "block_size": args.block_size}
    configs = [] if args.no_threads else [{"name": "threads", "runner": "threads", "threads": threads,
                                            "workers": 1, "cores": cpus, **common}]
    configs += [{"name": f"dask-{w}", "runner": "dask", "workers": w, "threads": 1, "cores": min(w, cpus), **common}
                for w in args.workers]
    results = []
    with prefect_test_harness(server_startup_timeout=120):
        env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
        for config in configs:
            result = run_child(workdir / "data", config, env)
            expected = args.users * min(args.n, args.items)
            if result["rows"] > expected or result["rows"] < expected - args.users * args.seen_per_user:
                raise RuntimeError(f"{config['name']}: {result['rows']} rows for {args.users} users")
            results.append((config, result))
            print(f"{config['name']}: {result['seconds']:.1f} s, {args.users / result['seconds']:,.0f} users/s "
                  f"(seen split {result['seen_seconds']:.1f} s)", flush=True)

    flops = 2 * args.users * args.items * (args.factors + 2)
    base = results[0][1]["seconds"]
    print()
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs; torch threads: {cpus} in the thread runner's "
          f"process, 1 per Dask worker")
    print(f"{args.users:,} users x {args.items:,} items, k={args.factors} (+2 bias columns), top-{args.n}, "
          f"{args.shards} shards of {users_per_shard:,}, block {args.block_size}; "
          f"matmul {gflops[1]:.0f} GFLOP/s (1 thread), {gflops[cpus]:.0f} ({cpus} threads)")
    print()
    print("| configuration | processes x threads | seconds | users/s | users/s per core | peak RSS per worker (MB) "
          f"| vs {results[0][0]['name']} | FLOP floor (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for config, result in results:
        seconds = result["seconds"]
        shape = f"1 x {config['threads']} (torch {cpus})" if config["runner"] == "threads" else f"{config['workers']} x 1"
        rss = "/".join(f"{r / 2**20:,.0f}" for r in result["worker_peak_rss"])
        rate = gflops[cpus] if config["runner"] == "threads" else gflops[1] * config["cores"]
        floor = flops / (rate * 1e9)
        print(f"| {config['name']} | {shape} | {seconds:,.1f} | {args.users / seconds:,.0f} | "
              f"{args.users / seconds / config['cores']:,.0f} | {rss} | {base / seconds:.2f} | {floor:,.1f} |")
    print(f"\nseen pairs split by shard once per run: {results[0][1]['seen_seconds']:.1f} s "
          f"({args.users * args.seen_per_user:,} pairs); total wall time {time.perf_counter() - started:.0f} s")
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
