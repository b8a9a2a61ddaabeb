"""Tests of the document CNN (convmf_core.cnn): masked max-pool, dropout, training step, seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from convmf_core.cnn import TextCNN, build_cnn, embed, make_optimizer, train_epochs
from convmf_core.config import CNNConfig
from convmf_core.text import Documents

N_WORDS = 30  # word ids 1..30
K = 4
CONFIG = CNNConfig(embedding_dim=16, n_filters=8, hidden_dim=16, window_sizes=(3, 4, 5), dropout=0.2,
                   batch_size=8, learning_rate=1e-2)


def _docs(lengths: list[int], seed: int = 0) -> Documents:
    rng = np.random.default_rng(seed)
    return Documents.from_lists([rng.integers(1, N_WORDS + 1, size=n).tolist() for n in lengths])


def _model(seed: int = 0, config: CNNConfig = CONFIG) -> TextCNN:
    return build_cnn(N_WORDS + 1, K, config, seed=seed)


LENGTHS = [1, 2, 4, 5, 9, 17, 25, 3]  # several shorter than the widest window (5)


def test_padding_does_not_leak_into_the_max_pool() -> None:
    model = _model().eval()
    docs = _docs(LENGTHS)
    ids, lens = docs.padded_batch(np.arange(len(docs)), min_length=model.min_length)
    assert ids.shape == (len(docs), max(LENGTHS))
    with torch.no_grad():
        own = model(ids, lens)
        long = model(F.pad(ids, (0, 300 - ids.shape[1])), lens)  # the same documents padded to 300 words
        singles = torch.cat([model(*docs.padded_batch([i], min_length=model.min_length)) for i in range(len(docs))])
        as_content = model(F.pad(ids, (0, 300 - ids.shape[1])), torch.full_like(lens, 300))
    assert own.shape == (len(docs), K)
    torch.testing.assert_close(long, own, rtol=0, atol=1e-6)
    torch.testing.assert_close(singles, own, rtol=0, atol=1e-6)  # padded to their own length, one at a time
    # Control: if the padding positions were pooled (lengths = 300), the output would change.
    assert not torch.allclose(as_content, own, atol=1e-4)


def test_documents_shorter_than_the_widest_window() -> None:
    model = _model().eval()
    docs = _docs([1, 2, 4])
    ids, lens = docs.padded_batch([0, 1, 2], min_length=model.min_length)
    assert ids.shape[1] == model.min_length == 5
    with torch.no_grad():
        out = model(ids, lens)
    assert out.shape == (3, K) and torch.isfinite(out).all()
    assert (out.abs() < 1).all()  # tanh output
    assert not torch.allclose(out[0], out[1])  # the words do matter
    theta = embed(model, docs, np.arange(3), torch.device("cpu"))
    torch.testing.assert_close(theta, out, rtol=0, atol=1e-6)


def test_embed_returns_rows_in_the_order_asked() -> None:
    model = _model()
    docs = _docs(LENGTHS)
    all_rows = embed(model, docs, np.arange(len(docs)), torch.device("cpu"), batch_size=3)
    order = np.array([6, 0, 3, 7])
    torch.testing.assert_close(embed(model, docs, order, torch.device("cpu")), all_rows[order], rtol=0, atol=1e-6)
    assert embed(model, docs, np.zeros(0, dtype=np.int64), torch.device("cpu")).shape == (0, K)
    assert not model.training  # embed evaluates without dropout


def _projection_inputs(model: TextCNN, ids: torch.Tensor, lens: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (post-dropout) input of the projection layer and the model output."""
    seen: list[torch.Tensor] = []
    handle = model.projection.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            out = model(ids, lens, generator=generator)
    finally:
        handle.remove()
    return seen[0], out


def test_dropout_in_training_only() -> None:
    model = _model()
    docs = _docs([int(n) for n in np.random.default_rng(1).integers(1, 30, size=256)], seed=2)
    ids, lens = docs.padded_batch(np.arange(len(docs)), min_length=model.min_length)

    model.eval()
    z_eval, out_eval = _projection_inputs(model, ids, lens, torch.Generator().manual_seed(1))
    z_eval2, out_eval2 = _projection_inputs(model, ids, lens, torch.Generator().manual_seed(2))
    assert torch.equal(out_eval, out_eval2)  # eval: deterministic, no generator involved
    assert (z_eval != 0).all()  # tanh of the dense layer: no exact zeros without dropout

    model.train()
    z_a, out_a = _projection_inputs(model, ids, lens, torch.Generator().manual_seed(1))
    _, out_a2 = _projection_inputs(model, ids, lens, torch.Generator().manual_seed(1))
    _, out_b = _projection_inputs(model, ids, lens, torch.Generator().manual_seed(2))
    assert torch.equal(out_a, out_a2)  # seeded by the generator
    assert not torch.equal(out_a, out_b)  # ... and varies with it
    assert not torch.allclose(out_a, out_eval)

    dropped = (z_a == 0).float().mean().item()
    assert abs(dropped - 0.2) < 0.03, dropped  # p = 0.2 is the drop probability (4096 units)
    kept = z_a != 0
    torch.testing.assert_close(z_a[kept], z_eval[kept] / 0.8, rtol=1e-5, atol=1e-6)  # inverted dropout scaling

    no_dropout = build_cnn(N_WORDS + 1, K, CNNConfig(**{**CONFIG.__dict__, "dropout": 0.0}), seed=0).train()
    z_none, _ = _projection_inputs(no_dropout, ids, lens, torch.Generator().manual_seed(1))
    assert (z_none != 0).all()


