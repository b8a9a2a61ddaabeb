"""The text prior of ConvMF: the linear encoder's closed form and document vectors, the item-bias channel, the
held-out R^2 report, and a tiny catalogue fitted with the default settings.

Small generated data; each test takes at most a second or two (the packaged GloVe vectors load once per session).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from convmf_core.config import ALSConfig, ConvMFConfig, GibbsConfig, TextConfig
from convmf_core.data import Ratings, random_split
from convmf_core.linear_encoder import DocumentFeatures, fit_ridge_map, inverse_document_frequency
from convmf_core.models.convmf import ConvMF
from convmf_core.synthetic import SyntheticConfig
from convmf_core.text import Documents, build_vocabulary, encode_documents

POINT = GibbsConfig(samples=0)  # the ALS point estimate (posterior averaging: tests/test_gibbs.py)
FAST_ALS = ALSConfig(n_factors=4, lambda_u=1.0, lambda_v=10.0, max_iterations=10, patience=3, gibbs=POINT)


# ----- the closed form (eq. 9') --------------------------------------------------------------------------------


def _ridge_by_lstsq(x: np.ndarray, t: np.ndarray, alpha: float, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """argmin sum_j w_j ||t_j - W^T x_j - b||^2 + alpha ||W||^2 as one least-squares problem: rows sqrt(w_j) [x_j, 1]
    -> sqrt(w_j) t_j, plus rows sqrt(alpha) [I, 0] -> 0 (the intercept b is not penalised)."""
    n, f = x.shape
    design = np.sqrt(w)[:, None] * np.hstack([x, np.ones((n, 1))])
    penalty = np.hstack([math.sqrt(alpha) * np.eye(f), np.zeros((f, 1))])
    solution = np.linalg.lstsq(np.vstack([design, penalty]),
                               np.vstack([np.sqrt(w)[:, None] * t, np.zeros((f, t.shape[1]))]), rcond=None)[0]
    return solution[:f], solution[f]


def test_the_ridge_map_is_the_direct_solution() -> None:
    rng = np.random.default_rng(0)
    n, f, d, alpha = 40, 6, 3, 2.5
    x = rng.normal(size=(n, f)) + rng.normal(size=f)  # features not centred
    t = x @ rng.normal(size=(f, d)) + np.array([1.0, -2.0, 0.5]) + 0.3 * rng.normal(size=(n, d))
    W, b = fit_ridge_map(torch.as_tensor(x), torch.as_tensor(t), alpha)
    W_ref, b_ref = _ridge_by_lstsq(x, t, alpha, np.ones(n))
    np.testing.assert_allclose(W.numpy(), W_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b.numpy(), b_ref, rtol=1e-4, atol=1e-5)
    assert W.shape == (f, d) and b.shape == (d,) and W.is_contiguous()
    # weights of mean 1 are used as given ...
    w = rng.uniform(0.2, 3.0, size=n)
    w = w / w.mean()
    W, b = fit_ridge_map(torch.as_tensor(x), torch.as_tensor(t), alpha, torch.as_tensor(w))
    W_ref, b_ref = _ridge_by_lstsq(x, t, alpha, w)
    np.testing.assert_allclose(W.numpy(), W_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b.numpy(), b_ref, rtol=1e-4, atol=1e-5)
    assert not np.allclose(W_ref, _ridge_by_lstsq(x, t, alpha, np.ones(n))[0], atol=1e-3)  # they do matter
    # ... and any other weights are rescaled to mean 1 first (alpha keeps its meaning)
    W3, b3 = fit_ridge_map(torch.as_tensor(x), torch.as_tensor(t), alpha, torch.as_tensor(3.0 * w))
    torch.testing.assert_close(W3, W, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b3, b, rtol=1e-5, atol=1e-6)
    # the intercept is not shrunk: under a huge ridge W -> 0 and b -> the (weighted) mean target
    W, b = fit_ridge_map(torch.as_tensor(x), torch.as_tensor(t), 1e12, torch.as_tensor(w))
    assert float(W.abs().max()) < 1e-6
    np.testing.assert_allclose(b.numpy(), (w[:, None] * t).sum(0) / w.sum(), rtol=1e-5, atol=1e-5)


# ----- document vectors ------------------------------------------------------------------------------------------


def test_a_document_vector_is_the_tfidf_weighted_mean_of_its_word_vectors() -> None:
    # word ids 1..4; word 3 has no pretrained vector (its row is noise that must not count)
    words = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, -7.0], [2.0, 2.0]], dtype=np.float32)
    found = np.array([False, True, True, False, True])
    docs = Documents.from_lists([[1, 1, 2, 3], [2, 4], [], [3, 3]])  # the last: only the word without a vector
    features = DocumentFeatures.fit(docs, 4, words, found, svd_dim=0, seed=0)
    # idf(w) = ln((1 + N) / (1 + df(w))) + 1 with N = 3 documents with text
    df = np.array([0, 1, 2, 2, 1])
    idf = np.log(4.0 / (1.0 + df)) + 1.0
    np.testing.assert_allclose(inverse_document_frequency(docs, 4).numpy()[1:], idf[1:], rtol=1e-6)
    # document 0: tf(1) = 2/4, tf(2) = 1/4, word 3 skipped
    a, b = 2 / 4 * idf[1], 1 / 4 * idf[2]
    x0 = (a * words[1] + b * words[2]) / (a + b)
    a, b = 1 / 2 * idf[2], 1 / 2 * idf[4]
    x1 = (a * words[2] + b * words[4]) / (a + b)
    raw = features.raw(docs).numpy()
    np.testing.assert_allclose(raw[0], x0, rtol=1e-5)
    np.testing.assert_allclose(raw[1], x1, rtol=1e-5)
    np.testing.assert_array_equal(raw[2:], 0.0)
    # standardised over the documents that have a word with a vector (0 and 1); the others get zero rows
    x = features(docs).numpy()
    mean, std = (x0 + x1) / 2, np.abs(x0 - x1) / np.sqrt(2.0)
    np.testing.assert_allclose(x[:2], (np.stack([x0, x1]) - mean) / std, rtol=1e-4)
    np.testing.assert_array_equal(x[2:], 0.0)
    # the vector of a word without one never counts
    other = words.copy()
    other[3] = [-100.0, 100.0]
    again = DocumentFeatures.fit(docs, 4, other, found, svd_dim=0, seed=0)
    torch.testing.assert_close(again(docs), features(docs))
    # saved and restored, the features are the same
    restored = DocumentFeatures.from_state(features.state_dict())
    torch.testing.assert_close(restored(docs), features(docs), rtol=0, atol=0)


def test_without_word_vectors_the_features_are_tfidf_svd_components() -> None:
    rng = np.random.default_rng(0)
    docs = Documents.from_lists([rng.integers(1, 21, size=8).tolist() for _ in range(12)] + [[]])
    features = DocumentFeatures.fit(docs, 20, None, None, svd_dim=4, seed=0)
    x = features(docs)
    assert features.n_features == 4 and x.shape == (13, 4)
    assert torch.equal(x[12], torch.zeros(4))  # no text: a zero row
    torch.testing.assert_close(x[:12].mean(0), torch.zeros(4), rtol=0, atol=1e-5)  # standardised over the texts
    torch.testing.assert_close(x[:12].std(0), torch.ones(4), rtol=0, atol=1e-4)


# ----- the item-bias channel -------------------------------------------------------------------------------------

GOOD = ("excellent", "wonderful", "superb", "brilliant", "masterpiece", "delightful", "charming", "stunning")
BAD = ("terrible", "awful", "boring", "dreadful", "horrible", "dull", "mediocre", "tedious")
NEUTRAL = ("story", "city", "family", "river", "journey", "house", "village", "summer", "letter", "garden")


def _planted_bias(n_users: int = 80, n_items: int = 60, n_cold: int = 12, per_user: int = 20, seed: int = 0
                  ) -> tuple[Ratings, list[str], np.ndarray, np.ndarray]:
    """Ratings 3 +/- 1 by item (+1 when its description has GOOD words, -1 for BAD ones) + user bias + noise;
    ``n_cold`` described items have no rating. Returns (ratings, texts, planted item bias, cold items)."""
    rng = np.random.default_rng(seed)
    good = rng.random(n_items) < 0.5
    bias = np.where(good, 1.0, -1.0)
    texts = []
    for j in range(n_items):
        words = [*rng.choice(GOOD if good[j] else BAD, 3, replace=False), *rng.choice(NEUTRAL, 5, replace=False)]
        texts.append(" ".join(rng.permutation(words)))
    cold = np.sort(rng.choice(n_items, n_cold, replace=False))
    warm = np.setdiff1d(np.arange(n_items), cold)
    users = np.repeat(np.arange(n_users), per_user)
    items = np.concatenate([rng.choice(warm, per_user, replace=False) for _ in range(n_users)])
    values = 3.0 + bias[items] + rng.normal(0, 0.3, n_users)[users] + rng.normal(0, 0.5, len(users))
    return Ratings(users, items, np.clip(values, 1, 5).astype(np.float32), n_users, n_items), texts, bias, cold


@pytest.fixture(scope="module")
def planted() -> tuple[Ratings, list[str], np.ndarray, np.ndarray]:
    return _planted_bias()


def _fit_linear(ratings: Ratings, texts: list[str], **config) -> tuple[ConvMF, object]:
    vocabulary = build_vocabulary(texts, TextConfig(max_df=1.0))
    split = random_split(ratings, seed=0)
    als = ALSConfig(n_factors=4, lambda_u=10.0, lambda_v=30.0, gibbs=POINT)
    model = ConvMF(ConvMFConfig(als=als, encoder="linear", device="cpu", **config))
    return model.fit(split.train, split.validation, documents=encode_documents(texts, vocabulary),
                     vocabulary=vocabulary), vocabulary


def test_the_bias_channel_recovers_a_text_driven_item_bias(planted) -> None:
    ratings, texts, bias, cold = planted
    model, vocabulary = _fit_linear(ratings, texts)
    assert model.bias_channel and model.vector_coverage_["oov"] == 0  # GloVe knows every word
    assert np.all(ratings.item_counts()[cold] == 0)
    fitted = model.item_bias_.numpy()[cold]  # cold items: c_j = theta_j^c, from their text alone
    assert np.corrcoef(fitted, bias[cold])[0, 1] > 0.9, (fitted, bias[cold])
    assert np.all(np.sign(fitted) == bias[cold])
    # a description written after training
    k = model.als.n_factors
    new = model.embed_items(encode_documents(["a superb and brilliant story", "an awful boring journey"], vocabulary))
    assert float(new[0, k]) > 0.2 and float(new[1, k]) < -0.2
    # without the bias channel the text says nothing about c_j: a cold item's bias is its prior mean 0
    plain, _ = _fit_linear(ratings, texts, bias_prior=False)
    assert not plain.bias_channel
    assert np.all(plain.item_bias_.numpy()[cold] == 0.0)
    # and the model with the channel predicts the cold items' ratings far better (the truth: 3 +/- 1)
    with_channel = model.global_mean_ + fitted
    without = plain.global_mean_ + plain.item_bias_.numpy()[cold]
    truth = 3.0 + bias[cold]
    assert np.abs(with_channel - truth).mean() < 0.5 * np.abs(without - truth).mean()


# ----- the held-out R^2 report -----------------------------------------------------------------------------------


def test_the_heldout_r2_is_higher_for_text_that_carries_signal(catalogue, split, planted) -> None:
    """prior_heldout_r2 (factors, on the topic catalogue) and prior_heldout_r2_bias (on the planted bias) for the
    real descriptions and for the same descriptions shuffled among the items."""
    perm = np.random.default_rng(0).permutation(len(catalogue.texts))
    shuffled = encode_documents([catalogue.texts[i] for i in perm], catalogue.vocabulary)
    reports = {}
    for name, docs in (("real", catalogue.documents), ("shuffled", shuffled)):
        model = ConvMF(ConvMFConfig(als=FAST_ALS, encoder="linear", device="cpu")).fit(
            split.train, split.validation, documents=docs, vocabulary=catalogue.vocabulary)
        reports[name] = model.prior_report_
    assert set(reports["real"]) == {"prior_heldout_r2", "prior_heldout_r2_bias"}
    assert reports["real"]["prior_heldout_r2"] > 0.2
    assert reports["real"]["prior_heldout_r2"] > reports["shuffled"]["prior_heldout_r2"] + 0.2, reports

    ratings, texts, _, _ = planted
    real, _ = _fit_linear(ratings, texts)
    mixed = [texts[i] for i in np.random.default_rng(1).permutation(len(texts))]
    noise, _ = _fit_linear(ratings, mixed)
    assert real.prior_report_["prior_heldout_r2_bias"] > 0.5
    assert real.prior_report_["prior_heldout_r2_bias"] > noise.prior_report_["prior_heldout_r2_bias"] + 0.3, \
        (real.prior_report_, noise.prior_report_)


def test_the_cnn_reports_its_heldout_r2_too(catalogue, split, tiny_cnn) -> None:
    config = ConvMFConfig(als=replace(FAST_ALS, max_iterations=2), cnn=replace(tiny_cnn, heldout_epochs=2),
                          encoder="cnn", word_vectors=None, min_iterations=1, device="cpu")
    model = ConvMF(config).fit(split.train, split.validation, documents=catalogue.documents,
                               vocabulary=catalogue.vocabulary)
    assert set(model.prior_report_) == {"prior_heldout_r2", "prior_heldout_r2_bias"}
    assert all(math.isfinite(v) and v <= 1.0 for v in model.prior_report_.values())
    # without the bias channel there is no bias figure
    plain = ConvMF(replace(config, bias_prior=False)).fit(split.train, split.validation,
                                                          documents=catalogue.documents,
                                                          vocabulary=catalogue.vocabulary)
    assert set(plain.prior_report_) == {"prior_heldout_r2"}



def test_a_ready_word_vector_matrix_is_used_and_its_coverage_reported(catalogue, split) -> None:
    """fit(word_vectors=matrix): the linear encoder's document vectors come from it, and its coverage counts the
    rows it gives a vector (row 0 is padding)."""
    n = len(catalogue.vocabulary)
    matrix = np.random.default_rng(0).normal(size=(n + 1, 6)).astype(np.float32)
    matrix[0], matrix[1:4] = 0.0, 0.0  # three words without a vector
    model = ConvMF(ConvMFConfig(als=replace(FAST_ALS, max_iterations=2), device="cpu")).fit(
        split.train, split.validation, documents=catalogue.documents, vocabulary_size=n, word_vectors=matrix)
    coverage = model.vector_coverage_
    assert (coverage["n_words"], coverage["found"], coverage["oov"]) == (n, n - 3, 3)
    assert model.encoder_.features.word_matrix.shape == (n + 1, 6)


# ----- the default settings on a tiny catalogue ------------------------------------------------------------------


def test_a_tiny_catalogue_with_the_default_settings_beats_the_global_mean(make_catalogue) -> None:
    """30 users x 15 items whose ratings follow two topics the descriptions reveal. With defaults made for ML-100K
    (k=10) the fit may fall back to the biases or the global mean; whatever it keeps must beat the global mean."""
    cat = make_catalogue(SyntheticConfig(n_users=30, n_items=15, n_topics=2, ratings_per_user=10,
                                         ratings_per_user_sigma=0.3, words_per_description=15, words_per_topic=10,
                                         n_filler_words=10, share_without_text=0.0, share_unrated=0.0, seed=0))
    split = random_split(cat.ratings, (0.6, 0.2, 0.2), seed=0)
    model = ConvMF(ConvMFConfig(device="cpu")).fit(split.train, split.validation, documents=cat.documents,
                                                   vocabulary=cat.vocabulary)
    assert model.fallback_ is None or (isinstance(model.fallback_, str) and model.fallback_.strip())
    test = split.test
    rmse = float(np.sqrt(np.mean((model.predict(test.users, test.items) - test.values) ** 2)))
    global_mean = float(np.sqrt(np.mean((split.train.mean() - test.values) ** 2)))
    assert rmse < global_mean, (rmse, global_mean, model.fallback_)
