"""Serving the champion: fold-in and new-item requests through ``mlflow.pyfunc.load_model``, and the real
``mlflow models serve -m models:/<name>@champion --env-manager local`` answering HTTP on loopback.

One tiny ConvMF is trained, logged to a private copy of the migrated MLflow SQLite store and aliased ``champion``
once per module; the server is started once per module on a free port (generous start-up timeout) and its process
group is killed at the end. The server helpers are the load benchmark's (``benchmarks/serve_load.py``), so the
benchmark's start-up, shutdown and malformed-body list are tested here too.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PyFuncModel

from benchmarks.serve_load import (Server, invoke, live_group_members, malformed_bodies, request, start_server,
                                   stop_server, valid_bodies)
from convmf_core.config import GibbsConfig
from convmf_core.data import IdMap, Ratings
from convmf_core.foldin import ItemSide, UserFactors, embed_new_items, fold_in_users
from convmf_core.models.convmf import ConvMF
from convmf_core.persistence import save_model
from convmf_core.text import Vocabulary, encode_documents
from convmf_core.topn import top_n
from tasks.pyfunc import ConvMFPyfunc
from tasks.registry import log_model_version
from tests.pipeline_support import new_storage, tiny_convmf

MODEL_NAME = "convmf-serving-test"
NEW_USER = 99_999

# MLflow 3.17's input handling compares DataFrame columns with a range, which pandas 3.1 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Operation with range is deprecated")


@dataclass(frozen=True)
class Champion:
    """The trained model, what it was trained on, and the champion loaded back through MLflow."""

    model: ConvMF
    user_map: IdMap
    item_map: IdMap
    train: Ratings
    vocabulary: Vocabulary
    texts: list[str]
    served: PyFuncModel
    tracking_uri: str
    home: Path


@pytest.fixture(scope="module")
def champion(mlflow_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Champion]:
    """A tiny ConvMF logged as ``models:/convmf-serving-test@champion`` in a private store (once per module)."""
    home = tmp_path_factory.mktemp("serving")
    tiny = tiny_convmf(home)
    model, user_map, item_map, split, texts, vocabulary = (tiny.model, tiny.user_map, tiny.item_map, tiny.split,
                                                            tiny.texts, tiny.vocabulary)
    bundle, seen = tiny.bundle_dir, tiny.seen
    uri = new_storage(mlflow_template, home).resolved_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_REGISTRY_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            experiment = mlflow.create_experiment("serving-test", artifact_location=(home / "artifacts").as_uri())
            with mlflow.start_run(experiment_id=experiment) as run:
                info = log_model_version(bundle, model_name=MODEL_NAME, run_id=run.info.run_id, tags={}, seen=seen)
            MlflowClient().set_registered_model_alias(MODEL_NAME, "champion", info.version)
            served = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
            yield Champion(model, user_map, item_map, split.train, vocabulary, texts, served, uri, home)
        finally:
            mlflow.set_registry_uri(None)
            mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def server(champion: Champion) -> Iterator[Server]:
    """``mlflow models serve -m models:/<name>@champion --env-manager local`` on a free loopback port."""
    started = start_server(f"models:/{MODEL_NAME}@champion", champion.tracking_uri, champion.home / "server.log",
                           timeout_s=300)
    try:
        yield started
    finally:
        stop_server(started)
        assert started.process.poll() is not None and not live_group_members(started.process.pid)


# --- helpers ---------------------------------------------------------------------------------------------------------


def _expected_top(champion: Champion, users: UserFactors, exclude: list[list[int]], n: int,
                  extra_items: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-n items and scores of explicit user rows, computed with the library alone."""
    sf = champion.model.scoring_factors()
    items = sf.item if extra_items is None else torch.cat([sf.item, extra_items])
    rows = np.repeat(np.arange(len(exclude)), [len(e) for e in exclude])
    cols = np.concatenate([np.asarray(e, dtype=np.int64) for e in exclude])
    csr = Ratings(rows, cols, np.ones(len(cols)), len(exclude), items.shape[0]).csr()
    result = top_n(users.scoring_rows(), items, np.arange(len(exclude)), n, offset=sf.offset, exclude=csr)
    return result.items, result.scores


