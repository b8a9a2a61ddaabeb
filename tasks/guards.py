"""Guards that run before training: the data sanity gate and the idempotent-rerun check.

* **Sanity gate.** A nightly job nobody watches must not train (and possibly promote) a model on a catalogue that
  collapsed overnight. Before training, the accepted ratings are compared with the last successful training run of
  the same model in the same experiment (its ``ingest_ratings_rows_accepted`` metric), and each file's quarantined
  share with a threshold. A failed check raises :class:`DataGateError`; the flow ends the MLflow run ``FAILED`` with
  the tag ``gate_reason`` and the champion stays. ``override_gate`` lets a deliberate catalogue change through.
* **Idempotent reruns.** A registered version records the data hash and :func:`config_hash` of the parameters that
  made it. A run whose data and configuration match an existing version trains nothing and registers nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task

from tasks.registry import ModelVersionInfo
from tasks.tracking import RunRef, with_retries

GATE_METRIC = "ingest_ratings_rows_accepted"
CONFIG_HASH_TAG = "config_hash"
DATA_HASH_TAG = "data_hash"
# TrainingParams fields that do not change the model a run produces: where it is stored, how the gate is set, and
# where tokenization shards run (identical result).
NON_MODEL_FIELDS = frozenset({"storage", "override_gate", "gate_max_ratings_drop", "gate_max_quarantine_share",
                              "tokenize", "gate_metric", "gate_other_tolerance", "gate_cold_tolerance"})


class DataGateError(RuntimeError):
    """The input data failed the sanity gate: the run stops before training and the champion stays."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"sanity gate: {reason}; nothing was trained and the champion is unchanged (set "
                         "override_gate=True for a deliberate catalogue change)")
        self.reason = reason


@dataclass(frozen=True)
class GateResult:
    """The gate's figures: accepted ratings now and in the previous successful run, quarantined shares."""

    accepted: int
    previous_accepted: int | None
    previous_run_id: str | None
    quarantined_share: dict[str, float]
    failures: tuple[str, ...]
    overridden: bool

    @property
    def passed(self) -> bool:
        """True when no check failed (or the failures were overridden)."""
        return not self.failures or self.overridden


def config_hash(params: Any) -> str:
    """sha256 of the training parameters that determine the model (a pydantic model; storage and gate settings
    left out), as canonical JSON."""
    dumped = params.model_dump(mode="json", exclude=set(NON_MODEL_FIELDS) & set(type(params).model_fields))
    return hashlib.sha256(json.dumps(dumped, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def previous_accepted_ratings(run: RunRef, model_name: str) -> tuple[int | None, str | None]:
    """``ingest_ratings_rows_accepted`` of the latest FINISHED training run of ``model_name`` in ``run``'s
    experiment (not ``run`` itself), and that run's id; ``(None, None)`` when there is none."""
    client = run.client()
    experiment_id = with_retries(lambda: client.get_run(run.run_id).info.experiment_id, "get run")
    runs = with_retries(lambda: client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'FINISHED' and tags.model_name = '{model_name}'",
        order_by=["attributes.start_time DESC"], max_results=50), "search runs")
    for found in runs:
        if found.info.run_id != run.run_id and GATE_METRIC in found.data.metrics:
            return int(found.data.metrics[GATE_METRIC]), found.info.run_id
    return None, None


def evaluate_gate(counts: dict, previous_accepted: int | None, max_drop: float, max_quarantine_share: float,
                  override: bool, previous_run_id: str | None = None) -> GateResult:
    """Apply the gate's two checks to one ingest's row counts (pure: no I/O)."""
    accepted = int(counts["ratings"]["rows_accepted"])
    failures: list[str] = []
    if previous_accepted and accepted < (1.0 - max_drop) * previous_accepted:
        drop = 1.0 - accepted / previous_accepted
        failures.append(f"accepted ratings fell by {drop:.0%} ({previous_accepted} -> {accepted}) against the last "
                        f"successful run {previous_run_id}, more than the allowed {max_drop:.0%}")
    shares: dict[str, float] = {}
    for role in ("ratings", "items"):
        c = counts[role]
        shares[role] = c["rows_quarantined"] / c["rows_read"] if c["rows_read"] else 0.0
        if shares[role] > max_quarantine_share:
            failures.append(f"{shares[role]:.0%} of the {role} rows were quarantined ({c['rows_quarantined']} of "
                            f"{c['rows_read']} in {c['file']}), more than the allowed {max_quarantine_share:.0%}")
    return GateResult(accepted, previous_accepted, previous_run_id, shares, tuple(failures), override)


@task(name="data-gate")
def check_data_gate(counts: dict, model_name: str, max_drop: float, max_quarantine_share: float, override: bool,
                    run: RunRef) -> GateResult:
    """Stop the run (:class:`DataGateError`, run tagged ``gate_reason``) when the accepted ratings fell by more
    than ``max_drop`` against the last successful run, or a file's quarantined share passes
    ``max_quarantine_share``; ``override`` logs the failure and lets the run through."""
    logger = get_run_logger()
    previous, previous_run = previous_accepted_ratings(run, model_name)
    result = evaluate_gate(counts, previous, max_drop, max_quarantine_share, override, previous_run)
    run.log_metrics({"gate_ratings_accepted_previous": previous,
                     **{f"gate_{role}_quarantined_share": v for role, v in result.quarantined_share.items()}})
    if not result.failures:
        logger.info("sanity gate passed: %d accepted ratings (previous successful run: %s), quarantined shares %s",
                    result.accepted, previous if previous is not None else "none", result.quarantined_share)
        return result
    reason = "; ".join(result.failures)
    if override:
        logger.warning("sanity gate OVERRIDDEN (override_gate=True): %s", reason)
        run.set_tags({"gate_overridden": reason[:5000]})
        return result
    logger.error("sanity gate failed, stopping before training: %s", reason)
    run.set_tags({"gate_reason": reason[:5000]})
    raise DataGateError(reason)


@task(name="find-identical-version")
def find_identical_version(model_name: str, data_hash: str, config_digest: str,
                           run: RunRef) -> ModelVersionInfo | None:
    """The newest registered version of ``model_name`` whose tags hold this data hash and configuration hash
    (``None`` when there is none: the run trains)."""
    client: MlflowClient = run.client()
    versions = with_retries(lambda: client.search_model_versions(f"name = '{model_name}'"), "search versions")
    matches = [v for v in versions if v.status == "READY" and v.tags.get(DATA_HASH_TAG) == data_hash
               and v.tags.get(CONFIG_HASH_TAG) == config_digest]
    if not matches:
        return None
    v = max(matches, key=lambda m: int(m.version))
    return ModelVersionInfo(model_name, str(v.version), f"models:/{model_name}/{v.version}", v.source, v.run_id)


def tag_config_hash(version: ModelVersionInfo, config_digest: str, run: RunRef) -> None:
    """Record the configuration hash on a registered version (what :func:`find_identical_version` looks for)."""
    client = run.client()
    with_retries(lambda: client.set_model_version_tag(version.name, version.version, CONFIG_HASH_TAG, config_digest),
                 "tag model version")
