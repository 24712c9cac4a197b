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


def _version_spec(text: str) -> tuple[str, str, str]:
    """NAME@ALIAS or NAME/VERSION -> (name, "alias" or "version", alias or number)."""
    name, at, alias = text.rpartition("@")
    if at and name and alias:
        return name, "alias", alias
    name, slash, number = text.rpartition("/")
    if slash and name and number.isdigit():
        return name, "version", number
    raise argparse.ArgumentTypeError(
        f"{text!r} names no version: write NAME@ALIAS (iagn@champion) or NAME/VERSION (iagn/3)"
    )


def _card_version(client, uri: str, name: str, how: str, which: str):
    from mlflow.exceptions import MlflowException

    from iagn.errors import IagnError

    try:
        if how == "alias":
            return client.get_model_version_by_alias(name, which)
        return client.get_model_version(name, which)
    except MlflowException:
        raise IagnError(
            f"{name} has no version {'with the alias ' if how == 'alias' else ''}{which} in "
            f"{uri}; `iagn models --name {name}` lists the versions"
        ) from None


def cmd_card(args: argparse.Namespace) -> int:
    import os
    import shutil
    import tempfile
    import webbrowser
    from pathlib import Path

    import mlflow
    from mlflow.exceptions import MlflowException

    from iagn import tracking
    from iagn.card import CARD_HTML, CARD_MARKDOWN, card_path
    from iagn.errors import IagnError

    name, how, which = args.version
    uri = tracking.configure()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stdout is the card
    download = Path(tempfile.mkdtemp(prefix="iagn-card-"))
    with tracking.mlflow_errors(uri):
        version = _card_version(mlflow.MlflowClient(), uri, name, how, which).version
        where = card_path(name, version)
        try:
            fetched = mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version}/{where}", dst_path=str(download)
            )
        except (MlflowException, OSError):
            raise IagnError(
                f"{name} version {version} has no model card (registered before iagn wrote "
                "cards?); run `iagn register` again for it: registering is idempotent and "
                "writes the card"
            ) from None
    folder = Path(fetched)
    if args.out is not None:
        shutil.copytree(folder, args.out, dirs_exist_ok=True)
        shutil.rmtree(download)
        folder = Path(args.out)
    if args.open:
        webbrowser.open((folder / CARD_HTML).resolve().as_uri())
    if args.out is None and not args.open:
        print((folder / CARD_MARKDOWN).read_text(), end="")
        shutil.rmtree(download)
    else:
        print(f"model card of {name} version {version}: {folder / CARD_HTML}")
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
    what = models.add_subparsers(dest="models_command", metavar="COMMAND")
    card = what.add_parser(
        "card",
        help="print (or write, or open) the model card of a registered version",
        description="The card `iagn register` wrote for the version: identity, training "
        "recipe, served configuration, metrics with their spread over seeds, per-class "
        "accuracy, calibration, localization against chance, latency and size, attention "
        "gallery, confused pairs, data validation, limits, and the comparison with the "
        "champion it met. Prints its Markdown; --out writes card.md, card.html and the "
        "images; --open opens card.html in a browser.",
    )
    card.add_argument(
        "version", type=_version_spec, help="NAME@ALIAS (iagn@champion) or NAME/VERSION (iagn/3)"
    )
    card.add_argument(
        "--out", type=output_dir("card"), help="folder to write card.md, card.html, images to"
    )
    card.add_argument("--open", action="store_true", help="open card.html in a web browser")
    card.set_defaults(handler=cmd_card)