def _trained_items(champion: Champion, user: int) -> np.ndarray:
    return champion.train.items[champion.train.users == user]


# --- fold-in and new items through mlflow.pyfunc.load_model ----------------------------------------------------------


def test_a_new_user_gets_the_eq7_fold_in_list(champion: Champion) -> None:
    items = np.array([3, 17, 42])
    values = np.array([5.0, 4.0, 1.0], dtype=np.float32)
    raw_items = champion.item_map.to_raw(items)
    request_frame = pd.DataFrame({"user_id": [NEW_USER] * 3, "item_id": raw_items, "rating": values, "n": [7] * 3})
    top = champion.served.predict(request_frame)
    assert list(top.columns) == ["user_id", "rank", "item_id", "score"]
    assert top["user_id"].tolist() == [NEW_USER] * 7 and top["rank"].tolist() == list(range(1, 8))
    assert not set(top["item_id"]) & set(raw_items.tolist())  # rated in the request: left out
    folded = fold_in_users(ItemSide.of(champion.model), Ratings(np.zeros(3), items, values, 1, len(champion.item_map)))
    want_items, want_scores = _expected_top(champion, folded, [items.tolist()], 7)
    assert top["item_id"].tolist() == champion.item_map.to_raw(want_items[0]).tolist()
    np.testing.assert_allclose(top["score"].to_numpy(), want_scores[0], rtol=1e-5, atol=1e-5)
    # Not the average user's list: the ratings matter.
    average = champion.served.predict(pd.DataFrame({"user_id": [NEW_USER], "n": [7]}))
    assert average["item_id"].tolist() != top["item_id"].tolist() or not np.allclose(average["score"], top["score"])
    # Two users in one request, string ids for an int-id model, a pair rated twice keeps its last rating.
    twice = pd.DataFrame({"user_id": ["123456", "123456", "123456", "123456", "777777"],
                          "item_id": [str(i) for i in raw_items] + [str(raw_items[0]), str(raw_items[1])],
                          "rating": [1.0, 4.0, 1.0, 5.0, 2.0]})
    both = champion.served.predict(twice)
    assert both["user_id"].tolist() == [123456] * 10 + [777777] * 10
    same = champion.served.predict(request_frame.assign(user_id=123456, n=10))
    assert both["item_id"].tolist()[:10] == same["item_id"].tolist()


def test_a_known_users_new_ratings_add_to_what_the_model_knows(champion: Champion) -> None:
    user = 5
    raw_user = champion.user_map.raw_ids[user]
    trained = _trained_items(champion, user)
    fresh = np.setdiff1d(np.arange(len(champion.item_map)), trained)[:2]
    values = np.array([5.0, 5.0], dtype=np.float32)
    top = champion.served.predict(pd.DataFrame({"user_id": [raw_user] * 2,
                                                "item_id": champion.item_map.to_raw(fresh), "rating": values,
                                                "n": [10, 10]}))
    model = champion.model
    previous = UserFactors.of_model(model, np.array([user]))  # every posterior draw's u_i
    history = Ratings(np.zeros(len(trained)), trained, np.ones(len(trained)), 1, len(champion.item_map)).csr()
    folded = fold_in_users(ItemSide.of(model), Ratings(np.zeros(2), fresh, values, 1, len(champion.item_map)),
                           previous=previous, history=history)
    want_items, want_scores = _expected_top(champion, folded, [trained.tolist() + fresh.tolist()], 10)
    assert top["item_id"].tolist() == champion.item_map.to_raw(want_items[0]).tolist()
    np.testing.assert_allclose(top["score"].to_numpy(), want_scores[0], rtol=1e-5, atol=1e-5)
    excluded = set(champion.item_map.to_raw(np.concatenate([trained, fresh])).tolist())
    assert not excluded & set(top["item_id"])
    # Two fives pull the user's predicted ratings of those items up from what the model had.
    before = champion.served.predict(pd.DataFrame({"user_id": [raw_user] * 2,
                                                   "item_id": champion.item_map.to_raw(fresh)}))["prediction"]
    after = (folded.scoring_rows() @ model.scoring_factors().item[torch.as_tensor(fresh)].T + model.global_mean_)
    assert (after.numpy()[0] > before.to_numpy()).all()


