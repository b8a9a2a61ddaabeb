"""The champion/challenger gate on a configurable metric, with guard rails, and what a run shows a person - with real
components: a temporary Prefect server, a real MLflow SQLite store and registry, a real tiny ConvMF trained by the
training flow, real registrations, real Prefect artifacts (nothing mocked).

The champion is the flow's ConvMF. The challengers are real registered model bundles whose scores are constructed
from that champion's scores on the champion's own split, so that what each must show holds by construction (and is
asserted from the figures, measured independently here):

* "cold loser": exact ratings on the warm validation pairs (it wins on NDCG@10 and on RMSE), but on every cold item
  the user rated it scores below all other cold items (the worst possible cold ranking) -> refused by the cold guard.
* "better": exact ratings on every validation pair, unrated cold items pushed to the bottom -> promoted.

Then ``convmf rollback`` moves the champion back, and that move is recorded as an artifact too.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from prefect import flow
from prefect.artifacts import Artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

from convmf_core.config import ALSConfig, GibbsConfig, PMFConfig
from convmf_core.data import Split
from convmf_core.metrics import GatePolicy, cold_items_of, evaluate
from convmf_core.models.als_mf import PMF
from convmf_core.persistence import load_model, save_model
from flows.cli import main
from flows.params import DataParams, ModelParams, SplitParams, TrainingParams
from flows.training import TrainingResult, training_flow
from tasks.register import promote_model, register_model, use_tracking_uri
from tasks.registry import CHAMPION_ALIAS, PromotionDecision, promote
from tasks.train import TrainedModel, read_split
from tasks.tracking import RunRef, end_run, start_run
from tests.pipeline_support import Store, make_store

pytestmark = pytest.mark.filterwarnings("ignore:Operation with range is deprecated")

MODEL = "convmf-gate"
DATA = DataParams(builtin_users=80, builtin_items=60)
TINY = ModelParams(n_factors=4, embedding_dim=16, n_filters=8, hidden_dim=16, max_iterations=4,
                   cnn_epochs_per_iteration=1, device="cpu", posterior_samples=10, burn_in=5)
SPLIT = SplitParams(kind="random", cold_item_fraction=0.1)
POLICY = GatePolicy("ndcg@10", other_tolerance=0.02, cold_tolerance=0.05)


@pytest.fixture(scope="module")
def store(mlflow_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Store:
    return make_store(mlflow_template, tmp_path_factory.mktemp("gate"))


@dataclasses.dataclass(frozen=True)
class FlowRun:
    result: TrainingResult
    flow_run_id: str


@pytest.fixture(scope="module")
def champion(prefect_harness: None, store: Store) -> FlowRun:
    """Version 1: the training flow's ConvMF, judged on NDCG@10 (no champion yet: promoted)."""
    state = training_flow(TrainingParams(model_name=MODEL, data=DATA, model=TINY, split=SPLIT, gate_metric="ndcg@10",
                                         storage=store.storage), return_state=True)
    return FlowRun(state.result(), str(state.state_details.flow_run_id))


def artifact(key: str, flow_run_id: str):
    """The artifact ``key`` of one flow run (its latest version)."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    assert found, f"no artifact {key!r} in flow run {flow_run_id}"
    return found[0]


# ------------------------------------------------------------------------------------------------------------------
# Constructed challengers
# ------------------------------------------------------------------------------------------------------------------


def score_bundle(scores: np.ndarray, like: TrainedModel, split: Split, directory: Path) -> Path:
    """A real model bundle (a PMF whose k = n_items factors are the score rows and the identity) that scores
    (u, j) as ``scores[u, j]`` (predictions clipped to the rating range), with ``like``'s id maps."""
    base = load_model(like.bundle_dir)
    n_users, n_items = scores.shape
    pmf = PMF(PMFConfig(als=ALSConfig(n_factors=n_items, max_iterations=1, patience=1, gibbs=GibbsConfig(samples=0)),
                        seed=0, device="cpu"))  # a point model: its factors are overwritten below
    pmf.fit(split.train)
    pmf.user_factors_ = torch.as_tensor(scores, dtype=torch.float32).contiguous()
    pmf.item_factors_ = torch.eye(n_items)
    pmf.user_bias_, pmf.item_bias_ = torch.zeros(n_users), torch.zeros(n_items)
    pmf.global_mean_ = 0.0
    return save_model(pmf, directory, user_map=base.user_map, item_map=base.item_map)


