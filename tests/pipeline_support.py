"""Helpers shared by the pipeline test modules: a private MLflow store per module, and a client bound to it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

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
