"""Tests of the batched closed-form ridge solver behind the ALS updates (convmf_core.als)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convmf_core.als import SparseRows, solve_ridge, solve_ridge_reference
from convmf_core.data import CSR, Ratings

N_ROWS, N_COLS, D = 23, 17, 5
EMPTY_ROWS = (0, 7, 22)  # rows with no observed entry


@pytest.fixture(scope="module")
def problem() -> dict:
    """A random sparse matrix (some rows empty), the other side's factors, per-row ridges and priors."""
    rng = np.random.default_rng(0)
    mask = rng.random((N_ROWS, N_COLS)) < 0.35
    mask[list(EMPTY_ROWS)] = False
    mask[3] = False
    mask[3, 2] = True  # a row with a single rating
    users, items = np.nonzero(mask)
    ratings = Ratings(users, items, rng.normal(3.0, 1.0, size=len(users)), N_ROWS, N_COLS)
    return {
        "csr": ratings.csr(),
        "mask": mask,
        "other": rng.normal(0.0, 1.0, size=(N_COLS, D)),
        "reg_vec": rng.uniform(0.5, 3.0, size=D),
        "reg_mat": rng.uniform(0.1, 4.0, size=(N_ROWS, D)),
        "prior": rng.normal(0.0, 1.0, size=(N_ROWS, D)),
    }


def _solve(p: dict, reg: np.ndarray, prior: np.ndarray | None = None, dtype=torch.float64, **kw) -> np.ndarray:
    rows = SparseRows.from_csr(p["csr"], torch.device("cpu"), dtype)
    out = solve_ridge(rows, torch.as_tensor(p["other"], dtype=dtype), torch.as_tensor(reg, dtype=dtype),
                      None if prior is None else torch.as_tensor(prior, dtype=dtype), **kw)
    assert out.shape == (N_ROWS, D) and out.dtype == dtype
    return out.numpy()


CASES = {
    "explicit": dict(reg="reg_vec", prior=False, confidence=None),
    "per_row_reg": dict(reg="reg_mat", prior=False, confidence=None),
    "prior": dict(reg="reg_mat", prior=True, confidence=None),
    "confidence": dict(reg="reg_vec", prior=False, confidence=(1.0, 0.05)),
    "confidence_prior": dict(reg="reg_mat", prior=True, confidence=(2.0, 0.3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_solve_ridge_matches_reference(problem: dict, case: str) -> None:
    c = CASES[case]
    reg, prior = problem[c["reg"]], problem["prior"] if c["prior"] else None
    expected = solve_ridge_reference(problem["csr"], problem["other"], reg, prior, confidence=c["confidence"])
    got = _solve(problem, reg, prior, confidence=c["confidence"])
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)
    # float32 (what the models use) agrees to single precision
    got32 = _solve(problem, reg, prior, dtype=torch.float32, confidence=c["confidence"])
    np.testing.assert_allclose(got32, expected, rtol=1e-4, atol=1e-4)
    # the scatter-add path (used when the table of outer products does not fit, and on CUDA), with small blocks and
    # chunks (a chunk boundary inside a row, a block boundary inside the data), agrees with the sparse product
    chunked = _solve(problem, reg, prior, confidence=c["confidence"], block_rows=4, max_chunk_entries=3,
                     outer_table_floats=0)
    np.testing.assert_allclose(chunked, expected, rtol=1e-9, atol=1e-9)
    single = _solve(problem, reg, prior, confidence=c["confidence"], block_rows=1, max_chunk_entries=1,
                    outer_table_floats=0)
    np.testing.assert_allclose(single, expected, rtol=1e-9, atol=1e-9)


def _objective(X: torch.Tensor, p: dict, reg: torch.Tensor, prior: torch.Tensor | None,
               confidence: tuple[float, float] | None) -> torch.Tensor:
    """The ridge objective of the als module docstring, written densely (unobserved targets are 0)."""
    Y = torch.as_tensor(p["other"])
    mask = torch.as_tensor(p["mask"], dtype=torch.float64)
    R = torch.zeros(N_ROWS, N_COLS, dtype=torch.float64)
    csr: CSR = p["csr"]
    rows = np.repeat(np.arange(N_ROWS), csr.counts())
    R[rows, csr.indices] = torch.as_tensor(csr.data, dtype=torch.float64)
    a, b = confidence if confidence is not None else (1.0, 0.0)
    weight = b + (a - b) * mask  # a where observed, b elsewhere
    fit = 0.5 * (weight * (R - X @ Y.T) ** 2).sum()
    diff = X if prior is None else X - prior
    return fit + 0.5 * (reg.expand(N_ROWS, D) * diff ** 2).sum()


@pytest.mark.parametrize("case", list(CASES))
def test_closed_form_is_a_stationary_point(problem: dict, case: str) -> None:
    c = CASES[case]
    reg = torch.as_tensor(problem[c["reg"]])
    prior = torch.as_tensor(problem["prior"]) if c["prior"] else None
    X = torch.as_tensor(_solve(problem, reg.numpy(), None if prior is None else prior.numpy(),
                               confidence=c["confidence"])).requires_grad_(True)
    loss = _objective(X, problem, reg, prior, c["confidence"])
    (grad,) = torch.autograd.grad(loss, X)
    assert float(grad.abs().max()) < 1e-8
    # and a minimum: any perturbation increases the (strictly convex) objective
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        nudged = X.detach() + 1e-3 * torch.randn(X.shape, generator=gen, dtype=torch.float64)
        assert float(_objective(nudged, problem, reg, prior, c["confidence"])) > float(loss.detach())


def test_rows_without_ratings_return_the_prior(problem: dict) -> None:
    with_prior = _solve(problem, problem["reg_mat"], problem["prior"])
    for r in EMPTY_ROWS:
        np.testing.assert_allclose(with_prior[r], problem["prior"][r], rtol=1e-12, atol=1e-12)
    rated = np.setdiff1d(np.arange(N_ROWS), EMPTY_ROWS)
    assert not np.allclose(with_prior[rated], problem["prior"][rated])  # rated rows move away from it
    without_prior = _solve(problem, problem["reg_vec"])
    np.testing.assert_array_equal(without_prior[list(EMPTY_ROWS)], 0.0)


def test_zero_ridge_on_underdetermined_row_falls_back_to_least_squares(problem: dict) -> None:
    # Row 3 has one rating and d = 5: with no ridge its Gram matrix is singular (Cholesky fails).
    out = _solve(problem, np.zeros(D))
    assert np.isfinite(out).all()
    cols, r = problem["csr"].row(3)
    np.testing.assert_allclose(out[3] @ problem["other"][cols].T, r, atol=1e-3)  # still fits its rating


def test_solve_ridge_checks_shapes(problem: dict) -> None:
    rows = SparseRows.from_csr(problem["csr"], torch.device("cpu"))
    with pytest.raises(ValueError, match="columns"):
        solve_ridge(rows, torch.zeros(N_COLS + 1, D), torch.ones(D))


def test_sparse_rows_helpers(problem: dict) -> None:
    rows = SparseRows.from_csr(problem["csr"], torch.device("cpu"))
    ids = rows.row_ids()
    np.testing.assert_array_equal(ids.numpy(), np.repeat(np.arange(N_ROWS), problem["csr"].counts()))
    doubled = rows.with_values(rows.values * 2)
    assert doubled.indices is rows.indices and torch.equal(doubled.values, rows.values * 2)
