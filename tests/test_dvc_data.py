"""DVC tracks the default dataset; push/pull work with the local remote and with S3 (moto)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from helpers import dvc, iagn, run, tree_bytes

UP_TO_DATE = "Data and pipelines are up to date."


@pytest.fixture
def project_clone(tmp_path: Path) -> Path:
    """A fresh clone of this repository's committed state, as CI and new users get it."""
    clone = tmp_path / "clone"
    run(["git", "clone", "--quiet", REPO_ROOT, clone], cwd=tmp_path)
    return clone


def test_data_dvc_tracks_the_regenerated_default_dataset(project_clone: Path, tmp_path: Path):
    """On a fresh clone the default dataset regenerates byte-identically to data.dvc."""
    assert (project_clone / "data.dvc").is_file()
    config = (project_clone / ".dvc" / "config").read_text()
    assert "remote = local" in config and "../.dvcstore" in config
    iagn(
        "data",
        "synth",
        "--params",
        "params.yaml",
        "--out",
        "data/synth",
        "--quiet",
        cwd=project_clone,
    )
    # Adding the regenerated folder must leave the committed data.dvc exactly as it was.
    dvc("add", "--quiet", "data", cwd=project_clone)
    assert run(["git", "status", "--porcelain"], cwd=project_clone).stdout == ""
    assert UP_TO_DATE in dvc("status", "data.dvc", cwd=project_clone).stdout

    # The default local remote (ignored by git) works offline: push, then pull elsewhere.
    dvc("push", "data.dvc", cwd=project_clone)
    assert any((project_clone / ".dvcstore").rglob("*"))
    assert run(["git", "status", "--porcelain"], cwd=project_clone).stdout == ""

    second = tmp_path / "second"
    run(["git", "clone", "--quiet", REPO_ROOT, second], cwd=tmp_path)
    dvc("remote", "modify", "--local", "local", "url", project_clone / ".dvcstore", cwd=second)
    dvc("pull", "data.dvc", cwd=second)
    assert tree_bytes(second / "data") == tree_bytes(project_clone / "data")
    assert UP_TO_DATE in dvc("status", "data.dvc", cwd=second).stdout


def test_s3_remote_push_and_pull_into_a_fresh_clone(s3_server, tiny_synth: Path, tmp_path: Path):
    endpoint = s3_server.endpoint
    credentials = {
        "aws_access_key_id": s3_server.access_key_id,
        "aws_secret_access_key": s3_server.secret_access_key,
    }
    origin = tmp_path / "origin"
    origin.mkdir()
    run(["git", "init", "--quiet", "-b", "main"], cwd=origin)
    dvc("init", "--quiet", cwd=origin)
    shutil.copytree(tiny_synth, origin / "data" / "synth")
    dvc("add", "--quiet", "data", cwd=origin)
    dvc("remote", "add", "-d", "store", f"s3://{s3_server.bucket}/dvc", cwd=origin)
    dvc("remote", "modify", "store", "endpointurl", endpoint, cwd=origin)
    # Credentials go to the git-ignored local config, never to the committed one.
    dvc(
        "remote",
        "modify",
        "--local",
        "store",
        "access_key_id",
        credentials["aws_access_key_id"],
        cwd=origin,
    )
    dvc(
        "remote",
        "modify",
        "--local",
        "store",
        "secret_access_key",
        credentials["aws_secret_access_key"],
        cwd=origin,
    )
    run(["git", "add", "-A"], cwd=origin)
    run(["git", "commit", "--quiet", "-m", "track data"], cwd=origin)
    committed = run(["git", "show", "HEAD:.dvc/config"], cwd=origin).stdout
    assert endpoint in committed
    assert credentials["aws_secret_access_key"] not in committed
    assert "config.local" not in run(["git", "ls-files"], cwd=origin).stdout

    dvc("push", cwd=origin)
    keys = s3_server.keys()
    assert len(keys) == 24 + 6 + 1  # images, annotation files, the directory listing
    assert all(k.startswith("dvc/files/md5/") for k in keys)

    fresh = tmp_path / "fresh"
    run(["git", "clone", "--quiet", origin, fresh], cwd=tmp_path)
    assert not (fresh / "data").exists()
    # This time the credentials come from the environment, as on a CI runner or in a pod.
    env = s3_server.credentials_env()
    dvc("pull", cwd=fresh, env=env)
    assert tree_bytes(fresh / "data") == tree_bytes(origin / "data")
    assert UP_TO_DATE in dvc("status", cwd=fresh, env=env).stdout
    assert run(["git", "status", "--porcelain"], cwd=fresh).stdout == ""
