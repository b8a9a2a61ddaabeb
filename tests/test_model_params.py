"""Tests of the model hyperparameters as flow parameters (flows/params.py ModelParams), their CLI flags
(flows/cli.py) and what train logs of the model's configuration and fit (tasks/train.py helpers). No servers."""

from __future__ import annotations

import math
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from convmf_core.config import ConvMFConfig
from convmf_core.gibbs import PosteriorSamples
from convmf_core.models.base import IterationReport
from convmf_core.vectors import PACKAGED_VECTORS, VectorCoverage
from flows.cli import build_parser, _training_params
from flows.params import ModelParams, StorageParams, TrainingParams

LIBRARY = ConvMFConfig()


def test_defaults_are_the_library_config() -> None:
    assert ModelParams().config() == LIBRARY
    p = ModelParams()
    assert (p.encoder, p.word_vectors, p.bias_prior) == (LIBRARY.encoder, LIBRARY.word_vectors, LIBRARY.bias_prior)
    assert (p.ridge_alpha, p.svd_dim) == (LIBRARY.linear.alpha, LIBRARY.linear.svd_dim)
    gibbs = LIBRARY.als.gibbs
    assert (p.posterior_samples, p.burn_in, p.gibbs_lambda_u, p.gibbs_lambda_v) == (
        gibbs.samples, gibbs.burn_in, gibbs.lambda_u, gibbs.lambda_v)
    assert p.fallback == LIBRARY.als.fallback


def test_new_fields_map_into_the_config(tmp_path: Path) -> None:
    vectors = tmp_path / "vectors.txt"
    vectors.write_text("film 0.1 0.2\nstory 0.3 0.4\n")
    config = ModelParams(encoder="cnn", word_vectors=str(vectors), bias_prior=False, ridge_alpha=12.5, svd_dim=7,
                         posterior_samples=4, burn_in=3, gibbs_lambda_u=2.0, gibbs_lambda_v=3.0,
                         fallback=False).config()
    assert (config.encoder, config.word_vectors, config.bias_prior) == ("cnn", str(vectors), False)
    assert (config.linear.alpha, config.linear.svd_dim) == (12.5, 7)
    assert config.linear.fallback_svd_dim == LIBRARY.linear.fallback_svd_dim  # not exposed: the library's
    g = config.als.gibbs
    assert (g.samples, g.burn_in, g.lambda_u, g.lambda_v) == (4, 3, 2.0, 3.0)
    library = LIBRARY.als.gibbs
    assert (g.lambda_bias, g.warm_start_burn_in) == (library.lambda_bias, library.warm_start_burn_in)
    assert config.als.fallback is False
    assert ModelParams(word_vectors=None).config().word_vectors is None  # the paper's CNN / tf-idf SVD features


def _other_value(name: str, field) -> object:
    """A valid value of ``field`` other than its default."""
    default, annotation = field.default, field.annotation
    if annotation is bool:
        return not default
    if typing.get_origin(annotation) is typing.Literal:
        return next(v for v in typing.get_args(annotation) if v != default)
    if isinstance(default, str):
        return None
    if isinstance(default, int):
        return default + 1
    return default / 2


@pytest.mark.parametrize("name", list(ModelParams.model_fields))
def test_every_field_reaches_the_config(name: str) -> None:
    """No parameter is silently dropped by config()."""
    value = _other_value(name, ModelParams.model_fields[name])
    assert ModelParams(**{name: value}).config() != LIBRARY, f"{name}={value!r} does not change the config"


@pytest.mark.parametrize("kwargs, message", [
    ({"posterior_samples": -1}, r"posterior_samples\n  Input should be greater than or equal to 0"),
    ({"posterior_samples": 10_001}, r"less than or equal to 1000"),
    ({"burn_in": -1}, r"burn_in\n  Input should be greater than or equal to 0"),
    ({"encoder": "cnn+"}, r"encoder\n  Input should be 'linear' or 'cnn'"),
    ({"ridge_alpha": 0.0}, r"ridge_alpha\n  Input should be greater than 0"),
    ({"svd_dim": -1}, r"svd_dim\n  Input should be greater than or equal to 0"),
    ({"gibbs_lambda_u": 0.0}, r"gibbs_lambda_u\n  Input should be greater than 0"),
    ({"gibbs_lambda_v": -1.0}, r"gibbs_lambda_v\n  Input should be greater than 0"),
    ({"word_vectors": "/no/such/vectors.txt"}, r"model.word_vectors='/no/such/vectors.txt': no such file"),
    ({"word_vectors": "data/../../etc/passwd"}, r"'\.\.' components are not allowed"),
    ({"word_vectors": ""}, r"word_vectors\n  String should have at least 1 character"),
    ({"bias_prior": "maybe"}, r"bias_prior\n  Input should be a valid boolean"),
    ({"gibbs": 5}, r"gibbs\n  Extra inputs are not permitted"),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_bad_values_are_refused_clearly(kwargs: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelParams(**kwargs)


def test_a_word_vectors_file_must_lie_under_the_allowed_roots(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    roots, outside = tmp_path / "roots", tmp_path / "outside"
    for directory in (roots / "home", outside):
        directory.mkdir(parents=True)
    inside_file, outside_file = roots / "vectors.txt", outside / "vectors.txt"
    for f in (inside_file, outside_file):
        f.write_text("film 0.1 0.2\n")
    monkeypatch.setenv("CONVMF_DATA_ROOTS", str(roots))
    storage = StorageParams(home=str(roots / "home"))
    ok = TrainingParams(storage=storage, model=ModelParams(word_vectors=str(inside_file)))
    assert ok.model.config().word_vectors == str(inside_file)
    with pytest.raises(ValidationError, match=r"model.word_vectors"):
        TrainingParams(storage=storage, model=ModelParams(word_vectors=str(outside_file)))
    TrainingParams(storage=storage, model=ModelParams(word_vectors=PACKAGED_VECTORS))  # the package: no path


# ------------------------------------------------------------------------------------------------------------------
# CLI flags
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "nightly"])
def test_model_flags_are_in_the_help(command: str) -> None:
    sub = build_parser()._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    text = sub.format_help()
    for name in ModelParams.model_fields:
        assert "--" + name.replace("_", "-") in text, name
    assert "--no-bias-prior" in text and "--no-fallback" in text and "{linear,cnn}" in text


def test_model_flags_override_the_json_params() -> None:
    args = build_parser().parse_args([
        "train", "--params", '{"model": {"n_factors": 3, "encoder": "linear"}}', "--encoder", "cnn",
        "--word-vectors", "none", "--posterior-samples", "5", "--burn-in", "2", "--no-bias-prior",
        "--ridge-alpha", "50", "--gibbs-lambda-v", "2.5"])
    params = TrainingParams.model_validate(_training_params(args))
    config = params.model.config()
    assert config.als.n_factors == 3  # from --params, untouched by the flags
    assert (config.encoder, config.word_vectors, config.bias_prior) == ("cnn", None, False)
    assert (config.als.gibbs.samples, config.als.gibbs.burn_in, config.als.gibbs.lambda_v) == (5, 2, 2.5)
    assert config.linear.alpha == 50.0
    # flags not given leave the model alone
    assert "model" not in _training_params(build_parser().parse_args(["train"]))


def test_a_bad_model_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["train", "--encoder", "cnn+"])
    assert exit_info.value.code == 2
    assert "--encoder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--posterior-samples", "many"])


