"""The nightly flow learns from yesterday (issue 7) and tokenizes in shards (issue 4), with real components: the
Prefect test server (session fixture), a private MLflow SQLite store and registry, real Parquet, real torch training
of a tiny ConvMF and, for the sharded tokenizer, a real ``distributed.LocalCluster``.

The data is one generated catalogue replayed as three nightly deliveries, 18 days apart (each file holds every
rating up to its day); the nightly defaults split each on time (train before the cutoff, 7 days of validation, 7 of
test). Planted rows:

* ``late-item``: its description holds a word found nowhere else, and its only ratings fall in day 1's validation
  window: day 1's vocabulary must not know the word;
* ``new-user`` and ``new-item``: first seen on day 2 (rated between day 1's last rating and day 2's cutoff);
* ``oov-item-*``: day 3's new items, described only with words no earlier description uses.

Runs, in order, in one store: day 1 nightly (no champion: full fit, becomes champion), day 2 nightly (warm start
from it), day 2 ``retrain`` with the warm start off (the full-fit reference), day 3 nightly training (warm start
refused: the new descriptions are out of vocabulary).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from prefect import flow

from convmf_core.config import TextConfig
from convmf_core.data import DAY_SECONDS
from convmf_core.ingest import IngestConfig, ingest, write_parquet_atomic
from convmf_core.persistence import load_model
from convmf_core.synthetic import SyntheticConfig, generate_catalogue
from convmf_core.text import build_vocabulary, encode_documents, tokenize
from flows.nightly import NightlyResult, nightly_flow
from flows.scoring import scoring_flow
from flows.params import (DataParams, ModelParams, NightlyParams, ScoringParams, SplitParams, TokenizeParams,
                          TrainingParams, WarmStartParams)
from flows.training import TrainingResult, tokenize_catalogue, training_flow
from tasks.ingest import IngestedData
from tasks.tokenize import TokenizedData, VocabularySource
from tasks.tracking import end_run, start_run
from tests.pipeline_support import Store, make_store

# MLflow 3.17's input-example validation compares DataFrame columns with a range, which pandas 3.1 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Operation with range is deprecated")

MODEL = "convmf-nightly"
PLANTED = "zqxplantedword"
WINDOW = 14 * DAY_SECONDS  # validation + test windows of the nightly default split
GAP = 18 * DAY_SECONDS  # between two deliveries
# Small enough to train in a few seconds per run, with room for a full fit to converge (about 60 iterations here:
# early stopping, not the cap, ends it), so the champion a warm start begins from is a converged model. A warm
# start gets at most 10 iterations (the library's default) and a patience of 4 (library: 2): on data this small
# the validation RMSE is noisy from one iteration to the next.
MODEL_PARAMS = ModelParams(n_factors=4, lambda_u=5.0, lambda_v=5.0, embedding_dim=16, n_filters=8, hidden_dim=16,
                           max_iterations=150, patience=5, warm_start_patience=4, cnn_epochs_per_iteration=1,
                           device="cpu", posterior_samples=10, burn_in=5)
CATALOGUE = SyntheticConfig(n_users=200, n_items=80, n_topics=4, ratings_per_user=40, words_per_description=20,
                            words_per_topic=10, n_filler_words=20, share_without_text=0.0, share_unrated=0.0,
                            time_span_days=100, seed=3)


@dataclass(frozen=True)
class Deliveries:
    """The three days' files and their cutoffs (the nightly default: newest rating + 1 s - 14 days)."""

    files: dict[int, tuple[Path, Path]]
    cutoffs: dict[int, int]
    ratings: dict[int, pd.DataFrame]


def _write(directory: Path, ratings: pd.DataFrame, items: pd.DataFrame) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    ratings.to_csv(directory / "ratings.csv", index=False)
    items.to_csv(directory / "items.csv", index=False)
    return directory / "ratings.csv", directory / "items.csv"


