"""`--param key=value`: pipeline parameters and params.yaml overrides in one flag.

A key that names a pipeline parameter (`data_rev`, `experiment`, ...) sets it; a dotted key
(`stage3.epochs`, `register.gate.min_top1`) goes into the `params_overrides` parameter,
whose values every step applies to params.yaml. Values are read as YAML, so `2` is an int,
`0.5` a float, `null` None and `[8, 4, 2]` a list; string parameters stay strings.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from iagn.errors import IagnError
from pipeline.dag import CompileOptions, parameter_names

STRUCTURED = {"params_overrides": dict, "node_selector": dict, "tolerations": list}
INTEGER = {"gpu_count"}


def _parse_structured(name: str, text: str) -> Any:
    import yaml

    kind = STRUCTURED[name]
    try:
        value = yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError as exc:
        raise IagnError(f"--param {name}: not valid JSON/YAML ({exc})") from None
    if value is None:
        value = kind()
    if not isinstance(value, kind):
        raise IagnError(f"--param {name} must be a JSON {kind.__name__}, got {text!r}")
    return value


def parse_params(
    items: Sequence[str], options: CompileOptions | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pipeline arguments, params.yaml overrides) from `key=value` strings."""
    from components.runtime import has_credentials
    from iagn.params import parse_value

    names = parameter_names(options)
    arguments: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise IagnError(f"--param {item!r} must be key=value, e.g. stage3.epochs=2")
        if key == "params_overrides":
            overrides.update(_parse_structured(key, text))
        elif key in STRUCTURED:
            arguments[key] = _parse_structured(key, text)
        elif key in INTEGER:
            try:
                arguments[key] = int(text)
            except ValueError:
                raise IagnError(f"--param {key} must be an integer, got {text!r}") from None
        elif key in names:
            arguments[key] = text
        elif "." in key:
            overrides[key] = parse_value(text)
        else:
            hint = (
                " (compile with --gpu for accelerator_type and gpu_count)"
                if key in ("accelerator_type", "gpu_count")
                else ""
            )
            raise IagnError(
                f"--param {key}: not a pipeline parameter{hint}; parameters: "
                f"{', '.join(names)}; params.yaml keys are dotted, e.g. stage3.epochs=2"
            )
    if has_credentials(str(arguments.get("tracking_uri", ""))):
        raise IagnError(
            "--param tracking_uri carries credentials, and pipeline parameters are visible to "
            "everyone who sees the run: pass the bare URI and put MLFLOW_TRACKING_USERNAME / "
            "MLFLOW_TRACKING_PASSWORD in the Kubernetes secret (or the environment, for "
            "run-local)"
        )
    return arguments, overrides


def check_overrides(overrides: dict[str, Any], params_file: str | Path = "params.yaml") -> None:
    """Fail early on an override the steps would reject (when params.yaml is at hand)."""
    from iagn.params import apply_overrides, load_params

    if overrides and Path(params_file).is_file():
        apply_overrides(copy.deepcopy(load_params(params_file)), overrides)


def shown(arguments: dict[str, Any]) -> str:
    """The arguments as one line for the console."""
    return ", ".join(f"{key}={json.dumps(value)}" for key, value in sorted(arguments.items()))
