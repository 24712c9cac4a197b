"""`iagn-pipeline run-local`: the whole DAG on this machine with kfp.local.

`kfp.local.SubprocessRunner(use_venv=False)` runs each component in a subprocess of the
current Python environment (no container, no pip installs): the same component code, the
same artifacts passing and the same control flow (ExitHandler, dsl.If) as on a cluster.
Cluster-only settings are ignored locally: the image, GPU requests, node selectors,
tolerations, secrets and the pods' KFP_RUN_ID. In their place this process exports
IAGN_PIPELINE_RUN, the key that groups all steps under one MLflow parent run, and the
steps inherit this process's environment (MLFLOW_TRACKING_URI and credentials, if set).
Outputs land under `<pipeline_root>/iagn-<timestamp>/<task>/<output>`.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.dag import PIPELINE_NAME, CompileOptions, build_pipeline
from pipeline.warm import Zygote, as_python

ENV_PIPELINE_RUN = "IAGN_PIPELINE_RUN"
DEFAULT_ROOT = "build/kfp"


@dataclass
class LocalRun:
    key: str  # IAGN_PIPELINE_RUN: the MLflow parent run's key
    run_dir: Path | None
    succeeded: bool
    error: str = ""
    seconds: float = 0.0
    outputs: dict[str, Any] = field(default_factory=dict)


def _run_key() -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"kfp-local-{stamp}-{secrets.token_hex(3)}"


def _newest_run_dir(root: Path, started: float) -> Path | None:
    runs = [
        p
        for p in root.glob(f"{PIPELINE_NAME}-*")
        if p.is_dir() and p.stat().st_mtime >= started - 1
    ]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


def run_local(
    arguments: dict[str, Any],
    pipeline_root: str | os.PathLike = DEFAULT_ROOT,
    options: CompileOptions | None = None,
    zygote: Zygote | None = None,
) -> LocalRun:
    """Run the pipeline locally; the steps' logs stream to stdout as they run.

    `zygote`: tasks start as forks of this process that has imported torch, MLflow and
    iagn already (pipeline/warm.py); None: each task is a fresh interpreter.
    """
    from kfp import local

    # A working copy does not fail transiently: a retry would only repeat the error later.
    options = options or CompileOptions(retries=False)
    key = os.environ.get(ENV_PIPELINE_RUN, "").strip() or _run_key()
    os.environ[ENV_PIPELINE_RUN] = key
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        raise_on_error=True,
    )
    pipeline = build_pipeline(options)
    started = time.time()
    error = ""
    python = zygote.client() if zygote is not None else None
    if zygote is not None and python is None:
        print("iagn-pipeline: note: the preloaded interpreter failed; tasks import everything")
    with as_python(python), warnings.catch_warnings():
        # Expected locally, and said once in this module's doc: the image is not used and
        # cluster settings (display names, accelerators) have no local effect.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=r"Task .* have no effect in the current local")
        try:
            pipeline(**arguments)
        except RuntimeError as exc:  # kfp.local: "Pipeline iagn finished with status FAILURE"
            error = str(exc)
    run = LocalRun(
        key=key,
        run_dir=_newest_run_dir(root, started),
        succeeded=not error,
        error=error,
        seconds=time.time() - started,
    )
    if run.run_dir is not None:
        run.outputs = collect_outputs(run.run_dir)
    return run


def collect_outputs(run_dir: Path) -> dict[str, Any]:
    """Where the interesting outputs of a local run are, and the registry's decision."""
    found: dict[str, Any] = {}
    for metrics_file in run_dir.glob("*/evaluation/metrics.json"):
        try:
            kind = json.loads(metrics_file.read_text()).get("kind", "model")
        except (OSError, json.JSONDecodeError):
            continue
        found[f"{kind}_evaluation"] = metrics_file.parent
    for report in run_dir.glob("*/report/validation.json"):
        found["validation"] = report.parent
    for decision in run_dir.glob("*/result/register.json"):
        try:
            found["register"] = json.loads(decision.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    for params in run_dir.glob("fetch-data/params"):
        found["params"] = params
    # The exit handler's return value: where the MLflow parent run is (read here, so that
    # this process need not import MLflow for it).
    for output in run_dir.glob("record-outcome/executor_output.json"):
        try:
            value = json.loads(output.read_text())["parameterValues"]["Output"]
            found["mlflow"] = json.loads(value) if isinstance(value, str) else {}
        except (OSError, KeyError, TypeError, json.JSONDecodeError):
            continue
    return found


def mlflow_ui(uri: str) -> str:
    """How to look at the runs in `uri` (scrubbed of credentials)."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}  (in {Path.cwd()})"


def report(run: LocalRun, arguments: dict[str, Any]) -> str:
    """What people need after a local run: where to look, in a few lines."""
    lines = []
    verdict = "succeeded" if run.succeeded else "FAILED"
    lines.append(f"kfp.local run {verdict} in {run.seconds:.0f} s (pipeline run key {run.key})")
    if run.run_dir is not None:
        lines.append(f"  outputs          {run.run_dir}/<task>/<output>")
    outputs = run.outputs
    if "validation" in outputs:
        lines.append(f"  data validation  {outputs['validation']}/summary.md")
    for kind in ("teacher", "student"):
        folder = outputs.get(f"{kind}_evaluation")
        if folder is not None:
            lines.append(f"  {kind + ' gallery':<16} {folder}/attention_gallery.png")
    decision = outputs.get("register")
    if decision:
        for outcome in decision.get("outcomes", []):
            if outcome.get("version"):
                alias = "champion" if outcome.get("champion") else "challenger"
                uri = f"models:/{outcome['model_name']}@{alias}"
                lines.append(
                    f"  registered       {uri} (version {outcome['version']}, {outcome['kind']})"
                )
            else:
                failures = "; ".join(outcome.get("gate_failures", []))
                lines.append(f"  not registered   {outcome.get('kind')}: {failures}")
    elif run.succeeded:
        lines.append(
            "  not registered   the student failed register.gate (see the evaluate student "
            "task's summary); change register.gate with --param to register anyway"
        )
    parent = outputs.get("mlflow") or {}
    if parent.get("uri"):
        lines.append(f"  MLflow UI        {mlflow_ui(parent['uri'])}")
    if parent.get("run_id"):
        lines.append(
            f"  MLflow run       {parent['run_id']} ({parent.get('status')}), experiment "
            f"{parent.get('experiment_id')}, with one nested run per step"
        )
    else:
        lines.append(
            f"  MLflow           runs tagged iagn.pipeline_key = 'pipeline:{run.key}' "
            "(MLFLOW_TRACKING_URI, else ./mlflow.db)"
        )
    if not run.succeeded:
        lines.append(f"  error            {run.error}")
        lines.append("  -> the failing task's log is above; fix and run again")
    return "\n".join(lines)
