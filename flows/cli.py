"""``convmf``: the one command for what a person does by hand (run the pipeline locally, score, roll back).

Every subcommand has ``--help``. Flow parameters can be given whole as JSON (``--params``), exactly as the Prefect
UI or ``prefect deployment run --params`` would pass them, or through the common flags.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

QUIET_DEFAULTS = {
    # Offline machines: Prefect's telemetry otherwise prints tracebacks (and can lock its SQLite database).
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
}


def _storage(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.home:
        out["home"] = args.home
    if args.tracking_uri:
        out["tracking_uri"] = args.tracking_uri
    return out


def _training_params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = json.loads(args.params) if args.params else {}
    if args.ratings or args.items:
        params.setdefault("data", {}).update({"source": "files", "ratings_path": args.ratings,
                                              "items_path": args.items, "format": args.format})
    if args.model_name:
        params["model_name"] = args.model_name
    params.setdefault("storage", {}).update(_storage(args))
    return params


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", help="working directory (default $CONVMF_HOME or ./convmf-data)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<home>/mlflow.db)")
    p.add_argument("--model-name", help="registered model name (default convmf)")


def _add_training(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ratings", help="ratings file (omit both files to use the built-in catalogue)")
    p.add_argument("--items", help="item descriptions file")
    p.add_argument("--format", default="auto", help="input format: auto, csv, tsv, jsonl, parquet, movielens-100k, "
                                                    "movielens-1m, movielens-latest")
    p.add_argument("--params", help="TrainingParams as JSON (flags above override it)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and ``--help``)."""
    parser = argparse.ArgumentParser(prog="convmf", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the nightly flow end to end on the built-in catalogue",
                       description="Train, evaluate, register, promote and score on the built-in generated "
                                   "catalogue: Prefect in ephemeral mode, MLflow on a local SQLite file.")
    _add_common(p)
    p = sub.add_parser("nightly", help="run the nightly flow (train, then score)")
    _add_common(p)
    _add_training(p)
    p.add_argument("--n", type=int, default=None, help="items per user in the scores (default 100)")
    p = sub.add_parser("train", help="run the training flow (ingest -> ... -> promote)")
    _add_common(p)
    _add_training(p)
    p = sub.add_parser("score", help="run the scoring flow with the registry's champion (or another alias)")
    _add_common(p)
    p.add_argument("--alias", default="champion", help="registry alias to score with")
    p.add_argument("--n", type=int, default=100, help="items per user")
    p.add_argument("--run-date", help="output partition date, YYYY-MM-DD (default today)")
    p = sub.add_parser("rollback", help="move the champion alias back to the previous champion version")
    _add_common(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``convmf`` console script."""
    args = build_parser().parse_args(argv)
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # Imported here, not at module top: the environment above must be in place before Prefect reads its settings.
    from flows.params import NightlyParams, ScoringParams, StorageParams, TrainingParams

    if args.command in ("demo", "nightly"):
        from flows.nightly import nightly_flow

        training = TrainingParams.model_validate(_training_params(args) if args.command == "nightly"
                                                 else {"storage": _storage(args), **({"model_name": args.model_name}
                                                                                     if args.model_name else {})})
        scoring = {"n": args.n} if getattr(args, "n", None) else {}
        result = nightly_flow(NightlyParams(training=training, scoring=ScoringParams.model_validate(scoring)))
        t = result.training
        print(f"\nmodel {t.version.name} v{t.version.version}: validation RMSE {t.trained.best_validation_rmse:.4f}, "
              f"test RMSE {t.metrics['rmse']:.4f}; {t.decision.reason}")
        print(f"scores: {result.scores}")
        print(f"MLflow: {StorageParams.model_validate(training.storage.model_dump()).resolved_tracking_uri()}")
    elif args.command == "train":
        from flows.training import training_flow

        result = training_flow(TrainingParams.model_validate(_training_params(args)))
        print(f"model {result.version.name} v{result.version.version}: {result.decision.reason}")
    elif args.command == "score":
        from flows.scoring import scoring_flow

        params = {"alias": args.alias, "n": args.n, "storage": _storage(args)}
        if args.model_name:
            params["model_name"] = args.model_name
        if args.run_date:
            params["run_date"] = args.run_date
        print(scoring_flow(ScoringParams.model_validate(params)))
    elif args.command == "rollback":
        from tasks.register import use_tracking_uri
        from tasks.registry import rollback_champion

        storage = StorageParams.model_validate(_storage(args))
        use_tracking_uri(storage.resolved_tracking_uri())
        version = rollback_champion(args.model_name or "convmf")
        print(f"champion is now version {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
