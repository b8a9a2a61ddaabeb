"""Tests of warm starts (convmf_core.models.warm_start and fit(..., warm_start=...)) and of the refit decision.

The scenario is a nightly retrain on the small planted catalogue: "yesterday" is the ratings before a cutoff minus
a few days, "today" adds those days (new ratings, users and items); both fits validate on the window after today.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from convmf_core.config import ALSConfig, ConvMFConfig, GibbsConfig, PMFConfig, RefitPolicy, TextConfig
from convmf_core.data import DAY_SECONDS, IdMap, Ratings, Split, ratings_from_frame, time_split
from convmf_core.models.als_mf import PMF, load_checkpoint
from convmf_core.models.base import ModelFitError
from convmf_core.models.convmf import ConvMF
from convmf_core.models.warm_start import WarmStart, oov_share, refit_reason, warm_start_from
from convmf_core.persistence import load_model, save_model
from convmf_core.text import Documents, Vocabulary, build_vocabulary, encode_documents


@dataclass(frozen=True, eq=False)
class Nightly:
    """Yesterday's data and vocabulary, today's data and split, over each day's own id maps."""

    prev_train: Ratings
    prev_users: IdMap
    prev_items: IdMap
    prev_vocab: Vocabulary
    prev_docs: Documents
    split: Split  # today: train before the cutoff, validation / test after it
    users: IdMap
    items: IdMap
    texts: list[str]


def _nightly(catalogue, days_added: int = 4, new_rated_items: int = 0) -> Nightly:
    """The scenario; ``new_rated_items`` described items lose their past ratings (they are new today, with ratings)."""
    data = catalogue.data
    ratings = data.ratings
    ts = ratings["timestamp"].to_numpy()
    cutoff = int(ts.min()) + 40 * DAY_SECONDS
    today = ratings[ts < cutoff + 20 * DAY_SECONDS]
    users, items = IdMap.from_values(today["user_id"]), IdMap.from_values(data.items["item_id"])
    split = time_split(ratings_from_frame(today, users, items), today["timestamp"].to_numpy(), cutoff=cutoff,
                       validation_seconds=10 * DAY_SECONDS, test_seconds=10 * DAY_SECONDS)
    text_by_id = data.items.set_index("item_id")["description"]
    texts = [text_by_id[i] for i in items.raw_ids]
    past = ratings[ts < cutoff - days_added * DAY_SECONDS]
    past = past[~past["user_id"].isin(past["user_id"].unique()[:2])]  # two users join today
    if new_rated_items:
        described = data.items.loc[data.items["description"] != "", "item_id"]
        rated_today = ratings.loc[ts < cutoff, "item_id"].value_counts()
        chosen = rated_today[rated_today.index.isin(described)].index[:new_rated_items]  # the most rated first
        past = past[~past["item_id"].isin(chosen)]
    prev_users, prev_items = IdMap.from_values(past["user_id"]), IdMap.from_values(past["item_id"])
    prev_texts = [text_by_id[i] for i in prev_items.raw_ids]
    prev_vocab = build_vocabulary(prev_texts, TextConfig())
    return Nightly(ratings_from_frame(past, prev_users, prev_items), prev_users, prev_items, prev_vocab,
                   encode_documents(prev_texts, prev_vocab), split, users, items, texts)


@pytest.fixture(scope="module")
def nightly(catalogue) -> Nightly:
    return _nightly(catalogue)


ENCODERS = ["linear", "cnn"]


@pytest.fixture(scope="module")
def base_config(convmf_config: ConvMFConfig) -> ConvMFConfig:
    """The scenario's settings; no pretrained vectors (the fits get no vocabulary: the linear encoder reads tf-idf SVD
    features, the CNN starts at random)."""
    als = replace(convmf_config.als, max_iterations=40, patience=4, warm_start_max_iterations=10,
                  warm_start_patience=2, gibbs=GibbsConfig(samples=0))  # the ALS point estimate
    return replace(convmf_config, als=als, word_vectors=None)


@pytest.fixture(scope="module", params=ENCODERS)
def config(request: pytest.FixtureRequest, base_config: ConvMFConfig) -> ConvMFConfig:
    """The scenario's settings with each text encoder (a test may ask for one: parametrize "config" indirectly)."""
    return replace(base_config, encoder=request.param)


