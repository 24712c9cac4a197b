"""Steps on several nodes as Kubeflow Trainer TrainJobs (iagn.trainjob), against a real
in-memory Kubernetes API on 127.0.0.1 (kmock's emulator, the official client talking to it
over HTTP) and a real S3 server (moto).

The test plays Trainer's controller and the kubelet: it reads the TrainJob the launcher
created, runs its node command as two local "nodes" (two processes with the PET_* variables
Trainer sets, the manifest's environment with the secret's keys resolved from the secret),
creates node 0's pod with their log, and patches the job's status: Complete or Failed.
"""

from __future__ import annotations

import _thread
import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from helpers import BIN, free_port
from test_training import tiny_params

from iagn.errors import IagnError
from iagn.provenance import ENV_KFP_RUN
from iagn.train.scale import Scale
from iagn.trainjob import launch, names
from iagn.trainjob import manifest as m
from iagn.trainjob.names import MAX_NAME, job_name
from iagn.trainjob.staging import Store

NAMESPACE = "kubeflow"
SECRET = "iagn-credentials"
RUN_ID = "3f1c0c62-1d7e-4b53-9f55-6a7d0e1c2b9a"
IMAGE = "registry.example/iagn:test"
RESOURCES = {
    f"{m.GROUP}/{m.VERSION}/{m.PLURAL}": ("TrainJob", True),
    f"{m.GROUP}/{m.VERSION}/{m.RUNTIME_PLURAL}": ("TrainingRuntime", True),
    f"{m.GROUP}/{m.VERSION}/{m.CLUSTER_RUNTIME_PLURAL}": ("ClusterTrainingRuntime", False),
    "v1/pods": ("Pod", True),
    "v1/secrets": ("Secret", True),
    "v1/events": ("Event", True),
}


class KubeApi:
    """kmock's Kubernetes emulator served on 127.0.0.1 from a thread of its own."""

    def __init__(self):
        self.logs: dict[str, bytes] = {}
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("kmock did not start")
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        self.api_client = client.ApiClient(configuration)
        self.custom = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)

    async def _serve(self):
        import kmock

        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            for key, (kind, namespaced) in RESOURCES.items():
                emulator.resources[key] = kmock.ResourceInfo(kind=kind, namespaced=namespaced)
            emulator["get", re.compile(r"/api/v1/namespaces/[^/]+/pods/[^/]+/log")] << self._log
            self.url = str(server.url).rstrip("/")
            self._stop = asyncio.Event()
            self._loop = asyncio.get_running_loop()
            self._ready.set()
            await self._stop.wait()

    def _log(self, request) -> bytes:
        return self.logs.get(str(request.url.path).split("/")[-2], b"")

    def close(self):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test"}}],
            "current-context": "kmock",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    # --- what the test sees and does, through the API ---

    def jobs(self) -> list[dict]:
        listed = self.custom.list_namespaced_custom_object(m.GROUP, m.VERSION, NAMESPACE, m.PLURAL)
        return listed["items"]

    def job(self, name: str) -> dict:
        return self.custom.get_namespaced_custom_object(
            m.GROUP, m.VERSION, NAMESPACE, m.PLURAL, name
        )

    def set_condition(self, name: str, kind: str, reason: str, message: str) -> None:
        condition = {"type": kind, "status": "True", "reason": reason, "message": message}
        self.custom.patch_namespaced_custom_object_status(
            m.GROUP, m.VERSION, NAMESPACE, m.PLURAL, name, {"status": {"conditions": [condition]}}
        )

    def add_node0_pod(self, job: str, log: bytes, phase: str = "Succeeded") -> str:
        pod = f"{job}-node-0-0-x7k2p"
        self.logs[pod] = log
        labels = {
            m.POD_LABEL_JOBSET: job,
            m.POD_LABEL_REPLICATED_JOB: m.NODE,
            m.POD_LABEL_INDEX: "0",
        }
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod, "namespace": NAMESPACE, "labels": labels},
            "spec": {"containers": [{"name": m.NODE, "image": IMAGE}]},
            "status": {"phase": phase},
        }
        self.core.create_namespaced_pod(NAMESPACE, body)
        return pod

    def add_event(self, about: str, reason: str, message: str) -> None:
        self.core.create_namespaced_event(
            NAMESPACE,
            {
                "metadata": {"name": f"{about}.{reason.lower()}", "namespace": NAMESPACE},
                "involvedObject": {"name": about, "namespace": NAMESPACE},
                "type": "Warning",
                "reason": reason,
                "message": message,
            },
        )

    def secret_env(self, name: str, key: str) -> str | None:
        data = self.core.read_namespaced_secret(name, NAMESPACE).data or {}
        return base64.b64decode(data[key]).decode() if key in data else None


