"""Prefect tasks that bring data in: the built-in generated catalogue, and validated ingest to Parquet."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from convmf_core.ingest import IngestConfig, ingest, write_parquet_atomic
from convmf_core.schemas import ITEMS_SCHEMA, QUARANTINE_SCHEMA, RATINGS_SCHEMA
from convmf_core.synthetic import CATALOGUE_VERSION, SyntheticConfig, generate_catalogue, write_catalogue
from tasks.tracking import RunRef


@dataclass(frozen=True)
class IngestedData:
    """Typed Parquet files of one ingest, keyed by the content hash of the accepted rows."""

    ratings_path: Path
    items_path: Path
    quarantine_path: Path
    content_hash: str
    counts: dict = field(default_factory=dict)


def builtin_catalogue_dir(home: Path, n_users: int, n_items: int, seed: int) -> Path:
    """Where the built-in catalogue of these sizes and seed lives under ``home``; the generator's
    ``CATALOGUE_VERSION`` is part of the name, so a home written by an older generator is not served again."""
    return Path(home) / "builtin" / f"v{CATALOGUE_VERSION}-users{n_users}-items{n_items}-seed{seed}"


@task(name="builtin-catalogue")
def builtin_catalogue(n_users: int, n_items: int, seed: int, home: Path) -> tuple[Path, Path]:
    """Write the built-in catalogue (ratings that depend on what the descriptions say) as CSV; reused if present
    (and written by this version of the generator)."""
    directory = builtin_catalogue_dir(home, n_users, n_items, seed)
    ratings, items = directory / "ratings.csv", directory / "items.csv"
    if not (ratings.is_file() and items.is_file()):
        paths = write_catalogue(generate_catalogue(SyntheticConfig(n_users=n_users, n_items=n_items, seed=seed)),
                                directory)
        ratings, items = paths["ratings"], paths["items"]
    get_run_logger().info("built-in catalogue: %s, %s", ratings, items)
    return ratings, items


def _counts_markdown(counts: dict) -> str:
    lines = ["| file | rows read | accepted | quarantined |", "|---|---:|---:|---:|"]
    for role in ("ratings", "items"):
        c = counts[role]
        lines.append(f"| {role}: `{Path(c['file']).name}` | {c['rows_read']} | {c['rows_accepted']} | "
                     f"{c['rows_quarantined']} |")
    reasons = {k: v for k, v in counts.get("reasons", {}).items() if v}
    lines += ["", "| quarantine reason | rows |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in sorted(reasons.items())]
    if not reasons:
        lines.append("| (none) | 0 |")
    return "\n".join(lines)


@task(name="ingest")
def ingest_files(ratings_file: Path, items_file: Path, config: IngestConfig, home: Path, run: RunRef) -> IngestedData:
    """Read and validate both files; write accepted rows and the quarantine to Parquet atomically.

    Rows that fail validation go to ``quarantine.parquet`` with their reason; counts per reason go to the Prefect
    log, MLflow metrics and a markdown artifact. An unreadable file or one with no valid row fails the run.
    """
    logger = get_run_logger()
    result = ingest(ratings_file, items_file, config)
    out = Path(home) / "ingested" / result.content_hash[:16]
    ratings_path = write_parquet_atomic(result.ratings, out / "ratings.parquet", RATINGS_SCHEMA)
    items_path = write_parquet_atomic(result.items, out / "items.parquet", ITEMS_SCHEMA)
    quarantine_path = write_parquet_atomic(result.quarantine, out / "quarantine.parquet", QUARANTINE_SCHEMA)
    counts = result.counts
    for role in ("ratings", "items"):
        c = counts[role]
        logger.info("%s: %d rows read, %d accepted, %d quarantined (%s)", role, c["rows_read"], c["rows_accepted"],
                    c["rows_quarantined"], c["file"])
    reasons = {k: v for k, v in counts.get("reasons", {}).items() if v}
    if reasons:
        logger.warning("quarantined rows by reason: %s (see %s)", reasons, quarantine_path)
    metrics = {f"ingest_{role}_{k}": counts[role][k] for role in ("ratings", "items")
               for k in ("rows_read", "rows_accepted", "rows_quarantined")}
    metrics.update({f"ingest_quarantined_{k}": v for k, v in counts.get("reasons", {}).items()})
    metrics["ingest_items_empty_text"] = counts["items"].get("empty_text", 0)
    run.log_metrics(metrics)
    run.set_tags({"data_hash": result.content_hash})
    run.log_text(json.dumps(counts, indent=1, default=str), "ingest/counts.json")
    create_markdown_artifact(_counts_markdown(counts), key="ingest-counts", description="Ingest row accounting")
    return IngestedData(ratings_path, items_path, quarantine_path, result.content_hash, counts)
