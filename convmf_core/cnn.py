"""The document CNN of ConvMF (Kim et al. 2016, section 3.2) and its training step (eq. 9).

    X_j (word ids) -> embedding (200) -> conv windows 3/4/5 x 100 filters, ReLU -> max over time
                   -> dense 200, tanh -> dropout 0.2 (training only) -> projection to k, tanh = theta_j

What this version gets right that public ones did not (../shared/notes/convmf-reference.md):
* the embedding output is transposed to (batch, channels, time), never reshaped;
* padding never reaches the max-pool: a window position counts only if it starts inside the document, so the
  output does not depend on how far a batch is padded (tested);
* dropout is a drop probability, applied after the dense layer in training only, with an explicit generator;
* batches are padded to their own longest document, not to 300 words.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from convmf_core.config import CNNConfig
from convmf_core.encoders import TextEncoder, heldout_split, r2_scores
from convmf_core.text import Documents


class TextCNN(nn.Module):
    """cnn(W, X_j): a document's word ids to a k-dimensional item embedding theta_j in (-1, 1)."""

    def __init__(self, n_words_with_padding: int, output_dim: int, config: CNNConfig,
                 pretrained_embeddings: np.ndarray | None = None, *, embedding_dim: int | None = None,
                 linear_outputs: int = 0) -> None:
        super().__init__()
        self.config = config
        self.linear_outputs = linear_outputs
        embedding_dim = config.embedding_dim if embedding_dim is None else embedding_dim
        self.embedding = nn.Embedding(n_words_with_padding, embedding_dim, padding_idx=0)
        if pretrained_embeddings is not None:  # "ConvMF+": start from pretrained word vectors
            if pretrained_embeddings.shape != (n_words_with_padding, embedding_dim):
                raise ValueError(f"pretrained embeddings have shape {pretrained_embeddings.shape}, expected "
                                 f"{(n_words_with_padding, embedding_dim)}")
            with torch.no_grad():
                self.embedding.weight.copy_(torch.as_tensor(pretrained_embeddings))
                self.embedding.weight[0].zero_()
        self.convs = nn.ModuleList(nn.Conv1d(embedding_dim, config.n_filters, w) for w in config.window_sizes)
        self.dense = nn.Linear(config.n_filters * len(config.window_sizes), config.hidden_dim)
        self.projection = nn.Linear(config.hidden_dim, output_dim + linear_outputs)

    @property
    def min_length(self) -> int:
        """Batches are padded to at least the widest window, so every document has one window position."""
        return max(self.config.window_sizes)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """theta for a padded batch: ``ids`` (B, L) with 0 as padding, ``lengths`` (B,) real lengths."""
        x = self.embedding(ids).transpose(1, 2)  # (B, E, L): channels first for Conv1d
        pooled = []
        for conv, width in zip(self.convs, self.config.window_sizes):
            c = F.relu(conv(x))  # (B, F, L - w + 1): c_i^j = f(W_c^j * D_(:, i:i+w-1) + b_c^j)
            # Positions that start beyond the document are padding; a document shorter than the window keeps its
            # first position (its window is the document plus zero-embedding padding, whatever the batch length).
            n_valid = (lengths - width + 1).clamp(min=1)
            valid = torch.arange(c.shape[2], device=c.device).unsqueeze(0) < n_valid.unsqueeze(1)
            # ReLU outputs are >= 0 and each row has a valid position, so filling with 0 leaves the max unchanged.
            pooled.append(c.masked_fill(~valid.unsqueeze(1), 0.0).amax(dim=2))  # d_f = max(c^j) (max-pooling)
        z = torch.tanh(self.dense(torch.cat(pooled, dim=1)))  # s = tanh(W_f1 d_f + b_f1)
        if self.training and self.config.dropout > 0:
            keep = 1.0 - self.config.dropout
            mask = torch.rand(z.shape, generator=generator, device=z.device) < keep
            z = z * mask / keep
        out = self.projection(z)
        if not self.linear_outputs:
            return torch.tanh(out)  # theta = tanh(W_f2 s + b_f2)
        # Beyond the paper: the last ``linear_outputs`` columns (the item-bias channel) are not squashed.
        k = out.shape[1] - self.linear_outputs
        return torch.cat([torch.tanh(out[:, :k]), out[:, k:]], 1)


