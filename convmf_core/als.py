"""Closed-form alternating least squares: the U and V updates of ConvMF (Kim et al. 2016, eq. 7 and 8).

One solver, called twice with the roles swapped (users against items, then items against users). For every row i
of a sparse matrix R (users for eq. 7, items for eq. 8) with observed columns Omega_i and the other side's factors
Y (one row y_j per column j), it solves the ridge problem

    x_i = argmin_x  1/2 sum_{j in Omega_i} (r_ij - x^T y_j)^2 + 1/2 (x - p_i)^T diag(lambda_i) (x - p_i)

in closed form:

    x_i = (Y_i^T Y_i + diag(lambda_i))^{-1} (Y_i^T r_i + diag(lambda_i) p_i)

* eq. 7 (users):  lambda_i = lambda_U,        p_i = 0
* eq. 8 (items):  lambda_j = lambda_V (x w_j), p_j = theta_j = cnn(W, X_j)   (PMF: p_j = 0)
* bias terms ride along as an extra column of ones in Y, with their own ridge and a zero prior.

Implicit-feedback confidence (CTR / CDL, Wang & Blei 2011): observed entries weigh a, unobserved ones b, so

    x_i = (b Y^T Y + (a - b) Y_i^T Y_i + diag(lambda_i))^{-1} (a Y_i^T r_i + diag(lambda_i) p_i)

Posterior sampling (the Gibbs step of :mod:`convmf_core.gibbs`): with Gaussian noise of variance sigma^2 on the
ratings and the ridge read as a Gaussian prior of precision lambda / sigma^2, row i's conditional posterior is

    x_i ~ N(A_i^{-1} b_i, sigma^2 A_i^{-1}),   A_i = Y_i^T Y_i + diag(lambda_i) = L_i L_i^T,  b_i = the rhs above

and one draw is x_i = A_i^{-1} b_i + sigma L_i^{-T} z_i with z_i ~ N(0, I) (cov(L^{-T} z) = (L L^T)^{-1}).

Vectorised: the Gram matrices Y_i^T Y_i of a block of rows come from one sparse product, the right-hand sides from
another, and the block is solved by one batched Cholesky factorisation. As y_j y_j^T depends on the column only,

    vec(Y_i^T Y_i) = sum_{j in Omega_i} vec(y_j y_j^T) = (the 0/1 pattern of R) @ [vec(y_j y_j^T)]_j,   Y_i^T r_i = R Y

so the Gram matrices cost one sparse (rows x columns) @ (columns x d^2) product when the table of outer products
fits in ``outer_table_floats``; otherwise they come from a scatter-add of gathered outer products in chunks of
``max_chunk_entries`` ratings. Memory is bounded by ``block_rows`` x d^2 plus that table or chunk.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from convmf_core.data import CSR


@dataclass(frozen=True)
class SparseRows:
    """A CSR matrix as torch tensors on one device (``indptr`` and ``indices`` int64, ``values`` float)."""

    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    n_rows: int
    n_cols: int

    @classmethod
    def from_csr(cls, csr: CSR, device: torch.device, dtype: torch.dtype = torch.float32) -> "SparseRows":
        """Copy a numpy :class:`CSR` to ``device``."""
        return cls(torch.as_tensor(csr.indptr, device=device), torch.as_tensor(csr.indices, device=device),
                   torch.as_tensor(csr.data, device=device, dtype=dtype), csr.n_rows, csr.n_cols)

    def with_values(self, values: torch.Tensor) -> "SparseRows":
        """Same sparsity pattern, other values (e.g. residual targets)."""
        return SparseRows(self.indptr, self.indices, values, self.n_rows, self.n_cols)

    def row_ids(self) -> torch.Tensor:
        """The row index of every stored entry."""
        counts = self.indptr[1:] - self.indptr[:-1]
        return torch.repeat_interleave(torch.arange(self.n_rows, device=self.indptr.device), counts)


def solve_ridge(rows: SparseRows, other: torch.Tensor, reg: torch.Tensor, prior: torch.Tensor | None = None, *,
                confidence: tuple[float, float] | None = None, block_rows: int = 4096,
                max_chunk_entries: int | None = None, sample: tuple[float, torch.Generator] | None = None,
                outer_table_floats: int = 1 << 26) -> torch.Tensor:
    """Solve every row's ridge problem (module docstring) and return X with shape ``(rows.n_rows, d)``.

    ``other`` is Y (``rows.n_cols`` x d); ``reg`` is lambda, either one vector of length d shared by all rows or a
    matrix ``(n_rows, d)``; ``prior`` is P (``n_rows`` x d) or None for zero; ``confidence`` is (a, b) or None for
    the explicit-rating loss (a = 1, b = 0). With ``sample = (sigma, generator)`` each row is a draw from its
    conditional posterior N(A^-1 b, sigma^2 A^-1) instead of its mean (module docstring; explicit ratings only).
    """
    n, d = rows.n_rows, other.shape[1]
    device, dtype = other.device, other.dtype
    if other.shape[0] != rows.n_cols:
        raise ValueError(f"other has {other.shape[0]} rows, the matrix has {rows.n_cols} columns")
    reg = reg.to(device=device, dtype=dtype)
    reg_rows = reg.expand(n, d) if reg.dim() == 1 else reg
    if max_chunk_entries is None:
        max_chunk_entries = max(1, (1 << 24) // (d * d))  # ~64 MB of float32 outer products at a time
    a, b = confidence if confidence is not None else (1.0, 0.0)
    base_gram = b * (other.T @ other) if b != 0.0 else None  # b Y^T Y, shared by every row
    eye = torch.eye(d, device=device, dtype=dtype)
    out = torch.empty((n, d), device=device, dtype=dtype)
    indptr = rows.indptr
    # [vec(y_j y_j^T)]_j: every column's outer product once (module docstring), when it fits
    outer = (other.unsqueeze(2) * other.unsqueeze(1)).reshape(rows.n_cols, d * d) \
        if rows.n_cols * d * d <= outer_table_floats and device.type == "cpu" else None
    for lo in range(0, n, block_rows):
        hi = min(n, lo + block_rows)
        B = hi - lo
        start, stop = int(indptr[lo]), int(indptr[hi])
        if stop > start and outer is not None:
            crow, cols = indptr[lo:hi + 1] - start, rows.indices[start:stop]
            with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is tested
                warnings.simplefilter("ignore", UserWarning)
                pattern = torch.sparse_csr_tensor(crow, cols, torch.ones(stop - start, dtype=dtype), (B, rows.n_cols),
                                                  check_invariants=False)
                values = torch.sparse_csr_tensor(crow, cols, rows.values[start:stop].to(dtype), (B, rows.n_cols),
                                                 check_invariants=False)
            gram = (pattern @ outer).reshape(B, d, d)  # sum_j y_j y_j^T = Y_i^T Y_i
            rhs = values @ other  # sum_j r_ij y_j = Y_i^T r_i
        else:
            gram = torch.zeros((B, d, d), device=device, dtype=dtype)
            rhs = torch.zeros((B, d), device=device, dtype=dtype)
        if stop > start and outer is None:
            local = torch.repeat_interleave(torch.arange(B, device=device), indptr[lo + 1:hi + 1] - indptr[lo:hi])
            for c0 in range(start, stop, max_chunk_entries):
                c1 = min(stop, c0 + max_chunk_entries)
                y = other[rows.indices[c0:c1]]  # y_j for j in Omega_i
                r = rows.values[c0:c1]
                rows_c = local[c0 - start:c1 - start]
                gram.index_add_(0, rows_c, y.unsqueeze(2) * y.unsqueeze(1))  # sum_j y_j y_j^T = Y_i^T Y_i
                rhs.index_add_(0, rows_c, r.unsqueeze(1) * y)  # sum_j r_ij y_j = Y_i^T r_i
        if confidence is not None:
            gram.mul_(a - b)  # (a - b) Y_i^T Y_i
            rhs.mul_(a)  # a Y_i^T r_i
        if base_gram is not None:
            gram.add_(base_gram)
        lam = reg_rows[lo:hi]
        gram.add_(torch.diag_embed(lam))  # + diag(lambda_i)
        if prior is not None:
            rhs.add_(lam * prior[lo:hi])  # + diag(lambda_i) p_i
        chol, info = torch.linalg.cholesky_ex(gram)
        if bool((info != 0).any()):
            # Not positive definite (a zero ridge on a row with too few ratings): least squares instead.
            chol = torch.linalg.cholesky(gram + 1e-6 * eye) if sample is not None else None
            out[lo:hi] = torch.linalg.lstsq(gram + 1e-6 * eye, rhs.unsqueeze(2)).solution.squeeze(2)
        else:
            out[lo:hi] = torch.cholesky_solve(rhs.unsqueeze(2), chol).squeeze(2)
        if sample is not None:
            sigma, generator = sample
            z = torch.randn((B, d, 1), generator=generator).to(device=device, dtype=dtype)
            # + sigma L^-T z: a draw with covariance sigma^2 A^-1
            out[lo:hi] += sigma * torch.linalg.solve_triangular(chol.mT, z, upper=True).squeeze(2)
    return out


def solve_ridge_reference(csr: CSR, other: np.ndarray, reg: np.ndarray, prior: np.ndarray | None = None, *,
                          confidence: tuple[float, float] | None = None) -> np.ndarray:
    """The same solve, one row at a time in float64 numpy: slow and obviously right, for tests."""
    n, d = csr.n_rows, other.shape[1]
    a, b = confidence if confidence is not None else (1.0, 0.0)
    reg_rows = np.broadcast_to(reg, (n, d)) if np.ndim(reg) == 1 else reg
    out = np.zeros((n, d))
    for i in range(n):
        cols, r = csr.row(i)
        y = other[cols].astype(np.float64)
        lam = np.diag(reg_rows[i].astype(np.float64))
        A = b * other.T.astype(np.float64) @ other + (a - b) * y.T @ y + lam
        rhs = a * y.T @ r.astype(np.float64)
        if prior is not None:
            rhs = rhs + lam @ prior[i]
        out[i] = np.linalg.solve(A, rhs)
    return out
