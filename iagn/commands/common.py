"""Arguments and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def progress_bar(total: int | None, description: str, quiet: bool, unit: str = "img"):
    """A tqdm progress bar on stderr, or None when quiet."""
    if quiet:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True, file=sys.stderr)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """`--format`: the dataset layout (the dataset folder itself is `--data` or `--root`)."""
    from iagn.data.formats import FORMAT_NAMES

    parser.add_argument(
        "--format",
        choices=FORMAT_NAMES,
        default=None,
        help="dataset layout (default: detected from the files)",
    )


def add_params_argument(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml") if not required else None,
        required=required,
        help="the project's params.yaml (hyperparameters grouped by step)",
    )


def is_main_process() -> bool:
    """False on the non-zero ranks of a torchrun launch: only rank 0 reports."""
    return int(os.environ.get("RANK", "0")) == 0