def _eval_loss(model: TextCNN, docs: Documents, items: np.ndarray, targets: torch.Tensor) -> float:
    theta = embed(model, docs, items, torch.device("cpu"))
    return float(((theta - targets[torch.as_tensor(items)]) ** 2).sum(dim=1).mean())


def test_train_epochs_reduces_the_loss() -> None:
    docs = _docs([int(n) for n in np.random.default_rng(3).integers(3, 20, size=40)], seed=4)
    items = np.arange(len(docs))
    targets = torch.rand(len(docs), K, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    model = _model()
    optimizer = make_optimizer(model, CONFIG)
    gen = torch.Generator().manual_seed(0)
    before = _eval_loss(model, docs, items, targets)
    first = train_epochs(model, optimizer, docs, items, targets, None, 1, CONFIG.batch_size, gen)
    last = train_epochs(model, optimizer, docs, items, targets, None, 15, CONFIG.batch_size, gen)
    after = _eval_loss(model, docs, items, targets)
    assert np.isfinite(first) and np.isfinite(last)
    assert last < 0.7 * first
    assert after < 0.5 * before


def test_train_epochs_is_seeded_and_uses_weights() -> None:
    docs = _docs([5, 9, 12, 3, 7, 20, 11, 6])
    items = np.arange(len(docs))
    targets = torch.rand(len(docs), K, generator=torch.Generator().manual_seed(1)) - 0.5

    def run(weights: torch.Tensor | None, seed: int) -> TextCNN:
        model = _model()
        train_epochs(model, make_optimizer(model, CONFIG), docs, items, targets, weights, 2, 4,
                     torch.Generator().manual_seed(seed))
        return model

    a, b, c = run(None, 0), run(None, 0), run(None, 1)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.state_dict().values(), c.state_dict().values()))
    # Zero weight on every item: no gradient, so RMSprop leaves the weights where they were.
    untouched = run(torch.zeros(len(docs)), 0)
    for (name, p0), p1 in zip(_model().state_dict().items(), untouched.state_dict().values()):
        assert torch.equal(p0, p1), name


def test_build_cnn_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a = _model(seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = _model(seed=7)
    c = _model(seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.embedding.weight, c.embedding.weight)
    assert torch.equal(a.embedding.weight[0], torch.zeros(CONFIG.embedding_dim))  # padding row
    # the global stream continues exactly as if no model had been built
    after = torch.rand(3)
    torch.manual_seed(1234)
    assert torch.equal(after, torch.rand(3))


def test_pretrained_embeddings() -> None:
    vectors = np.random.default_rng(0).normal(size=(N_WORDS + 1, CONFIG.embedding_dim)).astype(np.float32)
    model = build_cnn(N_WORDS + 1, K, CONFIG, seed=0, pretrained_embeddings=vectors)
    torch.testing.assert_close(model.embedding.weight[1:].detach(), torch.as_tensor(vectors[1:]))
    assert torch.equal(model.embedding.weight[0].detach(), torch.zeros(CONFIG.embedding_dim))
    with pytest.raises(ValueError, match="shape"):  # one row per word id (padding included)
        build_cnn(N_WORDS + 1, K, CONFIG, seed=0, pretrained_embeddings=vectors[:-1])
    # pretrained vectors bring their own dimension (GloVe 50-d for ConvMF+), whatever config.embedding_dim says
    narrow = build_cnn(N_WORDS + 1, K, CONFIG, seed=0, pretrained_embeddings=vectors[:, :3])
    assert narrow.embedding.embedding_dim == 3 and narrow.convs[0].in_channels == 3


def test_make_optimizer() -> None:
    model = _model()
    assert isinstance(make_optimizer(model, CONFIG), torch.optim.RMSprop)
    assert isinstance(make_optimizer(model, CNNConfig(optimizer="adam")), torch.optim.Adam)
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer(model, CNNConfig(optimizer="sgd"))  # type: ignore[arg-type]
