"""Rebuild a teacher or student from its checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from iagn.checkpoint import load_checkpoint
from iagn.errors import IagnError
from iagn.models.iagn import IAGN, ModelConfig
from iagn.models.student import Student, StudentConfig

MODEL_KINDS = ("teacher", "student")
# What using a model needs beyond its kind: weights, architecture, preprocessing and classes.
DATA_KEYS = ("class_names", "resize", "crop", "digest")
USE = (
    "evaluate, predict, explain and serving take a teacher (the --out of `iagn train-stage "
    "--stage 3`) or a student (the --out of `iagn distill`)"
)


def check_model_checkpoint(checkpoint: dict[str, Any], source: object = "the checkpoint") -> None:
    """IagnError unless `checkpoint` holds a teacher or student model that can be rebuilt."""
    kind = checkpoint.get("kind")
    if kind not in MODEL_KINDS:
        held = f"a {kind!a}" if isinstance(kind, str) else "no model kind"
        raise IagnError(f"{source} is an iagn checkpoint but holds {held}, not a model; {USE}")
    parts = ("model_config", "model_state", "data")
    missing = [key for key in parts if not isinstance(checkpoint.get(key), dict)]
    data = checkpoint["data"] if isinstance(checkpoint.get("data"), dict) else {}
    missing += [f"data.{key}" for key in DATA_KEYS if key not in data]
    if missing:
        raise IagnError(
            f"{source} claims to hold a {kind} but lacks {', '.join(missing)}; it is damaged "
            f"or was not written by iagn. Re-run the step that wrote it ({USE})"
        )


def model_from_checkpoint(
    checkpoint: dict[str, Any], source: object = "the checkpoint"
) -> torch.nn.Module:
    """The model of a loaded checkpoint, weights loaded, in eval mode, on the CPU."""
    check_model_checkpoint(checkpoint, source)
    kind = checkpoint["kind"]
    try:
        if kind == "teacher":
            config = ModelConfig.from_dict({**checkpoint["model_config"], "weights": "none"})
            model: torch.nn.Module = IAGN(config)
        else:
            config = StudentConfig.from_dict({**checkpoint["model_config"], "weights": "none"})
            model = Student(config)
        model.load_state_dict(checkpoint["model_state"])
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise IagnError(
            f"{source} holds a {kind} whose configuration or weights do not make a {kind} model "
            f"({reason}); it is damaged or from another iagn version. Re-run the step that "
            "wrote it"
        ) from None
    return model.eval()


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """The teacher or student at `path` (loaded without running code from it) and its
    checkpoint; IagnError for anything else."""
    checkpoint = load_checkpoint(path)
    return model_from_checkpoint(checkpoint, f"checkpoint {path}"), checkpoint
