"""Shared fixtures for the convmf_core tests: one small planted-structure catalogue and tiny model configs.

Everything is small so the whole core suite runs in well under a minute on two CPU cores: ~60 users, ~50 items,
a CNN with 16-dim embeddings and 8 filters per window, 4 latent factors and a handful of iterations.
"""

from __future__ import annotations

import os
import sys

# Offline machines: Prefect's telemetry otherwise prints tracebacks (and can lock its SQLite database), MLflow's
# tries the network. Set before any test module imports prefect or mlflow.
for _key, _value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                     "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(_key, _value)

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Iterator  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from convmf_core.config import ALSConfig, CNNConfig, ConvMFConfig, GibbsConfig, PMFConfig, SGDMFConfig, TextConfig
from convmf_core.data import IdMap, Ratings, Split, random_split, ratings_from_frame
from convmf_core.models.als_mf import PMF
from convmf_core.models.base import Recommender
from convmf_core.models.convmf import ConvMF
from convmf_core.models.sgd_mf import SGDMF
from convmf_core.synthetic import SyntheticConfig, SyntheticData, generate_catalogue
from convmf_core.text import Documents, Vocabulary, build_vocabulary, encode_documents

# The tensors here are tiny: intra-op threads only add synchronisation, and on a busy 2-core machine OpenMP
# spin-waiting made the CNN tests ~10x slower. One thread keeps the suite fast and its timings stable.
torch.set_num_threads(1)

SMALL_CATALOGUE = SyntheticConfig(n_users=60, n_items=50, n_topics=4, ratings_per_user=15, words_per_description=20,
                                  words_per_topic=10, n_filler_words=20, share_without_text=0.06,
                                  share_unrated=0.06, seed=0)


@dataclass(frozen=True, eq=False)
class Catalogue:
    """A synthetic catalogue turned into the library's inputs (dense ids in id-map order)."""

    data: SyntheticData
    user_map: IdMap
    item_map: IdMap
    ratings: Ratings
    texts: list[str]
    vocabulary: Vocabulary
    documents: Documents


def build_catalogue(config: SyntheticConfig, vocab_size: int = 1000) -> Catalogue:
    data = generate_catalogue(config)
    user_map = IdMap.from_values(data.ratings["user_id"])
    item_map = IdMap.from_values(data.items["item_id"])  # every item, rated or not
    ratings = ratings_from_frame(data.ratings, user_map, item_map)
    texts = data.items.set_index("item_id").loc[item_map.raw_ids, "description"].tolist()
    vocabulary = build_vocabulary(texts, TextConfig(vocab_size=vocab_size))
    documents = encode_documents(texts, vocabulary)
    return Catalogue(data, user_map, item_map, ratings, texts, vocabulary, documents)


@pytest.fixture(scope="session")
def make_catalogue() -> Callable[..., Catalogue]:
    """The catalogue builder, for tests that need another size (e.g. the cold-start comparison)."""
    return build_catalogue


@pytest.fixture(scope="session")
def catalogue() -> Catalogue:
    return build_catalogue(SMALL_CATALOGUE)


@pytest.fixture(scope="session")
def split(catalogue: Catalogue) -> Split:
    return random_split(catalogue.ratings, seed=0)


@pytest.fixture(scope="session")
def tiny_cnn() -> CNNConfig:
    return CNNConfig(embedding_dim=16, n_filters=8, hidden_dim=16, epochs_per_iteration=1, batch_size=16,
                     learning_rate=1e-2)


@pytest.fixture(scope="session")
def fast_als() -> ALSConfig:
    # the ALS point estimate: tests of posterior averaging (test_gibbs.py) switch it on themselves
    return ALSConfig(n_factors=4, lambda_u=1.0, lambda_v=10.0, max_iterations=3, patience=100,
                     gibbs=GibbsConfig(samples=0))


@pytest.fixture(scope="session")
def convmf_config(fast_als: ALSConfig, tiny_cnn: CNNConfig) -> ConvMFConfig:
    return ConvMFConfig(als=fast_als, cnn=tiny_cnn, seed=0, device="cpu")


@pytest.fixture(scope="session")
def pmf_config(fast_als: ALSConfig) -> PMFConfig:
    return PMFConfig(als=fast_als, seed=0, device="cpu")


@pytest.fixture(scope="session")
def sgd_config() -> SGDMFConfig:
    return SGDMFConfig(n_factors=4, learning_rate=1e-2, epochs=5, batch_size=64, use_bias=True,
                       clip_predictions=True, seed=0, device="cpu")


@dataclass(frozen=True, eq=False)
class Fitted:
    """A model fitted on ``split.train`` (validation: ``split.validation``) and what ``fit`` returned."""

    model: Recommender
    returned: object


@pytest.fixture(scope="session")
def fitted(catalogue: Catalogue, split: Split, convmf_config: ConvMFConfig, pmf_config: PMFConfig,
           sgd_config: SGDMFConfig) -> dict[str, Fitted]:
    """One fitted model of each kind, shared read-only by the model-API and persistence tests."""
    out: dict[str, Fitted] = {}
    m = ConvMF(convmf_config)
    out["convmf"] = Fitted(m, m.fit(split.train, split.validation, documents=catalogue.documents,
                                    vocabulary_size=len(catalogue.vocabulary)))
    m = PMF(pmf_config)
    out["pmf"] = Fitted(m, m.fit(split.train, split.validation))
    m = SGDMF(sgd_config)
    out["sgd"] = Fitted(m, m.fit(split.train, split.validation))
    return out


# ------------------------------------------------------------------------------------------------------------------
# Pipeline fixtures: one Prefect test server and one migrated MLflow store per session
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty MLflow SQLite store (tracking + registry tables), created once; copy it per test."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    uri = f"sqlite:///{path}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.search_experiments()
    client.search_registered_models()
    return path


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A temporary Prefect API server (SQLite) for flows run in this session; started once (~5-8 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


@pytest.fixture(scope="module", autouse=True)
def _reset_mlflow_uris() -> Iterator[None]:
    """The register/lookup tasks set MLflow's process-wide URIs: leave no module's store behind for the next one."""
    yield
    mlflow = sys.modules.get("mlflow")  # the core tests never import it
    if mlflow is not None:
        mlflow.set_registry_uri(None)
        mlflow.set_tracking_uri(None)