@pytest.fixture
def s3(s3_server, monkeypatch):
    """S3 credentials and endpoint in this process's environment, as in the task's pod."""
    env = {
        **s3_server.credentials_env(),
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def cluster(s3, tmp_path, monkeypatch):
    """The Kubernetes API with Trainer's torch-distributed runtime and the pipeline's secret
    (holding the S3 credentials), reached through a kubeconfig as outside a pod; KFP_RUN_ID
    set as in a KFP task; the launcher polling fast."""
    api = KubeApi()
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "kubeconfig")))
    monkeypatch.setenv(ENV_KFP_RUN, RUN_ID)
    monkeypatch.setattr(launch, "POLL_SECONDS", 0.1)
    api.custom.create_cluster_custom_object(
        m.GROUP,
        m.VERSION,
        m.CLUSTER_RUNTIME_PLURAL,
        {
            "apiVersion": m.API_VERSION,
            "kind": m.CLUSTER_RUNTIME_KIND,
            "metadata": {"name": "torch-distributed"},
            "spec": {"mlPolicy": {"numNodes": 1, "torch": {}}},
        },
    )
    secret = {
        **s3.credentials_env(),
        "AWS_ENDPOINT_URL": s3.endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    api.core.create_namespaced_secret(
        NAMESPACE,
        {
            "metadata": {"name": SECRET, "namespace": NAMESPACE},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in secret.items()},
        },
    )
    api.storage = f"s3://{s3.bucket}/trainjobs"
    yield api
    api.close()


class Controller(threading.Thread):
    """Waits for the TrainJob named `name` (a running one), then `play`s Trainer's part on it.
    When that fails, the task waiting for the job is interrupted (no waiting for its timeout)
    and the failure is raised."""

    def __init__(self, api: KubeApi, name: str, play: Callable[[dict], None]):
        super().__init__(daemon=True)
        self.api, self.name, self.play = api, name, play
        self.error: BaseException | None = None

    def run(self):
        try:
            deadline = time.monotonic() + 60
            # A job of that name still running (no conditions): not one that already ended.
            while not any(
                j["metadata"]["name"] == self.name and not (j.get("status") or {}).get("conditions")
                for j in self.api.jobs()
            ):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no TrainJob {self.name}")
                time.sleep(0.05)
            self.play(self.api.job(self.name))
        except BaseException as exc:
            self.error = exc
            _thread.interrupt_main()  # the task waits for the job: stop it (as SIGINT does)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.join(120)
        if self.error is not None:
            raise self.error


