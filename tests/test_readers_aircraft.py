"""FGVC-Aircraft reader: a tiny dataset in the official 2013b layout, read end to end."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iagn.data import formats
from iagn.data.manifest import read_manifest
from iagn.data.readers import aircraft
from iagn.errors import DataError

VARIANTS = ["707-320", "747-400", "A300B4", "Cessna 172", "F/A-18"]
FAMILIES = ["A300", "Boeing 707", "Boeing 747", "Cessna 172", "F/A-18"]
MANUFACTURERS = ["Airbus", "Boeing", "Cessna", "McDonnell Douglas"]
# Variant index -> family and manufacturer index: the hierarchy is a tree, in other orders.
FAMILY_OF = [1, 2, 0, 3, 4]
MANUFACTURER_OF = [1, 1, 0, 2, 3]
# (image id, split, variant index, width, height, (xmin, ymin, xmax, ymax) 1-based inclusive)
IMAGES = [
    ("1025794", "train", 0, 64, 48, (11, 3, 50, 28)),
    ("0034309", "train", 3, 48, 40, (1, 1, 48, 20)),
    ("2229101", "train", 4, 32, 40, (5, 5, 30, 20)),
    ("0056978", "val", 2, 40, 32, (2, 3, 39, 12)),
    ("1514522", "val", 1, 32, 32, (4, 4, 20, 12)),
    ("0062567", "test", 4, 48, 48, (6, 7, 40, 28)),
    ("1933254", "test", 0, 40, 36, (1, 2, 40, 16)),
]


def make_aircraft(root: Path, images: list[tuple] = IMAGES) -> Path:
    """The official layout: <root>/data/{images/, images_*_*.txt, *.txt class lists}."""
    data = root / "data"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for image_id, _, _, width, height, _ in images:
        # The banner is part of the official images; boxes stay above it.
        pixels = rng.integers(0, 256, (height + 20, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(data / "images" / f"{image_id}.jpg", quality=90)
    for level, names, index_of in (
        ("variant", VARIANTS, list(range(len(VARIANTS)))),
        ("family", FAMILIES, FAMILY_OF),
        ("manufacturer", MANUFACTURERS, MANUFACTURER_OF),
    ):
        for split in ("train", "val", "test"):
            lines = [
                f"{image_id} {names[index_of[variant]]}\n"
                for image_id, image_split, variant, *_ in images
                if image_split == split
            ]
            (data / f"images_{level}_{split}.txt").write_text("".join(lines))
    (data / "variants.txt").write_text("\n".join(VARIANTS) + "\n")
    (data / "families.txt").write_text("\n".join(FAMILIES) + "\n")
    (data / "manufacturers.txt").write_text("\n".join(MANUFACTURERS) + "\n")
    (data / "images_box.txt").write_text(
        "".join(f"{i} {x1} {y1} {x2} {y2}\n" for i, *_, (x1, y1, x2, y2) in images)
    )
    return root


def _expected_rows(root: Path, level: str = "variant", prefix: str = "data/") -> list[dict]:
    names, index_of = {
        "variant": (VARIANTS, list(range(len(VARIANTS)))),
        "family": (FAMILIES, FAMILY_OF),
        "manufacturer": (MANUFACTURERS, MANUFACTURER_OF),
    }[level]
    rows = []
    for image_id, split, variant, width, height, (x1, y1, x2, y2) in IMAGES:
        path = f"{prefix}images/{image_id}.jpg"
        label = index_of[variant]
        rows.append(
            {
                "image_id": int(image_id),
                "path": path,
                "label": label,
                "class_name": names[label],
                "split": split,
                "x": x1 - 1.0,
                "y": y1 - 1.0,
                "w": x2 - x1 + 1.0,
                "h": y2 - y1 + 1.0,
                "width": width,
                "height": height + 20,
                "sha256": hashlib.sha256((root / path).read_bytes()).hexdigest(),
            }
        )
    return sorted(rows, key=lambda row: row["image_id"])


def _assert_rows(manifest, expected: list[dict]) -> None:
    assert len(manifest) == len(expected)
    for (_, row), want in zip(manifest.iterrows(), expected, strict=True):
        for key, value in want.items():
            assert row[key] == value, (key, row[key], value)
        assert all(math.isnan(row[c]) for c in ("part_x", "part_y", "part_w", "part_h"))


def test_reads_official_layout(tmp_path):
    root = make_aircraft(tmp_path / "fgvc-aircraft-2013b")
    assert formats.detect_format(root) == ("aircraft", root)
    manifest = formats.load_manifest(root)
    _assert_rows(manifest, _expected_rows(root))
    first = manifest.set_index("image_id").loc[1025794]  # x1=11, x2=50 -> x=10, w=40
    assert (first["x"], first["y"], first["w"], first["h"]) == (10, 2, 40, 26)
    # Leading zeros stay in the file name; the id is the integer value.
    assert manifest.set_index("image_id").loc[34309, "path"] == "data/images/0034309.jpg"


@pytest.mark.parametrize("level", ["family", "manufacturer"])
def test_other_levels(tmp_path, level):
    root = make_aircraft(tmp_path / "fgvc-aircraft-2013b")
    _assert_rows(formats.load_manifest(root, level=level), _expected_rows(root, level))


def test_parent_folder_and_data_folder(tmp_path):
    root = make_aircraft(tmp_path / "downloads" / "fgvc-aircraft-2013b")
    assert formats.detect_format(tmp_path / "downloads") == ("aircraft", root)
    _assert_rows(formats.load_manifest(tmp_path / "downloads"), _expected_rows(root))
    # data/ itself is a valid root; paths are then relative to it.
    data = root / "data"
    assert formats.detect_format(data) == ("aircraft", data)
    _assert_rows(formats.load_manifest(data), _expected_rows(data, prefix=""))


def test_unknown_level_lists_the_valid_ones(tmp_path):
    root = make_aircraft(tmp_path / "fgvc-aircraft-2013b")
    with pytest.raises(DataError) as info:
        formats.load_manifest(root, level="model")
    message = str(info.value)
    assert "'model'" in message
    assert "variant, family, manufacturer" in message


@pytest.mark.fault(
    "a listed image that does not exist",
    sees="exit 2: `images.txt, line 5: image ... does not exist` (Cars: the .mat record)",
    kept="everything: no manifest is written",
)
def test_listed_but_missing_image_names_the_list_and_line(tmp_path):
    root = make_aircraft(tmp_path / "fgvc-aircraft-2013b")
    (root / "data" / "images" / "1514522.jpg").unlink()
    with pytest.raises(DataError) as info:
        formats.load_manifest(root)
    message = str(info.value)
    assert "images_variant_val.txt, line 2:" in message
    assert "1514522" in message


def test_unknown_class_name_names_the_list_and_line(tmp_path):
    root = make_aircraft(tmp_path / "fgvc-aircraft-2013b")
    (root / "data" / "variants.txt").write_text("\n".join(VARIANTS[:4]) + "\n")
    with pytest.raises(DataError, match=r"images_variant_train\.txt, line 3: variant 'F/A-18'"):
        formats.load_manifest(root)


def test_duplicate_image_id_across_splits(tmp_path):
    # "34309" and "0034309" are different files but the same manifest image_id.
    root = make_aircraft(tmp_path / "fgvc-aircraft-2013b")
    with open(root / "data" / "images_variant_test.txt", "a") as handle:
        handle.write("34309 747-400\n")
    with pytest.raises(DataError) as info:
        formats.load_manifest(root)
    message = str(info.value)
    assert "images_variant_test.txt, line 3: image id 34309 is listed twice" in message
    assert "images_variant_train.txt, line 2" in message


@pytest.mark.fault(
    "a bounding box outside its image",
    sees="exit 2: `bounding_boxes.txt, line 2: bounding box ... lies outside the ... image`",
    kept="everything: no manifest is written",
)
def test_box_outside_image_names_the_box_file(tmp_path):
    root = make_aircraft(tmp_path / "fgvc-aircraft-2013b")
    box_file = root / "data" / "images_box.txt"
    lines = box_file.read_text().splitlines()
    lines[1] = "0034309 1 1 55 20"  # the image is 48 wide
    box_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"images_box\.txt, line 2:"):
        formats.load_manifest(root)


def test_looks_like_needs_the_marker_files(tmp_path):
    root = make_aircraft(tmp_path / "fgvc-aircraft-2013b")
    assert aircraft.looks_like(root)
    (root / "data" / "images_box.txt").unlink()
    assert not aircraft.looks_like(root)
    with pytest.raises(DataError, match=r"images_box\.txt"):
        formats.load_manifest(root, format="aircraft")


def test_cli_writes_the_manifest(tmp_path):
    root = make_aircraft(tmp_path / "fgvc-aircraft-2013b")
    out = tmp_path / "manifest.csv"
    command = [sys.executable, "-m", "iagn.cli", "data", "manifest", "--format", "aircraft"]
    command += ["--root", str(root), "--out", str(out), "--level", "family"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    _assert_rows(read_manifest(out), _expected_rows(root, "family"))
