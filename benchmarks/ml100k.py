"""ML-100K benchmark: PMF, SGD MF and ConvMF on (a) the paper's 80/10/10 split of the rated items with text and
(b) GroupLens's u1.base/u1.test split (validation carved from u1.base) and (c) a cold-start split (10% of the
items with text have no training rating; figures on those items only). Not run by CI.

Every model runs in a forked child process so that its peak memory (ru_maxrss, which includes the data it
inherited) is its own. Hyperparameters are chosen on validation RMSE only (PMF by the grid below, ConvMF's defaults
by ``--tune-convmf`` on split (a)); test figures are reported at the best validation iteration.

    python benchmarks/ml100k.py [--data ../shared/data/ml-100k] [--threads 2] [--tune-convmf] [--ablation]
                                [--convmf-only]
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ml100k_data import DEFAULT_DIR, BenchmarkData, cold_split, paper_split, u1_split  # noqa: E402

from convmf_core.config import ALSConfig, ConvMFConfig, PMFConfig, SGDMFConfig  # noqa: E402
from convmf_core.metrics import evaluate  # noqa: E402
from convmf_core.models.als_mf import PMF  # noqa: E402
from convmf_core.models.convmf import ConvMF  # noqa: E402
from convmf_core.models.sgd_mf import SGDMF  # noqa: E402

PMF_GRID = {"n_factors": (5, 10, 20), "lambda_u": (5.0, 10.0, 20.0), "lambda_v": (5.0, 10.0, 20.0, 40.0)}
CONVMF_GRID = {"lambda_u": (5.0, 10.0, 20.0), "lambda_v": (10.0, 30.0, 100.0)}


def convmf_config(**als: Any) -> ConvMFConfig:
    """The library's ConvMF defaults with these ALS settings overridden."""
    return ConvMFConfig(als=ALSConfig(**als))


def ablations() -> dict[str, ConvMFConfig]:
    """ConvMF's options beyond the paper, each switched against the library default."""
    base = ConvMFConfig()
    return {
        "no biases / global mean (authors' raw ratings)": replace(base, als=replace(base.als, use_bias=False)),
        "item weighting sqrt(n_j) on (authors' code)": replace(base, als=replace(base.als, item_weighting=True)),
        "15 ALS-only warm-up iterations": replace(base, warmup_iterations=15),
        "5 CNN epochs per iteration (authors' code)": replace(base, cnn=replace(base.cnn, epochs_per_iteration=5)),
        "Adam, 1 CNN epoch per iteration": replace(base, cnn=replace(base.cnn, optimizer="adam", epochs_per_iteration=1)),
        "constant CNN step, keep any iteration (the paper: no decay, min_iterations 1)":
            replace(base, cnn=replace(base.cnn, learning_rate_decay=1.0), min_iterations=1),
        "no decay of the CNN step (min_iterations 10 kept)":
            replace(base, cnn=replace(base.cnn, learning_rate_decay=1.0)),
        "decay kept, keep any iteration (min_iterations 1)": replace(base, min_iterations=1),
    }


def _fit_and_score(make: Callable[[], Any], data: BenchmarkData, text: bool, queue: Any) -> None:
    torch.manual_seed(0)
    split = data.split
    model = make()
    t0 = time.perf_counter()
    if text:
        model.fit(split.train, split.validation, documents=data.documents, vocabulary_size=len(data.vocabulary))
    else:
        model.fit(split.train, split.validation)
    fit = time.perf_counter() - t0
    metrics = evaluate(model, split.train, split.test, n=50, cold_items=data.cold_items)
    if data.cold_items is not None:  # report the cold-item slice: that is what this setting measures
        metrics = {k: metrics[f"cold_{k}"] for k in ("rmse", "mae", "recall@50")}
    hist = model.history_
    kept = model.best_validation_rmse_
    cnn = [h.extra["cnn_seconds_per_epoch"] for h in hist if "cnn_seconds_per_epoch" in h.extra]
    als = [h.extra["als_seconds"] for h in hist if "als_seconds" in h.extra]
    queue.put({"rmse": metrics["rmse"], "mae": metrics["mae"], "recall@50": metrics["recall@50"], "fit_s": fit,
               "val_rmse": float("nan") if kept is None else kept, "iterations": len(hist),
               "als_s": float(np.mean(als)) if als else float("nan"),
               "cnn_epoch_s": float(np.median(cnn)) if cnn else float("nan"),
               "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def run_isolated(make: Callable[[], Any], data: BenchmarkData, text: bool = False) -> dict[str, float]:
    """Fit and evaluate in a forked child; returns its figures."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_fit_and_score, args=(make, data, text, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def tune(grid: dict[str, tuple], make: Callable[..., Any], data: BenchmarkData, text: bool) -> tuple[dict, dict]:
    """The grid point with the lowest validation RMSE, and its figures."""
    best: tuple[dict, dict] | None = None
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        figures = run_isolated(lambda: make(**point), data, text)
        print(f"  {point}: validation RMSE {figures['val_rmse']:.4f}", file=sys.stderr, flush=True)
        if best is None or figures["val_rmse"] < best[1]["val_rmse"]:
            best = (point, figures)
    assert best is not None
    return best


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tune-convmf", action="store_true", help="also search ConvMF's lambdas on validation")
    parser.add_argument("--ablation", action="store_true", help="also run ConvMF's options one at a time on (a)")
    parser.add_argument("--convmf-only", action="store_true", help="skip the PMF grid and SGD MF (ConvMF rows only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for load in (paper_split, u1_split, cold_split):
        data = load(args.data)
        print(f"{data.name}: {len(data.split.train)}/{len(data.split.validation)}/{len(data.split.test)} ratings, "
              f"vocabulary {len(data.vocabulary)}", file=sys.stderr, flush=True)
        if not args.convmf_only:
            point, pmf = tune(PMF_GRID, lambda **p: PMF(PMFConfig(als=ALSConfig(**p))), data, False)
            rows.append((data.name, f"PMF (ALS + biases, {point})", pmf))
            sgd = run_isolated(lambda: SGDMF(SGDMFConfig()), data)
            rows.append((data.name, "SGD MF (seed article: k=20, lr 1e-2, 10 epochs)", sgd))
        if args.tune_convmf:
            point, conv = tune(CONVMF_GRID, lambda **p: ConvMF(convmf_config(**p)), data, True)
            label = f"ConvMF (tuned {point})"
        else:
            conv = run_isolated(lambda: ConvMF(ConvMFConfig()), data, True)
            label = "ConvMF (library defaults)"
        rows.append((data.name, label, conv))
        if args.ablation and load is paper_split:
            for name, cfg in ablations().items():
                rows.append((data.name, f"ConvMF, {name}", run_isolated(lambda: ConvMF(cfg), data, True)))
    print("| split | model | test RMSE | MAE | Recall@50 | val RMSE | fit s | iters | s/ALS iter | s/CNN epoch "
          "| peak MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for split, model, f in rows:
        print(f"| {split} | {model} | {f['rmse']:.4f} | {f['mae']:.4f} | {f['recall@50']:.4f} | {f['val_rmse']:.4f} "
              f"| {f['fit_s']:.1f} | {f['iterations']} | {f['als_s']:.3f} | {f['cnn_epoch_s']:.2f} "
              f"| {f['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