def test_new_items_are_scored_from_their_text(champion: Champion) -> None:
    model, n_items = champion.model, len(champion.item_map)
    descriptions = [champion.texts[0] + " " + champion.texts[1], champion.texts[2]]
    new_ids = [5001, 5002]
    user = int(champion.user_map.raw_ids[0])
    described = pd.DataFrame({"user_id": [None, None], "item_id": new_ids, "description": descriptions})
    # Top-N over every item: the new items are candidates with v_j = theta_j, c_j = 0.
    frame = pd.concat([pd.DataFrame({"user_id": [user], "n": [n_items + 2]}), described], ignore_index=True)
    top = champion.served.predict(frame)
    assert set(new_ids) <= set(top["item_id"])
    new = embed_new_items(model, descriptions, champion.vocabulary)
    users = UserFactors.of_model(model, np.array([0]))
    want_items, want_scores = _expected_top(champion, users, [_trained_items(champion, 0).tolist()], n_items + 2,
                                            new.scoring_rows())
    raw = np.concatenate([champion.item_map.raw_ids.astype(object), np.array(new_ids, dtype=object)])
    keep = want_items[0] >= 0
    assert top["item_id"].tolist() == raw[want_items[0][keep]].tolist()
    np.testing.assert_allclose(top["score"].to_numpy(), want_scores[0][keep], rtol=1e-5, atol=1e-5)
    # Rating prediction of a new item: mu + [u, b, 1] . [theta, 1, 0], clipped to the rating range.
    rated = champion.served.predict(pd.concat([pd.DataFrame({"user_id": [user], "item_id": [5002]}), described],
                                              ignore_index=True))
    want = float((users.scoring_rows() @ new.scoring_rows()[1]).item() + model.global_mean_)
    assert rated["item_id"].tolist() == [5002]
    assert rated["prediction"].iloc[0] == pytest.approx(float(np.clip(want, *model.rating_range_)), rel=1e-5)
    # A new user may rate a new item in the same request; it is then left out of the list.
    fold = pd.concat([pd.DataFrame({"user_id": [NEW_USER] * 2, "item_id": [5001, int(champion.item_map.raw_ids[3])],
                                    "rating": [5.0, 2.0]}), described], ignore_index=True)
    listed = champion.served.predict(fold)
    assert len(listed) == 10 and 5001 not in set(listed["item_id"])
    # A description of an item the model knows is ignored: its trained factors stand.
    known = pd.DataFrame({"user_id": [user, None], "item_id": [None, int(champion.item_map.raw_ids[0])],
                          "description": [None, "some other words"]})
    plain = champion.served.predict(pd.DataFrame({"user_id": [user]}))
    assert champion.served.predict(known)["item_id"].tolist() == plain["item_id"].tolist()


