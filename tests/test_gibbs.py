"""Posterior averaging (convmf_core.gibbs, ALSConfig.gibbs): the averaged prediction is the stacked factor model,
sampling is seeded, a drawn ridge solve has the right mean and covariance, fold-in and bundles keep the draws.

Small data (tests/conftest.py's catalogue), few sweeps: every test takes well under a second or two.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from convmf_core.als import SparseRows, solve_ridge
from convmf_core.config import ALSConfig, ConvMFConfig, GibbsConfig, PMFConfig
from convmf_core.data import IdMap, Ratings, Split
from convmf_core.foldin import FoldInError, ItemSide, UserFactors, embed_new_items, fold_in_users
from convmf_core.gibbs import PosteriorSamples
from convmf_core.models.als_mf import PMF, ALSFactorModel
from convmf_core.models.convmf import ConvMF
from convmf_core.models.warm_start import warm_start_from
from convmf_core.persistence import load_model, save_model

S = 5  # kept draws
SAMPLED_ALS = ALSConfig(n_factors=4, lambda_u=1.0, lambda_v=10.0, max_iterations=3, patience=100,
                        clip_predictions=False, fallback=False, gibbs=GibbsConfig(samples=S, burn_in=3))
KINDS = ["pmf", "convmf-linear", "convmf-cnn"]


def _fit(kind: str, catalogue, split: Split, *, seed: int = 0, als: ALSConfig = SAMPLED_ALS,
         tiny_cnn=None) -> ALSFactorModel:
    if kind == "pmf":
        return PMF(PMFConfig(als=als, seed=seed, device="cpu")).fit(split.train, split.validation)
    encoder = kind.split("-")[1]
    config = ConvMFConfig(als=als, seed=seed, device="cpu", encoder=encoder, word_vectors=None,
                          **({"cnn": tiny_cnn} if tiny_cnn is not None else {}))
    return ConvMF(config).fit(split.train, split.validation, documents=catalogue.documents,
                              vocabulary_size=len(catalogue.vocabulary))


@pytest.fixture(scope="module")
def sampled(catalogue, split: Split, tiny_cnn) -> dict[str, ALSFactorModel]:
    return {kind: _fit(kind, catalogue, split, tiny_cnn=tiny_cnn) for kind in KINDS}


def _per_draw_mean(samples: PosteriorSamples, mu: float, users: np.ndarray, items: np.ndarray) -> torch.Tensor:
    """mean over s of mu + u_i^(s) . v_j^(s) + b_i^(s) + c_j^(s), straight from the draws (float64)."""
    u, i = torch.as_tensor(users), torch.as_tensor(items)
    U, V = samples.user.double()[:, u], samples.item.double()[:, i]
    per_draw = (U * V).sum(2) + samples.user_bias.double()[:, u] + samples.item_bias.double()[:, i]
    return mu + per_draw.mean(0)


@pytest.mark.parametrize("kind", KINDS)
def test_the_averaged_prediction_is_the_stacked_factor_model(sampled, split: Split, kind: str) -> None:
    model = sampled[kind]
    samples = model.samples_
    k, n, m = model.als.n_factors, split.train.n_users, split.train.n_items
    assert isinstance(samples, PosteriorSamples) and samples.n_samples == S
    assert samples.user.shape == (S, n, k) and samples.user_bias.shape == (S, n)
    assert samples.item.shape == (S, m, k) and samples.item_bias.shape == (S, m)
    # the draws differ (a sampler, not S copies of the ALS optimum)
    assert float((samples.item[0] - samples.item[1]).abs().max()) > 1e-3
    sf = model.scoring_factors()
    assert sf.user.shape == (n, S * (k + 2)) and sf.item.shape == (m, S * (k + 2)) and sf.clip is None
    test = split.test
    expected = _per_draw_mean(samples, model.global_mean_, test.users, test.items)
    np.testing.assert_allclose(model.predict(test.users, test.items), expected.numpy(), rtol=0, atol=1e-5)
    users = np.arange(7)
    grid = _per_draw_mean(samples, model.global_mean_, np.repeat(users, m), np.tile(np.arange(m), len(users)))
    np.testing.assert_allclose(model.score(users), grid.view(len(users), m).numpy(), rtol=0, atol=1e-5)
    # not the prediction of the posterior-mean factors (the average keeps the products)
    u_bar, b_bar, v_bar, c_bar = samples.mean()
    point = model.global_mean_ + (u_bar[test.users] * v_bar[test.items]).sum(1) + b_bar[test.users] + c_bar[test.items]
    assert float((point - torch.as_tensor(expected, dtype=torch.float32)).abs().max()) > 1e-4
    # one report per sweep; the fit's validation RMSE is the averaged model's
    gibbs = model.als.gibbs
    assert len(model.sampling_history_) == gibbs.burn_in + gibbs.samples
    assert [r.extra["gibbs_kept"] for r in model.sampling_history_] == [0.0] * gibbs.burn_in + list(range(1, S + 1))
    val = split.validation
    rmse = float(np.sqrt(np.mean((model.predict(val.users, val.items) - val.values) ** 2)))
    assert model.best_validation_rmse_ == pytest.approx(rmse, abs=1e-5)
    assert model.sampling_history_[-1].validation_rmse == pytest.approx(rmse, abs=1e-5)
    assert model.fallback_ is None


def test_sampling_is_seeded(catalogue, split: Split, sampled) -> None:
    a = sampled["pmf"]
    b = _fit("pmf", catalogue, split)
    c = _fit("pmf", catalogue, split, seed=1)
    for name in ("user", "user_bias", "item", "item_bias"):
        assert torch.equal(getattr(a.samples_, name), getattr(b.samples_, name)), name
    assert not torch.allclose(a.samples_.item, c.samples_.item, atol=1e-3)
    linear = _fit("convmf-linear", catalogue, split)
    assert torch.equal(linear.samples_.item, sampled["convmf-linear"].samples_.item)
    assert torch.equal(linear.samples_.item_bias, sampled["convmf-linear"].samples_.item_bias)


def test_a_drawn_ridge_solve_has_the_posterior_mean_and_covariance() -> None:
    """x ~ N(A^-1 b, sigma^2 A^-1): many draws of one tiny row (the same row repeated) against their moments."""
    generator = torch.Generator().manual_seed(0)
    d, n_draws, sigma = 3, 40_000, 0.7
    other = torch.tensor([[1.0, 0.5, -0.3], [0.2, -1.0, 0.4], [0.7, 0.1, 1.2], [-0.5, 0.9, 0.3]])
    cols, values = np.array([0, 1, 3]), np.array([4.0, 2.0, 3.5], dtype=np.float32)
    indptr = torch.arange(n_draws + 1, dtype=torch.int64) * len(cols)
    rows = SparseRows(indptr, torch.as_tensor(np.tile(cols, n_draws)), torch.as_tensor(np.tile(values, n_draws)),
                      n_draws, other.shape[0])
    reg = torch.tensor([1.0, 2.0, 0.5])
    prior = torch.tensor([0.3, -0.2, 0.1]).expand(n_draws, d)
    mean = solve_ridge(rows, other, reg, prior)
    draws = solve_ridge(rows, other, reg, prior, sample=(sigma, generator))
    # the ridge solution (every row the same), and by hand
    Y = other[torch.as_tensor(cols)].double()
    A = Y.T @ Y + torch.diag(reg.double())
    x = torch.linalg.solve(A, Y.T @ torch.as_tensor(values, dtype=torch.float64) + reg.double() * prior[0].double())
    torch.testing.assert_close(mean[0].double(), x, rtol=0, atol=1e-5)
    cov = sigma ** 2 * torch.linalg.inv(A)
    d64 = draws.double()
    se = (cov.diagonal() / n_draws).sqrt()
    assert bool(((d64.mean(0) - x).abs() < 5 * se).all()), (d64.mean(0) - x, se)
    empirical = torch.cov(d64.T)
    scale = cov.diagonal().sqrt()
    # covariance entries to within 5% of the variances' scale (their sampling error is ~0.7% here)
    assert float(((empirical - cov) / torch.outer(scale, scale)).abs().max()) < 0.05, (empirical, cov)
    # without ``sample`` the solve is deterministic; a draw with sigma = 0 is the mean
    zero = solve_ridge(rows, other, reg, prior, sample=(0.0, torch.Generator().manual_seed(1)))
    torch.testing.assert_close(zero, mean, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["pmf", "convmf-linear"])
def test_fold_in_of_a_new_user_solves_every_draw(sampled, split: Split, kind: str) -> None:
    model = sampled[kind]
    side = ItemSide.of(model)
    assert side.n_samples == S
    # the sampled model's users were drawn with the sampler's ridge terms: fold-in uses the same
    assert (side.lambda_u, side.lambda_bias) == (model.als.gibbs.lambda_u, model.als.gibbs.lambda_bias)
    m = side.n_items
    ratings = Ratings(np.array([0, 0, 0, 1, 1]), np.array([3, 8, 20, 3, 11]), np.array([5.0, 4.0, 1.0, 2.0, 3.0]),
                      2, m)
    folded = fold_in_users(side, ratings)
    assert folded.factor_samples.shape == (S, 2, model.als.n_factors) and folded.bias_samples.shape == (S, 2)
    for s in range(S):  # draw s: eq. 7 against V^(s), c^(s)
        alone = fold_in_users(side.sample(s), ratings)
        torch.testing.assert_close(folded.factor_samples[s], alone.factors)
        torch.testing.assert_close(folded.bias_samples[s], alone.bias)
    assert float((folded.factor_samples[0] - folded.factor_samples[1]).abs().max()) > 1e-4
    torch.testing.assert_close(folded.factors, folded.factor_samples.mean(0))
    # scored against the model's stacked items: the mean over draws of the per-draw predictions
    sf = model.scoring_factors()
    scores = folded.scoring_rows() @ sf.item.T + sf.offset
    per_draw = (torch.einsum("sbk,smk->sbm", folded.factor_samples.double(), model.samples_.item.double())
                + folded.bias_samples.double().unsqueeze(2) + model.samples_.item_bias.double().unsqueeze(1))
    torch.testing.assert_close(scores.double(), model.global_mean_ + per_draw.mean(0), rtol=0, atol=1e-5)


def _rows_of(ratings: Ratings, users: np.ndarray) -> Ratings:
    """The ratings of ``users`` (-1: none) re-indexed 0..len(users)-1."""
    position = np.full(ratings.n_users, -1, dtype=np.int64)
    position[users[users >= 0]] = np.flatnonzero(users >= 0)
    keep = position[ratings.users] >= 0
    return Ratings(position[ratings.users[keep]], ratings.items[keep], ratings.values[keep], len(users),
                   ratings.n_items)


def test_known_users_keep_their_draws_and_move_with_new_ratings(sampled, split: Split) -> None:
    model = sampled["pmf"]
    side = ItemSide.of(model)
    known = np.array([4, 0, 13, -1])  # the last one is new
    previous = UserFactors.of_model(model, known)
    assert previous.factor_samples.shape == (S, 4, model.als.n_factors)
    torch.testing.assert_close(previous.factor_samples[:, :3], model.samples_.user[:, known[:3]])
    torch.testing.assert_close(previous.bias_samples[:, :3], model.samples_.user_bias[:, known[:3]])
    assert float(previous.factor_samples[:, 3].abs().sum()) == 0.0
    history = _rows_of(split.train, known).csr()
    # no new rating: every draw of a known user stays as the model drew it, so scores are the model's own
    nothing = Ratings(np.zeros(0), np.zeros(0), np.zeros(0), 4, side.n_items)
    same = fold_in_users(side, nothing, previous=previous, history=history)
    torch.testing.assert_close(same.factor_samples[:, :3], previous.factor_samples[:, :3], rtol=1e-4, atol=1e-5)
    sf = model.scoring_factors()
    torch.testing.assert_close((same.scoring_rows()[:3] @ sf.item.T + sf.offset).numpy(), model.score(known[:3]),
                               rtol=0, atol=1e-4)
    # a 5 on an unseen item pulls that item's averaged prediction up
    item = int(np.setdiff1d(np.arange(side.n_items), history.row(0)[0])[0])
    five = Ratings(np.array([0]), np.array([item]), np.array([5.0]), 4, side.n_items)
    moved = fold_in_users(side, five, previous=previous, history=history)
    before = float(model.score(known[:1])[0, item])
    after = float((moved.scoring_rows()[0] @ sf.item[item]) + sf.offset)
    assert after > before
    # previous factors without the draws are refused for a sampled model
    with pytest.raises(FoldInError, match="one row per draw"):
        fold_in_users(side, five, previous=UserFactors(previous.factors, previous.bias), history=history)


def test_new_items_of_a_sampled_convmf_hold_their_prior_in_every_draw(sampled, catalogue) -> None:
    model = sampled["convmf-linear"]
    k = model.als.n_factors
    texts = [catalogue.texts[0], catalogue.texts[5], None]
    new = embed_new_items(model, texts, catalogue.vocabulary)
    assert new.n_samples == S
    prior = model.embed_items(catalogue.documents.subset([0, 5]))
    torch.testing.assert_close(new.factors[:2], prior[:, :k])
    torch.testing.assert_close(new.bias[:2], prior[:, k])
    # a user's averaged score of a new item: mean_s (u^(s) . theta + b^(s)) + theta^c + mu
    sf = model.scoring_factors()
    rows = new.scoring_rows()
    assert rows.shape == (3, sf.item.shape[1])
    scores = sf.user[:6] @ rows.T + sf.offset
    U, b = model.samples_.user[:, :6].double(), model.samples_.user_bias[:, :6].double()
    expected = ((U @ new.factors.double().T) + b.unsqueeze(2)).mean(0) + new.bias.double() + model.global_mean_
    torch.testing.assert_close(scores.double(), expected, rtol=0, atol=1e-5)
    # a user can rate them: the item side grows in every draw
    side = ItemSide.of(model).with_items(new)
    assert side.factor_samples.shape == (S, model.n_items + 3, k)
    rated = Ratings(np.array([0]), np.array([model.n_items]), np.array([5.0]), 1, side.n_items)
    assert bool(torch.isfinite(fold_in_users(side, rated).factor_samples).all())


@pytest.mark.parametrize("kind", ["pmf", "convmf-cnn"])
def test_a_sampled_model_survives_save_and_load(sampled, catalogue, split: Split, tmp_path: Path, kind: str) -> None:
    model = sampled[kind]
    loaded = load_model(save_model(model, tmp_path / "bundle", vocabulary=catalogue.vocabulary)).model
    for name in ("user", "user_bias", "item", "item_bias"):
        assert torch.equal(getattr(loaded.samples_, name), getattr(model.samples_, name)), name
    test = split.test
    np.testing.assert_array_equal(loaded.predict(test.users, test.items), model.predict(test.users, test.items))
    np.testing.assert_array_equal(loaded.score(np.arange(5)), model.score(np.arange(5)))
    assert loaded.best_validation_rmse_ == model.best_validation_rmse_
    # the loaded model folds users in against the same draws
    ratings = Ratings(np.array([0, 0]), np.array([2, 9]), np.array([4.0, 2.0]), 1, model.n_items)
    torch.testing.assert_close(fold_in_users(ItemSide.of(loaded), ratings).factor_samples,
                               fold_in_users(ItemSide.of(model), ratings).factor_samples, rtol=0, atol=0)


def test_the_fallback_drops_the_draws(catalogue, split: Split) -> None:
    """A fit worse than biases alone on validation keeps the biases: factors zeroed, no draws, a sentence."""
    # an absurd ridge on the factors' prior mean-zero and none on the biases: the factor model cannot win
    als = replace(SAMPLED_ALS, n_factors=8, lambda_u=1e-3, lambda_v=1e-3, fallback=True,
                  gibbs=GibbsConfig(samples=S, burn_in=3, lambda_u=1e-3, lambda_v=1e-3))
    model = _fit("pmf", catalogue, split, als=als)
    if model.fallback_ is None:
        pytest.fail(f"expected the fallback on this set-up; validation RMSE {model.best_validation_rmse_}")
    assert isinstance(model.fallback_, str) and "worse than" in model.fallback_
    assert model.samples_ is None
    assert float(model.user_factors_.abs().sum()) == 0.0 and float(model.item_factors_.abs().sum()) == 0.0
    val = split.validation
    rmse = float(np.sqrt(np.mean((model.predict(val.users, val.items) - val.values) ** 2)))
    assert model.best_validation_rmse_ == pytest.approx(rmse, abs=1e-5)
    assert model.scoring_factors().user.shape[1] == model.als.n_factors + 2


@pytest.mark.parametrize("kind", ["pmf", "convmf-linear"])
def test_a_warm_start_of_a_sampled_model_runs_the_short_burn_in(sampled, catalogue, split: Split, kind: str) -> None:
    previous = sampled[kind]
    users, items = IdMap(np.arange(split.train.n_users)), IdMap(np.arange(split.train.n_items))
    ws = warm_start_from(previous, users, items, users, items)  # the same catalogue, one more night
    gibbs = replace(SAMPLED_ALS.gibbs, burn_in=50, warm_start_burn_in=2)
    als = replace(SAMPLED_ALS, gibbs=gibbs)
    if kind == "pmf":
        warm = PMF(PMFConfig(als=als, device="cpu")).fit(split.train, split.validation, warm_start=ws)
    else:
        warm = ConvMF(replace(previous.config, als=als)).fit(split.train, split.validation,
                                                             documents=catalogue.documents,
                                                             vocabulary_size=len(catalogue.vocabulary),
                                                             warm_start=ws)
    assert len(warm.sampling_history_) == gibbs.warm_start_burn_in + gibbs.samples  # not burn_in + samples
    assert warm.samples_.n_samples == S
    val = split.validation
    rmse = float(np.sqrt(np.mean((warm.predict(val.users, val.items) - val.values) ** 2)))
    assert rmse == pytest.approx(warm.best_validation_rmse_, abs=1e-5)
    assert rmse < float(np.sqrt(np.mean((split.train.mean() - val.values) ** 2)))
