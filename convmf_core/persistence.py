"""Save and load a fitted model as a directory bundle, with no pickle anywhere.

Layout (``FORMAT_VERSION`` 1)::

    manifest.json      format name and version, model class, config, scalar state, sha256 of every other file
    weights.pt         a flat dict of tensors, read back with torch.load(weights_only=True)
    vocabulary.json    the text vocabulary (ConvMF), optional
    user_ids.parquet   raw ids by dense index (id maps), optional
    item_ids.parquet

A bundle is written to a temporary sibling directory and renamed into place, so a crash never leaves a half-written
bundle under the final name. Loading checks the format version (a newer one is refused with a clear message) and
every checksum (a changed or truncated file is refused) before it reads a tensor.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from convmf_core import __version__
from convmf_core.atomic import replace_directory, staging_directory
from convmf_core.config import ConvMFConfig, PMFConfig, SGDMFConfig, config_from_dict, config_to_dict
from convmf_core.data import IdMap
from convmf_core.models.als_mf import PMF
from convmf_core.models.base import IterationReport, Recommender
from convmf_core.gibbs import PosteriorSamples
from convmf_core.models.convmf import ConvMF, encoder_from_state
from convmf_core.models.sgd_mf import SGDMF
from convmf_core.text import Vocabulary

FORMAT_NAME = "convmf-model-bundle"
FORMAT_VERSION = 1
_MODEL_CLASSES: dict[str, tuple[type, type]] = {"ConvMF": (ConvMF, ConvMFConfig), "PMF": (PMF, PMFConfig),
                                                 "SGDMF": (SGDMF, SGDMFConfig)}


class BundleError(RuntimeError):
    """A model bundle cannot be loaded: missing, corrupt, from a newer format, or holding something unsafe."""


@dataclass
class ModelBundle:
    """What :func:`load_model` returns: the model plus what is needed to use it on raw ids and raw text."""

    model: Recommender
    vocabulary: Vocabulary | None = None
    user_map: IdMap | None = None
    item_map: IdMap | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _model_state(model: Recommender) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    name = type(model).__name__
    if name not in _MODEL_CLASSES:
        raise TypeError(f"cannot save a {name}; known models: {sorted(_MODEL_CLASSES)}")
    model.scoring_factors()  # raises NotFittedError when unfitted
    tensors = {"user_factors": model.user_factors_, "item_factors": model.item_factors_,
               "user_bias": model.user_bias_, "item_bias": model.item_bias_}
    state = {"global_mean": float(model.global_mean_), "rating_range": list(model.rating_range_),
             "best_iteration": int(getattr(model, "best_iteration_", 0)),
             "history": [h.__dict__ for h in getattr(model, "history_", [])]}
    samples = getattr(model, "samples_", None)
    if samples is not None:  # posterior averaging: the kept draws (convmf_core.gibbs)
        tensors.update(samples.to_dict())
    for name in ("validation_rmse_", "fallback_", "prior_report_", "sampling_seconds_per_sweep_"):
        if getattr(model, name, None) is not None:
            state[name.rstrip("_")] = getattr(model, name)
    if isinstance(model, ConvMF):
        tensors["item_has_text"] = model.item_has_text_
        tensors.update({f"encoder.{k}": v.detach().cpu() for k, v in model.encoder_.state_dict().items()})
        state["vocabulary_size"] = int(model.vocabulary_size_)
        state["vector_coverage"] = model.vector_coverage_
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, state


def save_model(model: Recommender, directory: str | Path, *, vocabulary: Vocabulary | None = None,
               user_map: IdMap | None = None, item_map: IdMap | None = None,
               metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (and optionally its vocabulary, id maps and JSON-able ``metadata``) to ``directory``.

    Replaces an existing bundle at ``directory`` atomically. Returns the directory.
    """
    directory = Path(directory)
    tensors, state = _model_state(model)
    tmp = staging_directory(directory)
    try:
        torch.save(tensors, tmp / "weights.pt")
        if vocabulary is not None:
            (tmp / "vocabulary.json").write_text(json.dumps(vocabulary.to_dict()))
        for name, id_map in (("user_ids.parquet", user_map), ("item_ids.parquet", item_map)):
            if id_map is not None:
                pq.write_table(pa.table({"raw_id": pa.array(id_map.to_list())}), tmp / name)
        manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "library_version": __version__,
                    "model_class": type(model).__name__, "config": config_to_dict(model.config), "state": state,
                    "metadata": metadata or {},
                    "files": {p.name: _sha256(p) for p in sorted(tmp.iterdir())}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=_json_default))
        replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"metadata value {value!r} is not JSON-serialisable")


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The bundle's manifest after checking its format, version and file checksums."""
    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.is_file():
        raise BundleError(f"{directory} is not a model bundle: manifest.json is missing")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path} is corrupt: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{directory} is not a {FORMAT_NAME} (format={found!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(f"{directory} has bundle format version {version!r}, newer than this library reads "
                          f"({FORMAT_VERSION}); upgrade convmf-pipeline to load it")
    for name, digest in manifest.get("files", {}).items():
        file = directory / name
        if not file.is_file():
            raise BundleError(f"{directory} is incomplete: {name} is missing")
        if _sha256(file) != digest:
            raise BundleError(f"{directory} is corrupt: the checksum of {name} does not match the manifest")
    return manifest


def load_model(directory: str | Path, *, device: str = "cpu") -> ModelBundle:
    """Load a bundle written by :func:`save_model`. Never unpickles: weights load with ``weights_only=True``."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    name = manifest["model_class"]
    if name not in _MODEL_CLASSES:
        raise BundleError(f"{directory} holds an unknown model class {name!r}")
    cls, config_cls = _MODEL_CLASSES[name]
    try:
        tensors = torch.load(directory / "weights.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle payloads and garbage both end here, before anything runs
        raise BundleError(f"refusing to load {directory / 'weights.pt'}: not a plain tensor file ({exc})") from exc
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise BundleError(f"{directory / 'weights.pt'} must hold a dict of tensors")
    config = config_from_dict(config_cls, manifest["config"])
    model = cls(config)
    state = manifest["state"]
    model.user_factors_, model.item_factors_ = tensors["user_factors"], tensors["item_factors"]
    model.user_bias_, model.item_bias_ = tensors["user_bias"], tensors["item_bias"]
    model.global_mean_ = float(state["global_mean"])
    model.rating_range_ = tuple(state["rating_range"])
    model.best_iteration_ = state["best_iteration"]
    model.history_ = [IterationReport(**h) for h in state["history"]]
    model.samples_ = PosteriorSamples.from_dict(tensors)
    for name in ("validation_rmse_", "fallback_", "prior_report_", "sampling_seconds_per_sweep_"):
        setattr(model, name, state.get(name.rstrip("_")))
    if isinstance(model, ConvMF):
        model.vocabulary_size_ = int(state["vocabulary_size"])
        model.item_has_text_ = tensors["item_has_text"]
        model.vector_coverage_ = state.get("vector_coverage")
        encoder_state = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
        if not encoder_state:  # bundles written before the encoder interface: the CNN's weights as "cnn.*"
            encoder_state = {k: v for k, v in tensors.items() if k.startswith("cnn.")}
        try:
            model.encoder_ = encoder_from_state(encoder_state, config, model.vocabulary_size_, None, device)
        except (RuntimeError, KeyError) as exc:
            raise BundleError(f"{directory}: the text encoder's weights do not match its configuration: {exc}") from exc
        if model.cnn_ is not None:
            model.cnn_.eval()
    vocabulary = None
    if (directory / "vocabulary.json").is_file():
        vocabulary = Vocabulary.from_dict(json.loads((directory / "vocabulary.json").read_text()))
    maps = []
    for file in ("user_ids.parquet", "item_ids.parquet"):
        path = directory / file
        maps.append(IdMap(np.asarray(pq.read_table(path).column("raw_id").to_pylist())) if path.is_file() else None)
    return ModelBundle(model, vocabulary, maps[0], maps[1], manifest.get("metadata", {}))
