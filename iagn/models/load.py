"""Rebuild a teacher or student from its checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from iagn.models.iagn import IAGN, ModelConfig
from iagn.models.student import Student, StudentConfig
from iagn.train.checkpoint import load_checkpoint


def model_from_checkpoint(checkpoint: dict) -> torch.nn.Module:
    """The model of a loaded checkpoint, weights loaded, in eval mode, on the CPU."""
    if checkpoint["kind"] == "teacher":
        config = ModelConfig.from_dict({**checkpoint["model_config"], "weights": "none"})
        model: torch.nn.Module = IAGN(config)
    else:
        config = StudentConfig.from_dict({**checkpoint["model_config"], "weights": "none"})
        model = Student(config)
    model.load_state_dict(checkpoint["model_state"])
    return model.eval()


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    checkpoint = load_checkpoint(path)
    return model_from_checkpoint(checkpoint), checkpoint
