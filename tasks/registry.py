"""MLflow model logging, registry aliases and champion/challenger promotion for ConvMF bundles.

The served model is the pyfunc of :mod:`tasks.pyfunc`, logged from code (``tasks/mlflow_model.py``): no Python
object is pickled.

The registry helpers assume one writer at a time per registered model (the pipeline's deployments run with a
concurrency limit of 1, ``collision_strategy: ENQUEUE``): reading the champion and moving the alias are two requests,
not one transaction. :func:`promote` narrows the window further by reading the alias again right before moving it
and comparing again when it moved.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from packaging.version import Version

from convmf_core.metrics import GatePolicy, guard_violations, higher_is_better as metric_higher_is_better
from convmf_core.persistence import read_manifest
from tasks.pyfunc import DEFAULT_N, _Scorer, model_signature

__all__ = [
    "CHALLENGER_ALIAS",
    "CHAMPION_ALIAS",
    "ModelVersionInfo",
    "PromotionDecision",
    "alias_move_markdown",
    "alias_moves",
    "bundle_rmse",
    "get_alias_version",
    "load_champion",
    "log_model_version",
    "pip_requirements",
    "promote",
    "rollback_champion",
]

CHAMPION_ALIAS = "champion"
CHALLENGER_ALIAS = "challenger"

# Model-version tags written by promote() / rollback_champion().
TAG_DECISION = "promotion.decision"
TAG_REASON = "promotion.reason"
TAG_PREVIOUS_CHAMPION = "promotion.previous_champion"
TAG_TIME = "promotion.time"
TAG_METRIC = "promotion.metric"

_MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
_REQUIREMENT_PACKAGES = ("mlflow", "torch", "numpy", "pandas", "pyarrow")

BASELINE_MARGIN = 1e-6  # how much a candidate must beat the global-mean predictor by (float32 rounding)


# ------------------------------------------------------------------------------------------------------------------
# Logging and registration
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelVersionInfo:
    """A registered model version: ``model_uri`` is ``models:/<name>/<version>``."""

    name: str
    version: str
    model_uri: str
    logged_model_uri: str
    run_id: str | None




def pip_requirements() -> list[str]:
    """Exact pins of the serving dependencies, from the installed versions (local build tags such as +cpu dropped).

    Giving them explicitly skips MLflow's requirement inference (5-8 s a model). The convmf-pipeline package itself
    is not on a package index: the serving environment must have it installed (``--env-manager local``).
    """
    return [f"{name}=={Version(importlib_metadata.version(name)).public}" for name in _REQUIREMENT_PACKAGES]


@contextlib.contextmanager
def _run_context(run_id: str | None) -> Iterator[None]:
    active = mlflow.active_run()
    if run_id is None or (active is not None and active.info.run_id == run_id):
        yield
    elif active is None:
        with mlflow.start_run(run_id=run_id):
            yield
    else:
        raise ValueError(f"run {active.info.run_id} is active; cannot log the model to run {run_id}")


def log_model_version(bundle_dir: Path, *, model_name: str, run_id: str | None, tags: dict[str, str],
                      input_example: pd.DataFrame | None = None, seen: pd.DataFrame | None = None) -> ModelVersionInfo:
    """Log ``bundle_dir`` as a models-from-code pyfunc and register it as a new version of ``model_name``.

    Logged within run ``run_id`` (or the active run when ``None``; with neither, MLflow 3 logs a model without a
    run). ``seen`` (raw ``user_id``, ``item_id`` columns, usually the training ratings) is excluded from top-N
    lists; when omitted, a ``seen.parquet`` inside ``bundle_dir`` is used if present. ``tags`` become model-version
    tags (record the validation metric here, e.g. ``{"validation_rmse": "0.93"}``, for :func:`promote`).
    """
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)  # fails early on a missing/corrupt bundle
    version_tags = {"convmf.model_class": str(manifest.get("model_class")),
                    "convmf.library_version": str(manifest.get("library_version")), **tags}
    registered = version_of_run(model_name, run_id) if run_id is not None else None
    if registered is not None:  # a retry after the registration reached the server: finish it, register nothing
        _set_version_tags(model_name, str(registered.version), version_tags)
        return ModelVersionInfo(model_name, str(registered.version), f"models:/{model_name}/{registered.version}",
                                registered.source, run_id)
    with tempfile.TemporaryDirectory(prefix="convmf-seen-") as tmp:
        artifacts = {"bundle": str(bundle_dir)}
        if seen is not None:
            missing = {"user_id", "item_id"} - set(seen.columns)
            if missing:
                raise ValueError(f"seen needs columns user_id and item_id; missing {sorted(missing)}")
            path = Path(tmp) / "seen.parquet"
            seen[["user_id", "item_id"]].to_parquet(path, index=False)
            artifacts["seen"] = str(path)
        elif (bundle_dir / "seen.parquet").is_file():
            artifacts["seen"] = str(bundle_dir / "seen.parquet")
        if input_example is None and (bundle_dir / "user_ids.parquet").is_file():  # two users of the bundle's map
            first = pd.read_parquet(bundle_dir / "user_ids.parquet")["raw_id"].head(2).tolist()
            input_example = pd.DataFrame({"user_id": first, "n": [DEFAULT_N] * len(first)})
        with _run_context(run_id):
            info = mlflow.pyfunc.log_model(name="model", python_model=str(_MODEL_CODE), artifacts=artifacts,
                                           signature=model_signature(), input_example=input_example,
                                           pip_requirements=pip_requirements(), registered_model_name=model_name)
    version = str(info.registered_model_version)
    _set_version_tags(model_name, version, version_tags)
    return ModelVersionInfo(model_name, version, f"models:/{model_name}/{version}", info.model_uri,
                            info.run_id or None)


def version_of_run(model_name: str, run_id: str) -> ModelVersion | None:
    """The version of ``model_name`` registered from run ``run_id`` (the first one), or ``None``."""
    found = MlflowClient().search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def _set_version_tags(model_name: str, version: str, tags: dict[str, str]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, str(value))


# ------------------------------------------------------------------------------------------------------------------
# Aliases and promotion
# ------------------------------------------------------------------------------------------------------------------


def get_alias_version(model_name: str, alias: str) -> ModelVersion | None:
    """The version of ``model_name`` that ``alias`` points to, or ``None`` when the alias (or model) is not set."""
    client = MlflowClient()
    # Read the alias table rather than get_model_version_by_alias: a missing alias is INVALID_PARAMETER_VALUE in
    # the SQL store, indistinguishable from a real error without matching the message.
    try:
        aliases = client.get_registered_model(model_name).aliases
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = aliases.get(alias)
    return None if version is None else client.get_model_version(model_name, str(version))


@dataclass(frozen=True)
class PromotionDecision:
    """Outcome of :func:`promote`: ``markdown`` is a short report for a Prefect artifact.

    ``champion_value`` is the figure the candidate was compared with: the champion re-evaluated on the candidate's
    validation split when :func:`promote` was given ``champion_metric``, else the champion's recorded figure
    (``champion_recorded_value``, measured on its own run's data).
    """

    promoted: bool
    reason: str
    previous_version: str | None  # the champion before the decision
    champion_version: str | None  # the champion after it
    candidate_version: str
    metric_name: str
    candidate_value: float
    champion_value: float | None
    markdown: str
    champion_recorded_value: float | None = None
    champion_value_source: str = "recorded"  # "recorded", "this run's validation split" or "none"
    baseline_value: float | None = None  # the global-mean predictor on the same split
    attempts: int = 1  # comparisons made (more than one when the champion moved during the decision)
    time: str = ""
    run_id: str | None = None
    # With a GatePolicy: every figure of both models on the candidate's validation split (gate metric, the other
    # metric, both on the cold-item slice), the policy, and the guard rails that could not be checked.
    candidate_figures: Mapping[str, float] | None = None
    champion_figures: Mapping[str, float] | None = None
    policy: GatePolicy | None = None
    guard_notes: tuple[str, ...] = ()


def _recorded_metric(client: MlflowClient, version: ModelVersion, metric_name: str) -> float | None:
    """A version's metric: its tag ``metric_name`` if set, else the metric of its source run, else ``None``."""
    raw = version.tags.get(metric_name)
    if raw is not None:
        try:
            return float(raw)
        except ValueError:
            return None
    if version.run_id:
        return client.get_run(version.run_id).data.metrics.get(metric_name)
    return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _version_of(found: ModelVersion | None) -> str | None:
    return None if found is None else str(found.version)  # the SQL store returns an int


# Model-version tags of the promotion record (besides TAG_DECISION ... TAG_METRIC above).
TAG_RUN = "promotion.run_id"
TAG_CANDIDATE_VALUE = "promotion.candidate_value"
TAG_CHAMPION_VALUE = "promotion.champion_value"
TAG_CHAMPION_SOURCE = "promotion.champion_value_source"
TAG_CHAMPION_RECORDED = "promotion.champion_recorded_value"
TAG_BASELINE = "promotion.global_mean_value"
TAG_ATTEMPTS = "promotion.attempts"
TAG_POLICY = "promotion.gate_policy"
TAG_CANDIDATE_FIGURE = "promotion.candidate."  # + figure name, '@' written '_at_'
TAG_CHAMPION_FIGURE = "promotion.champion."
MAX_PROMOTION_ATTEMPTS = 3


def _tag_key(name: str) -> str:
    return name.replace("@", "_at_")


def _decide(version: str, previous: str | None, candidate: float, champion_value: float | None,
            baseline: float | None, problems: list[str], metric_name: str,
            higher_is_better: bool, policy: GatePolicy | None = None,
            candidate_figures: Mapping[str, float] | None = None,
            champion_figures: Mapping[str, float] | None = None) -> tuple[bool, str]:
    better = "higher" if higher_is_better else "lower"

    def beats(a: float, b: float) -> bool:
        return a > b if higher_is_better else a < b

    if previous == version:
        return False, f"version {version} is already the champion"
    if problems:
        return False, "; ".join(problems)
    if not math.isfinite(candidate):
        return False, f"{metric_name} is {candidate}, not a finite number"
    # The global-mean rule: a candidate must beat that predictor by more than float32 rounding (a model that fell
    # back to the global mean, ALSConfig.fallback, predicts it exactly up to 1e-7 and must not become champion).
    margin = BASELINE_MARGIN if higher_is_better else -BASELINE_MARGIN
    if policy is not None and policy.metric != "rmse":  # the global-mean rule holds on RMSE whatever the gate
        rmse = (candidate_figures or {}).get("rmse", float("nan"))
        if baseline is not None and math.isfinite(baseline) and not (rmse < baseline - BASELINE_MARGIN):
            return False, (f"rmse {rmse:.4f} is no better than the global-mean predictor's {baseline:.4f} on the "
                           "same split")
    elif baseline is not None and math.isfinite(baseline) and not beats(candidate, baseline + margin):
        return False, (f"{metric_name} {candidate:.4f} is no better than the global-mean predictor's "
                       f"{baseline:.4f} on the same split")
    if previous is None:
        return True, "no champion yet"
    if champion_value is None or not math.isfinite(champion_value):
        return True, f"champion version {previous} has no finite {metric_name} recorded"
    if not beats(candidate, champion_value):
        return False, (f"{metric_name} {candidate:.4f} does not beat the champion's {champion_value:.4f} "
                       f"({better} is better)")
    wins = f"{metric_name} {candidate:.4f} beats the champion's {champion_value:.4f} ({better} is better)"
    if policy is not None:
        violations, _ = guard_violations(candidate_figures or {}, champion_figures or {}, policy)
        if violations:
            return False, f"{wins}, but {'; '.join(violations)}"
    return True, wins


def promote(model_name: str, version: str, metric_name: str, candidate_value: float, *,
            higher_is_better: bool = False,
            champion_metric: Callable[[ModelVersion], float | Mapping[str, float] | None] | None = None,
            baseline_value: float | None = None, problems: Sequence[str] = (), run_id: str | None = None,
            max_attempts: int = MAX_PROMOTION_ATTEMPTS,
            before_alias_move: Callable[[int], None] | None = None, policy: GatePolicy | None = None,
            candidate_figures: Mapping[str, float] | None = None) -> PromotionDecision:
    """Make ``version`` the champion if ``candidate_value`` is finite and strictly beats the champion's metric.

    * With ``policy`` (:class:`convmf_core.metrics.GatePolicy`), ``candidate_value`` is the candidate's figure of
      ``policy.metric``, ``candidate_figures`` holds all of ``policy.figure_keys()``, and ``champion_metric``
      returns the champion's figures as a mapping with the same keys: a candidate that beats the champion on the
      gate metric is still refused when it regresses beyond the policy's tolerances on the other metric or on the
      cold-item slice (:func:`convmf_core.metrics.guard_violations`). Both models' figures go to the tags
      (``promotion.candidate.<figure>``, ``promotion.champion.<figure>``) and to ``markdown``.

    * The champion's figure: ``champion_metric(champion_version)`` when given (the pipeline evaluates the champion
      on the candidate's own validation split, so both figures are measured on the same data), else its version
      tag ``metric_name`` (written here on every candidate) or its run's metric, which is also the fallback when
      ``champion_metric`` raises. No champion yet, or one without a finite figure: a candidate that passes the
      checks below is promoted.
    * Never promoted: NaN or infinite ``candidate_value``; any entry of ``problems`` (e.g. non-finite factors);
      a candidate no better than ``baseline_value`` (the global-mean predictor on the same split), when given;
      with a ``policy`` whose metric is not RMSE, ``baseline_value`` is the global mean's RMSE and the candidate's
      ``candidate_figures["rmse"]`` must beat it.
    * Races: right before moving an alias the champion alias is read again; if it moved since the comparison
      began (another training run promoted meanwhile), the comparison is made again against the new champion, at
      most ``max_attempts`` times (then nothing is promoted). ``before_alias_move(attempt)`` is called between the
      comparison and that re-read (a test hook). The primary guard is the deployments' concurrency limit (one
      training run at a time, ``collision_strategy: ENQUEUE``, prefect.yaml); that limit is per deployment, so this
      check covers a ``retrain`` overlapping ``nightly-retrain`` and runs started outside the deployments. Reading
      and moving the alias are still two requests, not one transaction.
    * Otherwise the version gets the ``challenger`` alias. The decision, reason, previous champion, both figures,
      the baseline, run id and time are written as model-version tags on ``version`` (a displaced champion gets
      ``promotion.replaced_by``) and in ``markdown``.
    """
    client = MlflowClient()
    version = str(version)
    candidate = float(candidate_value)
    client.get_model_version(model_name, version)  # fails clearly on an unknown version
    client.set_model_version_tag(model_name, version, metric_name, repr(candidate))
    problems = list(problems)
    race_notes: list[str] = []
    attempt = 0
    while True:
        attempt += 1
        current = get_alias_version(model_name, CHAMPION_ALIAS)
        previous = _version_of(current)
        recorded = _recorded_metric(client, current, metric_name) if current is not None else None
        champion_value, source = recorded, "recorded" if current is not None else "none"
        champion_figures: dict[str, float] = {}
        if current is not None and previous != version and champion_metric is not None:
            try:
                measured = champion_metric(current)
                if isinstance(measured, Mapping):
                    champion_figures = {k: float(v) for k, v in measured.items()}
                    measured = champion_figures.get(policy.metric if policy is not None else metric_name)
                champion_value, source = measured, "this run's validation split"
            except Exception as exc:  # fall back to its recorded figure: a failed download must not promote
                source = f"recorded (re-evaluation failed: {type(exc).__name__}: {exc})"[:500]
        promoted, reason = _decide(version, previous, candidate, champion_value, baseline_value, problems,
                                   metric_name, higher_is_better, policy, candidate_figures, champion_figures)
        if before_alias_move is not None:
            before_alias_move(attempt)
        now = _version_of(get_alias_version(model_name, CHAMPION_ALIAS))
        if now == previous:
            break
        race_notes.append(f"the champion moved from version {previous or 'none'} to {now or 'none'} during "
                          f"comparison {attempt}")
        if attempt >= max_attempts:
            promoted, reason = False, (f"the champion alias kept moving ({attempt} comparisons); "
                                       f"nothing promoted, rerun to compare again")
            previous = now
            break

    if promoted:
        client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version)
        challenger = get_alias_version(model_name, CHALLENGER_ALIAS)
        if challenger is not None and str(challenger.version) == version:
            client.delete_registered_model_alias(model_name, CHALLENGER_ALIAS)
        champion_after = version
    else:
        if previous != version:
            client.set_registered_model_alias(model_name, CHALLENGER_ALIAS, version)
        champion_after = previous
    if race_notes:
        reason = f"{reason} (re-compared: {'; '.join(race_notes)})"
    decision = CHAMPION_ALIAS if promoted or previous == version else CHALLENGER_ALIAS
    when = _now()
    tags = {TAG_DECISION: decision, TAG_REASON: reason, TAG_PREVIOUS_CHAMPION: previous or "", TAG_TIME: when,
            TAG_METRIC: metric_name, TAG_RUN: run_id or "", TAG_CANDIDATE_VALUE: repr(candidate),
            TAG_CHAMPION_VALUE: "" if champion_value is None else repr(float(champion_value)),
            TAG_CHAMPION_SOURCE: source, TAG_CHAMPION_RECORDED: "" if recorded is None else repr(float(recorded)),
            TAG_BASELINE: "" if baseline_value is None else repr(float(baseline_value)), TAG_ATTEMPTS: str(attempt)}
    figures = dict(candidate_figures or {})
    guard_notes: tuple[str, ...] = ()
    if policy is not None:
        tags[TAG_POLICY] = (f"{policy.metric} must beat the champion; {policy.other} within "
                            f"{policy.other_tolerance:.0%}, cold_{policy.metric} within {policy.cold_tolerance:.0%}")
        tags.update({TAG_CANDIDATE_FIGURE + _tag_key(k): repr(float(v)) for k, v in figures.items()})
        tags.update({TAG_CHAMPION_FIGURE + _tag_key(k): repr(float(v)) for k, v in champion_figures.items()})
        if champion_figures:
            guard_notes = tuple(guard_violations(figures, champion_figures, policy)[1])
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    if promoted and previous is not None:
        client.set_model_version_tag(model_name, previous, "promotion.replaced_by", version)
        client.set_model_version_tag(model_name, previous, "promotion.replaced_time", when)

    verdict = "promoted to **champion**" if promoted else f"kept as **{decision}**"
    markdown = "\n".join([
        f"### Model `{model_name}` version {version}: {verdict}",
        "",
        f"| model | version | {metric_name} | measured on |",
        "|---|---|---|---|",
        f"| candidate | {version} | {_fmt(candidate)} | this run's validation split |",
        f"| champion before | {previous or 'none'} | {_fmt(champion_value)} | {source} |",
        f"| champion before, as recorded | {previous or 'none'} | {_fmt(recorded)} | its own run's data |",
        f"| global-mean predictor | - | {_fmt(baseline_value if policy is None or policy.metric == 'rmse' else None)} "
        "| this run's validation split |",
        "",
        f"Reason: {reason}. Champion now: version {champion_after or 'none'}.",
        "",
        f"Time: {when}. Run: {run_id or 'n/a'}. Comparisons: {attempt}.",
    ])
    if policy is not None:
        markdown += "\n\n" + _figures_markdown(policy, figures, champion_figures, previous, guard_notes,
                                                 baseline_value)
    markdown += "\n\n" + alias_move_markdown(model_name, alias_moves(promoted, version, previous), when, reason)
    return PromotionDecision(promoted, reason, previous, champion_after, version, metric_name, candidate,
                             champion_value, markdown, recorded, source, baseline_value, attempt, when, run_id,
                             figures if policy is not None else None,
                             champion_figures if policy is not None else None, policy, guard_notes)


