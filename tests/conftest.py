"""Shared fixtures: small synthetic datasets generated once per test session, an S3 server."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from helpers import dvc, free_port, iagn, run
from moto.server import ThreadedMotoServer

from iagn.data.synth import SynthConfig, generate
from iagn.params import load_params

# Keep third-party tools quiet and offline in every test (see ../shared/STACK.md).
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = SynthConfig(classes=4, images_per_class=6, size=64, seed=3)
# Seconds instead of minutes (one epoch per stage, 64 px, an open gate): the benchmarks load
# the same overlay.
SMOKE = REPO_ROOT / "configs" / "smoke.yaml"


def smoke_params(params_file: Path = REPO_ROOT / "params.yaml") -> dict:
    """`params_file` with configs/smoke.yaml merged over it."""
    return load_params(params_file, SMOKE)


def dvc_project(base: Path) -> Path:
    """`base`/project: a git + DVC project with the smoke params and their synthetic dataset,
    pushed to a DVC remote beside it (`base`/dvc-store): what `iagn-pipeline run-local` and
    `sweep --local` fetch from."""
    import yaml

    root = base / "project"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(smoke_params(), sort_keys=False))
    run(["git", "init", "--quiet", "-b", "main"], cwd=root)
    iagn("data", "synth", "--params", "params.yaml", "--out", "data/synth", "--quiet", cwd=root)
    dvc("init", "--quiet", cwd=root)
    dvc("remote", "add", "-d", "store", str(base / "dvc-store"), cwd=root)
    dvc("add", "--quiet", "data", cwd=root)
    dvc("push", "--quiet", cwd=root)
    run(["git", "add", "-A"], cwd=root)
    run(["git", "commit", "--quiet", "-m", "tiny project"], cwd=root)
    return root


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> Path:
    """4 classes x 6 images at 64 px: for tests of readers, manifests and loaders."""
    return generate(tmp_path_factory.mktemp("synth") / "tiny", TINY)


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key_id: str
    secret_access_key: str
    bucket: str

    def client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
        )

    def keys(self) -> list[str]:
        listed = self.client().list_objects_v2(Bucket=self.bucket)
        return [entry["Key"] for entry in listed.get("Contents", [])]

    def credentials_env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
        }


@pytest.fixture
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1 with one empty bucket.

    moto keeps one store per process (the MLflow fixture's server shares it), hence a bucket
    name of its own per server."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    s3 = S3Server(f"http://127.0.0.1:{port}", "AKIATESTIAGN", "s3cr3t-iagn", f"iagn-dvc-{port}")
    s3.client().create_bucket(Bucket=s3.bucket)
    yield s3
    server.stop()
