"""Promotion safety and untrusted-parameter tests, with real components: a temporary Prefect server, a real MLflow
SQLite store and registry, real training of a tiny ConvMF, real registrations (nothing mocked).

* The champion is re-evaluated on the challenger's validation split; the recorded figure equals an independent
  computation (including users/items the champion never saw, predicted with its fallback).
* A model no better than the global-mean predictor, or with NaN factors, never becomes champion.
* A race: the champion alias moves between the comparison and the promotion; the promotion compares again.
* `convmf rollback`, then the next scoring run uses the rolled-back-to version.
* Path parameters are confined to the configured roots; a pickle planted in a registered bundle is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from prefect.exceptions import ParameterTypeError
from pydantic import ValidationError

from convmf_core.persistence import load_model, save_model
from convmf_core.synthetic import SyntheticConfig, generate_catalogue, write_catalogue
from flows.cli import main
from flows.params import DataParams, ModelParams, ScoringParams, StorageParams, TrainingParams
from flows.scoring import scoring_flow
from flows.training import TrainingResult, training_flow
from tasks.register import champion_evaluator, model_problems, use_tracking_uri, validation_set
from tasks.registry import CHAMPION_ALIAS, get_alias_version, log_model_version, promote
from tests.pipeline_support import Store, client_for, make_store, new_storage

pytestmark = pytest.mark.filterwarnings("ignore:Operation with range is deprecated")

MODEL = "convmf-promo"
DATA = DataParams(builtin_users=80, builtin_items=60)
# Tomorrow's data: more users (some unknown to yesterday's champion), a new split.
NEW_DATA = DataParams(builtin_users=90, builtin_items=60, builtin_seed=1)
TINY = ModelParams(n_factors=4, embedding_dim=16, n_filters=8, hidden_dim=16, max_iterations=4,
                   cnn_epochs_per_iteration=1, device="cpu", posterior_samples=10, burn_in=5)
WEAK = TINY.model_copy(update={"max_iterations": 1})


@contextlib.contextmanager
def in_store(storage: StorageParams) -> Iterator[None]:
    """MLflow's fluent API on ``storage``, inside a run of its experiment (models logged here stay under home)."""
    use_tracking_uri(storage.resolved_tracking_uri())
    experiment = mlflow.get_experiment_by_name(storage.experiment)
    with mlflow.start_run(experiment_id=experiment.experiment_id):
        yield


