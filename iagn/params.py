"""`params.yaml`: every hyperparameter, grouped by step (the same keys DVC and KFP override)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from iagn.errors import IagnError

DEFAULT_PARAMS = Path("params.yaml")


def load_params(path: str | Path = DEFAULT_PARAMS, *overlays: str | Path) -> dict[str, Any]:
    """A params file, with each overlay file merged over it in turn (`merge_params`)."""
    params = _read_params(Path(path))
    for overlay in overlays:
        params = merge_params(params, _read_params(Path(overlay)))
    return params


def _read_params(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise IagnError(
            f"params file {path} does not exist; pass --params with the project's params.yaml"
        )
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError:
        raise IagnError(
            f"params file {path} is not a text file (a checkpoint, an image?); pass the "
            "project's params.yaml"
        ) from None
    except yaml.YAMLError as exc:
        raise IagnError(f"params file {path} is not valid YAML: {exc}") from None
    if not isinstance(params, dict):
        raise IagnError(f"params file {path} must hold a mapping of step sections")
    return params


def merge_params(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overlay` on top, as a new mapping: nested mappings merge key by key,
    anything else (values, lists, null) replaces what `base` had."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_params(merged[key], value)
        else:
            merged[key] = value
    return merged


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


def parse_value(text: str) -> Any:
    """A command-line value as YAML reads it: `2` -> 2, `0.5` -> 0.5, `null`, `[8, 4]`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _whole_numbers_as_ints(value: Any) -> Any:
    """KFP passes dict parameters as protobuf Structs, whose numbers are all floats: `epochs:
    2` arrives as 2.0. Whole numbers become ints again (an int where a float is expected is
    harmless; a float epoch count is not)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_whole_numbers_as_ints(item) for item in value]
    if isinstance(value, dict):
        return {key: _whole_numbers_as_ints(item) for key, item in value.items()}
    return value


def apply_overrides(params: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Set each dotted key (`stage3.epochs`, `register.gate.min_top1`) in `params`.

    The first part must be a section of params.yaml (a typo would otherwise train with the
    default silently); deeper keys may be new, because e.g. a `stage2` section may override
    any `train` key.
    """
    for dotted, value in (overrides or {}).items():
        value = _whole_numbers_as_ints(value)
        keys = [part for part in str(dotted).split(".") if part]
        if len(keys) < 2:
            raise IagnError(
                f"params override {dotted!r} must be a dotted key like stage3.epochs "
                "(section.key); sections: " + ", ".join(sorted(params))
            )
        if keys[0] not in params:
            raise IagnError(
                f"params override {dotted!r}: params.yaml has no section {keys[0]!r}; "
                "sections: " + ", ".join(sorted(params))
            )
        node = params
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                raise IagnError(f"params override {dotted!r}: `{where}` is a value, not a section")
            node = child
        node[keys[-1]] = value
    return params


# What a trained model is, beyond its seed: runs whose params agree on these sections, seeds
# aside, are the same recipe, and their spread is the seed-to-seed noise (the model card).
RECIPE_SECTIONS = ("data", "model", "train", "stage1", "stage2", "stage3", "distill", "serve")
SEED_KEYS = ("seed",)


def recipe_digest(params: Mapping[str, Any]) -> str:
    """sha256 (16 hex digits) of the recipe sections with every `seed` key left out."""
    import hashlib
    import json

    def without_seeds(node: Any) -> Any:
        if isinstance(node, Mapping):
            return {k: without_seeds(v) for k, v in node.items() if k not in SEED_KEYS}
        return node

    recipe = {name: without_seeds(params.get(name)) for name in RECIPE_SECTIONS}
    text = json.dumps(recipe, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
