"""A real MLflow tracking server and one tracked tiny pipeline run, shared by the MLflow tests.

The server: `mlflow server` with a SQLite backend and its artifacts proxied to an S3 bucket
on a moto S3 server, both on 127.0.0.1, one worker (see ../shared/STACK.md). Clients reach it
with fake AWS credentials and a user:password in the tracking URI, so the tests can search
everything logged for them.

The pipeline: the `iagn` CLI, one process per step as DVC runs them (validate, three
stages, distill, evaluate teacher and student, register), on the tiny synthetic dataset,
in a git project with a data.dvc. Its stdout and stderr are kept for the secret scan.

Both are started once per test session however many test modules use them (pytest would
make one instance of an imported session fixture per module): `shared_server` and
`shared_pipeline` keep them in this module and stop the server when the session ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
import yaml
from helpers import BIN, free_port, iagn, run
from moto.server import ThreadedMotoServer

BUCKET = "iagn-mlflow"
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "AKIAIAGNFAKEKEY7Q2Z",
    "AWS_SECRET_ACCESS_KEY": "iagn-fake-aws-secret-9f8e7d6c5b4a",
    "AWS_SESSION_TOKEN": "iagn-fake-session-token-1a2b3c4d",
    "AWS_DEFAULT_REGION": "us-east-1",
}
TRACKING_USER = "iagn-ci"
TRACKING_PASSWORD = "iagn-fake-tracking-password-77aa"
SECRETS = (
    FAKE_AWS["AWS_ACCESS_KEY_ID"],
    FAKE_AWS["AWS_SECRET_ACCESS_KEY"],
    FAKE_AWS["AWS_SESSION_TOKEN"],
    TRACKING_PASSWORD,
)
QUIET = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
}
PIPELINE_EXPERIMENT = "iagn-pipeline-test"
PIPELINE_RUN = "ci-run-1234"
MODEL_NAME = "iagn-test"
# The nested MLflow run of each pipeline step under one parent (CLI, DVC and KFP alike).
STEP_RUNS = frozenset(
    {
        "validate",
        "train-stage-1",
        "train-stage-2",
        "train-stage-3",
        "distill",
        "evaluate-teacher",
        "evaluate-student",
        "register",
    }
)
FAKE_DATA_MD5 = "0123456789abcdef0123456789abcdef.dir"


@dataclass
class MlflowServer:
    url: str  # http://127.0.0.1:<port>, what a browser opens
    s3_endpoint: str
    log: Path
    process: subprocess.Popen
    moto: ThreadedMotoServer

    @property
    def uri_with_password(self) -> str:
        return self.url.replace("://", f"://{TRACKING_USER}:{TRACKING_PASSWORD}@")

    def env(self, experiment: str, **extra: str) -> dict[str, str]:
        """What a client process needs: tracking URI (with a password), S3, fake keys."""
        return {
            **QUIET,
            **FAKE_AWS,
            "MLFLOW_TRACKING_URI": self.uri_with_password,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "MLFLOW_EXPERIMENT_NAME": experiment,
            **extra,
        }

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.url)

    def s3(self):
        return boto3.client("s3", endpoint_url=self.s3_endpoint, **_boto_credentials())

    def s3_objects(self) -> dict[str, bytes]:
        s3 = self.s3()
        keys = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return {key: s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in keys}

    def stop(self) -> None:
        stop_group(self.process)
        self.moto.stop()


def stop_group(process: subprocess.Popen) -> None:
    """End a server started with `start_new_session=True` and the workers it spawned."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _boto_credentials() -> dict:
    return {
        "aws_access_key_id": FAKE_AWS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": FAKE_AWS["AWS_SECRET_ACCESS_KEY"],
        "aws_session_token": FAKE_AWS["AWS_SESSION_TOKEN"],
        "region_name": FAKE_AWS["AWS_DEFAULT_REGION"],
    }


def _wait_until_healthy(url: str, process: subprocess.Popen, log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}):\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    stop_group(process)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f} s:\n{log.read_text()}")


