"""The IAGN pipeline as a KFP v2 DAG.

    resolve data revision -> fetch data (DVC) -> validate data -> train stage 1 -> 2 -> 3
      -> distill student ---------> evaluate student --+
      -> evaluate teacher -------------------------------+-> [gate: student passes] register
    all inside an ExitHandler whose exit task marks the MLflow parent run FAILED on failure

What is a pipeline parameter (chosen per run) and what is fixed at compile time:

* parameters: data_repo, data_rev, params_overrides (dotted params.yaml keys -> values),
  tracking_uri, experiment, model_name, image, node_selector, tolerations; with `--gpu`
  also accelerator_type and gpu_count (0 turns the GPU request off for a run; more than one
  runs the step under torchrun, a process per GPU); with `--nodes N` (N > 1) also nodes:
  training and distillation then launch Kubeflow Trainer TrainJobs of that many nodes.
* compile time (CompileOptions / `iagn-pipeline compile` flags): the defaults of those
  parameters, whether training and distillation request an accelerator at all (KFP cannot
  add or drop a resource request from a boolean parameter), the Kubernetes secret the
  credentials come from, and the retry policy.

Credentials never are parameters: every task reads them from the secret as environment
variables (kfp-kubernetes `use_secret_as_env`). Every task also gets KFP_RUN_ID from its
pod's `pipeline/runid` label, the key under which `iagn.tracking` finds or creates the
run's MLflow parent; a label rather than a task input, so that the run id does not enter
KFP's cache keys and an unchanged step is reused across runs.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kfp.dsl import PipelineTask

from iagn.provenance import ENV_KFP_RUN as RUN_ID_ENV

# The secret's keys, each exposed as the environment variable of the same name: one list for
# the pipeline's tasks and a TrainJob's nodes.
from iagn.trainjob.manifest import SECRET_KEYS_OPTIONAL, SECRET_KEYS_REQUIRED

PIPELINE_NAME = "iagn"
DEFAULT_SECRET = "iagn-credentials"
DEFAULT_ACCELERATOR = "nvidia.com/gpu"
# The usual taint of GPU node pools (GKE, EKS, the NVIDIA GPU operator).
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
RUN_ID_FIELD = "metadata.labels['pipeline/runid']"
FETCH_RETRIES = 3
REGISTER_RETRIES = 2
RETRY_BACKOFF = "30s"
RETRY_BACKOFF_MAX = "600s"


@dataclass
class CompileOptions:
    """Compile-time choices; the `default_*` values become the parameters' defaults."""

    image: str = ""  # "" = components.image.IMAGE ($IAGN_IMAGE or the default)
    gpu: bool = False
    accelerator: str = DEFAULT_ACCELERATOR
    gpus: int = 1
    nodes: int = 1  # > 1: training and distillation run as Kubeflow Trainer TrainJobs
    shared_volume: str = ""  # a PVC the TrainJob launchers mount (distributed.storage_uri pvc://)
    secret: str = DEFAULT_SECRET  # "" = no secret (e.g. a cluster with workload identity)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    data_repo: str = ""
    data_rev: str = ""
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI of the step (the secret may set it)
    experiment: str = ""  # "" = $MLFLOW_EXPERIMENT_NAME of the step, else `iagn`
    retries: bool = True  # run-local turns them off: a working copy does not fail transiently

    def resolved_tolerations(self) -> list[dict[str, Any]]:
        if self.gpu and GPU_TOLERATION not in self.tolerations:
            return [*self.tolerations, GPU_TOLERATION]
        return list(self.tolerations)


def _cluster_settings(
    task: PipelineTask, options: CompileOptions, display_name: str, cache: bool, image: Any
) -> PipelineTask:
    """What every task gets: a name, caching, its image, the run id and the credentials."""
    from kfp import kubernetes

    task.set_display_name(display_name)
    task.set_caching_options(enable_caching=cache)
    task.set_container_image(image)
    kubernetes.use_field_path_as_env(task, RUN_ID_ENV, RUN_ID_FIELD)
    if options.secret:
        kubernetes.use_secret_as_env(
            task, options.secret, {key: key for key in SECRET_KEYS_REQUIRED}
        )
        kubernetes.use_secret_as_env(
            task, options.secret, {key: key for key in SECRET_KEYS_OPTIONAL}, optional=True
        )
    return task


def _retry(task: PipelineTask, options: CompileOptions, retries: int) -> PipelineTask:
    if options.retries:
        task.set_retry(
            num_retries=retries,
            backoff_duration=RETRY_BACKOFF,
            backoff_factor=2.0,
            backoff_max_duration=RETRY_BACKOFF_MAX,
        )
    return task


