"""Matrix factorisation by closed-form ALS: the training loop shared by PMF and ConvMF, and the PMF baseline.

ConvMF's objective (Kim et al. 2016, eq. 5), with the options of :class:`~convmf_core.config.ALSConfig`:

    L = 1/2 sum_obs (r_ij - mu - b_i - c_j - u_i^T v_j)^2 + lambda_U/2 sum_i ||u_i||^2
        + lambda_V/2 sum_j w_j ||v_j - theta_j||^2 + lambda_b/2 (sum_i b_i^2 + sum_j c_j^2)

PMF is the same with theta_j = 0. One outer iteration: solve U (eq. 7), solve V (eq. 8), then let the subclass
update theta (ConvMF trains the CNN, eq. 9, with a step that decays per outer iteration). Training stops when
validation RMSE has not improved for ``patience`` iterations and keeps the best iteration's parameters (the authors'
code could keep a worse one); a subclass may rule out the first iterations of a fit from scratch (ConvMF:
``min_iterations``).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from convmf_core.als import SparseRows, solve_ridge
from convmf_core.config import ALSConfig, PMFConfig
from convmf_core.data import Ratings
from convmf_core.metrics import ranking_metrics
from convmf_core.models.base import (IterationReport, ModelFitError, NotFittedError, ProgressCallback, Recommender,
                                     ScoringFactors, resolve_device)

if TYPE_CHECKING:  # warm_start imports this module
    from convmf_core.models.warm_start import WarmStart

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
                      generator: torch.Generator, epochs: int | None,
                      step: int) -> tuple[torch.Tensor | None, dict[str, float]]:
        """New theta after the V step (ConvMF: eq. 9; ``epochs`` overrides the per-iteration count; ``step`` counts
        the prior updates before this one, for step-size schedules) and extra figures for the iteration report."""
        return None, {}

    def _warmup_iterations(self) -> int:
        """Leading iterations that run without the prior (ALS only); the prior is first fitted at the last one."""
        return 0

    def _warmup_epochs(self) -> int | None:
        """Prior-fitting epochs at the end of the warm-up (None: the per-iteration count)."""
        return None

    def _warm_start_epochs(self) -> int | None:
        """Prior-fitting epochs per iteration of a warm-started fit (None: the per-iteration count)."""
        return None

    def _min_iterations(self) -> int:
        """A fit from scratch keeps its best iteration from this one on (earlier ones are not candidates)."""
        return 1

    def _warm_start_step(self) -> int:
        """The ``step`` a warm-started fit's first prior update gets (a schedule continues, it does not restart)."""
        return 0

    def _extra_state(self) -> dict[str, Any]:
        """Subclass state to keep with the best iteration and in checkpoints (tensors / plain values only)."""
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_extra_state` returned."""

    # ----- training --------------------------------------------------------------------------------------------
    def _fit_als(self, train: Ratings, validation: Ratings | None, callback: ProgressCallback | None,
                 checkpoint_path: str | Path | None, resume: bool, warm_start: "WarmStart | None" = None) -> None:
        """The outer loop: eq. 7, eq. 8, the prior update, then validation, early stopping and a checkpoint.

        With ``warm_start`` the factors start from the previous model (see :mod:`convmf_core.models.warm_start`),
        the ALS-only warm-up is skipped and ``warm_start_max_iterations`` / ``warm_start_patience`` apply."""
        cfg = self.als
        if len(train) == 0:
            raise ModelFitError("cannot fit on an empty training set")
        if warm_start is not None:
            warm_start.check_shapes(train.n_users, train.n_items, cfg.n_factors)
        device = resolve_device(self.device)
        generator = torch.Generator().manual_seed(self.seed)
        problem = _ALSProblem(train, cfg, device)
        self.global_mean_ = problem.mu
        self.rating_range_ = (float(train.values.min()), float(train.values.max()))
        factors = self._initial_factors(problem, device, generator, warm_start)
        self.history_: list[IterationReport] = []
        max_iterations = cfg.max_iterations if warm_start is None else cfg.warm_start_max_iterations
        patience = cfg.patience if warm_start is None else cfg.warm_start_patience
        stopper = _EarlyStopping(patience, cfg.min_improvement)
        start_iteration = 1
        if resume and checkpoint_path is not None and Path(checkpoint_path).exists():
            factors, stopper, start_iteration = self._restore(checkpoint_path, device, generator, patience)
        warmup = 0 if warm_start is not None else self._warmup_iterations()
        prior_epochs = None if warm_start is None else self._warm_start_epochs()
        # the step of the prior update made in iteration t: 0 at the first (the warm-up's last iteration, if any)
        first_step = -max(warmup, 1) if warm_start is None else self._warm_start_step() - 1
        # the first iteration early stopping may keep (a warm start begins next to an optimum: any of its iterations)
        first_candidate = 1 if warm_start is not None else min(self._min_iterations(), max_iterations)
        for iteration in range(start_iteration, max_iterations + 1):
            if stopper.done:
                break
            in_warmup = iteration <= warmup  # ALS only, no prior; never counts towards early stopping
            t0 = time.perf_counter()
            # eq. 7 for every user with V fixed. It runs first, so U's start never matters for explicit ratings:
            # under a warm start a new user's u_i is exactly the eq. 7 solution of their ratings against the warm V.
            problem.solve_users(factors)
            problem.solve_items(factors, None if in_warmup else self._masked_prior(factors.theta))  # eq. 8
            t_als = time.perf_counter() - t0
            extra: dict[str, float] = {}
            if not in_warmup or iteration == warmup:  # eq. 9 (ConvMF): fit the CNN to V, theta = cnn(W, X)
                theta, extra = self._update_prior(factors.V, problem.item_weight, problem.rated, generator,
                                                  self._warmup_epochs() if iteration == warmup else prior_epochs,
                                                  step=first_step + iteration)
                if theta is not None:
                    factors.set_prior(theta, problem.rated, self._prior_mask())
            self._set_fitted(factors.U, factors.V, factors.bu, factors.bi)
            loss = problem.loss(factors, self._masked_prior(factors.theta))
            if not math.isfinite(loss) or not bool(torch.isfinite(factors.V).all() and torch.isfinite(factors.U).all()):
                raise ModelFitError(f"training diverged at iteration {iteration} (loss {loss}); lower the "
                                    "learning rate or raise lambda_u / lambda_v")
            val_rmse, metric, val_extra = self._validate(train, validation, loss)
            report = IterationReport(iteration, loss, val_rmse, time.perf_counter() - t0,
                                     {"als_seconds": t_als, **extra, **val_extra})
            self.history_.append(report)
            logger.info("iteration %d: train loss %.4f, validation %s, %.2f s", iteration, loss,
                        "n/a" if val_rmse is None else f"{val_rmse:.4f}", report.seconds)
            stopper.update(metric, iteration, counts=not in_warmup, candidate=iteration >= first_candidate,
                           snapshot=lambda: {**factors.clone().to_dict(), "extra": copy.deepcopy(self._extra_state())})
            if callback is not None:
                callback(report)
            if checkpoint_path is not None:
                save_checkpoint(checkpoint_path, {
                    "version": CHECKPOINT_VERSION, "iteration": iteration, **factors.to_dict(),
                    "extra": self._extra_state(), "generator": generator.get_state(),
                    "history": [asdict(h) for h in self.history_], **stopper.to_dict()})
        best = stopper.best
        if best is None:
            raise ModelFitError("no iteration ran: max_iterations must be at least 1")
        self._load_extra_state(best["extra"])
        self.best_iteration_ = int(stopper.best_iteration)
        self._set_fitted(best["U"], best["V"], best["bu"], best["bi"])

    def _initial_factors(self, problem: "_ALSProblem", device: torch.device, generator: torch.Generator,
                         warm_start: "WarmStart | None" = None) -> "_Factors":
        """U ~ N(0, init_scale^2); V = theta for items with a prior (as the authors' code), else N(0, init_scale^2).

        With a warm start, users and items the previous model knew take its factors and biases instead; new items
        keep the start above (theta_j = cnn(W, X_j) with the previous CNN weights, or noise without text)."""
        k, scale = self.als.n_factors, self.als.init_scale
        U = torch.randn(problem.n_users, k, generator=generator).to(device) * scale
        theta = self._init_prior(problem.n_items, device, generator)
        V = torch.randn(problem.n_items, k, generator=generator).to(device) * scale
        if theta is not None:
            mask = self._prior_mask()
            V = torch.where(mask.unsqueeze(1), theta, V) if mask is not None else theta.clone()
        bu, bi = torch.zeros(problem.n_users, device=device), torch.zeros(problem.n_items, device=device)
        if warm_start is not None:
            ws = warm_start
            U, bu = ws.initial(ws.user_source, ws.user_factors, U), ws.initial(ws.user_source, ws.user_bias, bu)
            V, bi = ws.initial(ws.item_source, ws.item_factors, V), ws.initial(ws.item_source, ws.item_bias, bi)
        return _Factors(U, V, bu, bi, theta)

    def _masked_prior(self, theta: torch.Tensor | None) -> torch.Tensor | None:
        """theta with the rows of items without a prior (no text) set to 0."""
        if theta is None:
            return None
        mask = self._prior_mask()
        return theta if mask is None else theta * mask.unsqueeze(1)

    def _validate(self, train: Ratings, validation: Ratings | None,
                  loss: float) -> tuple[float | None, float, dict[str, float]]:
        """(validation RMSE, the metric early stopping minimises, extra figures). Implicit mode: -recall@20."""
        if validation is None or not len(validation):
            return None, loss, {}
        if self.als.confidence is not None:
            rec = self.recommend(np.unique(validation.users), 20, exclude=train)
            recall = ranking_metrics(rec, validation, 20)["recall@20"]
            return None, -recall, {"validation_recall@20": recall}
        pred = self.predict(validation.users, validation.items)
        rmse = float(np.sqrt(np.mean((pred - validation.values) ** 2)))
        return rmse, rmse, {}

    def _restore(self, checkpoint_path: str | Path, device: torch.device, generator: torch.Generator,
                 patience: int | None = None) -> tuple["_Factors", "_EarlyStopping", int]:
        """Factors, early-stopping state and the next iteration from a checkpoint (subclass state and RNG too)."""
        ck = load_checkpoint(checkpoint_path)
        factors = _Factors.from_dict(ck, device)
        self._load_extra_state(ck["extra"])
        generator.set_state(ck["generator"])
        self.history_ = [IterationReport(**h) for h in ck["history"]]
        logger.info("resumed from %s after iteration %d", checkpoint_path, ck["iteration"])
        patience = self.als.patience if patience is None else patience
        return factors, _EarlyStopping.from_dict(ck, patience, self.als.min_improvement), ck["iteration"] + 1

    def _set_fitted(self, U: torch.Tensor, V: torch.Tensor, bu: torch.Tensor, bi: torch.Tensor) -> None:
        self.user_factors_, self.item_factors_ = U.detach().cpu(), V.detach().cpu()
        self.user_bias_, self.item_bias_ = bu.detach().cpu(), bi.detach().cpu()

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


@dataclass
class _Factors:
    """What ALS updates: user/item factors U, V, biases b (users) and c (items), and the prior theta."""

    U: torch.Tensor
    V: torch.Tensor
    bu: torch.Tensor
    bi: torch.Tensor
    theta: torch.Tensor | None

    def set_prior(self, theta: torch.Tensor, rated: torch.Tensor, prior_mask: torch.Tensor | None) -> None:
        """Take the new theta; items with a prior and no rating get v_j = theta_j (eq. 8 with n_j = 0)."""
        self.theta = theta
        cold = ~rated if prior_mask is None else (~rated & prior_mask)
        self.V = torch.where(cold.unsqueeze(1), theta, self.V)

    def clone(self) -> "_Factors":
        """A deep copy (for the best-so-far snapshot)."""
        return _Factors(self.U.clone(), self.V.clone(), self.bu.clone(), self.bi.clone(),
                        None if self.theta is None else self.theta.clone())

    def to_dict(self) -> dict[str, torch.Tensor | None]:
        """Tensors by name, for checkpoints."""
        return {"U": self.U, "V": self.V, "bu": self.bu, "bi": self.bi, "theta": self.theta}

    @classmethod
    def from_dict(cls, d: dict[str, Any], device: torch.device) -> "_Factors":
        """Inverse of :meth:`to_dict`, on ``device``."""
        return cls(*(d[n].to(device) for n in ("U", "V", "bu", "bi")),
                   d["theta"].to(device) if d["theta"] is not None else None)


class _ALSProblem:
    """The fixed operands of one fit: both CSR views of the ratings, mu, the ridge terms, the item weights.

    Bias terms ride along as an extra column: solving users against [V, 1] gives [u_i, b_i]; solving items
    against [U, 1] gives [v_j, c_j]; targets are net of mu and of the other side's bias.
    """

    def __init__(self, train: Ratings, cfg: ALSConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.n_users, self.n_items, self.k = train.n_users, train.n_items, cfg.n_factors
        implicit = cfg.confidence is not None
        self.use_bias = cfg.use_bias and not implicit
        self.mu = train.mean() if self.use_bias else 0.0
        values = np.ones(len(train), dtype=np.float32) if implicit else train.values  # implicit: preference 1
        # torch warns on read-only arrays (pandas 3 hands them out); these tensors are never written, a copy is cheap
        self.users, self.items, self.values = (torch.as_tensor(a if a.flags.writeable else a.copy(), device=device)
                                               for a in (train.users, train.items, values))
        self.user_rows = SparseRows.from_csr(Ratings(train.users, train.items, values, self.n_users,
                                                     self.n_items).csr(), device)
        self.item_rows = SparseRows.from_csr(Ratings(train.items, train.users, values, self.n_items,
                                                     self.n_users).csr(), device)
        counts = torch.as_tensor(train.item_counts(), device=device, dtype=torch.float32)
        self.rated = counts > 0
        self.item_weight = torch.ones(self.n_items, device=device)
        if cfg.item_weighting:  # authors' code: w_j = sqrt(n_j) / mean(sqrt(n)); unrated items keep weight 1
            sq = counts.sqrt()
            self.item_weight = torch.where(self.rated, sq / sq[self.rated].mean(), torch.ones_like(sq))
        d = self.k + self.use_bias
        self.reg_u = torch.full((d,), cfg.lambda_u, device=device)
        self.reg_v = torch.full((self.n_items, d), cfg.lambda_v, device=device) * self.item_weight.unsqueeze(1)
        if self.use_bias:
            self.reg_u[self.k] = cfg.lambda_bias
            self.reg_v[:, self.k] = cfg.lambda_bias
        self.ones_n = torch.ones(self.n_users, 1, device=device)
        self.ones_m = torch.ones(self.n_items, 1, device=device)

    def solve_users(self, f: _Factors) -> None:
        """eq. 7: u_i <- (V_i^T V_i + lambda_U I)^-1 V_i^T r_i, targets net of mu and the item bias."""
        rows = self.user_rows
        target = rows.values - self.mu - (f.bi[rows.indices] if self.use_bias else 0.0)
        Y = torch.cat([f.V, self.ones_m], 1) if self.use_bias else f.V
        X = solve_ridge(rows.with_values(target), Y, self.reg_u, confidence=self.cfg.confidence,
                        block_rows=self.cfg.solve_block_rows)
        f.U, f.bu = (X[:, :self.k], X[:, self.k]) if self.use_bias else (X, f.bu)

    def solve_items(self, f: _Factors, prior: torch.Tensor | None) -> None:
        """eq. 8: v_j <- (U_j^T U_j + lambda_V I)^-1 (U_j^T r_j + lambda_V theta_j), targets net of mu and the
        user bias; ``prior`` is theta (rows of items without text zeroed) or None for PMF."""
        rows = self.item_rows
        target = rows.values - self.mu - (f.bu[rows.indices] if self.use_bias else 0.0)
        Y = torch.cat([f.U, self.ones_n], 1) if self.use_bias else f.U
        if prior is not None and self.use_bias:
            prior = torch.cat([prior, torch.zeros_like(self.ones_m)], 1)  # the bias column has a zero prior
        X = solve_ridge(rows.with_values(target), Y, self.reg_v, prior, confidence=self.cfg.confidence,
                        block_rows=self.cfg.solve_block_rows)
        f.V, f.bi = (X[:, :self.k], X[:, self.k]) if self.use_bias else (X, f.bi)

    def loss(self, f: _Factors, prior: torch.Tensor | None) -> float:
        """The objective L of the module docstring per training rating (explicit-rating form)."""
        cfg = self.cfg
        pred = (f.U[self.users] * f.V[self.items]).sum(1) + self.mu
        if self.use_bias:
            pred = pred + f.bu[self.users] + f.bi[self.items]
        diff = f.V if prior is None else f.V - prior
        loss = (0.5 * ((self.values - pred) ** 2).sum() + 0.5 * cfg.lambda_u * (f.U ** 2).sum()
                + 0.5 * cfg.lambda_v * (self.item_weight.unsqueeze(1) * diff ** 2).sum())
        if self.use_bias:
            loss = loss + 0.5 * cfg.lambda_bias * ((f.bu ** 2).sum() + (f.bi ** 2).sum())
        return float(loss) / len(self.values)


@dataclass
class _EarlyStopping:
    """Stop after ``patience`` counted iterations without a new best (by at least ``min_improvement``); keep the
    best iteration's snapshot (the authors' code kept the last improvement over the previous iteration instead)."""

    patience: int
    min_improvement: float
    best_metric: float = math.inf
    best_iteration: int = 0
    stale: int = 0
    best: dict[str, Any] | None = None

    @property
    def done(self) -> bool:
        """True once patience has run out."""
        return self.stale >= self.patience

    def update(self, metric: float, iteration: int, *, counts: bool, snapshot: Callable[[], dict[str, Any]],
               candidate: bool = True) -> None:
        """Record one iteration's metric (lower is better); ``snapshot`` is called only for a new best. An
        iteration that is not a ``candidate`` is neither kept nor counted."""
        if not candidate:
            return
        if metric < self.best_metric - self.min_improvement:
            self.best_metric, self.best_iteration, self.stale = metric, iteration, 0
            self.best = snapshot()
        elif counts:
            self.stale += 1

    def to_dict(self) -> dict[str, Any]:
        """State for checkpoints."""
        return {"best": self.best, "best_metric": self.best_metric, "best_iteration": self.best_iteration,
                "stale": self.stale}

    @classmethod
    def from_dict(cls, d: dict[str, Any], patience: int, min_improvement: float) -> "_EarlyStopping":
        """Inverse of :meth:`to_dict`."""
        return cls(patience, min_improvement, d["best_metric"], d["best_iteration"], d["stale"], d["best"])


class PMF(ALSFactorModel):
    """Probabilistic matrix factorisation by ALS: ConvMF's loss with no text prior (theta_j = 0)."""

    def __init__(self, config: PMFConfig = PMFConfig()) -> None:
        super().__init__(config.als, config.seed, config.device)
        self.config = config

    def fit(self, train: Ratings, validation: Ratings | None = None, *, callback: ProgressCallback | None = None,
            checkpoint_path: str | Path | None = None, resume: bool = False,
            warm_start: "WarmStart | None" = None) -> "PMF":
        """Alternate eq. 7 and eq. 8 (with theta = 0) until validation RMSE stops improving; ``warm_start``
        (:func:`~convmf_core.models.warm_start.warm_start_from`) starts from a previous model's factors."""
        self._fit_als(train, validation, callback, checkpoint_path, resume, warm_start)
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