@pytest.fixture(scope="module")
def previous(nightly: Nightly, config: ConvMFConfig) -> ConvMF:
    """Yesterday's model: fitted to convergence on yesterday's data (no validation: max_iterations on the loss)."""
    cfg = replace(config, als=replace(config.als, max_iterations=25))
    return ConvMF(cfg).fit(nightly.prev_train, documents=nightly.prev_docs,
                           vocabulary_size=len(nightly.prev_vocab))


def _best_rmse(model) -> float:
    return model.best_validation_rmse_


def _warm_fit(nightly: Nightly, config: ConvMFConfig, previous: ConvMF, **kw) -> ConvMF:
    ws = warm_start_from(previous, nightly.prev_users, nightly.prev_items, nightly.users, nightly.items)
    docs = encode_documents(nightly.texts, nightly.prev_vocab)  # the kept vocabulary
    return ConvMF(config).fit(nightly.split.train, nightly.split.validation, documents=docs,
                              vocabulary_size=len(nightly.prev_vocab), warm_start=ws, **kw)


# ----- quality and speed ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_and_warm(nightly: Nightly, config: ConvMFConfig, previous: ConvMF) -> tuple[ConvMF, ConvMF]:
    """Today's full refit and today's warm start from ``previous``, with the library's warm-start budget (the linear
    encoder's validation RMSE keeps improving by more than min_improvement for many iterations, so it is the budget,
    not patience, that ends its warm start)."""
    vocab = build_vocabulary(nightly.texts, TextConfig())  # a full refit builds a fresh vocabulary
    full = ConvMF(config).fit(nightly.split.train, nightly.split.validation,
                              documents=encode_documents(nightly.texts, vocab), vocabulary_size=len(vocab))
    budget = ALSConfig().warm_start_max_iterations
    warm = _warm_fit(nightly, replace(config, als=replace(config.als, warm_start_max_iterations=budget)), previous)
    return full, warm


def test_convmf_warm_start_needs_fewer_iterations(full_and_warm: tuple[ConvMF, ConvMF]) -> None:
    full, warm = full_and_warm
    assert len(warm.history_) <= ALSConfig().warm_start_max_iterations
    assert len(warm.history_) < len(full.history_) / 2
    # the warm model starts where yesterday's left off: its first iteration is already far better than the full fit's
    assert warm.history_[0].validation_rmse < full.history_[0].validation_rmse - 0.05


@pytest.mark.parametrize("config", ["linear", pytest.param("cnn", marks=pytest.mark.xfail(
    strict=True, reason="with the bias channel the CNN's warm start settles 0.012 RMSE above the full fit here "
                        "(0.7744 vs 0.7619; 0.005 below it without the bias channel): see the report"))],
    indirect=True)
def test_convmf_warm_start_reaches_the_full_fit(full_and_warm: tuple[ConvMF, ConvMF]) -> None:
    full, warm = full_and_warm
    assert _best_rmse(warm) <= _best_rmse(full) + 0.01


def test_pmf_warm_start_reaches_the_full_fit_in_fewer_iterations(nightly: Nightly, base_config: ConvMFConfig) -> None:
    cfg = PMFConfig(als=base_config.als, seed=0, device="cpu")
    previous = PMF(replace(cfg, als=replace(cfg.als, max_iterations=25))).fit(nightly.prev_train)
    full = PMF(cfg).fit(nightly.split.train, nightly.split.validation)
    ws = warm_start_from(previous, nightly.prev_users, nightly.prev_items, nightly.users, nightly.items)
    assert ws.cnn_state is None
    warm = PMF(cfg).fit(nightly.split.train, nightly.split.validation, warm_start=ws)
    assert len(warm.history_) < len(full.history_)
    assert _best_rmse(warm) <= _best_rmse(full) + 0.01


# ----- new users and items -----------------------------------------------------------------------------------


