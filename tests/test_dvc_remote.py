"""`iagn remote`: DVC remote failures are explained with the setting that fixes them.

Each case runs the real `dvc` against a real S3 server (moto) on 127.0.0.1 or a port where
nothing listens.
"""

from __future__ import annotations

from pathlib import Path

import moto.settings
import pytest
from helpers import dvc, free_port, iagn, run

AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    """A DVC project tracking one file, without AWS credentials in the environment."""
    for variable in AWS_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws either
    folder = tmp_path / "project"
    folder.mkdir()
    run(["git", "init", "--quiet", "-b", "main"], cwd=folder)
    dvc("init", "--quiet", cwd=folder)
    (folder / "labels.txt").write_text("1 Black_footed_Albatross\n")
    dvc("add", "--quiet", "labels.txt", cwd=folder)
    return folder


def s3_remote(folder: Path, url: str, endpoint: str) -> None:
    dvc("remote", "add", "-d", "store", url, cwd=folder)
    dvc("remote", "modify", "store", "endpointurl", endpoint, cwd=folder)


def failed(*args, cwd: Path, env: dict | None = None) -> str:
    result = iagn("remote", *args, cwd=cwd, env=env, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


@pytest.mark.fault(
    "no DVC remote configured, or an unknown `-r NAME`",
    sees="exit 2: `no DVC remote is configured -> add one: dvc remote add -d NAME "
    "s3://BUCKET/PATH ...` / `that DVC remote is not configured -> dvc remote list ...`",
    kept="the local data and DVC cache",
)
def test_no_remote_says_how_to_add_one(project: Path):
    message = failed("push", cwd=project)
    assert "no DVC remote is configured" in message
    assert "dvc remote add -d NAME s3://BUCKET/PATH" in message
    assert "that DVC remote is not configured" in failed("pull", "-r", "backup", cwd=project)


@pytest.mark.fault(
    "an unreachable S3 endpoint",
    sees="exit 2: `cannot reach DVC remote 'store' (s3://... at http://...) -> check the "
    "remote's endpoint (dvc remote modify store endpointurl ..., or AWS_ENDPOINT_URL) ...`",
    kept="the local data and DVC cache",
)
def test_unreachable_endpoint_names_endpointurl(project: Path):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    s3_remote(project, "s3://iagn-data/dvc", endpoint)
    env = {"AWS_ACCESS_KEY_ID": "AKIATESTIAGN", "AWS_SECRET_ACCESS_KEY": "s3cr3t-iagn"}
    message = failed("push", cwd=project, env=env)
    assert f"cannot reach DVC remote 'store' (s3://iagn-data/dvc at {endpoint})" in message
    assert "dvc remote modify store endpointurl" in message and "AWS_ENDPOINT_URL" in message


@pytest.mark.fault(
    "missing or wrong S3 credentials",
    sees="exit 2: `no S3 credentials for DVC remote 'store' ...` / `... rejected the "
    "credentials (403 Forbidden) -> check access_key_id / secret_access_key ...`; the secret "
    "never shows",
    kept="the local data; nothing is half-uploaded",
)
def test_missing_and_wrong_credentials_name_the_keys(project: Path, s3_server, monkeypatch):
    s3_remote(project, f"s3://{s3_server.bucket}/dvc", s3_server.endpoint)
    message = failed("push", cwd=project)
    assert "no S3 credentials for DVC remote 'store'" in message
    assert "AWS_ACCESS_KEY_ID" in message
    assert "dvc remote modify --local store secret_access_key" in message

    # From here on the server checks signatures: keys it does not know are refused.
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    wrong = {"AWS_ACCESS_KEY_ID": "AKIAWRONGKEY", "AWS_SECRET_ACCESS_KEY": "wr0ng-s3cr3t"}
    message = failed("push", cwd=project, env=wrong)
    assert "DVC remote 'store'" in message and "rejected the credentials (403" in message
    assert "access_key_id" in message and "AWS_SECRET_ACCESS_KEY" in message
    assert "wr0ng-s3cr3t" not in message
    monkeypatch.undo()  # signatures unchecked again, for the listing below
    assert s3_server.keys() == []  # nothing half-uploaded


@pytest.mark.fault(
    "an S3 bucket that does not exist",
    sees="exit 2: `the bucket of DVC remote 'store' (...) does not exist -> fix the remote's "
    "url (dvc remote modify store url s3://BUCKET/PATH) or create the bucket`",
    kept="the local data and DVC cache",
)
def test_missing_bucket_names_the_url_then_a_push_works(project: Path, s3_server):
    s3_remote(project, "s3://no-such-bucket/dvc", s3_server.endpoint)
    env = s3_server.credentials_env()
    message = failed("push", cwd=project, env=env)
    assert "the bucket of DVC remote 'store'" in message and "does not exist" in message
    assert "dvc remote modify store url s3://BUCKET/PATH" in message

    dvc("remote", "modify", "store", "url", f"s3://{s3_server.bucket}/dvc", cwd=project)
    pushed = iagn("remote", "push", cwd=project, env=env)
    assert "DVC remote 'store'" in pushed.stdout and "1 file pushed" in pushed.stdout
    status = iagn("remote", "status", cwd=project, env=env).stdout
    assert "in sync" in status
    # Options before targets, as `make data` writes it.
    (project / "labels.txt").unlink()
    iagn("remote", "pull", "--quiet", "labels.txt.dvc", cwd=project, env=env)
    assert (project / "labels.txt").read_text() == "1 Black_footed_Albatross\n"
    assert len(s3_server.keys()) == 1