# ------------------------------------------------------------------------------------------------------------------
# What train logs (tasks/train.py helpers)
# ------------------------------------------------------------------------------------------------------------------


def test_config_params_flatten_every_section() -> None:
    from tasks.train import config_params

    params = config_params(ModelParams(posterior_samples=3).config())
    assert params["gibbs.samples"] == 3 and params["gibbs.burn_in"] == LIBRARY.als.gibbs.burn_in
    assert params["linear.alpha"] == LIBRARY.linear.alpha and params["als.n_factors"] == LIBRARY.als.n_factors
    assert params["cnn.n_filters"] == LIBRARY.cnn.n_filters and params["als.fallback"] == LIBRARY.als.fallback
    assert (params["encoder"], params["word_vectors"], params["bias_prior"]) == (
        LIBRARY.encoder, LIBRARY.word_vectors, LIBRARY.bias_prior)
    assert "als.gibbs" not in params and "device" not in params  # the run logs the resolved device itself
    assert not any(isinstance(v, dict) for v in params.values())


def test_fit_facts_of_a_sampled_model_that_fell_back() -> None:
    from tasks.train import fit_facts

    samples = PosteriorSamples(torch.zeros(4, 10, 3), torch.zeros(4, 10), torch.zeros(4, 6, 3), torch.zeros(4, 6))
    coverage = VectorCoverage(n_words=100, found=90, found_lowercased=0, oov=10, oov_share=0.1,
                              oov_examples=("zzz",), source=PACKAGED_VECTORS)
    model = SimpleNamespace(config=ConvMFConfig(), samples_=samples, sampling_history_=[None] * 7,
                            sampling_seconds_per_sweep_=0.25, prior_report_={"prior_heldout_r2": 0.4},
                            vector_coverage_=coverage.to_dict(), fallback_="the catalogue is too small")
    metrics, tags = fit_facts(model)
    assert metrics["posterior_samples"] == 4 and metrics["gibbs_sweeps"] == 7
    assert metrics["gibbs_seconds_per_sweep"] == 0.25 and metrics["prior_heldout_r2"] == 0.4
    assert metrics["samples_memory_mb"] == pytest.approx(4 * (10 * 3 + 10 + 6 * 3 + 6) * 4 / 2**20)
    assert (metrics["vector_coverage_found"], metrics["vector_coverage_oov_share"]) == (90, 0.1)
    assert metrics["fallback"] == 1.0
    assert tags == {"encoder": LIBRARY.encoder, "vector_coverage": coverage.summary(),
                    "fallback": "the catalogue is too small"}

    plain = SimpleNamespace(config=ConvMFConfig(), samples_=None, sampling_history_=[], prior_report_={},
                            vector_coverage_=None, fallback_=None)
    metrics, tags = fit_facts(plain)
    assert metrics == {"posterior_samples": 0, "gibbs_sweeps": 0, "samples_memory_mb": 0.0, "fallback": 0.0}
    assert tags == {"encoder": LIBRARY.encoder}


def test_learning_curve_copes_with_sampling_history(tmp_path: Path) -> None:
    from tasks.train import learning_curve_png

    history = [IterationReport(i, 1.0 / i, 1.0 + 0.1 / i, 0.1, {}) for i in range(1, 4)]
    sweeps = [IterationReport(3 + s, math.nan, None if s <= 2 else 1.0 - 0.01 * s, 0.1,
                              {"gibbs_sweep": float(s), "gibbs_kept": float(max(s - 2, 0))}) for s in range(1, 6)]
    for name, sampling in (("with.png", sweeps), ("burn-in-only.png", sweeps[:2]), ("none.png", None)):
        path = learning_curve_png(history, tmp_path / name, sampling)
        assert path.stat().st_size > 1000

