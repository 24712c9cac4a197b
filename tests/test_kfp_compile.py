"""The compiled pipeline, read back through kfp's own pipeline-spec protos.

One compile in process (the defaults) and one through the `iagn-pipeline compile` command
(GPU, image, node selector, toleration): DAG edges, display names, the exit handler and the
gate, caching and retries, secrets as environment variables, the run id from the pod label,
and accelerator requests driven by runtime parameters.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT
from google.protobuf import json_format
from helpers import BIN, run
from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s
from kfp.pipeline_spec import pipeline_spec_pb2 as spec_pb2

from pipeline.dag import (
    RUN_ID_ENV,
    RUN_ID_FIELD,
    SECRET_KEYS_OPTIONAL,
    SECRET_KEYS_REQUIRED,
    compile_pipeline,
)

TEST_IMAGE = "registry.example.com/ml/iagn:test"
STEPS = "comp-exit-handler-1"
GATE = "comp-condition-2"
TRAINING_EXECUTORS = ("exec-train-stage", "exec-train-stage-2", "exec-train-stage-3")
GPU_EXECUTORS = (*TRAINING_EXECUTORS, "exec-distill")
ALL_UPSTREAM = spec_pb2.PipelineTaskSpec.TriggerPolicy.TriggerStrategy.ALL_UPSTREAM_TASKS_COMPLETED


class Compiled:
    """A compiled YAML as kfp's PipelineSpec and the Kubernetes executor configs."""

    def __init__(self, path: Path):
        documents = list(yaml.safe_load_all(path.read_text()))
        assert len(documents) == 2, "pipeline spec + platform spec"
        self.spec = json_format.ParseDict(documents[0], spec_pb2.PipelineSpec())
        self.platform = json_format.ParseDict(documents[1], spec_pb2.PlatformSpec())
        deployment = self.platform.platforms["kubernetes"].deployment_spec
        self.k8s = {
            name: json_format.ParseDict(
                json_format.MessageToDict(config), k8s.KubernetesExecutorConfig()
            )
            for name, config in deployment.executors.items()
        }
        self.executors = {
            name: json_format.ParseDict(
                json_format.MessageToDict(value),
                spec_pb2.PipelineDeploymentConfig.ExecutorSpec(),
            )
            for name, value in self.spec.deployment_spec.fields[
                "executors"
            ].struct_value.fields.items()
        }

    def tasks(self, component: str | None = None) -> dict:
        dag = self.spec.root.dag if component is None else self.spec.components[component].dag
        return dict(dag.tasks)

    def all_tasks(self) -> dict:
        return {**self.tasks(), **self.tasks(STEPS), **self.tasks(GATE)}

    def parameter_default(self, name: str):
        value = self.spec.root.input_definitions.parameters[name].default_value
        return json_format.MessageToDict(value)


def upstream(task) -> set[str]:
    """Every task this one waits for: explicit `.after`, and producers of its inputs."""
    found = set(task.dependent_tasks)
    for value in task.inputs.artifacts.values():
        if value.HasField("task_output_artifact"):
            found.add(value.task_output_artifact.producer_task)
    for value in task.inputs.parameters.values():
        if value.HasField("task_output_parameter"):
            found.add(value.task_output_parameter.producer_task)
    return found


@pytest.fixture(scope="module")
def default(tmp_path_factory) -> Compiled:
    path = tmp_path_factory.mktemp("compile") / "iagn_pipeline.yaml"
    compile_pipeline(str(path))
    return Compiled(path)


@pytest.fixture(scope="module")
def gpu(tmp_path_factory) -> Compiled:
    """Through the console script, as people run it."""
    path = tmp_path_factory.mktemp("compile-gpu") / "gpu.yaml"
    result = run(
        [
            BIN / "iagn-pipeline",
            "compile",
            "-o",
            path,
            "--gpu",
            "--gpus",
            "2",
            "--image",
            TEST_IMAGE,
            "--node-selector",
            "cloud.google.com/gke-accelerator=nvidia-tesla-a100",
            "--toleration",
            "dedicated=ml:NoSchedule",
        ],
        cwd=REPO_ROOT,
    )
    assert "GPU steps request nvidia.com/gpu" in result.stdout
    return Compiled(path)