def _figures_markdown(policy: GatePolicy, candidate: Mapping[str, float], champion: Mapping[str, float],
                      previous: str | None, notes: Sequence[str], baseline: float | None) -> str:
    """The gate's figures of both models, with the rule each one is held to."""
    lines = [f"#### Gate `{policy.metric}` with guard rails (both models on this run's validation split)", "",
             f"| figure | candidate | champion {previous or 'none'} | rule |", "|---|---|---|---|"]
    tolerances = dict(policy.guards())
    for key in policy.figure_keys():
        direction = "higher is better" if metric_higher_is_better(key) else "lower is better"
        if key == policy.metric:
            rule = f"must beat the champion ({direction})"
        elif key in tolerances:
            rule = f"may not regress more than {tolerances[key]:.0%} ({direction})"
        else:
            rule = f"reported ({direction})"
        lines.append(f"| {key} | {_fmt(candidate.get(key))} | {_fmt(champion.get(key))} | {rule} |")
    if baseline is not None:
        lines.append(f"| rmse of the global-mean predictor | {_fmt(baseline)} | {_fmt(baseline)} | the candidate's "
                     "rmse must beat it |")
    if notes:
        lines += ["", "Not checked: " + "; ".join(notes) + "."]
    return "\n".join(lines)


def alias_moves(promoted: bool, version: str, previous: str | None) -> list[tuple[str, str, str | None]]:
    """The alias moves of a promotion decision, as ``(alias, to_version, from_version)``: ``champion`` from the
    previous champion when promoted, else ``challenger`` (none when the version already was the champion)."""
    if previous == version:
        return []
    return [(CHAMPION_ALIAS, version, previous)] if promoted else [(CHALLENGER_ALIAS, version, None)]


