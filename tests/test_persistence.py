"""Tests of model bundles (convmf_core.persistence): round trips, versioning, integrity and no unpickling."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dataclasses import replace

import numpy as np
import pytest
import torch

from convmf_core.config import GibbsConfig
from convmf_core.data import IdMap
from convmf_core.models.base import NotFittedError
from convmf_core.models.convmf import ConvMF
from convmf_core.models.sgd_mf import SGDMF
from convmf_core.persistence import FORMAT_VERSION, BundleError, load_model, read_manifest, save_model

KINDS = ["convmf", "pmf", "sgd"]
# ConvMF with each text encoder: "convmf" above is the linear encoder on tf-idf SVD features (fitted without a
# vocabulary), "convmf-glove" the linear encoder on the packaged GloVe vectors, "convmf-cnn" the document CNN.
ENCODER_KINDS = ["convmf-glove", "convmf-cnn"]


@pytest.fixture(scope="module")
def models(fitted, convmf_config, catalogue, split) -> dict:
    """The session's fitted models and one ConvMF per other encoder set-up (fitted with the vocabulary)."""
    out = {kind: f.model for kind, f in fitted.items()}
    point = replace(convmf_config, als=replace(convmf_config.als, gibbs=GibbsConfig(samples=0)))
    for kind, config in (("convmf-glove", replace(point, encoder="linear")),
                         ("convmf-cnn", replace(point, encoder="cnn", word_vectors=None))):
        out[kind] = ConvMF(config).fit(split.train, split.validation, documents=catalogue.documents,
                                       vocabulary=catalogue.vocabulary)
    return out


def _save_model(model, catalogue, directory: Path) -> Path:
    return save_model(model, directory, vocabulary=catalogue.vocabulary, user_map=catalogue.user_map,
                      item_map=catalogue.item_map, metadata={"run": "test", "k": np.int64(4), "pair": (1, 2)})


def _save(fitted, catalogue, kind: str, directory: Path) -> Path:
    return _save_model(fitted[kind].model, catalogue, directory)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest_files(bundle: Path) -> dict[str, str]:
    return json.loads((bundle / "manifest.json").read_text())["files"]


def _set_manifest(bundle: Path, **changes) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.update(changes)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("kind", KINDS + ENCODER_KINDS)
def test_round_trip(models, catalogue, split, tmp_path: Path, kind: str) -> None:
    model = models[kind]
    path = _save_model(model, catalogue, tmp_path / "bundle")
    bundle = load_model(path)
    loaded = bundle.model
    assert type(loaded) is type(model)
    assert loaded.config == model.config
    users, items = split.test.users, split.test.items
    np.testing.assert_array_equal(loaded.predict(users, items), model.predict(users, items))
    np.testing.assert_array_equal(loaded.score(np.arange(5)), model.score(np.arange(5)))
    all_users = np.arange(split.train.n_users)
    a, b = model.recommend(all_users, 10, exclude=split.train), loaded.recommend(all_users, 10, exclude=split.train)
    np.testing.assert_array_equal(a.items, b.items)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert loaded.best_iteration_ == model.best_iteration_
    assert loaded.history_ == model.history_
    assert loaded.rating_range_ == model.rating_range_ and loaded.global_mean_ == model.global_mean_
    # id maps, vocabulary and metadata come back
    assert bundle.user_map.to_list() == catalogue.user_map.to_list()
    assert bundle.item_map.to_list() == catalogue.item_map.to_list()
    np.testing.assert_array_equal(bundle.item_map.to_index(catalogue.item_map.raw_ids),
                                  np.arange(len(catalogue.item_map)))
    assert bundle.vocabulary.words == catalogue.vocabulary.words
    assert bundle.vocabulary.config == catalogue.vocabulary.config
    assert bundle.metadata == {"run": "test", "k": 4, "pair": [1, 2]}
    if isinstance(model, ConvMF):
        torch.testing.assert_close(loaded.embed_items(catalogue.documents), model.embed_items(catalogue.documents),
                                   rtol=0, atol=0)
        assert loaded.embed_items(catalogue.documents).shape == (len(catalogue.documents), model.als.n_factors + 1)
        assert torch.equal(loaded.item_has_text_, model.item_has_text_)
        assert loaded.vocabulary_size_ == model.vocabulary_size_
        assert type(loaded.encoder_) is type(model.encoder_)
        assert (loaded.cnn_ is None) == (model.config.encoder == "linear")
        if loaded.cnn_ is not None:
            assert not loaded.cnn_.training
        # what the fit reported comes back too
        assert loaded.prior_report_ == model.prior_report_ and loaded.prior_report_
        assert loaded.vector_coverage_ == model.vector_coverage_
        assert (loaded.vector_coverage_ is None) == (kind != "convmf-glove")
    for name in ("validation_rmse_", "fallback_"):
        assert getattr(loaded, name) == getattr(model, name, None)
    assert loaded.best_validation_rmse_ == model.best_validation_rmse_