def test_dag_edges_display_names_exit_handler_and_gate(default: Compiled):
    root = default.tasks()
    assert set(root) == {"exit-handler-1", "record-outcome"}
    exit_task = root["record-outcome"]
    assert exit_task.trigger_policy.strategy == ALL_UPSTREAM
    assert exit_task.dependent_tasks == ["exit-handler-1"]
    assert exit_task.inputs.parameters["status"].task_final_status.producer_task == (
        "exit-handler-1"
    )

    steps = default.tasks(STEPS)
    edges = {name: upstream(task) for name, task in steps.items()}
    assert edges == {
        "resolve-data-revision": set(),
        "fetch-data": {"resolve-data-revision"},
        "validate": {"fetch-data"},
        "train-stage": {"fetch-data", "validate"},
        "train-stage-2": {"fetch-data", "train-stage"},
        "train-stage-3": {"fetch-data", "train-stage-2"},
        "distill": {"fetch-data", "train-stage-3"},
        "evaluate": {"fetch-data", "train-stage-3"},
        "evaluate-2": {"fetch-data", "distill"},
        "condition-2": {"fetch-data", "train-stage-3", "distill", "evaluate", "evaluate-2"},
    }
    # Which model each evaluation and the gate read.
    assert steps["evaluate"].inputs.artifacts["model"].task_output_artifact.producer_task == (
        "train-stage-3"
    )
    assert steps["evaluate-2"].inputs.artifacts["model"].task_output_artifact.producer_task == (
        "distill"
    )
    condition = steps["condition-2"].trigger_policy.condition
    assert "pipelinechannel--evaluate-2-Output" in condition and "'passed'" in condition
    gate = default.tasks(GATE)
    assert set(gate) == {"register"}
    assert set(gate["register"].inputs.artifacts) == {
        "student",
        "student_evaluation",
        "teacher",
        "teacher_evaluation",
        "params",
    }

    names = {name: task.task_info.name for name, task in default.all_tasks().items()}
    assert names["train-stage-2"] == "train stage 2"
    assert names["evaluate"] == "evaluate teacher (stage 3)"
    assert names["evaluate-2"] == "evaluate student"
    assert names["register"] == "register model"
    for name, display in names.items():
        if name not in ("exit-handler-1", "condition-2"):
            assert display != name, f"task {name} has no display name"


def test_caching_and_retries(default: Compiled):
    tasks = default.all_tasks()
    uncached = {"resolve-data-revision", "register", "record-outcome"}
    for name in (
        *uncached,
        "fetch-data",
        "validate",
        "train-stage",
        "train-stage-3",
        "distill",
        "evaluate",
        "evaluate-2",
    ):
        assert tasks[name].caching_options.enable_cache is (name not in uncached), name
    retries = {name: task.retry_policy.max_retry_count for name, task in tasks.items()}
    assert retries["resolve-data-revision"] == retries["fetch-data"] == 3
    assert retries["register"] == 2 and retries["record-outcome"] == 2
    assert retries["train-stage"] == retries["distill"] == retries["evaluate"] == 0
    policy = tasks["fetch-data"].retry_policy
    assert policy.backoff_duration.seconds == 30 and policy.backoff_factor == 2.0


def test_credentials_come_from_the_secret_never_from_parameters(default: Compiled):
    parameters = set(default.spec.root.input_definitions.parameters)
    assert parameters == {
        "data_repo",
        "data_rev",
        "params_overrides",
        "tracking_uri",
        "experiment",
        "model_name",
        "image",
        "node_selector",
        "tolerations",
    }
    assert not {p for p in parameters if any(w in p for w in ("password", "secret", "token"))}
    assert set(default.k8s) == set(default.executors)
    for name, config in default.k8s.items():
        blocks = {block.optional: block for block in config.secret_as_env}
        assert set(blocks) == {False, True}, name
        for optional, keys in ((False, SECRET_KEYS_REQUIRED), (True, SECRET_KEYS_OPTIONAL)):
            block = blocks[optional]
            assert block.secret_name_parameter.runtime_value.constant.string_value == (
                "iagn-credentials"
            )
            assert {(e.secret_key, e.env_var) for e in block.key_to_env} == {
                (key, key) for key in keys
            }
        assert [(e.name, e.field_path) for e in config.field_path_as_env] == [
            (RUN_ID_ENV, RUN_ID_FIELD)
        ]


def test_cpu_pipeline_requests_no_accelerator(default: Compiled):
    for name, executor in default.executors.items():
        assert not executor.container.resources.HasField("accelerator"), name
        assert executor.container.image == "{{$.inputs.parameters['pipelinechannel--image']}}"
        # install_kfp_package=False and no packages_to_install: nothing is pip-installed.
        assert "pip install" not in " ".join(executor.container.command), name
    assert default.parameter_default("image") == "ghcr.io/iagn/iagn:0.1.0"
    assert default.parameter_default("tolerations") == []
    for name in GPU_EXECUTORS:
        config = default.k8s[name]
        assert config.node_selector.node_selector_json.component_input_parameter
        assert [t.toleration_json.component_input_parameter for t in config.tolerations]
    assert not default.k8s["exec-evaluate"].HasField("node_selector")