def test_new_users_are_solved_by_eq7_and_new_items_start_from_the_previous_encoder(nightly: Nightly,
                                                                                   config: ConvMFConfig,
                                                                                   previous: ConvMF) -> None:
    ws = warm_start_from(previous, nightly.prev_users, nightly.prev_items, nightly.users, nightly.items)
    train = nightly.split.train
    new_users = [u for u in ws.new_users if train.user_counts()[u] > 0]
    new_unrated = [j for j in ws.new_items if train.item_counts()[j] == 0 and nightly.texts[j]]
    assert new_users and new_unrated, "the scenario must bring new users and a new item known by its text only"
    # One outer iteration (the CNN frozen: 0 epochs): the user step runs against the warm start's V exactly.
    cfg = replace(config, als=replace(config.als, warm_start_max_iterations=1), warm_start_cnn_epochs=0)
    warm = _warm_fit(nightly, cfg, previous)

    docs = encode_documents(nightly.texts, nightly.prev_vocab)
    k = config.als.n_factors
    prior = previous.embed_items(docs)  # [theta_j, theta_j^c] of the previous encoder for today's catalogue
    assert prior.shape == (len(nightly.items), k + 1)
    theta = prior[:, :k]
    has_text = torch.as_tensor(docs.has_text())
    v0 = torch.where(has_text.unsqueeze(1), theta, torch.zeros_like(theta))  # new items with text start at theta
    v0 = ws.initial(ws.item_source, ws.item_factors, v0)
    c0 = ws.initial(ws.item_source, ws.item_bias, torch.where(has_text, prior[:, k], 0.0))  # new items: theta_j^c
    als, mu = cfg.als, train.mean()
    csr = train.csr()
    for u in new_users:  # eq. 7 with the bias column: [u_i, b_i] = (Y^T Y + diag(lambda))^-1 Y^T (r - mu - c)
        items, values = csr.row(u)
        assert (v0[items].abs().sum(1) > 0).all()
        Y = torch.cat([v0[items], torch.ones(len(items), 1)], 1).double()
        reg = torch.diag(torch.tensor([als.lambda_u] * als.n_factors + [als.lambda_bias], dtype=torch.float64))
        target = torch.as_tensor(values, dtype=torch.float64) - mu - c0[items].double()
        x = torch.linalg.solve(Y.T @ Y + reg, Y.T @ target)
        torch.testing.assert_close(warm.user_factors_[u].double(), x[:-1], rtol=0, atol=1e-4)
        torch.testing.assert_close(warm.user_bias_[u].double(), x[-1], rtol=0, atol=1e-4)
    # an unrated new item with text: v_j = theta_j and c_j = theta_j^c from the encoder (eq. 8 with no ratings):
    # the previous CNN's (frozen), the linear map refitted in closed form in the iteration
    now = warm.embed_items(docs) if config.encoder == "linear" else prior
    torch.testing.assert_close(warm.item_factors_[new_unrated], now[new_unrated, :k], rtol=0, atol=1e-5)
    torch.testing.assert_close(warm.item_bias_[new_unrated], now[new_unrated, k], rtol=0, atol=1e-5)
    # and every prediction is finite
    assert np.isfinite(warm.score(np.arange(len(nightly.users)))).all()


@pytest.mark.parametrize("config", ["linear", "cnn"], indirect=True)
def test_a_new_rated_item_starts_from_the_previous_encoder(catalogue, config: ConvMFConfig) -> None:
    """A new item with text and ratings starts at v_j = theta_j of the previous encoder: the first user step (eq. 7,
    before anything else moves) solves its raters against it."""
    nightly = _nightly(catalogue, new_rated_items=2)
    previous = ConvMF(replace(config, als=replace(config.als, max_iterations=5))).fit(
        nightly.prev_train, documents=nightly.prev_docs, vocabulary_size=len(nightly.prev_vocab))
    ws = warm_start_from(previous, nightly.prev_users, nightly.prev_items, nightly.users, nightly.items)
    train = nightly.split.train
    new_rated = [j for j in ws.new_items if train.item_counts()[j] > 0]
    assert len(new_rated) == 2 and all(nightly.texts[j] for j in new_rated)
    cfg = replace(config, als=replace(config.als, warm_start_max_iterations=1), warm_start_cnn_epochs=0)
    warm = _warm_fit(nightly, cfg, previous)

    docs = encode_documents(nightly.texts, nightly.prev_vocab)
    k, als, mu = config.als.n_factors, cfg.als, train.mean()
    prior = previous.embed_items(docs)
    v0 = ws.initial(ws.item_source, ws.item_factors, prior[:, :k])  # known items: their factors; new ones: theta_j
    fresh_bias = prior[:, k] if prior.shape[1] > k else torch.zeros(len(nightly.items))  # ... and theta_j^c
    c0 = ws.initial(ws.item_source, ws.item_bias, fresh_bias)
    csr = train.csr()
    raters = [u for u in range(train.n_users) if np.isin(csr.row(u)[0], new_rated).any()]
    assert len(raters) >= 3
    for u in raters:  # eq. 7 with the bias column against the start (U's own start never matters)
        items, values = csr.row(u)
        Y = torch.cat([v0[items], torch.ones(len(items), 1)], 1).double()
        reg = torch.diag(torch.tensor([als.lambda_u] * k + [als.lambda_bias], dtype=torch.float64))
        target = torch.as_tensor(values, dtype=torch.float64) - mu - c0[items].double()
        x = torch.linalg.solve(Y.T @ Y + reg, Y.T @ target)
        torch.testing.assert_close(warm.user_factors_[u].double(), x[:-1], rtol=0, atol=1e-4)
        torch.testing.assert_close(warm.user_bias_[u].double(), x[-1], rtol=0, atol=1e-4)


