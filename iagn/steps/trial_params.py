"""Step `trial-params`: the params of one sweep trial, and of the winner's final judgement.

A trial's params are the run's params (params.yaml with the run's overrides) with the
trial's overrides applied, `evaluate.split: val` (trials are compared on validation data
only) and a `sweep` section {id, trial, overrides}: the steps' MLflow runs nest under the
trial's run when they see it (iagn/tracking/trial.py). The overrides in that section are
read back from the applied params, so they hold the values the steps use (KFP hands dict
parameters over as floats: 1.0 is the int 1 again).

The winner is then judged on the run's own evaluation split (test by default) with its
trial's params minus the `sweep` section: it is no longer a trial.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from iagn.errors import IagnError
from iagn.params import apply_overrides, load_params

SECTION = "sweep"
TRIAL_SPLIT = "val"


def _lookup(params: Mapping[str, Any], dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        node = node[part]
    return node


def apply_trial(
    params: Mapping[str, Any], trial: Mapping[str, Any], sweep_id: str
) -> dict[str, Any]:
    """`params` with the trial's overrides, the validation split and the `sweep` section."""
    name = str(trial.get("trial") or "")
    overrides = trial.get("overrides")
    if not name or not isinstance(overrides, Mapping):
        raise IagnError(f"a sweep trial must be {{trial, overrides}}, got {dict(trial)!r}")
    if SECTION in params:
        raise IagnError("params.yaml already has a `sweep` section: a sweep's trial params")
    settings = apply_overrides(copy.deepcopy(dict(params)), dict(overrides))
    settings.setdefault("evaluate", {})["split"] = TRIAL_SPLIT
    applied = {key: _lookup(settings, key) for key in overrides}
    uri = settings.get("train", {}).get("checkpoint_uri")
    if uri:
        # Trials run side by side with other configurations: each its own checkpoint prefix
        # (one shared prefix would refuse every trial but the first, iagn/train/durable.py).
        settings["train"]["checkpoint_uri"] = f"{uri.rstrip('/')}/{sweep_id}/{name}"
    settings[SECTION] = {"id": sweep_id, "trial": name, "overrides": applied}
    return settings


def trial_settings(
    base_params: str | Path, trial: Mapping[str, Any], sweep_id: str
) -> dict[str, Any]:
    return apply_trial(load_params(base_params), trial, sweep_id)


def winner_settings(trial_params: str | Path, base_params: str | Path) -> dict[str, Any]:
    """The winning trial's params, to judge it on the run's evaluation split (not a trial)."""
    settings = load_params(trial_params)
    base = load_params(base_params)
    settings.pop(SECTION, None)
    split = base.get("evaluate", {}).get("split", "test")
    if split == TRIAL_SPLIT:
        raise IagnError(
            "evaluate.split is 'val' in the run's params: a sweep chooses on the validation "
            "split, so the winner must be judged on another (test)"
        )
    settings.setdefault("evaluate", {})["split"] = split
    return settings
