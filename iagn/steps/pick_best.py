"""Step `pick-best`: a sweep's best trial on the validation metric, and the sweep's summary.

Each trial's student was evaluated on the validation split (`evaluate.split: val` in the
trial's params); the best is the highest student val top-1, ties to the earlier trial. A
trial evaluated on any other split is an error: the test split judges only the winner,
once, after it has been chosen. The summary is a Markdown table of every trial (its
overrides and validation numbers), a plot of val top-1 against each swept key, and
sweep.json with both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iagn.errors import IagnError
from iagn.io import write_text_atomic

SELECT_METRIC = "top1"
SELECT_SPLIT = "val"
# The validation numbers of each trial: the summary's columns and the trial run's metrics.
TRIAL_METRICS = (
    "top1",
    "top5",
    "pointing_game",
    "pointing_game_lift",
    "box_accuracy",
    "ece",
    "latency_ms",
)
SUMMARY_MD = "summary.md"
SUMMARY_PNG = "summary.png"
SWEEP_JSON = "sweep.json"


@dataclass
class TrialResult:
    trial: str
    overrides: dict[str, Any]
    metrics: dict[str, Any]  # metrics.json of the trial's student evaluation

    @property
    def score(self) -> float:
        value = self.metrics.get(SELECT_METRIC)
        if not isinstance(value, int | float) or math.isnan(value):
            return -math.inf
        return float(value)


def read_metrics(evaluation: str | Path) -> dict[str, Any]:
    path = Path(evaluation) / "metrics.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise IagnError(f"{path}: not a readable evaluation ({exc})") from None


def trial_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """`val_top1`, `val_pointing_game`, ...: what a trial run shows (named by the split)."""
    split = metrics.get("split", SELECT_SPLIT)
    return {
        f"{split}_{name}": float(metrics[name])
        for name in TRIAL_METRICS
        if isinstance(metrics.get(name), int | float)
        and not isinstance(metrics.get(name), bool)
        and math.isfinite(metrics[name])
    }


def choose(results: Sequence[TrialResult]) -> TrialResult:
    """The best trial by student val top-1; on a tie the earlier one (the given order)."""
    if not results:
        raise IagnError("the sweep has no trial results to choose from")
    for result in results:
        split = result.metrics.get("split")
        if split != SELECT_SPLIT:
            raise IagnError(
                f"trial {result.trial} was evaluated on the {split!r} split; a sweep chooses "
                f"on the {SELECT_SPLIT!r} split only (the test split judges the winner alone)"
            )
        if result.metrics.get("kind") != "student":
            raise IagnError(
                f"trial {result.trial}: a {result.metrics.get('kind')} evaluation; the sweep "
                "chooses by the student's"
            )
    best = results[0]
    for result in results[1:]:
        if result.score > best.score:  # strictly: a tie keeps the earlier trial
            best = result
    return best


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def summary_markdown(
    sweep_id: str, keys: Sequence[str], results: Sequence[TrialResult], best: str
) -> str:
    columns = [name for name in TRIAL_METRICS if any(name in r.metrics for r in results)]
    header = ["trial", *keys, *(f"val {name}" for name in columns), "best"]
    lines = [
        f"# Sweep {sweep_id}",
        "",
        f"{len(results)} trials; the best by student val {SELECT_METRIC} (ties: the earlier "
        f"trial) is **{best}**. It alone is then evaluated on the test split and registered "
        "as `challenger`.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
    ]
    for result in results:
        row = [result.trial]
        row += [_cell(result.overrides.get(key, "")) for key in keys]
        row += [_cell(result.metrics.get(name, "")) for name in columns]
        row.append("**best**" if result.trial == best else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def run(
    sweep_id: str, keys: Sequence[str], results: Sequence[TrialResult], out: str | Path
) -> dict[str, Any]:
    """Choose, then write summary.md, summary.png and sweep.json to `out`; the summary."""
    from iagn.evaluation.plots import sweep_plot

    best = choose(results)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / SUMMARY_MD, summary_markdown(sweep_id, keys, results, best.trial))
    rows = [(r.trial, r.overrides, float(r.metrics.get(SELECT_METRIC, math.nan))) for r in results]
    sweep_plot(list(keys), rows, best.trial, out / SUMMARY_PNG, f"val {SELECT_METRIC}")
    summary = {
        "sweep_id": sweep_id,
        "keys": list(keys),
        "metric": f"{SELECT_SPLIT}_{SELECT_METRIC}",
        "best_trial": best.trial,
        "best_overrides": best.overrides,
        "trials": [
            {"trial": r.trial, "overrides": r.overrides, "metrics": trial_metrics(r.metrics)}
            for r in results
        ],
    }
    write_text_atomic(out / SWEEP_JSON, json.dumps(summary, indent=2) + "\n")
    return summary
