"""Posterior averaging for the ALS models: Gibbs sweeps after the ALS fit, S samples kept and averaged.

The ALS objective (``convmf_core.models.als_mf``) is the negative log posterior of a Gaussian model: ratings
r_ij ~ N(mu + b_i + c_j + u_i^T v_j, sigma^2), u_i ~ N(0, sigma^2 / lambda_U I), [v_j, c_j] ~ N(theta_j,
sigma^2 diag(1 / lambda_V, 1 / lambda_b)), b_i ~ N(0, sigma^2 / lambda_b). ALS returns its mode. A sweep draws every
row from its conditional posterior instead (BPMF, Salakhutdinov & Mnih 2008, with fixed hyperparameters):

    [u_i, b_i] ~ N(A_i^-1 V_i^T t_i, sigma^2 A_i^-1),                A_i = V_i^T V_i + Lambda_U       (eq. 7 drawn)
    [v_j, c_j] ~ N(A_j^-1 (U_j^T t_j + Lambda_V theta_j), sigma^2 A_j^-1), A_j = U_j^T U_j + Lambda_V  (eq. 8 drawn)

(:func:`convmf_core.als.solve_ridge` with ``sample``), then refits a closed-form text prior theta to the drawn
[v_j, c_j] (a CNN prior stays as the ALS fit left it). sigma^2 is not sampled: it is re-estimated before every sweep
as the mean squared training residual of the current draw (a plug-in estimate; the ALS optimum's residual variance
at the first sweep). After ``burn_in`` sweeps, ``samples`` draws are kept and the prediction is their mean

    r_hat_ij = mu + 1/S sum_s (u_i^(s)T v_j^(s) + b_i^(s) + c_j^(s))

which is itself a factor model: the inner product of the stacked rows [u^(s), b^(s), 1]_s / sqrt(S) and
[v^(s), 1, c^(s)]_s / sqrt(S) (:meth:`PosteriorSamples.scoring_rows`), so top-N, serving and fold-in use it as they
use any factor model. A sweep costs what an ALS iteration costs; the samples take S (N + M) (k + 1) floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class PosteriorSamples:
    """S kept draws: ``user`` (S x N x k), ``user_bias`` (S x N), ``item`` (S x M x k), ``item_bias`` (S x M)."""

    user: torch.Tensor
    user_bias: torch.Tensor
    item: torch.Tensor
    item_bias: torch.Tensor

    @property
    def n_samples(self) -> int:
        """S."""
        return int(self.user.shape[0])

    def scoring_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacked factor model of the averaged prediction (module docstring): user rows (N x S(k + 2)) and
        item rows (M x S(k + 2)); their inner product plus mu is r_hat."""
        s = self.n_samples
        ones_u, ones_i = torch.ones_like(self.user_bias), torch.ones_like(self.item_bias)
        user = torch.cat([self.user, self.user_bias.unsqueeze(2), ones_u.unsqueeze(2)], 2) / math.sqrt(s)
        item = torch.cat([self.item, ones_i.unsqueeze(2), self.item_bias.unsqueeze(2)], 2) / math.sqrt(s)
        return (user.permute(1, 0, 2).reshape(user.shape[1], -1), item.permute(1, 0, 2).reshape(item.shape[1], -1))

    def mean(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Posterior means of U, b, V, c (a point model; not the averaged prediction, which keeps the products)."""
        return self.user.mean(0), self.user_bias.mean(0), self.item.mean(0), self.item_bias.mean(0)

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Tensors by name (bundles)."""
        return {"user_samples": self.user, "user_bias_samples": self.user_bias, "item_samples": self.item,
                "item_bias_samples": self.item_bias}

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor]) -> "PosteriorSamples | None":
        """Inverse of :meth:`to_dict`; None when ``d`` holds no samples."""
        if "user_samples" not in d:
            return None
        return cls(d["user_samples"], d["user_bias_samples"], d["item_samples"], d["item_bias_samples"])


class SampleAccumulator:
    """Collects kept draws on the CPU and keeps the running mean of their predictions on a set of pairs."""

    def __init__(self, users: torch.Tensor | None = None, items: torch.Tensor | None = None) -> None:
        self.users, self.items = users, items
        self._u: list[torch.Tensor] = []
        self._bu: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        self._bi: list[torch.Tensor] = []
        self._sum: torch.Tensor | None = None

    def add(self, U: torch.Tensor, bu: torch.Tensor, V: torch.Tensor, bi: torch.Tensor) -> torch.Tensor | None:
        """Keep one draw; returns the running mean prediction on the pairs (net of mu), or None without pairs."""
        for store, t in ((self._u, U), (self._bu, bu), (self._v, V), (self._bi, bi)):
            store.append(t.detach().cpu().clone())
        if self.users is None:
            return None
        pred = (U[self.users] * V[self.items]).sum(1) + bu[self.users] + bi[self.items]
        self._sum = pred if self._sum is None else self._sum + pred
        return self._sum / len(self._u)

    def __len__(self) -> int:
        return len(self._u)

    def samples(self) -> PosteriorSamples:
        """The kept draws, stacked."""
        return PosteriorSamples(torch.stack(self._u), torch.stack(self._bu), torch.stack(self._v),
                                torch.stack(self._bi))
