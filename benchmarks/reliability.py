"""Reliability benchmark: one table of bad input handled, faults survived, rows lost, ingest and serving figures.

Four parts, each of which can be skipped:

1. **Bad input** (in process, seconds): every kind of file people really hand in (see :func:`bad_input_cases`)
   goes through :func:`convmf_core.ingest.ingest`. A case is *handled* when it ends the way it should: an
   :class:`~convmf_core.ingest.IngestError` whose message names the file, or a result whose row accounting holds
   (rows read = accepted + quarantined, per file). Rows lost = rows read that are neither accepted nor quarantined.
2. **Faults** (pytest, ~3-4 min): the tests that inject a real fault — SIGKILL of a training process and of a
   scoring process, a failing shard write, the MLflow server stopped mid-run, a promotion race, a pickle planted
   in a bundle, a collapsed catalogue, an identical rerun — run through pytest; each passing test is a fault
   survived with nothing lost or duplicated (the tests assert exactly-once rows and versions).
3. **Ingest at scale** (``benchmarks/ingest_scale.py``, default 20M ratings): rows/s and peak RSS.
4. **Serving** (``benchmarks/serve_load.py``, default 2,000 requests at concurrency 8): errors, p50/p99.

    python benchmarks/reliability.py                       # everything (~10 min on 2 cores)
    python benchmarks/reliability.py --skip-faults --ingest-rows 2000000 --requests 500   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from convmf_core.ingest import IngestConfig, IngestError, ingest  # noqa: E402

ITEMS_OK = b"item_id,title,description\n1,Alpha,a quiet film about the sea\n2,Beta,loud robots fight in space\n" \
           b"3,Gamma,a love story in paris\n"


@dataclass(frozen=True)
class BadInputCase:
    """One input pair and the outcome it should have: ``"error"`` (refused, naming the file) or ``"ingested"``."""

    name: str
    ratings: bytes
    expect: str
    items: bytes = ITEMS_OK
    config: IngestConfig = field(default_factory=IngestConfig)
    ratings_suffix: str = ".csv"
    items_suffix: str = ".csv"


def bad_input_cases() -> list[BadInputCase]:
    """The bad-input catalogue of issue 6: files as people really have them, and bad rows of every kind."""
    good = b"user_id,item_id,rating,timestamp\n1,1,4,100\n1,2,3,101\n2,3,5,102\n"
    long_text = b"word " * 2_000_000  # a 10 MB description
    return [
        BadInputCase("utf-8 with a byte-order mark", b"\xef\xbb\xbf" + good, "ingested"),
        BadInputCase("latin-1 descriptions (MovieLens u.item)", good, "ingested",
                     items=b"item_id,title,description\n1,Am\xe9lie,caf\xe9 na\xefve\n2,B,b\n3,C,c\n"),
        BadInputCase("CRLF line ends", good.replace(b"\n", b"\r\n"), "ingested",
                     items=ITEMS_OK.replace(b"\n", b"\r\n")),
        BadInputCase("RFC 4180 quoting: delimiters, quotes, newlines in a description", good, "ingested",
                     items=b'item_id,title,description\n1,"A, the","He said ""hi""\nthen left, quickly"\n'
                           b"2,B,b\n3,C,c\n"),
        BadInputCase("half-star scale 0.5-5", b"user_id,item_id,rating\n1,1,0.5\n1,2,4.5\n2,3,3.5\n", "ingested",
                     config=IngestConfig(rating_min=0.5, rating_max=5.0)),
        BadInputCase("empty ratings file", b"", "error"),
        BadInputCase("header-only ratings file", b"user_id,item_id,rating\n", "error"),
        BadInputCase("missing rating column", b"user_id,item_id\n1,1\n", "error"),
        BadInputCase("unknown columns only", b"who,what,score\n1,1,4\n", "error"),
        BadInputCase("tab-separated data named .csv", good.replace(b",", b"\t"), "ingested"),
        BadInputCase("binary garbage", bytes(range(256)) * 64, "error"),
        BadInputCase("a 10 MB description", good, "ingested",
                     items=b"item_id,title,description\n1,Long," + long_text + b"\n2,B,b\n3,C,c\n"),
        BadInputCase("rating out of range", good + b"2,1,9\n", "ingested"),
        BadInputCase("rating not a number", good + b"2,1,great\n", "ingested"),
        BadInputCase("missing user id", good + b",1,4\n", "ingested"),
        BadInputCase("rating of an unknown item", good + b"2,99,4\n", "ingested"),
        BadInputCase("duplicate (user, item): older rating superseded", good + b"1,1,2,50\n", "ingested"),
        BadInputCase("bad timestamp", good + b"3,1,4,yesterday\n", "ingested"),
        BadInputCase("row with too many fields", good + b"3,2,4,100,extra,fields\n", "ingested"),
        BadInputCase("duplicate item rows", good, "ingested", items=ITEMS_OK + b"1,Alpha again,another text\n"),
        BadInputCase("no valid rating at all", b"user_id,item_id,rating\nx,1,bad\n", "error"),
        BadInputCase("JSON lines with a broken line", b'{"user_id": 1, "item_id": 1, "rating": 4}\n{"user_id": 2,\n',
                     "ingested", ratings_suffix=".jsonl"),
    ]


@dataclass
class CaseOutcome:
    """What one case did: handled or not, rows read / accepted / quarantined / lost, and the message or counts."""

    name: str
    handled: bool
    rows_read: int = 0
    accepted: int = 0
    quarantined: int = 0
    detail: str = ""

    @property
    def lost(self) -> int:
        """Rows read that were neither accepted nor quarantined."""
        return self.rows_read - self.accepted - self.quarantined


def run_case(case: BadInputCase, directory: Path) -> CaseOutcome:
    """Write the case's files under ``directory``, ingest them, and judge the outcome."""
    ratings = directory / f"ratings{case.ratings_suffix}"
    items = directory / f"items{case.items_suffix}"
    ratings.write_bytes(case.ratings)
    items.write_bytes(case.items)
    try:
        result = ingest(ratings, items, case.config)
    except IngestError as exc:
        names_file = ratings.name in str(exc) or items.name in str(exc)
        return CaseOutcome(case.name, case.expect == "error" and names_file, detail=str(exc).splitlines()[0][:90])
    except Exception as exc:  # noqa: BLE001 - an unhandled exception is exactly what this benchmark looks for
        return CaseOutcome(case.name, False, detail=f"UNHANDLED {type(exc).__name__}: {exc}"[:90])
    read = sum(result.counts[f]["rows_read"] for f in ("ratings", "items"))
    accepted = sum(result.counts[f]["rows_accepted"] for f in ("ratings", "items"))
    quarantined = sum(result.counts[f]["rows_quarantined"] for f in ("ratings", "items"))
    reasons = {k: v for k, v in result.counts["reasons"].items() if v}
    outcome = CaseOutcome(case.name, case.expect == "ingested", read, accepted, quarantined,
                          detail=", ".join(f"{k}={v}" for k, v in reasons.items()) or "all accepted")
    outcome.handled = outcome.handled and outcome.lost == 0 and len(result.quarantine) == quarantined
    return outcome


