"""Step `validate`: check a dataset with Great Expectations before anything trains on it.

Inputs: a dataset folder in any supported layout and the `validate` section of
params.yaml (see `iagn.validation.rules`). Outputs in `out`:

    validation.json       every expectation (level, success, observed value, unexpected
                          count, example rows) plus `success` and `blocking_failures`;
                          later steps read `success`
    summary.md            a short Markdown table (KFP Markdown artifact, MLflow)
    data_docs/index.html  the HTML Data Docs Great Expectations renders for the run

`run` returns a `ValidationReport` and never exits: the CLI turns a blocking failure into
exit code 1. Unlike `iagn data manifest`, which stops at the first broken image, it reads
the dataset's listing with the format reader and probes every file itself, so all problems
are reported in one go. Only a listing that cannot be read at all (a missing images.txt, a
malformed line) raises `DataError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from iagn.data.formats import READERS, resolve
from iagn.data.images import DEFAULT_MAX_PIXELS
from iagn.errors import DataError
from iagn.io import write_text_atomic
from iagn.validation.probe import probe_files
from iagn.validation.report import expectation_entry, plain, summary_markdown
from iagn.validation.rules import RULES, parse_config
from iagn.validation.suite import run_suites
from iagn.validation.tables import classes_table, images_table

# GX reads this when first imported, which happens lazily inside `run_suites` (none of the
# imports above imports it): no usage analytics leave the machine.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

REPORT_FILE = "validation.json"
SUMMARY_FILE = "summary.md"
DOCS_DIR = "data_docs"
# The decode sample (validate.decode_sample) is seeded: the same files on every run.
SAMPLE_SEED = 0

ProgressFn = Callable[[int, int], object]  # (files just probed, total files)


@dataclass(frozen=True)
class ValidationReport:
    """What a validation run found and where it wrote it."""

    success: bool
    blocking_failures: list[str]
    warnings: list[str]
    report_path: Path  # validation.json
    summary_path: Path  # summary.md
    data_docs_path: Path  # data_docs/index.html
    document: dict[str, Any]  # the content of validation.json


def _decode_mask(count: int, sample: int | None) -> np.ndarray:
    if sample is None or sample >= count:
        return np.ones(count, dtype=bool)
    mask = np.zeros(count, dtype=bool)
    mask[np.random.default_rng(SAMPLE_SEED).choice(count, size=sample, replace=False)] = True
    return mask


def run(
    data: str | os.PathLike,
    params_section: dict[str, Any],
    out: str | os.PathLike,
    format: str | None = None,
    *,
    progress: ProgressFn | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allow_outside_root: bool = False,
) -> ValidationReport:
    """Validate the dataset at `data`; write the three outputs to `out`; return the verdict.

    `max_pixels` and `allow_outside_root` are params.yaml's data.max_pixels and
    data.allow_outside_root: the rules training will read the data with."""
    config = parse_config(params_section)
    out = Path(out)
    report_path = out / REPORT_FILE
    # A stale "success" must not outlive a new attempt that stops early (unreadable listing).
    report_path.unlink(missing_ok=True)
    name, root = resolve(data, format)
    raw = READERS[name].read(root, allow_outside_root=allow_outside_root)
    if not raw.records:
        raise DataError(
            "the dataset lists no images", path=root, hint="point --data at a dataset with images"
        )

    paths = [root / record.path for record in raw.records]
    total = len(paths)
    advance = (lambda n: progress(n, total)) if progress else None
    full = _decode_mask(total, config.decode_sample)
    probes = probe_files(
        paths, full, workers=config.workers, progress=advance, max_pixels=max_pixels
    )

    images = images_table(raw, probes)
    tables = {"images": images, "classes": classes_table(images, raw.class_names)}
    num_classes = len(raw.class_names)
    active = config.active()
    outcomes = run_suites(tables, active, num_classes, out / DOCS_DIR)

    entries = [
        expectation_entry(
            rule, s, outcomes[rule.name], tables[rule.table], num_classes, config.max_examples
        )
        for rule, s in active
    ]
    failed = [e for e in entries if not e["success"]]
    blocking = [e["name"] for e in failed if e["level"] == "blocking"]
    document = {
        "success": not blocking,
        "blocking_failures": blocking,
        "warnings": [e["name"] for e in failed if e["level"] == "warning"],
        "dataset": {
            "root": str(root),
            "format": name,
            "images": total,
            "classes": num_classes,
            "splits": plain(images["split"].value_counts().to_dict()),
            "fully_decoded": int(images["decoded"].sum()),
        },
        "expectations": entries,
        "disabled": [r.name for r in RULES if not config.rules[r.name].enabled],
        # Relative to the output folder, so the folder stays valid when copied as an artifact.
        "outputs": {
            "report": REPORT_FILE,
            "summary": SUMMARY_FILE,
            "data_docs": f"{DOCS_DIR}/index.html",
        },
        "validator": f"great_expectations {version('great-expectations')}",
    }
    summary_path = write_text_atomic(out / SUMMARY_FILE, summary_markdown(document))
    # Written last: a reader that sees validation.json finds the other outputs complete.
    write_text_atomic(report_path, json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    return ValidationReport(
        success=document["success"],
        blocking_failures=blocking,
        warnings=document["warnings"],
        report_path=report_path,
        summary_path=summary_path,
        data_docs_path=out / DOCS_DIR / "index.html",
        document=document,
    )
