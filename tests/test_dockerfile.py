"""The component image's Dockerfile: lint-clean, non-root, CPU torch by default, no secrets."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"


def test_hadolint_passes_at_warning_threshold():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_runs_as_numeric_non_root_user():
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert users, "the image must switch to a non-root user"
    assert users[-1].split(":")[0].isdigit() and users[-1] != "0"


def test_torch_pair_matches_pyproject_and_defaults_to_cpu():
    text = DOCKERFILE.read_text()
    pins = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(p for p in pins if p.startswith("torch=="))
    vision_pin = next(p for p in pins if p.startswith("torchvision=="))
    assert f"ARG TORCH_VERSION={torch_pin.split('==')[1]}" in text
    assert f"ARG TORCHVISION_VERSION={vision_pin.split('==')[1]}" in text
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text


def test_no_secrets_baked_in():
    text = DOCKERFILE.read_text()
    for line in text.splitlines():
        if line.startswith(("ENV", "ARG")):
            assert not re.search(r"(KEY|SECRET|TOKEN|PASSWORD)", line, re.IGNORECASE), line
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    for private in (".git", ".venv", ".dvcstore", "data", "mlflow.db"):
        assert private in ignored


def test_make_image_says_when_no_engine_exists(tmp_path: Path):
    # A PATH with only the tools the script needs besides an engine.
    for tool in ("dirname",):
        os.symlink(shutil.which(tool), tmp_path / tool)
    result = subprocess.run(
        ["/bin/bash", str(REPO_ROOT / "scripts" / "build_image.sh")],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": str(tmp_path)},
    )
    assert result.returncode == 1
    assert "no container engine found: install docker, podman or buildah" in result.stderr


def test_make_image_stamps_the_git_commit_into_the_image(tmp_path: Path):
    """The image's runs name the commit they were built from (no checkout in a container)."""
    assert 'ARG IAGN_GIT_COMMIT=""' in DOCKERFILE.read_text()
    assert "IAGN_GIT_COMMIT=${IAGN_GIT_COMMIT}" in DOCKERFILE.read_text()
    for tool in ("dirname", "git"):
        os.symlink(shutil.which(tool), tmp_path / tool)
    engine = tmp_path / "podman"  # stands in for the engine: prints what it was asked to do
    engine.write_text('#!/bin/sh\necho "podman $*"\n')
    engine.chmod(0o755)
    result = subprocess.run(
        ["/bin/bash", str(REPO_ROOT / "scripts" / "build_image.sh")],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
        env={"PATH": str(tmp_path), "IMAGE": "registry.example/iagn:test"},
    )
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    ).stdout.strip()
    assert "building registry.example/iagn:test with podman" in result.stdout
    assert f"--build-arg IAGN_GIT_COMMIT={head}" in result.stdout
    assert "-t registry.example/iagn:test" in result.stdout
