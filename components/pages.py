"""The HTML pages the KFP UI shows for a task, rendered from Jinja2 templates.

Templates live in components/templates/ and autoescape every value, so a class name or a
file path with `<` or `&` in it shows as text. Each page is self-contained (images inlined
as data URIs) because the KFP UI renders HTML artifacts in a sandboxed frame.
"""

from __future__ import annotations

import base64
import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).resolve().parent / "templates"
EVALUATION_IMAGES = (
    ("attention_gallery.png", "Attention gallery (map and box vs truth)"),
    ("confused_pairs.png", "Most confused pairs: the map for each class"),
    ("localization.png", "Localization: IoU distribution and deletion"),
    ("confusion_matrix.png", "Confusion matrix"),
    ("reliability.png", "Reliability diagram"),
)


def cell(value: Any) -> str:
    """A table cell: floats to 4 significant digits, anything else as it prints."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@functools.cache
def _environment():
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        keep_trailing_newline=True,
    )
    environment.filters["cell"] = cell
    return environment


def render(template: str, **values: Any) -> str:
    return _environment().get_template(template).render(**values)


def evaluation_html(
    metrics: Mapping[str, Any], folder: str | os.PathLike, headline: tuple[str, ...]
) -> str:
    """An evaluation's `headline` numbers and its plots (those present in `folder`)."""
    folder = Path(folder)
    images = [
        {"title": title, "data": base64.b64encode((folder / name).read_bytes()).decode("ascii")}
        for name, title in EVALUATION_IMAGES
        if (folder / name).is_file()
    ]
    rows = [(name, metrics[name]) for name in headline if name in metrics]
    return render(
        "evaluation.html.j2", kind=str(metrics.get("kind", "model")), rows=rows, images=images
    )


def validation_html(document: Mapping[str, Any]) -> str:
    """validation.json as one table (the full Data Docs are in the `report` artifact)."""
    return render(
        "validation.html.j2",
        success=bool(document.get("success")),
        dataset=document.get("dataset", {}),
        expectations=document.get("expectations", []),
    )


def sweep_html(summary: Mapping[str, Any], plot: str | os.PathLike) -> str:
    """A sweep's trials (overrides, validation numbers) and the plot, the best marked."""
    keys = list(summary.get("keys", []))
    trials = summary.get("trials", [])
    metrics = list(dict.fromkeys(name for t in trials for name in t.get("metrics", {})))
    rows = [
        {
            "trial": t["trial"],
            "values": [t["overrides"].get(key, "") for key in keys]
            + [t["metrics"].get(name, "") for name in metrics],
            "best": t["trial"] == summary.get("best_trial"),
        }
        for t in trials
    ]
    path = Path(plot)
    image = base64.b64encode(path.read_bytes()).decode("ascii") if path.is_file() else ""
    return render(
        "sweep.html.j2",
        sweep_id=str(summary.get("sweep_id", "")),
        best=str(summary.get("best_trial", "")),
        metric=str(summary.get("metric", "")),
        columns=keys + metrics,
        rows=rows,
        image=image,
    )
