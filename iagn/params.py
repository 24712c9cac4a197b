"""`params.yaml`: every hyperparameter, grouped by step (the same keys DVC and KFP override)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from iagn.errors import IagnError

DEFAULT_PARAMS = Path("params.yaml")


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise IagnError(
            f"params file {path} does not exist; pass --params with the project's params.yaml"
        )
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise IagnError(f"params file {path} is not valid YAML: {exc}") from None
    if not isinstance(params, dict):
        raise IagnError(f"params file {path} must hold a mapping of step sections")
    return params


def section(params: dict[str, Any], *keys: str) -> dict[str, Any]:
    """The nested mapping at `keys` (e.g. "data", "synth"); a clear error when absent."""
    node: Any = params
    for depth, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            dotted = ".".join(keys[: depth + 1])
            raise IagnError(f"params.yaml has no `{dotted}` section; add it (see README)")
        node = node[key]
    if not isinstance(node, dict):
        raise IagnError(f"params.yaml `{'.'.join(keys)}` must be a mapping")
    return node