def test_a_bundle_with_the_cnn_weights_under_their_old_names_still_loads(models, catalogue, split,
                                                                          tmp_path: Path) -> None:
    """Bundles written before the encoder interface hold the CNN's weights as ``cnn.*`` (not ``encoder.cnn.*``)."""
    model = models["convmf-cnn"]
    path = _save_model(model, catalogue, tmp_path / "bundle")
    weights = path / "weights.pt"
    tensors = torch.load(weights, weights_only=True)
    renamed = {k[len("encoder."):] if k.startswith("encoder.") else k: v for k, v in tensors.items()}
    assert any(k.startswith("cnn.") for k in renamed) and not any(k.startswith("encoder.") for k in renamed)
    torch.save(renamed, weights)
    _set_manifest(path, files={**_manifest_files(path), "weights.pt": _sha256(weights)})
    loaded = load_model(path).model
    assert loaded.cnn_ is not None and not loaded.cnn_.training
    torch.testing.assert_close(loaded.embed_items(catalogue.documents), model.embed_items(catalogue.documents),
                               rtol=0, atol=0)
    np.testing.assert_array_equal(loaded.predict(split.test.users, split.test.items),
                                  model.predict(split.test.users, split.test.items))


def test_loaded_id_map_can_be_extended(fitted, catalogue, tmp_path: Path) -> None:
    # Raw ids that are strings come back from parquet as a fixed-width numpy array; extending must not truncate.
    users = IdMap.from_values([f"u{i}" for i in range(1, 10)])
    save_model(fitted["pmf"].model, tmp_path / "b", user_map=users)
    loaded = load_model(tmp_path / "b").user_map
    assert loaded.to_list() == users.to_list()
    extended = loaded.extend(["u10", "u1"])
    assert extended.to_list() == users.to_list() + ["u10"]
    assert extended.to_index(["u10"]).tolist() == [9]


def test_manifest_lists_every_file_with_its_checksum(fitted, catalogue, tmp_path: Path) -> None:
    path = _save(fitted, catalogue, "convmf", tmp_path / "bundle")
    manifest = read_manifest(path)
    assert manifest["format_version"] == FORMAT_VERSION and manifest["model_class"] == "ConvMF"
    files = {p.name for p in path.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == files == {"weights.pt", "vocabulary.json", "user_ids.parquet",
                                               "item_ids.parquet"}
    for name, digest in manifest["files"].items():
        assert _sha256(path / name) == digest


def test_newer_format_version_is_refused(fitted, catalogue, tmp_path: Path) -> None:
    path = _save(fitted, catalogue, "convmf", tmp_path / "bundle")
    _set_manifest(path, format_version=99)
    with pytest.raises(BundleError, match=r"version 99"):
        load_model(path)


def test_modified_weights_fail_the_checksum(fitted, catalogue, tmp_path: Path) -> None:
    path = _save(fitted, catalogue, "convmf", tmp_path / "bundle")
    weights = path / "weights.pt"
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum"):
        load_model(path)


def test_missing_listed_file_is_refused(fitted, catalogue, tmp_path: Path) -> None:
    path = _save(fitted, catalogue, "convmf", tmp_path / "bundle")
    (path / "vocabulary.json").unlink()
    with pytest.raises(BundleError, match="vocabulary.json"):
        load_model(path)


class _Payload:
    """Unpickling this object opens (so creates) the marker file: stands in for arbitrary code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_payload_is_refused_without_running_it(fitted, catalogue, tmp_path: Path) -> None:
    path = _save(fitted, catalogue, "pmf", tmp_path / "bundle")
    marker = tmp_path / "pwned"
    weights = path / "weights.pt"
    tensors = torch.load(weights, weights_only=True)
    torch.save({**tensors, "payload": _Payload(marker)}, weights)
    # The payload is live: an unrestricted unpickler would run it (checked on a copy, with its own marker).
    control_marker = tmp_path / "control"
    control = tmp_path / "control.pt"
    torch.save({"payload": _Payload(control_marker)}, control)
    handle = torch.load(control, weights_only=False)["payload"]
    handle.close()
    assert control_marker.exists()
    # The checksum is updated, so only the loader's own refusal to unpickle can stop it.
    _set_manifest(path, files={**_manifest_files(path), "weights.pt": _sha256(weights)})
    with pytest.raises(BundleError, match="weights.pt"):
        load_model(path)
    assert not marker.exists()


def test_missing_manifest_is_refused(fitted, catalogue, tmp_path: Path) -> None:
    path = _save(fitted, catalogue, "convmf", tmp_path / "bundle")
    (path / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest"):
        load_model(path)
    with pytest.raises(BundleError, match="manifest"):
        load_model(tmp_path / "does-not-exist")
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError):
        load_model(path)
    (path / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(BundleError, match="convmf-model-bundle"):
        load_model(path)
    (path / "manifest.json").write_text(json.dumps([1, 2]))  # valid JSON, but not an object
    with pytest.raises(BundleError, match="convmf-model-bundle"):
        load_model(path)


def test_saving_over_a_bundle_replaces_it(fitted, catalogue, split, tmp_path: Path) -> None:
    target = tmp_path / "models" / "current"
    _save(fitted, catalogue, "convmf", target)
    assert load_model(target).vocabulary is not None
    sgd = fitted["sgd"].model
    save_model(sgd, target)  # no vocabulary or id maps this time
    bundle = load_model(target)
    assert isinstance(bundle.model, SGDMF)
    assert bundle.vocabulary is None and bundle.user_map is None and bundle.item_map is None
    assert sorted(p.name for p in target.iterdir()) == ["manifest.json", "weights.pt"]  # old files gone
    np.testing.assert_array_equal(bundle.model.predict(split.test.users, split.test.items),
                                  sgd.predict(split.test.users, split.test.items))
    assert [p.name for p in target.parent.iterdir()] == ["current"]  # no temporary or old directories left


def test_unfitted_model_cannot_be_saved(convmf_config, tmp_path: Path) -> None:
    with pytest.raises(NotFittedError):
        save_model(ConvMF(convmf_config), tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
    assert list(tmp_path.iterdir()) == []
