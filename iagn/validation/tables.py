"""The tables Great Expectations validates, built without aborting on bad data.

`images`: the manifest's columns (one row per listed image, as the reader found it) plus
derived columns from the file probe and cross-row checks. A derived "problem" column holds
None where the row is fine (or the check does not apply, e.g. no box) and a sentence where
it is not, so GX's unexpected values read as explanations in the Data Docs.

`classes`: one row per class and split with its image count, so a class with no images in a
split is a row (count 0) and not silently absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from iagn.data.manifest import (
    COLUMNS,
    SPLITS,
    ImageRecord,
    RawDataset,
    box_overshoot_tolerance,
)
from iagn.validation.probe import FileProbe

TEST_SPLIT = "test"
FIT_SPLITS = ("train", "val")  # the splits a model learns from or is selected on


def where(record: ImageRecord, root: Path, kind: str = "image") -> str | None:
    """The annotation file and line behind `kind` ("image", "label", "box", "part_box")."""
    place = record.where(kind)
    if place["path"] is None:
        return None
    path = Path(place["path"])
    shown = path.relative_to(root) if path.is_relative_to(root) else path
    return f"{shown}, {place['unit']} {place['line']}" if place["line"] else str(shown)


def _box_problem(record: ImageRecord, root: Path, probe: FileProbe) -> str | None:
    """Same rule as the manifest builder: positive area, inside the image up to a small slack."""
    if probe.width is None or probe.height is None:
        return None  # size unknown: the decode expectations report this file
    width, height = probe.width, probe.height
    slack_x, slack_y = box_overshoot_tolerance(width), box_overshoot_tolerance(height)
    problems = []
    for kind, what in (("box", "bounding box"), ("part_box", "part box")):
        box = getattr(record, kind)
        if box is None:
            continue  # no box of this kind for this image
        x, y, w, h = box
        inside = -slack_x <= x and -slack_y <= y
        inside = inside and x + w <= width + slack_x and y + h <= height + slack_y
        text = f"{what} (x={x:g}, y={y:g}, w={w:g}, h={h:g})"
        if not (w > 0 and h > 0):
            text += " has no area"
        elif not inside:
            text += f" lies outside the {width}x{height} image"
        else:
            continue
        at = where(record, root, kind)
        problems.append(f"{text} ({at})" if at else text)
    return "; ".join(problems) or None


def _class_name_problems(frame: pd.DataFrame) -> pd.Series:
    """Per row: None, or why its label <-> class name pairing is ambiguous."""
    named = frame[frame["class_name"].notna()]
    names_per_label = named.groupby("label")["class_name"].unique()
    labels_per_name = named.groupby("class_name")["label"].unique()
    problems = []
    for label, name in zip(frame["label"], frame["class_name"], strict=True):
        if pd.isna(name):
            problems.append(None)  # label outside the class list: label_in_range reports it
        elif len(names_per_label[label]) > 1:
            names = ", ".join(sorted(map(str, names_per_label[label])))
            problems.append(f"label {label} has several class names: {names}")
        elif len(labels_per_name[name]) > 1:
            labels = ", ".join(str(v) for v in sorted(labels_per_name[name]))
            problems.append(f"class name {name!r} is used by labels {labels}")
        else:
            problems.append(None)
    return pd.Series(problems, index=frame.index, dtype=object)


def _leaks(frame: pd.DataFrame) -> pd.Series:
    """Per row: None, or the other-side images with the same content (train/val vs test)."""
    hashed = frame[frame["sha256"].notna()]
    test = hashed[hashed["split"] == TEST_SPLIT]
    fit = hashed[hashed["split"].isin(FIT_SPLITS)]
    shared = set(test["sha256"]) & set(fit["sha256"])
    leaks: list[str | None] = []
    for digest, split in zip(frame["sha256"], frame["split"], strict=True):
        if digest not in shared:
            leaks.append(None)
            continue
        other = fit if split == TEST_SPLIT else test
        twins = other[other["sha256"] == digest]
        shown = ", ".join(f"{p} ({s})" for p, s in zip(twins["path"], twins["split"], strict=True))
        leaks.append(f"same content as {shown}")
    return pd.Series(leaks, index=frame.index, dtype=object)


def images_table(raw: RawDataset, probes: list[FileProbe]) -> pd.DataFrame:
    """One row per listed image: manifest columns, probe results and derived problems."""
    num_classes = len(raw.class_names)
    nan_box = (np.nan,) * 4
    root = Path(raw.root)
    rows = []
    for record, probe in zip(raw.records, probes, strict=True):
        in_range = 0 <= record.label < num_classes
        rows.append(
            (
                record.image_id,
                record.path,
                record.label,
                raw.class_names[record.label] if in_range else None,
                record.split,
                *(record.box or nan_box),
                *(record.part_box or nan_box),
                probe.width,
                probe.height,
                probe.sha256,
                probe.exists,
                probe.mode,
                probe.decoded,
                # A missing file is reported once, by files_exist, not again as undecodable.
                probe.decode_error if probe.exists else None,
                probe.rgb_error,
                _box_problem(record, root, probe),
                where(record, root),
                where(record, root, "label"),
            )
        )
    extra = ("exists", "mode", "decoded", "decode_error", "rgb_error", "box_problem")
    frame = pd.DataFrame(rows, columns=[*COLUMNS, *extra, "listed_at", "label_at"])
    frame["width"] = frame["width"].astype("float64")  # NaN where the size is unknown
    frame["height"] = frame["height"].astype("float64")
    frame["class_name_problem"] = _class_name_problems(frame)
    frame["leak"] = _leaks(frame)
    return frame


def classes_table(images: pd.DataFrame, class_names: list[str]) -> pd.DataFrame:
    """One row per (class, split) for every split present; `train_ratio` = count / smallest
    train count (train rows only; inf when a class has no train image)."""
    splits = [s for s in SPLITS if (images["split"] == s).any()]
    counts = images.groupby(["label", "split"]).size()
    rows = [
        (label, name, split, int(counts.get((label, split), 0)))
        for split in splits
        for label, name in enumerate(class_names)
    ]
    table = pd.DataFrame(rows, columns=["label", "class_name", "split", "count"])
    train = table["split"] == "train"
    smallest = table.loc[train, "count"].min() if train.any() else np.nan
    with np.errstate(divide="ignore", invalid="ignore"):  # an empty train class: inf
        ratio = table["count"].to_numpy(dtype="float64") / smallest
    table["train_ratio"] = np.where(train, ratio, np.nan)
    return table
