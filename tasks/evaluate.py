"""Prefect tasks: test-set metrics (accuracy and beyond) of a trained model to MLflow and Prefect table artifacts,
and a look at the lists (sampled users' top-10, the gate metric across runs) for a person to read.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from convmf_core.data import IdMap, Split
from convmf_core.metrics import BEYOND_ACCURACY, center_embeddings, evaluate
from convmf_core.persistence import ModelBundle, load_model
from convmf_core.text import Documents
from tasks.ingest import IngestedData
from tasks.tokenize import TokenizedData
from tasks.train import TrainedModel, new_figure, read_split, save_figure
from tasks.tracking import RunRef, mlflow_key, with_retries

LIST_USERS = 3  # users shown in the "top-lists" artifact
LIST_SEED = 0
HISTORY_RUNS = 200  # most recent training runs read for the gate-metric history


def _aligned_documents(documents: Documents, document_ids: list, item_map: IdMap) -> Documents:
    """``documents`` (one per ``document_ids``) in the order of ``item_map``; items without one get no words."""
    raw = item_map.raw_ids
    if len(document_ids) == len(raw) and np.array_equal(np.asarray(document_ids, dtype=object),
                                                        np.asarray(raw, dtype=object)):
        return documents
    position = pd.Index(np.asarray(document_ids, dtype=object)).get_indexer(np.asarray(raw, dtype=object))
    off, ids = documents.offsets, documents.ids
    return Documents.from_lists([ids[off[p]:off[p + 1]] if p >= 0 else [] for p in position])


def item_embeddings(bundle: ModelBundle, tokenized: TokenizedData | None) -> np.ndarray | None:
    """The text encoder's own embedding theta_j of every item of ``bundle`` (the CNN's cnn(W, X_j), or the linear
    map of the document vector; its factor columns only, not the item-bias channel), centred on the mean over items
    with text (:func:`convmf_core.metrics.center_embeddings`; zeros for items without text), or ``None`` for a model
    without a text encoder or without the tokenized descriptions."""
    if tokenized is None or not hasattr(bundle.model, "embed_items"):
        return None
    document_ids, documents, _ = tokenized.load()
    theta = bundle.model.embed_items(_aligned_documents(documents, document_ids, bundle.item_map)).numpy()
    return center_embeddings(theta[:, :bundle.model.als.n_factors])


def _finite(value: float) -> float | None:
    return round(float(value), 5) if value is not None and math.isfinite(float(value)) else None


def _figure(value: float) -> str:
    return f"{value:.4f}" if value is not None and math.isfinite(value) else "-"


def beyond_accuracy_rows(metrics: dict[str, float], n: int) -> list[dict]:
    """One table row per beyond-accuracy metric: its value on all items and on the cold-item slice."""
    return [{"metric": f"{name}@{n}", "all items": _finite(metrics.get(f"{name}@{n}", float("nan"))),
             "cold items": _finite(metrics.get(f"cold_{name}@{n}", float("nan")))} for name in BEYOND_ACCURACY]


@task(name="evaluate")
def evaluate_model(trained: TrainedModel, n: int, run: RunRef, tokenized: TokenizedData | None = None
                   ) -> dict[str, float]:
    """RMSE, MAE, Precision/Recall/NDCG/MAP/HitRate@n and the beyond-accuracy metrics (coverage, novelty,
    intra-list diversity in the text encoder's embedding - needs ``tokenized`` -, popularity bias), and the same on
    cold items (when the split has any), on the test ratings with each user's training items excluded from the
    lists. Logged to MLflow (``test_`` prefix) and to the ``evaluation`` and ``beyond-accuracy`` table artifacts."""
    bundle = load_model(trained.bundle_dir)
    model = bundle.model
    split, cold = read_split(trained.split_dir, model.n_users, model.n_items)
    metrics = evaluate(model, split.train, split.test, n=n, cold_items=cold if len(cold) else None,
                       embeddings=item_embeddings(bundle, tokenized))
    metrics["validation_rmse"] = trained.best_validation_rmse
    # validation_rmse is the per-iteration history train_convmf logged (steps 1..k; the best is best_validation_rmse):
    # logging it again here would add a step-0 point to that curve.
    run.log_metrics({f"test_{k}": v for k, v in metrics.items() if k != "validation_rmse"})
    rows = [{"metric": k, "value": _finite(v)} for k, v in metrics.items()]
    create_table_artifact(rows, key="evaluation", description=f"Test metrics (top-{n}, training items excluded)")
    create_table_artifact(beyond_accuracy_rows(metrics, n), key="beyond-accuracy",
                          description=f"Beyond accuracy of the top-{n} lists of the test users: share of the "
                                      "catalogue recommended, novelty (mean -log2 popularity share, bits), intra-list "
                                      "diversity (mean pairwise cosine distance of the centred text encoder "
                                      "embeddings), share from the 10% most-rated items; cold items: lists ranked "
                                      "among cold items only")
    get_run_logger().info("test RMSE %.4f, MAE %.4f, recall@%d %.4f, coverage %.3f, novelty %.2f bits, diversity "
                          "%.3f, popularity bias %.3f", metrics["rmse"], metrics["mae"], n,
                          metrics.get(f"recall@{n}", float("nan")), metrics[f"coverage@{n}"],
                          metrics[f"novelty@{n}"], metrics[f"diversity@{n}"], metrics[f"popularity_bias@{n}"])
    return metrics


# ------------------------------------------------------------------------------------------------------------------
# A look at the lists
# ------------------------------------------------------------------------------------------------------------------


def _titles(frame: pd.DataFrame, item_ids: np.ndarray) -> list[str]:
    """A readable name per item of the catalogue ``frame`` (indexed by item id): its title, else the start of its
    description, else its id."""
    names = []
    for raw in item_ids:
        row = frame.loc[raw] if raw in frame.index else None
        title = None if row is None else row.get("title")
        if title is None or (isinstance(title, float) and math.isnan(title)) or not str(title).strip():
            text = "" if row is None else str(row.get("text") or "")
            title = (text[:57] + "...") if len(text) > 60 else (text or f"item {raw}")
        names.append(str(title).replace("|", "/").replace("\n", " "))
    return names


def lists_markdown(bundle: ModelBundle, split: Split, items_path: Path, n_users: int = LIST_USERS, n: int = 10,
                   seed: int = LIST_SEED) -> str:
    """The top-``n`` (what a user would be served: every rated item excluded) of ``n_users`` users sampled among
    those with training ratings, with titles and scores, beside the five items each rated highest in training."""
    model, train = bundle.model, split.train
    candidates = np.unique(train.users)
    rng = np.random.default_rng(seed)
    users = np.sort(rng.choice(candidates, size=min(n_users, len(candidates)), replace=False))
    top = model.recommend(users, n, exclude=split.train.concat(split.validation).concat(split.test))
    catalogue = pd.read_parquet(items_path).drop_duplicates("item_id").set_index("item_id")
    lines = [f"### Top-{n} of {len(users)} sampled users", "",
             "Scores are the model's predicted ratings before clipping (they order the list). Items the user has "
             "rated (training, validation and test) are left out, as in the served lists.", ""]
    for row, user in enumerate(users):
        mine = np.flatnonzero(train.users == user)
        best = mine[np.argsort(-train.values[mine], kind="stable")][:5]
        liked = _titles(catalogue, bundle.item_map.to_raw(train.items[best]))
        lines += [f"#### User `{bundle.user_map.to_raw([user])[0]}` ({len(mine)} training ratings)", "",
                  "Rated highest: " + "; ".join(f"{t} ({train.values[i]:g})" for t, i in zip(liked, best)), "",
                  "| rank | item | title | score |", "|---|---|---|---|"]
        filled = top.items[row][top.items[row] >= 0]
        titles = _titles(catalogue, bundle.item_map.to_raw(filled))
        lines += [f"| {rank} | `{raw}` | {title} | {score:.3f} |" for rank, (raw, title, score)
                  in enumerate(zip(bundle.item_map.to_raw(filled), titles, top.scores[row]), start=1)]
        lines.append("")
    return "\n".join(lines)


def gate_history(run: RunRef, model_name: str, gate_metric: str) -> pd.DataFrame:
    """The gate figures of this model's training runs in ``run``'s experiment, oldest first: ``time``, ``run_id``,
    ``candidate`` and ``champion`` (both on that run's validation split), ``promoted``. Failed runs and runs that
    measured another gate metric are left out."""
    client = run.client()
    experiment_id = with_retries(lambda: client.get_run(run.run_id).info.experiment_id, "get run")
    found = with_retries(lambda: client.search_runs(
        [experiment_id], filter_string=f"tags.model_name = '{model_name}' and attributes.status != 'FAILED'",
        order_by=["attributes.start_time DESC"], max_results=HISTORY_RUNS), "search runs")
    key = mlflow_key(gate_metric)
    rows = [{"time": datetime.fromtimestamp(r.info.start_time / 1000, tz=timezone.utc), "run_id": r.info.run_id,
             "candidate": r.data.metrics[f"gate_candidate_{key}"],
             "champion": r.data.metrics.get(f"gate_champion_{key}", float("nan")),
             "promoted": r.data.tags.get("promotion") == "champion"}
            for r in found if f"gate_candidate_{key}" in r.data.metrics]
    frame = pd.DataFrame(rows, columns=["time", "run_id", "candidate", "champion", "promoted"])
    return frame.sort_values("time", kind="stable").reset_index(drop=True)


def gate_history_png(history: pd.DataFrame, gate_metric: str, path: Path) -> Path:
    """Plot the gate metric run by run: each run's challenger (filled when it became champion) and the champion it
    was compared with, on that run's validation split."""
    fig = new_figure()
    ax = fig.subplots()
    x = np.arange(1, len(history) + 1)
    ax.plot(x, history["candidate"], color="tab:blue", label="the run's model", zorder=1)
    promoted = history["promoted"].to_numpy(bool)
    ax.scatter(x[promoted], history["candidate"][promoted], color="tab:blue", label="became champion", zorder=2)
    ax.scatter(x[~promoted], history["candidate"][~promoted], facecolors="white", edgecolors="tab:blue",
               label="kept as challenger", zorder=2)
    ax.plot(x, history["champion"], color="tab:gray", linestyle="--", marker="x", label="champion, same split")
    labels = [t.strftime("%m-%d %H:%M") for t in history["time"]]
    ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
    ax.set(title=f"validation {gate_metric} per training run", xlabel="run start (UTC)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


@task(name="look-at-lists")
def look_at_lists(trained: TrainedModel, ingested: IngestedData, run: RunRef, model_name: str,
                  gate_metric: str, n: int = 10) -> str:
    """For a person to see the model without writing code: the ``top-lists`` markdown artifact (sampled users'
    top-``n`` with titles and scores, and the items they rated highest; also ``reports/top_lists.md`` in MLflow),
    and ``plots/gate_history.png`` in MLflow, the gate metric across this model's training runs (the learning
    curve is ``plots/learning_curve.png``). Returns the markdown."""
    bundle = load_model(trained.bundle_dir)
    split, _ = read_split(trained.split_dir, bundle.model.n_users, bundle.model.n_items)
    markdown = lists_markdown(bundle, split, ingested.items_path, n=n)
    history = gate_history(run, model_name, gate_metric)
    out = trained.bundle_dir.parent
    if len(history):
        run.log_artifact(gate_history_png(history, gate_metric, out / "gate_history.png"), "plots")
        recent = history.tail(10)
        markdown += "\n".join(["", f"### Validation {gate_metric}, last {len(recent)} training runs of `{model_name}`",
                               "", "| run start (UTC) | run | challenger | champion, same split | promoted |",
                               "|---|---|---|---|---|"]
                              + [f"| {r.time:%Y-%m-%d %H:%M} | `{r.run_id[:8]}` | {r.candidate:.4f} | "
                                 f"{_figure(r.champion)} | {'yes' if r.promoted else 'no'} |"
                                 for r in recent.itertuples()]
                              + ["", "Plots in the MLflow run: `plots/learning_curve.png`, `plots/gate_history.png`."])
    run.log_text(markdown, "reports/top_lists.md")
    create_markdown_artifact(markdown, key="top-lists", description="Sampled users' top lists; gate metric history")
    return markdown
