"""Fold-in without retraining (convmf_core.foldin): eq. 7 against a fixed V, and theta_j for new descriptions.

Uses the session's small fitted models (tests/conftest.py); each test takes well under a second.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from convmf_core.als import solve_ridge_reference
from convmf_core.config import ALSConfig, GibbsConfig, PMFConfig
from convmf_core.data import DataError, Ratings, Split
from convmf_core.foldin import FoldInError, ItemSide, NewItems, UserFactors, embed_new_items, fold_in_users
from convmf_core.models.als_mf import PMF, _ALSProblem, _Factors
from convmf_core.models.convmf import ConvMF
from convmf_core.text import Vocabulary, encode_documents

ENCODERS = ["linear", "cnn"]


@pytest.fixture(scope="module")
def by_encoder(convmf_config, catalogue, split: Split) -> dict[str, ConvMF]:
    """One ConvMF per text encoder, fitted with the vocabulary: the linear encoder on the packaged GloVe vectors, the
    CNN without pretrained vectors."""
    point = replace(convmf_config, als=replace(convmf_config.als, gibbs=GibbsConfig(samples=0)))
    configs = {"linear": replace(point, encoder="linear"), "cnn": replace(point, encoder="cnn", word_vectors=None)}
    return {enc: ConvMF(cfg).fit(split.train, split.validation, documents=catalogue.documents,
                                 vocabulary=catalogue.vocabulary) for enc, cfg in configs.items()}


def _user_rows(ratings: Ratings, users: np.ndarray) -> Ratings:
    """The ratings of ``users`` re-indexed 0..len(users)-1 (a fold-in request for those users)."""
    position = np.full(ratings.n_users, -1, dtype=np.int64)
    position[users] = np.arange(len(users))
    keep = position[ratings.users] >= 0
    return Ratings(position[ratings.users[keep]], ratings.items[keep], ratings.values[keep], len(users),
                   ratings.n_items)


def _reference(model: ConvMF | PMF, ratings: Ratings) -> np.ndarray:
    """eq. 7 one user at a time in float64 numpy, targets net of mu and c_j, [V, 1] design with biases."""
    side = ItemSide.of(model)
    V = model.item_factors_.double().numpy()
    if side.use_bias:
        targets = ratings.values - side.global_mean - model.item_bias_.numpy()[ratings.items]
        Y = np.concatenate([V, np.ones((len(V), 1))], 1)
    else:
        targets, Y = ratings.values, V
    net = Ratings(ratings.users, ratings.items, targets, ratings.n_users, ratings.n_items)
    return solve_ridge_reference(net.csr(), Y, side.ridge().double().numpy())


@pytest.mark.parametrize("encoder", ["linear-svd"] + ENCODERS)
def test_folded_in_users_equal_the_als_user_update(fitted: dict, by_encoder: dict, split: Split, encoder: str) -> None:
    model: ConvMF = fitted["convmf"].model if encoder == "linear-svd" else by_encoder[encoder]
    side = ItemSide.of(model)
    folded = fold_in_users(side, split.train)
    # The training loop's own eq. 7 half-step with the same V, c and ratings.
    problem = _ALSProblem(split.train, model.als, torch.device("cpu"))
    factors = _Factors(torch.zeros_like(model.user_factors_), model.item_factors_.clone(),
                       torch.zeros_like(model.user_bias_), model.item_bias_.clone(), None)
    problem.solve_users(factors)
    torch.testing.assert_close(folded.factors, factors.U, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(folded.bias, factors.bu, rtol=1e-4, atol=1e-5)
    reference = _reference(model, split.train)
    np.testing.assert_allclose(folded.factors.numpy(), reference[:, :-1], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(folded.bias.numpy(), reference[:, -1], rtol=1e-3, atol=1e-4)
    # Batched in blocks of 7 users: the same solution.
    torch.testing.assert_close(fold_in_users(side, split.train, block_rows=7).factors, folded.factors)
    # Scoring rows have the model's layout: [u, b, 1] @ [v, 1, c] + mu is the predicted rating.
    sf = model.scoring_factors()
    assert folded.scoring_rows().shape[1] == sf.user.shape[1]


def test_a_few_ratings_of_three_users_fold_in_as_a_request(fitted: dict, split: Split) -> None:
    model: ConvMF = fitted["convmf"].model
    users = np.array([3, 11, 40])
    request = _user_rows(split.train, users)
    folded = fold_in_users(ItemSide.of(model), request)
    assert len(folded) == 3 and bool(torch.isfinite(folded.factors).all())
    np.testing.assert_allclose(folded.factors.numpy(), _reference(model, request)[:, :-1], rtol=1e-3, atol=1e-4)
    # A pair given twice keeps its last rating.
    first = Ratings(np.array([0, 0]), np.array([5, 5]), np.array([1.0, 5.0]), 1, model.n_items)
    last = Ratings(np.array([0]), np.array([5]), np.array([5.0]), 1, model.n_items)
    torch.testing.assert_close(fold_in_users(ItemSide.of(model), first).factors,
                               fold_in_users(ItemSide.of(model), last).factors)
    # A user with no rating gets the ridge's prior: zero factors and bias.
    nobody = fold_in_users(ItemSide.of(model), Ratings(np.zeros(0), np.zeros(0), np.zeros(0), 2, model.n_items))
    assert float(nobody.factors.abs().sum()) == 0.0 and float(nobody.bias.abs().sum()) == 0.0


def test_known_user_update_equals_eq7_on_old_and_new_ratings(fitted: dict, split: Split) -> None:
    model: ConvMF = fitted["convmf"].model
    side = ItemSide.of(model)
    users = np.array([0, 1, 2, 7])
    mine = _user_rows(split.train, users)
    rng = np.random.default_rng(0)
    is_new = rng.random(len(mine)) < 0.4
    old, new = mine.subset(~is_new), mine.subset(is_new)
    previous = fold_in_users(side, old)  # x_old: the eq. 7 solution of the old ratings against this V
    updated = fold_in_users(side, new, previous=previous, history=old.csr())
    together = fold_in_users(side, mine)
    torch.testing.assert_close(updated.factors, together.factors, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(updated.bias, together.bias, rtol=1e-3, atol=1e-4)
    # No new rating: the known user keeps exactly what the model has.
    empty = Ratings(np.zeros(0), np.zeros(0), np.zeros(0), len(users), side.n_items)
    unchanged = fold_in_users(side, empty, previous=previous, history=old.csr())
    torch.testing.assert_close(unchanged.factors, previous.factors, rtol=1e-4, atol=1e-5)
    # New ratings move the user: a 5 on an item pulls its predicted rating up.
    item = int(np.setdiff1d(np.arange(side.n_items), old.items[old.users == 0])[0])
    five = Ratings(np.array([0]), np.array([item]), np.array([5.0]), len(users), side.n_items)
    moved = fold_in_users(side, five, previous=previous, history=old.csr())
    row = side.factors[item]
    before = float(previous.factors[0] @ row + previous.bias[0])
    after = float(moved.factors[0] @ row + moved.bias[0])
    assert after > before


def test_model_without_biases_folds_in_like_the_reference(split: Split) -> None:
    model = PMF(PMFConfig(als=ALSConfig(n_factors=3, lambda_u=2.0, lambda_v=5.0, use_bias=False, max_iterations=2,
                                        gibbs=GibbsConfig(samples=0)),
                          seed=0, device="cpu")).fit(split.train)
    side = ItemSide.of(model)
    assert not side.use_bias and side.global_mean == 0.0
    folded = fold_in_users(side, split.train)
    np.testing.assert_allclose(folded.factors.numpy(), _reference(model, split.train), rtol=1e-3, atol=1e-4)
    assert float(folded.bias.abs().sum()) == 0.0


@pytest.mark.parametrize("encoder", ["linear-svd"] + ENCODERS)
def test_new_items_are_their_text_embedding(fitted: dict, by_encoder: dict, split: Split, catalogue,
                                            encoder: str) -> None:
    model: ConvMF = fitted["convmf"].model if encoder == "linear-svd" else by_encoder[encoder]
    k = model.als.n_factors
    texts = ["a brand new description " + catalogue.texts[0], catalogue.texts[1], "zzzz qqqq", None]
    new = embed_new_items(model, texts, catalogue.vocabulary)
    assert new.n_samples == 0  # a point model
    expected = model.embed_items(encode_documents(texts, catalogue.vocabulary)).detach()
    assert expected.shape == (4, k + 1) and model.bias_channel
    torch.testing.assert_close(new.factors, expected[:, :k])  # theta_j
    torch.testing.assert_close(new.bias, expected[:, k])  # theta_j^c, the bias channel
    assert new.has_text.tolist() == [True, True, False, False]
    assert float(new.bias[:2].abs().min()) > 0.0  # described items get the text's bias
    assert float(new.factors[2:].abs().sum()) == 0.0 and float(new.bias[2:].abs().sum()) == 0.0
    # scoring rows are [theta_j, 1, theta_j^c], the model's item layout
    torch.testing.assert_close(new.scoring_rows(), torch.cat([expected[:, :k], torch.ones(4, 1), expected[:, k:]], 1))
    # An item with text and no training rating holds v_j = theta_j: a new item gets the same treatment.
    unrated = np.flatnonzero((split.train.item_counts() == 0) & model.item_has_text_.numpy())
    assert len(unrated) > 0
    again = embed_new_items(model, [catalogue.texts[j] for j in unrated], catalogue.vocabulary)
    torch.testing.assert_close(again.factors, model.item_factors_[torch.as_tensor(unrated)], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again.bias, model.item_bias_[torch.as_tensor(unrated)], atol=1e-5, rtol=0)
    # Users can rate the new items: the item side grows by the new rows.
    side = ItemSide.of(model).with_items(new)
    assert side.n_items == model.n_items + 4
    rated_new = Ratings(np.array([0, 0]), np.array([model.n_items, model.n_items + 1]), np.array([5.0, 4.0]), 1,
                        side.n_items)
    assert bool(torch.isfinite(fold_in_users(side, rated_new).factors).all())


def test_bad_input_gets_a_clear_error(fitted: dict, split: Split, catalogue) -> None:
    convmf: ConvMF = fitted["convmf"].model
    side = ItemSide.of(convmf)
    with pytest.raises(FoldInError, match="needs an ALS model"):
        ItemSide.of(fitted["sgd"].model)
    with pytest.raises(FoldInError, match="has no text encoder"):
        embed_new_items(fitted["pmf"].model, ["text"], catalogue.vocabulary)
    with pytest.raises(FoldInError, match="item columns"):
        fold_in_users(side, Ratings(np.array([0]), np.array([0]), np.array([3.0]), 1, side.n_items + 1))
    with pytest.raises(DataError, match="item index out of range"):
        Ratings(np.array([0]), np.array([side.n_items]), np.array([3.0]), 1, side.n_items)
    with pytest.raises(DataError, match="finite"):
        Ratings(np.array([0]), np.array([0]), np.array([np.nan]), 1, side.n_items)
    one = Ratings(np.array([0]), np.array([0]), np.array([3.0]), 1, side.n_items)
    with pytest.raises(FoldInError, match="history without previous"):
        fold_in_users(side, one, history=one.csr())
    with pytest.raises(FoldInError, match="previous has 2 users"):
        fold_in_users(side, one, previous=UserFactors(torch.zeros(2, 4), torch.zeros(2)))
    with pytest.raises(FoldInError, match="use the vocabulary saved with the model"):
        embed_new_items(convmf, ["text"], Vocabulary(("only", "two")))
    with pytest.raises(FoldInError, match="must be strings"):
        embed_new_items(convmf, ["fine", 42], catalogue.vocabulary)  # type: ignore[list-item]
    with pytest.raises(FoldInError, match="factors"):
        side.with_items(NewItems(torch.zeros(1, 9), torch.zeros(1), np.array([True])))