def start_server(workdir: Path) -> MlflowServer:
    moto_port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    moto.start()
    s3_endpoint = f"http://127.0.0.1:{moto_port}"
    boto3.client("s3", endpoint_url=s3_endpoint, **_boto_credentials()).create_bucket(Bucket=BUCKET)
    port = free_port()
    log = workdir / "mlflow-server.log"
    env = {
        **os.environ,
        **QUIET,
        **FAKE_AWS,
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    process = subprocess.Popen(
        [
            BIN / "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{workdir / 'mlflow.db'}",
            "--artifacts-destination",
            f"s3://{BUCKET}/mlflow",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=workdir,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its uvicorn worker is stopped with it (stop_group)
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(f"{url}/health", process, log, seconds=90)
    except RuntimeError:
        moto.stop()
        raise
    return MlflowServer(url, s3_endpoint, log, process, moto)


_SHARED: dict[str, object] = {}


def shared_server(request: pytest.FixtureRequest, tmp_path_factory) -> MlflowServer:
    if "server" not in _SHARED:
        server = start_server(tmp_path_factory.mktemp("mlflow-server"))
        request.config.add_cleanup(server.stop)
        _SHARED["server"] = server
    return _SHARED["server"]  # type: ignore[return-value]


@pytest.fixture(scope="session")
def mlflow_server(request, tmp_path_factory) -> MlflowServer:
    """The session's MLflow server (import this fixture into a test module to use it)."""
    return shared_server(request, tmp_path_factory)


# --- one tracked pipeline run -----------------------------------------------------------------


@dataclass
class PipelineRun:
    project: Path
    data: Path
    params: dict
    env: dict[str, str]
    logs: list[str] = field(default_factory=list)  # stdout + stderr of every step

    def path(self, name: str) -> Path:
        return self.project / name

    def iagn(self, *args: str, check: bool = True, **extra_env: str):
        result = iagn(*args, cwd=self.project, env={**self.env, **extra_env}, check=check)
        self.logs += [result.stdout, result.stderr]
        return result


def pipeline_params(data: Path) -> dict:
    """tiny_params (seconds on the tiny dataset), a validation suite it passes, an open gate."""
    from test_training import tiny_params

    params = tiny_params(data)
    params["stage1"]["epochs"] = 2  # two points of per-epoch history
    params["validate"]["expectations"]["min_images_per_class"]["min_count"] = 1
    params["register"].update(
        model_name=MODEL_NAME,
        register_teacher=True,
        gate={"min_top1": 0.0, "min_pointing_game_lift": -1.0, "max_latency_ms": 60_000},
    )
    return params


def make_project(root: Path, data: Path, params: dict) -> Path:
    """A git repository with params.yaml and a data.dvc: what the tags are checked against."""
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "data.dvc").write_text(
        yaml.safe_dump({"outs": [{"md5": FAKE_DATA_MD5, "path": str(data)}]})
    )
    run(["git", "init", "--quiet", "-b", "main"], cwd=root)
    run(["git", "add", "-A"], cwd=root)
    run(["git", "commit", "--quiet", "-m", "project"], cwd=root)
    return root


def run_pipeline(pipeline: PipelineRun) -> None:
    data = str(pipeline.data)
    common = ("--params", "params.yaml", "--quiet")
    pipeline.iagn("validate", "--data", data, "--out", "build/validate", "--params", "params.yaml")
    init: tuple[str, ...] = ()
    for stage in (1, 2, 3):
        out = f"build/stage{stage}.pt"
        pipeline.iagn(
            "train-stage", "--stage", str(stage), "--data", data, "--out", out, *init, *common
        )
        init = ("--init", out)
    pipeline.iagn(
        "distill",
        "--teacher",
        "build/stage3.pt",
        "--data",
        data,
        "--out",
        "build/student.pt",
        *common,
    )
    for kind, model in (("teacher", "build/stage3.pt"), ("student", "build/student.pt")):
        pipeline.iagn(
            "evaluate", "--model", model, "--data", data, "--out", f"build/eval/{kind}", *common
        )
    pipeline.iagn(*register_args(), "--out", "build/register")


def register_args() -> tuple[str, ...]:
    return (
        "register",
        "--student",
        "build/student.pt",
        "--student-eval",
        "build/eval/student",
        "--teacher",
        "build/stage3.pt",
        "--teacher-eval",
        "build/eval/teacher",
        "--params",
        "params.yaml",
    )


@pytest.fixture(scope="session")
def tracked_pipeline(mlflow_server, tiny_synth, tmp_path_factory) -> PipelineRun:
    """The tiny pipeline run once through the CLI against the server (shared by modules)."""
    if "pipeline" not in _SHARED:
        params = pipeline_params(tiny_synth)
        project = make_project(tmp_path_factory.mktemp("tracked") / "project", tiny_synth, params)
        env = mlflow_server.env(PIPELINE_EXPERIMENT, IAGN_PIPELINE_RUN=PIPELINE_RUN)
        pipeline = PipelineRun(project, tiny_synth, params, env)
        run_pipeline(pipeline)
        _SHARED["pipeline"] = pipeline
    return _SHARED["pipeline"]  # type: ignore[return-value]


def experiment_runs(server: MlflowServer, experiment: str) -> list:
    client = server.client()
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r}"
    return client.search_runs([found.experiment_id], max_results=1000)