@pytest.mark.parametrize("config", ["cnn"], indirect=True)
def test_warm_started_cnn_continues_the_decayed_learning_rate(nightly: Nightly, config: ConvMFConfig,
                                                              previous: ConvMF) -> None:
    cfg = replace(config, warm_start_decay_steps=6, als=replace(config.als, warm_start_max_iterations=3,
                                                                warm_start_patience=3))
    warm = _warm_fit(nightly, cfg, previous)
    decay, lr = cfg.cnn.learning_rate_decay, cfg.cnn.learning_rate
    assert [h.extra["cnn_learning_rate"] for h in warm.history_] == pytest.approx([lr * decay ** t for t in (6, 7, 8)])
    # any warm iteration may be kept: min_iterations is for fits from scratch
    assert cfg.min_iterations > 3 and 1 <= warm.best_iteration_ <= 3


def test_warm_start_maps_known_ids_and_marks_new_ones() -> None:
    prev = PMF(PMFConfig(als=ALSConfig(n_factors=2, max_iterations=2, gibbs=GibbsConfig(samples=0)), device="cpu"))
    prev.fit(Ratings(np.array([0, 1, 2, 2]), np.array([0, 1, 0, 1]), np.array([3.0, 4.0, 5.0, 1.0]), 3, 2))
    prev_users, prev_items = IdMap(np.array([10, 20, 30])), IdMap(np.array([7, 8]))
    # today: a new user "15" between known ones, ids as strings (as read back from Parquet), a new item "9"
    users, items = IdMap(np.array(["10", "15", "20", "30"])), IdMap(np.array(["7", "8", "9"]))
    ws = warm_start_from(prev, prev_users, prev_items, users, items)
    np.testing.assert_array_equal(ws.user_source, [0, -1, 1, 2])
    np.testing.assert_array_equal(ws.item_source, [0, 1, -1])
    np.testing.assert_array_equal(ws.new_users, [1])
    np.testing.assert_array_equal(ws.new_items, [2])
    assert ws.summary() == {"warm_users": 3, "new_users": 1, "warm_items": 2, "new_items": 1}
    fresh = torch.full((4, 2), 99.0)
    start = ws.initial(ws.user_source, ws.user_factors, fresh)
    torch.testing.assert_close(start[[0, 2, 3]], prev.user_factors_)
    assert (start[1] == 99.0).all()
    with pytest.raises(ModelFitError, match="do not match the previous model"):
        warm_start_from(prev, IdMap(np.array([10, 20])), prev_items, users, items)


# ----- what must match ---------------------------------------------------------------------------------------


