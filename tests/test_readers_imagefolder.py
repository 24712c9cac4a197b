"""ImageFolder reader: split/class/image folders, read end to end."""

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
from iagn.data.readers import imagefolder
from iagn.errors import DataError

# (split, class, file name, width, height), in the expected image id order.
IMAGES = [
    ("train", "Black_footed_Albatross", "a.jpg", 32, 24),
    ("train", "Black_footed_Albatross", "b.PNG", 24, 32),
    ("train", "Laysan_Albatross", "c.jpeg", 16, 16),
    ("train", "Sooty_Albatross", "d.bmp", 20, 18),
    ("train", "Sooty_Albatross", "e.webp", 18, 20),
    ("val", "Laysan_Albatross", "f.jpg", 24, 24),
    ("test", "Black_footed_Albatross", "g.jpg", 40, 30),
    ("test", "Sooty_Albatross", "h.JPG", 30, 40),
]
CLASSES = ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}


def _write_image(path: Path, width: int, height: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=FORMATS[path.suffix.lower()])


def make_imagefolder(root: Path, images: list[tuple] = IMAGES) -> Path:
    for seed, (split, class_name, name, width, height) in enumerate(images):
        _write_image(root / split / class_name / name, width, height, seed)
    # Things the reader must ignore.
    (root / "train" / "Laysan_Albatross" / ".DS_Store").write_bytes(b"\0\1")
    (root / "train" / "Laysan_Albatross" / "notes.txt").write_text("not an image")
    (root / "train" / ".hidden_class").mkdir()
    if (root / "test").is_dir():
        (root / "test" / "README.md").write_text("test images")
    return root


def _expected_rows(root: Path, prefix: str = "") -> list[dict]:
    rows = []
    for image_id, (split, class_name, name, width, height) in enumerate(IMAGES, start=1):
        path = f"{prefix}{split}/{class_name}/{name}"
        rows.append(
            {
                "image_id": image_id,
                "path": path,
                "label": CLASSES.index(class_name),
                "class_name": class_name,
                "split": split,
                "width": width,
                "height": height,
                "sha256": hashlib.sha256((root / path).read_bytes()).hexdigest(),
            }
        )
    return rows


def _assert_rows(manifest, expected: list[dict]) -> None:
    assert len(manifest) == len(expected)
    for (_, row), want in zip(manifest.iterrows(), expected, strict=True):
        for key, value in want.items():
            assert row[key] == value, (key, row[key], value)
        boxes = ("x", "y", "w", "h", "part_x", "part_y", "part_w", "part_h")
        assert all(math.isnan(row[c]) for c in boxes)


def test_reads_split_class_folders(tmp_path):
    root = make_imagefolder(tmp_path / "birds")
    assert formats.detect_format(root) == ("imagefolder", root)
    _assert_rows(formats.load_manifest(root), _expected_rows(root))


def test_parent_folder(tmp_path):
    root = make_imagefolder(tmp_path / "downloads" / "birds")
    assert formats.detect_format(tmp_path / "downloads") == ("imagefolder", root)
    _assert_rows(formats.load_manifest(tmp_path / "downloads"), _expected_rows(root))


def test_val_is_optional(tmp_path):
    images = [row for row in IMAGES if row[0] != "val"]
    root = make_imagefolder(tmp_path / "birds", images)
    manifest = formats.load_manifest(root)
    assert manifest["split"].tolist() == ["train"] * 5 + ["test"] * 2
    assert manifest["image_id"].tolist() == list(range(1, 8))


def test_class_only_in_test_is_an_error(tmp_path):
    root = make_imagefolder(tmp_path / "birds")
    _write_image(root / "test" / "Crested_Auklet" / "x.jpg", 16, 16, 0)
    with pytest.raises(DataError) as info:
        formats.load_manifest(root)
    message = str(info.value)
    assert str(root / "test" / "Crested_Auklet") in message
    assert "not in train/" in message
    assert "add training images" in message and "remove" in message


def test_train_only_is_an_error(tmp_path):
    root = make_imagefolder(tmp_path / "birds", [row for row in IMAGES if row[0] == "train"])
    assert imagefolder.looks_like(root)
    with pytest.raises(DataError, match="only train/ exists"):
        formats.load_manifest(root)


def test_empty_training_class_is_an_error(tmp_path):
    root = make_imagefolder(tmp_path / "birds")
    (root / "train" / "Rhinoceros_Auklet").mkdir()
    with pytest.raises(DataError, match="Rhinoceros_Auklet: class folder has no images"):
        formats.load_manifest(root)


def test_nested_folder_in_class_is_an_error(tmp_path):
    root = make_imagefolder(tmp_path / "birds")
    _write_image(root / "train" / "Laysan_Albatross" / "more" / "y.jpg", 16, 16, 0)
    with pytest.raises(DataError, match="contains a subfolder"):
        formats.load_manifest(root)


@pytest.mark.fault(
    "an image that does not decode (truncated, or not an image at all)",
    sees="exit 2: `broken.jpg: image does not decode: not a readable image ... -> replace "
    "the file with a good copy (re-download, dvc pull) or remove it` (the manifest adds the "
    "listing line)",
    kept="everything: nothing is written",
)
def test_undecodable_image_names_the_file(tmp_path):
    root = make_imagefolder(tmp_path / "birds")
    broken = root / "test" / "Sooty_Albatross" / "h.JPG"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="not a readable image") as info:
        formats.load_manifest(root)
    assert str(info.value).startswith(f"{broken}: ")


def test_looks_like_needs_a_train_class_folder(tmp_path):
    assert not imagefolder.looks_like(tmp_path)
    (tmp_path / "train").mkdir()
    assert not imagefolder.looks_like(tmp_path)
    (tmp_path / "train" / "cls").mkdir()
    assert imagefolder.looks_like(tmp_path)


def test_cli_writes_the_manifest(tmp_path):
    root = make_imagefolder(tmp_path / "birds")
    out = tmp_path / "manifest.csv"
    command = [sys.executable, "-m", "iagn.cli", "data", "manifest", "--format", "imagefolder"]
    command += ["--root", str(root), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    _assert_rows(read_manifest(out), _expected_rows(root))
