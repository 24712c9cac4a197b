"""Reports of a validation run: the validation.json document, summary.md and console text.

validation.json is the machine-readable gate (later steps read `success`); summary.md is a
short Markdown table for a KFP Markdown artifact and MLflow; the console text is what
`iagn validate` prints, with every failed expectation, its counts, example files and what
to do.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from iagn.validation.rules import Rule, RuleSettings
from iagn.validation.suite import GxOutcome

PASS, FAIL, WARN = "✓", "✗", "⚠"
ROW_NOUN = {"images": "images", "classes": "class/split rows"}
EXAMPLE_COLUMNS = {
    "images": ("image_id", "path", "split"),
    "classes": ("label", "class_name", "split", "count"),
}


def plain(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, non-finite floats to strings ("inf")."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def _examples(
    rule: Rule, settings: RuleSettings, outcome: GxOutcome, table: pd.DataFrame, n: int, limit: int
) -> list[dict]:
    if outcome.success:
        return []
    if rule.example_rows is not None:
        rows = rule.example_rows(table)
    else:
        rows = table.iloc[outcome.unexpected_rows]
    examples = []
    for _, row in rows.head(limit).iterrows():
        example = {c: plain(row[c]) for c in EXAMPLE_COLUMNS[rule.table]}
        example["detail"] = rule.detail(row, settings.options, n)
        examples.append(example)
    return examples


def _observed(rule: Rule, outcome: GxOutcome) -> Any:
    if outcome.observed_value is not None:
        return plain(outcome.observed_value)
    if outcome.unexpected_count is None:
        return None
    noun = ROW_NOUN[rule.table]
    return f"{outcome.unexpected_count} of {outcome.element_count} {noun} unexpected"


def expectation_entry(
    rule: Rule,
    settings: RuleSettings,
    outcome: GxOutcome,
    table: pd.DataFrame,
    num_classes: int,
    max_examples: int,
) -> dict:
    """One expectation of validation.json."""
    return {
        "name": rule.name,
        "level": settings.level,
        "success": outcome.success,
        "description": rule.describe(settings.options, num_classes),
        "expectation": outcome.expectation_type,
        "table": rule.table,
        "options": plain(settings.options),
        "observed_value": _observed(rule, outcome),
        "element_count": outcome.element_count,
        "unexpected_count": outcome.unexpected_count,
        "examples": _examples(rule, settings, outcome, table, num_classes, max_examples),
        "hint": rule.hint,
        "error": outcome.error,
    }


def shown(value: Any) -> str:
    """A value for people: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _status(entry: dict) -> str:
    if entry["success"]:
        return PASS
    return FAIL if entry["level"] == "blocking" else WARN


def _example_text(example: dict) -> str:
    where = example.get("path") or f"class {example['class_name']}, {example['split']}"
    return f"{where}: {example['detail']}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def summary_markdown(document: dict) -> str:
    """A short Markdown summary: verdict, dataset, one table row per expectation."""
    verdict = "passed" if document["success"] else "FAILED"
    dataset = document["dataset"]
    lines = [
        f"# Data validation {verdict}",
        "",
        f"Dataset `{dataset['root']}` ({dataset['format']}): {dataset['images']} images, "
        f"{dataset['classes']} classes. Blocking failures: "
        f"{', '.join(document['blocking_failures']) or 'none'}; warnings: "
        f"{', '.join(document['warnings']) or 'none'}.",
        "",
        "| | expectation | level | observed | examples |",
        "|---|---|---|---|---|",
    ]
    for entry in document["expectations"]:
        examples = "<br>".join(f"`{_cell(_example_text(e))}`" for e in entry["examples"][:3])
        if entry["error"]:
            examples = _cell(f"GX error: {entry['error']}")
        lines.append(
            f"| {_status(entry)} | `{entry['name']}` | {entry['level']} | "
            f"{_cell(shown(entry['observed_value']))} | {examples} |"
        )
    if document["disabled"]:
        lines += ["", f"Disabled: {', '.join(f'`{n}`' for n in document['disabled'])}."]
    lines += [
        "",
        f"{PASS} passed, {FAIL} failed (blocking), {WARN} failed (warning). Details: "
        f"`{document['outputs']['report']}`; HTML Data Docs: `{document['outputs']['data_docs']}`.",
        "",
    ]
    return "\n".join(lines)


def console_summary(document: dict, out: str | os.PathLike) -> str:
    """One line per expectation plus where the outputs (under `out`) are: the CLI's stdout."""
    dataset = document["dataset"]
    verdict = "passed" if document["success"] else "FAILED"
    lines = [
        f"data validation {verdict}: {len(document['expectations'])} expectations on "
        f"{dataset['images']} images of {dataset['classes']} classes "
        f"({dataset['format']} dataset at {dataset['root']})"
    ]
    width = max((len(e["name"]) for e in document["expectations"]), default=0)
    for entry in document["expectations"]:
        lines.append(
            f"  {_status(entry)} {entry['name']:<{width}}  {entry['level']:<8}  "
            f"{shown(entry['observed_value'])}"
        )
    if document["disabled"]:
        lines.append(f"  disabled: {', '.join(document['disabled'])}")
    outputs = {key: Path(out) / path for key, path in document["outputs"].items()}
    lines += [
        f"report     {outputs['report']}",
        f"summary    {outputs['summary']}",
        f"Data Docs  {outputs['data_docs']}",
    ]
    return "\n".join(lines)


def problem_text(entry: dict) -> str:
    """A failed expectation: counts, example files and what to do."""
    head = f"{_status(entry)} {entry['name']} ({entry['level']}): {entry['description']}"
    if entry["error"]:
        return f"{head}\n    Great Expectations could not evaluate it: {entry['error']}"
    lines = [f"{head} -- observed {shown(entry['observed_value'])}"]
    lines += [f"    {_example_text(e)}" for e in entry["examples"]]
    count = entry["unexpected_count"] or 0
    if count > len(entry["examples"]) and entry["examples"]:
        lines.append(f"    ... and {count - len(entry['examples'])} more")
    lines.append(f"  -> {entry['hint']}")
    return "\n".join(lines)


def failures_text(document: dict, level: str) -> str:
    """All failed expectations of one level, for stderr."""
    failed = [e for e in document["expectations"] if not e["success"] and e["level"] == level]
    return "\n".join(problem_text(e) for e in failed)
