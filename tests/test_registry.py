"""Tests of tasks.registry against a real MLflow SQLite tracking store and model registry (nothing mocked).

A migrated SQLite store takes seconds to create, so one is made per session and copied for each test; the tiny
ConvMF is trained once per module.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PyFuncModel

from convmf_core.data import IdMap, Ratings
from convmf_core.models.convmf import ConvMF
from convmf_core.persistence import save_model
from tasks import registry
from tasks.pyfunc import ConvMFPyfunc
from tasks.registry import (
    CHALLENGER_ALIAS,
    CHAMPION_ALIAS,
    get_alias_version,
    load_champion,
    log_model_version,
    promote,
    rollback_champion,
)
from tests.pipeline_support import new_storage, tiny_convmf

MODEL_NAME = "convmf-test"
METRIC = "validation_rmse"

# MLflow 3.17's input handling compares DataFrame columns with a range, which pandas 3.1 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Operation with range is deprecated")


@dataclass(frozen=True)
class Trained:
    model: ConvMF
    bundle_dir: Path
    user_map: IdMap
    item_map: IdMap
    train: Ratings
    seen: pd.DataFrame


@contextlib.contextmanager
def _tracking_store(template: Path, directory: Path) -> Iterator[str]:
    """A private copy of the store as tracking and registry URI; yields an experiment id with artifacts in tmp."""
    uri = new_storage(template, directory).resolved_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_REGISTRY_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield mlflow.create_experiment("registry-test", artifact_location=(directory / "artifacts").as_uri())
        finally:
            while mlflow.active_run() is not None:
                mlflow.end_run()
            mlflow.set_registry_uri(None)
            mlflow.set_tracking_uri(None)


@pytest.fixture()
def tracking(mlflow_template: Path, tmp_path: Path) -> Iterator[str]:
    """A fresh tracking store and registry for one test; yields the experiment id to log to."""
    with _tracking_store(mlflow_template, tmp_path) as experiment_id:
        yield experiment_id


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A tiny real ConvMF on a synthetic catalogue, saved as a bundle with vocabulary and id maps."""
    tiny = tiny_convmf(tmp_path_factory.mktemp("bundle"))
    return Trained(tiny.model, tiny.bundle_dir, tiny.user_map, tiny.item_map, tiny.split.train, tiny.seen)


def _log(trained: Trained, experiment_id: str, rmse: float) -> registry.ModelVersionInfo:
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_metric(METRIC, rmse)
        return log_model_version(trained.bundle_dir, model_name=MODEL_NAME, run_id=run.info.run_id,
                                 tags={METRIC: repr(rmse)}, seen=trained.seen)


