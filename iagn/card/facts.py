"""What a model card says, gathered in one place: the registered version, its checkpoint and
evaluation, and what MLflow knows around them (the pipeline's data validation, the other
seeds of the same recipe, the champion it was compared with)."""

from __future__ import annotations

import json
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iagn.provenance import TAG_DATA_VERSION, TAG_GIT_COMMIT, TAG_GIT_DIRTY
from iagn.registry import (
    TAG_CHECKPOINT,
    TAG_EVAL_DIGEST,
    TAG_EVAL_SPLIT,
    TAG_KIND,
    TAG_PROMOTION,
    TAG_RECIPE,
    TAG_WEIGHTS,
)
from iagn.tracking import TAG_PIPELINE_RUN, TAG_STEP

# The served prediction's numbers whose seed-to-seed spread the card reports.
SPREAD_METRICS = ("top1", "top5", "pointing_game", "box_accuracy", "ece", "latency_ms")
VALIDATION_FILE = "validation.json"


@dataclass
class Spread:
    n: int
    mean: float
    std: float
    low: float
    high: float


@dataclass
class CardFacts:
    name: str
    version: str
    kind: str
    model_id: str | None
    decision: str  # the version's iagn.promotion tag: "promoted: ..." / "not promoted: ..."
    version_tags: dict[str, str]
    checkpoint: dict[str, Any]
    params: dict[str, Any]
    metrics: dict[str, Any]  # metrics.json of the version's evaluation
    eval_dir: Path
    identity: list[tuple[str, str]]
    champion: tuple[str, dict[str, str]] | None = None  # (version, tags) compared with
    validation: dict[str, Any] | None = None  # validation.json of the pipeline's validate step
    seeds: int = 1  # models of this recipe evaluated on the same data (this one included)
    spread: dict[str, Spread] = field(default_factory=dict)


def identity_rows(
    version_tags: dict[str, str],
    checkpoint: dict[str, Any],
    metrics: dict[str, Any],
    runs: dict[str, str | None],
) -> list[tuple[str, str]]:
    """(label, value) rows naming exactly what this version is and where it came from."""
    commit = version_tags.get(TAG_GIT_COMMIT)
    dirty = " (uncommitted changes)" if version_tags.get(TAG_GIT_DIRTY) == "true" else ""
    digest = str(metrics.get("eval_data_digest", ""))[:16]

    def code(value: str | None, missing: str = "not recorded") -> str:
        return f"`{value}`" if value else missing

    return [
        ("git commit", code(commit) + dirty),
        ("DVC data version", code(version_tags.get(TAG_DATA_VERSION))),
        ("training data digest", code(checkpoint.get("data", {}).get("digest"))),
        (
            "evaluated on",
            f"the {metrics.get('split', 'test')} split, {metrics.get('images', '?')} images "
            f"(data digest {code(digest)})",
        ),
        ("pipeline run", code(version_tags.get(TAG_PIPELINE_RUN))),
        ("MLflow parent run", code(runs.get("parent"), "none (registered outside a pipeline)")),
        ("MLflow source run", code(runs.get("source"))),
        ("MLflow register run", code(runs.get("register"))),
        ("checkpoint sha256", code(version_tags.get(TAG_CHECKPOINT))),
        ("weights sha256", code(version_tags.get(TAG_WEIGHTS))),
    ]


def spread_of(evaluations: list[dict[str, float]]) -> dict[str, Spread]:
    """Per metric, over the evaluations that have it: mean, sample std, min, max."""
    spread = {}
    for name in SPREAD_METRICS:
        values = [float(e[name]) for e in evaluations if isinstance(e.get(name), int | float)]
        if values:
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            mean = statistics.fmean(values)
            spread[name] = Spread(len(values), mean, std, min(values), max(values))
    return spread


def seed_evaluations(
    client, experiment_id: str, kind: str, metrics: dict[str, Any], recipe: str, sha: str
) -> list[dict[str, float]]:
    """This model's metrics and those of every other model of the same recipe (seeds aside,
    `iagn.params.recipe_digest`) evaluated on the same data and split: one per checkpoint,
    its newest evaluation."""
    digest, split = metrics.get("eval_data_digest"), metrics.get("split")
    ours = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    if not digest or not split:
        return [ours]
    query = (
        f"tags.`{TAG_RECIPE}` = '{recipe}' and tags.`{TAG_KIND}` = '{kind}' and "
        f"tags.`{TAG_EVAL_DIGEST}` = '{digest}' and tags.`{TAG_EVAL_SPLIT}` = '{split}' and "
        "attributes.status = 'FINISHED'"
    )
    runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"])
    found: dict[str, dict[str, float]] = {sha: ours}
    for run in runs:
        checkpoint = run.data.tags.get(TAG_CHECKPOINT)
        if checkpoint and checkpoint not in found:
            found[checkpoint] = dict(run.data.metrics)
    return list(found.values())


def pipeline_validation(client, experiment_id: str, parent_run_id: str | None) -> dict | None:
    """validation.json of the validate step under the same pipeline parent, if any."""
    if not parent_run_id:
        return None
    query = (
        f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{TAG_STEP}` = 'validate' "
        "and attributes.status = 'FINISHED'"
    )
    runs = client.search_runs(
        [experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1
    )
    if not runs:
        return None
    with tempfile.TemporaryDirectory(prefix="iagn-card-") as tmp:
        try:
            path = client.download_artifacts(runs[0].info.run_id, VALIDATION_FILE, tmp)
        except Exception:  # logged without its report (an older iagn): the card says so
            return None
        return json.loads(Path(path).read_text())


def decision_of(tags: dict[str, str]) -> str:
    return tags.get(TAG_PROMOTION, "not recorded")
