"""Load MovieLens 100K with item text from ../shared (never copied into the project) for the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from convmf_core.config import TextConfig
from convmf_core.data import IdMap, Split, cold_item_split, random_split, ratings_from_frame, split_given_test
from convmf_core.text import Documents, Vocabulary, build_vocabulary, encode_documents

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k"


@dataclass(frozen=True)
class BenchmarkData:
    """One benchmark setting: a split over dense ids, the item documents and the vocabulary."""

    name: str
    split: Split
    documents: Documents
    vocabulary: Vocabulary
    cold_items: np.ndarray | None = None  # rated items with no training rating (cold-start setting only)


def read_ml100k(directory: Path = DEFAULT_DIR) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``u.data`` in file order and ``items_text.tsv`` with ``text`` = IMDb description + TMDB overview."""
    ratings = pd.read_csv(directory / "u.data", sep="\t", names=["user_id", "item_id", "rating", "timestamp"])
    items = pd.read_csv(directory / "items_text.tsv", sep="\t", keep_default_na=False, quoting=3)
    items["text"] = (items["imdb_description"].astype(str) + " " + items["tmdb_overview"].astype(str)).str.strip()
    return ratings, items[["item_id", "title", "text"]]


def _documents(items: pd.DataFrame, item_map: IdMap, train_item_ids: np.ndarray, text: TextConfig) -> tuple[Documents, Vocabulary]:
    by_id = items.set_index("item_id")["text"]
    texts = [by_id.get(i, "") for i in item_map.raw_ids]
    # The vocabulary is built from the descriptions of the catalogue; ratings play no part in it.
    vocab = build_vocabulary(texts, text)
    return encode_documents(texts, vocab, text.max_length), vocab


def paper_split(directory: Path = DEFAULT_DIR, seed: int = 0, text: TextConfig = TextConfig()) -> BenchmarkData:
    """(a) The paper's protocol: random 80/10/10 of the ratings of items that have text."""
    ratings, items = read_ml100k(directory)
    with_text = set(items.loc[items["text"].str.len() > 0, "item_id"])
    ratings = ratings[ratings["item_id"].isin(with_text)]
    user_map, item_map = IdMap.from_values(ratings["user_id"]), IdMap.from_values(ratings["item_id"])
    split = random_split(ratings_from_frame(ratings, user_map, item_map), (0.8, 0.1, 0.1), seed=seed)
    docs, vocab = _documents(items, item_map, item_map.raw_ids, text)
    return BenchmarkData("ml-100k 80/10/10 (items with text)", split, docs, vocab)


def u1_split(directory: Path = DEFAULT_DIR, seed: int = 0, text: TextConfig = TextConfig()) -> BenchmarkData:
    """(b) GroupLens's canonical u1 split (u1.test = lines 1-20,000 of u.data); validation = 10% of u1.base."""
    ratings, items = read_ml100k(directory)
    user_map, item_map = IdMap.from_values(ratings["user_id"]), IdMap.from_values(ratings["item_id"])
    all_ratings = ratings_from_frame(ratings, user_map, item_map)
    test = all_ratings.subset(np.arange(20_000))
    base = all_ratings.subset(np.arange(20_000, len(all_ratings)))
    split = split_given_test(base, test, validation_fraction=0.1, seed=seed)
    docs, vocab = _documents(items, item_map, item_map.raw_ids, text)
    return BenchmarkData("ml-100k u1.base/u1.test", split, docs, vocab)


def cold_split(directory: Path = DEFAULT_DIR, seed: int = 0, text: TextConfig = TextConfig(),
               cold_fraction: float = 0.1) -> BenchmarkData:
    """(c) Cold start: as (a), but 10% of the items lose all their ratings to validation/test (scored from text)."""
    ratings, items = read_ml100k(directory)
    with_text = set(items.loc[items["text"].str.len() > 0, "item_id"])
    ratings = ratings[ratings["item_id"].isin(with_text)]
    user_map, item_map = IdMap.from_values(ratings["user_id"]), IdMap.from_values(ratings["item_id"])
    split, cold = cold_item_split(ratings_from_frame(ratings, user_map, item_map), cold_fraction, seed=seed)
    docs, vocab = _documents(items, item_map, item_map.raw_ids, text)
    return BenchmarkData(f"ml-100k cold start ({cold_fraction:.0%} of items unseen)", split, docs, vocab, cold)