def bad_input_part() -> list[CaseOutcome]:
    """Run every bad-input case in its own temporary directory."""
    outcomes = []
    for case in bad_input_cases():
        with tempfile.TemporaryDirectory() as tmp:
            outcomes.append(run_case(case, Path(tmp)))
    return outcomes


# The tests that inject a real fault, and what each one injects.
FAULT_TESTS: dict[str, str] = {
    "tests/test_reliability.py::test_training_killed_mid_run_resumes_to_the_same_model":
        "SIGKILL of a training process mid-run, then resume",
    "tests/test_scale_out.py::test_scoring_killed_mid_way_commits_nothing_and_the_rerun_completes":
        "SIGKILL of a scoring process mid-way, then rerun",
    "tests/test_scale_out.py::test_rerun_after_a_failed_shard_scores_only_the_missing_ones":
        "a shard's write fails (disk full), a finished part is lost",
    "tests/test_mlflow_restart.py": "MLflow server stopped mid-run and restarted",
    "tests/test_reliability.py::test_identical_nightly_rerun_registers_nothing_and_duplicates_no_rows":
        "the nightly run started twice on the same data",
    "tests/test_reliability.py::test_gate_stops_a_shrunken_catalogue_and_override_lets_it_through":
        "80% of the ratings missing from the input",
    "tests/test_promotion_security.py::test_promotion_compares_again_when_the_champion_moved":
        "the champion moves during promotion (race)",
    "tests/test_promotion_security.py::test_registered_bundle_with_a_pickle_is_refused_by_the_pyfunc":
        "a pickle payload planted in a registered bundle",
    "tests/test_promotion_security.py::test_model_no_better_than_the_global_mean_is_never_champion":
        "a model no better than the global mean",
}