def champion_scores(trained: TrainedModel) -> tuple[np.ndarray, Split]:
    """The champion's unclipped scores of every (user, item) and its split."""
    bundle = load_model(trained.bundle_dir)
    split, _ = read_split(trained.split_dir, bundle.model.n_users, bundle.model.n_items)
    return bundle.model.score(np.arange(bundle.model.n_users)), split


def cold_loser(trained: TrainedModel) -> np.ndarray:
    scores, split = champion_scores(trained)
    v, cold = split.validation, cold_items_of(split.train)
    warm = ~np.isin(v.items, cold)
    scores[v.users[warm], v.items[warm]] = v.values[warm]  # exact on warm validation pairs
    lowest = scores[:, cold].min(axis=1)
    scores[v.users[~warm], v.items[~warm]] = lowest[v.users[~warm]] - 0.5  # below every other cold item
    return scores


def better(trained: TrainedModel) -> np.ndarray:
    scores, split = champion_scores(trained)
    v, cold = split.validation, cold_items_of(split.train)
    scores[:, cold] = -5.0  # cold items nobody rated in validation: last
    scores[v.users, v.items] = v.values  # exact on every validation pair
    return scores


def measured(bundle_dir: Path, split: Split) -> dict[str, float]:
    """The gate's figures of a bundle, computed here with the library's evaluate()."""
    model = load_model(bundle_dir).model
    got = evaluate(model, split.train, split.validation, n=10, cold_items=cold_items_of(split.train))
    return {key: got[key] for key in POLICY.figure_keys()}


@flow(name="gate-test-judge")
def judge(trained: TrainedModel, run: RunRef, policy: GatePolicy) -> PromotionDecision:
    """Register ``trained`` and let the gate decide (the training flow's last two steps)."""
    version = register_model(trained, {}, MODEL, "constructed", run)
    return promote_model(version, trained, run, policy)


def challenge(champion: FlowRun, store: Store, name: str, scores: np.ndarray) -> tuple[PromotionDecision, str,
                                                                                       dict[str, float]]:
    trained = champion.result.trained
    _, split = champion_scores(trained)
    bundle = score_bundle(scores, trained, split, store.home / name / "bundle")
    figures = measured(bundle, split)
    challenger = dataclasses.replace(trained, bundle_dir=bundle, best_validation_rmse=figures["rmse"])
    storage = store.storage
    run = start_run(storage.resolved_tracking_uri(), storage.experiment, storage.artifact_root(), "training",
                    {"model_name": MODEL})
    state = judge(challenger, run, POLICY, return_state=True)
    end_run(run)
    return state.result(), str(state.state_details.flow_run_id), figures


@pytest.fixture(scope="module")
def refused(champion: FlowRun, store: Store):
    return challenge(champion, store, "cold-loser", cold_loser(champion.result.trained))


@pytest.fixture(scope="module")
def accepted(champion: FlowRun, refused, store: Store):
    return challenge(champion, store, "better", better(champion.result.trained))


# ------------------------------------------------------------------------------------------------------------------
# The gate
# ------------------------------------------------------------------------------------------------------------------


