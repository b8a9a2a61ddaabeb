"""Matrix factorisation by closed-form ALS: the training loop shared by PMF and ConvMF, and the PMF baseline.

ConvMF's objective (Kim et al. 2016, eq. 5), with the options of :class:`~convmf_core.config.ALSConfig`:

    L = 1/2 sum_obs (r_ij - mu - b_i - c_j - u_i^T v_j)^2 + lambda_U/2 sum_i ||u_i||^2
        + lambda_V/2 sum_j w_j ||v_j - theta_j||^2 + lambda_b/2 (sum_i b_i^2 + sum_j c_j^2)

PMF is the same with theta_j = 0. One outer iteration: solve U (eq. 7), solve V (eq. 8), then let the subclass
update theta (ConvMF trains the CNN, eq. 9). Training stops when validation RMSE has not improved for ``patience``
iterations and keeps the best iteration's parameters (the authors' code could keep a worse one).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convmf_core.als import SparseRows, solve_ridge
from convmf_core.config import ALSConfig, PMFConfig
from convmf_core.data import Ratings
from convmf_core.metrics import ranking_metrics
from convmf_core.models.base import (IterationReport, ModelFitError, NotFittedError, ProgressCallback, Recommender,
                                     ScoringFactors, resolve_device)

logger = logging.getLogger("convmf_core.als")

CHECKPOINT_VERSION = 1


class ALSFactorModel(Recommender):
    """ALS matrix factorisation with an optional per-item prior theta (the hook ConvMF fills in).

    Fitted state (trailing underscore, set by ``fit``/``load``): ``user_factors_`` (N x k), ``item_factors_``
    (M x k), ``user_bias_`` (N), ``item_bias_`` (M), ``global_mean_``, ``rating_range_``, ``history_`` (one
    :class:`IterationReport` per outer iteration), ``best_iteration_``.
    """

    def __init__(self, als: ALSConfig, seed: int, device: str) -> None:
        self.als = als
        self.seed = seed
        self.device = device
        self.user_factors_: torch.Tensor | None = None

    # ----- hooks for subclasses -------------------------------------------------------------------------------
    def _init_prior(self, n_items: int, device: torch.device, generator: torch.Generator) -> torch.Tensor | None:
        """theta before the first iteration (None: no prior)."""
        return None

    def _prior_mask(self) -> torch.Tensor | None:
        """Items whose prior applies (items without text get none: their v_j is purely collaborative)."""
        return None

    def _update_prior(self, V: torch.Tensor, item_weight: torch.Tensor, rated: torch.Tensor,
                      generator: torch.Generator, epochs: int | None) -> tuple[torch.Tensor | None, dict[str, float]]:
        """New theta after the V step (ConvMF: eq. 9; ``epochs`` overrides the per-iteration count) and extra
        figures for the iteration report."""
        return None, {}

    def _warmup_iterations(self) -> int:
        """Leading iterations that run without the prior (ALS only); the prior is first fitted at the last one."""
        return 0

    def _warmup_epochs(self) -> int | None:
        """Prior-fitting epochs at the end of the warm-up (None: the per-iteration count)."""
        return None

    def _extra_state(self) -> dict[str, Any]:
        """Subclass state to keep with the best iteration and in checkpoints (tensors / plain values only)."""
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_extra_state` returned."""

    # ----- training --------------------------------------------------------------------------------------------
    def _fit_als(self, train: Ratings, validation: Ratings | None, callback: ProgressCallback | None,
                 checkpoint_path: str | Path | None, resume: bool) -> None:
        cfg = self.als
        device = resolve_device(self.device)
        implicit = cfg.confidence is not None
        if len(train) == 0:
            raise ModelFitError("cannot fit on an empty training set")
        generator = torch.Generator().manual_seed(self.seed)
        N, M, k = train.n_users, train.n_items, cfg.n_factors
        use_bias = cfg.use_bias and not implicit
        mu = train.mean() if use_bias else 0.0
        values = np.ones(len(train), dtype=np.float32) if implicit else train.values
        self.global_mean_ = float(mu)
        self.rating_range_ = (float(train.values.min()), float(train.values.max()))

        # Two CSR views of the same ratings; each entry's other-side index in that view's order.
        by_user = Ratings(train.users, train.items, values, N, M).csr()
        by_item = Ratings(train.items, train.users, values, M, N).csr()
        user_rows = SparseRows.from_csr(by_user, device)
        item_rows = SparseRows.from_csr(by_item, device)
        user_of_item_entry = item_rows.indices  # for rows by item, the columns are users
        item_of_user_entry = user_rows.indices
        counts = torch.as_tensor(train.item_counts(), device=device, dtype=torch.float32)
        rated = counts > 0
        item_weight = torch.ones(M, device=device)
        if cfg.item_weighting:  # authors' code: w_j = sqrt(n_j) / mean(sqrt(n)); unrated items keep weight 1
            sq = counts.sqrt()
            item_weight = torch.where(rated, sq / sq[rated].mean(), torch.ones_like(sq))

        U = torch.randn(N, k, generator=generator).to(device) * cfg.init_scale
        theta = self._init_prior(M, device, generator)
        V = torch.randn(M, k, generator=generator).to(device) * cfg.init_scale
        if theta is not None:
            mask = self._prior_mask()
            V = torch.where(mask.unsqueeze(1), theta, V) if mask is not None else theta.clone()
        bu = torch.zeros(N, device=device)
        bi = torch.zeros(M, device=device)
        ones_n, ones_m = torch.ones(N, 1, device=device), torch.ones(M, 1, device=device)
        reg_u = torch.full((k + use_bias,), cfg.lambda_u, device=device)
        reg_v = torch.full((M, k + use_bias), cfg.lambda_v, device=device) * item_weight.unsqueeze(1)
        if use_bias:
            reg_u[k] = cfg.lambda_bias
            reg_v[:, k] = cfg.lambda_bias

        self.history_: list[IterationReport] = []
        best: dict[str, Any] | None = None
        best_metric, stale, start_iteration = math.inf, 0, 1
        if resume and checkpoint_path is not None and Path(checkpoint_path).exists():
            ck = load_checkpoint(checkpoint_path)
            U, V, bu, bi = (ck[n].to(device) for n in ("U", "V", "bu", "bi"))
            theta = ck["theta"].to(device) if ck["theta"] is not None else None
            self._load_extra_state(ck["extra"])
            generator.set_state(ck["generator"])
            self.history_ = [IterationReport(**h) for h in ck["history"]]
            best, best_metric, stale = ck["best"], ck["best_metric"], ck["stale"]
            start_iteration = ck["iteration"] + 1
            logger.info("resumed from %s after iteration %d", checkpoint_path, ck["iteration"])

        warmup = self._warmup_iterations()
        for iteration in range(start_iteration, cfg.max_iterations + 1):
            if stale >= cfg.patience:
                break
            in_warmup = iteration <= warmup  # ALS only, no prior; never counts towards early stopping
            t0 = time.perf_counter()
            # eq. 7: u_i <- (V_i^T V_i + lambda_U I)^-1 V_i^T r_i   (targets net of mu and item bias)
            target = user_rows.values - mu - (bi[item_of_user_entry] if use_bias else 0.0)
            Y = torch.cat([V, ones_m], 1) if use_bias else V
            X = solve_ridge(user_rows.with_values(target), Y, reg_u, confidence=cfg.confidence,
                            block_rows=cfg.solve_block_rows)
            U, bu = (X[:, :k], X[:, k]) if use_bias else (X, bu)
            # eq. 8: v_j <- (U_j^T U_j + lambda_V I)^-1 (U_j^T r_j + lambda_V theta_j)   (targets net of user bias)
            target = item_rows.values - mu - (bu[user_of_item_entry] if use_bias else 0.0)
            Y = torch.cat([U, ones_n], 1) if use_bias else U
            prior = None
            if theta is not None and not in_warmup:
                mask = self._prior_mask()
                prior = theta if mask is None else theta * mask.unsqueeze(1)
                if use_bias:
                    prior = torch.cat([prior, torch.zeros(M, 1, device=device)], 1)
            X = solve_ridge(item_rows.with_values(target), Y, reg_v, prior, confidence=cfg.confidence,
                            block_rows=cfg.solve_block_rows)
            V, bi = (X[:, :k], X[:, k]) if use_bias else (X, bi)
            t_als = time.perf_counter() - t0
            # eq. 9 (ConvMF): fit the CNN to V, then theta_j = cnn(W, X_j).
            new_theta, extra = None, {}
            if not in_warmup or iteration == warmup:
                new_theta, extra = self._update_prior(V, item_weight, rated, generator,
                                                      self._warmup_epochs() if iteration == warmup else None)
            if new_theta is not None:
                theta = new_theta
                mask = self._prior_mask()
                cold = ~rated if mask is None else (~rated & mask)
                V = torch.where(cold.unsqueeze(1), theta, V)  # no ratings: v_j = theta_j (eq. 8 with n_j = 0)
            self._set_fitted(U, V, bu, bi)
            loss = self._train_loss(train, U, V, bu, bi, theta, item_weight, use_bias, values)
            if not math.isfinite(loss) or not bool(torch.isfinite(V).all() and torch.isfinite(U).all()):
                raise ModelFitError(f"training diverged at iteration {iteration} (loss {loss}); lower the "
                                    "learning rate or raise lambda_u / lambda_v")
            val_rmse, metric = None, loss
            if validation is not None and len(validation):
                if implicit:
                    rec = self.recommend(np.unique(validation.users), 20, exclude=train)
                    recall = ranking_metrics(rec, validation, 20)["recall@20"]
                    extra = {**extra, "validation_recall@20": recall}
                    metric = -recall
                else:
                    pred = self.predict(validation.users, validation.items)
                    val_rmse = float(np.sqrt(np.mean((pred - validation.values) ** 2)))
                    metric = val_rmse
            seconds = time.perf_counter() - t0
            report = IterationReport(iteration, loss, val_rmse, seconds, {"als_seconds": t_als, **extra})
            self.history_.append(report)
            logger.info("iteration %d: train loss %.4f, validation %s, %.2f s", iteration, loss,
                        "n/a" if val_rmse is None else f"{val_rmse:.4f}", seconds)
            if metric < best_metric - cfg.min_improvement:
                best_metric, stale = metric, 0
                best = {"U": U.clone(), "V": V.clone(), "bu": bu.clone(), "bi": bi.clone(), "iteration": iteration,
                        "theta": None if theta is None else theta.clone(), "extra": copy.deepcopy(self._extra_state())}
            elif not in_warmup:
                stale += 1
            if callback is not None:
                callback(report)
            if checkpoint_path is not None:
                save_checkpoint(checkpoint_path, {
                    "version": CHECKPOINT_VERSION, "iteration": iteration, "U": U, "V": V, "bu": bu, "bi": bi,
                    "theta": theta, "extra": self._extra_state(), "generator": generator.get_state(),
                    "history": [asdict(h) for h in self.history_], "best": best, "best_metric": best_metric,
                    "stale": stale})
        if best is None:
            raise ModelFitError("no iteration ran: max_iterations must be at least 1")
        self._load_extra_state(best["extra"])
        self.best_iteration_ = int(best["iteration"])
        self._set_fitted(best["U"], best["V"], best["bu"], best["bi"])

    def _set_fitted(self, U: torch.Tensor, V: torch.Tensor, bu: torch.Tensor, bi: torch.Tensor) -> None:
        self.user_factors_, self.item_factors_ = U.detach().cpu(), V.detach().cpu()
        self.user_bias_, self.item_bias_ = bu.detach().cpu(), bi.detach().cpu()

    def _train_loss(self, train: Ratings, U: torch.Tensor, V: torch.Tensor, bu: torch.Tensor, bi: torch.Tensor,
                    theta: torch.Tensor | None, item_weight: torch.Tensor, use_bias: bool, values: np.ndarray) -> float:
        """The objective L of the module docstring at the current parameters (explicit loss; per rating scale)."""
        cfg = self.als
        users = torch.as_tensor(train.users, device=U.device)
        items = torch.as_tensor(train.items, device=U.device)
        pred = (U[users] * V[items]).sum(1) + self.global_mean_
        if use_bias:
            pred = pred + bu[users] + bi[items]
        err = torch.as_tensor(values, device=U.device) - pred
        loss = 0.5 * (err ** 2).sum() + 0.5 * cfg.lambda_u * (U ** 2).sum()
        if theta is None:
            diff = V
        else:
            mask = self._prior_mask()
            diff = V - (theta if mask is None else theta * mask.unsqueeze(1))  # items without text: prior 0
        loss = loss + 0.5 * cfg.lambda_v * (item_weight.unsqueeze(1) * diff ** 2).sum()
        if use_bias:
            loss = loss + 0.5 * cfg.lambda_bias * ((bu ** 2).sum() + (bi ** 2).sum())
        return float(loss) / len(train)

    # ----- scoring -----------------------------------------------------------------------------------------------
    def scoring_factors(self) -> ScoringFactors:
        """``[U, b, 1] @ [V, 1, c]^T + mu``; predictions clipped to the training rating range when configured."""
        if self.user_factors_ is None:
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit() or load a saved model")
        n, m = self.user_factors_.shape[0], self.item_factors_.shape[0]
        user = torch.cat([self.user_factors_, self.user_bias_.unsqueeze(1), torch.ones(n, 1)], 1)
        item = torch.cat([self.item_factors_, torch.ones(m, 1), self.item_bias_.unsqueeze(1)], 1)
        clip = self.rating_range_ if (self.als.clip_predictions and self.als.confidence is None) else None
        return ScoringFactors(user, item, self.global_mean_, clip)


class PMF(ALSFactorModel):
    """Probabilistic matrix factorisation by ALS: ConvMF's loss with no text prior (theta_j = 0)."""

    def __init__(self, config: PMFConfig = PMFConfig()) -> None:
        super().__init__(config.als, config.seed, config.device)
        self.config = config

    def fit(self, train: Ratings, validation: Ratings | None = None, *, callback: ProgressCallback | None = None,
            checkpoint_path: str | Path | None = None, resume: bool = False) -> "PMF":
        """Alternate eq. 7 and eq. 8 (with theta = 0) until validation RMSE stops improving."""
        self._fit_als(train, validation, callback, checkpoint_path, resume)
        return self


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write a training checkpoint atomically (temp file + rename): a crash leaves the previous one intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (tensors and plain values only; never unpickles objects)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file or a pickled object
        raise ModelFitError(f"cannot read checkpoint {path}: {exc}") from exc
    if state.get("version") != CHECKPOINT_VERSION:
        raise ModelFitError(f"checkpoint {path} has version {state.get('version')}, expected {CHECKPOINT_VERSION}")
    return state
