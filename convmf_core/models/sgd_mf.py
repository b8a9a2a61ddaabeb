"""The first seed article's matrix factorisation by SGD, vectorised over minibatches of ratings.

Model: r_ui ~ p_u . q_i (k = 20, P and Q uniform in [0, 1), no global mean or biases by default).
Per rating the article steps both factors from their old values:

    err  = r_ui - p_u . q_i
    p_u += lr * 2 * (err * q_i - wd * p_u)
    q_i += lr * 2 * (err * p_u - wd * q_i)

Here a minibatch of ratings takes that step at once: the per-rating steps are summed into P and Q with a
scatter-add (``index_add_``), which equals the sequential loop whenever a batch touches each user and item at most
once and is a close approximation otherwise (lr is small). Stops after ``epochs`` or when the epoch's summed squared
error changes by less than ``tolerance``, as the article. Options it left out (global mean + biases, weight decay)
are available, off by default.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from convmf_core.config import SGDMFConfig
from convmf_core.data import Ratings
from convmf_core.models.base import (IterationReport, ModelFitError, NotFittedError, ProgressCallback, Recommender,
                                     ScoringFactors, resolve_device)

logger = logging.getLogger("convmf_core.sgd")


class SGDMF(Recommender):
    """SGD matrix factorisation (seed article 1) with the uniform model API."""

    def __init__(self, config: SGDMFConfig = SGDMFConfig()) -> None:
        self.config = config
        self.user_factors_: torch.Tensor | None = None

    def fit(self, train: Ratings, validation: Ratings | None = None, *, callback: ProgressCallback | None = None,
            checkpoint_path: str | Path | None = None, resume: bool = False) -> "SGDMF":
        """Run SGD epochs over shuffled minibatches of ``train``; validation RMSE is reported, not used to stop
        (the article stops on the change of the training error)."""
        cfg = self.config
        if len(train) == 0:
            raise ModelFitError("cannot fit on an empty training set")
        device = resolve_device(cfg.device)
        g = torch.Generator().manual_seed(cfg.seed)
        k = cfg.n_factors
        P = torch.rand(train.n_users, k, generator=g).to(device)  # uniform in [0, 1), as the article
        Q = torch.rand(train.n_items, k, generator=g).to(device)
        self.global_mean_ = train.mean() if cfg.use_bias else 0.0
        bu = torch.zeros(train.n_users, device=device)
        bi = torch.zeros(train.n_items, device=device)
        users = torch.as_tensor(train.users, device=device)
        items = torch.as_tensor(train.items, device=device)
        r = torch.as_tensor(train.values, device=device) - self.global_mean_
        self.rating_range_ = (float(train.values.min()), float(train.values.max()))
        lr, wd = cfg.learning_rate, cfg.weight_decay
        self.history_: list[IterationReport] = []
        previous = None
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            order = torch.randperm(len(train), generator=g).to(device)
            sse = 0.0
            for s in range(0, len(order), cfg.batch_size):
                b = order[s:s + cfg.batch_size]
                u, i = users[b], items[b]
                pu, qi = P[u], Q[i]
                err = r[b] - (pu * qi).sum(1) - (bu[u] + bi[i] if cfg.use_bias else 0.0)
                sse += float((err ** 2).sum())
                e = err.unsqueeze(1)
                P.index_add_(0, u, lr * 2 * (e * qi - wd * pu))  # p_u += lr 2 (err q_i - wd p_u)
                Q.index_add_(0, i, lr * 2 * (e * pu - wd * qi))  # q_i += lr 2 (err p_u - wd q_i), old p_u
                if cfg.use_bias:
                    bu.index_add_(0, u, lr * 2 * (err - wd * bu[u]))
                    bi.index_add_(0, i, lr * 2 * (err - wd * bi[i]))
            if not np.isfinite(sse):
                raise ModelFitError(f"SGD diverged in epoch {epoch}: lower learning_rate (now {lr})")
            self._set(P, Q, bu, bi)
            val = None
            if validation is not None and len(validation):
                pred = self.predict(validation.users, validation.items)
                val = float(np.sqrt(np.mean((pred - validation.values) ** 2)))
            report = IterationReport(epoch, sse / len(train), val, time.perf_counter() - t0)
            self.history_.append(report)
            logger.info("epoch %d: train MSE %.4f, validation RMSE %s", epoch, report.train_loss, val)
            if callback is not None:
                callback(report)
            if previous is not None and abs(previous - sse) < cfg.tolerance:
                break
            previous = sse
        self.best_iteration_ = len(self.history_)
        return self

    def _set(self, P: torch.Tensor, Q: torch.Tensor, bu: torch.Tensor, bi: torch.Tensor) -> None:
        self.user_factors_, self.item_factors_ = P.detach().cpu().clone(), Q.detach().cpu().clone()
        self.user_bias_, self.item_bias_ = bu.detach().cpu().clone(), bi.detach().cpu().clone()

    def scoring_factors(self) -> ScoringFactors:
        """``[P, b, 1] @ [Q, 1, c]^T + mu`` (biases are zero unless ``use_bias``)."""
        if self.user_factors_ is None:
            raise NotFittedError("SGDMF is not fitted: call fit() or load a saved model")
        n, m = self.user_factors_.shape[0], self.item_factors_.shape[0]
        user = torch.cat([self.user_factors_, self.user_bias_.unsqueeze(1), torch.ones(n, 1)], 1)
        item = torch.cat([self.item_factors_, torch.ones(m, 1), self.item_bias_.unsqueeze(1)], 1)
        return ScoringFactors(user, item, self.global_mean_, self.rating_range_ if self.config.clip_predictions else None)
