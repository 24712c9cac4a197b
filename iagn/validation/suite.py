"""Run the rules as Great Expectations (1.x) suites and render the HTML Data Docs.

One suite per table (`iagn_images`, `iagn_classes`), each expectation tagged with its rule
name (`meta.rule`), level (`severity`) and a readable `description`, so the Data Docs name
the rules. The GX project is a file context in a temporary folder: Data Docs need one, and
nothing else of it is worth keeping. The Data Docs are built in a staging folder and moved
into place, so a reader never sees half of them.
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from iagn.validation.rules import Rule, RuleSettings

# Set before great_expectations is first imported (it reads this at import time).
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

SITE_NAME = "iagn"
RUN_NAME = "iagn-validate"
# Unexpected rows GX keeps per expectation (Data Docs and examples); counts stay exact.
PARTIAL_UNEXPECTED_COUNT = 20


@dataclass
class GxOutcome:
    """One expectation's result, reduced to what the reports need."""

    rule: str
    expectation_type: str
    success: bool
    observed_value: Any = None
    element_count: int | None = None
    unexpected_count: int | None = None
    unexpected_rows: list[int] = field(default_factory=list)  # positions in the table
    error: str | None = None  # GX could not evaluate the expectation


def _expectation(rule: Rule, settings: RuleSettings, num_classes: int):
    from great_expectations import expectations as gxe
    from great_expectations.expectations.metadata_types import FailureSeverity

    severity = FailureSeverity.CRITICAL if settings.level == "blocking" else FailureSeverity.WARNING
    return getattr(gxe, rule.gx_type)(
        **rule.gx_kwargs(settings.options, num_classes),
        description=f"{rule.name} ({settings.level}): "
        f"{rule.describe(settings.options, num_classes)}",
        severity=severity,
        meta={"rule": rule.name, "level": settings.level},
        notes=f"If it fails: {rule.hint}.",
    )


def _outcome(result) -> GxOutcome:
    details = result.result or {}
    info = result.exception_info or {}
    error = info.get("exception_message") if info.get("raised_exception") else None
    index = details.get("partial_unexpected_index_list") or []
    return GxOutcome(
        rule=result.expectation_config.meta["rule"],
        expectation_type=result.expectation_config.type,
        success=bool(result.success),
        observed_value=details.get("observed_value"),
        element_count=details.get("element_count"),
        unexpected_count=details.get("unexpected_count"),
        unexpected_rows=[int(i) for i in index if not isinstance(i, dict)],
        error=error,
    )


def _replace_dir(staging: Path, target: Path) -> None:
    backup = target.with_name(f".{target.name}.old")
    if backup.exists():
        shutil.rmtree(backup)
    if target.exists():
        target.rename(backup)
    staging.rename(target)
    if backup.exists():
        shutil.rmtree(backup)


def run_suites(
    tables: dict[str, pd.DataFrame],
    active: list[tuple[Rule, RuleSettings]],
    num_classes: int,
    docs_dir: Path,
) -> dict[str, GxOutcome]:
    """Validate each table with its rules; write the Data Docs to `docs_dir` (replaced)."""
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig

    docs_dir = Path(docs_dir)
    staging = docs_dir.with_name(f".{docs_dir.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    run_id = RunIdentifier(run_name=RUN_NAME, run_time=datetime.datetime.now(datetime.UTC))
    # Offending rows come back as table positions (no index columns), which map straight to
    # the rows the reports describe.
    result_format = {
        "result_format": "SUMMARY",
        "partial_unexpected_count": PARTIAL_UNEXPECTED_COUNT,
    }
    outcomes: dict[str, GxOutcome] = {}
    with tempfile.TemporaryDirectory(prefix="iagn-gx-") as project:
        context = gx.get_context(mode="file", project_root_dir=project)
        context.variables.progress_bars = ProgressBarsConfig(globally=False)  # ours is enough
        context.variables.save()
        context.add_data_docs_site(
            SITE_NAME,
            {
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(staging.resolve()),
                },
            },
        )
        source = context.data_sources.add_pandas("iagn")
        for table_name, frame in tables.items():
            rules = [(r, s) for r, s in active if r.table == table_name]
            if not rules:
                continue
            batch = source.add_dataframe_asset(table_name).add_batch_definition_whole_dataframe(
                "whole table"
            )
            suite = context.suites.add(gx.ExpectationSuite(name=f"iagn_{table_name}"))
            for rule, settings in rules:
                suite.add_expectation(_expectation(rule, settings, num_classes))
            definition = context.validation_definitions.add(
                gx.ValidationDefinition(name=f"iagn_{table_name}", data=batch, suite=suite)
            )
            result = definition.run(
                batch_parameters={"dataframe": frame}, result_format=result_format, run_id=run_id
            )
            for item in result.results:
                outcome = _outcome(item)
                outcomes[outcome.rule] = outcome
        context.build_data_docs(site_names=[SITE_NAME])
    _replace_dir(staging, docs_dir)
    return outcomes
