"""Helpers shared by the pipeline test modules: a private MLflow store per module, a client bound to it, a tiny
real ConvMF saved as a bundle (for the registry and serving tests), and a child process SIGKILLed mid-run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
from mlflow.tracking import MlflowClient

from convmf_core.config import ALSConfig, CNNConfig, ConvMFConfig, TextConfig
from convmf_core.data import IdMap, Split, random_split, ratings_from_frame
from convmf_core.models.convmf import ConvMF
from convmf_core.persistence import save_model
from convmf_core.synthetic import SyntheticConfig, generate_catalogue
from convmf_core.text import Vocabulary, build_vocabulary, encode_documents

from flows.params import StorageParams


def new_storage(template: Path, home: Path) -> StorageParams:
    """A private MLflow store (a copy of the migrated template) and working directory under ``home``."""
    home.mkdir(parents=True, exist_ok=True)
    db = home / "mlflow.db"
    shutil.copyfile(template, db)
    return StorageParams(home=str(home), tracking_uri=f"sqlite:///{db}")


def client_for(storage: StorageParams) -> MlflowClient:
    """An MLflow client on the store's tracking URI and registry."""
    uri = storage.resolved_tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@dataclass(frozen=True)
class Store:
    """One module's store: its parameters, working directory and client."""

    storage: StorageParams
    home: Path
    client: MlflowClient


def make_store(template: Path, home: Path) -> Store:
    """A :class:`Store` on a fresh copy of the template."""
    storage = new_storage(template, home)
    return Store(storage, home, client_for(storage))


@dataclass(frozen=True)
class TinyConvMF:
    """A tiny real ConvMF fitted on a synthetic catalogue and saved as a bundle; ``seen`` = its training pairs."""

    model: ConvMF
    bundle_dir: Path
    user_map: IdMap
    item_map: IdMap
    split: Split
    texts: list[str]
    vocabulary: Vocabulary
    seen: pd.DataFrame


def tiny_convmf(directory: Path) -> TinyConvMF:
    """Fit a 4-factor ConvMF (2 iterations) on 60 users x 80 items and save it under ``directory/bundle``."""
    data = generate_catalogue(SyntheticConfig(n_users=60, n_items=80))
    user_map = IdMap.from_values(data.ratings["user_id"])
    item_map = IdMap.from_values(data.items["item_id"])
    split = random_split(ratings_from_frame(data.ratings, user_map, item_map), seed=0)
    texts = data.items.set_index("item_id").loc[item_map.raw_ids, "description"].tolist()
    vocabulary = build_vocabulary(texts, TextConfig(vocab_size=200))
    config = ConvMFConfig(als=ALSConfig(n_factors=4, max_iterations=2),
                          cnn=CNNConfig(embedding_dim=8, window_sizes=(3,), n_filters=4, hidden_dim=8,
                                        epochs_per_iteration=1),
                          device="cpu")
    model = ConvMF(config).fit(split.train, split.validation, documents=encode_documents(texts, vocabulary),
                               vocabulary_size=len(vocabulary))
    bundle_dir = save_model(model, Path(directory) / "bundle", vocabulary=vocabulary, user_map=user_map,
                            item_map=item_map)
    seen = pd.DataFrame({"user_id": user_map.to_raw(split.train.users), "item_id": item_map.to_raw(split.train.items)})
    return TinyConvMF(model, bundle_dir, user_map, item_map, split, texts, vocabulary, seen)


def sigkill_child_when(code: str, argument: str, log: Path, ready: Callable[[], bool], what: str,
                       poll_s: float = 0.05, timeout_s: float = 180) -> None:
    """Run ``python -c code argument`` from the repository root (in its own session, on the test's Prefect API) and
    SIGKILL its process group as soon as ``ready()``; fail if it ends first or ``what`` is not ready in time."""
    import prefect.settings

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PREFECT_API_URL": str(prefect.settings.PREFECT_API_URL.value()), "PYTHONPATH": str(root)}
    with log.open("wb") as out:  # a file, not a pipe: a full pipe would block the child
        child = subprocess.Popen([sys.executable, "-c", code, argument], cwd=root, env=env,
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert child.poll() is None, f"the child ended before the kill: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s"
            time.sleep(poll_s)
        os.killpg(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
