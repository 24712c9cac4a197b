"""The `iagn-pipeline` command: compile, submit and run the KFP pipeline.

    iagn-pipeline compile -o iagn_pipeline.yaml [--gpu --accelerator nvidia.com/gpu ...]
    iagn-pipeline submit --host URL [--experiment NAME] [--param key=value ...] [--token ...]
    iagn-pipeline run-local [--param key=value ...] [--verbose] [--runner docker [--image TAG]]
    iagn-pipeline sweep (--grid KEY=V1,V2 ... | --random N --dist KEY=DIST ...)
                        [--parallelism P] [-o FILE | --host URL ... | --local ...]

`--param` sets a pipeline parameter (data_rev=v1.2, experiment=cub) or, with a dotted key,
a params.yaml override (stage3.epochs=20). User errors print one line and exit 2; a
failed local run exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from iagn.commands.common import check_paths, input_file, output_dir, output_file
from iagn.errors import IagnError

ENV_TOKEN = "IAGN_KFP_TOKEN"
DEFAULT_PACKAGE = "iagn_pipeline.yaml"
DEFAULT_SWEEP_PACKAGE = "iagn_sweep.yaml"


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value")
    return key.strip(), value.strip()


def _toleration(text: str) -> dict[str, str]:
    """KEY[=VALUE][:EFFECT] -> a Kubernetes toleration (no value: operator Exists)."""
    spec, _, effect = text.partition(":")
    key, sep, value = spec.partition("=")
    if not key.strip():
        raise argparse.ArgumentTypeError(f"toleration {text!r} must be KEY[=VALUE][:EFFECT]")
    toleration = {"key": key.strip(), "operator": "Equal" if sep else "Exists"}
    if sep:
        toleration["value"] = value.strip()
    if effect:
        if effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise argparse.ArgumentTypeError(
                f"toleration effect {effect!r} must be NoSchedule, PreferNoSchedule or NoExecute"
            )
        toleration["effect"] = effect
    return toleration


def _add_compile_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("compile-time options")
    group.add_argument(
        "--image",
        help="component image (default: $IAGN_IMAGE, else ghcr.io/iagn/iagn:0.1.0); the "
        "`image` parameter overrides it per run",
    )
    group.add_argument(
        "--gpu",
        action="store_true",
        help="training and distillation request an accelerator (adds the runtime parameters "
        "accelerator_type and gpu_count; gpu_count=0 turns the request off for one run)",
    )
    group.add_argument(
        "--accelerator",
        default="nvidia.com/gpu",
        help="accelerator resource name, e.g. nvidia.com/gpu, amd.com/gpu (pick a GPU model "
        "with --node-selector, e.g. cloud.google.com/gke-accelerator=nvidia-tesla-a100)",
    )
    group.add_argument(
        "--gpus",
        type=int,
        default=1,
        help="accelerators per GPU step, or per node with --nodes; a step given more than one "
        "runs under torchrun with one process per GPU",
    )
    group.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="nodes per training and distillation step (runtime parameter nodes); more than "
        'one runs each as a Kubeflow Trainer TrainJob (README "Training on several GPUs and '
        'nodes")',
    )
    group.add_argument(
        "--shared-volume",
        default="",
        metavar="CLAIM",
        help="with --nodes: a PersistentVolumeClaim the TrainJob launchers mount, for "
        "distributed.storage_uri: pvc://CLAIM/path (the nodes mount it too)",
    )
    group.add_argument(
        "--secret",
        default="iagn-credentials",
        help="Kubernetes secret with the S3 and MLflow credentials ('' = none)",
    )
    group.add_argument(
        "--node-selector",
        type=_key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="default node selector of the GPU steps (repeatable; runtime parameter node_selector)",
    )
    group.add_argument(
        "--toleration",
        type=_toleration,
        action="append",
        default=[],
        metavar="KEY[=VALUE][:EFFECT]",
        help="default toleration of the GPU steps (repeatable; runtime parameter tolerations)",
    )
    group.add_argument("--data-repo", default="", help="default of the data_repo parameter")
    group.add_argument("--data-rev", default="", help="default of the data_rev parameter")
    group.add_argument("--tracking-uri", default="", help="default of tracking_uri (no secrets)")
    group.add_argument(
        "--mlflow-experiment",
        default="",
        help="default of the experiment parameter ('' = $MLFLOW_EXPERIMENT_NAME, else iagn)",
    )


def _options(args: argparse.Namespace, retries: bool = True):
    from components.runtime import has_credentials
    from pipeline.dag import CompileOptions

    if args.gpus < 1:
        raise IagnError(
            f"--gpus must be 1 or more (GPUs per training step, or per node), got {args.gpus}; "
            "leave out --gpu for steps without a GPU"
        )
    if args.nodes < 1:
        raise IagnError(f"--nodes must be 1 or more, got {args.nodes}")
    if args.shared_volume and args.nodes == 1:
        raise IagnError(
            "--shared-volume is the TrainJobs' storage: it needs --nodes 2 or more (one node "
            "trains in its own pod, with no storage between pods)"
        )
    if has_credentials(args.tracking_uri):
        raise IagnError(
            "--tracking-uri carries credentials, which would be readable in the compiled "
            "pipeline: pass the bare URI; credentials go into the Kubernetes secret"
        )
    return CompileOptions(
        image=args.image or "",
        gpu=args.gpu,
        accelerator=args.accelerator,
        gpus=args.gpus,
        nodes=args.nodes,
        shared_volume=args.shared_volume,
        secret=args.secret,
        node_selector=dict(args.node_selector),
        tolerations=list(args.toleration),
        data_repo=args.data_repo,
        data_rev=args.data_rev,
        tracking_uri=args.tracking_uri,
        experiment=args.mlflow_experiment,
        retries=retries,
    )


def _set_image(image: str | None) -> None:
    # Components read IAGN_IMAGE when they are imported (pipeline.dag imports them lazily).
    if image:
        os.environ["IAGN_IMAGE"] = image


def cmd_compile(args: argparse.Namespace) -> int:
    from pipeline.dag import compile_pipeline

    options = _options(args)
    _set_image(args.image)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    compile_pipeline(args.output, options)
    gpu = f", GPU steps request {options.accelerator} ({options.gpus} each)" if options.gpu else ""
    if options.nodes > 1:
        gpu += f", training runs as {options.nodes}-node TrainJobs"
    print(f"compiled the pipeline to {args.output}{gpu}")
    return 0


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        try:
            return Path(args.token_file).read_text().strip() or None
        except OSError as exc:
            raise IagnError(f"--token-file {args.token_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise IagnError(
                f"--token-file {args.token_file} is not a text file; pass the file that holds "
                "the bearer token"
            ) from None
    return args.token or os.environ.get(ENV_TOKEN) or None


def _check_package(package: str) -> None:
    """A compiled pipeline (KFP IR YAML), before any request: not a params.yaml, not a model."""
    import yaml

    try:
        spec = next(yaml.safe_load_all(Path(package).read_text()), None)
    except (UnicodeDecodeError, yaml.YAMLError):
        spec = None
    if not isinstance(spec, dict) or "pipelineInfo" not in spec:
        raise IagnError(
            f"--package {package} is not a compiled pipeline (KFP IR YAML with pipelineInfo); "
            "pass the file `iagn-pipeline compile -o FILE` wrote, or leave --package out to "
            "compile now"
        )


def _params_file(arguments: dict, local: bool) -> Path:
    """The params.yaml overrides and sweep keys are checked against (when it exists): the
    local data_repo's, else this folder's (a remote data_repo's is not at hand)."""
    repo = arguments.get("data_repo") or "."
    if local or Path(repo).is_dir():
        return Path(repo) / "params.yaml"
    return Path("params.yaml")


def _arguments(args: argparse.Namespace, options, local: bool = False) -> dict:
    """--param: the pipeline's arguments, params.yaml overrides checked and folded in."""
    from pipeline.arguments import check_overrides, parse_params

    arguments, overrides = parse_params(args.param, options)
    check_overrides(overrides, _params_file(arguments, local))
    if overrides:
        arguments["params_overrides"] = overrides
    return arguments


def _submit(
    args: argparse.Namespace,
    arguments: dict,
    compile_to,
    default_run_name: str,
    package: str | None = None,
) -> int:
    """Compile (`compile_to(path)`) unless `package` is given, then start a run of it."""
    import tempfile

    from pipeline.submit import submit, without_caching

    token = _token(args)
    run_name = args.run_name or default_run_name
    with tempfile.TemporaryDirectory(prefix="iagn-submit-") as tmp:
        if package is None:
            package = compile_to(str(Path(tmp) / DEFAULT_PACKAGE))
        if args.no_cache:
            package = str(without_caching(package, Path(tmp) / "no-cache.yaml"))
        submitted = submit(
            host=args.host,
            package=package,
            arguments=arguments,
            experiment=args.experiment,
            run_name=run_name,
            token=token,
            namespace=args.namespace,
        )
    created = " (created)" if submitted.experiment_created else ""
    print(f"experiment  {args.experiment}{created}")
    print(f"run id      {submitted.run_id}")
    print(f"run URL     {submitted.url}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.dag import compile_pipeline

    options = _options(args)
    _set_image(args.image)
    arguments = _arguments(args, options)
    if args.package is not None:
        if not Path(args.package).is_file():
            raise IagnError(f"--package {args.package} does not exist; run `iagn-pipeline compile`")
        _check_package(args.package)
    return _submit(
        args,
        arguments,
        lambda path: compile_pipeline(path, options),
        f"iagn {datetime.now():%Y-%m-%d %H:%M:%S}",
        args.package,
    )


def _containers(args: argparse.Namespace, key: str, arguments: dict):
    """--runner docker: the engine, the image and what the containers get (or None)."""
    if args.runner != "docker":
        if args.image:
            raise IagnError("--image is for --runner docker (the subprocess runner uses no image)")
        return None
    from components.image import image as default_image
    from pipeline.containers import prepare

    image = args.image or default_image()
    containers = prepare(image, Path(args.pipeline_root).resolve(), arguments, key)
    print(f"iagn-pipeline: every task in a container of {containers.image} ({containers.engine})")
    for note in containers.notes:
        print(f"iagn-pipeline: note: {note}")
    return containers


def share_cores(side_by_side: int) -> int | None:
    """Give each of `side_by_side` local tasks its share of the cores (OMP_NUM_THREADS, read
    when torch loads), unless the environment sets it. Measured on 2 cores: two demo trials
    with 2 threads each trained stage 1 at 17-29 images/s each, one alone at 130. The share
    given, or None."""
    if side_by_side < 2 or os.environ.get("OMP_NUM_THREADS"):
        return None
    threads = max(1, (os.cpu_count() or 1) // side_by_side)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


def _run_locally(
    args: argparse.Namespace,
    arguments: dict,
    options,
    build=None,
    shown_arguments: dict | None = None,
):
    """The DAG (`build()`: default the main pipeline) with kfp.local, as run-local runs it:
    a line per task, kfp.local's full log in a file. The LocalRun."""
    from pipeline.local import RunLog, log_path, pipeline_key, shown_path
    from pipeline.warm import Zygote

    # The key first: the preloaded interpreter must start with the environment of the tasks.
    key = pipeline_key()
    log = RunLog(log_path(args.pipeline_root, key), sys.stdout, args.verbose)
    # Then the interpreter: its imports (seconds) run while this process imports kfp and
    # compiles. Its own errors go to the log. Containers start from their image instead.
    warm = not args.cold and args.runner == "subprocess"
    zygote = Zygote.start(stderr=log.file) if warm else None
    try:
        from pipeline.arguments import shown
        from pipeline.local import run_local

        containers = _containers(args, key, arguments)
        described = shown(arguments if shown_arguments is None else shown_arguments)
        print(f"iagn-pipeline: running the DAG with kfp.local ({described or 'defaults'})")
        shown_log = "" if args.verbose else "; --verbose shows it here as well"
        print(f"iagn-pipeline: kfp.local's full log: {shown_path(log.path)}{shown_log}")
        run = run_local(arguments, args.pipeline_root, options, zygote, log, containers, build)
    finally:
        if zygote is not None:
            zygote.stop()
        log.close()
    return run


def cmd_run_local(args: argparse.Namespace) -> int:
    from pipeline.dag import CompileOptions
    from pipeline.local import report

    options = CompileOptions(retries=False)
    arguments = _arguments(args, options, local=True)
    run = _run_locally(args, arguments, options)
    print(report(run, arguments))
    return 0 if run.succeeded else 1


def _sweep(args: argparse.Namespace, arguments: dict, local: bool):
    """The sweep the command line describes, its keys checked against params.yaml."""
    from iagn.params import load_params
    from pipeline.sweep import build_sweep

    params_file = _params_file(arguments, local)
    params = load_params(params_file) if params_file.is_file() else None
    overrides = arguments.get("params_overrides") or {}
    if str(overrides.get("evaluate.split", "test")) == "val":
        raise IagnError(
            "evaluate.split=val: a sweep chooses its best trial on the validation split, so "
            "the winner is judged on another one (leave evaluate.split at test)"
        )
    sweep = build_sweep(
        grid=args.grid,
        random_count=args.random,
        dists=args.dist,
        seed=args.seed,
        max_trials=args.max_trials,
        sweep_id=args.sweep_id,
        params=params,
    )
    if "evaluate.split" in sweep.keys:
        raise IagnError("evaluate.split cannot be swept: trials are compared on val, always")
    return sweep


def cmd_sweep(args: argparse.Namespace) -> int:
    from pipeline.sweep import trials_table
    from pipeline.sweep_dag import compile_sweep, sweep_arguments

    if args.parallelism < 1:
        raise IagnError(f"--parallelism {args.parallelism}: run at least 1 trial at a time")
    if args.local and (args.host or args.output):
        raise IagnError("--local runs the sweep here: leave out --host and -o")
    local = args.local
    options = _options(args, retries=not local)
    if not local:
        _set_image(args.image)
        _token(args)  # a bad token file is an error before anything is compiled
    arguments = _arguments(args, options, local)
    sweep = _sweep(args, arguments, local)
    print(
        f"sweep {sweep.sweep_id}: {len(sweep.trials)} trials ({sweep.kind}), "
        f"{min(args.parallelism, len(sweep.trials))} at a time"
    )
    print(trials_table(sweep))

    def compile_to(path: str) -> str:
        return compile_sweep(path, sweep, options, args.parallelism)

    if local:
        from pipeline.local import report
        from pipeline.sweep_dag import build_sweep_pipeline

        threads = share_cores(min(args.parallelism, len(sweep.trials)))
        if threads:
            print(
                f"iagn-pipeline: {threads} CPU threads per task (OMP_NUM_THREADS), so the "
                "trials side by side share the cores instead of fighting over them"
            )
        run = _run_locally(
            args,
            {**arguments, **sweep_arguments(sweep)},
            options,
            lambda: build_sweep_pipeline(sweep, options, args.parallelism),
            shown_arguments={**arguments, "sweep_id": sweep.sweep_id},
        )
        print(report(run, arguments))
        return 0 if run.succeeded else 1
    package = None
    if args.output or not args.host:
        output = args.output or DEFAULT_SWEEP_PACKAGE
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        package = compile_to(output)
        print(f"compiled the sweep pipeline to {output}")
    if not args.host:
        return 0
    return _submit(
        args,
        {**arguments, **sweep_arguments(sweep)},
        compile_to,
        f"iagn {sweep.sweep_id}",
        package,
    )


PARAM_HELP = (
    "a pipeline parameter (data_repo, data_rev, tracking_uri, experiment, model_name, "
    "image, node_selector, tolerations, accelerator_type, gpu_count) or a dotted "
    "params.yaml key (stage3.epochs=20); repeatable"
)


def _add_submit_options(parser: argparse.ArgumentParser, host_required: bool) -> None:
    group = parser.add_argument_group("submitting (kfp.Client)") if not host_required else parser
    group.add_argument(
        "--host",
        required=host_required,
        help="KFP API URL, e.g. http://localhost:8080"
        + ("" if host_required else ": submit the sweep there"),
    )
    group.add_argument("--experiment", default="iagn", help="KFP experiment (created when missing)")
    group.add_argument(
        "--token",
        help=f"bearer token for the KFP API (or ${ENV_TOKEN}, or --token-file); never printed",
    )
    group.add_argument(
        "--token-file", type=input_file("token", convert=str), help="file holding the bearer token"
    )
    group.add_argument("--namespace", help="Kubernetes namespace (multi-user KFP)")
    group.add_argument("--run-name", help="run name (default: iagn <date time>)")
    group.add_argument(
        "--no-cache", action="store_true", help="run every task, reusing no cached result"
    )


def _add_local_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pipeline-root",
        type=output_dir("pipeline root", convert=str),
        default="build/kfp",
        help="where task outputs are written",
    )
    parser.add_argument(
        "--runner",
        choices=("subprocess", "docker"),
        default="subprocess",
        help="subprocess (default): this Python environment; docker: every task in a "
        "container of the component image (kfp.local's DockerRunner; docker or podman)",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="start every task as a fresh interpreter (default: fork it from one that has "
        "imported torch, MLflow and iagn already)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show kfp.local's full output live (executor inputs, every task's log) instead "
        "of a line per task start and end; it goes to the log file either way",
    )


def _sweep_item(text: str) -> str:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUES")
    return text


def _sweep_id(text: str) -> str:
    from pipeline.sweep import SWEEP_ID

    if not SWEEP_ID.match(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return text


SWEEP_DESCRIPTION = """\
Run a hyperparameter sweep as one KFP pipeline: fetch and validate the data once, then
train, distill and evaluate (on the validation split) once per trial, up to --parallelism
trials at a time (dsl.ParallelFor); pick the trial whose student has the best val top-1
(ties: the earlier trial), evaluate only it on the test split and register it as
`challenger` (never `champion`: promoting it is a person's decision). In MLflow the sweep
is one parent run with a child run per trial (tagged iagn.sweep_id, the overrides as
params, val_top1 etc. as metrics; each trial's step runs under it) and the summary
(sweep/summary.md, sweep/summary.png).

Without --host or --local the pipeline is compiled to -o (default iagn_sweep.yaml); with
--host it is submitted (and with -o also kept); with --local it runs here as run-local
runs the main DAG.

Sweep keys are dotted params.yaml keys. Values are YAML: 2 is an int, 0.5 a float, and
commas inside brackets stay (model.jigsaw=[8,4,2],[4,2,1] is two values).
"""

SWEEP_EPILOG = """\
distributions for --dist KEY=DIST:
  uniform(a,b)          a float drawn evenly from [a, b]
  loguniform(a,b)       a float whose log is even in [log a, log b] (a > 0): learning rates
  int(a,b)              an integer from a to b, both included
  choice(v1,v2,...)     one of the values

examples:
  iagn-pipeline sweep --grid stage3.epochs=4,8 --grid train.lr_head=0.01,0.02 -o sweep.yaml
  iagn-pipeline sweep --random 8 --dist 'train.lr_head=loguniform(0.001,0.1)' \\
      --dist 'distill.kd_alpha=uniform(0.5,0.9)' --seed 1 --host http://localhost:8080
  iagn-pipeline sweep --grid distill.student_layers=2,3 --local --param stage3.epochs=2
"""


def _add_sweep_parser(commands) -> None:
    from pipeline.sweep import MAX_TRIALS

    parser = commands.add_parser(
        "sweep",
        help="a hyperparameter sweep: trials in parallel, the best registered as challenger",
        description=SWEEP_DESCRIPTION,
        epilog=SWEEP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    trials = parser.add_argument_group("the trials (--grid, or --random with --dist)")
    trials.add_argument(
        "--grid",
        type=_sweep_item,
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a params.yaml key and its values; repeatable: every combination is a trial",
    )
    trials.add_argument(
        "--random", type=int, metavar="N", help="draw N trials from the --dist distributions"
    )
    trials.add_argument(
        "--dist",
        type=_sweep_item,
        action="append",
        default=[],
        metavar="KEY=DIST",
        help="with --random: a params.yaml key and its distribution (below); repeatable",
    )
    trials.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of --random's draws (default 0: the same command draws the same trials)",
    )
    trials.add_argument(
        "--max-trials",
        type=int,
        metavar="M",
        help=f"allow up to M trials (default: at most {MAX_TRIALS}, against typos in a grid)",
    )
    trials.add_argument(
        "--parallelism",
        type=int,
        default=2,
        help="trials running at once (ParallelFor's parallelism; default 2)",
    )
    trials.add_argument(
        "--sweep-id",
        type=_sweep_id,
        help="the sweep's id (default sweep-<date>-<time>-<hex>), tagged on its MLflow runs",
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=PARAM_HELP + "; applies to every trial",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=output_file("pipeline", convert=str),
        help=f"write the compiled sweep pipeline here (default without --host: "
        f"{DEFAULT_SWEEP_PACKAGE})",
    )
    _add_submit_options(parser, host_required=False)
    local = parser.add_argument_group("running here (--local, as run-local)")
    local.add_argument(
        "--local", action="store_true", help="run the sweep on this machine with kfp.local"
    )
    _add_local_options(local)
    _add_compile_options(parser)
    parser.set_defaults(handler=cmd_sweep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iagn-pipeline",
        description="Compile, submit and run the IAGN Kubeflow pipeline (KFP v2).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    compile_parser = commands.add_parser(
        "compile", help="write the pipeline's IR YAML (pipeline + Kubernetes platform spec)"
    )
    compile_parser.add_argument(
        "-o",
        "--output",
        type=output_file("pipeline", convert=str),
        default=DEFAULT_PACKAGE,
        help="YAML to write",
    )
    _add_compile_options(compile_parser)
    compile_parser.set_defaults(handler=cmd_compile)

    submit_parser = commands.add_parser(
        "submit", help="start a run on a Kubeflow Pipelines cluster (kfp.Client)"
    )
    _add_submit_options(submit_parser, host_required=True)
    submit_parser.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help=PARAM_HELP
    )
    submit_parser.add_argument(
        "--package",
        type=input_file("pipeline", convert=str),
        help="a compiled pipeline YAML (default: compile now with the options below)",
    )
    _add_compile_options(submit_parser)
    submit_parser.set_defaults(handler=cmd_submit)

    local_parser = commands.add_parser(
        "run-local",
        help="run the whole DAG on this machine (kfp.local: subprocesses, or containers)",
        description="Each step runs as a subprocess of this environment, as on a cluster but "
        "without containers. data_repo defaults to the current folder (the working copy): "
        "`dvc pull` of the dataset from its default remote, else the folder as it is. MLflow: "
        "MLFLOW_TRACKING_URI of the environment, else ./mlflow.db. With --runner docker each "
        "step runs in a container of the component image (Docker API: DOCKER_HOST, else the "
        "usual sockets) as its user 10001; the project is fetched at a commit (data_rev, "
        "default HEAD) with git and `dvc get`, as on a cluster; MLflow: MLFLOW_TRACKING_URI "
        "(a server on this machine is reachable), else a SQLite store in the pipeline root.",
    )
    local_parser.add_argument(
        "--param", action="append", default=[], metavar="KEY=VALUE", help=PARAM_HELP
    )
    _add_local_options(local_parser)
    local_parser.add_argument(
        "--image",
        help="with --runner docker: the image's tag (default: $IAGN_IMAGE, else "
        "ghcr.io/iagn/iagn:0.1.0, what `make image` builds)",
    )
    local_parser.set_defaults(handler=cmd_run_local)
    _add_sweep_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_paths(parser, args)
    try:
        return args.handler(args)
    except IagnError as error:
        print(f"iagn-pipeline: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("iagn-pipeline: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