def build_deliveries(root: Path) -> Deliveries:
    """Three deliveries of one generated catalogue, with the planted users, items and words."""
    data = generate_catalogue(CATALOGUE)
    ratings = data.ratings.astype({"user_id": str, "item_id": str})
    items = data.items.rename(columns={"description": "text"}).astype({"item_id": str})
    end = int(ratings["timestamp"].max()) + 1
    ends = {1: end - 2 * GAP, 2: end - GAP, 3: end}
    rng = np.random.default_rng(7)
    texts = items.set_index("item_id")["text"]
    users = sorted(ratings["user_id"].unique())

    def rated(item: str, who: list[str], start: int, span: int) -> pd.DataFrame:
        return pd.DataFrame({"user_id": who, "item_id": item, "rating": rng.integers(1, 6, len(who)).astype(float),
                             "timestamp": start + rng.integers(0, span, len(who))})

    base = {day: ratings[ratings["timestamp"] < e] for day, e in ends.items()}
    cutoff1 = int(base[1]["timestamp"].max()) + 1 - WINDOW
    # late-item: rated only in day 1's validation window; its planted word is in no other description.
    late = rated("late-item", users[:6], cutoff1, 3 * DAY_SECONDS)
    late_text = f"{PLANTED} " + texts.iloc[0]
    # new-user and new-item: first rated after day 1's last rating, before day 2's cutoff.
    new_start, new_span = ends[1], ends[2] - WINDOW - ends[1] - DAY_SECONDS
    new_user = rated("", ["new-user"] * 8, new_start, new_span).assign(item_id=list(texts.index[:7]) + ["new-item"])
    new_item = rated("new-item", users[10:16], new_start, new_span)
    new_item_text = texts.iloc[1]
    # oov-item-*: day 3's new items, described with words never seen before, rated before day 3's cutoff.
    oov = [rated(f"oov-item-{k}", users[20 + 5 * k:25 + 5 * k], ends[2], ends[3] - WINDOW - ends[2] - DAY_SECONDS)
           for k in range(3)]
    oov_text = [" ".join(f"qq{k}word{w} vv{k}term{w}" for w in range(8)) for k in range(3)]

    extra_items = {1: [("late-item", late_text)], 2: [("new-item", new_item_text)],
                   3: [(f"oov-item-{k}", oov_text[k]) for k in range(3)]}
    extra_ratings = {1: [late], 2: [new_user, new_item], 3: oov}
    files, cutoffs, frames = {}, {}, {}
    day_items, day_ratings = items[["item_id", "text"]], []
    for day in (1, 2, 3):
        day_items = pd.concat([day_items, pd.DataFrame(extra_items[day], columns=["item_id", "text"])],
                              ignore_index=True)
        day_ratings = day_ratings + extra_ratings[day]
        frame = pd.concat([base[day], *day_ratings], ignore_index=True)
        frames[day] = frame
        cutoffs[day] = int(frame["timestamp"].max()) + 1 - WINDOW
        files[day] = _write(root / f"day{day}", frame, day_items)
    assert cutoffs[1] == cutoff1 and cutoffs[1] < cutoffs[2] < cutoffs[3]
    return Deliveries(files, cutoffs, frames)


