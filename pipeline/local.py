"""`iagn-pipeline run-local`: the whole DAG on this machine with kfp.local.

`kfp.local.SubprocessRunner(use_venv=False)` runs each component in a subprocess of the
current Python environment (no container, no pip installs): the same component code, the
same artifacts passing and the same control flow (ExitHandler, dsl.If) as on a cluster.
Cluster-only settings are ignored locally: the image, GPU requests, node selectors,
tolerations, secrets and the pods' KFP_RUN_ID. In their place this process exports
IAGN_PIPELINE_RUN, the key that groups all steps under one MLflow parent run, and the
steps inherit this process's environment (MLFLOW_TRACKING_URI and credentials, if set).
Outputs land under `<pipeline_root>/iagn-<timestamp>/<task>/<output>`.

kfp.local prints everything to stdout: its own log lines, each task's executor input as
JSON and the task's output. run-local sends all of it to a log file instead and shows a
line as each task starts and ends, training progress and a failing task's last lines.

`--runner docker` runs every task in the component image with kfp.local's DockerRunner
instead; what that takes is in pipeline/containers.py.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import re
import secrets
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from iagn.provenance import ENV_PIPELINE_RUN
from pipeline.warm import Zygote, as_python

if TYPE_CHECKING:  # pipeline.dag imports kfp: run-local imports it after starting the zygote
    from pipeline.containers import ContainerRun
    from pipeline.dag import CompileOptions

DEFAULT_ROOT = "build/kfp"
# kfp.local's log lines (colours stripped) that start and end a task.
TASK_STARTED = re.compile(r"Executing task '(?P<task>[^']+)'")
TASK_FINISHED = re.compile(r"Task '(?P<task>[^']+)' finished with status (?P<status>[A-Z]+)")
# A task's output that is kfp's, not the task's: kfp.local's and the executor's INFO lines,
# and the Docker runner's line about the image.
KFP_LINE = re.compile(
    r"^(\d\d:\d\d:\d\d\.\d+ - [A-Z]+ - |\[KFP Executor [^\]]* INFO\]: |Found image ')"
)
EXECUTOR_INPUT = "Got executor_input:"  # the executor's line before the JSON
# The training loop's line per epoch (`stage 1 epoch 1/2: loss ...`), not its tqdm bar's
# updates (`stage 1 epoch 1/2:  33%|...`), which the task's output also holds.
PROGRESS = re.compile(r"\bepoch \d+/\d+: loss\b")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
TAIL_LINES = 30


@dataclass
class LocalRun:
    key: str  # IAGN_PIPELINE_RUN: the MLflow parent run's key
    run_dir: Path | None
    succeeded: bool
    error: str = ""
    seconds: float = 0.0
    outputs: dict[str, Any] = field(default_factory=dict)
    log: Path | None = None


def pipeline_key() -> str:
    """This run's IAGN_PIPELINE_RUN: the environment's, else a new one, exported for the tasks.

    Set before the preloaded interpreter starts, so that its environment is the tasks'.
    """
    key = os.environ.get(ENV_PIPELINE_RUN, "").strip()
    if not key:
        key = f"kfp-local-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
    os.environ[ENV_PIPELINE_RUN] = key
    return key


def log_path(pipeline_root: str | os.PathLike, key: str) -> Path:
    """`<pipeline_root>/logs/<pipeline key>.log`: beside the outputs, named like MLflow's key."""
    return Path(pipeline_root).resolve() / "logs" / (re.sub(r"[^\w.-]", "_", key) + ".log")


def task_names(pipeline_spec) -> dict[str, str]:
    """Every task that runs a component (nested DAGs included) -> its display name."""
    components = dict(pipeline_spec.components)
    names: dict[str, str] = {}

    def walk(dag) -> None:
        for name, task in dag.tasks.items():
            component = components[task.component_ref.name]
            if component.WhichOneof("implementation") == "dag":
                walk(component.dag)
            else:
                names[name] = task.task_info.name

    walk(pipeline_spec.root.dag)
    return names


def task_count(pipeline_spec, arguments: dict[str, Any]) -> int:
    """How many task runs to expect: a ParallelFor's tasks once per item of its list
    (a pipeline parameter, as given in `arguments` or by its default)."""
    from google.protobuf import json_format

    components = dict(pipeline_spec.components)
    defaults = {
        name: json_format.MessageToDict(spec.default_value)
        for name, spec in pipeline_spec.root.input_definitions.parameters.items()
    }

    def items(task) -> int:
        if not task.HasField("parameter_iterator"):
            return 1
        source = task.parameter_iterator.items.input_parameter.removeprefix("pipelinechannel--")
        value = arguments.get(source, defaults.get(source))
        return len(value) if isinstance(value, list) else 1

    def walk(dag) -> int:
        count = 0
        for task in dag.tasks.values():
            component = components[task.component_ref.name]
            inner = walk(component.dag) if component.WhichOneof("implementation") == "dag" else 1
            count += inner * items(task)
        return count

    return walk(pipeline_spec.root.dag)