def test_gpu_pipeline_requests_accelerators_from_runtime_parameters(gpu: Compiled):
    for name, executor in gpu.executors.items():
        accelerator = executor.container.resources.accelerator
        if name in GPU_EXECUTORS:
            assert "pipelinechannel--accelerator_type" in accelerator.resource_type, name
            assert "pipelinechannel--gpu_count" in accelerator.resource_count, name
        else:
            assert not executor.container.resources.HasField("accelerator"), name
    assert gpu.parameter_default("accelerator_type") == "nvidia.com/gpu"
    assert gpu.parameter_default("gpu_count") == 2
    assert gpu.parameter_default("image") == TEST_IMAGE
    assert gpu.parameter_default("node_selector") == {
        "cloud.google.com/gke-accelerator": "nvidia-tesla-a100"
    }
    assert gpu.parameter_default("tolerations") == [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
    ]
    train = gpu.tasks(STEPS)["train-stage"]
    assert train.inputs.parameters["pipelinechannel--gpu_count"].component_input_parameter == (
        "pipelinechannel--gpu_count"
    )


def test_gpu_steps_get_their_gpu_count_as_processes(gpu: Compiled, default: Compiled):
    """A training task given gpu_count GPUs runs a process per GPU (torchrun in its pod)."""
    for task in ("train-stage", "train-stage-2", "train-stage-3", "distill"):
        inputs = gpu.tasks(STEPS)[task].inputs.parameters
        assert inputs["gpus"].component_input_parameter == "pipelinechannel--gpu_count", task
        assert "nodes" not in inputs and "image" not in inputs, task
        assert "gpus" not in default.tasks(STEPS)[task].inputs.parameters, task


@pytest.fixture(scope="module")
def multinode(tmp_path_factory) -> Compiled:
    path = tmp_path_factory.mktemp("compile-nodes") / "nodes.yaml"
    argv = ["compile", "-o", path, "--gpu", "--gpus", "4", "--nodes", "2", "--image", TEST_IMAGE]
    argv += ["--shared-volume", "trainjobs"]
    result = run([BIN / "iagn-pipeline", *argv], cwd=REPO_ROOT)
    assert "training runs as 2-node TrainJobs" in result.stdout
    return Compiled(path)


def test_several_nodes_make_the_training_tasks_trainjob_launchers(multinode: Compiled):
    assert multinode.parameter_default("nodes") == 2
    assert multinode.parameter_default("gpu_count") == 4
    for task in ("train-stage", "train-stage-2", "train-stage-3", "distill"):
        inputs = multinode.tasks(STEPS)[task].inputs.parameters
        wired = {name: inputs[name].component_input_parameter for name in ("nodes", "gpus")}
        assert wired == {"nodes": "pipelinechannel--nodes", "gpus": "pipelinechannel--gpu_count"}
        assert inputs["image"].component_input_parameter == "pipelinechannel--image"
        assert inputs["secret"].runtime_value.constant.string_value == "iagn-credentials"
        # The GPU pool's placement goes to the TrainJob's nodes.
        for name in ("node_selector", "tolerations"):
            assert inputs[name].component_input_parameter == f"pipelinechannel--{name}"
    # The launchers hold no GPU (the TrainJob's nodes do), go to any node, and mount the
    # shared volume where pvc://trainjobs/... storage is.
    for name in GPU_EXECUTORS:
        resources = multinode.executors[name].container.resources
        assert not resources.HasField("accelerator"), name
        assert not multinode.k8s[name].HasField("node_selector"), name
        (mount,) = multinode.k8s[name].pvc_mount
        assert (mount.constant, mount.mount_path) == ("trainjobs", "/mnt/iagn-shared/trainjobs")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--nodes", "0"], "--nodes must be 1 or more, got 0"),
        (["--gpu", "--gpus", "0"], "--gpus must be 1 or more"),
        (["--shared-volume", "x"], "--shared-volume is the TrainJobs' storage: it needs --nodes"),
    ],
)
def test_no_nodes_or_gpus_is_refused(flags, message, tmp_path):
    result = run(
        [BIN / "iagn-pipeline", "compile", "-o", tmp_path / "p.yaml", *flags],
        cwd=REPO_ROOT,
        check=False,
    )
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "p.yaml").exists()
