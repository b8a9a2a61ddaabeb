"""``convmf``: the one command for what a person does by hand (run the pipeline locally, score, roll back).

Every subcommand has ``--help``. Flow parameters can be given whole as JSON (``--params``), exactly as the Prefect
UI or ``prefect deployment run --params`` would pass them, or through the common flags; ``train`` and ``nightly``
also take every model hyperparameter (:class:`flows.params.ModelParams`) as a flag of its own (``--encoder cnn``,
``--posterior-samples 20``, ``--no-bias-prior``), generated from the parameter model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from typing import Any, Callable, Sequence

QUIET_DEFAULTS = {
    # Offline machines: Prefect's telemetry otherwise prints tracebacks (and can lock its SQLite database).
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    # The ephemeral Prefect server needs ~10 s on an idle 2-core machine, much more under load (default 20 s).
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
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
    model = _model_overrides(args)
    if model:
        params.setdefault("model", {}).update(model)
    params.setdefault("storage", {}).update(_storage(args))
    return params


MODEL_DEST = "model."  # argparse dest prefix of the flags generated from ModelParams
NONE_WORDS = ("none", "null")  # what an optional model flag takes for null (e.g. --word-vectors none)


def _model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The model hyperparameters given as flags (only those given), by ModelParams field name."""
    return {key[len(MODEL_DEST):]: value for key, value in vars(args).items() if key.startswith(MODEL_DEST)}


def _optional(convert: Any) -> Any:
    """An argparse ``type`` that reads ``none``/``null`` as None and anything else with ``convert``."""
    def parse(text: str) -> Any:
        return None if text.strip().lower() in NONE_WORDS else convert(text)
    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its error message
    return parse


class _Parser(argparse.ArgumentParser):
    """An argument parser whose ``deferred`` options are added on first use (parsing or help): the model flags import
    the parameter models (and torch with them), which ``convmf stack ...`` has no need to wait for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deferred: list[Callable[[argparse.ArgumentParser], None]] = []

    def _complete(self) -> None:
        while self.deferred:
            self.deferred.pop(0)(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._complete()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._complete()
        return super().format_usage()

    def format_help(self) -> str:
        self._complete()
        return super().format_help()


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`flows.params.ModelParams` field (``n_factors`` -> ``--n-factors``), its help the field's
    description and default; values are validated by the parameter model, as JSON ones are."""
    from flows.params import ModelParams  # pydantic and the library's config; no Prefect

    group = p.add_argument_group("model", "ConvMF hyperparameters (override the 'model' of --params; defaults: the "
                                          "library's)")
    for name, field in ModelParams.model_fields.items():
        flag, annotation = "--" + name.replace("_", "-"), field.annotation
        options: dict[str, Any] = {"dest": MODEL_DEST + name, "default": argparse.SUPPRESS}
        description = (field.description or name.replace("_", " ")).replace("%", "%%")
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        nullable = len(members) < len(typing.get_args(annotation))
        if annotation is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is typing.Literal:
            options.update(choices=list(members), metavar="{" + ",".join(map(str, members)) + "}")
        else:
            base = members[0] if nullable and len(members) == 1 else annotation
            convert = base if base in (int, float, str) else str
            options["type"] = _optional(convert) if nullable else convert
            options["metavar"] = name.upper() if convert is str else convert.__name__.upper()
        default = "null" if field.default is None else field.default
        null_note = f"; {NONE_WORDS[0]!r} for null" if nullable else ""
        group.add_argument(flag, help=f"{description} (default: {default}{null_note})", **options)


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
    if isinstance(p, _Parser):
        p.deferred.append(_add_model_options)
    else:
        _add_model_options(p)


