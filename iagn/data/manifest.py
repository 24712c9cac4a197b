"""The manifest: one table that every dataset format becomes.

Columns (one row per image):
    image_id    int, unique within the dataset
    path        image path relative to the dataset root (POSIX separators)
    label       int in [0, num_classes)
    class_name  human-readable class name
    split       "train", "val" or "test"
    x, y, w, h  object bounding box in pixels (top-left origin, 0-based); NaN if unknown
    part_x, part_y, part_w, part_h
                box of the discriminative part (synthetic data only); NaN if unknown
    width, height  image size in pixels
    sha256      content hash of the image file

The manifest is written as CSV (readable, diffable, DVC-friendly), atomically.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from iagn.data.images import DEFAULT_MAX_PIXELS, ImageError, image_size
from iagn.errors import DataError
from iagn.io import atomic_path

SPLITS = ("train", "val", "test")
BOX_COLUMNS = ("x", "y", "w", "h")
PART_BOX_COLUMNS = ("part_x", "part_y", "part_w", "part_h")
COLUMNS = (
    "image_id",
    "path",
    "label",
    "class_name",
    "split",
    *BOX_COLUMNS,
    *PART_BOX_COLUMNS,
    "width",
    "height",
    "sha256",
)


@dataclass
class ImageRecord:
    """One image as a reader found it, before probing the file.

    `source` and `line` point at the annotation line that listed the image, so errors
    found while probing (missing file, undecodable image) can name it. `locations`
    optionally points the "label", "box" and "part_box" checks at their own lines where a
    format keeps them in separate files.
    """

    image_id: int
    path: str
    label: int
    split: str
    box: tuple[float, float, float, float] | None = None
    part_box: tuple[float, float, float, float] | None = None
    source: Path | None = None
    line: int | None = None
    locations: dict[str, tuple[Path, int]] = field(default_factory=dict)
    unit: str = "line"  # what `line` counts: "line" in text files, "record" in .mat files

    def where(self, kind: str = "image") -> dict:
        """Keyword arguments for `DataError` that point at the annotation behind `kind`."""
        path, line = self.locations.get(kind, (self.source, self.line))
        return {"path": path, "line": line, "unit": self.unit}


@dataclass
class RawDataset:
    """What a format reader returns: class names plus one record per image."""

    root: Path
    class_names: list[str]
    records: list[ImageRecord] = field(default_factory=list)


def check_inside_root(raw: RawDataset) -> RawDataset:
    """`raw`, after checking that every listed image resolves (symlinks followed) to a path
    inside the dataset root; a DataError names the listing line of the first that does not.

    Readers call it unless params.yaml data.allow_outside_root is true: a listing line such
    as `../../../home/me/.ssh/id_rsa` or a symlink out of the dataset must not make a step
    read, hash and train on files elsewhere.
    """
    root = Path(raw.root).resolve()
    for record in raw.records:
        resolved = (root / record.path).resolve()
        if not resolved.is_relative_to(root):
            raise DataError(
                f"image {record.path!r} (id {record.image_id}) points outside the dataset root "
                f"{root} (resolved to {resolved})",
                **record.where(),
                hint="remove the line (or the link), or set params.yaml "
                "data.allow_outside_root: true if the data really lives there",
            )
    return raw


def _probe(root: Path, record: ImageRecord, max_pixels: int) -> tuple[int, int, str]:
    """Size from the image header and the content hash; errors name the annotation line."""
    image_path = root / record.path
    if not image_path.is_file():
        raise DataError(
            f"image {record.path!r} (id {record.image_id}) is listed but does not exist under "
            f"{root}",
            **record.where(),
            hint="restore the file (re-extract the dataset archive) or remove it from the listing",
        )
    try:
        data = image_path.read_bytes()  # read once: the hash and the header share the bytes
        width, height = image_size(data, max_pixels, name=image_path)
    except OSError as exc:
        raise DataError(
            f"image {record.path!r} (id {record.image_id}) cannot be read: {exc.strerror or exc}",
            **record.where(),
            hint="check the file's permissions, or remove it from the listing",
        ) from None
    except ImageError as exc:
        raise DataError(
            f"image {record.path!r} (id {record.image_id}) {exc.problem}",
            **record.where(),
            hint=exc.hint,
        ) from None
    return width, height, hashlib.sha256(data).hexdigest()


def box_overshoot_tolerance(size: int) -> float:
    """Pixels a box may overshoot an image edge: official annotations round outward a little."""
    return max(1.0, 0.01 * size)


def _checked_box(record: ImageRecord, kind: str, width: int, height: int) -> tuple:
    """The box clamped to the image; an error when it has no area or lies outside.

    A box may overshoot an edge by `box_overshoot_tolerance` (such boxes occur in the
    official CUB and Cars files); further out is an annotation error.
    """
    x, y, w, h = getattr(record, kind)
    slack_x, slack_y = box_overshoot_tolerance(width), box_overshoot_tolerance(height)
    inside = x >= -slack_x and y >= -slack_y and x + w <= width + slack_x
    inside = inside and y + h <= height + slack_y
    if not (w > 0 and h > 0 and inside):
        what = "part box" if kind == "part_box" else "bounding box"
        raise DataError(
            f"{what} (x={x:g}, y={y:g}, w={w:g}, h={h:g}) of image {record.path!r} is outside "
            f"the {width}x{height} image or has no area",
            **record.where(kind),
            hint="fix the box in the annotation file, or remove the image from the dataset",
        )
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(float(width), x + w), min(float(height), y + h)
    return (x0, y0, x1 - x0, y1 - y0)


def build_manifest(
    raw: RawDataset, workers: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> pd.DataFrame:
    """Probe every listed image (exists, header decodes, size within `max_pixels`, a mode
    that converts to RGB, hash) and build the table."""
    num_classes = len(raw.class_names)
    seen_ids: dict[int, ImageRecord] = {}
    for record in raw.records:
        if not 0 <= record.label < num_classes:
            raise DataError(
                f"label {record.label + 1} of image {record.path!r} is outside the class list "
                f"(1..{num_classes})",
                **record.where("label"),
                hint="use a class id that the class list defines, or add the class",
            )
        if record.split not in SPLITS:
            raise DataError(
                f"split {record.split!r} of image {record.path!r} is not one of {SPLITS}",
                **record.where(),
            )
        if record.image_id in seen_ids:
            raise DataError(
                f"image id {record.image_id} is listed twice",
                **record.where(),
                hint="give every image a unique id",
            )
        seen_ids[record.image_id] = record
    if not raw.records:
        raise DataError(f"no images are listed in the dataset at {raw.root}")

    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        probes = list(pool.map(lambda r: _probe(raw.root, r, max_pixels), raw.records))

    rows = []
    nan_box = (np.nan,) * 4
    for record, (width, height, digest) in zip(raw.records, probes, strict=True):
        boxes = {
            kind: _checked_box(record, kind, width, height) if getattr(record, kind) else nan_box
            for kind in ("box", "part_box")
        }
        rows.append(
            (
                record.image_id,
                record.path,
                record.label,
                raw.class_names[record.label],
                record.split,
                *boxes["box"],
                *boxes["part_box"],
                width,
                height,
                digest,
            )
        )
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    return frame.sort_values("image_id", kind="stable").reset_index(drop=True)


def write_manifest(manifest: pd.DataFrame, out: str | os.PathLike) -> Path:
    """Write the manifest CSV atomically (temporary file + rename)."""
    with atomic_path(out) as tmp:
        manifest.to_csv(tmp, index=False, float_format="%.2f")
    return Path(out)


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataError(
            "manifest file does not exist",
            path=path,
            hint="build it with `iagn data manifest --root DIR --out FILE`",
        )
    frame = pd.read_csv(path, keep_default_na=True)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(
            f"not an iagn manifest: missing columns {missing}",
            path=path,
            hint="rebuild it with `iagn data manifest`",
        )
    return frame[list(COLUMNS)]


def manifest_digest(manifest: pd.DataFrame) -> str:
    """A stable hash of the dataset content: ids, paths, labels, splits, boxes and file hashes.

    Checkpoints record it so a model is always traceable to the exact data it saw.
    """
    canonical = (
        manifest[list(COLUMNS)]
        .sort_values("image_id")
        .to_csv(index=False, float_format="%.2f", lineterminator="\n")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def class_names(manifest: pd.DataFrame) -> list[str]:
    """Class names ordered by label."""
    pairs = manifest[["label", "class_name"]].drop_duplicates().sort_values("label")
    return list(pairs["class_name"])


def summarize(manifest: pd.DataFrame) -> str:
    """A short human-readable summary: counts per split, classes, sizes, boxes."""
    lines = []
    counts = manifest["split"].value_counts()
    per_split = ", ".join(f"{s} {int(counts.get(s, 0))}" for s in SPLITS if s in counts)
    lines.append(f"images       {len(manifest)} ({per_split})")
    lines.append(f"classes      {manifest['label'].nunique()}")
    per_class = manifest.groupby("label").size()
    lines.append(
        f"per class    min {per_class.min()}, median {int(per_class.median())}, "
        f"max {per_class.max()}"
    )
    lines.append(
        f"image size   width {manifest['width'].min()}..{manifest['width'].max()}, "
        f"height {manifest['height'].min()}..{manifest['height'].max()}"
    )
    with_box = int(manifest["w"].notna().sum())
    with_part = int(manifest["part_w"].notna().sum())
    lines.append(f"object boxes {with_box}/{len(manifest)}")
    lines.append(f"part boxes   {with_part}/{len(manifest)}")
    return "\n".join(lines)
