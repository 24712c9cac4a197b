"""Shared fixtures: small synthetic datasets generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from iagn.data.synth import SynthConfig, generate

# Keep third-party tools quiet and offline in every test (see ../shared/STACK.md).
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = SynthConfig(classes=4, images_per_class=6, size=64, seed=3)


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> Path:
    """4 classes x 6 images at 64 px: for tests of readers, manifests and loaders."""
    return generate(tmp_path_factory.mktemp("synth") / "tiny", TINY)
