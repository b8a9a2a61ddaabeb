"""ML-100K benchmark: does the text pay? PMF tuned on validation against ConvMF with each text encoder, each with and
without posterior averaging, on three settings, several seeds. Not run by CI.

Settings: (a) the paper's random 80/10/10 split of the rated items with text; (u1) GroupLens's u1.base/u1.test with
validation carved from u1.base; (cold) as (a) but 10% of the items lose all their training ratings (scored from text
alone; "cold" columns are on those items' test ratings, ranked among the cold items only). The seed changes the
split (for u1: the validation carve) and every model's initialisation.

Rows (for each setting and seed):
* PMF (ALS + biases), (k, lambda_U, lambda_V) searched on validation over ``PMF_GRID`` (on seed 0 of each setting;
  the chosen point is reused for the other seeds), and the same PMF with posterior averaging (its own defaults);
* ConvMF (the paper's CNN: random-initialised embedding, no bias prior), ConvMF+ (CNN from GloVe + the bias prior),
  and the linear encoder (GloVe document vectors + ridge map + the bias prior): each fitted once with the library's
  posterior averaging; the "ALS" row is the same fit's kept ALS point (before sampling), with the ALS time only.

Columns: test RMSE, MAE, Recall@50 (all test users), cold RMSE and cold Recall@20 (cold setting; "random" is the
mean Recall@20 of random orders of the cold items), the text prior's held-out R^2 (factors / bias), fit seconds,
peak MB (ru_maxrss of a forked child per fit, which includes the data it inherited).

    python benchmarks/ml100k.py [--data ../shared/data/ml-100k] [--threads 2] [--seeds 0 1 2]
                                [--settings a u1 cold] [--rows pmf convmf convmf+ linear]
"""

from __future__ import annotations

import argparse
import itertools
import math
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

from convmf_core.config import ALSConfig, ConvMFConfig, GibbsConfig, PMFConfig  # noqa: E402
from convmf_core.metrics import evaluate  # noqa: E402
from convmf_core.models.als_mf import PMF  # noqa: E402
from convmf_core.models.base import Recommender, ScoringFactors  # noqa: E402
from convmf_core.models.convmf import ConvMF  # noqa: E402

PMF_GRID = {"n_factors": (5, 10, 20), "lambda_u": (5.0, 10.0, 20.0), "lambda_v": (5.0, 10.0, 20.0, 40.0)}
SETTINGS: dict[str, Callable[..., BenchmarkData]] = {"a": paper_split, "u1": u1_split, "cold": cold_split}
DEFAULT = ConvMFConfig()


def text_rows() -> dict[str, ConvMFConfig]:
    """The ConvMF variants, each with the library's defaults otherwise."""
    return {
        "ConvMF (paper CNN)": replace(DEFAULT, encoder="cnn", word_vectors=None, bias_prior=False),
        "ConvMF+ (GloVe CNN + bias prior)": replace(DEFAULT, encoder="cnn"),
        "linear (GloVe + ridge + bias prior)": replace(DEFAULT, encoder="linear"),
    }


