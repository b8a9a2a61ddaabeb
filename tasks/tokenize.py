"""Prefect task: the vocabulary and encoded documents, cached on the data hash and the text settings."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger, task

from convmf_core.atomic import staging_directory
from convmf_core.config import TextConfig
from convmf_core.text import Documents, Vocabulary, build_vocabulary, encode_documents
from tasks.ingest import IngestedData
from tasks.tracking import RunRef


@dataclass(frozen=True)
class TokenizedData:
    """A cache directory holding ``vocabulary.json`` and ``documents.parquet`` (item_id, word_ids)."""

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


def tokenize_cache_key(content_hash: str, text: TextConfig) -> str:
    """The cache key: the ingested data's hash plus every text setting."""
    return hashlib.sha256(json.dumps([content_hash, asdict(text)], sort_keys=True).encode()).hexdigest()[:20]


@task(name="tokenize")
def tokenize_items(ingested: IngestedData, text: TextConfig, home: Path, run: RunRef) -> TokenizedData:
    """Build the vocabulary (the paper's preprocessing) and encode every item's description.

    An unchanged catalogue with unchanged settings is not re-tokenized: the result directory is keyed on both.
    """
    logger = get_run_logger()
    key = tokenize_cache_key(ingested.content_hash, text)
    directory = Path(home) / "tokens" / key
    hit = (directory / "documents.parquet").is_file() and (directory / "vocabulary.json").is_file()
    if not hit:
        items = pd.read_parquet(ingested.items_path)
        texts = items["text"].tolist()
        vocab = build_vocabulary(texts, text)
        docs = encode_documents(texts, vocab, text.max_length)
        tmp = staging_directory(directory)
        offsets = pa.array(docs.offsets.astype(np.int32))
        word_ids = pa.ListArray.from_arrays(offsets, pa.array(docs.ids.astype(np.int32)))
        pq.write_table(pa.table({"item_id": pa.array(items["item_id"].tolist(), pa.string()), "word_ids": word_ids}),
                       tmp / "documents.parquet")
        (tmp / "vocabulary.json").write_text(json.dumps(vocab.to_dict()))
        try:
            os.replace(tmp, directory)
        except OSError:  # another run filled the cache first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("tokenized %d descriptions: vocabulary of %d words, %.1f words per document",
                    len(texts), len(vocab), float(docs.lengths().mean()) if len(docs) else 0.0)
    else:
        logger.info("tokenize cache hit (%s): catalogue and text settings unchanged", key)
    _, docs, vocab = TokenizedData(directory, key, hit).load()
    run.log_params({"vocabulary_size": len(vocab), "text_max_length": text.max_length, "text_max_df": text.max_df,
                    "text_vocab_size": text.vocab_size})
    run.log_metrics({"items_with_text": int(docs.has_text().sum()), "mean_document_length":
                     float(docs.lengths()[docs.has_text()].mean()) if docs.has_text().any() else 0.0})
    run.set_tags({"tokenize_cache_hit": str(hit)})
    return TokenizedData(directory, key, hit)
