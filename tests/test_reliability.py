"""Crashes, reruns and bad input through the real training and nightly flows (issue 6).

Real components throughout: the session's Prefect test server, a private MLflow SQLite store and registry per test
(a copy of one migrated store), real CSV and Parquet files, real torch training of a tiny ConvMF, and a real
SIGKILL of a real training process.

* a training flow killed with SIGKILL mid-training and started again resumes from its checkpoint (keyed on data,
  tokenization, model configuration and split, not on the run) and ends with the model an uninterrupted run gives;
* a second nightly run on the same data, configuration and run date registers nothing and duplicates no rows;
* the sanity gate stops a run whose ratings shrank by 80 % or whose quarantined share is too high, before
  training and with the champion unchanged; ``override_gate=True`` lets a deliberate change through.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from convmf_core.models.als_mf import load_checkpoint
from convmf_core.models.base import ModelFitError
from convmf_core.persistence import load_model
from convmf_core.synthetic import SyntheticConfig, generate_catalogue, write_catalogue
from flows.nightly import nightly_flow
from flows.params import DataParams, ModelParams, NightlyParams, ScoringParams, StorageParams, TrainingParams
from flows.training import training_flow
from tasks.guards import DataGateError, config_hash, evaluate_gate
from tasks.train import SplitSpec, checkpoint_key
from tests.pipeline_support import client_for, new_storage, sigkill_child_when

pytestmark = pytest.mark.filterwarnings("ignore:Operation with range is deprecated")

RUN_DATE = dt.date(2026, 1, 2)
DATA = DataParams(builtin_users=80, builtin_items=60)
TINY = ModelParams(n_factors=4, embedding_dim=16, n_filters=8, hidden_dim=16, max_iterations=3,
                   cnn_epochs_per_iteration=1, device="cpu", posterior_samples=10, burn_in=5)
# Slow enough per iteration (many small CNN batches, ~0.5 s) that a poll sees the checkpoint between iterations,
# with no early stop before max_iterations.
SLOW = TINY.model_copy(update={"max_iterations": 6, "patience": 50, "cnn_epochs_per_iteration": 20,
                               "batch_size": 4})

# One torch thread as in conftest (the numbers must match an uninterrupted run in this process).
CHILD = """
import sys, torch
torch.set_num_threads(1)
from flows.params import TrainingParams
from flows.training import training_flow
training_flow(TrainingParams.model_validate_json(sys.argv[1]))
"""


def runs_of(storage: StorageParams) -> list:
    client = client_for(storage)
    experiment = client.get_experiment_by_name(storage.experiment)
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def checkpoint_iteration(directory: Path) -> int:
    """The iteration in the (single) checkpoint under ``directory``; 0 when there is none yet."""
    for path in directory.glob("*.pt"):
        try:
            return int(load_checkpoint(path)["iteration"])
        except (ModelFitError, FileNotFoundError):
            return 0
    return 0


# ------------------------------------------------------------------------------------------------------------------
# Crashes: SIGKILL mid-training, then resume
# ------------------------------------------------------------------------------------------------------------------


def test_checkpoint_key_depends_on_what_determines_the_model() -> None:
    config, split = ModelParams(device="cpu").config(), SplitSpec()
    key = checkpoint_key("data", "tok", config, split, "cpu")
    assert key == checkpoint_key("data", "tok", config, split, "cpu")  # stable across runs: a rerun finds it
    changed = [checkpoint_key("other", "tok", config, split, "cpu"),
               checkpoint_key("data", "tok2", config, split, "cpu"),
               checkpoint_key("data", "tok", replace(config, seed=1), split, "cpu"),
               checkpoint_key("data", "tok", config, replace(split, seed=1), "cpu"),
               checkpoint_key("data", "tok", config, split, "cuda")]
    assert len({key, *changed}) == 6


def test_training_killed_mid_run_resumes_to_the_same_model(prefect_harness: None, mlflow_template: Path,
                                                           tmp_path: Path) -> None:
    storage = new_storage(mlflow_template, tmp_path / "killed")
    params = TrainingParams(model_name="resume-test", data=DATA, model=SLOW, storage=storage)
    checkpoints = tmp_path / "killed" / "checkpoints"
    sigkill_child_when(CHILD, params.model_dump_json(), tmp_path / "child.log",
                       lambda: checkpoint_iteration(checkpoints) >= 2, "checkpoint of iteration 2")
    killed_at = checkpoint_iteration(checkpoints)
    assert 2 <= killed_at < SLOW.max_iterations  # killed mid-training: iterations were left to do
    assert client_for(storage).search_registered_models() == []  # nothing half-registered

    resumed = training_flow(params)  # started again: a new flow run and MLflow run, the same checkpoint key
    client = client_for(storage)
    run = client.get_run(resumed.run.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_iteration"] == str(killed_at)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "validation_rmse")) == \
        list(range(1, SLOW.max_iterations + 1))  # the curve is whole: restored iterations logged too
    assert list(checkpoints.iterdir()) == []  # checkpoint and owner file deleted once the bundle was saved
    killed = client.get_run(run.data.tags["resumed_from_run"])  # the killed run is not left RUNNING
    assert killed.info.status == "FAILED" and killed.data.tags["resumed_by_run"] == run.info.run_id

    reference_storage = new_storage(mlflow_template, tmp_path / "uninterrupted")
    reference = training_flow(params.model_copy(update={"storage": reference_storage}))
    assert "resumed_from_iteration" not in client_for(reference_storage).get_run(reference.run.run_id).data.tags
    assert resumed.trained.iterations == reference.trained.iterations == SLOW.max_iterations
    assert resumed.trained.best_iteration == reference.trained.best_iteration

    a, b = load_model(resumed.trained.bundle_dir).model, load_model(reference.trained.bundle_dir).model
    for name in ("user_factors_", "item_factors_", "user_bias_", "item_bias_"):
        np.testing.assert_allclose(getattr(a, name).numpy(), getattr(b, name).numpy(), rtol=0, atol=1e-5,
                                   err_msg=name)
    users, items = np.meshgrid(np.arange(a.n_users), np.arange(a.n_items), indexing="ij")
    pa, pb = a.predict(users.ravel(), items.ravel()), b.predict(users.ravel(), items.ravel())
    np.testing.assert_allclose(pa, pb, rtol=0, atol=1e-5)
    print(f"resume vs uninterrupted: killed after iteration {killed_at}; max |factor diff| "
          f"{max(float((getattr(a, n) - getattr(b, n)).abs().max()) for n in ('user_factors_', 'item_factors_')):.2e}"
          f", max |prediction diff| {float(np.abs(pa - pb).max()):.2e}")


# ------------------------------------------------------------------------------------------------------------------
# Reruns: the same nightly run twice
# ------------------------------------------------------------------------------------------------------------------


def test_identical_nightly_rerun_registers_nothing_and_duplicates_no_rows(prefect_harness: None,
                                                                         mlflow_template: Path,
                                                                         tmp_path: Path) -> None:
    storage = new_storage(mlflow_template, tmp_path)
    params = NightlyParams(training=TrainingParams(model_name="rerun-test", data=DATA, model=TINY, storage=storage),
                           scoring=ScoringParams(n=5, users_per_shard=30, block_size=16, run_date=RUN_DATE))
    first = nightly_flow(params)
    second = nightly_flow(params)

    assert first.training.skipped is None and first.training.version.version == "1"
    assert second.training.skipped == "identical data and configuration as version 1: skipped"
    assert second.training.trained is None and second.training.decision is None
    assert second.training.version.version == "1"
    client = client_for(storage)
    versions = client.search_model_versions("name = 'rerun-test'")
    assert [str(v.version) for v in versions] == ["1"]
    assert versions[0].tags["config_hash"] == config_hash(params.training_params())  # with the nightly defaults
    assert str(client.get_model_version_by_alias("rerun-test", "champion").version) == "1"
    run = client.get_run(second.training.run.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["skipped_identical_version"] == "1"
    assert "train_loss" not in run.data.metrics  # nothing trained

    assert second.scores == first.scores  # the same partition, replaced atomically
    manifest = json.loads((second.scores / "_manifest.json").read_text())
    scores = pd.concat([pd.read_parquet(second.scores / p) for p in manifest["parts"]], ignore_index=True)
    assert sorted(p.name for p in second.scores.iterdir()) == sorted(manifest["parts"] + ["_manifest.json"])
    assert manifest["rows"] == len(scores) and manifest["model_version"] == "1"
    assert not scores.duplicated(["user_id", "rank"]).any()
    assert scores["user_id"].nunique() == DATA.builtin_users
    # A changed configuration is a different model: it trains (not skipped).
    changed = training_flow(params.training.model_copy(update={"model": TINY.model_copy(update={"seed": 1})}))
    assert changed.skipped is None and changed.version.version == "2"


# ------------------------------------------------------------------------------------------------------------------
# Bad input: the sanity gate
# ------------------------------------------------------------------------------------------------------------------


def write_files(directory: Path, keep_share: float = 1.0, bad_rows: int = 0) -> tuple[Path, Path]:
    """A synthetic catalogue as CSV: the first ``keep_share`` of its ratings, then ``bad_rows`` out-of-scale rows."""
    data = generate_catalogue(SyntheticConfig(n_users=80, n_items=60, seed=3))
    paths = write_catalogue(data, directory)
    lines = paths["ratings"].read_text().splitlines()
    kept = lines[:1] + lines[1:1 + int(round((len(lines) - 1) * keep_share))]
    first = data.ratings.iloc[0]
    kept += [f"{first.user_id},{first.item_id},9,{int(first.timestamp) + k}" for k in range(bad_rows)]
    paths["ratings"].write_text("\n".join(kept) + "\n")
    return paths["ratings"], paths["items"]


def files(ratings: Path, items: Path) -> DataParams:
    return DataParams(source="files", ratings_path=str(ratings), items_path=str(items))


def test_gate_stops_a_shrunken_catalogue_and_override_lets_it_through(prefect_harness: None, mlflow_template: Path,
                                                                      tmp_path: Path) -> None:
    storage = new_storage(mlflow_template, tmp_path / "home")
    full = write_files(tmp_path / "home" / "input" / "full")  # input under the home: an allowed data root
    shrunk = write_files(tmp_path / "home" / "input" / "shrunk", keep_share=0.2)  # 80 % of the ratings gone overnight
    base = TrainingParams(model_name="gate-test", model=TINY, storage=storage)
    first = training_flow(base.model_copy(update={"data": files(*full)}))
    assert first.version.version == "1" and first.decision.promoted

    with pytest.raises(DataGateError, match=r"accepted ratings fell by 80% .* more than the allowed 50%"):
        training_flow(base.model_copy(update={"data": files(*shrunk)}))
    client = client_for(storage)
    failed = runs_of(storage)[-1]
    assert failed.info.status == "FAILED" and "fell by 80%" in failed.data.tags["gate_reason"]
    assert failed.data.tags["data_hash"] != client.get_run(first.run.run_id).data.tags["data_hash"]
    assert "train_loss" not in failed.data.metrics  # stopped before training
    assert [str(v.version) for v in client.search_model_versions("name = 'gate-test'")] == ["1"]
    assert str(client.get_model_version_by_alias("gate-test", "champion").version) == "1"

    # A deliberate catalogue change: the same files with the override train and register.
    overridden = training_flow(base.model_copy(update={"data": files(*shrunk), "override_gate": True}))
    assert overridden.version.version == "2"
    run = client.get_run(overridden.run.run_id)
    assert run.info.status == "FINISHED" and "fell by 80%" in run.data.tags["gate_overridden"]
    assert "gate_reason" not in run.data.tags


def test_gate_stops_a_run_with_too_many_quarantined_rows(prefect_harness: None, mlflow_template: Path,
                                                         tmp_path: Path) -> None:
    storage = new_storage(mlflow_template, tmp_path / "home")
    n_ratings = len(pd.read_csv(write_files(tmp_path / "probe")[0]))
    ratings, items = write_files(tmp_path / "home" / "input", bad_rows=n_ratings // 2)  # a third of the rows are bad
    with pytest.raises(DataGateError, match=r"33% of the ratings rows were quarantined .* allowed 20%"):
        training_flow(TrainingParams(model_name="quarantine-test", model=TINY, storage=storage,
                                     data=files(ratings, items)))
    [run] = runs_of(storage)
    assert run.info.status == "FAILED" and "quarantined" in run.data.tags["gate_reason"]
    assert client_for(storage).search_registered_models() == []


def test_gate_thresholds() -> None:
    def counts(accepted: int, quarantined: int = 0, items_quarantined: int = 0) -> dict:
        return {"ratings": {"rows_read": accepted + quarantined, "rows_accepted": accepted,
                            "rows_quarantined": quarantined, "file": "r.csv"},
                "items": {"rows_read": 100, "rows_accepted": 100 - items_quarantined,
                          "rows_quarantined": items_quarantined, "file": "i.csv"}}

    assert evaluate_gate(counts(1000), None, 0.5, 0.2, False).passed  # no previous run: nothing to compare
    assert evaluate_gate(counts(500), 1000, 0.5, 0.2, False).passed  # exactly the allowed drop
    assert not evaluate_gate(counts(499), 1000, 0.5, 0.2, False).passed
    assert evaluate_gate(counts(2000), 1000, 0.5, 0.2, False).passed  # growth is fine
    assert evaluate_gate(counts(800, 200), None, 0.5, 0.2, False).passed  # 20 % is allowed, more is not
    assert not evaluate_gate(counts(790, 210), None, 0.5, 0.2, False).passed
    bad_items = evaluate_gate(counts(1000, 0, 30), None, 0.5, 0.2, False)
    assert not bad_items.passed and "items rows were quarantined" in bad_items.failures[0]
    overridden = evaluate_gate(counts(100), 1000, 0.5, 0.2, True)
    assert overridden.passed and overridden.failures
