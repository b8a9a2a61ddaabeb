"""Sharded tokenization benchmark: the vocabulary (document-frequency count) and the encoding of a generated
catalogue far larger than ML-100K, through the training flow's own shard path, single-process and mapped over item
shards on the thread runner and on Dask LocalClusters of 1 and 2 worker processes.

Not run by CI. Defaults: 200k descriptions of 80 words (Zipf-distributed over a 50k-word lexicon), 20k items per
shard::

    .venv/bin/python benchmarks/tokenize_scale.py --items 200000

The baseline is the library called directly in one process (``build_vocabulary`` + ``encode_documents``, no file
read or written). The other rows run ``flows.training.tokenize_shards`` (``count_terms_shard`` and ``encode_shard`` mapped over the shards,
``merge_vocabulary`` and ``write_tokens``) on the runner ``flows.scoring.shard_task_runner`` builds from
``TokenizeParams``, against a throwaway Prefect server; each writes its own cache entry (no cache hit). A Dask
row's time includes starting its local cluster (the flow pays it too); the start alone is measured separately. The
row "flow, one shard" is the same subflow with the whole catalogue in one shard: the flow's own cost (reading the
descriptions, Prefect tasks, writing the Parquet cache entry) without any sharding. Each row checks that its
vocabulary and documents are identical to the baseline's.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
for _key, _value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                     "DO_NOT_TRACK": "1", "PREFECT_LOGGING_LEVEL": "WARNING"}.items():
    os.environ.setdefault(_key, _value)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def make_catalogue(workdir: Path, n_items: int, words: int, lexicon: int, seed: int = 0):
    """Write ``items.parquet`` and ``ratings.parquet`` (one rating per item) and return the ingest record."""
    from convmf_core.ingest import write_parquet_atomic
    from convmf_core.schemas import ITEMS_SCHEMA, RATINGS_SCHEMA
    from tasks.ingest import IngestedData

    rng = np.random.default_rng(seed)
    vocab = np.asarray([f"w{i}x" for i in range(lexicon)], dtype=object)
    draws = np.minimum(rng.zipf(1.15, size=(n_items, words)) - 1, lexicon - 1)
    texts = [" ".join(vocab[row]) for row in draws]
    ids = [f"i{j}" for j in range(n_items)]
    items = pd.DataFrame({"item_id": ids, "title": None, "text": texts})
    ratings = pd.DataFrame({"user_id": "u0", "item_id": ids, "rating": np.float32(3.0),
                            "timestamp": pd.array(np.arange(n_items), dtype="Int64")})
    return IngestedData(write_parquet_atomic(ratings, workdir / "ratings.parquet", RATINGS_SCHEMA),
                        write_parquet_atomic(items, workdir / "items.parquet", ITEMS_SCHEMA),
                        workdir / "quarantine.parquet", f"bench-{n_items}-{words}-{seed}",
                        {"items": {"rows_accepted": n_items}}), texts


def main() -> None:
    """Run every configuration and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--words", type=int, default=80, help="words per description")
    parser.add_argument("--lexicon", type=int, default=50_000)
    parser.add_argument("--items-per-shard", type=int, default=20_000)
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    from convmf_core.config import TextConfig
    from convmf_core.text import build_vocabulary, encode_documents
    from flows.params import TokenizeParams
    from flows.scoring import shard_task_runner
    from flows.training import tokenize_shards
    from tasks.tokenize import TokenizedData, VocabularySource

    text = TextConfig()
    with tempfile.TemporaryDirectory(prefix="tokenize-scale-") as tmp:
        work = Path(tmp)
        ingested, texts = make_catalogue(work, args.items, args.words, args.lexicon)
        t0 = time.perf_counter()
        vocabulary = build_vocabulary(texts, text)
        documents = encode_documents(texts, vocabulary, text.max_length)
        baseline = time.perf_counter() - t0
        rows = [("single process (library)", "1 x 1", baseline, True)]
        configs = [("flow, one shard", TokenizeParams(items_per_shard=args.items, threads=1), "1 x 1"),
                   ("threads", TokenizeParams(items_per_shard=args.items_per_shard, threads=2), "1 x 2"),
                   ("dask-1", TokenizeParams(items_per_shard=args.items_per_shard, task_runner="dask",
                                             dask_workers=1), "1 x 1"),
                   ("dask-2", TokenizeParams(items_per_shard=args.items_per_shard, task_runner="dask",
                                             dask_workers=2), "2 x 1")]
        with prefect_test_harness():
            from distributed import LocalCluster

            t0 = time.perf_counter()
            with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None):
                cluster_start = time.perf_counter() - t0
            for name, runner, shape in configs:
                cache = TokenizedData(work / name / "tokens", name, False)
                run = tokenize_shards.with_options(task_runner=shard_task_runner(runner))
                t0 = time.perf_counter()
                out = run(ingested, text, VocabularySource(), runner.items_per_shard, cache)
                seconds = time.perf_counter() - t0
                _, docs, vocab = out.load()
                rows.append((name, shape, seconds, vocab.words == vocabulary.words and docs == documents))

    print(f"\n{args.items:,} descriptions x {args.words} words (lexicon {args.lexicon:,}), "
          f"{args.items_per_shard:,} items per shard; vocabulary {len(vocabulary):,} words; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end; a 2-worker LocalCluster starts in {cluster_start:.1f} s\n")
    print("| configuration | processes x threads | seconds | items/s | vs single process | identical |")
    print("|---|---|---:|---:|---:|---|")
    for name, shape, seconds, same in rows:
        print(f"| {name} | {shape} | {seconds:.1f} | {args.items / seconds:,.0f} | {baseline / seconds:.2f} | "
              f"{'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
