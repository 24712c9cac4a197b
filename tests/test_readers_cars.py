"""Stanford Cars reader: a tiny dataset in the official devkit layout, read end to end."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from iagn.data import formats
from iagn.data.manifest import read_manifest
from iagn.data.readers import cars
from iagn.errors import DataError

CLASS_NAMES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi TTS Coupe 2012"]
FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
# (fname, width, height, (x1, y1, x2, y2) 1-based inclusive, 1-based class id)
TRAIN = [
    ("00001.jpg", 64, 48, (11, 3, 50, 40), 1),
    ("00002.jpg", 32, 32, (1, 1, 32, 32), 2),
    ("00003.jpg", 40, 24, (5, 6, 20, 20), 3),
    ("00004.jpg", 24, 40, (2, 2, 23, 39), 3),
]
TEST = [
    ("00001.jpg", 48, 32, (4, 4, 44, 30), 2),
    ("00002.jpg", 16, 16, (1, 2, 16, 15), 1),
]


def _annotations(rows: list[tuple]) -> np.ndarray:
    """A 1xN struct array, as in the official files (each field a 1x1 matrix or a string)."""
    array = np.zeros((1, len(rows)), dtype=[(name, "O") for name in FIELDS])
    for i, (fname, _, _, (x1, y1, x2, y2), class_id) in enumerate(rows):
        numbers = [np.array([[v]], dtype=np.uint16) for v in (x1, y1, x2, y2)]
        array[0, i] = (*numbers, np.array([[class_id]], dtype=np.uint8), np.array([fname]))
    return array


def _write_images(folder: Path, rows: list[tuple], seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for fname, width, height, _, _ in rows:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / fname, quality=90)


def make_cars(root: Path, train: list[tuple] = TRAIN, test: list[tuple] | None = TEST) -> Path:
    """The official layout: car_devkit/devkit/*.mat, test labels at the root, image folders."""
    devkit = root / "car_devkit" / "devkit"
    devkit.mkdir(parents=True)
    names = np.empty((1, len(CLASS_NAMES)), dtype=object)
    names[0, :] = CLASS_NAMES
    scipy.io.savemat(devkit / "cars_meta.mat", {"class_names": names})
    scipy.io.savemat(devkit / "cars_train_annos.mat", {"annotations": _annotations(train)})
    _write_images(root / "cars_train", train, seed=1)
    if test is not None:
        scipy.io.savemat(
            root / "cars_test_annos_withlabels.mat", {"annotations": _annotations(test)}
        )
        _write_images(root / "cars_test", test, seed=2)
    return root


def test_fixture_matches_the_official_mat_structure(tmp_path):
    root = make_cars(tmp_path / "cars")
    annos = scipy.io.loadmat(root / "car_devkit/devkit/cars_train_annos.mat")["annotations"]
    assert annos.shape == (1, len(TRAIN))
    assert annos.dtype.names == FIELDS
    assert annos[0, 0]["fname"][0] == "00001.jpg"
    names = scipy.io.loadmat(root / "car_devkit/devkit/cars_meta.mat")["class_names"]
    assert names.shape == (1, 3) and names.dtype == object
    assert names[0, 1][0] == "Acura RL Sedan 2012"


def _expected_rows(root: Path, prefix: str = "") -> list[dict]:
    rows = []
    for split, folder, table, first_id in (
        ("train", "cars_train", TRAIN, 1),
        ("test", "cars_test", TEST, len(TRAIN) + 1),
    ):
        for i, (fname, width, height, (x1, y1, x2, y2), class_id) in enumerate(table):
            path = f"{prefix}{folder}/{fname}"
            rows.append(
                {
                    "image_id": first_id + i,
                    "path": path,
                    "label": class_id - 1,
                    "class_name": CLASS_NAMES[class_id - 1],
                    "split": split,
                    "x": x1 - 1.0,
                    "y": y1 - 1.0,
                    "w": x2 - x1 + 1.0,
                    "h": y2 - y1 + 1.0,
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
        assert all(math.isnan(row[c]) for c in ("part_x", "part_y", "part_w", "part_h"))


def test_reads_official_layout(tmp_path):
    root = make_cars(tmp_path / "cars")
    assert formats.detect_format(root) == ("cars", root)
    manifest = formats.load_manifest(root)
    _assert_rows(manifest, _expected_rows(root))
    first = manifest.iloc[0]  # x1=11, x2=50 -> x=10, w=40
    assert (first["x"], first["y"], first["w"], first["h"]) == (10, 2, 40, 38)


def test_parent_folder_resolves_to_the_dataset_folder(tmp_path):
    root = make_cars(tmp_path / "downloads" / "stanford_cars")
    parent = tmp_path / "downloads"
    assert formats.detect_format(parent) == ("cars", root)
    assert formats.resolve(parent, "cars") == ("cars", root)
    _assert_rows(formats.load_manifest(parent), _expected_rows(root))


def test_devkit_directly_under_root_and_test_labels_in_devkit(tmp_path):
    # The torchvision-style layout: devkit/ beside the image folders, test labels inside it.
    root = make_cars(tmp_path / "cars")
    (root / "car_devkit" / "devkit").rename(root / "devkit")
    (root / "cars_test_annos_withlabels.mat").rename(root / "devkit/cars_test_annos_withlabels.mat")
    _assert_rows(formats.load_manifest(root), _expected_rows(root))


def test_kaggle_nested_image_folders(tmp_path):
    root = make_cars(tmp_path / "cars")
    for name in ("cars_train", "cars_test"):
        (root / name).rename(root / "tmp")
        (root / name).mkdir()
        (root / "tmp").rename(root / name / name)
    assert formats.detect_format(root) == ("cars", root)
    manifest = formats.load_manifest(root)
    assert manifest["path"].iloc[0] == "cars_train/cars_train/00001.jpg"
    assert manifest["path"].iloc[-1] == "cars_test/cars_test/00002.jpg"


def test_single_record_files(tmp_path):
    # squeeze_me turns a 1x1 struct array into a bare struct.
    root = make_cars(tmp_path / "cars", train=TRAIN[:1], test=TEST[:1])
    manifest = formats.load_manifest(root)
    assert manifest["image_id"].tolist() == [1, 2]
    assert manifest["split"].tolist() == ["train", "test"]


@pytest.mark.fault(
    "a dataset without one of its layout files (train_test_split.txt, the Cars test labels, ...)",
    sees="exit 2: the missing file and the layout it belongs to, and where to get it",
    kept="everything: no manifest is written",
)
def test_missing_test_labels_say_where_to_get_them(tmp_path):
    root = make_cars(tmp_path / "cars", test=None)
    assert cars.looks_like(root)
    with pytest.raises(DataError) as info:
        formats.load_manifest(root)
    message = str(info.value)
    assert "cars_test_annos_withlabels.mat" in message
    assert "separately" in message
    assert str(root / "car_devkit" / "devkit") in message


@pytest.mark.fault(
    "a label outside the class list",
    sees="exit 2: `image_class_labels.txt, line 7: label 9 of image '...' is outside the "
    "class list (1..4) -> use a class id that the class list defines, or add the class`",
    kept="everything: no manifest is written",
)
def test_class_id_out_of_range_names_the_record(tmp_path):
    bad = [*TRAIN[:2], ("00003.jpg", 40, 24, (5, 6, 20, 20), 197)]
    root = make_cars(tmp_path / "cars", train=bad)
    with pytest.raises(DataError) as info:
        formats.load_manifest(root)
    message = str(info.value)
    assert "cars_train_annos.mat, record 3:" in message
    assert "197" in message


@pytest.mark.fault(
    "a listed image that does not exist",
    sees="exit 2: `images.txt, line 5: image ... does not exist` (Cars: the .mat record)",
    kept="everything: no manifest is written",
)
def test_missing_image_names_the_record(tmp_path):
    root = make_cars(tmp_path / "cars")
    (root / "cars_test" / "00002.jpg").unlink()
    with pytest.raises(DataError, match=r"cars_test_annos_withlabels\.mat, record 2:"):
        formats.load_manifest(root)


def test_missing_devkit_is_not_detected(tmp_path):
    root = make_cars(tmp_path / "cars")
    (root / "car_devkit" / "devkit" / "cars_meta.mat").unlink()
    assert not cars.looks_like(root)
    with pytest.raises(DataError, match=r"cars_meta\.mat"):
        formats.load_manifest(root, format="cars")


def test_cli_writes_the_manifest(tmp_path):
    root = make_cars(tmp_path / "cars")
    out = tmp_path / "manifest.csv"
    command = [sys.executable, "-m", "iagn.cli", "data", "manifest", "--format", "cars"]
    command += ["--root", str(root), "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    _assert_rows(read_manifest(out), _expected_rows(root))