def _add_stack(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """``convmf stack up|down|status``: the local production-like stack (flows/stack.py)."""
    stack = sub.add_parser("stack", help="a local Prefect + MLflow stack with the deployments and workers",
                           description="Start, stop or inspect a local production-like stack: a Prefect server and an "
                                       "MLflow server on 127.0.0.1, the gpu/cpu process work pools, the deployments of "
                                       "prefect.yaml and one worker per pool. Files go to <home>/stack/.")
    actions = stack.add_subparsers(dest="stack_command", required=True)
    home_help = "working directory; the stack keeps its state, stores and logs in <home>/stack " \
                "(default $CONVMF_HOME or ./convmf-data)"
    p = actions.add_parser("up", help="start the servers, create the pools, deploy, start the workers",
                           description="Start the stack and return once every part is healthy (state in "
                                       "<home>/stack/state.json). Flags override the CONVMF_* environment variables "
                                       "named in brackets.")
    p.add_argument("--home", help=home_help)
    p.add_argument("--host", help="interface both servers bind [CONVMF_STACK_HOST] (default 127.0.0.1)")
    p.add_argument("--prefect-port", type=int, help="Prefect server port [CONVMF_PREFECT_PORT] (default 4200)")
    p.add_argument("--mlflow-port", type=int, help="MLflow server port [CONVMF_MLFLOW_PORT] (default 5000)")
    p.add_argument("--backend-store-uri", help="MLflow tracking/registry store [CONVMF_MLFLOW_BACKEND_STORE_URI] "
                                               "(default sqlite:///<home>/stack/mlflow.db)")
    p.add_argument("--artifacts-destination", help="where MLflow stores artifacts "
                                                   "[CONVMF_MLFLOW_ARTIFACTS_DESTINATION] (default "
                                                   "<home>/stack/mlartifacts)")
    p.add_argument("--prefect-home", help="PREFECT_HOME of the stack, holds the Prefect database "
                                          "[CONVMF_PREFECT_HOME] (default <home>/stack/prefect)")
    p.add_argument("--log-dir", help="log files of every process [CONVMF_STACK_LOG_DIR] (default <home>/stack/logs)")
    p.add_argument("--timezone", help="time zone of the nightly-retrain cron [CONVMF_TIMEZONE] (default UTC)")
    p.add_argument("--gpu-devices", help="CUDA_VISIBLE_DEVICES of gpu-pool runs [CONVMF_GPU_DEVICES] (default 0)")
    p.add_argument("--timeout", type=float, dest="startup_timeout_s",
                   help="seconds to wait for each part to start [CONVMF_STACK_STARTUP_TIMEOUT] (default 240)")
    p.add_argument("--auth", action="store_const", const=True, default=None,
                   help="require credentials on both servers on 127.0.0.1 too [CONVMF_STACK_AUTH] (always on when "
                        "--host is not a loopback address)")
    p.add_argument("--credentials-file", help="file with one line user:password, mode 0600, outside the project "
                                              "[CONVMF_STACK_CREDENTIALS_FILE] (else $CONVMF_STACK_USERNAME and "
                                              "$CONVMF_STACK_PASSWORD)")
    p = actions.add_parser("down", help="stop the workers, then the servers; leaves no process behind",
                           description="Stop the stack: workers first, then both servers (SIGTERM, wait, SIGTERM "
                                       "again, wait, SIGKILL, for each process group).")
    p.add_argument("--home", help=home_help)
    p.add_argument("--timeout", type=float, dest="stop_timeout_s",
                   help="seconds to wait after each SIGTERM (default 10, or as given to `up`)")
    p = actions.add_parser("status", help="which processes run, server health, online workers",
                           description="Report the stack's processes, the servers' health checks and the workers "
                                       "the Prefect server sees online.")
    p.add_argument("--home", help=home_help)
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _stack_home(args: argparse.Namespace) -> str:
    return args.home or os.environ.get("CONVMF_HOME") or os.path.join(os.getcwd(), "convmf-data")


def _run_stack(args: argparse.Namespace) -> int:
    """``convmf stack ...``: parse, call flows.stack, print."""
    from flows import stack

    if args.stack_command == "up":
        # The flags of `up` are named after StackConfig's fields, as ENV_VARS is (None = not given).
        options = {key: getattr(args, key, None) for key in stack.ENV_VARS if key != "home"}
        config = stack.StackConfig.from_env(home=_stack_home(args), **options)
        try:
            state = stack.up(config, echo=lambda message: print(message, flush=True))
        except stack.StackError as exc:
            print(f"stack up failed: {exc}", file=sys.stderr)
            return 1
        print(f"\nstack up in {state['timings_s']['total']:.0f} s (state: {config.state_path})")
        print(f"  Prefect UI:  {config.prefect_url}   (export PREFECT_API_URL={config.prefect_api_url})")
        print(f"  MLflow UI:   {config.mlflow_url}   (export MLFLOW_TRACKING_URI={config.mlflow_url})")
        print(f"  deployments: {', '.join(state['deployments'])}")
        print(f"  logs:        {state['log_dir']}")
        if state["auth"]["enabled"]:
            print(f"  auth:        both servers require user {state['auth']['username']!r} (clients: "
                  "PREFECT_API_AUTH_STRING, MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)")
        print("  stop with:   convmf stack down" + (f" --home {config.home}" if args.home else ""))
        return 0
    if args.stack_command == "down":
        report = stack.down(_stack_home(args), args.stop_timeout_s)
        if not report["stopped"]:
            print(report.get("note", "nothing to stop"))
            return 0
        for name, how in report["stopped"].items():
            print(f"  {name}: {how}")
        if report["left"]:
            print(f"still running: {report['left']}", file=sys.stderr)
            return 1
        print(f"stack down in {report['seconds']:.1f} s; no process left")
        return 0
    report = stack.status(_stack_home(args))
    if args.json:
        print(json.dumps(report, indent=1))
    elif "processes" not in report:
        print(report["note"])
    else:
        print(f"Prefect {report['prefect']['url']}: {'healthy' if report['prefect']['healthy'] else 'DOWN'}")
        print(f"MLflow  {report['mlflow']['url']}: {'healthy' if report['mlflow']['healthy'] else 'DOWN'}")
        auth = report.get("auth", {})
        print(f"auth: {'on, user ' + repr(auth.get('username')) if auth.get('enabled') else 'off (loopback only)'}"
              + (f"  ({report['note']})" if report.get("note") else ""))
        for pool, names in report["workers_online"].items():
            print(f"pool {pool}: {', '.join(names) or 'no worker online'}")
        for name, p in report["processes"].items():
            print(f"  {name} (pid {p['pid']}): {'running' if p['running'] else 'stopped'}  log {p['log']}")
    return 0 if report["running"] else 3


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and ``--help``)."""
    parser = _Parser(prog="convmf", description=__doc__.split("\n")[0])
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
    _add_stack(sub)
    return parser


def _outcome(decision) -> str:
    """One line on the promotion: where the alias went, and why."""
    return f"{'became champion' if decision.promoted else 'not promoted'} ({decision.reason})"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``convmf`` console script."""
    args = build_parser().parse_args(argv)
    for key, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if args.command == "stack":
        return _run_stack(args)
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
        if t.skipped:
            print(f"\nmodel {t.version.name} v{t.version.version}: {t.skipped}")
        else:
            print(f"\nmodel {t.version.name} v{t.version.version}: validation RMSE "
                  f"{t.trained.best_validation_rmse:.4f}, test RMSE {t.metrics['rmse']:.4f}; {_outcome(t.decision)}")
        print(f"scores: {result.scores}")
        print(f"MLflow: {StorageParams.model_validate(training.storage.model_dump()).resolved_tracking_uri()}")
    elif args.command == "train":
        from flows.training import training_flow

        result = training_flow(TrainingParams.model_validate(_training_params(args)))
        print(f"model {result.version.name} v{result.version.version}: "
              f"{result.skipped or _outcome(result.decision)}")
    elif args.command == "score":
        from flows.scoring import scoring_flow

        params = {"alias": args.alias, "n": args.n, "storage": _storage(args)}
        if args.model_name:
            params["model_name"] = args.model_name
        if args.run_date:
            params["run_date"] = args.run_date
        print(scoring_flow(ScoringParams.model_validate(params)))
    elif args.command == "rollback":
        from tasks.register import rollback_model

        storage = StorageParams.model_validate(_storage(args))
        move = rollback_model(args.model_name or "convmf", storage.resolved_tracking_uri())  # recorded as artifacts
        print(f"champion is now version {move.to_version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