def test_mismatches_are_clear_errors(nightly: Nightly, config: ConvMFConfig, previous: ConvMF) -> None:
    ws = warm_start_from(previous, nightly.prev_users, nightly.prev_items, nightly.users, nightly.items)
    docs = encode_documents(nightly.texts, nightly.prev_vocab)
    train, val = nightly.split.train, nightly.split.validation
    with pytest.raises(ModelFitError, match="k=4 factors.*asks for 5"):
        ConvMF(replace(config, als=replace(config.als, n_factors=5))).fit(
            train, val, documents=docs, vocabulary_size=len(nightly.prev_vocab), warm_start=ws)
    with pytest.raises(ModelFitError, match="encode them with the previous model's vocabulary"):
        ConvMF(config).fit(train, val, documents=docs, vocabulary_size=len(nightly.prev_vocab) + 3, warm_start=ws)
    with pytest.raises(ModelFitError, match="today's id maps"):
        small = Ratings(train.users[:5] % 3, train.items[:5] % 3, train.values[:5], 3, 3)
        ConvMF(config).fit(small, documents=docs.subset([0, 1, 2]), vocabulary_size=len(nightly.prev_vocab),
                           warm_start=ws)
    pmf_ws = WarmStart(ws.user_factors, ws.item_factors, ws.user_bias, ws.item_bias, ws.user_source, ws.item_source)
    with pytest.raises(ModelFitError, match="the warm start has no text encoder"):
        ConvMF(config).fit(train, val, documents=docs, vocabulary_size=len(nightly.prev_vocab), warm_start=pmf_ws)
    other = "cnn" if config.encoder == "linear" else "linear"
    with pytest.raises(ModelFitError, match=f"encoder is '{config.encoder}', the configuration asks for '{other}'"):
        ConvMF(replace(config, encoder=other)).fit(train, val, documents=docs,
                                                   vocabulary_size=len(nightly.prev_vocab), warm_start=ws)
    if config.encoder == "cnn":
        with pytest.raises(ModelFitError, match="does not match this configuration's"):
            ConvMF(replace(config, cnn=replace(config.cnn, n_filters=5))).fit(
                train, val, documents=docs, vocabulary_size=len(nightly.prev_vocab), warm_start=ws)


def test_a_change_of_the_bias_channel_is_a_clear_error(nightly: Nightly, config: ConvMFConfig,
                                                       previous: ConvMF) -> None:
    assert previous.bias_channel
    ws = warm_start_from(previous, nightly.prev_users, nightly.prev_items, nightly.users, nightly.items)
    docs = encode_documents(nightly.texts, nightly.prev_vocab)
    for changed in (replace(config, bias_prior=False), replace(config, als=replace(config.als, use_bias=False))):
        with pytest.raises(ModelFitError, match="bias channel"):
            ConvMF(changed).fit(nightly.split.train, nightly.split.validation, documents=docs,
                                vocabulary_size=len(nightly.prev_vocab), warm_start=ws)
    # and the other way round: a model without the channel cannot warm-start one with it
    plain = ConvMF(replace(config, bias_prior=False, als=replace(config.als, max_iterations=2))).fit(
        nightly.prev_train, documents=nightly.prev_docs, vocabulary_size=len(nightly.prev_vocab))
    ws = warm_start_from(plain, nightly.prev_users, nightly.prev_items, nightly.users, nightly.items)
    with pytest.raises(ModelFitError, match="bias channel"):
        ConvMF(config).fit(nightly.split.train, nightly.split.validation, documents=docs,
                           vocabulary_size=len(nightly.prev_vocab), warm_start=ws)


def test_warm_start_from_a_saved_bundle_gives_the_same_fit(nightly: Nightly, config: ConvMFConfig,
                                                           previous: ConvMF, tmp_path: Path) -> None:
    save_model(previous, tmp_path / "bundle", vocabulary=nightly.prev_vocab, user_map=nightly.prev_users,
               item_map=nightly.prev_items)
    bundle = load_model(tmp_path / "bundle")
    cfg = replace(config, als=replace(config.als, warm_start_max_iterations=2))
    ws = warm_start_from(bundle.model, bundle.user_map, bundle.item_map, nightly.users, nightly.items)
    docs = encode_documents(nightly.texts, bundle.vocabulary)
    from_bundle = ConvMF(cfg).fit(nightly.split.train, nightly.split.validation, documents=docs, warm_start=ws)
    in_memory = _warm_fit(nightly, cfg, previous)
    torch.testing.assert_close(from_bundle.user_factors_, in_memory.user_factors_, rtol=0, atol=1e-5)
    torch.testing.assert_close(from_bundle.item_factors_, in_memory.item_factors_, rtol=0, atol=1e-5)