def test_first_version_is_judged_on_ndcg_and_measured_on_all_figures(champion: FlowRun, store: Store) -> None:
    d = champion.result.decision
    assert d.promoted and d.reason == "no champion yet" and d.metric_name == "validation_ndcg_at_10"
    assert d.policy == POLICY and set(d.candidate_figures) == set(POLICY.figure_keys())
    _, split = champion_scores(champion.result.trained)
    assert len(cold_items_of(split.train)) >= 6  # a cold slice worth the name
    expected = measured(champion.result.trained.bundle_dir, split)
    assert d.candidate_figures == pytest.approx(expected, rel=1e-6)
    assert all(math.isfinite(v) for v in expected.values())
    run = store.client.get_run(champion.result.run.run_id).data
    assert run.metrics["gate_candidate_ndcg_at_10"] == pytest.approx(expected["ndcg@10"], rel=1e-6)
    assert run.metrics["gate_candidate_cold_rmse"] == pytest.approx(expected["cold_rmse"], rel=1e-6)
    assert run.tags["gate_metric"] == "ndcg@10"


def test_challenger_winning_the_gate_metric_but_losing_the_cold_slice_is_refused(champion: FlowRun, refused,
                                                                                 store: Store) -> None:
    d, flow_run_id, figures = refused
    mine, theirs = figures, measured(champion.result.trained.bundle_dir, champion_scores(champion.result.trained)[1])
    # By construction: better on the gate metric and on RMSE, far worse on NDCG@10 among the cold items.
    assert mine["ndcg@10"] > theirs["ndcg@10"] and mine["rmse"] < theirs["rmse"]
    assert mine["cold_ndcg@10"] < theirs["cold_ndcg@10"] * (1 - POLICY.cold_tolerance)
    assert d.candidate_figures == pytest.approx(mine, rel=1e-6)
    assert d.champion_figures == pytest.approx(theirs, rel=1e-5)  # the champion re-evaluated on this split

    assert not d.promoted and d.previous_version == "1" and d.champion_version == "1"
    assert d.reason.startswith(f"validation_ndcg_at_10 {mine['ndcg@10']:.4f} beats the champion's "
                               f"{theirs['ndcg@10']:.4f} (higher is better), but cold_ndcg@10 "
                               f"{mine['cold_ndcg@10']:.4f} regresses beyond the 5% tolerance")
    assert "rmse" not in d.reason.split(", but ")[1]  # the other guard held
    assert str(store.client.get_model_version_by_alias(MODEL, CHAMPION_ALIAS).version) == "1"
    assert str(store.client.get_model_version_by_alias(MODEL, "challenger").version) == d.candidate_version

    # Both models' figures in the model-version tags ...
    tags = store.client.get_model_version(MODEL, d.candidate_version).tags
    assert tags["promotion.decision"] == "challenger" and tags["promotion.reason"] == d.reason
    assert float(tags["promotion.candidate.cold_ndcg_at_10"]) == pytest.approx(mine["cold_ndcg@10"], rel=1e-6)
    assert float(tags["promotion.champion.cold_ndcg_at_10"]) == pytest.approx(theirs["cold_ndcg@10"], rel=1e-5)
    assert float(tags["promotion.champion.rmse"]) == pytest.approx(theirs["rmse"], rel=1e-5)
    assert "cold_ndcg@10 within 5%" in tags["promotion.gate_policy"]
    # ... in the Prefect markdown artifact of the run, and in the MLflow run.
    markdown = artifact("promotion", flow_run_id).data
    assert markdown == d.markdown and d.reason in markdown
    assert (f"| cold_ndcg@10 | {mine['cold_ndcg@10']:.4f} | {theirs['cold_ndcg@10']:.4f} | may not regress more "
            f"than 5% (higher is better) |") in markdown
    assert f"| rmse | {mine['rmse']:.4f} | {theirs['rmse']:.4f} | may not regress more than 2%" in markdown
    assert f"| challenger | - | {d.candidate_version} |" in markdown  # the alias move
    run_id = store.client.get_model_version(MODEL, d.candidate_version).run_id
    use_tracking_uri(store.storage.resolved_tracking_uri())
    assert mlflow.artifacts.load_text(f"runs:/{run_id}/promotion/decision.md") == markdown