class RunLog(io.TextIOBase):
    """kfp.local's stdout and stderr during a run: all of it into the log file, and to the
    console a line as each task starts and ends (status, seconds), the training loop's
    epoch lines and a failing task's last lines. With `verbose` the console gets everything,
    as kfp.local prints it. On a terminal a tqdm bar counts the tasks and shows how long the
    running one has taken.
    """

    def __init__(self, path: Path, console: TextIO, verbose: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = path.open("a", encoding="utf-8", buffering=1)  # whole lines, for tail -f
        self.console = console
        self.verbose = verbose
        self.names: dict[str, str] = {}
        self._pending = ""
        # Tasks running now, in the order they started: a sweep's trials run side by side,
        # each with the same task names (kfp.local names no iteration in its lines).
        self._running: list[tuple[str, float]] = []
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._input_end: str | None = None  # inside the executor input: its last line
        self._bar = None
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()

    # --- the stream kfp.local writes to ---

    @property
    def encoding(self) -> str:
        return "utf-8"

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.verbose:
            self.console.write(text)
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            line = ANSI.sub("", line)  # whole lines: a colour code may come in two pieces
            self.file.write(line + "\n")
            self._line(line)
        return len(text)

    def flush(self) -> None:
        self.file.flush()
        self.console.flush()

    def close(self) -> None:
        if not self.closed:
            self.file.write(ANSI.sub("", self._pending))
            super().close()  # flushes
            self.file.close()

    # --- the console ---

    @property
    def _task(self) -> str | None:
        """Whose output the lines are: the task started last of those running (with tasks
        side by side, their lines interleave and cannot be told apart)."""
        return self._running[-1][0] if self._running else None

    def watch(self, names: dict[str, str], total: int | None = None) -> None:
        """The tasks to expect (`total` task runs: a loop runs its tasks once per item); on
        a terminal, start the bar."""
        self.names = names
        if self.verbose or not self.console.isatty():
            return
        from tqdm import tqdm

        self._bar = tqdm(
            total=total or len(names),
            file=self.console,
            unit="task",
            leave=False,
            dynamic_ncols=True,
            bar_format="{n}/{total} tasks |{bar}| {elapsed}{postfix}",
        )
        self._stop.clear()
        self._ticker = threading.Thread(target=self._tick, args=(self._bar,), daemon=True)
        self._ticker.start()

    def unwatch(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _tick(self, bar) -> None:
        # tqdm redraws only when told: once a second, so that the running task's clock moves.
        while not self._stop.wait(1):
            self._show_running(bar)

    def _show_running(self, bar) -> None:
        now = time.monotonic()
        running = list(self._running)
        bar.set_postfix_str(", ".join(f"{task} {now - t:.0f} s" for task, t in running))

    def say(self, text: str) -> None:
        if self.verbose:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.console)
        else:
            print(text, file=self.console, flush=True)

    # --- what the lines mean ---

    def _line(self, line: str) -> None:
        if found := TASK_STARTED.search(line):
            self._started(found["task"])
        elif found := TASK_FINISHED.search(line):
            self._finished(found["task"], found["status"])
        elif self._task is not None:
            # kfp.local indents a task's output by 4; a tqdm bar's updates end in \r.
            self._output(line.removeprefix("    ").rsplit("\r", 1)[-1].rstrip())

    def _started(self, task: str) -> None:
        if not self._running:
            self._tail.clear()
        self._running.append((task, time.monotonic()))
        self._input_end = None
        self.say(f"  {'started':<8} {task:<22} {self.names.get(task, '')}")

    def _finished(self, task: str, status: str) -> None:
        # The earliest started of that name (which of two same-named tasks ended is unknown).
        index = next((i for i, (name, _) in enumerate(self._running) if name == task), None)
        started = self._running.pop(index)[1] if index is not None else time.monotonic()
        seconds = time.monotonic() - started
        self.say(f"  {status:<8} {task:<22} {seconds:.1f} s")
        if status != "SUCCESS" and self._tail:
            beside = " and the tasks beside it" if self._running else ""
            self.say(f"  {'':<8} the last lines of {task}'s output{beside} (all of it in the log):")
            for line in self._tail:
                self.say(f"  {'':<8} | {line}")
        if not self._running:
            self._tail.clear()
        if self._bar is not None:
            self._show_running(self._bar)
            self._bar.update(1)

    def _output(self, line: str) -> None:
        if self._input_end is not None:  # the executor input's JSON: noise in a tail
            if self._input_end == "":
                self._input_end = line.replace("{", "}", 1) if line.strip() == "{" else None
            elif line == self._input_end:
                self._input_end = None
            return
        if line.endswith(EXECUTOR_INPUT):
            self._input_end = ""
        elif line.strip() and not KFP_LINE.match(line):
            self._tail.append(line)
            if PROGRESS.search(line):
                # Side by side, the line's task is unknown: the line names its stage itself.
                task = self._task if len(self._running) == 1 else ""
                self.say(f"  {'':<8} {task:<22} {line.strip()}")


def _newest_run_dir(root: Path, started: float) -> Path | None:
    from pipeline.dag import PIPELINE_NAME

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
    log: RunLog | None = None,
    containers: ContainerRun | None = None,
    build: Callable[[], Any] | None = None,
) -> LocalRun:
    """Run the pipeline locally; kfp.local's output goes to `log` (default: a RunLog under
    `pipeline_root`/logs, task lines on stdout).

    `build`: makes the pipeline to run (default: the main DAG of pipeline/dag.py for
    `options`; a sweep passes its own, pipeline/sweep_dag.py).

    `zygote`: tasks start as forks of this process that has imported torch, MLflow and iagn
    already (pipeline/warm.py); None: each task is a fresh interpreter.
    `containers` (pipeline.containers.prepare): every task runs in that image instead, with
    its arguments (`data_repo`, `data_rev` resolved), mounts and environment.
    """
    from kfp import local

    from pipeline.dag import CompileOptions, build_pipeline

    # A working copy does not fail transiently: a retry would only repeat the error later.
    options = options or CompileOptions(retries=False)
    key = pipeline_key()
    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    own_log = log is None
    if log is None:
        log = RunLog(log_path(root, key), sys.stdout)
    if containers is not None:
        from pipeline.containers import pin_image

        runner = containers.runner()
        arguments = containers.arguments
    else:
        runner = local.SubprocessRunner(use_venv=False)
    local.init(runner=runner, pipeline_root=str(root), raise_on_error=True)
    pipeline = build() if build is not None else build_pipeline(options)
    if containers is not None:
        pin_image(pipeline, containers.image)
    started = time.time()
    error = ""
    real_print = builtins.print
    python = zygote.client() if zygote is not None else None
    if zygote is not None and python is None:
        print(
            f"iagn-pipeline: note: the preloaded interpreter failed (see {log.path}); "
            "every task imports torch, MLflow and iagn itself"
        )
    log.watch(task_names(pipeline.pipeline_spec), task_count(pipeline.pipeline_spec, arguments))
    proxy = contextlib.nullcontext()
    if containers is not None:
        from pipeline.containers import ApiProxy

        proxy = ApiProxy(containers.base_url, key)
    try:
        with (
            proxy,
            as_python(python),
            warnings.catch_warnings(),
            contextlib.redirect_stdout(log),
            contextlib.redirect_stderr(log),
        ):
            # Expected locally, and said once in this module's doc: the image is not used and
            # cluster settings (display names, accelerators) have no local effect.
            warnings.filterwarnings("ignore", message=".*non-Python base image.*")
            warnings.filterwarnings(
                "ignore", message=r"Task .* have no effect in the current local"
            )
            try:
                pipeline(**arguments)
            except RuntimeError as exc:  # kfp.local: "Pipeline iagn finished with status FAILURE"
                error = ANSI.sub("", str(exc))
    finally:
        # kfp.local indents a task's lines by swapping builtins.print in and out; tasks side
        # by side (a sweep's trials) can leave its indenting print in place for good.
        builtins.print = real_print
        log.unwatch()
        if own_log:
            log.close()
        else:
            log.flush()
    run = LocalRun(
        key=key,
        run_dir=_newest_run_dir(root, started),
        succeeded=not error,
        error=error,
        seconds=time.time() - started,
        log=log.path,
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
    for sweep in run_dir.glob("pick-best/result/sweep.json"):
        try:
            found["sweep"] = json.loads(sweep.read_text())
            found["sweep_folder"] = sweep.parent
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


def shown_path(path: Path) -> str:
    """`path` relative to the working directory when it is inside it."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def mlflow_ui(uri: str) -> str:
    """How to look at the runs in `uri` (scrubbed of credentials)."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}  (in {Path.cwd()})"


def _sweep_lines(outputs: dict[str, Any]) -> list[str]:
    """A sweep's winner and where its summary is (pipeline/sweep_dag.py)."""
    sweep = outputs.get("sweep")
    if not sweep:
        return []
    best = next((t for t in sweep["trials"] if t["trial"] == sweep["best_trial"]), {})
    value = best.get("metrics", {}).get(sweep.get("metric", ""), float("nan"))
    overrides = ", ".join(
        f"{k}={json.dumps(v)}" for k, v in sweep.get("best_overrides", {}).items()
    )
    return [
        f"  sweep            {sweep['sweep_id']}: {len(sweep['trials'])} trials; best "
        f"{sweep['best_trial']} ({overrides}), {sweep.get('metric')} {value:.4g}",
        f"  sweep summary    {outputs['sweep_folder']}/summary.md, summary.png (MLflow: "
        "sweep/ on the parent run)",
    ]


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
    lines += _sweep_lines(outputs)
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
                if outcome.get("card"):
                    lines.append(
                        f"  model card       {shown_path(Path(outcome['card']))}  (`iagn models "
                        f"card {uri.removeprefix('models:/')}`; MLflow: the version's Model "
                        "card link)"
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
    if run.log is not None:
        lines.append(f"  log              {shown_path(run.log)}")
    if not run.succeeded:
        lines.append(f"  error            {run.error}")
        lines.append("  -> the failing task's last lines are above, all of them in the log")
    return "\n".join(lines)
