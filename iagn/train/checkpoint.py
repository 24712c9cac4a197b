"""Checkpoints: one file with everything needed to resume, evaluate or serve.

Contents: format tag, kind ("teacher" or "student"), model config and weights, optimizer,
scheduler, fp16 loss scaler, epoch, step, RNG states, the training config, the dataset's
manifest digest and class names, the per-epoch history and whether the run is complete.
Written atomically (temporary file + rename), so a kill during the write leaves the
previous checkpoint.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iagn.errors import IagnError
from iagn.io import write_bytes_atomic

FORMAT = "iagn-checkpoint/1"


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Serialize to memory first, then write atomically: no half-written checkpoint."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buffer)
    return write_bytes_atomic(path, buffer.getvalue())


def load_checkpoint(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise IagnError(
            f"checkpoint {path} does not exist; pass the file an earlier step wrote "
            "(e.g. the --out of `iagn train-stage`)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated zip, pickle errors, foreign formats
        raise IagnError(
            f"checkpoint {path} is corrupt or not a torch file ({type(exc).__name__}: {exc}); "
            "re-run the step that wrote it"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise IagnError(
            f"{path} is not an iagn checkpoint (expected format {FORMAT}); "
            "pass a file written by iagn train-stage or iagn distill"
        )
    if kind is not None and checkpoint.get("kind") != kind:
        raise IagnError(
            f"checkpoint {path} holds a {checkpoint.get('kind')} model, expected a {kind}"
        )
    return checkpoint


def check_compatible(
    checkpoint: dict[str, Any], backbone: str, num_classes: int, path: Path
) -> None:
    """A clear error when a checkpoint cannot initialize the requested model."""
    config = checkpoint["model_config"]
    if config["backbone"] != backbone:
        raise IagnError(
            f"checkpoint {path} was trained with backbone {config['backbone']}, but params.yaml "
            f"asks for {backbone}; use the same model.backbone or start without --init"
        )
    if config["num_classes"] != num_classes:
        raise IagnError(
            f"checkpoint {path} has {config['num_classes']} classes, but the dataset has "
            f"{num_classes}; point --data at the dataset it was trained on, or start without "
            "--init"
        )