def build_cnn(n_words_with_padding: int, output_dim: int, config: CNNConfig, *, seed: int,
              pretrained_embeddings: np.ndarray | None = None, embedding_dim: int | None = None,
              linear_outputs: int = 0) -> TextCNN:
    """A TextCNN with weights initialised deterministically from ``seed`` (the global RNG is left as it was);
    ``embedding_dim`` overrides ``config.embedding_dim`` (pretrained vectors bring their own), ``linear_outputs``
    extra unsquashed outputs (the item-bias channel)."""
    if pretrained_embeddings is not None and embedding_dim is None:
        embedding_dim = int(pretrained_embeddings.shape[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TextCNN(n_words_with_padding, output_dim, config, pretrained_embeddings, embedding_dim=embedding_dim,
                       linear_outputs=linear_outputs)


def make_optimizer(model: TextCNN, config: CNNConfig) -> torch.optim.Optimizer:
    """RMSprop as the paper (or Adam, as some re-implementations), over all CNN weights."""
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=config.learning_rate)
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; use 'rmsprop' or 'adam'")


def _length_batches(lengths: np.ndarray, index: np.ndarray, batch_size: int, jitter: np.ndarray | None) -> list[np.ndarray]:
    """Split ``index`` into batches of similar length (sorted by length, plus an optional random jitter)."""
    key = lengths[index].astype(np.float64)
    if jitter is not None:
        key = key + jitter
    order = index[np.argsort(key, kind="stable")]
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def train_epochs(model: TextCNN, optimizer: torch.optim.Optimizer, documents: Documents, items: np.ndarray,
                 targets: torch.Tensor, weights: torch.Tensor | None, epochs: int, batch_size: int,
                 generator: torch.Generator) -> float:
    """Fit cnn(W, X_j) to v_j for ``items`` (eq. 9) and return the last epoch's mean loss.

    Eq. 9 with U, V fixed: min_W  lambda_V / 2 sum_j w_j || v_j - cnn(W, X_j) ||^2 (dropout in place of an L2
    term on W). lambda_V / 2 only scales the gradient, which RMSprop normalises away, so it is left out here;
    w_j is the optional per-item weight (1 without item weighting). ``targets`` and ``weights`` are indexed by item.
    Each epoch draws a new batch order and length jitter from ``generator`` (so training is seeded, and batches are
    not always the same items).
    """
    device = targets.device
    lengths = documents.lengths()
    model.train()
    last = float("nan")
    for _ in range(epochs):
        jitter = torch.rand(len(items), generator=generator).numpy() * 8.0  # mix lengths within ~8 words
        batches = _length_batches(lengths, items, batch_size, jitter)
        order = torch.randperm(len(batches), generator=generator).tolist()
        total, count = 0.0, 0
        for b in order:
            batch = batches[b]
            ids, lens = documents.padded_batch(batch, min_length=model.min_length)
            ids, lens = ids.to(device), lens.to(device)
            idx = torch.as_tensor(batch, device=device)
            pred = model(ids, lens, generator=_device_generator(generator, device))
            err = ((pred - targets[idx]) ** 2).sum(dim=1)  # || v_j - cnn(W, X_j) ||^2
            if weights is not None:
                err = err * weights[idx]
            loss = err.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            count += len(batch)
        last = total / max(count, 1)
    return last


def _device_generator(cpu_generator: torch.Generator, device: torch.device) -> torch.Generator:
    """The dropout generator: the CPU one on CPU; on CUDA, a CUDA generator seeded from the CPU one."""
    if device.type == "cpu":
        return cpu_generator
    g = torch.Generator(device=device)
    g.manual_seed(int(torch.randint(0, 2**62, (1,), generator=cpu_generator)))
    return g


@torch.no_grad()
def embed(model: TextCNN, documents: Documents, items: np.ndarray, device: torch.device,
          batch_size: int = 512) -> torch.Tensor:
    """theta_j = cnn(W, X_j) in eval mode (no dropout) for ``items``; rows in the order of ``items``."""
    model.eval()
    out = torch.empty((len(items), model.projection.out_features), device=device)  # k (+ the bias channel)
    if len(items) == 0:
        return out
    position = np.empty(documents.lengths().shape[0], dtype=np.int64)
    position[items] = np.arange(len(items))
    for batch in _length_batches(documents.lengths(), np.asarray(items), batch_size, None):
        ids, lens = documents.padded_batch(batch, min_length=model.min_length)
        out[torch.as_tensor(position[batch], device=device)] = model(ids.to(device), lens.to(device))
    return out


class CNNEncoder(TextEncoder):
    """The paper's encoder behind :class:`~convmf_core.encoders.TextEncoder`: eq. 9 by gradient steps.

    With ``bias_channel`` the CNN has one more, unsquashed output: the prior mean of the item bias c_j. With
    ``pretrained`` word vectors (ConvMF+) the embedding starts from them and takes their dimension.
    """

    def __init__(self, documents: Documents | None, n_words: int, n_factors: int, bias_channel: bool,
                 config: CNNConfig, *, seed: int, device: torch.device | str = "cpu",
                 pretrained: np.ndarray | None = None, embedding_dim: int | None = None) -> None:
        self.documents, self.config, self.seed = documents, config, seed
        self.n_words, self.n_factors = n_words, n_factors
        self.output_dim = n_factors + int(bias_channel)
        self._pretrained = pretrained
        self.model = build_cnn(n_words + 1, n_factors, config, seed=seed, pretrained_embeddings=pretrained,
                               embedding_dim=embedding_dim, linear_outputs=int(bias_channel)).to(device)
        self.optimizer = make_optimizer(self.model, config)

    @property
    def device(self) -> torch.device:
        """Where the CNN's weights live."""
        return self.model.projection.weight.device

    def fit(self, targets: torch.Tensor, items: np.ndarray, weights: torch.Tensor | None,
            generator: torch.Generator, epochs: int | None, step: int) -> dict[str, float]:
        cfg = self.config
        epochs = cfg.epochs_per_iteration if epochs is None else epochs
        # The step size of the step-th eq. 9 update decays: lr_t = lr * decay^t. V is the CNN's moving target; with
        # a constant step the CNN keeps chasing it and V still moves ~10% per outer iteration after 30 (ML-100K),
        # so validation RMSE jitters by ~0.02 and early stopping picks a lucky draw. With the decay the alternation
        # settles (V moves <0.1% per iteration after ~25) and refits from other seeds land close together.
        learning_rate = cfg.learning_rate * cfg.learning_rate_decay ** max(step, 0)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        t0 = time.perf_counter()
        loss = train_epochs(self.model, self.optimizer, self.documents, items, targets, weights, epochs,
                            cfg.batch_size, generator)
        seconds = time.perf_counter() - t0
        return {"cnn_loss": loss, "cnn_seconds": seconds, "cnn_learning_rate": learning_rate,
                "cnn_seconds_per_epoch": seconds / max(epochs, 1)}

    def prior(self) -> torch.Tensor:
        out = torch.zeros(len(self.documents), self.output_dim, device=self.device)
        items = np.flatnonzero(self.documents.has_text())
        out[torch.as_tensor(items, device=self.device)] = embed(self.model, self.documents, items, self.device)
        return out

    def embed(self, documents: Documents) -> torch.Tensor:
        out = torch.zeros(len(documents), self.output_dim)
        items = np.flatnonzero(documents.has_text())
        out[torch.as_tensor(items)] = embed(self.model, documents, items, self.device).cpu()
        return out

    def heldout_r2(self, targets: torch.Tensor, items: np.ndarray, generator: torch.Generator) -> dict[str, float]:
        """A fresh CNN (the same initial weights) trained on 80% of ``items`` for ``config.heldout_epochs`` epochs at
        the base step, scored on the other 20%: a CNN that memorises scores near or below 0 here."""
        held = heldout_split(np.asarray(items), 5, generator)[0]
        rest = np.setdiff1d(items, held)
        probe = CNNEncoder(self.documents, self.n_words, self.n_factors, self.output_dim > self.n_factors,
                           self.config, seed=self.seed, device=self.device, pretrained=self._pretrained,
                           embedding_dim=self.model.embedding.embedding_dim)
        train_epochs(probe.model, probe.optimizer, self.documents, rest, targets, None, self.config.heldout_epochs,
                     self.config.batch_size, generator)
        idx = torch.as_tensor(held, device=self.device)
        pred = embed(probe.model, self.documents, held, self.device)
        return r2_scores(targets[idx].cpu(), pred.cpu(), targets[torch.as_tensor(rest, device=self.device)].mean(0)
                         .cpu().expand(len(held), -1), self.n_factors)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"cnn.{k}": v.detach().cpu() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("cnn.")})
