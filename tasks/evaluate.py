"""Prefect task: test-set metrics of a trained model to MLflow and to a Prefect table artifact."""

from __future__ import annotations

import math

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact

from convmf_core.metrics import evaluate
from convmf_core.persistence import load_model
from tasks.train import TrainedModel, read_split
from tasks.tracking import RunRef


@task(name="evaluate")
def evaluate_model(trained: TrainedModel, n: int, run: RunRef) -> dict[str, float]:
    """RMSE, MAE, Precision/Recall/NDCG/MAP/HitRate@n, coverage, and the same on cold items (when the split has
    any), on the test ratings with each user's training items excluded from the lists."""
    bundle = load_model(trained.bundle_dir)
    model = bundle.model
    split, cold = read_split(trained.split_dir, model.n_users, model.n_items)
    metrics = evaluate(model, split.train, split.test, n=n, cold_items=cold if len(cold) else None)
    metrics["validation_rmse"] = trained.best_validation_rmse
    # validation_rmse is the per-iteration history train_convmf logged (steps 1..k; the best is best_validation_rmse):
    # logging it again here would add a step-0 point to that curve.
    run.log_metrics({f"test_{k}": v for k, v in metrics.items() if k != "validation_rmse"})
    rows = [{"metric": k, "value": round(v, 5) if math.isfinite(v) else None} for k, v in metrics.items()]
    create_table_artifact(rows, key="evaluation", description=f"Test metrics (top-{n}, training items excluded)")
    get_run_logger().info("test RMSE %.4f, MAE %.4f, recall@%d %.4f", metrics["rmse"], metrics["mae"], n,
                          metrics.get(f"recall@{n}", float("nan")))
    return metrics
