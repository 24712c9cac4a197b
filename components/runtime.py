"""What the component bodies share at run time (inside the container, or a kfp.local process).

Imported inside component functions, never at compile time, and free of kfp imports.
Everything here is glue between KFP and `iagn.runner`: params and their overrides, the
environment MLflow and the parent-run lookup read, KFP metrics and the Markdown artifacts
the KFP UI renders (HTML pages: components/pages.py). Step logic stays in `iagn`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from components.pages import cell
from iagn.provenance import ENV_DATA_VERSION, ENV_KFP_RUN

NOISY_LOGGERS = ("great_expectations", "botocore", "urllib3", "alembic", "git", "matplotlib")


class StepFailed(Exception):
    """A step ran and decided the pipeline must stop (validation or the gate failed)."""


@contextlib.contextmanager
def readable_errors() -> Iterator[None]:
    """User errors end the task with one readable message instead of a traceback."""
    from iagn.errors import IagnError

    try:
        yield
    except (IagnError, StepFailed) as error:
        print(f"iagn: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


# --- params ---------------------------------------------------------------------------------


def step_params(
    params_path: str, overrides: Mapping[str, Any] | None, model_name: str = ""
) -> dict[str, Any]:
    """params.yaml as fetched with the data, with the run's overrides applied."""
    from iagn.params import apply_overrides, load_params

    params = apply_overrides(load_params(params_path), overrides)
    if model_name:
        params.setdefault("register", {})["model_name"] = model_name
    return params


def sweep_metadata(params: Mapping[str, Any]) -> dict[str, str]:
    """A sweep trial's id, for the metadata of what the trial makes: pick-best pairs the
    trials' collected outputs by it (their order in a `dsl.Collected` list is not promised)."""
    section = params.get("sweep") or {}
    return {"sweep_trial": str(section["trial"])} if section.get("trial") else {}


def by_trial(artifacts: list, what: str, order: list[str] | None = None) -> dict[str, Any]:
    """Collected artifacts of a sweep's trials by trial id (`sweep_metadata`), in `order`
    (else sorted); an artifact without the id takes its position in `order`."""
    found: dict[str, Any] = {}
    for index, artifact in enumerate(artifacts):
        trial = (artifact.metadata or {}).get("sweep_trial")
        if not trial and order is not None and index < len(order):
            trial = order[index]
        if not trial:
            raise StepFailed(f"{what}: output {index} of the trials names no trial")
        if trial in found:
            raise StepFailed(f"{what}: two outputs of trial {trial}")
        found[trial] = artifact
    expected = order if order is not None else sorted(found)
    if set(found) != set(expected):
        raise StepFailed(f"{what}: outputs of trials {sorted(found)}, expected {expected}")
    return {trial: found[trial] for trial in expected}


# --- scale: one process, torchrun in this pod, or a Kubeflow Trainer TrainJob --------------


def scaled_params(
    settings: dict[str, Any], nodes: int = 0, gpus: int = 0, accelerator: str = ""
) -> dict[str, Any]:
    """The run's params with the task's scale inputs (0: params.yaml decides) written into
    `distributed:`, so that the step's MLflow run records the scale it ran at."""
    from iagn.params import apply_overrides

    overrides: dict[str, Any] = {}
    if nodes > 0:
        overrides["distributed.nodes"] = nodes
    if gpus > 0:  # this pod's GPUs, or each node's: one process per GPU
        overrides["distributed.procs_per_node"] = gpus
    settings.setdefault("distributed", {})
    settings = apply_overrides(settings, overrides)
    if accelerator and gpus > 0 and nodes > 1:  # a resource name has dots: not an override
        resources = settings["distributed"].get("resources_per_node") or {}
        settings["distributed"]["resources_per_node"] = {**resources, accelerator: gpus}
    return settings


