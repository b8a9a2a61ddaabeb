"""Ingest at scale: a generated ratings CSV (default 20M rows) through ``convmf_core.ingest.ingest``, streaming in
batches (what files of ``IngestConfig.stream_min_bytes`` or more get; forced here) against reading the file whole.

Not run by CI (minutes, gigabytes). ``--rows 2000000`` for a scaled-down run::

    .venv/bin/python benchmarks/ingest_scale.py                      # 20M rows, streaming only
    .venv/bin/python benchmarks/ingest_scale.py --rows 2000000       # both paths, ratio against reading whole
    .venv/bin/python benchmarks/ingest_scale.py --json out.json      # also write the table as JSON

The data go to a temporary directory that is deleted afterwards: ``user_id,item_id,rating,timestamp`` with random
users and items (so some (user, item) pairs repeat: superseded duplicates, resolved across batches), integer
ratings 1-5 with 0.1% out of scale and 0.1% non-numeric, plus an items CSV with a short description per item.
Each configuration runs in a fresh child process; its peak RSS is the child's own ``ru_maxrss`` (from
``os.wait4``), and the child reports its RSS after the imports too (``base MB``: what the interpreter, numpy,
pandas and pyarrow take before any data is read). The clock covers ``ingest()`` only. The paths must agree on the
outcome (accepted and quarantined counts, reasons, content hash): the table says so, and the script fails if not.

Reading whole (``whole``) is skipped above ``--whole-max-rows`` (default 5M) unless ``--modes`` names it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = ("stream", "whole")


def make_files(workdir: Path, rows: int, n_users: int, n_items: int, seed: int = 0) -> tuple[Path, Path]:
    """Write ``ratings.csv`` (``rows`` data rows, in slices of 1M) and ``items.csv`` into ``workdir``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    ratings = workdir / "ratings.csv"
    options = pacsv.WriteOptions(include_header=False, quoting_style="none")
    with open(ratings, "wb") as fh:
        fh.write(b"user_id,item_id,rating,timestamp\n")
        for lo in range(0, rows, 1_000_000):
            n = min(1_000_000, rows - lo)
            rating = rng.integers(1, 6, n).astype(str).astype(object)
            bad = rng.random(n)
            rating[bad < 0.001] = "0"  # out of scale
            rating[(bad >= 0.001) & (bad < 0.002)] = "n/a"  # not a number
            table = pa.table({
                "user_id": rng.integers(1, n_users + 1, n),
                "item_id": rng.integers(1, n_items + 1, n),
                "rating": pa.array(rating.tolist(), pa.string()),
                "timestamp": rng.integers(800_000_000, 1_700_000_000, n),
            })
            pacsv.write_csv(table, fh, options)
    items = workdir / "items.csv"
    with open(items, "w", encoding="utf-8") as fh:
        fh.write("item_id,title,text\n")
        for i in range(1, n_items + 1):
            fh.write(f'{i},Item {i},"a description of item {i}, with a comma"\n')
    return ratings, items


def child(mode: str, ratings: str, items: str) -> None:
    """Run one ingest and print a JSON line with its time and outcome (the parent measures peak RSS)."""
    import resource

    from convmf_core.ingest import IngestConfig, ingest

    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # stream: batches whatever the size (other settings at their defaults); whole: never.
    config = IngestConfig(stream_min_bytes=0 if mode == "stream" else 1 << 62)
    t0 = time.perf_counter()
    result = ingest(ratings, items, config)
    seconds = time.perf_counter() - t0
    c = result.counts["ratings"]
    print(json.dumps({"seconds": seconds, "base_mb": base_mb, "rows_read": c["rows_read"],
                      "accepted": c["rows_accepted"], "quarantined": c["rows_quarantined"],
                      "reasons": {k: v for k, v in c["reasons"].items() if v}, "hash": result.content_hash}))


def run_child(mode: str, ratings: Path, items: Path) -> dict:
    """Run :func:`child` in a fresh interpreter; add its peak RSS (MB) from ``os.wait4``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, __file__, "--child", mode, str(ratings), str(items)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    out = proc.stdout.read() if proc.stdout else b""
    err = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{mode}: child failed ({proc.returncode}):\n{err.decode(errors='replace')[-4000:]}")
    record = json.loads(out.decode().strip().splitlines()[-1])
    record["peak_mb"] = usage.ru_maxrss / 1024  # Linux: kilobytes
    return record


def main(argv: list[str] | None = None) -> int:
    """Generate the data, run each mode in a child process, print the table (and write JSON when asked)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000_000, help="ratings rows to generate (default 20M)")
    parser.add_argument("--users", type=int, default=200_000, help="distinct users to draw from")
    parser.add_argument("--items", type=int, default=20_000, help="distinct items to draw from")
    parser.add_argument("--modes", default=None,
                        help=f"comma-separated, from {MODES}; default: both up to --whole-max-rows, else stream")
    parser.add_argument("--whole-max-rows", type=int, default=5_000_000,
                        help="largest --rows for which the default modes include reading whole")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the data (default: a temp dir)")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "RATINGS", "ITEMS"), help=argparse.SUPPRESS)
    parser.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    if args.make:
        make_files(args.make, args.rows, args.users, args.items)
        return 0
    modes = args.modes.split(",") if args.modes else (
        ["stream", "whole"] if args.rows <= args.whole_max_rows else ["stream"])
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s) {sorted(unknown)}; choose from {MODES}")
    workdir = Path(tempfile.mkdtemp(prefix="ingest-scale-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        # In a child too, so that this process stays small (a child's ru_maxrss can start from its parent's).
        subprocess.run([sys.executable, __file__, "--make", str(workdir), "--rows", str(args.rows), "--users",
                        str(args.users), "--items", str(args.items)], check=True, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
        ratings, items = workdir / "ratings.csv", workdir / "items.csv"
        gen_s = time.perf_counter() - t0
        file_mb = ratings.stat().st_size / 2**20
        results = {mode: run_child(mode, ratings, items) for mode in modes}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ref = results[modes[-1]]
    same = all((r["accepted"], r["quarantined"], r["reasons"], r["hash"]) ==
               (results[modes[0]]["accepted"], results[modes[0]]["quarantined"], results[modes[0]]["reasons"],
                results[modes[0]]["hash"]) for r in results.values())
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}; data generated in {gen_s:.1f} s")
    print(f"ratings.csv: {args.rows:,} rows, {file_mb:,.0f} MB; {args.users:,} users x {args.items:,} items")
    header = ("mode", "rows", "file MB", "seconds", "rows/s", "peak RSS MB", "base MB", "accepted", "quarantined",
              "s vs " + modes[-1], "RSS vs " + modes[-1])
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for mode, r in results.items():
        r.update(mode=mode, rows=args.rows, file_mb=file_mb, rows_per_s=r["rows_read"] / r["seconds"])
        print(f"| {mode} | {args.rows:,} | {file_mb:,.0f} | {r['seconds']:.1f} | {r['rows_per_s']:,.0f} | "
              f"{r['peak_mb']:,.0f} | {r['base_mb']:,.0f} | {r['accepted']:,} | {r['quarantined']:,} | "
              f"{r['seconds'] / ref['seconds']:.2f} | {r['peak_mb'] / ref['peak_mb']:.2f} |")
    reasons = results[modes[0]]["reasons"]
    print(f"quarantine reasons: {reasons}; same outcome in every mode (counts, reasons, content hash): "
          f"{'yes' if same else 'NO'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
                   "rows": args.rows, "file_mb": file_mb, "same_outcome": same, "results": list(results.values())}
        args.json.write_text(json.dumps(payload, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