@pytest.fixture(scope="module")
def store(mlflow_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Store:
    home = tmp_path_factory.mktemp("promotion")
    return make_store(mlflow_template, home)


@pytest.fixture(scope="module")
def first(prefect_harness: None, store: Store) -> TrainingResult:
    """Yesterday's champion: version 1, a weak model on the 80-user catalogue."""
    return training_flow(TrainingParams(model_name=MODEL, data=DATA, model=WEAK, storage=store.storage))


@pytest.fixture(scope="module")
def second(first: TrainingResult, store: Store) -> TrainingResult:
    """Today's run: version 2 on new data (new users, new split), compared with version 1 on today's split."""
    return training_flow(TrainingParams(model_name=MODEL, data=NEW_DATA, model=TINY, storage=store.storage))


def independent_rmse(champion_bundle: Path, challenger: TrainingResult) -> float:
    """The champion's RMSE on the challenger's validation ratings, computed here from the two bundles: known pairs
    with the champion's own predict(); unknown ids with the average user/item row (its fallback)."""
    champ = load_model(champion_bundle)
    mine = load_model(challenger.trained.bundle_dir)
    valid = pd.read_parquet(challenger.trained.split_dir / "validation.parquet")
    users = champ.user_map.to_index(mine.user_map.to_raw(valid["user"].to_numpy()), unknown="minus_one")
    items = champ.item_map.to_index(mine.item_map.to_raw(valid["item"].to_numpy()), unknown="minus_one")
    assert (users < 0).any(), "the new data should hold users the champion never saw"
    f = champ.model.scoring_factors()
    user_rows = torch.cat([f.user, f.user.mean(0, keepdim=True)]).double()
    item_rows = torch.cat([f.item, f.item.mean(0, keepdim=True)]).double()
    u = torch.as_tensor(np.where(users < 0, len(f.user), users))
    i = torch.as_tensor(np.where(items < 0, len(f.item), items))
    pred = (user_rows[u] * item_rows[i]).sum(1) + f.offset
    if f.clip is not None:
        pred = pred.clamp(*f.clip)
    known = (users >= 0) & (items >= 0)
    np.testing.assert_allclose(pred.numpy()[known], champ.model.predict(users[known], items[known]), rtol=1e-5,
                               atol=1e-5)
    return float(np.sqrt(np.mean((pred.numpy() - valid["rating"].to_numpy(np.float64)) ** 2)))


# ------------------------------------------------------------------------------------------------------------------
# Like with like
# ------------------------------------------------------------------------------------------------------------------


def test_champion_is_reevaluated_on_the_challengers_split(first: TrainingResult, second: TrainingResult,
                                                          store: Store) -> None:
    assert first.decision.promoted and first.decision.reason == "no champion yet"
    d = second.decision
    assert d.previous_version == "1" and d.champion_value_source == "this run's validation split"
    expected = independent_rmse(first.trained.bundle_dir, second)
    assert d.champion_value == pytest.approx(expected, rel=1e-5)
    # Yesterday's recorded figure was measured on other data: it is kept, but not what was compared.
    assert d.champion_recorded_value == pytest.approx(first.trained.best_validation_rmse)
    assert d.champion_value != pytest.approx(d.champion_recorded_value, rel=1e-4)

    tags = store.client.get_model_version(MODEL, "2").tags
    assert float(tags["promotion.champion_value"]) == pytest.approx(expected, rel=1e-5)
    assert float(tags["promotion.champion_recorded_value"]) == pytest.approx(first.trained.best_validation_rmse)
    assert float(tags["promotion.candidate_value"]) == pytest.approx(second.trained.best_validation_rmse)
    assert tags["promotion.run_id"] == second.run.run_id and tags["promotion.previous_champion"] == "1"
    assert tags["promotion.time"] and tags["promotion.reason"] == d.reason and tags["promotion.attempts"] == "1"
    assert f"| champion before | 1 | {expected:.4f} | this run's validation split |" in d.markdown
    assert f"| candidate | 2 | {second.trained.best_validation_rmse:.4f} |" in d.markdown

    # The global-mean baseline on the same split, recomputed here.
    train = pd.read_parquet(second.trained.split_dir / "train.parquet")["rating"].to_numpy(np.float64)
    valid = pd.read_parquet(second.trained.split_dir / "validation.parquet")["rating"].to_numpy(np.float64)
    baseline = float(np.sqrt(np.mean((valid - train.mean()) ** 2)))
    assert d.baseline_value == pytest.approx(baseline) and float(tags["promotion.global_mean_value"]) == pytest.approx(
        baseline)
    assert f"| global-mean predictor | - | {baseline:.4f} |" in d.markdown
    metrics = store.client.get_run(second.run.run_id).data.metrics
    assert metrics["global_mean_validation_rmse"] == pytest.approx(baseline)
    assert metrics["champion_validation_rmse_on_this_split"] == pytest.approx(expected, rel=1e-5)
    # Tomorrow's model is better than yesterday's on tomorrow's data, and than the global mean.
    assert d.promoted and d.candidate_value < min(expected, baseline)
    assert store.client.get_model_version(MODEL, "1").tags["promotion.replaced_by"] == "2"


# ------------------------------------------------------------------------------------------------------------------
# Never champion: no better than the global mean; NaN factors
# ------------------------------------------------------------------------------------------------------------------


def noise_catalogue(directory: Path) -> tuple[Path, Path]:
    """A real catalogue whose ratings are replaced by uniform noise: nothing to learn beyond the mean."""
    data = generate_catalogue(SyntheticConfig(n_users=80, n_items=60, seed=5))
    rng = np.random.default_rng(0)
    ratings = data.ratings.assign(rating=rng.integers(1, 6, size=len(data.ratings)).astype(np.float32))
    paths = write_catalogue(dataclasses.replace(data, ratings=ratings), directory)
    return paths["ratings"], paths["items"]


def test_model_no_better_than_the_global_mean_is_never_champion(prefect_harness: None, mlflow_template: Path,
                                                                tmp_path: Path) -> None:
    storage = new_storage(mlflow_template, tmp_path / "home")
    ratings, items = noise_catalogue(tmp_path / "home" / "input")
    overfit = TINY.model_copy(update={"n_factors": 16, "lambda_u": 0.001, "lambda_v": 0.001, "max_iterations": 2})
    result = training_flow(TrainingParams(
        model_name="noise", model=overfit, storage=storage,
        data=DataParams(source="files", ratings_path=str(ratings), items_path=str(items))))
    d = result.decision
    # On noise the fit falls back to the global mean (ALSConfig.fallback): level with it up to float32 rounding.
    assert d.baseline_value is not None and result.trained.best_validation_rmse >= d.baseline_value - 1e-6
    assert not d.promoted and "no better than the global-mean predictor's" in d.reason
    use_tracking_uri(storage.resolved_tracking_uri())
    assert get_alias_version("noise", CHAMPION_ALIAS) is None  # not even as the first version ever
    assert client_for(storage).get_model_version("noise", "1").tags["promotion.decision"] == "challenger"

    # A model with NaN factors (otherwise this very one, with an excellent figure) is refused too.
    bundle = load_model(result.trained.bundle_dir)
    bundle.model.user_factors_ = bundle.model.user_factors_.clone()
    bundle.model.user_factors_[0, 0] = float("nan")
    broken = save_model(bundle.model, tmp_path / "home" / "nan-bundle", vocabulary=bundle.vocabulary,
                        user_map=bundle.user_map, item_map=bundle.item_map)
    problems = model_problems(broken, validation_set(result.trained))
    assert problems == ["the model's user factors hold NaN or infinite values"]
    with in_store(storage):
        info = log_model_version(broken, model_name="noise", run_id=None, tags={})
    refused = promote("noise", info.version, "validation_rmse", 0.01, problems=problems)
    assert not refused.promoted and refused.reason == problems[0]
    assert get_alias_version("noise", CHAMPION_ALIAS) is None


# ------------------------------------------------------------------------------------------------------------------
# The race: the champion moves between the comparison and the promotion
# ------------------------------------------------------------------------------------------------------------------


def test_promotion_compares_again_when_the_champion_moved(first: TrainingResult, second: TrainingResult,
                                                          store: Store) -> None:
    name = "convmf-race"
    client = store.client
    validation = validation_set(second.trained)
    evaluate = champion_evaluator(name, validation, store.home / "race-downloads")
    with in_store(store.storage):
        a = log_model_version(first.trained.bundle_dir, model_name=name, run_id=None, tags={})  # the champion
    client.set_registered_model_alias(name, CHAMPION_ALIAS, a.version)
    candidate = str(client.create_model_version(name, a.logged_model_uri).version)
    rmse_a = evaluate(client.get_model_version(name, a.version))
    rmse_b = second.trained.best_validation_rmse
    assert rmse_b < rmse_a
    value = (rmse_a + rmse_b) / 2  # beats A, loses to B
    moved: list[str] = []

    def other_run_promotes(attempt: int) -> None:
        """Another training run registers a better model and makes it champion while this one decides."""
        if attempt == 1:
            with in_store(store.storage):
                b = log_model_version(second.trained.bundle_dir, model_name=name, run_id=None, tags={})
            client.set_registered_model_alias(name, CHAMPION_ALIAS, b.version)
            moved.append(b.version)

    d = promote(name, candidate, "validation_rmse", value, champion_metric=evaluate, baseline_value=1e9,
                before_alias_move=other_run_promotes)
    (b_version,) = moved
    assert not d.promoted and d.attempts == 2
    assert d.previous_version == b_version == d.champion_version
    assert d.champion_value == pytest.approx(rmse_b, rel=1e-5)
    assert f"moved from version {a.version} to {b_version}" in d.reason and "does not beat" in d.reason
    assert str(get_alias_version(name, CHAMPION_ALIAS).version) == b_version  # the winner stays champion
    tags = client.get_model_version(name, candidate).tags
    assert tags["promotion.attempts"] == "2" and tags["promotion.previous_champion"] == b_version


# ------------------------------------------------------------------------------------------------------------------
# Rollback, then scoring uses the rolled-back-to version
# ------------------------------------------------------------------------------------------------------------------


def test_rollback_then_scoring_uses_the_previous_champion(first: TrainingResult, second: TrainingResult,
                                                          store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    assert second.decision.promoted
    uri = store.storage.resolved_tracking_uri()
    assert main(["rollback", "--home", str(store.home), "--tracking-uri", uri, "--model-name", MODEL]) == 0
    assert "champion is now version 1" in capsys.readouterr().out
    assert str(store.client.get_model_version_by_alias(MODEL, CHAMPION_ALIAS).version) == "1"
    v1, v2 = (store.client.get_model_version(MODEL, v).tags for v in ("1", "2"))
    assert v2["promotion.decision"] == "rolled_back" and v1["promotion.restored_from"] == "2"
    assert v1["promotion.restored_time"]

    run_date = dt.date(2026, 2, 1)
    out = scoring_flow(ScoringParams(model_name=MODEL, n=3, users_per_shard=50, run_date=run_date,
                                     storage=store.storage))
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["model_version"] == "1"
    frame = pd.concat([pd.read_parquet(out / p) for p in manifest["parts"]])
    assert frame["user_id"].nunique() == 80  # version 1's users, not version 2's 90


# ------------------------------------------------------------------------------------------------------------------
# A pickle planted in a registered model's bundle
# ------------------------------------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_registered_bundle_with_a_pickle_is_refused_by_the_pyfunc(first: TrainingResult, store: Store,
                                                                  tmp_path: Path) -> None:
    with in_store(store.storage):
        info = log_model_version(first.trained.bundle_dir, model_name="convmf-tampered", run_id=None, tags={})
    # Someone with write access to the artifact store swaps the weights (and fixes the checksum).
    location = Path(mlflow.get_logged_model(info.logged_model_uri.rsplit("/", 1)[-1]).artifact_location
                    .removeprefix("file://"))
    (manifest_path,) = list(location.rglob("manifest.json"))
    weights = manifest_path.parent / "weights.pt"
    marker = tmp_path / "pwned"
    torch.save({**torch.load(weights, weights_only=True), "payload": _Payload(marker)}, weights)
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["weights.pt"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="refusing to load .*weights.pt"):
        mlflow.pyfunc.load_model(info.model_uri)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------------------
# Untrusted parameters
# ------------------------------------------------------------------------------------------------------------------


def files(ratings: str, items: str = "items.csv") -> DataParams:
    return DataParams(source="files", ratings_path=ratings, items_path=items)


@pytest.mark.parametrize("make, message", [
    (lambda: files("../ratings.csv"), r"data.ratings_path='../ratings.csv': '..' components are not allowed"),
    (lambda: files("data/../../etc/passwd"), r"'..' components are not allowed"),
    (lambda: files("ratings.csv", "/tmp/x/../../etc/hosts"), r"data.items_path=.*'..' components"),
    (lambda: StorageParams(home="/tmp/a/../b"), r"storage.home=.*'..' components"),
    (lambda: TrainingParams(data=files("/etc/passwd")), r"data.ratings_path='/etc/passwd' is outside the allowed"),
    (lambda: StorageParams(tracking_uri="sqlite:////etc/mlflow.db"), r"storage.tracking_uri.* outside the allowed"),
    (lambda: StorageParams(experiment="../x"), r"should match pattern"),
    (lambda: ModelParams(max_iterations=10_000), r"less than or equal to 500"),
    (lambda: ModelParams(batch_size=10**9), r"less than or equal to 8192"),
    (lambda: ModelParams(seed=2**40), r"less than or equal to"),
    (lambda: ScoringParams(users_per_shard=10**12), r"less than or equal to"),
], ids=["dotdot", "dotdot-inner", "dotdot-items", "home-dotdot", "absolute-outside", "tracking-outside",
        "experiment", "iterations", "batch", "seed", "shard"])
def test_untrusted_parameters_are_refused_with_a_clear_message(make, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make()


def test_paths_are_confined_to_the_configured_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home, data, elsewhere = tmp_path / "home", tmp_path / "data", tmp_path / "elsewhere"
    # Unset: home is the operator's choice; data files under home (or the current directory) are allowed.
    monkeypatch.delenv("CONVMF_DATA_ROOTS", raising=False)
    TrainingParams(data=files(str(home / "r.csv"), str(home / "i.csv")), storage=StorageParams(home=str(home)))
    with pytest.raises(ValidationError, match="outside the allowed roots"):
        TrainingParams(data=files(str(elsewhere / "r.csv"), str(home / "i.csv")), storage=StorageParams(home=str(home)))
    # A symbolic link under home that points outside is judged by its target.
    home.mkdir()
    (home / "link").symlink_to(Path("/etc"))
    with pytest.raises(ValidationError, match="outside the allowed roots"):
        TrainingParams(data=files(str(home / "link" / "passwd"), str(home / "i.csv")),
                       storage=StorageParams(home=str(home)))
    # Set: home and data files must lie under one of its directories.
    monkeypatch.setenv("CONVMF_DATA_ROOTS", f"{data}:{tmp_path / 'homes'}")
    with pytest.raises(ValidationError, match=r"storage.home=.* is outside the allowed roots"):
        StorageParams(home=str(home))
    storage = StorageParams(home=str(tmp_path / "homes" / "h1"))
    TrainingParams(data=files(str(data / "r.csv"), str(data / "sub" / "i.csv")), storage=storage)
    with pytest.raises(ValidationError, match="outside the allowed roots"):
        TrainingParams(data=files(str(elsewhere / "r.csv"), str(data / "i.csv")), storage=storage)


def test_flow_refuses_bad_parameters_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a deployment run does with parameters from the UI: Prefect validates them against the flow signature."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CONVMF_DATA_ROOTS", raising=False)
    with pytest.raises(ParameterTypeError, match="outside the allowed roots"):
        training_flow.validate_parameters({"params": {"data": {"source": "files", "ratings_path": "/etc/passwd",
                                                               "items_path": "/etc/hosts"}}})
    with pytest.raises(ValidationError, match="'..' components"):
        main(["train", "--home", str(tmp_path / "h"), "--ratings", "../r.csv", "--items", "i.csv"])
    assert not (tmp_path / "h").exists()  # nothing was created: no work started
