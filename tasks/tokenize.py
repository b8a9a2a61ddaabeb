"""Prefect tasks: the vocabulary and encoded documents, cached on the data hash, the text settings and where the
vocabulary comes from; counted and encoded in shards of items for large catalogues (issue 4).

Where the vocabulary comes from (:class:`VocabularySource`):

* the paper's way (random split): built from every item's description;
* a time-based split: built only from the items rated before the cutoff, so the document frequencies hold nothing
  from the future; items first rated later are encoded with that vocabulary (their unknown words are deleted);
* a warm start: the champion's vocabulary is kept, so the CNN's embedding rows still mean the same words.

The document-frequency count (:func:`count_terms_shard`) and the encoding (:func:`encode_shard`) are mapped over
shards of items by the flow (``flows/training.py``) on the task runner its parameters choose; the merge keeps the
shards' order, so the result is identical to a single-process run (``tests/test_nightly_learning.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from convmf_core.atomic import staging_directory
from convmf_core.config import TextConfig
from convmf_core.text import (Documents, TermCounts, Vocabulary, count_terms, encode_documents, merge_term_counts,
                              vocabulary_from_counts)
from tasks.ingest import IngestedData
from tasks.tracking import RunRef

CORPUS_FILE = "corpus.json"


@dataclass(frozen=True)
class TokenizedData:
    """A cache directory holding ``vocabulary.json``, ``documents.parquet`` (item_id, word_ids) and
    ``corpus.json`` (where the vocabulary came from)."""

    directory: Path
    cache_key: str
    cache_hit: bool

    def load(self) -> tuple[list[str], Documents, Vocabulary]:
        """Item ids (in document order), their encoded documents and the vocabulary."""
        table = pq.read_table(self.directory / "documents.parquet")
        item_ids = table.column("item_id").to_pylist()
        word_ids = table.column("word_ids").combine_chunks()
        offsets = np.asarray(word_ids.offsets, dtype=np.int64)
        ids = np.asarray(word_ids.values, dtype=np.int64)
        vocab = Vocabulary.from_dict(json.loads((self.directory / "vocabulary.json").read_text()))
        return item_ids, Documents(ids[offsets[0]:offsets[-1]], offsets - offsets[0]), vocab


@dataclass(frozen=True)
class VocabularySource:
    """Where the vocabulary comes from: ``given`` (kept from ``given_from``, e.g. the champion) or built from the
    descriptions of the items rated before ``known_before`` (Unix seconds; ``None``: every item, the paper's way)."""

    known_before: int | None = None
    given: Vocabulary | None = field(default=None, compare=False)
    given_from: str | None = None

    def describe(self) -> str:
        """One line for logs and MLflow."""
        if self.given is not None:
            return f"kept from {self.given_from or 'the previous model'} ({len(self.given)} words)"
        if self.known_before is not None:
            return f"built from the items rated before the cutoff ({self.known_before})"
        return "built from every item's description"

    def key(self) -> list:
        """What of the source changes the result: the cutoff, or the given words and settings."""
        if self.given is not None:
            words = hashlib.sha256(json.dumps(self.given.to_dict(), sort_keys=True).encode()).hexdigest()
            return ["given", words]
        return ["known_before", self.known_before]


def tokenize_cache_key(content_hash: str, text: TextConfig, source: VocabularySource = VocabularySource()) -> str:
    """The cache key: the ingested data's hash, every text setting and, unless the vocabulary is built from every
    item (the key of earlier versions), where it comes from."""
    spec: list = [content_hash, asdict(text)]
    if source != VocabularySource() or source.given is not None:
        spec.append(source.key())
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def item_shards(n_items: int, items_per_shard: int) -> list[tuple[int, int]]:
    """Half-open ranges of item rows, ``items_per_shard`` each (the last may be shorter; none for no item)."""
    return [(s, min(n_items, s + items_per_shard)) for s in range(0, n_items, items_per_shard)]


def items_known_before(ratings_path: Path, cutoff: int) -> set[str]:
    """The ids of the items with at least one rating strictly before ``cutoff`` (Unix seconds)."""
    frame = pd.read_parquet(ratings_path, columns=["item_id", "timestamp"])
    early = frame["timestamp"].notna() & (frame["timestamp"].fillna(cutoff) < cutoff)
    return set(frame.loc[early.to_numpy(dtype=bool), "item_id"].astype(str))


@task(name="tokenize-cache", cache_policy=NO_CACHE)
def tokenize_cache(ingested: IngestedData, text: TextConfig, source: VocabularySource, home: Path) -> TokenizedData:
    """The cache entry of this catalogue, text settings and vocabulary source, and whether it is filled already."""
    key = tokenize_cache_key(ingested.content_hash, text, source)
    directory = Path(home) / "tokens" / key
    hit = (directory / "documents.parquet").is_file() and (directory / "vocabulary.json").is_file()
    if hit:
        get_run_logger().info("tokenize cache hit (%s): catalogue, text settings and vocabulary source unchanged",
                              key)
    return TokenizedData(directory, key, hit)


def read_descriptions(ingested: IngestedData, source: VocabularySource) -> tuple[list[str], list[str], np.ndarray]:
    """Every item's id and description in catalogue order, and the rows of the vocabulary's corpus: the items
    rated before ``source.known_before``, every item when it is ``None``, none when the vocabulary is given."""
    items = pd.read_parquet(ingested.items_path, columns=["item_id", "text"])
    item_ids, texts = items["item_id"].astype(str).tolist(), items["text"].tolist()
    if source.given is not None:
        corpus = np.zeros(0, dtype=np.int64)
    elif source.known_before is not None:
        known = items_known_before(ingested.ratings_path, source.known_before)
        corpus = np.flatnonzero(np.fromiter((i in known for i in item_ids), dtype=bool, count=len(item_ids)))
    else:
        corpus = np.arange(len(item_ids), dtype=np.int64)
    return item_ids, texts, corpus


@task(name="count-terms-shard", cache_policy=NO_CACHE)
def count_terms_shard(texts: Sequence[str | None], text: TextConfig) -> TermCounts:
    """The per-document word counts of one shard of the vocabulary's corpus (tokenize, truncate, stop words)."""
    return count_terms(texts, text)


@task(name="merge-vocabulary", cache_policy=NO_CACHE)
def merge_vocabulary(parts: list[TermCounts], text: TextConfig) -> Vocabulary:
    """The vocabulary of the shards' counts, merged in shard order (identical to the single-process build)."""
    return vocabulary_from_counts(merge_term_counts(parts), text)


@task(name="encode-shard", cache_policy=NO_CACHE)
def encode_shard(texts: Sequence[str | None], vocabulary: Vocabulary, max_length: int) -> Documents:
    """One shard of descriptions as word ids of ``vocabulary`` (words outside it deleted)."""
    return encode_documents(texts, vocabulary, max_length)


@task(name="write-tokens", cache_policy=NO_CACHE)
def write_tokens(cache: TokenizedData, item_ids: Sequence[str], source: VocabularySource, corpus_items: int,
                 vocabulary: Vocabulary, parts: list[Documents]) -> TokenizedData:
    """Write the vocabulary and the documents (shards concatenated in order) to the cache entry atomically."""
    docs = Documents.concat(parts)
    if len(docs) != len(item_ids):
        raise RuntimeError(f"tokenize: {len(docs)} encoded documents for {len(item_ids)} items")
    tmp = staging_directory(cache.directory)
    offsets = pa.array(docs.offsets.astype(np.int32))
    word_ids = pa.ListArray.from_arrays(offsets, pa.array(docs.ids.astype(np.int32)))
    pq.write_table(pa.table({"item_id": pa.array(list(item_ids), pa.string()), "word_ids": word_ids}),
                   tmp / "documents.parquet")
    (tmp / "vocabulary.json").write_text(json.dumps(vocabulary.to_dict()))
    (tmp / CORPUS_FILE).write_text(json.dumps({"source": source.describe(), "known_before": source.known_before,
                                               "corpus_items": corpus_items, "items": len(item_ids)}))
    try:
        os.replace(tmp, cache.directory)
    except OSError:  # another run filled the cache first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    get_run_logger().info("tokenized %d descriptions in %d shard(s): vocabulary of %d words (%s; corpus of %d "
                          "items), %.1f words per document", len(docs), len(parts), len(vocabulary),
                          source.describe(), corpus_items, float(docs.lengths().mean()) if len(docs) else 0.0)
    return TokenizedData(cache.directory, cache.cache_key, False)


@task(name="log-tokenized", cache_policy=NO_CACHE)
def log_tokenized(tokenized: TokenizedData, text: TextConfig, source: VocabularySource, run: RunRef) -> TokenizedData:
    """Log the vocabulary's size and source, and the documents' figures, to the MLflow run."""
    _, docs, vocab = tokenized.load()
    corpus_file = tokenized.directory / CORPUS_FILE
    corpus = json.loads(corpus_file.read_text()) if corpus_file.is_file() else {}
    run.log_params({"vocabulary_size": len(vocab), "text_max_length": text.max_length, "text_max_df": text.max_df,
                    "text_vocab_size": text.vocab_size, "vocabulary_source": source.describe()[:500]})
    with_text = docs.has_text()
    run.log_metrics({"items_with_text": int(with_text.sum()),
                     "mean_document_length": float(docs.lengths()[with_text].mean()) if with_text.any() else 0.0,
                     **({"vocabulary_corpus_items": corpus["corpus_items"]} if "corpus_items" in corpus else {})})
    run.set_tags({"tokenize_cache_hit": str(tokenized.cache_hit), "tokenize_key": tokenized.cache_key})
    return tokenized