def test_genuinely_better_challenger_is_promoted(champion: FlowRun, accepted, store: Store) -> None:
    d, flow_run_id, figures = accepted
    theirs = d.champion_figures
    assert figures["ndcg@10"] > theirs["ndcg@10"] and figures["rmse"] < theirs["rmse"]
    assert figures["cold_ndcg@10"] > theirs["cold_ndcg@10"]
    assert d.promoted and d.previous_version == "1" and d.champion_version == d.candidate_version
    assert d.reason == (f"validation_ndcg_at_10 {figures['ndcg@10']:.4f} beats the champion's "
                        f"{theirs['ndcg@10']:.4f} (higher is better)")
    assert str(store.client.get_model_version_by_alias(MODEL, CHAMPION_ALIAS).version) == d.candidate_version
    markdown = artifact("promotion", flow_run_id).data
    assert f"| champion | 1 | {d.candidate_version} |" in markdown and "promoted to **champion**" in markdown
    assert f"| champion | 1 | {d.candidate_version} | {d.time} |" in artifact("alias-move", flow_run_id).data


def test_ndcg_gate_keeps_the_global_mean_rule_on_rmse(champion: FlowRun, store: Store) -> None:
    name = "convmf-gate-baseline"
    use_tracking_uri(store.storage.resolved_tracking_uri())
    store.client.create_registered_model(name)
    version = str(store.client.create_model_version(name, champion.result.version.logged_model_uri).version)
    figures = {"ndcg@10": 0.9, "rmse": 1.25, "cold_ndcg@10": 0.9, "cold_rmse": 1.0}
    d = promote(name, version, "validation_ndcg_at_10", 0.9, higher_is_better=True, baseline_value=1.2,
                policy=POLICY, candidate_figures=figures)
    assert not d.promoted  # a fine ranking, but ratings no better than predicting the mean: never champion
    assert d.reason == "rmse 1.2500 is no better than the global-mean predictor's 1.2000 on the same split"
    assert "| rmse of the global-mean predictor | 1.2000 | 1.2000 | the candidate's rmse must beat it |" in d.markdown
    assert promote(name, version, "validation_ndcg_at_10", 0.9, higher_is_better=True, baseline_value=1.3,
                   policy=POLICY, candidate_figures=figures).promoted  # no champion yet, and it beats the mean