@pytest.fixture(scope="module")
def served(mlflow_template: Path, trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> PyFuncModel:
    """The model logged, registered, promoted and loaded back as ``models:/<name>@champion`` (once per module)."""
    with _tracking_store(mlflow_template, tmp_path_factory.mktemp("served")) as experiment_id:
        info = _log(trained, experiment_id, 1.0)
        assert promote(MODEL_NAME, info.version, METRIC, 1.0).promoted
        return load_champion(MODEL_NAME)


# --- logging and serving ---------------------------------------------------------------------------------------------


def test_log_registers_a_code_model_without_pickles(tracking: str, trained: Trained) -> None:
    info = _log(trained, tracking, 1.0)
    assert (info.name, info.version, info.model_uri) == (MODEL_NAME, "1", f"models:/{MODEL_NAME}/1")
    version = MlflowClient().get_model_version(MODEL_NAME, "1")
    assert version.tags[METRIC] == "1.0" and version.tags["convmf.model_class"] == "ConvMF"
    assert version.run_id == info.run_id
    local = Path(mlflow.artifacts.download_artifacts(info.logged_model_uri))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert "mlflow_model.py" in files and "artifacts/seen.parquet" in files
    assert "artifacts/bundle/manifest.json" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle"))]
    requirements = (local / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in requirements} == {"mlflow", "torch", "numpy", "pandas", "pyarrow"}
    assert all("==" in r and "+" not in r for r in requirements)
    assert get_alias_version(MODEL_NAME, CHAMPION_ALIAS) is None
    assert get_alias_version("no-such-model", CHAMPION_ALIAS) is None


def test_champion_predicts_like_the_in_process_model(served: PyFuncModel, trained: Trained) -> None:
    raw_users = trained.user_map.raw_ids[[0, 5, 17]]

    top = served.predict(pd.DataFrame({"user_id": raw_users, "n": [5, 5, 5]}))
    expected = trained.model.recommend(trained.user_map.to_index(raw_users), 5, exclude=trained.train)
    expected = expected.to_frame(trained.user_map, trained.item_map)
    assert list(top.columns) == ["user_id", "rank", "item_id", "score"]
    assert top["user_id"].dtype == np.int64 and top["item_id"].dtype == np.int64
    assert top["user_id"].tolist() == expected["user_id"].tolist()
    assert top["rank"].tolist() == expected["rank"].tolist()
    assert top["item_id"].tolist() == expected["item_id"].tolist()
    np.testing.assert_allclose(top["score"].to_numpy(), expected["score"].to_numpy(), rtol=1e-6)
    seen_pairs = set(zip(trained.seen["user_id"], trained.seen["item_id"]))
    assert not seen_pairs & set(zip(top["user_id"], top["item_id"]))

    default_n = served.predict(pd.DataFrame({"user_id": raw_users[:1]}))
    assert default_n["rank"].tolist() == list(range(1, 11))

    pairs = trained.seen.iloc[:20]
    ratings = served.predict(pairs.copy())
    want = trained.model.predict(trained.user_map.to_index(pairs["user_id"]), trained.item_map.to_index(pairs["item_id"]))
    assert list(ratings.columns) == ["user_id", "item_id", "prediction"]
    np.testing.assert_allclose(ratings["prediction"].to_numpy(), want, rtol=1e-6)

    as_strings = served.predict(pd.DataFrame({"user_id": [str(u) for u in pairs["user_id"]],
                                              "item_id": [str(i) for i in pairs["item_id"]]}))
    np.testing.assert_allclose(as_strings["prediction"].to_numpy(), want, rtol=1e-6)
    assert as_strings["user_id"].tolist() == pairs["user_id"].tolist()  # canonical (int) ids come back


def test_unknown_ids_fall_back_to_the_average_user_or_are_refused(served: PyFuncModel, trained: Trained) -> None:
    top = served.predict(pd.DataFrame({"user_id": [10_001], "n": [3]}))
    assert top["user_id"].tolist() == [10_001] * 3 and top["rank"].tolist() == [1, 2, 3]
    factors = trained.model.scoring_factors()
    average = (factors.user.mean(0) @ factors.item.T + factors.offset).numpy()
    assert top["item_id"].tolist() == trained.item_map.to_raw(np.argsort(-average)[:3]).tolist()
    rated = served.predict(pd.DataFrame({"user_id": [10_001], "item_id": [trained.item_map.raw_ids[0]]}))
    assert math.isfinite(float(rated["prediction"].iloc[0]))
    with pytest.raises(MlflowException, match="unknown user_id"):
        served.predict(pd.DataFrame({"user_id": [10_001]}), params={"unknown_ids": "error"})
    with pytest.raises(MlflowException, match="unknown_ids must be one of"):
        served.predict(pd.DataFrame({"user_id": [10_001]}), params={"unknown_ids": "guess"})


@pytest.mark.parametrize("request_frame, message", [
    (pd.DataFrame({"item_id": [1]}), "user_id"),
    (pd.DataFrame({"user_id": ["not-a-number"]}), "integer ids"),
    (pd.DataFrame({"user_id": [1.5]}), "integer ids"),
    (pd.DataFrame({"user_id": [1], "n": [0]}), "n must be"),
    (pd.DataFrame({"user_id": [1], "n": [1001]}), "n must be"),
    (pd.DataFrame({"user_id": [1], "n": [2.5]}), "n"),
    (pd.DataFrame({"user_id": [None]}), "missing"),
    (pd.DataFrame({"user_id": [True]}), "booleans"),
])
def test_malformed_input_raises(served: PyFuncModel, request_frame: pd.DataFrame, message: str) -> None:
    with pytest.raises(MlflowException, match=message) as excinfo:
        served.predict(request_frame)
    assert excinfo.value.get_http_status_code() == 400


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient` is deprecated")
def test_scoring_server_answers_400_to_malformed_requests(served: PyFuncModel, trained: Trained) -> None:
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    client = TestClient(scoring_server.init(served))
    user = int(trained.user_map.raw_ids[0])
    ok = client.post("/invocations", json={"dataframe_split": {"columns": ["user_id", "n"], "data": [[user, 2]]}})
    assert ok.status_code == 200, ok.text
    assert [row["rank"] for row in ok.json()["predictions"]] == [1, 2]
    bad = client.post("/invocations", json={"dataframe_split": {"columns": ["n"], "data": [[2]]}})
    assert bad.status_code == 400
    bad = client.post("/invocations", json={"dataframe_split": {"columns": ["user_id"], "data": [["x"]]}})
    assert bad.status_code == 400


# --- promotion -------------------------------------------------------------------------------------------------------


def test_promotion_lifecycle_and_rollback(tracking: str, trained: Trained) -> None:
    client = MlflowClient()
    with pytest.raises(ValueError, match="no 'champion'"):
        rollback_champion(MODEL_NAME)
    first = _log(trained, tracking, 1.0)
    # Further versions of the same logged model (registering is enough to test the alias logic).
    v2, v3, v4 = (str(client.create_model_version(MODEL_NAME, first.logged_model_uri, run_id=first.run_id).version)
                  for _ in range(3))

    d1 = promote(MODEL_NAME, first.version, METRIC, 1.0)
    assert d1.promoted and d1.previous_version is None and d1.champion_version == "1"
    assert "| candidate | 1 | 1.0000 |" in d1.markdown
    with pytest.raises(ValueError, match="no previous champion"):
        rollback_champion(MODEL_NAME)

    worse = promote(MODEL_NAME, v2, METRIC, 1.2)
    assert not worse.promoted and worse.champion_version == "1" and worse.champion_value == 1.0
    assert str(get_alias_version(MODEL_NAME, CHAMPION_ALIAS).version) == "1"
    assert str(get_alias_version(MODEL_NAME, CHALLENGER_ALIAS).version) == v2
    tags = client.get_model_version(MODEL_NAME, v2).tags
    assert tags["promotion.decision"] == "challenger" and tags["promotion.previous_champion"] == "1"
    assert "does not beat" in tags["promotion.reason"] and tags["promotion.time"] and tags[METRIC] == "1.2"

    for bad in (float("nan"), float("inf")):
        refused = promote(MODEL_NAME, v3, METRIC, bad)
        assert not refused.promoted and "not a finite number" in refused.reason
    assert str(get_alias_version(MODEL_NAME, CHAMPION_ALIAS).version) == "1"

    better = promote(MODEL_NAME, v4, METRIC, 0.9)
    assert better.promoted and better.previous_version == "1" and better.champion_version == v4
    assert "| champion before | 1 | 1.0000 |" in better.markdown
    assert str(get_alias_version(MODEL_NAME, CHAMPION_ALIAS).version) == v4
    assert client.get_model_version(MODEL_NAME, v4).tags["promotion.previous_champion"] == "1"

    assert rollback_champion(MODEL_NAME) == "1"
    assert str(get_alias_version(MODEL_NAME, CHAMPION_ALIAS).version) == "1"
    assert client.get_model_version(MODEL_NAME, v4).tags["promotion.decision"] == "rolled_back"


def test_promotion_reads_the_champion_metric_from_its_run_and_honours_direction(tracking: str,
                                                                                trained: Trained) -> None:
    client = MlflowClient()
    with mlflow.start_run(experiment_id=tracking) as run:
        mlflow.log_metric(METRIC, 0.5)
    # A finished run is resumed for logging; no metric tag is given, so only the run's metric records it.
    first = log_model_version(trained.bundle_dir, model_name=MODEL_NAME, run_id=run.info.run_id, tags={})
    assert first.run_id == run.info.run_id and mlflow.active_run() is None
    client.set_registered_model_alias(MODEL_NAME, CHAMPION_ALIAS, first.version)
    second = str(client.create_model_version(MODEL_NAME, first.logged_model_uri, run_id=first.run_id).version)
    decision = promote(MODEL_NAME, second, METRIC, 0.7, higher_is_better=True)
    assert decision.promoted and decision.champion_value == 0.5 and "higher is better" in decision.reason
    assert promote(MODEL_NAME, second, METRIC, 0.7).reason == f"version {second} is already the champion"


def test_logging_again_from_the_same_run_registers_no_second_version(tracking: str, trained: Trained) -> None:
    # What a retry does after a registration whose answer was lost: the version of this run is found, not duplicated.
    with mlflow.start_run(experiment_id=tracking) as run:
        pass
    first = log_model_version(trained.bundle_dir, model_name=MODEL_NAME, run_id=run.info.run_id, tags={"a": "1"})
    again = log_model_version(trained.bundle_dir, model_name=MODEL_NAME, run_id=run.info.run_id, tags={"b": "2"})
    assert again.version == first.version and again.model_uri == first.model_uri
    client = MlflowClient()
    assert len(client.search_model_versions(f"name = '{MODEL_NAME}' and run_id = '{run.info.run_id}'")) == 1
    assert {"a", "b", "convmf.model_class"} <= set(client.get_model_version(MODEL_NAME, first.version).tags)


# --- the pyfunc on its own (string id maps) --------------------------------------------------------------------------


def test_pyfunc_with_string_ids_accepts_ints_and_dedupes_users(trained: Trained, tmp_path: Path) -> None:
    user_map = IdMap(np.asarray([f"{u}" for u in trained.user_map.raw_ids]))
    item_map = IdMap(np.asarray([f"item-{i}" for i in trained.item_map.raw_ids]))
    bundle = save_model(trained.model, tmp_path / "bundle", user_map=user_map, item_map=item_map)
    model = ConvMFPyfunc()
    model.load_context(mlflow.pyfunc.PythonModelContext(artifacts={"bundle": str(bundle)}, model_config={}))
    first = str(trained.user_map.raw_ids[0])
    top = model.predict(None, pd.DataFrame({"user_id": [int(first), first], "n": [2, 4]}))
    assert top["user_id"].tolist() == [first] * 4  # one list per user, the larger n
    assert all(i.startswith("item-") for i in top["item_id"])
    expected = trained.model.recommend(np.array([0]), 4).to_frame(user_map, item_map)  # no seen pairs: no exclusion
    assert top["item_id"].tolist() == expected["item_id"].tolist()
    with pytest.raises(MlflowException, match="non-integral"):
        model.predict(None, pd.DataFrame({"user_id": [first], "item_id": [1.5]}))
    with pytest.raises(MlflowException, match="string or integer ids"):
        model.predict(None, pd.DataFrame({"user_id": [first], "item_id": [(1, 2)]}))
    empty = model.predict(None, pd.DataFrame({"user_id": pd.Series([], dtype=object)}))
    assert list(empty.columns) == ["user_id", "rank", "item_id", "score"] and empty.empty
