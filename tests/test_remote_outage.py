"""Outages of the S3 server, with real servers on 127.0.0.1: a clear error, then a retry
that completes.

- `iagn remote push` while the S3 server stops halfway: DVC alone would try each remaining
  file with its retries for hours; iagn stops it once the endpoint has refused connections
  for IAGN_REMOTE_OUTAGE_S, names the remote and the endpoint, and the same push after the
  server is back completes (`dvc status -c` in sync).
- `iagn register` while the MLflow server's artifact store (S3) is down: the model cannot be
  logged, so nothing is registered and the error says so; after the restart the same command
  registers the version, exactly once.

moto keeps its buckets in this process's memory, so a server stopped and started again on
the same port serves the same objects (as a real S3 server would after an outage).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import zlib
from pathlib import Path

import pytest
import yaml
from helpers import BIN, GIT_IDENTITY, dvc, free_port, iagn, run
from mlflow_server import SECRETS, mlflow_server, tracked_pipeline
from moto.server import ThreadedMotoServer

from iagn.checkpoint import load_checkpoint, save_checkpoint
from iagn.io import sha256_file

__all__ = ["mlflow_server", "tracked_pipeline"]  # fixtures used below

KEYS = {"AWS_ACCESS_KEY_ID": "AKIATESTIAGN", "AWS_SECRET_ACCESS_KEY": "s3cr3t-iagn-outage"}
FILES = 300  # enough that a push with one job is still running when the server stops


class Restartable:
    """A moto S3 server on one port that can be stopped and started again."""

    def __init__(self, port: int):
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.server: ThreadedMotoServer | None = None

    def start(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture
def s3(tmp_path):
    import boto3

    server = Restartable(free_port())
    server.start()
    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        region_name="us-east-1",
        aws_access_key_id=KEYS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=KEYS["AWS_SECRET_ACCESS_KEY"],
    )
    bucket = f"iagn-outage-{server.port}"  # moto's store is per process: a bucket of our own
    client.create_bucket(Bucket=bucket)
    yield server, client, bucket
    server.stop()


def keys(client, bucket: str) -> list[str]:
    found = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        found += [item["Key"] for item in page.get("Contents", [])]
    return found


@pytest.mark.fault(
    "the S3 server going down halfway through `iagn remote push`",
    sees="exit 2 once the endpoint has refused connections for IAGN_REMOTE_OUTAGE_S (default "
    "60 s), not DVC's hours of retries: `dvc push stopped: DVC remote 'store' (s3://... at "
    "http://...) went down during the transfer -> once the S3 server is up again, run the same "
    "command again ...`",
    kept="what reached the remote before the outage (the retry pushes only the rest; "
    "`dvc status --cloud` in sync), the local data and DVC cache",
)
def test_push_survives_the_s3_server_stopping_halfway(tmp_path: Path, s3, monkeypatch):
    server, client, bucket = s3
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws
    project = tmp_path / "project"
    (project / "images").mkdir(parents=True)
    run(["git", "init", "--quiet", "-b", "main"], cwd=project)
    dvc("init", "--quiet", cwd=project)
    for i in range(FILES):
        (project / "images" / f"{i:04d}.bin").write_bytes(i.to_bytes(4, "big") * 256)
    dvc("add", "--quiet", "images", cwd=project)
    dvc("remote", "add", "-d", "store", f"s3://{bucket}/dvc", cwd=project)
    dvc("remote", "modify", "store", "endpointurl", server.endpoint, cwd=project)
    env = {**KEYS, "IAGN_REMOTE_OUTAGE_S": "4"}

    push = subprocess.Popen(
        [BIN / "iagn", "remote", "push", "--jobs", "1"],
        cwd=project,
        env={**os.environ, **GIT_IDENTITY, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while len(keys(client, bucket)) < 3 and push.poll() is None:
        assert time.monotonic() < deadline, "the push uploaded nothing in 120 s"
        time.sleep(0.05)
    server.stop()  # halfway: a few files are up, most are not
    started = time.monotonic()
    out, err = push.communicate(timeout=300)
    waited = time.monotonic() - started
    assert push.returncode == 2, out + err
    assert "Traceback" not in err
    assert (
        f"`dvc push` stopped: DVC remote 'store' (s3://{bucket}/dvc at {server.endpoint}) went "
        "down during the transfer" in err
    )
    assert "run the same command again" in err
    assert waited < 60, f"the push took {waited:.0f} s to give up"  # not DVC's hours
    assert KEYS["AWS_SECRET_ACCESS_KEY"] not in out + err

    server.start()  # the outage ends; moto kept what was uploaded
    pushed_before = len(keys(client, bucket))
    assert 0 < pushed_before < FILES + 1, pushed_before  # it really stopped halfway
    retried = iagn("remote", "push", cwd=project, env=env)
    assert f"{FILES + 1 - pushed_before} files pushed" in retried.stdout, retried.stdout
    status = dvc("status", "--cloud", cwd=project, env=env).stdout
    assert "in sync" in status, status
    assert len(keys(client, bucket)) == FILES + 1  # every file and the folder's .dir listing


def _new_student(pipeline, tmp_path: Path, name: str) -> tuple[Path, Path]:
    """Another student (weights nudged: a model no run has logged) and its evaluation."""
    checkpoint = load_checkpoint(pipeline.path("build/student.pt"))
    weight = next(t for t in checkpoint["model_state"].values() if t.is_floating_point())
    weight[(0,) * weight.dim()] += (zlib.crc32(name.encode()) % 1000 + 1) * 1e-6
    path = tmp_path / f"{name}.pt"
    save_checkpoint(path, checkpoint)
    evaluation = tmp_path / f"{name}-eval"
    evaluation.mkdir()
    metrics = json.loads(pipeline.path("build/eval/student/metrics.json").read_text())
    (evaluation / "metrics.json").write_text(json.dumps(metrics))
    return path, evaluation


@pytest.mark.fault(
    "the MLflow server's artifact store (S3) down during `iagn register`",
    sees="exit 2: `could not log the student model ... to the artifact store of http://..., "
    "so nothing was registered: ... -> once the artifact store answers, run iagn register "
    "again (registering is idempotent)`; no secret shown",
    kept="the registry as it was (no version, no alias moved); the retry registers the version "
    "once, a third run reports it as already registered",
)
def test_register_with_the_artifact_store_down_then_retried(
    mlflow_server, tracked_pipeline, tmp_path
):
    name = "iagn-outage"  # a registered model of its own: the other tests' champion stays
    params = json.loads(json.dumps(tracked_pipeline.params))
    params["register"].update(model_name=name, register_teacher=False)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    student, evaluation = _new_student(tracked_pipeline, tmp_path, "outage")
    args = ("register", "--student", str(student), "--student-eval", str(evaluation))
    args += ("--params", str(params_file), "--out", str(tmp_path / "register"))
    env = {"IAGN_PIPELINE_RUN": "outage-register"}
    client = mlflow_server.client()

    port = int(mlflow_server.s3_endpoint.rsplit(":", 1)[1])
    mlflow_server.moto.stop()  # the MLflow server runs on; its artifact store does not
    try:
        failed = tracked_pipeline.iagn(*args, check=False, **env)
    finally:
        mlflow_server.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        mlflow_server.moto.start()
    assert failed.returncode == 2, failed.stdout + failed.stderr
    assert "Traceback" not in failed.stderr
    message = failed.stderr
    assert f"could not log the student model {student} to the artifact store of" in message
    assert "nothing was registered" in message and "run `iagn register` again" in message
    assert mlflow_server.url in message
    assert not any(secret in failed.stdout + message for secret in SECRETS)
    assert client.search_model_versions(f"name = '{name}'") == []

    done = tracked_pipeline.iagn(*args, **env)
    assert f"student: {name} version 1 (champion, challenger)" in done.stdout
    again = tracked_pipeline.iagn(*args, **env)
    assert "version 1 (aliases unchanged); already registered" in again.stdout
    (version,) = client.search_model_versions(f"name = '{name}'")
    assert version.tags["iagn.checkpoint_sha256"] == sha256_file(student)
    assert client.get_model_version(name, "1").tags["iagn.promotion"] == (
        "promoted: there was no champion"
    )