def _placement(
    task: PipelineTask,
    node_selector: Any,
    tolerations: Any,
    accelerator_type: Any = None,
    gpu_count: Any = None,
) -> PipelineTask:
    """Training and distillation: the node pool and, when compiled with --gpu, the GPU."""
    from kfp import kubernetes

    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration_json(task, tolerations)
    if accelerator_type is not None:
        task.set_accelerator_type(accelerator_type)
        task.set_accelerator_limit(gpu_count)
    return task


class Tasks:
    """What every task of a DAG gets, for the pipeline's parameters `p` (channels): the
    cluster settings, the GPU steps' placement, retries, and the MLflow inputs."""

    def __init__(self, options: CompileOptions, p: dict[str, Any]) -> None:
        self.options = options
        self.p = p
        self.tracking = {"tracking_uri": p["tracking_uri"], "experiment": p["experiment"]}

    def settings(self, task: PipelineTask, name: str, cache: bool = True) -> PipelineTask:
        return _cluster_settings(task, self.options, name, cache, self.p["image"])

    def scale(self) -> dict[str, Any]:
        """Inputs of the training and distillation tasks that set their scale: the GPUs a
        task (or each node) gets and the nodes, from the pipeline's parameters. None without
        --gpu and --nodes: the tasks read params.yaml's `distributed:` alone."""
        p, options = self.p, self.options
        scale: dict[str, Any] = {}
        if options.gpu:
            scale.update(gpus=p["gpu_count"], accelerator=p["accelerator_type"])
        if options.nodes > 1:
            # A TrainJob runs the pipeline's image with the pipeline's secret.
            scale.update(nodes=p["nodes"], image=p["image"], secret=options.secret)
            scale.update(node_selector=p["node_selector"], tolerations=p["tolerations"])
        return scale

    def place(self, task: PipelineTask) -> PipelineTask:
        p = self.p
        if self.options.nodes > 1:  # the task only launches the TrainJob: no GPU, any node
            claim = self.options.shared_volume
            if claim:  # where pvc://CLAIM/... storage is, on the launcher as on the nodes
                from kfp import kubernetes

                from iagn.trainjob.names import SHARED_ROOT

                kubernetes.mount_pvc(task, pvc_name=claim, mount_path=f"{SHARED_ROOT}/{claim}")
            return task
        return _placement(
            task,
            p["node_selector"],
            p["tolerations"],
            p.get("accelerator_type"),
            p.get("gpu_count"),
        )

    def retry(self, task: PipelineTask, retries: int) -> PipelineTask:
        return _retry(task, self.options, retries)

    def exit_handler(self):
        """The steps' group: when it ends, the exit task ends the MLflow parent run."""
        from kfp import dsl

        from components.on_exit import record_outcome

        on_exit = self.settings(
            record_outcome(**self.tracking), "record outcome in MLflow", cache=False
        )
        self.retry(on_exit, REGISTER_RETRIES)
        return dsl.ExitHandler(on_exit, name="iagn-steps")


def fetch_and_validate(t: Tasks) -> tuple[PipelineTask, dict[str, Any], PipelineTask]:
    """resolve revision -> fetch data (DVC) -> validate: (fetch, its outputs, validate)."""
    from components.fetch_data import fetch_data, resolve_data_revision
    from components.validate import validate

    p = t.p
    revision = resolve_data_revision(data_repo=p["data_repo"], data_rev=p["data_rev"])
    # Never cached: a branch moves; fetch-data below is keyed on the commit instead.
    t.retry(t.settings(revision, "resolve data revision", cache=False), FETCH_RETRIES)
    fetch = fetch_data(
        data_repo=p["data_repo"], revision=revision.output, params_overrides=p["params_overrides"]
    )
    t.retry(t.settings(fetch, "fetch data (DVC)"), FETCH_RETRIES)
    data = {"dataset": fetch.outputs["dataset"], "params": fetch.outputs["params"]}
    check = t.settings(validate(**data, **t.tracking), "validate data")
    return fetch, data, check


def train_and_distill(
    t: Tasks, data: dict[str, Any], check: PipelineTask
) -> tuple[Any, PipelineTask]:
    """Stages 1 -> 2 -> 3 (stage 1 waits for the validation verdict), then distill:
    (the teacher, the distill task)."""
    from components.distill import distill
    from components.train_stage import train_stage

    init = None
    for stage in (1, 2, 3):
        previous = {} if init is None else {"init": init}  # stage 1 starts from scratch
        task = train_stage(stage=stage, **data, **t.tracking, **previous, **t.scale())
        if stage == 1:
            task.after(check)  # the validation verdict gates training
        t.place(t.settings(task, f"train stage {stage}"))
        init = task.outputs["model"]
    student = distill(teacher=init, **data, **t.tracking, **t.scale())
    t.place(t.settings(student, "distill student"))
    return init, student


