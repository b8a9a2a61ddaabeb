"""End-to-end tests of the Prefect flows (flows/) with real components: a temporary Prefect server
(``prefect_test_harness``, once per session), a real MLflow SQLite tracking store and model registry per test home
(a copy of one migrated store), real Parquet files and real torch training of a tiny ConvMF on ~80 users x 60 items.

The nightly run and a second, deliberately worse training run share one store (module fixtures): the champion /
challenger, scoring and tokenize-cache tests read what those runs left behind.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from convmf_core.data import Ratings
from convmf_core.ingest import REASON_CODES, IngestError
from convmf_core.persistence import load_model
from convmf_core.synthetic import SyntheticConfig, generate_catalogue
from flows.cli import build_parser, main
from flows.nightly import NightlyResult, nightly_flow
from flows.params import (DataParams, ModelParams, NightlyParams, ScoringParams, SplitParams, StorageParams,
                          TrainingParams)
from flows.scoring import scoring_flow
from flows.training import TrainingResult, training_flow
from tests.pipeline_support import Store, client_for, make_store, new_storage

# MLflow 3.17's input-example validation compares DataFrame columns with a range, which pandas 3.1 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Operation with range is deprecated")

MODEL = "convmf-e2e"
N = 10
RUN_DATE = dt.date(2026, 1, 2)
DATA = DataParams(builtin_users=80, builtin_items=60)
TINY = ModelParams(n_factors=4, embedding_dim=16, n_filters=8, hidden_dim=16, max_iterations=4,
                   cnn_epochs_per_iteration=1, device="cpu", posterior_samples=10, burn_in=5)
# Clearly worse: one factor, crushing regularisation, a single iteration.
WORSE = TINY.model_copy(update={"n_factors": 1, "lambda_u": 1000.0, "lambda_v": 1000.0, "max_iterations": 1})


def read_partition(partition: Path) -> tuple[dict, pd.DataFrame]:
    """The manifest and the rows of a committed scores partition (the parts it lists)."""
    manifest = json.loads((partition / "_manifest.json").read_text())
    frame = pd.concat([pd.read_parquet(partition / p) for p in manifest["parts"]], ignore_index=True)
    return manifest, frame


def pairs(frame: pd.DataFrame) -> set[tuple[str, str]]:
    return set(zip(frame["user_id"].astype(str), frame["item_id"].astype(str)))


@pytest.fixture(scope="module")
def store(mlflow_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Store:
    home = tmp_path_factory.mktemp("pipeline")
    return make_store(mlflow_template, home)


@pytest.fixture(scope="module")
def nightly(prefect_harness: None, store: Store) -> NightlyResult:
    """The nightly flow on a fresh store: trains version 1 (champion) and scores every user."""
    return nightly_flow(NightlyParams(
        training=TrainingParams(model_name=MODEL, data=DATA, model=TINY, storage=store.storage),
        scoring=ScoringParams(n=N, users_per_shard=30, block_size=16, run_date=RUN_DATE)))


@pytest.fixture(scope="module")
def second(nightly: NightlyResult, store: Store) -> TrainingResult:
    """A second training run on the same (unchanged) data with a clearly worse configuration: version 2. It uses
    the nightly's time-based split (``retrain`` defaults to the random one), so it sees the same split and
    vocabulary."""
    return training_flow(TrainingParams(model_name=MODEL, data=DATA, model=WORSE, storage=store.storage,
                                        split=SplitParams(kind="time")))


# ------------------------------------------------------------------------------------------------------------------
# 1. End to end
# ------------------------------------------------------------------------------------------------------------------


def test_nightly_run_is_tracked_registered_and_promoted(nightly: NightlyResult, store: Store) -> None:
    training, client = nightly.training, store.client
    run = client.get_run(training.run.run_id)
    assert run.info.status == "FINISHED"

    # Per-iteration history: exactly one point per outer iteration, steps 1..k, whose minimum is the best.
    k = training.trained.iterations
    assert 1 <= k <= TINY.max_iterations
    history = client.get_metric_history(run.info.run_id, "validation_rmse")
    assert sorted(m.step for m in history) == list(range(1, k + 1))
    # The model is the average of the posterior draws (TINY.posterior_samples): its validation RMSE is the last
    # point of the sweeps' curve (one per sweep after the ALS iterations), and beats the ALS iterations' best.
    sweeps = sorted(client.get_metric_history(run.info.run_id, "gibbs_validation_rmse"), key=lambda m: m.step)
    assert [m.step for m in sweeps] == list(range(k + 1 + TINY.burn_in, k + 1 + TINY.burn_in + TINY.posterior_samples))
    assert sweeps[-1].value == pytest.approx(training.trained.best_validation_rmse)
    assert training.trained.best_validation_rmse < min(m.value for m in history)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) == list(range(1, k + 1))

    # Test metrics under MLflow-safe names ('@' -> '_at_'), equal to what the flow computed.
    metrics = run.data.metrics
    assert not [key for key in metrics if "@" in key]
    assert metrics["test_rmse"] == pytest.approx(training.metrics["rmse"])
    assert metrics["test_recall_at_10"] == pytest.approx(training.metrics["recall@10"])
    assert metrics["test_ndcg_at_10"] == pytest.approx(training.metrics["ndcg@10"])
    assert 0.3 < metrics["test_rmse"] < 1.5
    assert 0.0 < metrics["test_recall_at_10"] <= 1.0
    assert metrics["best_validation_rmse"] == pytest.approx(training.trained.best_validation_rmse)
    assert metrics["iterations"] == k

    params = run.data.params
    assert params["als.n_factors"] == "4" and params["cnn.n_filters"] == "8" and params["cnn.embedding_dim"] == "16"
    assert params["n_users"] == "80" and params["n_items"] == "60"
    assert int(params["n_train"]) + int(params["n_validation"]) + int(params["n_test"]) == int(
        metrics["ingest_ratings_rows_accepted"])

    artifacts = {a.path: a for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/learning_curve.png" in artifacts and artifacts["plots/learning_curve.png"].file_size > 1000
    assert "ingest/counts.json" in {a.path for a in client.list_artifacts(run.info.run_id, "ingest")}

    data_hash = run.data.tags["data_hash"]
    assert re.fullmatch(r"[0-9a-f]{64}", data_hash)
    assert run.data.tags["promotion"] == "champion"

    # Registry: version 1 of the model, logged from this run, is the champion.
    assert training.version.version == "1"
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == "1" and champion.run_id == run.info.run_id
    assert champion.tags["data_hash"] == data_hash
    assert float(champion.tags["validation_rmse"]) == pytest.approx(training.trained.best_validation_rmse)
    assert training.decision.promoted and training.decision.reason == "no champion yet"


def test_nightly_run_commits_complete_scores_partition(nightly: NightlyResult, store: Store) -> None:
    out_dir = store.home / "scores" / MODEL
    partition = out_dir / f"run_date={RUN_DATE.isoformat()}"
    assert nightly.scores == partition
    manifest, scores = read_partition(partition)
    parts = sorted(p.name for p in partition.glob("part-*.parquet"))
    assert manifest["parts"] == parts and len(parts) == 3  # 80 users, 30 per shard
    assert manifest["model_name"] == MODEL and manifest["model_version"] == "1" and manifest["n"] == N
    assert manifest["rows"] == len(scores)
    assert sorted(p.name for p in partition.iterdir()) == sorted(parts + ["_manifest.json"])  # no temporary files
    assert not (out_dir / "_staging" / partition.name).exists()

    bundle = load_model(nightly.training.trained.bundle_dir)
    known_users = set(bundle.user_map.to_list())
    seen = pd.read_parquet(nightly.training.trained.seen_path)
    # Every known user exactly once per rank, ranks 1..len, each list as long as the unrated items allow.
    assert set(scores["user_id"]) == known_users
    assert not scores.duplicated(["user_id", "rank"]).any()
    assert not scores.duplicated(["user_id", "item_id"]).any()
    n_items = len(bundle.item_map)
    expected_len = {u: min(N, n_items - c) for u, c in seen.groupby("user_id").size().items()}
    for user, group in scores.groupby("user_id"):
        group = group.sort_values("rank")
        assert group["rank"].tolist() == list(range(1, expected_len[user] + 1)), user
        assert np.all(np.diff(group["score"].to_numpy()) <= 1e-6), user
    assert set(scores["item_id"]) <= set(bundle.item_map.to_list())

    # No training pair (nor any other rated pair) is recommended back.
    split = nightly.training.trained.split_dir
    train = pd.read_parquet(split / "train.parquet")
    train_pairs = set(zip(bundle.user_map.to_raw(train["user"].to_numpy()).tolist(),
                          bundle.item_map.to_raw(train["item"].to_numpy()).tolist()))
    assert train_pairs <= pairs(seen)
    assert not pairs(scores) & pairs(seen)
    n_rated = sum(len(pd.read_parquet(split / f"{name}.parquet")) for name in ("train", "validation", "test"))
    assert len(pairs(seen)) == n_rated  # the served lists leave out every rated pair, not just the training ones


# ------------------------------------------------------------------------------------------------------------------
# 2. Champion / challenger, 4. tokenize cache
# ------------------------------------------------------------------------------------------------------------------


def test_worse_model_becomes_challenger_not_champion(nightly: NightlyResult, second: TrainingResult,
                                                     store: Store) -> None:
    client = store.client
    assert second.version.version == "2"
    assert second.trained.best_validation_rmse > nightly.training.trained.best_validation_rmse
    decision = second.decision
    assert not decision.promoted
    assert decision.previous_version == "1" and decision.champion_version == "1"
    assert "does not beat the champion's" in decision.reason
    assert "kept as **challenger**" in decision.markdown and decision.reason in decision.markdown

    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == "2"
    version = client.get_model_version(MODEL, "2")
    assert version.tags["promotion.decision"] == "challenger"
    assert version.tags["promotion.reason"] == decision.reason
    assert version.tags["promotion.previous_champion"] == "1"
    tags = client.get_run(second.run.run_id).data.tags
    assert tags["promotion"] == "challenger" and tags["promotion_reason"] == decision.reason


def test_unchanged_data_hits_the_tokenize_cache(nightly: NightlyResult, second: TrainingResult, store: Store) -> None:
    first_run = store.client.get_run(nightly.training.run.run_id).data
    second_run = store.client.get_run(second.run.run_id).data
    assert first_run.tags["tokenize_cache_hit"] == "False"
    assert second_run.tags["tokenize_cache_hit"] == "True"
    assert second_run.tags["data_hash"] == first_run.tags["data_hash"]
    assert second_run.params["vocabulary_size"] == first_run.params["vocabulary_size"]
    assert len(list((store.home / "tokens").iterdir())) == 1


# ------------------------------------------------------------------------------------------------------------------
# 3. Scoring with the registry's champion; 8. no champion
# ------------------------------------------------------------------------------------------------------------------


def test_scoring_uses_the_champion_from_the_registry(nightly: NightlyResult, second: TrainingResult,
                                                     store: Store) -> None:
    run_date, n = dt.date(2026, 1, 3), 5
    staging = store.home / "scores" / MODEL / "_staging" / f"run_date={run_date.isoformat()}"
    staging.mkdir(parents=True)
    shutil.copyfile(nightly.scores / "part-00000.parquet", staging / "part-00099.parquet")  # a crashed run's part

    out = scoring_flow(ScoringParams(model_name=MODEL, n=n, users_per_shard=50, block_size=7, run_date=run_date,
                                     storage=store.storage))
    assert out == store.home / "scores" / MODEL / f"run_date={run_date.isoformat()}"
    assert not staging.exists()
    manifest, scores = read_partition(out)
    assert manifest["model_version"] == "1" and manifest["parts"] == ["part-00000.parquet", "part-00001.parquet"]

    # The champion's own bundle (version 1, not the newer version 2) gives the same lists.
    bundle = load_model(nightly.training.trained.bundle_dir)
    seen = pd.read_parquet(nightly.training.trained.seen_path)
    exclude = Ratings(bundle.user_map.to_index(seen["user_id"].to_numpy()),
                      bundle.item_map.to_index(seen["item_id"].to_numpy()), np.ones(len(seen), np.float32),
                      bundle.model.n_users, bundle.model.n_items)
    most_rated = seen["user_id"].value_counts().index[0]
    users = list(dict.fromkeys(bundle.user_map.to_list()[:3] + [bundle.user_map.to_list()[-1], most_rated]))
    idx = bundle.user_map.to_index(np.asarray(users, dtype=object))
    top = bundle.model.recommend(idx, n, exclude=exclude).to_frame(bundle.user_map, bundle.item_map)
    for user in users:
        got = scores[scores["user_id"] == user].sort_values("rank")
        want = top[top["user_id"] == user].sort_values("rank")
        assert got["item_id"].tolist() == [str(i) for i in want["item_id"]], user
        np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=1e-5, atol=1e-5)


def test_scoring_without_a_champion_fails_clearly(prefect_harness: None, mlflow_template: Path,
                                                  tmp_path: Path) -> None:
    storage = new_storage(mlflow_template, tmp_path)
    with pytest.raises(LookupError, match=r"no model version of 'absent' has the alias 'champion': run the training"):
        scoring_flow(ScoringParams(model_name="absent", run_date=RUN_DATE, storage=storage))
    assert not (tmp_path / "scores" / "absent" / f"run_date={RUN_DATE.isoformat()}").exists()


def test_scoring_with_an_unset_alias_fails_clearly(second: TrainingResult, store: Store) -> None:
    with pytest.raises(LookupError, match=rf"no model version of '{MODEL}' has the alias 'gold'"):
        scoring_flow(ScoringParams(model_name=MODEL, alias="gold", run_date=RUN_DATE, storage=store.storage))


def test_cli_score_runs_the_scoring_flow(second: TrainingResult, store: Store,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["score", "--home", str(store.home), "--tracking-uri", store.storage.resolved_tracking_uri(),
                 "--model-name", MODEL, "--n", "3", "--run-date", "2026-01-04"]) == 0
    partition = store.home / "scores" / MODEL / "run_date=2026-01-04"
    assert str(partition) in capsys.readouterr().out
    manifest, scores = read_partition(partition)
    assert manifest["n"] == 3 and manifest["model_version"] == "1"
    assert scores["rank"].max() == 3 and scores["user_id"].nunique() == 80


# ------------------------------------------------------------------------------------------------------------------
# 5. Ingest of bad rows through the training flow
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    ratings: Path
    items: Path
    expected: dict[tuple[str, int], str]  # (file name, line) -> reason
    n_ratings_rows: int
    n_items_rows: int
    newer: tuple[str, str, float]  # (user, item, rating) that must win its duplicate
    older_kept: tuple[str, str, float]
    repeated_item: str  # its last row wins


def write_inputs(directory: Path) -> Inputs:
    """A real synthetic catalogue as CSV files, with one or more rows of every bad kind appended."""
    data = generate_catalogue(SyntheticConfig(n_users=80, n_items=60, seed=3))
    directory.mkdir(parents=True, exist_ok=True)
    ratings_path, items_path = directory / "ratings.csv", directory / "items.csv"
    good = data.ratings.reset_index(drop=True)
    rows = [f"{r.user_id},{r.item_id},{r.rating:g},{r.timestamp}" for r in good.itertuples()]
    a, b = next(good.itertuples()), list(good.itertuples())[1]  # itertuples keeps each column's type
    newer_rating = 1.0 if a.rating != 1.0 else 5.0
    older_rating = 1.0 if b.rating != 1.0 else 5.0
    bad = [
        ("7,5", "missing_field"),  # fields missing from the row
        ("7,5,,1700000000", "missing_field"),
        ("7,5,great,1700000000", "non_numeric_rating"),
        ("7,5,9,1700000000", "rating_out_of_scale"),
        ("7,5,0.5,1700000000", "rating_out_of_scale"),
        ("7,9999,4,1700000000", "unknown_item"),  # an item with no description row
        (",5,4,1700000000", "empty_id"),
        ("7, ,4,1700000000", "empty_id"),
        ("7,5,4,next tuesday", "bad_timestamp"),
        ("7,5,4,1700000000,surplus", "malformed_row"),
        (f"{a.user_id},{a.item_id},{newer_rating:g},{a.timestamp + 3600}", None),  # newer: supersedes line 2
        (f"{b.user_id},{b.item_id},{older_rating:g},{b.timestamp - 3600}", "duplicate_superseded"),  # older
    ]
    lines = ["user_id,item_id,rating,timestamp"] + rows + [text for text, _ in bad]
    ratings_path.write_text("\n".join(lines) + "\n")
    expected = {("ratings.csv", 2): "duplicate_superseded"}
    first_bad = 2 + len(rows)
    expected.update({("ratings.csv", first_bad + k): reason for k, (_, reason) in enumerate(bad) if reason})

    with items_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["item_id", "title", "description"])
        for item in data.items.itertuples():
            writer.writerow([item.item_id, item.title, item.description])
        writer.writerow(["", "Nameless", "a description without an id"])  # empty id
        writer.writerow([data.items.item_id.iloc[-1], "Again", "a later row for the same item"])
    n_items = len(data.items)
    expected[("items.csv", n_items + 2)] = "empty_id"
    expected[("items.csv", n_items + 1)] = "duplicate_item"  # superseded by the later row of the same item
    return Inputs(ratings_path, items_path, expected, len(rows) + len(bad), n_items + 2,
                  (str(a.user_id), str(a.item_id), newer_rating), (str(b.user_id), str(b.item_id), float(b.rating)),
                  str(data.items.item_id.iloc[-1]))


def test_ingest_quarantines_every_bad_row_kind(prefect_harness: None, mlflow_template: Path, tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "home" / "input")  # data files must lie under home (flows/params.py)
    storage = new_storage(mlflow_template, tmp_path / "home")
    result = training_flow(TrainingParams(
        model_name="ingest-test", model=TINY, storage=storage,
        data=DataParams(source="files", ratings_path=str(inputs.ratings), items_path=str(inputs.items))))
    client = client_for(storage)
    run = client.get_run(result.run.run_id)
    assert run.info.status == "FINISHED" and result.version.version == "1"

    ingested = tmp_path / "home" / "ingested" / run.data.tags["data_hash"][:16]
    quarantine = pd.read_parquet(ingested / "quarantine.parquet")
    got = {(Path(f).name, int(line)): reason for f, line, reason in
           zip(quarantine["source_file"], quarantine["line"], quarantine["reason"])}
    assert got == inputs.expected
    surplus = quarantine[quarantine["reason"] == "malformed_row"]
    assert surplus["raw"].tolist() == ["7,5,4,1700000000,surplus"]

    # Accounting: every row read is either accepted or quarantined, in the metrics and in the counts artifact.
    m = run.data.metrics
    n_bad = Counter(Path(f).stem for f, _ in inputs.expected)
    for role, n_rows in (("ratings", inputs.n_ratings_rows), ("items", inputs.n_items_rows)):
        assert m[f"ingest_{role}_rows_read"] == n_rows
        assert m[f"ingest_{role}_rows_quarantined"] == n_bad[role]
        assert m[f"ingest_{role}_rows_read"] == m[f"ingest_{role}_rows_accepted"] + m[f"ingest_{role}_rows_quarantined"]
    reasons = Counter(inputs.expected.values())
    assert {code: m[f"ingest_quarantined_{code}"] for code in REASON_CODES} == {c: reasons[c] for c in REASON_CODES}
    counts = json.loads(Path(client.download_artifacts(run.info.run_id, "ingest/counts.json", str(tmp_path))).read_text())
    for role in ("ratings", "items"):
        c = counts[role]
        assert c["rows_read"] == c["rows_accepted"] + c["rows_quarantined"] == m[f"ingest_{role}_rows_read"]

    # The newest of a duplicated (user, item) is the one kept.
    ratings = pd.read_parquet(ingested / "ratings.parquet").set_index(["user_id", "item_id"])["rating"]
    assert len(ratings) == m["ingest_ratings_rows_accepted"]
    for user, item, rating in (inputs.newer, inputs.older_kept):
        assert ratings.loc[(user, item)] == pytest.approx(rating)
    items = pd.read_parquet(ingested / "items.parquet").set_index("item_id")["text"]
    assert items.loc[inputs.repeated_item] == "a later row for the same item"


@pytest.mark.parametrize("role", ["ratings", "items"])
def test_file_without_a_valid_row_fails_the_training_flow(role: str, prefect_harness: None, mlflow_template: Path,
                                                          tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "home" / "input")  # data files must lie under home (flows/params.py)
    broken = tmp_path / "home" / "input" / f"broken-{role}.csv"
    if role == "ratings":
        broken.write_text("user_id,item_id,rating,timestamp\n1,1,9,1700000000\n1,2,abc,1700000000\n,3,4,\n")
        paths = {"ratings_path": str(broken), "items_path": str(inputs.items)}
    else:
        broken.write_text("item_id,title,description\n,No id,words\n  ,Blank id,more words\n")
        paths = {"ratings_path": str(inputs.ratings), "items_path": str(broken)}
    storage = new_storage(mlflow_template, tmp_path / "home")
    with pytest.raises(IngestError, match=re.escape(f"{role} file {broken}: no valid rows")):
        training_flow(TrainingParams(model_name="ingest-fail", model=TINY, storage=storage,
                                     data=DataParams(source="files", **paths)))
    client = client_for(storage)
    runs = client.search_runs([client.get_experiment_by_name(storage.experiment).experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]  # not left RUNNING
    assert client.search_registered_models() == []


# ------------------------------------------------------------------------------------------------------------------
# 6. Parameter validation, 7. CLI
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: TrainingParams(model_name="../evil"),
    lambda: TrainingParams(model_name=""),
    lambda: ScoringParams(n=0),
    lambda: ScoringParams(n=1001),
    lambda: ScoringParams(alias="champion alias"),
    lambda: DataParams(source="files"),
    lambda: DataParams(source="files", ratings_path="ratings.csv"),
    lambda: DataParams(rating_min=5, rating_max=1),
    lambda: ModelParams(n_factors=0),
    lambda: StorageParams(experiment="a/b"),
    lambda: ScoringParams(unknown_field=1),
    lambda: NightlyParams.model_validate({"scoring": {"n": 0}}),
], ids=["model-name-path", "model-name-empty", "n-zero", "n-too-big", "alias-space", "files-no-paths",
        "files-one-path", "scale-reversed", "no-factors", "experiment-slash", "extra-field", "nested-n-zero"])
def test_invalid_parameters_are_refused(make) -> None:
    with pytest.raises(ValidationError):
        make()


def test_files_source_error_says_what_is_missing() -> None:
    with pytest.raises(ValidationError, match="needs both ratings_path and items_path"):
        DataParams(source="files", items_path="items.csv")


def test_nightly_scoring_is_bound_to_the_trained_model() -> None:
    storage = StorageParams(home="/tmp/somewhere")
    params = NightlyParams(training=TrainingParams(model_name="m", storage=storage), scoring=ScoringParams(n=7))
    bound = params.scoring_params()
    assert (bound.model_name, bound.storage, bound.n) == ("m", storage, 7)


SUBCOMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


@pytest.mark.parametrize("argv", [["--help"]] + [[cmd, "--help"] for cmd in SUBCOMMANDS],
                         ids=lambda argv: " ".join(argv))
def test_cli_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: convmf{' ' + argv[0] if len(argv) > 1 else ''}")
    if len(argv) == 1:
        assert all(cmd in out for cmd in SUBCOMMANDS)
    elif argv[0] == "stack":  # the stack runs its own MLflow server: no --tracking-uri, but its own actions
        assert all(action in out for action in ("up", "down", "status"))
    else:
        assert "--home" in out and "--tracking-uri" in out


def test_cli_knows_every_subcommand() -> None:
    assert SUBCOMMANDS == ["demo", "nightly", "rollback", "score", "stack", "train"]


def test_cli_without_a_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "usage: convmf" in capsys.readouterr().err
