"""Matrix factorisation by closed-form ALS: the training loop shared by PMF and ConvMF, and the PMF baseline.

ConvMF's objective (Kim et al. 2016, eq. 5), with the options of :class:`~convmf_core.config.ALSConfig`:

    L = 1/2 sum_obs (r_ij - mu - b_i - c_j - u_i^T v_j)^2 + lambda_U/2 sum_i ||u_i||^2
        + lambda_V/2 sum_j w_j ||v_j - theta_j||^2 + lambda_b/2 (sum_i b_i^2 + sum_j (c_j - theta_j^c)^2)

PMF is the same with theta_j = 0. Beyond the paper, the text prior also predicts the item bias: theta_j^c is the
text's prior mean of c_j (0 without the bias channel, and for PMF), so an item's bias is shrunk toward what its
description says rather than toward 0 - which is what places a cold item among its peers. One outer iteration:
solve U (eq. 7), solve [V, c] (eq. 8 with the prior [theta_j, theta_j^c]), then let the subclass update the prior
(ConvMF: its text encoder, eq. 9 or 9'). With ``ALSConfig.gibbs.samples`` the ALS fit is followed by posterior
sampling (:mod:`convmf_core.gibbs`) and the model predicts the average over the kept draws. Training stops when
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
from convmf_core.gibbs import PosteriorSamples, SampleAccumulator
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

    def _update_prior(self, V: torch.Tensor, item_bias: torch.Tensor, item_weight: torch.Tensor,
                      rated: torch.Tensor, generator: torch.Generator, epochs: int | None,
                      step: int) -> tuple[torch.Tensor | None, dict[str, float]]:
        """New prior after the [V, c] step (ConvMF: eq. 9 / 9'; ``epochs`` overrides the per-iteration count;
        ``step`` counts the prior updates before this one, for step-size schedules) and extra figures for the
        iteration report. The prior has k columns (theta_j) or k + 1 (theta_j and the bias channel theta_j^c)."""
        return None, {}

    def _refit_prior_when_sampling(self) -> bool:
        """Whether each Gibbs sweep refits the prior to the drawn [V, c] (cheap closed forms only)."""
        return False

    def _prior_report(self, V: torch.Tensor, item_bias: torch.Tensor, rated: torch.Tensor,
                      generator: torch.Generator) -> dict[str, float]:
        """Figures about the fitted prior (ConvMF: its held-out R^2), computed once at the end of a fit."""
        return {}

    def _start_at_prior(self) -> bool:
        """Whether V starts at the initial prior (the authors' code: the untrained CNN's output) instead of noise."""
        return True

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
        self.sampling_history_: list[IterationReport] = []
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
                theta, extra = self._update_prior(factors.V, factors.bi, problem.item_weight, problem.rated,
                                                  generator,
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
        factors = _Factors.from_dict(best, device)
        self.validation_rmse_: float | None = None
        self.validation_rmse_ = self.best_validation_rmse_  # the kept ALS iteration's; posterior averaging updates it
        self.samples_: PosteriorSamples | None = None
        # The prior's held-out R^2 is measured against the items' purely collaborative [v_j, c_j] (eq. 8 with no
        # prior, U fixed): the fitted V is shrunk toward the prior itself and would flatter it.
        free = factors.clone()
        problem.solve_items(free, None)
        self.prior_report_ = self._prior_report(free.V, free.bi, problem.rated, generator)
        if cfg.gibbs.samples > 0:
            self._sample_posterior(problem, factors, validation, generator, callback, warm_start is not None)
        self.fallback_: str | None = None
        if validation is not None and len(validation) and cfg.confidence is None:
            self._fall_back_if_worse(problem, validation)

    def _sample_posterior(self, problem: "_ALSProblem", factors: "_Factors", validation: Ratings | None,
                          generator: torch.Generator, callback: ProgressCallback | None, warm: bool) -> None:
        """Gibbs sweeps from the ALS fit (``convmf_core.gibbs``): draw [U, b], draw [V, c] around the prior, refit a
        closed-form prior; keep ``samples`` draws after the burn-in and predict their average."""
        gcfg = self.als.gibbs
        if self.als.confidence is not None:
            raise ModelFitError("posterior sampling (ALSConfig.gibbs.samples) is for explicit ratings only")
        sampler = problem.with_ridge(gcfg.lambda_u, gcfg.lambda_v, gcfg.lambda_bias)
        burn_in = gcfg.warm_start_burn_in if warm else gcfg.burn_in
        val = None
        if validation is not None and len(validation):
            val = (torch.as_tensor(np.array(validation.users, dtype=np.int64), device=factors.U.device),
                   torch.as_tensor(np.array(validation.items, dtype=np.int64), device=factors.U.device),
                   np.asarray(validation.values, dtype=np.float32))
        keep = SampleAccumulator(*(val[:2] if val is not None else (None, None)))
        refit = self._refit_prior_when_sampling()
        low, high = self.rating_range_ if self.als.clip_predictions else (-math.inf, math.inf)
        first = len(self.history_) + 1
        for sweep in range(burn_in + gcfg.samples):
            t0 = time.perf_counter()
            sigma = math.sqrt(problem.residual_variance(factors))  # plug-in sigma^2 (module docstring of gibbs)
            sampler.solve_users(factors, sample=(sigma, generator))  # eq. 7, drawn
            if gcfg.sample_precision:
                sampler.reg_u = draw_ridge(factors.U, factors.bu if sampler.use_bias else None, None, sigma ** 2,
                                           gcfg.precision_prior, generator)
            prior = self._masked_prior(factors.theta)
            sampler.solve_items(factors, prior, sample=(sigma, generator))  # eq. 8, drawn
            if gcfg.sample_precision:
                centre = None if prior is None else sampler._item_prior(prior)
                sampler.reg_v = draw_ridge(factors.V, factors.bi if sampler.use_bias else None, centre, sigma ** 2,
                                           gcfg.precision_prior, generator).expand(problem.n_items, -1) \
                    * problem.item_weight.unsqueeze(1)
            extra: dict[str, float] = {"gibbs_sigma": sigma}
            if gcfg.sample_precision:
                extra.update(gibbs_lambda_u=float(sampler.reg_u[:problem.k].mean()),
                             gibbs_lambda_v=float(sampler.reg_v[:, :problem.k].mean()))
            if refit:
                theta, _ = self._update_prior(factors.V, factors.bi, problem.item_weight, problem.rated, generator,
                                              None, step=0)
                if theta is not None:
                    factors.theta = theta  # unrated items keep their draw around the prior
            val_rmse = None
            if sweep >= burn_in:
                mean_pred = keep.add(factors.U, factors.bu, factors.V, factors.bi)
                if mean_pred is not None:
                    pred = (mean_pred.cpu().numpy() + self.global_mean_).clip(low, high)
                    val_rmse = float(np.sqrt(np.mean((pred - val[2]) ** 2)))
            if not bool(torch.isfinite(factors.V).all() and torch.isfinite(factors.U).all()):
                raise ModelFitError(f"posterior sampling diverged at sweep {sweep + 1}; raise ALSConfig.gibbs lambdas")
            report = IterationReport(first + sweep, float("nan"), val_rmse, time.perf_counter() - t0,
                                     {**extra, "gibbs_sweep": float(sweep + 1), "gibbs_kept": float(len(keep))})
            self.sampling_history_.append(report)
            if callback is not None:
                callback(report)
        self.samples_ = keep.samples()
        self.sampling_seconds_per_sweep_ = float(np.mean([r.seconds for r in self.sampling_history_]))
        if self.sampling_history_[-1].validation_rmse is not None:
            self.validation_rmse_ = self.sampling_history_[-1].validation_rmse
        logger.info("posterior averaging: %d sweeps (%d burn-in), %.3f s a sweep, validation RMSE %s",
                    burn_in + gcfg.samples, burn_in, self.sampling_seconds_per_sweep_,
                    "n/a" if self.validation_rmse_ is None else f"{self.validation_rmse_:.4f}")

    def _fall_back_if_worse(self, problem: "_ALSProblem", validation: Ratings) -> None:
        """On a catalogue too small for the model: if the fitted model's validation RMSE is worse than biases alone
        or the global mean, keep the better of those (factors set to 0) and say so in ``fallback_``."""
        if not self.als.fallback:
            return
        model_rmse = self._rmse(validation)
        mean_rmse = float(np.sqrt(np.mean((validation.values - self.global_mean_) ** 2)))
        bu, bi = problem.fit_biases()
        candidates = {"biases": (self._bias_model_rmse(bu, bi, validation), bu, bi),
                      "global mean": (mean_rmse, torch.zeros_like(bu), torch.zeros_like(bi))}
        name, (rmse, cu, ci) = min(candidates.items(), key=lambda kv: kv[1][0])
        if model_rmse <= rmse:
            return
        self.fallback_ = (f"the fitted model's validation RMSE {model_rmse:.4f} is worse than the {name} model's "
                          f"{rmse:.4f} (global mean {mean_rmse:.4f}): the catalogue is too small for the factors, "
                          f"so the model keeps the {name} only")
        logger.warning("fallback: %s", self.fallback_)
        self.samples_ = None
        self._set_fitted(torch.zeros_like(self.user_factors_), torch.zeros_like(self.item_factors_), cu, ci)
        self.validation_rmse_ = rmse

    def _rmse(self, ratings: Ratings) -> float:
        pred = self.predict(ratings.users, ratings.items)
        return float(np.sqrt(np.mean((pred - ratings.values) ** 2)))

    def _bias_model_rmse(self, bu: torch.Tensor, bi: torch.Tensor, ratings: Ratings) -> float:
        pred = self.global_mean_ + bu.cpu().numpy()[ratings.users] + bi.cpu().numpy()[ratings.items]
        if self.als.clip_predictions:
            pred = pred.clip(*self.rating_range_)
        return float(np.sqrt(np.mean((pred - ratings.values) ** 2)))

    def _initial_factors(self, problem: "_ALSProblem", device: torch.device, generator: torch.Generator,
                         warm_start: "WarmStart | None" = None) -> "_Factors":
        """U ~ N(0, init_scale^2); V = theta for items with a prior (as the authors' code), else N(0, init_scale^2).

        With a warm start, users and items the previous model knew take its factors and biases instead; new items
        keep the start above (theta_j = cnn(W, X_j) with the previous CNN weights, or noise without text)."""
        k, scale = self.als.n_factors, self.als.init_scale
        U = torch.randn(problem.n_users, k, generator=generator).to(device) * scale
        theta = self._init_prior(problem.n_items, device, generator)
        V = torch.randn(problem.n_items, k, generator=generator).to(device) * scale
        bu, bi = torch.zeros(problem.n_users, device=device), torch.zeros(problem.n_items, device=device)
        # a warm start's encoder is fitted: new items start at its prior whatever the encoder
        if theta is not None and (self._start_at_prior() or warm_start is not None):
            mask, k_theta = self._prior_mask(), theta[:, :k]
            V = torch.where(mask.unsqueeze(1), k_theta, V) if mask is not None else k_theta.clone()
            if theta.shape[1] > k and warm_start is not None:  # ... and at the bias channel's c_j
                bi = torch.where(mask, theta[:, k], bi) if mask is not None else theta[:, k].clone()
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
        samples = getattr(self, "samples_", None)
        if samples is not None:  # the posterior average: a stacked factor model (convmf_core.gibbs)
            if getattr(self, "_stacked", None) is None or self._stacked[0] is not samples:
                self._stacked = (samples, *samples.scoring_rows())
            user, item = self._stacked[1], self._stacked[2]
        else:
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
        """Take the new prior; items with a prior and no rating get v_j = theta_j and, with the bias channel,
        c_j = theta_j^c (eq. 8 with n_j = 0)."""
        self.theta = theta
        cold = ~rated if prior_mask is None else (~rated & prior_mask)
        k = self.V.shape[1]
        self.V = torch.where(cold.unsqueeze(1), theta[:, :k], self.V)
        if theta.shape[1] > k:
            self.bi = torch.where(cold, theta[:, k], self.bi)

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
        self.device = device
        self.ones_n = torch.ones(self.n_users, 1, device=device)
        self.ones_m = torch.ones(self.n_items, 1, device=device)

    def with_ridge(self, lambda_u: float, lambda_v: float, lambda_bias: float) -> "_ALSProblem":
        """The same problem with other ridge terms (the Gibbs sampler's own lambdas)."""
        other = copy.copy(self)
        d = self.k + self.use_bias
        other.reg_u = torch.full((d,), lambda_u, device=self.reg_u.device)
        other.reg_v = torch.full((self.n_items, d), lambda_v, device=self.reg_v.device) * self.item_weight.unsqueeze(1)
        if self.use_bias:
            other.reg_u[self.k] = lambda_bias
            other.reg_v[:, self.k] = lambda_bias
        return other

    def train_predictions(self, f: _Factors) -> torch.Tensor:
        """mu + b_i + c_j + u_i^T v_j for every training rating."""
        pred = (f.U[self.users] * f.V[self.items]).sum(1) + self.mu
        if self.use_bias:
            pred = pred + f.bu[self.users] + f.bi[self.items]
        return pred

    def residual_variance(self, f: _Factors) -> float:
        """Mean squared training residual of the current factors (the Gibbs sampler's plug-in sigma^2)."""
        return float(((self.values - self.train_predictions(f)) ** 2).mean())

    def fit_biases(self, iterations: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """mu + b_i + c_j alone (no factors), by alternating ridge solves: the fallback of a tiny catalogue."""
        bu, bi = torch.zeros(self.n_users, device=self.device), torch.zeros(self.n_items, device=self.device)
        lam = torch.full((1,), self.cfg.lambda_bias, device=self.device)
        for _ in range(iterations):
            rows = self.user_rows
            bu = solve_ridge(rows.with_values(rows.values - self.mu - bi[rows.indices]), self.ones_m, lam)[:, 0]
            rows = self.item_rows
            bi = solve_ridge(rows.with_values(rows.values - self.mu - bu[rows.indices]), self.ones_n, lam)[:, 0]
        return bu, bi

    def solve_users(self, f: _Factors, sample: tuple[float, torch.Generator] | None = None) -> None:
        """eq. 7: u_i <- (V_i^T V_i + lambda_U I)^-1 V_i^T r_i, targets net of mu and the item bias (a draw from
        the conditional posterior with ``sample``)."""
        rows = self.user_rows
        target = rows.values - self.mu - (f.bi[rows.indices] if self.use_bias else 0.0)
        Y = torch.cat([f.V, self.ones_m], 1) if self.use_bias else f.V
        X = solve_ridge(rows.with_values(target), Y, self.reg_u, confidence=self.cfg.confidence,
                        block_rows=self.cfg.solve_block_rows, sample=sample)
        f.U, f.bu = (X[:, :self.k], X[:, self.k]) if self.use_bias else (X, f.bu)

    def solve_items(self, f: _Factors, prior: torch.Tensor | None,
                    sample: tuple[float, torch.Generator] | None = None) -> None:
        """eq. 8: [v_j, c_j] <- (U_j^T U_j + Lambda_V)^-1 (U_j^T r_j + Lambda_V [theta_j, theta_j^c]), targets net
        of mu and the user bias; ``prior`` is theta, k columns (the bias's prior mean is then 0) or k + 1 (the bias
        channel), rows of items without text zeroed, or None for PMF. A draw with ``sample``."""
        rows = self.item_rows
        target = rows.values - self.mu - (f.bu[rows.indices] if self.use_bias else 0.0)
        Y = torch.cat([f.U, self.ones_n], 1) if self.use_bias else f.U
        if prior is not None:
            prior = self._item_prior(prior)
        X = solve_ridge(rows.with_values(target), Y, self.reg_v, prior, confidence=self.cfg.confidence,
                        block_rows=self.cfg.solve_block_rows, sample=sample)
        f.V, f.bi = (X[:, :self.k], X[:, self.k]) if self.use_bias else (X, f.bi)

    def _item_prior(self, prior: torch.Tensor) -> torch.Tensor:
        """The prior as the solver's columns: [theta, theta^c] with biases (theta^c = 0 without the channel),
        theta alone without."""
        if not self.use_bias:
            return prior[:, :self.k]
        if prior.shape[1] == self.k:
            return torch.cat([prior, torch.zeros_like(self.ones_m)], 1)  # the bias column has a zero prior
        return prior

    def loss(self, f: _Factors, prior: torch.Tensor | None) -> float:
        """The objective L of the module docstring per training rating (explicit-rating form)."""
        cfg = self.cfg
        pred = self.train_predictions(f)
        diff = f.V if prior is None else f.V - prior[:, :self.k]
        loss = (0.5 * ((self.values - pred) ** 2).sum() + 0.5 * cfg.lambda_u * (f.U ** 2).sum()
                + 0.5 * cfg.lambda_v * (self.item_weight.unsqueeze(1) * diff ** 2).sum())
        if self.use_bias:
            bias_prior = prior[:, self.k] if prior is not None and prior.shape[1] > self.k else 0.0
            loss = loss + 0.5 * cfg.lambda_bias * ((f.bu ** 2).sum() + ((f.bi - bias_prior) ** 2).sum())
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


def draw_ridge(factors: torch.Tensor, bias: torch.Tensor | None, centre: torch.Tensor | None, sigma2: float,
               prior: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """Draw the ridge terms of one side from their conditional posterior (``GibbsConfig.sample_precision``).

    With x_id ~ N(m_id, 1 / tau_d) for every row i of the side (m = the prior mean: 0 for users, [theta, theta^c] for
    items) and tau_d ~ Gamma(a0, b0) (shape, rate), the conditional of each column's precision is

        tau_d | X ~ Gamma(a0 + n / 2,  b0 + 1/2 sum_i (x_id - m_id)^2)

    and the solver's ridge is lambda_d = sigma^2 tau_d (its prior precision is lambda / sigma^2). One draw per factor
    column and one for the bias column (automatic relevance determination: a column the data do not support gets
    a large lambda and is shrunk away, so k can be set generously)."""
    x = factors if bias is None else torch.cat([factors, bias.unsqueeze(1)], 1)
    dev = x if centre is None else x - centre[:, :x.shape[1]]
    a0, b0 = prior
    shape = a0 + x.shape[0] / 2.0
    rate = b0 + 0.5 * (dev.double() ** 2).sum(0).cpu().numpy()
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    tau = rng.gamma(shape, 1.0 / rate)
    return torch.as_tensor(sigma2 * tau, dtype=x.dtype, device=x.device)


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