def outputs_in_storage(api: KubeApi, name: str, files: dict[str, bytes]) -> None:
    """What node 0 uploads after a successful step (without training)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        for filename, data in files.items():
            (Path(folder) / filename).write_bytes(data)
        Store(f"{api.storage}/{name}").push_outputs({"model": Path(folder)})


def step_call(tmp_path: Path, api: KubeApi, **changes) -> dict:
    """run_on_trainer's arguments for a small step: a dataset folder and params in, a
    checkpoint out."""
    data = tmp_path / "dataset"
    if not data.exists():
        (data / "images").mkdir(parents=True)
        (data / "images" / "a.jpg").write_bytes(b"jpeg")
    if not (tmp_path / "params.yaml").exists():
        (tmp_path / "params.yaml").write_text("train: {}\n")
    call = {
        "step": "stage2",
        "argv": ["train-stage", "--stage", "2", "--data", "{dataset}", "--out", "{model}"],
        "inputs": {"dataset": data, "params": tmp_path / "params.yaml"},
        "outputs": {"model": tmp_path / "out" / "s2.pt"},
        "scale": Scale(nodes=2, procs_per_node=1, timeout_minutes=2),
        "image": IMAGE,
        "secret": SECRET,
        "storage_uri": api.storage,
        "namespace": NAMESPACE,
    }
    call.update(changes)
    return call


# --- the whole path: two nodes train, node 0's checkpoint comes back ------------------------


def node_env(api: KubeApi, job: dict, rank: int, port: int) -> dict[str, str]:
    """A node's environment as the kubelet builds it from the TrainJob: its `env`, each
    secretKeyRef read from the secret (a missing optional key is left out), and the PET_*
    variables Trainer's torch runtime adds. The test's own S3 credentials are removed: they
    must come from the secret."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    for entry in job["spec"]["trainer"]["env"]:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
            continue
        ref = entry["valueFrom"]["secretKeyRef"]
        value = api.secret_env(ref["name"], ref["key"])
        assert value is not None or ref.get("optional"), f"secret has no {ref['key']}"
        if value is not None:
            env[entry["name"]] = value
    trainer = job["spec"]["trainer"]
    env.update(
        PET_NNODES=str(trainer["numNodes"]),
        PET_NPROC_PER_NODE=str(trainer["numProcPerNode"]),
        PET_NODE_RANK=str(rank),
        PET_MASTER_ADDR="127.0.0.1",
        PET_MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        IAGN_TRACKING="off",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env


def test_two_nodes_train_and_the_checkpoint_comes_back(cluster, tiny_synth, tmp_path):
    params = tiny_params(tiny_synth, epochs=1)
    params["train"].update(batch_size=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "out" / "s1.pt"
    call = step_call(
        tmp_path,
        cluster,
        step="stage1",
        argv=[
            *("train-stage", "--stage", "1", "--params", "{params}", "--data", "{dataset}"),
            *("--out", "{model}", "--device", "cpu", "--quiet"),
        ],
        inputs={"dataset": tiny_synth, "params": tmp_path / "params.yaml"},
        outputs={"model": out},
    )
    name = job_name(RUN_ID, "stage1")
    seen: dict = {}

    def trainer(job: dict) -> None:
        seen["job"] = job
        port = free_port()
        nodes = []
        for rank in (0, 1):
            workdir = tmp_path / f"node{rank}"
            command = [*job["spec"]["trainer"]["command"], "--workdir", str(workdir)]
            nodes.append(
                subprocess.Popen(
                    command,
                    env=node_env(cluster, job, rank, port),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
            )
        logs = [node.communicate(timeout=180)[0] for node in nodes]
        seen["logs"] = logs
        assert [node.returncode for node in nodes] == [0, 0], logs[0].decode()[-3000:]
        cluster.add_node0_pod(name, logs[0])
        cluster.set_condition(name, m.COMPLETE, "JobSetCompleted", "TrainJob completed")

    lines: list[str] = []
    with Controller(cluster, name, trainer):
        launch.run_on_trainer(**call, log=lines.append)

    job = seen["job"]
    # What the API server stored is what the TrainJob models of the targeted Trainer release
    # hold, field for field: nothing the API server would prune.
    from kubeflow_trainer_api.models.trainer_v1alpha1_train_job import TrainerV1alpha1TrainJob

    assert TrainerV1alpha1TrainJob.from_dict(job).to_dict() == job
    assert job["metadata"]["name"] == name
    trainer_spec = job["spec"]["trainer"]
    assert trainer_spec["image"] == IMAGE and trainer_spec["numNodes"] == 2
    assert trainer_spec["numProcPerNode"] == 1
    assert job["spec"]["runtimeRef"] == {
        "apiGroup": m.GROUP,
        "kind": m.CLUSTER_RUNTIME_KIND,
        "name": "torch-distributed",
    }
    assert job["spec"]["activeDeadlineSeconds"] == 120
    assert "runtimePatches" not in job["spec"]  # CPU nodes, storage in S3: nothing to patch
    # Credentials: by reference to the secret, never as values or arguments.
    text = json.dumps(job)
    for value in (cluster.secret_env(SECRET, "AWS_SECRET_ACCESS_KEY"), "s3cr3t"):
        assert value not in text
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"] for e in trainer_spec["env"] if "valueFrom" in e
    }
    assert refs["AWS_SECRET_ACCESS_KEY"] == {"name": SECRET, "key": "AWS_SECRET_ACCESS_KEY"}
    assert refs["AWS_ENDPOINT_URL"]["optional"] is True

    # Node 0 trained with node 1 (world size 2), its checkpoint and the files the step writes
    # beside it came back through S3; node 0's log is in the task's log.
    from iagn.checkpoint import load_checkpoint

    assert sorted(p.name for p in out.parent.iterdir()) == [
        "s1.history.json",
        "s1.metrics.json",
        "s1.pt",
    ]
    checkpoint = load_checkpoint(out)
    assert checkpoint["train_config"]["world_size"] == 2
    assert any(line.startswith("[node 0] node 0: ") for line in lines), lines
    assert f"created TrainJob {name} (namespace {NAMESPACE})" in "\n".join(lines)


# --- idempotence: a retried task reattaches ----------------------------------------------


class TaskLost(Exception):
    """The task's pod went away right after it created the job."""


def test_a_retried_task_reattaches_to_its_job(cluster, tmp_path, monkeypatch):
    creates = []
    real_create = launch.Cluster.create_job
    monkeypatch.setattr(
        launch.Cluster,
        "create_job",
        lambda self, manifest: creates.append(manifest) or real_create(self, manifest),
    )
    name = job_name(RUN_ID, "stage2")

    def lost(line: str) -> None:
        if line.startswith("created TrainJob"):
            raise TaskLost(line)

    with pytest.raises(TaskLost):
        launch.run_on_trainer(**step_call(tmp_path, cluster), log=lost)
    assert [j["metadata"]["name"] for j in cluster.jobs()] == [name]  # still running

    def finish(job: dict) -> None:
        outputs_in_storage(cluster, name, {"s2.pt": b"weights", "s2.metrics.json": b"{}"})
        cluster.set_condition(name, m.COMPLETE, "JobSetCompleted", "done")

    lines: list[str] = []
    with Controller(cluster, name, finish):
        launch.run_on_trainer(**step_call(tmp_path, cluster), log=lines.append)
    assert f"reattaching to TrainJob {name} (namespace {NAMESPACE})" in lines
    assert len(creates) == 1 and [j["metadata"]["name"] for j in cluster.jobs()] == [name]
    assert (tmp_path / "out" / "s2.pt").read_bytes() == b"weights"
    assert (tmp_path / "out" / "s2.metrics.json").exists()

    # A third attempt (the job Complete, outputs in storage): downloads, creates nothing.
    (tmp_path / "out" / "s2.pt").unlink()
    lines.clear()
    launch.run_on_trainer(**step_call(tmp_path, cluster), log=lines.append)
    assert f"reattaching to TrainJob {name} (namespace {NAMESPACE})" in lines
    assert len(creates) == 1 and (tmp_path / "out" / "s2.pt").read_bytes() == b"weights"
    assert not any("uploading" in line for line in lines)  # a running job's inputs: untouched


# --- a failed job -------------------------------------------------------------------------


@pytest.mark.fault(
    "a TrainJob that fails (a node crashes, its deadline passes)",
    sees="the task fails with `TrainJob iagn-stage2-... failed: <reason>: <message>` and the "
    "last warning events; a retry deletes the failed job and creates it anew",
    kept="the staged inputs; the durable checkpoint (train.checkpoint_uri), which the retry "
    "resumes from",
)
def test_a_failed_job_reports_its_reason_and_a_retry_starts_it_again(cluster, tmp_path):
    name = job_name(RUN_ID, "stage2")

    def fail(job: dict) -> None:
        cluster.add_event(name, "BackoffLimitExceeded", "node 1 exited with code 1")
        cluster.set_condition(name, m.FAILED, "FailedJobs", "jobset failed: job node-0 has failed")

    with Controller(cluster, name, fail), pytest.raises(IagnError) as failed:
        launch.run_on_trainer(**step_call(tmp_path, cluster), log=lambda line: None)
    message = str(failed.value)
    assert f"TrainJob {name} (namespace {NAMESPACE}) failed: FailedJobs: jobset failed" in message
    assert "BackoffLimitExceeded: node 1 exited with code 1" in message

    def finish(job: dict) -> None:
        assert "status" not in job  # a new job, not the failed one
        outputs_in_storage(cluster, name, {"s2.pt": b"second try"})
        cluster.set_condition(name, m.COMPLETE, "JobSetCompleted", "done")

    lines: list[str] = []
    with Controller(cluster, name, finish):
        launch.run_on_trainer(**step_call(tmp_path, cluster), log=lines.append)
    assert any("failed before (FailedJobs" in line and "starting again" in line for line in lines)
    assert any("inputs already in" in line for line in lines)  # staged once
    assert (tmp_path / "out" / "s2.pt").read_bytes() == b"second try"


def test_a_job_past_its_timeout_is_deleted(cluster, tmp_path):
    call = step_call(tmp_path, cluster, scale=Scale(nodes=2, timeout_minutes=0.005))
    with pytest.raises(IagnError, match=r"ran past distributed\.timeout_minutes"):
        launch.run_on_trainer(**call, log=lambda line: None)
    assert cluster.jobs() == []


# --- cancel: SIGTERM deletes the job ---------------------------------------------------------

CANCELLED_TASK = """
import sys
from pathlib import Path
from iagn.train.scale import Scale
from iagn.trainjob import run_on_trainer
from iagn.trainjob import launch
launch.POLL_SECONDS = 0.1
tmp = Path(sys.argv[1])
run_on_trainer(step="distill", argv=["distill", "--data", "{dataset}", "--out", "{model}"],
               inputs={"dataset": tmp / "dataset"}, outputs={"model": tmp / "out" / "d.pt"},
               scale=Scale(nodes=3), image=sys.argv[2], secret=sys.argv[3],
               storage_uri=sys.argv[4], namespace=sys.argv[5])
"""


@pytest.mark.fault(
    "the TrainJob's launcher task cancelled or timed out in KFP (SIGTERM)",
    sees="`SIGTERM: deleting TrainJob ...`, exit 143; the job, its JobSet and pods are gone",
    kept="the staged inputs and the durable checkpoint",
)
def test_sigterm_deletes_the_job(cluster, tmp_path):
    step_call(tmp_path, cluster)  # the dataset folder
    name = job_name(RUN_ID, "distill")
    task = subprocess.Popen(
        [sys.executable, "-c", CANCELLED_TASK, tmp_path, IMAGE, SECRET, cluster.storage, NAMESPACE],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not cluster.jobs():
            assert task.poll() is None, task.communicate()[0]
            assert time.monotonic() < deadline, "no TrainJob was created"
            time.sleep(0.05)
        assert cluster.jobs()[0]["metadata"]["name"] == name
        task.send_signal(signal.SIGTERM)
        output = task.communicate(timeout=60)[0]
    finally:
        if task.poll() is None:
            task.kill()
    assert task.returncode == 128 + signal.SIGTERM, output
    assert f"SIGTERM: deleting TrainJob {name}" in output
    assert cluster.jobs() == []


# --- bad input: a clear error before any job exists -----------------------------------------


def _without_secret_key(api: KubeApi) -> None:
    api.core.patch_namespaced_secret(SECRET, NAMESPACE, {"data": {"AWS_ACCESS_KEY_ID": None}})


BAD_INPUT = [
    pytest.param({"scale": Scale(nodes=0)}, None, "distributed.nodes must be", id="0 nodes"),
    pytest.param(
        {"scale": Scale(nodes=2, procs_per_node=-1)}, None, "procs_per_node", id="-1 procs"
    ),
    pytest.param(
        {"scale": Scale(nodes=2, resources_per_node={"nvidia.com/gpu": 0})},
        None,
        "nvidia.com/gpu: 0 GPUs per node",
        id="0 GPUs",
    ),
    pytest.param(
        {"scale": Scale(nodes=2, runtime="torch-distributed-v9")},
        None,
        "runtime 'torch-distributed-v9' (distributed.runtime) does not exist as a "
        "ClusterTrainingRuntime or a TrainingRuntime in namespace kubeflow; the runtimes there "
        "are: torch-distributed (ClusterTrainingRuntime)",
        id="no such runtime",
    ),
    pytest.param(
        {"secret": "no-such-secret"},
        None,
        "the Kubernetes secret 'no-such-secret' does not exist in namespace kubeflow",
        id="no such secret",
    ),
    pytest.param({}, _without_secret_key, "has no AWS_ACCESS_KEY_ID", id="secret lacks a key"),
    pytest.param(
        {"storage_uri": "s3://no-such-bucket-iagn/x"},
        None,
        "TrainJob storage s3://no-such-bucket-iagn/x/iagn-stage2-",
        id="storage unreachable",
    ),
    pytest.param({"storage_uri": ""}, None, "distributed.storage_uri", id="no storage"),
    pytest.param(
        {"argv": ["train-stage", "--init", "{init}"]},
        None,
        "name {init}, which is no input or output",
        id="unknown placeholder",
    ),
    pytest.param({"image": ""}, None, "container image", id="no image"),
]


@pytest.mark.fault(
    "a step on several nodes whose Trainer runtime is missing, whose secret is missing or "
    "lacks a key, whose storage is not writable, with 0 nodes or GPUs, or outside a KFP run",
    sees="the task fails before any TrainJob exists: `Kubeflow Trainer runtime 'x' "
    "(distributed.runtime) does not exist ...; the runtimes there are: torch-distributed "
    "(ClusterTrainingRuntime)` / `the Kubernetes secret 'x' does not exist in namespace "
    "kubeflow` / `TrainJob storage s3://... is not writable: ...`",
    kept="everything: nothing is created on the cluster, no GPU is requested",
)
@pytest.mark.parametrize(("changes", "prepare", "message"), BAD_INPUT)
def test_bad_input_fails_before_any_job(cluster, tmp_path, changes, prepare, message):
    if prepare:
        prepare(cluster)
    with pytest.raises(IagnError) as error:
        launch.run_on_trainer(**step_call(tmp_path, cluster, **changes), log=lambda line: None)
    assert message in str(error.value)
    assert cluster.jobs() == []


def test_outside_a_kfp_run_there_is_no_job_name(cluster, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_KFP_RUN)
    with pytest.raises(IagnError, match="KFP_RUN_ID is not set"):
        launch.run_on_trainer(**step_call(tmp_path, cluster), log=lambda line: None)
    assert cluster.jobs() == []


# --- pieces -----------------------------------------------------------------------------


def test_job_names_are_short_stable_dns_labels():
    name = job_name(RUN_ID, "stage2")
    assert name == job_name(RUN_ID, "stage2") and name.startswith("iagn-stage2-")
    assert job_name(RUN_ID, "stage3") != name and job_name("another-run", "stage2") != name
    long = job_name(RUN_ID, "t17-" + "very-long-trial-name" * 5 + "-stage2")
    for each in (name, long):
        assert len(each) <= MAX_NAME and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", each)


def test_an_unknown_field_fails_the_round_trip():
    """A field of another Trainer release (v2.1's podTemplateOverrides) or a typo would be
    dropped by the API server; the models of the targeted release refuse it here."""
    scale = Scale(nodes=2, resources_per_node={"cpu": 4, "nvidia.com/gpu": 1})
    spec = m.node_spec("s3://b/p", ["distill"], [], {}, 0)
    arguments = {
        "name": "iagn-x-0123456789",
        "namespace": NAMESPACE,
        "run_id": RUN_ID,
        "step": "x",
        "scale": scale,
        "runtime_kind": m.CLUSTER_RUNTIME_KIND,
        "image": IMAGE,
        "secret": SECRET,
        "spec": spec,
        "storage_shown": "s3://b/p",
    }
    good = m.build(**arguments)
    assert good["spec"]["trainer"]["resourcesPerNode"] == {
        "limits": {"cpu": "4", "nvidia.com/gpu": "1"}
    }
    # GPU nodes tolerate the GPU pool's usual taint, as the pipeline's GPU tasks do.
    (patch,) = good["spec"]["runtimePatches"]
    assert patch["manager"] == m.PATCH_MANAGER
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == m.NODE
    assert node["template"]["spec"]["template"]["spec"] == {
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    }
    placed = m.build(
        **{**arguments, "node_selector": {"pool": "a100"}, "tolerations": []},
    )
    pod = placed["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
    assert pod["replicatedJobs"][0]["template"]["spec"]["template"]["spec"] == {
        "nodeSelector": {"pool": "a100"}
    }
    cpu_only = m.build(**{**arguments, "scale": Scale(nodes=2)})
    assert "runtimePatches" not in cpu_only["spec"]
    for path, value in (
        (("spec", "podTemplateOverrides"), []),
        (("spec", "trainer", "numProcsPerNode"), 2),
        (("spec", "runtimeRef", "namespace"), NAMESPACE),
    ):
        bad = json.loads(json.dumps(good))
        target = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(IagnError, match=re.escape(".".join(path))):
            m.checked(bad)


def test_the_tests_secret_is_the_pipelines_default():
    from pipeline import dag

    assert dag.DEFAULT_SECRET == SECRET


def test_the_node_command_outside_a_trainjob_is_a_message(tmp_path, capsys, monkeypatch):
    from iagn.cli import main

    monkeypatch.delenv(m.NODE_SPEC_ENV, raising=False)
    assert main(["trainjob-node", "--workdir", str(tmp_path / "w")]) == 2
    assert "IAGN_TRAINJOB_SPEC is not set" in capsys.readouterr().err


def test_storage_on_a_shared_volume(cluster, tmp_path, monkeypatch):
    """`pvc://CLAIM/path`: the task's mount of the claim holds the files; the TrainJob mounts
    the claim at the same path on every node (a runtime patch of the targeted release)."""
    root = tmp_path / "shared"
    (root / "scratch").mkdir(parents=True)
    monkeypatch.setattr(names, "SHARED_ROOT", str(root))
    name = job_name(RUN_ID, "stage2")
    seen = {}

    def finish(job: dict) -> None:
        seen["job"] = job
        Store(f"file://{root}/scratch/jobs/{name}").push_outputs({"model": out_folder})
        cluster.set_condition(name, m.COMPLETE, "JobSetCompleted", "done")

    out_folder = tmp_path / "node-out"
    out_folder.mkdir()
    (out_folder / "s2.pt").write_bytes(b"on the volume")
    call = step_call(tmp_path, cluster, storage_uri="pvc://scratch/jobs")
    with Controller(cluster, name, finish):
        launch.run_on_trainer(**call, log=lambda line: None)
    assert (tmp_path / "out" / "s2.pt").read_bytes() == b"on the volume"
    assert (root / "scratch" / "jobs" / name / "inputs" / "dataset" / "images" / "a.jpg").exists()
    job = seen["job"]
    from kubeflow_trainer_api.models.trainer_v1alpha1_train_job import TrainerV1alpha1TrainJob

    assert TrainerV1alpha1TrainJob.from_dict(job).to_dict() == job
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
    pod = patch["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "scratch"}
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == f"{root}/scratch"

    # Not mounted in the task's pod: an error before anything is created.
    with pytest.raises(IagnError, match="not mounted at"):
        launch.run_on_trainer(
            **step_call(tmp_path, cluster, step="x", storage_uri="pvc://other/jobs"),
            log=lambda line: None,
        )


def test_an_unreachable_checkpoint_uri_is_named(s3, monkeypatch):
    """What the task checks before it creates a job whose nodes write checkpoints there."""
    from iagn.trainjob import check_writable

    check_writable(f"s3://{s3.bucket}/ckpt", "checkpoint URI", "train.checkpoint_uri")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(IagnError) as error:
        check_writable(f"s3://{s3.bucket}/ckpt", "checkpoint URI", "train.checkpoint_uri")
    assert f"checkpoint URI s3://{s3.bucket}/ckpt is not writable: cannot connect" in str(
        error.value
    )
    assert "fix train.checkpoint_uri" in str(error.value)


# --- the KFP training components' side: params.yaml's distributed: reaches the TrainJob ----


def test_the_training_components_launch_a_trainjob_from_the_params(cluster, tmp_path, monkeypatch):
    """components.runtime.run_training, what train-stage and distill call: a run whose params
    say `distributed.nodes: 2` (or whose task has nodes=2) becomes a TrainJob of the step's
    command, the run's params travel with it, and the last epoch's metrics come back."""
    from components.runtime import run_training, scaled_params

    namespace_file = tmp_path / "namespace"  # the pod's service-account namespace
    namespace_file.write_text(NAMESPACE)
    monkeypatch.setattr(names, "SERVICE_ACCOUNT_NAMESPACE", namespace_file)
    data = tmp_path / "dataset"
    (data / "images").mkdir(parents=True)
    settings = scaled_params(
        {"train": {"checkpoint_uri": None}, "distributed": {"storage_uri": cluster.storage}},
        nodes=2,
        gpus=4,
        accelerator="nvidia.com/gpu",
    )
    out = tmp_path / "out" / "model"
    out.parent.mkdir()
    name = job_name(RUN_ID, "stage1")
    seen: dict = {}

    def finish(job: dict) -> None:
        seen["job"] = job
        metrics = json.dumps({"val_acc": 0.75}).encode()
        outputs = {"model": b"weights", "model.metrics.json": metrics}
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            for filename, content in outputs.items():
                (Path(folder) / filename).write_bytes(content)
            Store(f"{cluster.storage}/{name}").push_outputs({"out": Path(folder)})
        cluster.set_condition(name, m.COMPLETE, "JobSetCompleted", "done")

    def in_this_process():
        raise AssertionError("two nodes: the step must not train in the task's process")

    with Controller(cluster, name, finish):
        last_epoch = run_training(
            "stage1",
            [
                *("train-stage", "--stage", "1", "--data", "{dataset}", "--params", "{params}"),
                *("--init", "{init}", "--out", "{out}"),
            ],
            {"dataset": str(data), "init": None, "out": str(out)},
            settings,
            here=in_this_process,
            image=IMAGE,
            secret=SECRET,
            placement={"node_selector": {"pool": "a100"}, "tolerations": []},
        )
    assert last_epoch == {"val_acc": 0.75} and out.read_bytes() == b"weights"
    trainer = seen["job"]["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 4)
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"  # a quantity
    spec = json.loads(next(e["value"] for e in trainer["env"] if e["name"] == m.NODE_SPEC_ENV))
    # No --init for stage 1; the params the run resolved travel as an input of their own.
    assert "--init" not in spec["argv"] and "{params}" in spec["argv"]
    staged = Store(f"{cluster.storage}/{name}").marker("inputs.json")
    assert set(staged["inputs"]) == {"dataset", "params"}
