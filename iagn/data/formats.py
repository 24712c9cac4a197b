"""Find out which layout a dataset folder has and load it as a manifest.

Every step command takes `--data DIR`; DIR may be the dataset root itself or the folder
the archive was unpacked into (one level above it), in any supported layout.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pandas as pd

from iagn.data.images import DEFAULT_MAX_PIXELS
from iagn.data.manifest import build_manifest
from iagn.data.readers import aircraft, cars, cub, imagefolder
from iagn.errors import DataError

READERS: dict[str, ModuleType] = {
    "cub": cub,
    "cars": cars,
    "aircraft": aircraft,
    "imagefolder": imagefolder,
}
FORMAT_NAMES = tuple(READERS)


def _candidates(root: Path) -> list[Path]:
    children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [root, *children]


def detect_format(root: str | Path) -> tuple[str, Path]:
    """Return (format name, dataset root) for `root` or one folder directly below it."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            "dataset folder does not exist",
            path=root,
            hint="pass --data with the folder of an unpacked dataset "
            "(or create one with `iagn data synth --out DIR`)",
        )
    for candidate in _candidates(root):
        for name, reader in READERS.items():
            if reader.looks_like(candidate):
                return name, candidate
    raise DataError(
        f"cannot tell the dataset layout of {root}",
        hint="expected CUB-200-2011 (images.txt, classes.txt, ...), Stanford Cars (devkit "
        "cars_meta.mat, ...), FGVC-Aircraft (data/images_variant_*.txt, ...) or an "
        "ImageFolder (train/<class>/, test/<class>/); name the layout with --format",
    )


def resolve(root: str | Path, format: str | None = None) -> tuple[str, Path]:
    """The format and dataset root, detected or checked against the named format."""
    if format is None:
        return detect_format(root)
    if format not in READERS:
        raise DataError(
            f"unknown dataset format {format!r}",
            hint=f"use one of: {', '.join(FORMAT_NAMES)}",
        )
    root = Path(root)
    for candidate in _candidates(root) if root.is_dir() else [root]:
        if READERS[format].looks_like(candidate):
            return format, candidate
    return format, root  # the reader names the missing file


def load_manifest(
    root: str | Path,
    format: str | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allow_outside_root: bool = False,
    **options,
) -> pd.DataFrame:
    """Read a dataset in any supported layout and return its manifest table.

    `max_pixels` and `allow_outside_root` are params.yaml's data.max_pixels and
    data.allow_outside_root (see `iagn.data.images` and `check_inside_root`); `options` go to
    the reader (e.g. `level="family"` for FGVC-Aircraft).
    """
    name, dataset_root = resolve(root, format)
    raw = READERS[name].read(dataset_root, allow_outside_root=allow_outside_root, **options)
    return build_manifest(raw, max_pixels=max_pixels)


def dataset_root(root: str | Path, format: str | None = None) -> Path:
    """The folder that manifest paths are relative to."""
    return resolve(root, format)[1]