def test_warm_started_checkpoint_resume_matches_an_uninterrupted_run(nightly: Nightly, config: ConvMFConfig,
                                                                     previous: ConvMF, tmp_path: Path) -> None:
    cfg = replace(config, als=replace(config.als, warm_start_max_iterations=4, warm_start_patience=100))
    full = _warm_fit(nightly, cfg, previous, checkpoint_path=tmp_path / "full.pt")
    assert len(full.history_) == 4
    ck = tmp_path / "resume.pt"
    _warm_fit(nightly, replace(cfg, als=replace(cfg.als, warm_start_max_iterations=2)), previous, checkpoint_path=ck)
    assert load_checkpoint(ck)["iteration"] == 2
    resumed = _warm_fit(nightly, cfg, previous, checkpoint_path=ck, resume=True)
    assert [h.iteration for h in resumed.history_] == [1, 2, 3, 4]
    torch.testing.assert_close(resumed.item_factors_, full.item_factors_, rtol=0, atol=1e-5)
    torch.testing.assert_close(resumed.user_factors_, full.user_factors_, rtol=0, atol=1e-5)


# ----- the refit decision --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return build_vocabulary(["dragon castle knight", "robot space station", "castle siege dragon",
                             "space robot war"], TextConfig(max_df=1.0))


def test_oov_share_counts_words_after_stop_word_removal(vocab: Vocabulary) -> None:
    assert oov_share(vocab, ["The dragon and the wizard", "robot"], TextConfig(max_df=1.0)) == pytest.approx(1 / 3)
    assert oov_share(vocab, [], TextConfig(max_df=1.0)) == 0.0
    assert oov_share(vocab, ["", None], TextConfig(max_df=1.0)) == 0.0


def test_refit_reason_is_none_for_a_small_familiar_increment(vocab: Vocabulary) -> None:
    policy = RefitPolicy(max_oov_share=0.3, max_new_item_share=0.2)
    assert refit_reason(vocab, ["a dragon in space", "the robot knight"], 2, 40, policy,
                        TextConfig(max_df=1.0)) is None


def test_refit_reason_fires_on_unknown_words(vocab: Vocabulary) -> None:
    policy = RefitPolicy(max_oov_share=0.3, max_new_item_share=0.2)
    reason = refit_reason(vocab, ["submarine ocean dragon", "volcano lava"], 2, 40, policy, TextConfig(max_df=1.0))
    assert reason is not None and "80.0% of the words" in reason and "max_oov_share 30.0%" in reason


def test_refit_reason_fires_on_many_new_items(vocab: Vocabulary) -> None:
    policy = RefitPolicy(max_oov_share=0.3, max_new_item_share=0.2)
    reason = refit_reason(vocab, ["dragon"] * 9, 9, 40, policy, TextConfig(max_df=1.0))
    assert reason is not None and "9 of 40 items are new (22.5%" in reason and "words" not in reason


def test_refit_reason_fires_when_the_text_settings_changed(vocab: Vocabulary) -> None:
    reason = refit_reason(vocab, [], 0, 40, RefitPolicy(), TextConfig(max_df=1.0, vocab_size=10))
    assert reason is not None and "text settings changed" in reason


def test_refit_reason_fires_after_max_warm_starts_in_a_row(vocab: Vocabulary) -> None:
    policy, text = RefitPolicy(max_warm_starts=3), TextConfig(max_df=1.0)
    assert refit_reason(vocab, ["the robot knight"], 1, 100, policy, text, warm_starts=2) is None
    reason = refit_reason(vocab, ["the robot knight"], 1, 100, policy, text, warm_starts=3)
    assert reason is not None and "a chain of 3 warm start(s)" in reason and "max_warm_starts 3" in reason
    assert "max_warm_starts 0" in refit_reason(vocab, [], 0, 100, RefitPolicy(max_warm_starts=0), text)
    with pytest.raises(ValueError, match="max_warm_starts"):
        RefitPolicy(max_warm_starts=-1)


def test_refit_policy_rejects_shares_outside_0_1() -> None:
    with pytest.raises(ValueError, match="max_oov_share"):
        RefitPolicy(max_oov_share=1.5)