@pytest.mark.parametrize("rows, message", [
    ([{"user_id": 1, "item_id": 3, "rating": 4.0}, {"user_id": 1, "item_id": 4}], "rating is missing"),
    ([{"user_id": 1, "item_id": 3, "rating": 1000.0}], "rating range"),
    ([{"user_id": 1, "item_id": 3, "rating": float("nan")}, {"user_id": 1, "item_id": 4, "rating": 3.0}],
     "rating is missing"),
    ([{"user_id": 1, "item_id": 3, "rating": True}], "boolean"),
    ([{"user_id": 1, "item_id": 3, "rating": "great"}], "rating must be a finite number"),
    ([{"user_id": 1, "item_id": 3, "rating": 4.0, "n": 0}], "n must be"),
    ([{"user_id": 1}, {"user_id": 2, "item_id": 5001, "description": "a film"}], "leave its user_id empty"),
    ([{"user_id": 1}, {"item_id": 5001, "description": 42}], "description must be text"),
    ([{"user_id": 1}, {"item_id": 5001, "description": "a"}, {"item_id": 5001, "description": "b"}],
     "described twice"),
    ([{"user_id": 1}, {"item_id": "not-an-int", "description": "a film"}], "integer ids"),
    ([{"user_id": None, "item_id": 5001, "description": "a film"}], "no user row"),
    ([{"user_id": 1, "n": 3.5}], "n must be"),
    ([{"user_id": 1, "n": "ten"}], "n must be"),
    ([{"user_id": 1, "n": 10 ** 12}], "n must be"),
    ([{"user_id": 2 ** 70}], "integer ids"),
])
def test_malformed_fold_in_and_description_requests_raise(champion: Champion, rows: list[dict], message: str) -> None:
    with pytest.raises(MlflowException, match=message) as excinfo:
        champion.served.predict(pd.DataFrame(rows))
    assert excinfo.value.get_http_status_code() == 400


def test_request_size_limits_and_unknown_items(champion: Champion) -> None:
    many = pd.DataFrame({"user_id": [1] * 10_001, "item_id": [int(champion.item_map.raw_ids[0])] * 10_001,
                         "rating": [3.0] * 10_001})
    with pytest.raises(MlflowException, match="at most 10000 ratings"):
        champion.served.predict(many)
    described = pd.DataFrame({"user_id": [1] + [None] * 1001, "item_id": [None] + list(range(6000, 7001)),
                              "description": [None] + ["words"] * 1001})
    with pytest.raises(MlflowException, match="at most 1000 items"):
        champion.served.predict(described)
    # Fold-in ratings of items nobody knows are ignored (fallback) or refused (error).
    known_item = int(champion.item_map.raw_ids[3])
    frame = pd.DataFrame({"user_id": [NEW_USER] * 2, "item_id": [known_item, 123_456], "rating": [5.0, 1.0]})
    alone = pd.DataFrame({"user_id": [NEW_USER], "item_id": [known_item], "rating": [5.0]})
    assert champion.served.predict(frame)["item_id"].tolist() == champion.served.predict(alone)["item_id"].tolist()
    with pytest.raises(MlflowException, match="unknown item_id"):
        champion.served.predict(frame, params={"unknown_ids": "error"})
    # ... while the fold-in user itself may be unknown under "error": being new is what fold-in is for.
    assert len(champion.served.predict(alone, params={"unknown_ids": "error"})) == 10


# --- the real scoring server ------------------------------------------------------------------------------------------


