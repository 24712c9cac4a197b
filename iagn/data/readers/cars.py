"""Stanford Cars reader (the official devkit layout).

Layout (as unpacked from car_devkit.tgz, cars_train.tgz, cars_test.tgz and the separately
published cars_test_annos_withlabels.mat):
    devkit/cars_meta.mat                  `class_names`: 1x196 cell of strings
    devkit/cars_train_annos.mat           `annotations`: 1xN struct array with fields
                                          bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname
    cars_test_annos_withlabels.mat        the same for the test images
    cars_train/<fname>, cars_test/<fname> the images

Real downloads move things around (`car_devkit/devkit/...`, the test labels at the root or
in devkit/, Kaggle's `cars_train/cars_train/`), so every file and image folder is found by
name within 3 folder levels below the root; the shallowest match wins, ties go to the
alphabetically first path. The dataset root (what manifest paths are relative to) is the
folder given, or the child of it that holds cars_train/ when format detection looks there.

Class ids in the .mat files are 1-based; boxes are 1-based inclusive pixel corners and
become x = x1 - 1, y = y1 - 1, w = x2 - x1 + 1, h = y2 - y1 + 1. Image ids: the training
images are 1..N in the order of cars_train_annos.mat, the test images N+1..N+M in the order
of cars_test_annos_withlabels.mat. Errors about a record name the .mat file and the 1-based
record index ("record N").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from iagn.data.manifest import ImageRecord, RawDataset, check_inside_root
from iagn.errors import DataError

META_FILE = "cars_meta.mat"
TRAIN_ANNOS_FILE = "cars_train_annos.mat"
TEST_ANNOS_FILE = "cars_test_annos_withlabels.mat"
UNLABELLED_TEST_ANNOS_FILE = "cars_test_annos.mat"
TRAIN_DIR = "cars_train"
TEST_DIR = "cars_test"
SEARCH_DEPTH = 3
FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
HINT = (
    "point --data at the folder holding the unpacked Stanford Cars devkit "
    "(devkit/cars_meta.mat, devkit/cars_train_annos.mat) and the cars_train/ and cars_test/ "
    "image folders"
)
# The image folders hold thousands of files and never the devkit: not worth walking into.
_NO_DESCEND = {TRAIN_DIR, TEST_DIR}


def _find(root: Path, names: set[str], want_dirs: bool = False) -> dict[str, Path]:
    """Find entries by name at most SEARCH_DEPTH folders below `root`, shallowest first."""
    found: dict[str, Path] = {}
    level = [root]
    for depth in range(SEARCH_DEPTH + 1):
        below: list[Path] = []
        for folder in level:
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:  # unreadable folder: it cannot hold the dataset either
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                is_dir = entry.is_dir()
                if entry.name in names and entry.name not in found and is_dir == want_dirs:
                    found[entry.name] = Path(entry.path)
                if is_dir and depth < SEARCH_DEPTH and (want_dirs or entry.name not in _NO_DESCEND):
                    below.append(Path(entry.path))
        if len(found) == len(names):
            break
        level = below
    return found


def looks_like(root: Path) -> bool:
    root = Path(root)
    if not root.is_dir():
        return False
    if len(_find(root, {META_FILE, TRAIN_ANNOS_FILE})) < 2:
        return False
    # The search also succeeds one level above the dataset folder. Defer to a child that
    # holds cars_train/ itself, so manifest paths (and the manifest digest) are the same
    # whether --data names the dataset folder or the folder it was unpacked into.
    return not any(
        (child / TRAIN_DIR).is_dir()
        for child in root.iterdir()
        # Kaggle's cars_train/cars_train/ is an image folder, not a dataset folder.
        if child.is_dir() and not child.name.startswith(".") and child.name not in _NO_DESCEND
    )


def _load(path: Path, variable: str) -> Any:
    try:
        content = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except (ValueError, OSError, NotImplementedError, TypeError) as exc:
        raise DataError(
            f"cannot read the MATLAB file: {exc}",
            path=path,
            hint="re-download and re-extract the Stanford Cars devkit; the file is damaged",
        ) from None
    if variable not in content:
        found = sorted(k for k in content if not k.startswith("__"))
        raise DataError(
            f"the file has no variable {variable!r} (found: {', '.join(found) or 'none'})",
            path=path,
            hint="this is not the official Stanford Cars devkit file; re-download it",
        )
    return content[variable]


def _items(value: Any) -> list[Any]:
    """squeeze_me turns a 1x1 struct/cell into a bare value and 1xN into a 1-D array."""
    if isinstance(value, np.ndarray):
        return list(value.ravel())
    return [value]


def _field(record: Any, name: str) -> Any:
    if isinstance(record, np.void):  # struct_as_record=True style
        return record[name] if name in (record.dtype.names or ()) else None
    return getattr(record, name, None)


def _read_class_names(path: Path) -> list[str]:
    names = []
    for index, value in enumerate(_items(_load(path, "class_names")), start=1):
        if isinstance(value, np.ndarray) and value.size == 1:
            value = value.item()
        if not isinstance(value, str) or not value.strip():
            raise DataError(
                f"class name {index} is {value!r}, not a non-empty string",
                path=path,
                hint="re-download the Stanford Cars devkit; cars_meta.mat is damaged",
            )
        names.append(value.strip())
    return names


def _as_number(value: Any, path: Path, index: int, name: str) -> float:
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number):
        raise DataError(
            f"field {name!r} is {value!r}, not a number",
            path=path,
            line=index,
            unit="record",
            hint="re-download the annotation file; it is damaged",
        )
    return number


def _image_dir(root: Path, name: str, first_fname: str, annos_path: Path) -> Path:
    candidates = _find(root, {name}, want_dirs=True)
    if name not in candidates:
        raise DataError(
            f"no image folder {name}/ within {SEARCH_DEPTH} folder levels of {root} "
            f"(needed for the images listed in {annos_path.name})",
            path=root,
            hint=f"extract {name}.tgz into {root}",
        )
    folder = candidates[name]
    # Kaggle's mirror nests the images one level deeper: cars_train/cars_train/<fname>.
    nested = folder / name
    if not (folder / first_fname).exists() and nested.is_dir():
        return nested
    return folder


def _read_annotations(
    root: Path, path: Path, image_dir_name: str, split: str, first_id: int, num_classes: int
) -> list[ImageRecord]:
    annotations = _items(_load(path, "annotations"))
    if not annotations:
        raise DataError(
            "the annotation file lists no images",
            path=path,
            hint="re-download the annotation file; it is empty or truncated",
        )
    parsed = []
    for index, annotation in enumerate(annotations, start=1):
        values = {name: _field(annotation, name) for name in FIELDS}
        missing = [name for name, value in values.items() if value is None]
        if missing == ["class"]:
            raise DataError(
                "the annotations have no 'class' field: this file carries no labels",
                path=path,
                hint=f"use {TEST_ANNOS_FILE}, published separately from the devkit, for the "
                "test labels"
                if split == "test"
                else "use the official devkit's cars_train_annos.mat",
            )
        if missing:
            raise DataError(
                f"record has no field(s) {', '.join(missing)}; expected {', '.join(FIELDS)}",
                path=path,
                line=index,
                unit="record",
                hint="this is not an official Stanford Cars annotation file; re-download it",
            )
        fname = values["fname"]
        if isinstance(fname, np.ndarray) and fname.size == 1:
            fname = fname.item()
        if not isinstance(fname, str) or not fname.strip():
            raise DataError(
                f"fname is {fname!r}, not a file name",
                path=path,
                line=index,
                unit="record",
                hint="re-download the annotation file; it is damaged",
            )
        number = {name: _as_number(values[name], path, index, name) for name in FIELDS[:5]}
        class_id = number["class"]
        if class_id != int(class_id):
            raise DataError(
                f"class id {class_id:g} is not an integer",
                path=path,
                line=index,
                unit="record",
                hint=f"class ids are 1..{num_classes}, the positions in cars_meta.mat",
            )
        parsed.append((index, fname.strip(), number))

    image_dir = _image_dir(root, image_dir_name, parsed[0][1], path)
    prefix = image_dir.relative_to(root).as_posix()
    records = []
    for index, fname, number in parsed:
        x1, y1, x2, y2 = (number[k] for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"))
        records.append(
            ImageRecord(
                image_id=first_id + index - 1,
                path=f"{prefix}/{fname}",
                # Out-of-range ids are reported by build_manifest, pointing at this record.
                label=int(number["class"]) - 1,
                split=split,
                box=(x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1),
                source=path,
                line=index,
                unit="record",
            )
        )
    return records


def read(root: Path, allow_outside_root: bool = False) -> RawDataset:
    """The dataset at `root`; listed images must lie inside it unless `allow_outside_root`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError("dataset folder does not exist", path=root, hint=HINT)
    found = _find(root, {META_FILE, TRAIN_ANNOS_FILE, TEST_ANNOS_FILE})
    for name in (META_FILE, TRAIN_ANNOS_FILE):
        if name not in found:
            raise DataError(
                f"no Stanford Cars devkit file {name} within {SEARCH_DEPTH} folder levels of "
                f"{root}",
                path=root,
                hint=HINT,
            )
    meta_path = found[META_FILE]
    if TEST_ANNOS_FILE not in found:
        expected = meta_path.parent / TEST_ANNOS_FILE
        unlabelled = _find(root, {UNLABELLED_TEST_ANNOS_FILE})
        note = (
            f" ({UNLABELLED_TEST_ANNOS_FILE} is there but carries no labels)" if unlabelled else ""
        )
        raise DataError(
            f"missing the Stanford Cars test labels{note}",
            path=expected,
            hint=f"the test labels ship separately from the devkit as {TEST_ANNOS_FILE}; "
            f"download it and put it at {expected} (or next to the cars_test/ folder)",
        )

    class_names = _read_class_names(meta_path)
    train = _read_annotations(
        root, found[TRAIN_ANNOS_FILE], TRAIN_DIR, "train", 1, len(class_names)
    )
    test = _read_annotations(
        root, found[TEST_ANNOS_FILE], TEST_DIR, "test", len(train) + 1, len(class_names)
    )
    raw = RawDataset(root=root, class_names=class_names, records=train + test)
    return raw if allow_outside_root else check_inside_root(raw)