def faults_part(timeout_s: int) -> list[tuple[str, str, int, int]]:
    """Run the fault-injection tests; (fault, node id, tests passed, tests run) per entry of :data:`FAULT_TESTS`."""
    present = {node: what for node, what in FAULT_TESTS.items() if (ROOT / node.split("::")[0]).exists()}
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                        *present], cwd=ROOT, timeout=timeout_s, check=False, capture_output=True)
        cases = ET.parse(junit).getroot().iter("testcase") if junit.exists() else []
        results: dict[str, list[bool]] = {node: [] for node in present}
        for case in cases:
            module = case.get("classname", "").replace(".", "/") + ".py"
            node = f"{module}::{case.get('name', '')}"
            ok = not any(child.tag in ("failure", "error", "skipped") for child in case)
            for key in present:
                if node == key or (("::" not in key) and node.startswith(key + "::")):
                    results[key].append(ok)
    return [(what, node, sum(results[node]), len(results[node])) for node, what in present.items()]


def child_json(script: str, args: list[str], timeout_s: int) -> dict[str, Any] | None:
    """Run ``benchmarks/<script> ... --json PATH`` and return what it wrote (``None`` when it failed)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--json", str(out)],
                              cwd=ROOT, timeout=timeout_s, check=False, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            print(f"{script} failed (exit {proc.returncode}):\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")
            return None
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    """Run the parts asked for and print one table (markdown) with the machine it ran on."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-faults", action="store_true", help="do not run the fault-injection tests")
    parser.add_argument("--skip-ingest", action="store_true", help="do not run the ingest-at-scale benchmark")
    parser.add_argument("--skip-serving", action="store_true", help="do not run the serving load test")
    parser.add_argument("--ingest-rows", type=int, default=20_000_000, help="ratings rows for the ingest benchmark")
    parser.add_argument("--requests", type=int, default=2000, help="requests for the serving load test")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent clients for the serving load test")
    parser.add_argument("--verbose", action="store_true", help="print every bad-input case")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows: list[tuple[str, str]] = []

    outcomes = bad_input_part()
    handled = sum(o.handled for o in outcomes)
    rows.append(("bad-input cases tried / handled", f"{len(outcomes)} / {handled}"))
    rows.append(("rows lost in bad-input cases", str(sum(o.lost for o in outcomes))))
    if args.verbose or handled < len(outcomes):
        for o in outcomes:
            print(f"  {'ok ' if o.handled else 'BAD'} {o.name:<62} read {o.rows_read:>3} accepted {o.accepted:>3} "
                  f"quarantined {o.quarantined:>3}  {o.detail}")

    if not args.skip_faults:
        faults = faults_part(timeout_s=1800)
        survived = sum(passed == run and run > 0 for _, _, passed, run in faults)
        rows.append(("faults injected / survived", f"{len(faults)} / {survived}"))
        for what, _node, passed, run in faults:
            rows.append((f"  {what}", f"{passed}/{run} tests passed"))
        rows.append(("rows lost or duplicated after faults", "0" if survived == len(faults) else "see failing tests"))

    if not args.skip_ingest:
        found = child_json("ingest_scale.py", ["--rows", str(args.ingest_rows), "--modes", "stream"], timeout_s=3600)
        if found is not None:
            stream = next(r for r in found["results"] if r["mode"] == "stream")
            rows.append(("ingest (streamed): ratings rows / file MB", f"{found['rows']:,} / {found['file_mb']:,.0f}"))
            rows.append(("ingest: seconds / rows per second", f"{stream['seconds']:,.1f} / {stream['rows_per_s']:,.0f}"))
            rows.append(("ingest: peak RSS MB", f"{stream['peak_mb']:,.0f}"))
            rows.append(("ingest: accepted / quarantined / lost", f"{stream['accepted']:,} / {stream['quarantined']:,}"
                         f" / {found['rows'] - stream['accepted'] - stream['quarantined']:,}"))

    if not args.skip_serving:
        found = child_json("serve_load.py", ["--requests", str(args.requests), "--concurrency",
                                             str(args.concurrency)], timeout_s=1800)
        if found is not None:
            for key, label in (("requests", "serving: requests"), ("concurrency", "serving: concurrency"),
                               ("errors", "serving: errors"), ("p50_ms", "serving: p50 latency (ms)"),
                               ("p99_ms", "serving: p99 latency (ms)"), ("throughput_rps", "serving: requests/s"),
                               ("malformed_4xx", "serving: malformed bodies -> 4xx"),
                               ("malformed_5xx", "serving: malformed bodies -> 5xx")):
                if key in found:
                    value = found[key]
                    rows.append((label, f"{value:,.1f}" if isinstance(value, float) else str(value)))

    print(f"\nReliability on {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
          f" ({time.perf_counter() - started:.0f} s)\n")
    width = max(len(name) for name, _ in rows)
    print(f"| {'measure':<{width}} | value |\n|{'-' * (width + 2)}|------:|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value} |")


if __name__ == "__main__":
    main()