def test_served_champion_answers_valid_requests(server: Server, champion: Champion) -> None:
    user = int(champion.user_map.raw_ids[0])
    item = int(champion.item_map.raw_ids[3])
    status, body = invoke(server.port, {"dataframe_split": {"columns": ["user_id", "n"], "data": [[user, 3]]}})
    assert status == 200, body
    local = champion.served.predict(pd.DataFrame({"user_id": [user], "n": [3]}))
    assert [r["item_id"] for r in body["predictions"]] == local["item_id"].tolist()
    assert [r["rank"] for r in body["predictions"]] == [1, 2, 3]

    twice = [{"user_id": user, "n": 2}, {"user_id": str(user), "n": 4}]
    status, body = invoke(server.port, {"dataframe_records": twice})
    assert status == 200 and [r["rank"] for r in body["predictions"]] == [1, 2, 3, 4]  # one list, the larger n

    status, body = invoke(server.port, {"dataframe_records": [{"user_id": user, "item_id": item}]})
    assert status == 200 and list(body["predictions"][0]) == ["user_id", "item_id", "prediction"]
    want = champion.served.predict(pd.DataFrame({"user_id": [user], "item_id": [item]}))["prediction"].iloc[0]
    assert body["predictions"][0]["prediction"] == pytest.approx(float(want), rel=1e-6)

    fold = [{"user_id": NEW_USER, "item_id": item, "rating": 5, "n": 5},
            {"user_id": NEW_USER, "item_id": int(champion.item_map.raw_ids[7]), "rating": 2}]
    status, body = invoke(server.port, {"dataframe_records": fold})
    assert status == 200, body
    local = champion.served.predict(pd.DataFrame(fold))
    assert [(r["user_id"], r["item_id"]) for r in body["predictions"]] == list(zip(local["user_id"], local["item_id"]))
    assert len(body["predictions"]) == 5

    described = {"dataframe_split": {"columns": ["user_id", "item_id", "n", "description"],
                                     "data": [[user, None, len(champion.item_map) + 1, None],
                                              [None, 5001, None, champion.texts[4]]]}}
    status, body = invoke(server.port, described)
    assert status == 200, body
    assert 5001 in {r["item_id"] for r in body["predictions"]}

    # The benchmark's mix of valid bodies: every one answers 200 with predictions.
    for kind, payload in valid_bodies(champion.user_map.raw_ids[:2], champion.item_map.raw_ids[:10], 5001,
                                      champion.texts[4]):
        status, raw = request(server.port, "POST", "/invocations", payload)
        assert status == 200 and json.loads(raw)["predictions"], (kind, raw[:300])


def test_served_champion_refuses_malformed_bodies_with_4xx(server: Server, champion: Champion) -> None:
    cases = malformed_bodies(champion.user_map.raw_ids[0], champion.item_map.raw_ids[0])
    answers = {name: request(server.port, "POST", "/invocations", body, content_type=ctype)
               for name, body, ctype in cases}
    not_4xx = {name: (status, raw[:200]) for name, (status, raw) in answers.items() if not 400 <= status < 500}
    assert not not_4xx
    assert request(server.port, "GET", "/ping", None)[0] == 200  # still serving


# --- the pyfunc on its own: other model kinds, string ids ------------------------------------------------------------


def _pyfunc(bundle: Path, seen: Path | None = None) -> ConvMFPyfunc:
    model = ConvMFPyfunc()
    artifacts = {"bundle": str(bundle), **({"seen": str(seen)} if seen else {})}
    model.load_context(mlflow.pyfunc.PythonModelContext(artifacts=artifacts, model_config={}))
    return model


def test_other_model_kinds_and_string_ids(fitted: dict, catalogue, tmp_path: Path) -> None:
    user_map = IdMap(np.asarray([f"u{u}" for u in range(len(catalogue.user_map))]))
    item_map = IdMap(np.asarray([f"item-{i}" for i in range(len(catalogue.item_map))]))
    fold = pd.DataFrame({"user_id": ["someone-new"] * 2, "item_id": ["item-1", "item-2"], "rating": [5, 4]})
    described = pd.DataFrame({"user_id": ["u0", None], "item_id": [None, "item-new"], "description": [None, "words"]})
    # PMF: fold-in works (eq. 7 against its V), but it has no CNN to read descriptions.
    pmf = _pyfunc(save_model(fitted["pmf"].model, tmp_path / "pmf", user_map=user_map, item_map=item_map))
    top = pmf.predict(None, fold)
    folded = fold_in_users(ItemSide.of(fitted["pmf"].model),
                           Ratings(np.zeros(2), np.array([1, 2]), np.array([5.0, 4.0]), 1, len(item_map)))
    sf = fitted["pmf"].model.scoring_factors()
    want = top_n(folded.scoring_rows(), sf.item, np.array([0]), 10, offset=sf.offset,
                 exclude=Ratings(np.zeros(2), np.array([1, 2]), np.ones(2), 1, len(item_map)).csr())
    assert top["user_id"].tolist() == ["someone-new"] * 10
    assert top["item_id"].tolist() == item_map.to_raw(want.items[0]).tolist()
    with pytest.raises(MlflowException, match="no text CNN"):
        pmf.predict(None, described)
    # SGD MF has no lambda_U: fold-in is refused with a 400, plain top-N still works.
    sgd = _pyfunc(save_model(fitted["sgd"].model, tmp_path / "sgd", user_map=user_map, item_map=item_map))
    with pytest.raises(MlflowException, match="cannot fold users in") as excinfo:
        sgd.predict(None, fold)
    assert excinfo.value.get_http_status_code() == 400
    assert len(sgd.predict(None, pd.DataFrame({"user_id": ["u0"]}))) == 10
    # ConvMF with string ids: a new item with a string id is scored from its text; ints convert to strings.
    convmf = _pyfunc(save_model(fitted["convmf"].model, tmp_path / "convmf", vocabulary=catalogue.vocabulary,
                                user_map=user_map, item_map=item_map))
    listed = convmf.predict(None, described.assign(n=[len(item_map) + 1, None]))
    assert "item-new" in set(listed["item_id"]) and set(listed["user_id"]) == {"u0"}
    numeric = pd.DataFrame({"user_id": [7, 7], "item_id": ["item-1", "item-2"], "rating": [5.0, 4.0]})
    assert set(convmf.predict(None, numeric)["user_id"]) == {"7"}


