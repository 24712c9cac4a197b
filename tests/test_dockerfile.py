"""The component image's Dockerfile and `make image`'s script: lint-clean, non-root, CPU torch
by default, no secrets, dependencies before the code; one message per way the build can fail
(no engine, an engine that cannot run, a base that cannot be pulled, pip). The image built
and run for real: tests/test_container.py."""

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


def test_base_image_is_a_build_argument_defaulting_to_the_public_python_image():
    text = DOCKERFILE.read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm\nFROM ${BASE_IMAGE}" in text


def test_dependencies_come_before_the_code_and_pip_caches_outside_the_layers():
    """A code change rebuilds only the layers after `COPY iagn`: torch and the dependencies
    (from pyproject.toml alone) stay cached; pip's cache is a build cache mount."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if line.strip()]
    torch = next(i for i, line in enumerate(lines) if '"torch==${TORCH_VERSION}"' in line)
    deps = next(i for i, line in enumerate(lines) if "pip install -r /tmp/deps/" in line)
    code = next(i for i, line in enumerate(lines) if line.startswith("COPY iagn"))
    commit = next(i for i, line in enumerate(lines) if line.startswith("ARG IAGN_GIT_COMMIT"))
    assert torch < deps < code < commit
    assert "COPY pyproject.toml /tmp/deps/pyproject.toml" in lines[deps - 4 : deps]
    for line in lines:
        if line.startswith("RUN") and "pip" in line:
            assert "--mount=type=cache,target=/root/.cache/pip" in line, line
    assert "PIP_NO_CACHE_DIR" not in DOCKERFILE.read_text()


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
    assert "apt-get install -y podman buildah runc" in result.stderr


def _fake_engine(tmp_path: Path, script: str, tools=("dirname", "git", "grep", "tail", "tee")):
    """A PATH with `podman` standing in for the engine (a shell script) and the tools."""
    for tool in tools:
        os.symlink(shutil.which(tool), tmp_path / tool)
    engine = tmp_path / "podman"
    engine.write_text("#!/bin/sh\n" + script)
    engine.chmod(0o755)
    return {"PATH": str(tmp_path), "IMAGE": "registry.example/iagn:test", "TMPDIR": str(tmp_path)}


def _build(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["/bin/bash", str(REPO_ROOT / "scripts" / "build_image.sh")],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO_ROOT,
        env=env,
    )


def test_make_image_says_when_the_engine_cannot_run(tmp_path: Path):
    env = _fake_engine(
        tmp_path, 'echo "Error: cannot set ulimits: operation not permitted" >&2; exit 125\n'
    )
    result = _build(env)
    assert result.returncode == 1
    assert "a container engine is installed but does not work" in result.stderr
    assert "podman: Error: cannot set ulimits" in result.stderr
    assert "bash scripts/container_engine.sh setup" in result.stderr


def test_make_image_says_when_the_base_image_cannot_be_pulled(tmp_path: Path):
    # info works, the base is not here and cannot be pulled
    env = _fake_engine(tmp_path, 'case "$1" in info) exit 0;; *) exit 1;; esac\n')
    result = _build({**env, "BASE_IMAGE": "registry.example/python:3.11"})
    assert result.returncode == 1
    assert "cannot pull BASE_IMAGE=registry.example/python:3.11" in result.stderr
    assert "bash scripts/base_image.sh" in result.stderr


def test_a_build_that_fails_in_pip_says_so_and_what_to_set(tmp_path: Path):
    env = _fake_engine(
        tmp_path,
        'case "$1" in build) echo "ERROR: No matching distribution found for torch==2.14.1";'
        ' echo "Error: building at STEP RUN pip install"; exit 1;; esac; exit 0\n',
    )
    result = _build({**env, "TORCH_INDEX": "https://example.invalid/whl"})
    assert result.returncode == 1
    assert "the build failed in pip (ERROR: No matching distribution found for torch" in (
        result.stderr
    )
    assert "registry.example/iagn:test is unchanged" in result.stderr
    assert "TORCH_INDEX=https://pypi.org/simple" in result.stderr


def test_make_image_stamps_the_git_commit_into_the_image(tmp_path: Path):
    """The image's runs name the commit they were built from (no checkout in a container)."""
    assert 'ARG IAGN_GIT_COMMIT=""' in DOCKERFILE.read_text()
    assert "IAGN_GIT_COMMIT=${IAGN_GIT_COMMIT}" in DOCKERFILE.read_text()
    for tool in ("dirname", "git", "grep", "tail", "tee"):
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
