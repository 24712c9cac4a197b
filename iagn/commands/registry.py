"""`iagn register` (gate + MLflow Model Registry) and `iagn models` (the registered versions)."""

from __future__ import annotations

import argparse
import sys

from iagn.commands.common import add_params_argument, input_dir, input_file, output_dir

EXIT_GATE_FAILED = 1


def _check_models(args: argparse.Namespace) -> None:
    """Every checkpoint given is one of its kind and every evaluation folder holds a
    metrics.json, before anything is registered (a bad --teacher must not stop the command
    after the student is in the registry)."""
    from iagn.checkpoint import load_checkpoint
    from iagn.errors import IagnError

    for kind, model, evaluation in (
        ("student", args.student, args.student_eval),
        ("teacher", args.teacher, args.teacher_eval),
    ):
        if model is not None:
            load_checkpoint(model, kind=kind)
        if evaluation is not None and not (evaluation / "metrics.json").is_file():
            raise IagnError(
                f"--{kind}-eval {evaluation} holds no metrics.json; pass the --out folder of "
                f"`iagn evaluate --model <{kind} checkpoint>`"
            )


def cmd_register(args: argparse.Namespace) -> int:
    from iagn import runner
    from iagn.params import load_params

    params = load_params(args.params)
    _check_models(args)
    result = runner.register(
        student=args.student,
        student_eval=args.student_eval,
        params=params,
        teacher=args.teacher,
        teacher_eval=args.teacher_eval,
        out=args.out,
    )
    for outcome in result["outcomes"]:
        name = outcome["model_name"]
        if not outcome["gate_passed"]:
            failures = "\n".join(f"  ✗ {failure}" for failure in outcome["gate_failures"])
            print(
                f"iagn: {outcome['kind']} not registered: it failed the gate\n{failures}\n"
                f"  -> train longer or better, or change register.gate in {args.params}",
                file=sys.stderr,
            )
            continue
        aliases = "champion, challenger" if outcome["champion"] else "challenger"
        if outcome["already_registered"]:
            aliases = "aliases unchanged"
        print(
            f"{outcome['kind']}: {name} version {outcome['version']} ({aliases}); "
            f"{outcome['reason']}"
        )
    return 0 if result["passed"] else EXIT_GATE_FAILED


def cmd_models(args: argparse.Namespace) -> int:
    import mlflow

    from iagn import tracking
    from iagn.errors import IagnError
    from iagn.registry import versions_table

    name = args.name
    if not name:
        from iagn.params import DEFAULT_PARAMS, load_params
        from iagn.steps.register import register_config

        # Outside a project (no ./params.yaml, no --params): register.model_name's default.
        params = {}
        if args.params is not None or DEFAULT_PARAMS.is_file():
            params = load_params(args.params or DEFAULT_PARAMS)
        name = register_config(params).model_name
    uri = tracking.configure()
    with tracking.mlflow_errors(uri):
        client = mlflow.MlflowClient()
        if not client.search_registered_models(f"name = '{name}'"):
            raise IagnError(
                f"no registered model named {name!r} in {uri}; run `iagn register` first "
                "(or pass --name)"
            )
        table = versions_table(client, name)
    print(f"{name}  ({uri})\n{table}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "register",
        help="gate the evaluated models, register them in MLflow (aliases challenger/champion)",
        description="Check the student's evaluation (and the teacher's, when "
        "register.register_teacher) against register.gate in params.yaml (minimum top-1, "
        "minimum pointing game, maximum latency). A model that passes becomes a new version "
        "of register.model_name (the teacher: <model_name>-teacher) with its metrics as tags "
        "and its source run linked, and gets the alias `challenger`; it also becomes "
        "`champion` when it beats the current champion on register.promote.metric without "
        "losing more than register.promote.localization_tolerance on the localization metric. "
        "Registering the same pipeline run or checkpoint again creates no second version. "
        "Exit code: 0 registered (or already registered), 1 the student failed the gate, 2 an "
        "input or MLflow error.",
    )
    parser.add_argument(
        "--student", type=input_file("checkpoint"), required=True, help="student checkpoint"
    )
    parser.add_argument(
        "--student-eval",
        type=input_dir("evaluation"),
        required=True,
        help="folder with the student's metrics.json (the --out of `iagn evaluate`)",
    )
    parser.add_argument(
        "--teacher", type=input_file("checkpoint"), help="teacher (stage 3) checkpoint"
    )
    parser.add_argument(
        "--teacher-eval",
        type=input_dir("evaluation"),
        help="folder with the teacher's metrics.json",
    )
    parser.add_argument(
        "--out", type=output_dir("decisions"), help="folder for register.json (the decisions)"
    )
    add_params_argument(parser, required=False)
    parser.set_defaults(handler=cmd_register)

    models = commands.add_parser(
        "models",
        help="list the registered versions with their aliases and key metrics",
        description="Print a table of every version of a registered model: aliases "
        "(champion, challenger), kind, top-1, pointing game, box accuracy, ECE, latency, "
        "pipeline run and creation time. Reads MLFLOW_TRACKING_URI (default: ./mlflow.db).",
    )
    models.add_argument("--name", help="registered model (default: register.model_name)")
    models.add_argument(
        "--params",
        type=input_file("params"),
        default=None,
        help="params.yaml whose register.model_name to list (default: ./params.yaml when there "
        "is one, else the default name iagn)",
    )
    models.set_defaults(handler=cmd_models)