def run_training(
    step: str,
    command: list[str],
    files: Mapping[str, str | None],
    settings: dict[str, Any],
    here: Any,
    image: str = "",
    secret: str = "",
    placement: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run a training step at the scale `settings` ask for; its last epoch's metrics.

    `command` is the `iagn` command line of the step, its file arguments `{name}` for the
    paths in `files` (`out`: the checkpoint written; None: left out with its flag) plus
    `{params}`; `here()` runs the step in this process instead (one process, as always).
    `placement` (node_selector, tolerations) goes to a TrainJob's nodes.
    """
    import tempfile

    import yaml

    from iagn.errors import IagnError
    from iagn.train.loop import metrics_path
    from iagn.train.scale import run_under_torchrun, scale_from_params

    scale = scale_from_params(settings)
    if scale.world_size == 1:
        return here()["metrics"]
    out = Path(str(files["out"]))
    with tempfile.TemporaryDirectory(prefix="iagn-params-") as tmp:
        params_file = Path(tmp) / "params.yaml"
        params_file.write_text(yaml.safe_dump(settings, sort_keys=False))
        paths = {name: path for name, path in files.items() if path is not None}
        paths["params"] = str(params_file)
        if scale.on_trainer:
            from iagn.trainjob import run_on_trainer
            from iagn.trainjob.staging import check_writable

            if not image:
                raise IagnError(
                    f"distributed.nodes is {scale.nodes}, but this pipeline was compiled for "
                    "one node: compile it with `iagn-pipeline compile --nodes N` so that its "
                    "training tasks know the image and secret a TrainJob runs with"
                )
            checkpoints = (settings.get("train") or {}).get("checkpoint_uri")
            storage = scale.storage_uri or checkpoints
            if not storage:
                raise IagnError(
                    "a TrainJob's inputs and outputs travel through durable storage: set "
                    "distributed.storage_uri (or train.checkpoint_uri) to an s3:// URI or a "
                    "volume every node mounts"
                )
            if checkpoints:  # the nodes write there: unreachable is an error before any GPU
                check_writable(checkpoints, "train.checkpoint_uri", "fix train.checkpoint_uri")
            inputs = {name: Path(p) for name, p in paths.items() if name != "out"}
            run_on_trainer(
                step=_job_step(step, settings),
                argv=_fill(command, {name: "{" + name + "}" for name in paths}),
                inputs=inputs,
                outputs={"out": out},
                scale=scale,
                image=image,
                secret=secret,
                storage_uri=str(storage),
                node_selector=(placement or {}).get("node_selector") or None,
                tolerations=(placement or {}).get("tolerations") or None,
            )
        else:
            code = run_under_torchrun(scale, _fill(command, paths))
            if code != 0:
                raise SystemExit(code)  # 143 after SIGTERM: KFP's retry resumes
    return read_json(metrics_path(out))


def _fill(command: list[str], paths: Mapping[str, str]) -> list[str]:
    """`command` with each `{name}` argument replaced by its path; a flag whose file is
    absent (no init for stage 1) is left out with it."""
    argv: list[str] = []
    for arg in command:
        if arg.startswith("{") and arg.endswith("}"):
            name = arg[1:-1]
            if name not in paths:
                argv.pop()  # the flag before it
                continue
            arg = paths[name]
        argv.append(arg)
    return argv


def _job_step(step: str, settings: Mapping[str, Any]) -> str:
    """The step's name within the KFP run: a sweep's trials each train every stage."""
    trial = (settings.get("sweep") or {}).get("trial")
    return f"{trial}-{step}" if trial else step


# --- environment: tracking and the pipeline run ---------------------------------------------


def has_credentials(uri: str) -> bool:
    """Whether a URI carries `user:password@` (never allowed in a pipeline parameter)."""
    return "@" in urlsplit(uri).netloc


def configure_step(tracking_uri: str, experiment: str, metadata: Mapping | None = None) -> None:
    """The environment `iagn.tracking` reads, from the task's inputs.

    KFP_RUN_ID arrives from the pod's `pipeline/runid` label (empty where a backend does not
    set it: then this pipeline run has no shared key); run-local exports IAGN_PIPELINE_RUN.
    """
    from iagn.errors import IagnError

    # The KFP executor logs at INFO on the root logger; these libraries would flood the log.
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if not os.environ.get(ENV_KFP_RUN, "").strip():
        os.environ.pop(ENV_KFP_RUN, None)
    if tracking_uri:
        if has_credentials(tracking_uri):
            raise IagnError(
                "the tracking_uri parameter carries credentials; pass the bare URI and put "
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in the Kubernetes secret"
            )
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    if experiment:
        os.environ["MLFLOW_EXPERIMENT_NAME"] = experiment
    if metadata and metadata.get("dvc_md5"):
        # The data version the fetched copy came from (the pod has no data.dvc to read).
        os.environ.setdefault(ENV_DATA_VERSION, str(metadata["dvc_md5"]))
    if ENV_KFP_RUN in os.environ and not os.environ.get("MLFLOW_TRACKING_URI"):
        print(
            "iagn: warning: no MLflow tracking URI in this pod (tracking_uri parameter or "
            "MLFLOW_TRACKING_URI in the secret): runs go to a SQLite file that ends with the "
            "pod",
            file=sys.stderr,
        )


# --- KFP outputs ----------------------------------------------------------------------------


def log_metrics(artifact: Any, values: Mapping[str, Any], prefix: str = "") -> None:
    """Finite numbers of `values` as KFP metrics (bools, strings, NaN are left out)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            artifact.log_metric(f"{prefix}{name}", float(value))


def markdown_table(rows: list[tuple[str, Any]], header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    lines += [f"| {name} | {cell(value)} |" for name, value in rows]
    return "\n".join(lines)


def key_metrics() -> tuple[str, ...]:
    """The headline numbers: the ones the registry also puts on a model version."""
    from iagn.registry import VERSION_METRICS

    return VERSION_METRICS


def evaluation_markdown(metrics: Mapping[str, Any], gate_failures: list[str]) -> str:
    """Key numbers of an evaluation and the registry gate's verdict, for the KFP UI."""
    rows = [(name, metrics[name]) for name in key_metrics() if name in metrics]
    verdict = "passes" if not gate_failures else "fails"
    kind, split = metrics.get("kind", "model"), metrics.get("split", "test")
    lines = [
        f"# Evaluation of the {kind} ({split} split)",
        "",
        markdown_table(rows, ("metric", "value")),
        "",
        f"Registry gate (register.gate): the {kind} {verdict}.",
    ]
    lines += [f"- {failure}" for failure in gate_failures]
    return "\n".join(lines) + "\n"


def register_markdown(result: Mapping[str, Any]) -> str:
    lines = ["# Model registry", ""]
    for outcome in result.get("outcomes", []):
        name = outcome.get("model_name")
        if not outcome.get("gate_passed"):
            failures = "; ".join(outcome.get("gate_failures", []))
            lines.append(f"- **{outcome.get('kind')}**: not registered, gate failed: {failures}")
            continue
        aliases = "champion, challenger" if outcome.get("champion") else "challenger"
        if outcome.get("already_registered"):
            aliases = "aliases unchanged"
        lines.append(
            f"- **{outcome.get('kind')}**: `{name}` version {outcome.get('version')} "
            f"({aliases}); {outcome.get('reason', '')}"
        )
    return "\n".join(lines) + "\n"


def write_text(path: str | os.PathLike, text: str) -> None:
    from iagn.io import write_text_atomic

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())
