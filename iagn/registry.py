"""Finding logged models and reading the Model Registry (`iagn models`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from iagn.tracking import TAG_PIPELINE_RUN

CHALLENGER = "challenger"
CHAMPION = "champion"
TAG_CHECKPOINT = "iagn.checkpoint_sha256"
TAG_KIND = "iagn.kind"
# Evaluation numbers copied to each version's tags: what `iagn models` shows and what the
# champion comparison reads.
VERSION_METRICS = (
    "top1",
    "top5",
    "top1_fused",
    "top1_combined",
    "top1_two_pass",
    "pointing_game",
    "box_accuracy",
    "ece",
    "latency_ms",
    "throughput_ips",
    "parameters",
    "checkpoint_mb",
)
TAG_MODEL_URI = "iagn.model_uri"
TAG_MODEL_ID = "iagn.model_id"
TABLE_METRICS = ("top1", "pointing_game", "box_accuracy", "ece", "latency_ms")


@dataclass
class LoggedModel:
    model_uri: str
    run_id: str
    model_id: str | None


def find_logged_model(client, experiment_id: str, checkpoint_sha256: str) -> LoggedModel | None:
    """The newest model logged (by a training step or register) from this exact checkpoint."""
    runs = client.search_runs(
        [experiment_id],
        f"tags.`{TAG_CHECKPOINT}` = '{checkpoint_sha256}'",
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    for run in runs:
        uri = run.data.tags.get(TAG_MODEL_URI)
        if uri:
            return LoggedModel(uri, run.info.run_id, run.data.tags.get(TAG_MODEL_ID))
    return None


def _short(value: str | None) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return value or "-"


def versions_table(client, name: str) -> str:
    """A text table of every version of `name`: aliases, kind, key metrics, pipeline run."""
    versions = sorted(
        client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version)
    )
    # Search results carry no aliases; the registered model maps each alias to its version.
    by_version: dict[str, list[str]] = {}
    for alias, number in client.get_registered_model(name).aliases.items():
        by_version.setdefault(str(number), []).append(alias)
    header = ["version", "aliases", "kind", *TABLE_METRICS, "pipeline run", "created (UTC)"]
    rows = [header]
    for version in versions:
        tags = version.tags or {}
        # Champion first: the alias people look for.
        aliases = sorted(
            by_version.get(str(version.version), []),
            key=lambda a: (a != CHAMPION, a != CHALLENGER, a),
        )
        created = datetime.fromtimestamp(version.creation_timestamp / 1000, tz=UTC)
        rows.append(
            [
                str(version.version),
                ",".join(aliases) or "-",
                tags.get(TAG_KIND, "-"),
                *[_short(tags.get(metric)) for metric in TABLE_METRICS],
                tags.get(TAG_PIPELINE_RUN, "-"),
                created.strftime("%Y-%m-%d %H:%M"),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)
