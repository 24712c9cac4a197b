"""`iagn validate`: the pipeline's first gate; exit code 1 when the dataset must not be used."""

from __future__ import annotations

import argparse
import sys

from iagn.commands.common import (
    add_data_arguments,
    add_params_argument,
    input_dir,
    output_dir,
    progress_bar,
)

EXIT_BLOCKED = 1


class _LazyBar:
    """A progress bar created on the first update, when the number of files is known."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None

    def __call__(self, advance: int, total: int) -> None:
        if self.bar is None:
            self.bar = progress_bar(total, "probe images", self.quiet)
            if self.bar is None:
                return
        self.bar.update(advance)
        if self.bar.n >= total:  # probing done: stop the clock before the GX suites run
            self.bar.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_validate(args: argparse.Namespace) -> int:
    from iagn import runner
    from iagn.params import load_params
    from iagn.validation.report import console_summary, failures_text

    params = load_params(args.params)
    bar = _LazyBar(args.quiet)
    try:
        report = runner.validate(args.data, params, args.out, args.format, progress=bar)
    finally:
        bar.close()
    print(console_summary(report.document, args.out))
    warnings = failures_text(report.document, "warning")
    if warnings:
        print(
            f"iagn: warning: data validation warnings (not blocking):\n{warnings}", file=sys.stderr
        )
    if report.success:
        return 0
    count = len(report.blocking_failures)
    print(
        f"iagn: error: data validation failed: {count} blocking expectation"
        f"{'s' if count > 1 else ''} failed: {', '.join(report.blocking_failures)}\n"
        f"{failures_text(report.document, 'blocking')}\n"
        f"Fix the data (or, if a rule does not fit this dataset, change its level, options or "
        f"`enabled` under validate.expectations in {args.params}) and run `iagn validate` "
        f"again. Full report: {report.report_path}; Data Docs: {report.data_docs_path}",
        file=sys.stderr,
    )
    return EXIT_BLOCKED


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "validate",
        help="check a dataset with Great Expectations before training (exit 1 if it fails)",
        description="Probe every image (exists, decodes, RGB, size, hash) and run the Great "
        "Expectations suite configured under `validate` in params.yaml: unique ids and paths, "
        "labels and class names, splits, images per class, train/test leakage, boxes, image "
        "size, class imbalance. Writes validation.json, summary.md and HTML Data Docs to --out. "
        "Exit code: 0 passed (warnings are printed), 1 a blocking expectation failed, 2 the "
        "dataset or params could not be read.",
    )
    parser.add_argument(
        "--data",
        required=True,
        type=input_dir("dataset"),
        help="dataset folder (any supported layout)",
    )
    add_data_arguments(parser)
    add_params_argument(parser, required=True)
    parser.add_argument(
        "--out",
        required=True,
        type=output_dir("validation report"),
        help="folder for validation.json, summary.md and data_docs/ (created if needed; "
        "these outputs are replaced)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=cmd_validate)