@pytest.mark.parametrize("encoder", ["linear", "cnn"])
def test_the_served_model_of_either_encoder_folds_in_users_and_reads_new_descriptions(
        encoder: str, catalogue, split, convmf_config, tmp_path: Path) -> None:
    """Either text encoder, with posterior averaging, served through the pyfunc: a new user's list is the per-draw
    eq. 7 fold-in scored against the stacked model, and a new item's prediction is mu + the mean over draws of
    [u, b, 1] . [theta, 1, theta^c]."""
    config = dataclasses.replace(convmf_config, encoder=encoder, word_vectors=None,
                                 als=dataclasses.replace(convmf_config.als, gibbs=GibbsConfig(samples=4, burn_in=2),
                                                         fallback=False))  # the draws must be kept, however tiny
    model = ConvMF(config).fit(split.train, split.validation, documents=catalogue.documents,
                               vocabulary=catalogue.vocabulary)
    assert model.samples_ is not None and model.samples_.n_samples == 4
    served = _pyfunc(save_model(model, tmp_path / encoder, vocabulary=catalogue.vocabulary,
                                user_map=catalogue.user_map, item_map=catalogue.item_map))
    items = np.array([1, 2, 3])
    ratings = np.array([5.0, 1.0, 4.0], dtype=np.float32)
    top = served.predict(None, pd.DataFrame({"user_id": [10**6] * 3,
                                             "item_id": catalogue.item_map.to_raw(items), "rating": ratings}))
    folded = fold_in_users(ItemSide.of(model), Ratings(np.zeros(3), items, ratings, 1, len(catalogue.item_map)))
    assert folded.factor_samples.shape == (4, 1, config.als.n_factors)
    sf = model.scoring_factors()
    want = top_n(folded.scoring_rows(), sf.item, np.array([0]), 10, offset=sf.offset,
                 exclude=Ratings(np.zeros(3), items, np.ones(3), 1, len(catalogue.item_map)).csr())
    assert top["item_id"].tolist() == catalogue.item_map.to_raw(want.items[0]).tolist()
    # A new item described in the request: scored from its text through the encoder (and the bias channel).
    user = catalogue.user_map.raw_ids[0]
    text = catalogue.texts[5]
    rated = served.predict(None, pd.DataFrame({"user_id": [user, None], "item_id": [9999, 9999],
                                               "description": [None, text]}))
    prior = model.embed_items(encode_documents([text], catalogue.vocabulary))[0]
    k = config.als.n_factors
    samples = model.samples_
    per_draw = (samples.user[:, 0] @ prior[:k]) + samples.user_bias[:, 0] + prior[k]
    want_rating = float(np.clip(model.global_mean_ + per_draw.mean().item(), *model.rating_range_))
    assert rated["prediction"].iloc[0] == pytest.approx(want_rating, rel=1e-5)
