"""The synthetic dataset: exact CUB layout, deterministic bytes, fine-grained by design."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iagn.data.formats import detect_format, load_manifest
from iagn.data.synth import SynthConfig, generate, pattern_classes
from iagn.errors import IagnError

CUB_FILES = (
    "images.txt",
    "classes.txt",
    "image_class_labels.txt",
    "train_test_split.txt",
    "bounding_boxes.txt",
    "part_boxes.txt",
)


def _all_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_layout_is_cub_200_2011(tiny_synth: Path):
    for name in CUB_FILES:
        assert (tiny_synth / name).is_file(), name
    classes = (tiny_synth / "classes.txt").read_text().splitlines()
    assert classes[0].startswith("1 001.")
    folders = sorted(p.name for p in (tiny_synth / "images").iterdir())
    assert folders == [line.split(" ", 1)[1] for line in classes]
    image_id, rel = (tiny_synth / "images.txt").read_text().splitlines()[0].split()
    assert image_id == "1"
    assert (tiny_synth / "images" / rel).is_file()
    assert rel.endswith(".jpg")
    assert detect_format(tiny_synth) == ("cub", tiny_synth)


def test_same_seed_gives_byte_identical_files(tmp_path: Path):
    config = SynthConfig(classes=3, images_per_class=4, size=48, seed=11)
    first = generate(tmp_path / "a", config, workers=1)
    second = generate(tmp_path / "b", config, workers=2)  # parallelism must not matter
    files = _all_files(first)
    assert files == _all_files(second)
    _, mismatch, errors = filecmp.cmpfiles(first, second, files, shallow=False)
    assert mismatch == [] and errors == []
    other = generate(tmp_path / "c", SynthConfig(classes=3, images_per_class=4, size=48, seed=12))
    assert (first / "bounding_boxes.txt").read_bytes() != (
        other / "bounding_boxes.txt"
    ).read_bytes()


def test_boxes_are_inside_images_and_part_inside_object(tiny_synth: Path):
    manifest = load_manifest(tiny_synth)
    assert len(manifest) == 24
    assert manifest["part_w"].notna().all() and manifest["w"].notna().all()
    assert (manifest["x"] >= 0).all() and (manifest["x"] + manifest["w"] <= manifest["width"]).all()
    # The part lies on the body, so its centre lies inside the object box.
    part_cx = manifest["part_x"] + manifest["part_w"] / 2
    part_cy = manifest["part_y"] + manifest["part_h"] / 2
    assert ((part_cx > manifest["x"]) & (part_cx < manifest["x"] + manifest["w"])).all()
    assert ((part_cy > manifest["y"]) & (part_cy < manifest["y"] + manifest["h"])).all()
    # Parts are small: the discriminative region is a fraction of the object.
    ratio = (manifest["part_w"] * manifest["part_h"]) / (manifest["w"] * manifest["h"])
    assert ratio.max() < 0.35
    # Split follows --train-fraction (0.5) per class.
    per_class = manifest.groupby(["label", "split"]).size().unstack()
    assert (per_class["train"] == 3).all() and (per_class["test"] == 3).all()


def test_part_position_and_scale_vary(tiny_synth: Path):
    manifest = load_manifest(tiny_synth)
    rel_x = (manifest["part_x"] - manifest["x"]) / manifest["w"]
    assert rel_x.std() > 0.05
    assert manifest["part_w"].std() > 1.0


def test_class_names_are_distinct_patterns():
    classes = pattern_classes(200)
    assert len({c.name for c in classes}) == 200


def _color_histograms(root: Path, manifest) -> np.ndarray:
    features = []
    for rel in manifest["path"]:
        pixels = np.asarray(Image.open(root / rel).convert("RGB"))
        features.append(
            np.concatenate(
                [np.histogram(pixels[..., c], bins=16, range=(0, 256))[0] for c in range(3)]
            )
            / pixels[..., 0].size
        )
    return np.array(features)


def test_global_color_statistics_do_not_reveal_the_class(tmp_path: Path):
    """A logistic regression on per-channel colour histograms stays near chance."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    config = SynthConfig(classes=10, images_per_class=40, size=96, seed=0)
    root = generate(tmp_path / "hist", config, workers=2)
    manifest = load_manifest(root)
    features = _color_histograms(root, manifest)
    labels = manifest["label"].to_numpy()
    train = (manifest["split"] == "train").to_numpy()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    model.fit(features[train], labels[train])
    accuracy = float((model.predict(features[~train]) == labels[~train]).mean())
    chance = 1.0 / config.classes
    assert accuracy <= 2 * chance, f"colour histograms reach {accuracy:.2f} (chance {chance})"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": 1}, "--classes"),
        ({"images_per_class": 1}, "--images-per-class"),
        ({"size": 8}, "--size"),
        ({"train_fraction": 1.0}, "--train-fraction"),
    ],
)
def test_bad_arguments_are_explained(kwargs, message, tmp_path: Path):
    with pytest.raises(IagnError, match=message):
        generate(tmp_path / "x", SynthConfig(**kwargs))
    assert not (tmp_path / "x").exists()


def test_cli_writes_dataset(tmp_path: Path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "iagn.cli",
            "data",
            "synth",
            "--out",
            str(out),
            "--classes",
            "3",
            "--images-per-class",
            "2",
            "--size",
            "40",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 6 images of 3 classes" in result.stdout
    assert len((out / "images.txt").read_text().splitlines()) == 6
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "iagn.cli",
            "data",
            "synth",
            "--out",
            str(tmp_path / "bad"),
            "--classes",
            "0",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert "--classes must be between 2 and 999" in bad.stderr
    assert "Traceback" not in bad.stderr