class RandomOrder(Recommender):
    """Scores from random factors: a random ranking (the floor for cold recall)."""

    def __init__(self, n_users: int, n_items: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self._f = ScoringFactors(torch.randn(n_users, 16, generator=g), torch.randn(n_items, 16, generator=g))

    def fit(self, *args: Any, **kwargs: Any) -> "RandomOrder":
        return self

    def scoring_factors(self) -> ScoringFactors:
        return self._f


def _figures(model: Recommender, data: BenchmarkData) -> dict[str, float]:
    split = data.split
    out = evaluate(model, split.train, split.test, n=50)
    figures = {"rmse": out["rmse"], "mae": out["mae"], "recall@50": out["recall@50"]}
    if data.cold_items is not None:
        cold = evaluate(model, split.train, split.test, n=20, cold_items=data.cold_items)
        figures.update(cold_rmse=cold["cold_rmse"], cold_recall=cold["cold_recall@20"])
    return figures


def _fit_child(make: Callable[[], Any], data: BenchmarkData, text: bool, queue: Any, tuning: bool = False) -> None:
    torch.manual_seed(0)
    split = data.split
    model = make()
    t0 = time.perf_counter()
    if text:
        model.fit(split.train, split.validation, documents=data.documents, vocabulary=data.vocabulary)
    else:
        model.fit(split.train, split.validation)
    fit = time.perf_counter() - t0
    if tuning:  # only the validation figure is needed
        queue.put({"als": {"val_rmse": model.best_validation_rmse_}})
        return
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = getattr(model, "prior_report_", None) or {}
    common = {"peak_mb": peak, "r2": report.get("prior_heldout_r2", math.nan),
              "r2_bias": report.get("prior_heldout_r2_bias", math.nan), "fallback": getattr(model, "fallback_", None)}
    rows = {}
    samples = getattr(model, "samples_", None)
    sampling_s = sum(r.seconds for r in getattr(model, "sampling_history_", []))
    if samples is not None:
        rows["averaged"] = {**_figures(model, data), **common, "fit_s": fit, "val_rmse": model.best_validation_rmse_,
                            "s_per_sweep": model.sampling_seconds_per_sweep_}
        model.samples_, model.validation_rmse_ = None, None  # the same fit's kept ALS point
    kept = model.best_validation_rmse_
    rows["als"] = {**_figures(model, data), **common, "fit_s": fit - sampling_s,
                   "val_rmse": math.nan if kept is None else kept, "s_per_sweep": math.nan}
    queue.put(rows)


def run_isolated(make: Callable[[], Any], data: BenchmarkData, text: bool,
                 tuning: bool = False) -> dict[str, dict[str, Any]]:
    """Fit and evaluate in a forked child; returns its rows ("als" and, when sampled, "averaged")."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_fit_child, args=(make, data, text, queue, tuning))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def tune_pmf(data: BenchmarkData) -> dict[str, Any]:
    """The PMF_GRID point with the lowest validation RMSE (plain ALS, no averaging)."""
    best: tuple[float, dict[str, Any]] | None = None
    for values in itertools.product(*PMF_GRID.values()):
        point = dict(zip(PMF_GRID, values))
        als = ALSConfig(**point, gibbs=GibbsConfig(samples=0))
        val = run_isolated(lambda: PMF(PMFConfig(als=als)), data, False, tuning=True)["als"]["val_rmse"]
        print(f"  PMF {point}: validation RMSE {val:.4f}", file=sys.stderr, flush=True)
        if best is None or val < best[0]:
            best = (val, point)
    assert best is not None
    return best[1]


def _random_child(data: BenchmarkData, draws: int, queue: Any) -> None:
    split = data.split
    queue.put(float(np.mean([evaluate(RandomOrder(split.train.n_users, split.train.n_items, s), split.train,
                                      split.test, n=20, cold_items=data.cold_items)["cold_recall@20"]
                             for s in range(draws)])))


def random_cold_recall(data: BenchmarkData, draws: int = 10) -> float:
    """Mean cold Recall@20 of random orders of the cold items (in a forked child: torch must not start its thread
    pool in this process, or the later forked fits deadlock)."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_random_child, args=(data, draws, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _fmt(values: list[float], digits: int = 4) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "–"
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def main() -> None:
    """Run the benchmark and print one table per setting."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--rows", nargs="+", default=["pmf", "convmf", "convmf+", "linear"],
                        choices=["pmf", "convmf", "convmf+", "linear"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keys = dict(zip(["convmf", "convmf+", "linear"], text_rows()))
    for setting in args.settings:
        results: dict[str, list[dict[str, Any]]] = {}
        pmf_point: dict[str, Any] | None = None
        randoms = []
        for seed in args.seeds:
            data = SETTINGS[setting](args.data, seed=seed)
            print(f"{data.name}, seed {seed}: {len(data.split.train)}/{len(data.split.validation)}/"
                  f"{len(data.split.test)} ratings", file=sys.stderr, flush=True)
            if data.cold_items is not None:
                randoms.append(random_cold_recall(data))
            if "pmf" in args.rows:
                if pmf_point is None:
                    pmf_point = tune_pmf(data)
                als = ALSConfig(**pmf_point, gibbs=replace(DEFAULT.als.gibbs, samples=max(DEFAULT.als.gibbs.samples,
                                                                                          80)))
                rows = run_isolated(lambda: PMF(PMFConfig(als=als, seed=seed)), data, False)
                results.setdefault(f"PMF tuned {pmf_point}", []).append(rows["als"])
                results.setdefault("PMF tuned, + averaging", []).append(rows["averaged"])
            for key, (label, cfg) in zip(keys, text_rows().items()):
                if key not in args.rows:
                    continue
                rows = run_isolated(lambda: ConvMF(replace(cfg, seed=seed)), data, True)
                results.setdefault(f"{label}, ALS", []).append(rows["als"])
                if "averaged" in rows:
                    results.setdefault(f"{label}, + averaging", []).append(rows["averaged"])
                print(f"  {label}: {rows.get('averaged', rows['als'])['rmse']:.4f}", file=sys.stderr, flush=True)
        print(f"\n### {data.name} (seeds {', '.join(map(str, args.seeds))}; mean ± half-range)\n")
        cold = data.cold_items is not None
        print("| model | test RMSE | MAE | Recall@50 | cold RMSE | cold R@20 | R² prior (v / c) | val RMSE | fit s "
              "| s/sweep | peak MB |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, runs in results.items():
            col = lambda key: [r.get(key, math.nan) for r in runs]  # noqa: E731
            r2 = f"{_fmt(col('r2'), 2)} / {_fmt(col('r2_bias'), 2)}" if not math.isnan(runs[0]["r2"]) else "–"
            print(f"| {name} | {_fmt(col('rmse'))} | {_fmt(col('mae'))} | {_fmt(col('recall@50'))} "
                  f"| {_fmt(col('cold_rmse')) if cold else '–'} | {_fmt(col('cold_recall')) if cold else '–'} | {r2} "
                  f"| {_fmt(col('val_rmse'))} | {_fmt(col('fit_s'), 1)} | {_fmt(col('s_per_sweep'), 3)} "
                  f"| {_fmt(col('peak_mb'), 0)} |")
            fallbacks = [r["fallback"] for r in runs if r.get("fallback")]
            if fallbacks:
                print(f"|  ↳ fell back on {len(fallbacks)} seed(s): {fallbacks[0]} |||||||||||")
        if randoms:
            print(f"\nRandom order of the cold items: cold Recall@20 {_fmt(randoms)}.")


if __name__ == "__main__":
    main()
