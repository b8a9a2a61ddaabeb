"""Tests of the planted-structure synthetic catalogue (convmf_core.synthetic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from convmf_core.synthetic import FILLER_WORDS, SyntheticConfig, SyntheticData, generate_catalogue, write_catalogue


@pytest.fixture(scope="module")
def data() -> SyntheticData:
    return generate_catalogue()


def test_schema_and_ids(data: SyntheticData) -> None:
    cfg = data.config
    r, items = data.ratings, data.items
    assert list(r.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert [str(t) for t in r.dtypes] == ["int64", "int64", "float32", "int64"]
    assert list(items.columns) == ["item_id", "title", "description"]
    assert items["item_id"].dtype == np.int64
    assert items["item_id"].tolist() == list(range(1, cfg.n_items + 1))
    assert items["description"].map(type).eq(str).all() and items["title"].map(type).eq(str).all()
    assert (items["title"].str.len() > 0).all()
    assert r["user_id"].between(1, cfg.n_users).all() and r["item_id"].between(1, cfg.n_items).all()
    assert r["user_id"].nunique() == cfg.n_users
    assert r.groupby("user_id").size().min() >= cfg.min_ratings_per_user
    assert data.item_topics.shape == (cfg.n_items, cfg.n_topics)
    assert data.user_preferences.shape == (cfg.n_users, cfg.n_topics)
    np.testing.assert_allclose(data.item_topics.sum(axis=1), 1.0)
    span = int(cfg.time_span_days * 86_400)
    assert r["timestamp"].between(cfg.start_timestamp, cfg.start_timestamp + span - 1).all()
    assert r["timestamp"].max() - r["timestamp"].min() > span * 0.9


def test_deterministic_for_a_seed_and_different_for_another() -> None:
    a, b = generate_catalogue(SyntheticConfig(seed=3)), generate_catalogue(SyntheticConfig(seed=3))
    pd.testing.assert_frame_equal(a.ratings, b.ratings)
    pd.testing.assert_frame_equal(a.items, b.items)
    np.testing.assert_array_equal(a.item_topics, b.item_topics)
    np.testing.assert_array_equal(a.user_preferences, b.user_preferences)
    assert a.topic_words == b.topic_words
    c = generate_catalogue(SyntheticConfig(seed=4))
    assert not a.ratings.equals(c.ratings)
    assert not a.items["description"].equals(c.items["description"])
    assert not np.array_equal(a.item_topics, c.item_topics)


def test_no_duplicate_pairs(data: SyntheticData) -> None:
    assert not data.ratings.duplicated(["user_id", "item_id"]).any()
    big = generate_catalogue(SyntheticConfig(n_users=500, n_items=60, ratings_per_user=50, seed=1))
    assert not big.ratings.duplicated(["user_id", "item_id"]).any()  # counts capped at the ratable items


def test_ratings_range_and_spread(data: SyntheticData) -> None:
    rating = data.ratings["rating"]
    assert rating.between(1, 5).all()
    assert set(np.unique(rating)) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert rating.std() > 0.7
    assert 3.2 < rating.mean() < 3.8


def test_shares_of_no_text_and_unrated_items() -> None:
    cfg = SyntheticConfig(n_users=200, n_items=1000, share_without_text=0.1, share_unrated=0.08, seed=2)
    d = generate_catalogue(cfg)
    no_text = d.items.loc[d.items["description"] == "", "item_id"]
    rated = set(d.ratings["item_id"])
    unrated = d.items.loc[~d.items["item_id"].isin(rated), "item_id"]
    assert len(no_text) == pytest.approx(100, abs=2)
    assert len(unrated) == pytest.approx(80, abs=2)
    # Unrated items are described cold-start items; items without text are rated.
    assert (d.items.set_index("item_id").loc[unrated, "description"].str.len() > 0).all()
    assert set(no_text) <= rated


def test_unrated_items_have_descriptions_default(data: SyntheticData) -> None:
    rated = set(data.ratings["item_id"])
    unrated = data.items[~data.items["item_id"].isin(rated)]
    assert len(unrated) == round(0.05 * data.config.n_items)
    assert (unrated["description"].str.split().str.len() >= 1).all()
    assert (data.items["description"] == "").sum() == round(0.05 * data.config.n_items)


def test_topic_words_are_distinct_made_up_words(data: SyntheticData) -> None:
    words = [w for topic in data.topic_words for w in topic]
    assert len(data.topic_words) == data.config.n_topics
    assert all(len(t) == data.config.words_per_topic for t in data.topic_words)
    assert len(set(words)) == len(words)
    assert all(w.isalpha() and w.islower() and len(w) >= 6 for w in words)
    assert not set(words) & set(FILLER_WORDS)
    assert len(set(FILLER_WORDS)) == len(FILLER_WORDS)


def test_descriptions_carry_the_topic_signal(data: SyntheticData) -> None:
    items = data.items
    text = items["description"] != ""
    docs = items.loc[text, "description"].str.split().tolist()
    dominant = data.item_topics[text.to_numpy()].argmax(axis=1)
    vocab = {w: i for i, w in enumerate(sorted({w for d in docs for w in d}))}
    x = np.zeros((len(docs), len(vocab)))
    for row, doc in enumerate(docs):
        x[row, [vocab[w] for w in set(doc)]] = 1.0
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    same = dominant[:, None] == dominant[None, :]
    off_diagonal = ~np.eye(len(docs), dtype=bool)
    within, between = sim[same & off_diagonal].mean(), sim[~same].mean()
    assert within > between + 0.1, (within, between)
    # The words of an item's dominant topic are the most frequent topic words in its description.
    topic_of = {w: t for t, ws in enumerate(data.topic_words) for w in ws}
    hits = 0
    for doc, dom in zip(docs, dominant):
        counts = np.bincount([topic_of[w] for w in doc if w in topic_of], minlength=data.config.n_topics)
        hits += int(counts.argmax() == dom)
    assert hits / len(docs) > 0.8


def test_users_prefer_their_favourite_topic(data: SyntheticData) -> None:
    r = data.ratings
    users = r["user_id"].to_numpy() - 1
    dominant = data.item_topics.argmax(axis=1)[r["item_id"].to_numpy() - 1]
    favourite = data.user_preferences.argmax(axis=1)[users]
    least = data.user_preferences.argmin(axis=1)[users]
    rating = r["rating"].to_numpy()
    fav_mean, least_mean = rating[dominant == favourite].mean(), rating[dominant == least].mean()
    assert fav_mean > least_mean + 1.0, (fav_mean, least_mean)


def test_write_catalogue_round_trip(data: SyntheticData, tmp_path: Path) -> None:
    paths = write_catalogue(data, tmp_path / "catalogue")
    assert set(paths) == {"ratings", "items"}
    assert paths["ratings"].name == "ratings.csv" and paths["items"].name == "items.csv"
    assert sorted(p.name for p in (tmp_path / "catalogue").iterdir()) == ["items.csv", "ratings.csv"]  # no temp left
    ratings = pd.read_csv(paths["ratings"])
    pd.testing.assert_frame_equal(ratings.astype({"rating": np.float32}), data.ratings)
    items = pd.read_csv(paths["items"], keep_default_na=False, dtype={"title": "str", "description": "str"})
    pd.testing.assert_frame_equal(items, data.items)
    # Overwriting in place works too.
    write_catalogue(data, tmp_path / "catalogue")
    pd.testing.assert_frame_equal(pd.read_csv(paths["ratings"]).astype({"rating": np.float32}), data.ratings)


def test_invalid_config_rejected() -> None:
    with pytest.raises(ValueError):
        SyntheticConfig(share_without_text=0.6, share_unrated=0.5)
    with pytest.raises(ValueError):
        SyntheticConfig(n_users=0)
    with pytest.raises(ValueError):
        SyntheticConfig(words_per_topic=1)