def judge_and_register(
    t: Tasks, teacher: Any, student: Any, data: dict[str, Any], may_promote: bool = True
) -> None:
    """Evaluate teacher and student, then [gate: the student passes] register."""
    from kfp import dsl

    from components.evaluate import evaluate
    from components.register import register

    teacher_eval = t.settings(
        evaluate(model=teacher, **data, **t.tracking), "evaluate teacher (stage 3)"
    )
    student_eval = t.settings(evaluate(model=student, **data, **t.tracking), "evaluate student")
    # Only a sweep says may_promote (False): the main pipeline's spec stays as it was.
    promote = {} if may_promote else {"may_promote": False}
    with dsl.If(student_eval.outputs["Output"] == "passed", name="registry-gate"):
        registered = register(
            student=student,
            student_evaluation=student_eval.outputs["evaluation"],
            teacher=teacher,
            teacher_evaluation=teacher_eval.outputs["evaluation"],
            params=data["params"],
            model_name=t.p["model_name"],
            **promote,
            **t.tracking,
        )
        # Never cached: the registry's state (the current champion) is an input too.
        t.retry(t.settings(registered, "register model", cache=False), REGISTER_RETRIES)


def _steps(options: CompileOptions, p: dict[str, Any]) -> None:
    """The DAG; `p` holds the pipeline's parameters (channels)."""
    t = Tasks(options, p)
    with t.exit_handler():
        _, data, check = fetch_and_validate(t)
        teacher, student = train_and_distill(t, data, check)
        judge_and_register(t, teacher, student.outputs["student"], data)


def pipeline_parameters(options: CompileOptions | None = None) -> list[tuple[str, type, Any]]:
    """The pipeline's parameters as (name, type, default) for these compile-time options."""
    from components.image import IMAGE

    options = options or CompileOptions()
    parameters = [
        ("data_repo", str, options.data_repo),
        ("data_rev", str, options.data_rev),
        ("params_overrides", dict, {}),
        ("tracking_uri", str, options.tracking_uri),
        ("experiment", str, options.experiment),
        ("model_name", str, ""),
        ("image", str, options.image or IMAGE),
        ("node_selector", dict, dict(options.node_selector)),
        ("tolerations", list, options.resolved_tolerations()),
    ]
    if options.gpu:
        parameters += [
            ("accelerator_type", str, options.accelerator),
            ("gpu_count", int, options.gpus),
        ]
    if options.nodes > 1:
        parameters.append(("nodes", int, options.nodes))
    return parameters


def make_pipeline(
    name: str,
    description: str,
    parameters: list[tuple[str, type, Any]],
    body: Callable[[dict[str, Any]], None],
):
    """A KFP pipeline (GraphComponent) with `parameters`, whose DAG `body(p)` builds from
    the parameters' channels `p` (by name).

    KFP reads a pipeline's parameters from its function's signature, so the function gets
    one made from `parameters` (types, not strings: the annotations must be real types).
    """
    from kfp import dsl

    names = [parameter for parameter, _, _ in parameters]

    def pipeline_function(*channels):
        body(dict(zip(names, channels, strict=True)))

    pipeline_function.__signature__ = inspect.Signature(
        [
            inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d, annotation=k)
            for n, k, d in parameters
        ]
    )
    pipeline_function.__name__ = name.replace("-", "_") + "_pipeline"
    return dsl.pipeline(name=name, description=description)(pipeline_function)


def build_pipeline(options: CompileOptions | None = None):
    """The pipeline (a KFP GraphComponent) for these compile-time options."""
    options = options or CompileOptions()
    description = (
        "IAGN: fetch data (DVC), validate, train stages 1-3, distill, evaluate, gate, register "
        "(MLflow)"
        + (f"; GPU steps request {options.accelerator}" if options.gpu else "")
        + (f"; training runs as {options.nodes}-node TrainJobs" if options.nodes > 1 else "")
    )
    return make_pipeline(
        PIPELINE_NAME,
        description,
        pipeline_parameters(options),
        lambda p: _steps(options, p),
    )


def parameter_names(options: CompileOptions | None = None) -> list[str]:
    """The pipeline's parameter names (what `--param name=value` may set besides params keys)."""
    return [name for name, _, _ in pipeline_parameters(options)]


def compile_pipeline(path: str, options: CompileOptions | None = None) -> str:
    """Write the pipeline's IR YAML (pipeline spec + Kubernetes platform spec) to `path`."""
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(options), path)
    return path