@pytest.fixture(scope="module")
def store(mlflow_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Store:
    return make_store(mlflow_template, tmp_path_factory.mktemp("nightly-learning"))


@pytest.fixture(scope="module")
def deliveries(store: Store) -> Deliveries:
    return build_deliveries(store.home / "incoming")


def training_params(store: Store, deliveries: Deliveries, day: int, **update) -> TrainingParams:
    ratings, items = deliveries.files[day]
    return TrainingParams(model_name=MODEL, data=DataParams(source="files", ratings_path=str(ratings),
                                                            items_path=str(items)),
                          model=MODEL_PARAMS, storage=store.storage, **update)


def nightly(store: Store, deliveries: Deliveries, day: int) -> NightlyResult:
    return nightly_flow(NightlyParams(training=training_params(store, deliveries, day),
                                      scoring=ScoringParams(n=5, users_per_shard=200, block_size=64,
                                                            run_date=dt.date(2026, 1, day))))


@pytest.fixture(scope="module")
def day1(prefect_harness: None, store: Store, deliveries: Deliveries) -> NightlyResult:
    return nightly(store, deliveries, 1)


@pytest.fixture(scope="module")
def day2(day1: NightlyResult, store: Store, deliveries: Deliveries) -> NightlyResult:
    return nightly(store, deliveries, 2)


@pytest.fixture(scope="module")
def day2_full(day2: NightlyResult, store: Store, deliveries: Deliveries) -> TrainingResult:
    """``retrain`` on day 2 with the nightly's time split but the warm start off: the full-fit reference."""
    return training_flow(training_params(store, deliveries, 2, split=SplitParams(kind="time")))


@pytest.fixture(scope="module")
def day3(day2_full: TrainingResult, store: Store, deliveries: Deliveries) -> TrainingResult:
    """Day 3's training as the nightly flow runs it (its defaults), without the scoring that follows."""
    return training_flow(NightlyParams(training=training_params(store, deliveries, 3)).training_params())


def run_of(store: Store, result: TrainingResult):
    return store.client.get_run(result.run.run_id)


def vocabulary_of(result: TrainingResult) -> set[str]:
    return set(load_model(result.trained.bundle_dir).vocabulary.words)


# ------------------------------------------------------------------------------------------------------------------
# Time-based split: nothing from after the cutoff reaches training, the vocabulary included
# ------------------------------------------------------------------------------------------------------------------


def test_nightly_splits_on_time_and_the_vocabulary_knows_nothing_after_the_cutoff(day1: NightlyResult, store: Store,
                                                                                   deliveries: Deliveries) -> None:
    training, cutoff = day1.training, deliveries.cutoffs[1]
    run = run_of(store, training)
    assert run.data.params["split.kind"] == "time"
    assert run.data.params["split.cutoff"] == pd.Timestamp(cutoff, unit="s", tz="UTC").isoformat()
    # The planted word is a real word of a catalogue description: the paper's vocabulary over every item has it.
    texts = pd.read_csv(deliveries.files[1][1])["text"].tolist()
    assert PLANTED in tokenize(texts[-1]) and PLANTED in build_vocabulary(texts, TextConfig()).words
    # ... but late-item is first rated after the cutoff, so neither the run's vocabulary nor its tokens know it.
    assert PLANTED not in vocabulary_of(training)
    bundle = load_model(training.trained.bundle_dir)
    assert "late-item" in bundle.item_map.to_list()  # the item is in the catalogue, encoded with that vocabulary

    # Every training rating precedes the cutoff; validation and test are the two windows after it.
    frame = deliveries.ratings[1]
    stamps = frame.set_index(["user_id", "item_id"])["timestamp"]
    for name, lo, hi in (("train", None, cutoff), ("validation", cutoff, cutoff + 7 * DAY_SECONDS),
                         ("test", cutoff + 7 * DAY_SECONDS, cutoff + WINDOW)):
        part = pd.read_parquet(training.trained.split_dir / f"{name}.parquet")
        keys = list(zip(bundle.user_map.to_raw(part["user"].to_numpy()),
                        bundle.item_map.to_raw(part["item"].to_numpy())))
        ts = stamps.loc[keys].to_numpy()
        assert len(ts) > 0 and ts.max() < hi and (lo is None or ts.min() >= lo), name
    assert len(frame) == sum(int(run.data.params[f"n_{n}"]) for n in ("train", "validation", "test"))
    # late-item has validation ratings and no training rating: a cold item of this split.
    cold = pd.read_parquet(training.trained.split_dir / "cold_items.parquet")["item"]
    assert "late-item" in set(bundle.item_map.to_raw(cold.to_numpy()))
    assert run.data.tags["fit_mode"] == "full" and "no version" in run.data.tags["fit_mode_reason"]


def test_retrain_defaults_to_the_random_split_and_a_full_fit() -> None:
    from flows.params import RETRAIN_DEFAULTS

    params = TrainingParams()
    assert params.split.kind is None and params.warm_start.enabled is None
    retrain = params.with_defaults(RETRAIN_DEFAULTS)
    assert (retrain.split.kind, retrain.warm_start.enabled) == ("random", False)
    nightly_params = NightlyParams().training_params()
    assert (nightly_params.split.kind, nightly_params.warm_start.enabled) == ("time", True)
    # What is given explicitly wins over either flow's defaults.
    given = NightlyParams(training=TrainingParams(split=SplitParams(kind="random"),
                                                  warm_start=WarmStartParams(enabled=False))).training_params()
    assert (given.split.kind, given.warm_start.enabled) == ("random", False)
    assert SplitParams(kind="time", cutoff="2026-01-01T00:00:00").cutoff_seconds() == 1767225600


# ------------------------------------------------------------------------------------------------------------------
# Warm start from the registered champion
# ------------------------------------------------------------------------------------------------------------------


def test_warm_start_handles_a_new_user_and_a_new_item(day2: NightlyResult, store: Store) -> None:
    warm = day2.training
    metrics = run_of(store, warm).data.metrics
    assert metrics["warm_start_new_users"] >= 1 and metrics["warm_start_new_items"] >= 1
    assert metrics["warm_start_warm_users"] >= 80 and metrics["warm_start_warm_items"] >= 60
    bundle = load_model(warm.trained.bundle_dir)
    model, users, items = bundle.model, bundle.user_map, bundle.item_map
    u, j = int(users.to_index(["new-user"])[0]), int(items.to_index(["new-item"])[0])
    for row in (model.user_factors_[u], model.item_factors_[j]):  # solved from ratings / started at theta_j
        assert torch.isfinite(row).all() and row.abs().sum() > 0
    assert np.isfinite(model.score(np.array([u]))).all()
    raters = users.to_index(["new-user"] + [str(x) for x in _raters_of(store, "new-item")])
    assert np.isfinite(model.predict(raters, np.full(len(raters), j))).all()
    # Served: the warm model (champion, or challenger when the gate kept the old one) gives the new user a list.
    decision = warm.decision
    print(f"day 2 promotion: {decision.reason}")
    if decision.promoted:
        partition = day2.scores
    else:
        partition = scoring_flow(ScoringParams(model_name=MODEL, alias="challenger", n=5, users_per_shard=200,
                                               block_size=64, run_date=dt.date(2026, 2, 2), storage=store.storage))
    manifest = json.loads((partition / "_manifest.json").read_text())
    assert manifest["model_version"] == warm.version.version
    scores = pd.concat([pd.read_parquet(partition / p) for p in manifest["parts"]], ignore_index=True)
    mine = scores[scores["user_id"] == "new-user"]
    assert len(mine) == 5 and np.isfinite(mine["score"]).all()
    assert not set(mine["item_id"]) & set(_rated_by(store, "new-user"))  # what they rated is never shown back


def _first_step_within(store: Store, result: TrainingResult, target: float) -> int | None:
    history = sorted(store.client.get_metric_history(result.run.run_id, "validation_rmse"), key=lambda m: m.step)
    return next((m.step for m in history if m.value <= target), None)


def test_nightly_warm_starts_from_the_champion_and_needs_fewer_iterations(day2: NightlyResult,
                                                                          day2_full: TrainingResult,
                                                                          store: Store) -> None:
    warm, full = day2.training, day2_full
    warm_run, full_run = run_of(store, warm), run_of(store, full)
    assert warm_run.data.tags["fit_mode"] == "warm" and warm_run.data.tags["warm_start_version"] == "1"
    assert "warm start from convmf-nightly version 1" in warm_run.data.tags["fit_mode_reason"]
    assert full_run.data.tags["fit_mode"] == "full" and "warm start is off" in full_run.data.tags["fit_mode_reason"]
    assert warm_run.data.params["split.cutoff"] == full_run.data.params["split.cutoff"]  # the same split
    print(f"warm: best {warm.trained.best_validation_rmse:.4f} at {warm.trained.best_iteration}/"
          f"{warm.trained.iterations}; full: best {full.trained.best_validation_rmse:.4f} at "
          f"{full.trained.best_iteration}/{full.trained.iterations}")
    # The full fit's quality (issue 7's target: within 0.005 RMSE), reached in fewer iterations (and fewer in total).
    tolerance = 0.005
    assert warm.trained.best_validation_rmse <= full.trained.best_validation_rmse + tolerance
    reached = _first_step_within(store, warm, full.trained.best_validation_rmse + tolerance)
    assert reached is not None and reached < full.trained.best_iteration
    assert warm.trained.iterations < full.trained.iterations
    assert full.trained.iterations < MODEL_PARAMS.max_iterations  # the reference converged, it was not cut short
    # The vocabulary was kept: still day 1's (without the word of the item first rated after day 1's cutoff),
    # while the full refit on day 2 builds its own, which now knows it.
    champion_words = set(load_model(_bundle_of_version(store, "1")).vocabulary.words)
    assert vocabulary_of(warm) == champion_words and PLANTED not in champion_words
    assert PLANTED in vocabulary_of(full)
    # each bundle records its place in a chain of warm starts (RefitPolicy.max_warm_starts reads it)
    assert load_model(warm.trained.bundle_dir).metadata["warm_starts"] == 1
    assert load_model(full.trained.bundle_dir).metadata["warm_starts"] == 0
    assert warm_run.data.metrics["warm_starts"] == 1 and full_run.data.metrics["warm_starts"] == 0


def _bundle_of_version(store: Store, version: str) -> Path:
    from tasks.register import download_version, use_tracking_uri

    use_tracking_uri(store.storage.resolved_tracking_uri())
    bundle, _ = download_version(MODEL, version, store.home / "downloads")
    return bundle


def _raters_of(store: Store, item: str) -> list[str]:
    frame = pd.read_csv(store.home / "incoming" / "day2" / "ratings.csv", dtype=str)
    return frame.loc[frame["item_id"] == item, "user_id"].tolist()


def _rated_by(store: Store, user: str) -> list[str]:
    frame = pd.read_csv(store.home / "incoming" / "day2" / "ratings.csv", dtype=str)
    return frame.loc[frame["user_id"] == user, "item_id"].tolist()


def test_out_of_vocabulary_descriptions_force_a_full_refit(day3: TrainingResult, store: Store) -> None:
    training = day3
    run = run_of(store, training)
    assert run.data.tags["fit_mode"] == "full"
    reason = run.data.tags["fit_mode_reason"]
    assert reason.startswith("full refit instead of a warm start from convmf-nightly version")
    assert "not in the kept" in reason and "max_oov_share 50.0%" in reason
    assert run.data.metrics["warm_start_oov_share"] > 0.5
    assert run.data.metrics["warm_start_new_item_share"] < 0.2  # the OOV share alone decided
    # A fresh vocabulary, built from what is known before day 3's cutoff: the new words are in it.
    assert {"qq0word0", "vv2term7"} <= vocabulary_of(training)
    assert "warm_start_new_users" not in run.data.metrics  # no warm start happened


# ------------------------------------------------------------------------------------------------------------------
# Issue 4: tokenization mapped over shards, on threads and on a real Dask LocalCluster
# ------------------------------------------------------------------------------------------------------------------


def _ingested(deliveries: Deliveries, home: Path) -> IngestedData:
    result = ingest(*deliveries.files[1], IngestConfig())
    out = home / "ingested"
    return IngestedData(write_parquet_atomic(result.ratings, out / "ratings.parquet"),
                        write_parquet_atomic(result.items, out / "items.parquet"),
                        write_parquet_atomic(result.quarantine, out / "quarantine.parquet"), result.content_hash,
                        result.counts)


@flow(name="test-tokenize-catalogue", validate_parameters=False)
def _tokenize_flow(ingested: IngestedData, text: TextConfig, source: VocabularySource, runner: TokenizeParams,
                   home: Path, tracking_uri: str, artifact_root: Path) -> TokenizedData:
    run = start_run(tracking_uri, "tokenize-test", artifact_root, "tokenize", {})
    try:
        return tokenize_catalogue(ingested, text, source, runner, home, run)
    finally:
        end_run(run)


@pytest.mark.parametrize("runner", [TokenizeParams(items_per_shard=7, threads=3),
                                    TokenizeParams(items_per_shard=9, task_runner="dask", dask_workers=1,
                                                   threads_per_worker=2)],
                         ids=["threads", "dask-local-cluster"])
def test_sharded_tokenization_equals_the_single_process_one(prefect_harness: None, runner: TokenizeParams,
                                                            deliveries: Deliveries, store: Store,
                                                            tmp_path: Path) -> None:
    ingested = _ingested(deliveries, tmp_path)
    text = TextConfig(max_length=15, max_df=0.3, vocab_size=120)
    cutoff = deliveries.cutoffs[1]
    source = VocabularySource(known_before=cutoff)
    tokenized = _tokenize_flow(ingested, text, source, runner, tmp_path, store.storage.resolved_tracking_uri(),
                               store.storage.artifact_root())
    item_ids, documents, vocabulary = tokenized.load()

    # The single-process reference: the vocabulary of the items rated before the cutoff, every item encoded.
    items = pd.read_parquet(ingested.items_path)
    ratings = pd.read_parquet(ingested.ratings_path)
    known = set(ratings.loc[ratings["timestamp"] < cutoff, "item_id"])
    corpus = [t for i, t in zip(items["item_id"], items["text"]) if i in known]
    assert 0 < len(corpus) < len(items)  # late-item is first rated after the cutoff
    expected = build_vocabulary(corpus, text)
    assert vocabulary.words == expected.words and len(vocabulary) > 20
    assert item_ids == items["item_id"].tolist()
    assert documents == encode_documents(items["text"].tolist(), expected, text.max_length)
    assert len(item_ids) > 3 * runner.items_per_shard  # it really was sharded


# ------------------------------------------------------------------------------------------------------------------
# The pieces of the decision, on their own
# ------------------------------------------------------------------------------------------------------------------


def test_a_champion_that_saw_the_validation_window_is_not_a_warm_start() -> None:
    from tasks.warm_start import leak

    assert leak({"train_max_timestamp": 99}, 100) is None
    assert "at or after this run's cutoff 100" in leak({"train_max_timestamp": 100}, 100)
    assert "does not record" in leak({"split_kind": "random"}, 100)  # a retrain on the random split
    assert leak({}, None) is None  # a random split has no cutoff to protect


def test_time_split_without_timestamps_names_the_file(tmp_path: Path) -> None:
    from convmf_core.data import DataError
    from tasks.train import rating_timestamps

    frame = pd.DataFrame({"user_id": ["a", "b", "c"], "item_id": ["1", "2", "3"], "rating": [1.0, 2.0, 3.0],
                          "timestamp": pd.array([1, None, 3], dtype="Int64")})
    path = write_parquet_atomic(frame, tmp_path / "ratings.parquet")
    with pytest.raises(DataError, match=r"my/ratings\.csv: 1 of 3 rating\(s\) have no timestamp.*row\(s\) \[2\]"
                                        r".*split\.kind='random'"):
        rating_timestamps(path, "my/ratings.csv")
    assert rating_timestamps(write_parquet_atomic(frame.dropna(), tmp_path / "ok.parquet")).tolist() == [1, 3]