def test_rollback_is_recorded_as_an_artifact(accepted, store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    d = accepted[0]
    uri = store.storage.resolved_tracking_uri()
    assert main(["rollback", "--home", str(store.home), "--tracking-uri", uri, "--model-name", MODEL]) == 0
    assert "champion is now version 1" in capsys.readouterr().out
    assert str(store.client.get_model_version_by_alias(MODEL, CHAMPION_ALIAS).version) == "1"
    record = Artifact.get("alias-move")
    assert record is not None and record.type == "markdown"
    assert "champion rolled back to version 1" in record.data
    assert f"| champion | {d.candidate_version} | 1 |" in record.data
    use_tracking_uri(uri)
    for version in (d.candidate_version, "1"):
        run_id = store.client.get_model_version(MODEL, version).run_id
        files = [a.path for a in store.client.list_artifacts(run_id, "promotion")]
        rollback = [f for f in files if f.startswith("promotion/rollback-")]
        assert len(rollback) == 1, files
        assert mlflow.artifacts.load_text(f"runs:/{run_id}/{rollback[0]}") == record.data


# ------------------------------------------------------------------------------------------------------------------
# What a run shows: beyond-accuracy table, the lists, the plots
# ------------------------------------------------------------------------------------------------------------------


def test_beyond_accuracy_is_logged_and_tabled(champion: FlowRun, store: Store) -> None:
    result = champion.result
    metrics = store.client.get_run(result.run.run_id).data.metrics
    for name in ("coverage", "novelty", "diversity", "popularity_bias"):
        for prefix in ("", "cold_"):
            key = f"{prefix}{name}@10"
            assert math.isfinite(result.metrics[key]), key
            assert metrics[f"test_{prefix}{name}_at_10"] == pytest.approx(result.metrics[key]), key
    assert result.metrics["novelty@10"] > 0 and 0 <= result.metrics["popularity_bias@10"] <= 1
    assert 0 < result.metrics["diversity@10"] <= 2
    # Cold items have no training rating: none is in the popular head, each has the largest self-information.
    assert result.metrics["cold_popularity_bias@10"] == 0.0
    assert result.metrics["cold_novelty@10"] > result.metrics["novelty@10"]
    table = artifact("beyond-accuracy", champion.flow_run_id)
    assert table.type == "table"
    import json

    rows = {row["metric"]: row for row in json.loads(table.data)}
    assert set(rows) == {"coverage@10", "novelty@10", "diversity@10", "popularity_bias@10"}
    assert rows["novelty@10"]["all items"] == pytest.approx(result.metrics["novelty@10"], abs=1e-5)
    assert rows["diversity@10"]["cold items"] == pytest.approx(result.metrics["cold_diversity@10"], abs=1e-5)


def test_top_lists_artifact_and_plots(champion: FlowRun, store: Store) -> None:
    import pandas as pd

    markdown = artifact("top-lists", champion.flow_run_id).data
    assert markdown.count("#### User `") == 3 and markdown.count("Rated highest: ") == 3
    # Titles of the catalogue (not only ids) appear, each list has 10 ranked rows.
    items = pd.read_parquet(next((store.home / "ingested").rglob("items.parquet")))
    assert sum(title in markdown for title in items["title"].dropna()) >= 10
    assert markdown.count("| 1 | `") == 3  # every sampled user has a list (as long as their unrated items allow)
    assert "### Validation ndcg@10, last 1 training runs" in markdown
    run_id = champion.result.run.run_id
    use_tracking_uri(store.storage.resolved_tracking_uri())
    plots = {a.path: a.file_size for a in store.client.list_artifacts(run_id, "plots")}
    assert plots["plots/learning_curve.png"] > 1000 and plots["plots/gate_history.png"] > 1000
    assert mlflow.artifacts.load_text(f"runs:/{run_id}/reports/top_lists.md") == markdown


# ------------------------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------------------------


def test_gate_parameters_are_validated_and_flow_defaults_differ() -> None:
    from pydantic import ValidationError

    from flows.params import NIGHTLY_DEFAULTS, RETRAIN_DEFAULTS, NightlyParams
    from tasks.guards import config_hash

    for bad in ("ndcg@0", "recall@10", "ndcg", "rmse; drop"):
        with pytest.raises(ValidationError, match="should match pattern"):
            TrainingParams(gate_metric=bad)
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        TrainingParams(gate_cold_tolerance=1.5)
    # Unset: the nightly flow judges NDCG@10, retrain RMSE; an explicit choice wins in both.
    assert NightlyParams().training_params().gate_policy().metric == NIGHTLY_DEFAULTS.gate_metric == "ndcg@10"
    assert TrainingParams().with_defaults(RETRAIN_DEFAULTS).gate_policy().metric == "rmse"
    assert TrainingParams().gate_policy() == GatePolicy("rmse", 0.02, 0.05, 10)
    chosen = TrainingParams(gate_metric="ndcg@5", gate_other_tolerance=0.1, eval_n=20)
    assert NightlyParams(training=chosen).training_params().gate_policy() == GatePolicy("ndcg@5", 0.1, 0.05, 20)
    # The gate's settings do not change the model: a rerun with another gate is still an identical rerun.
    assert config_hash(chosen) == config_hash(TrainingParams(eval_n=20))