def alias_move_markdown(model_name: str, moves: Sequence[tuple[str, str, str | None]], when: str,
                        reason: str) -> str:
    """A markdown record of alias moves: each ``(alias, to_version, from_version)``; no move is said as such."""
    lines = [f"#### Alias moves of `{model_name}`", ""]
    if not moves:
        return "\n".join(lines + [f"None ({when}): {reason}."])
    lines += ["| alias | from version | to version | time | why |", "|---|---|---|---|---|"]
    lines += [f"| {alias} | {source or '-'} | {target} | {when} | {reason} |" for alias, target, source in moves]
    return "\n".join(lines)


def rollback_champion(model_name: str) -> str:
    """Point ``champion`` back at the version it replaced (tag ``promotion.previous_champion``); returns it.

    Raises :class:`ValueError` when there is no champion or it records no previous champion. The move is recorded
    as tags on both versions: the rolled-back one (decision ``rolled_back``, reason, time) and the restored one
    (``promotion.restored_time``, ``promotion.restored_from``).
    """
    client = MlflowClient()
    current = get_alias_version(model_name, CHAMPION_ALIAS)
    if current is None:
        raise ValueError(f"model {model_name!r} has no '{CHAMPION_ALIAS}' alias to roll back")
    current_version = str(current.version)
    previous = current.tags.get(TAG_PREVIOUS_CHAMPION, "")
    if not previous:
        raise ValueError(f"champion version {current_version} of {model_name!r} records no previous champion")
    try:
        client.get_model_version(model_name, previous)
    except MlflowException as exc:
        raise ValueError(f"previous champion version {previous} of {model_name!r} no longer exists") from exc
    client.set_registered_model_alias(model_name, CHAMPION_ALIAS, previous)
    now = _now()
    client.set_model_version_tag(model_name, current_version, TAG_DECISION, "rolled_back")
    client.set_model_version_tag(model_name, current_version, TAG_REASON, f"rolled back to version {previous}")
    client.set_model_version_tag(model_name, current_version, TAG_TIME, now)
    client.set_model_version_tag(model_name, previous, "promotion.restored_time", now)
    client.set_model_version_tag(model_name, previous, "promotion.restored_from", current_version)
    return previous


def bundle_rmse(bundle_dir: Path, user_ids: np.ndarray, item_ids: np.ndarray, ratings: np.ndarray) -> float:
    """RMSE of a bundle's predictions of ``ratings`` given by raw ids, computed as the served pyfunc predicts:
    unknown users/items get the average user/item row (global mean plus the average bias and factors), never
    an error. Used to evaluate the registry's champion on a new run's validation split."""
    scorer = _Scorer.load(Path(bundle_dir), None)
    users = scorer.indices(pd.Series(np.asarray(user_ids, dtype=object)), "user_id", "fallback")
    items = scorer.indices(pd.Series(np.asarray(item_ids, dtype=object)), "item_id", "fallback")
    if len(users) == 0:
        return float("nan")
    errors = scorer.rate(users, items).astype(np.float64) - np.asarray(ratings, dtype=np.float64)
    return float(np.sqrt(np.mean(errors ** 2)))


def load_champion(model_name: str, alias: str = CHAMPION_ALIAS) -> mlflow.pyfunc.PyFuncModel:
    """Load the pyfunc that ``alias`` of ``model_name`` points to (``models:/<name>@<alias>``)."""
    return mlflow.pyfunc.load_model(f"models:/{model_name}@{alias}")
