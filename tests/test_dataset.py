"""Torch data layer: boxes stay aligned with pixels through transforms; seeded val split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from iagn.data.dataset import FineGrainedDataset, build_transform, carve_validation
from iagn.data.formats import load_manifest
from iagn.data.manifest import COLUMNS
from iagn.errors import DataError


def _white_box_dataset(tmp_path: Path) -> pd.DataFrame:
    """Images with a white rectangle exactly at the part box on a black background."""
    rng = np.random.default_rng(0)
    rows = []
    for image_id in range(1, 9):
        width, height = int(rng.integers(80, 120)), int(rng.integers(60, 100))
        pw, ph = int(rng.integers(10, 25)), int(rng.integers(10, 25))
        px, py = int(rng.integers(0, width - pw)), int(rng.integers(0, height - ph))
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[py : py + ph, px : px + pw] = 255
        rel = f"img{image_id}.png"
        Image.fromarray(pixels).save(tmp_path / rel)
        rows.append(
            (
                image_id,
                rel,
                0,
                "c",
                "train",
                0.0,
                0.0,
                float(width),
                float(height),
                float(px),
                float(py),
                float(pw),
                float(ph),
                width,
                height,
                "x",
            )
        )
    return pd.DataFrame(rows, columns=list(COLUMNS))


@pytest.mark.parametrize("train", [True, False])
def test_part_box_follows_resize_crop_and_flip(tmp_path: Path, train: bool):
    manifest = _white_box_dataset(tmp_path)
    transform = build_transform(train, resize=72, crop=64, mean=(0, 0, 0), std=(1, 1, 1))
    dataset = FineGrainedDataset(manifest, tmp_path, "train", transform)
    checked = 0
    for seed in range(6):
        torch.manual_seed(seed)
        for item in dataset:
            assert item["image"].shape == (3, 64, 64)
            white = item["image"][0] > 0.5
            if not item["box_valid"][1]:
                assert white.sum() == 0  # the crop removed the part entirely
                continue
            ys, xs = torch.nonzero(white, as_tuple=True)
            x0, y0, x1, y1 = item["boxes"][1].tolist()
            # Pixel extent of the white region vs the transformed box: within resampling blur.
            assert xs.min().item() == pytest.approx(x0, abs=1.5)
            assert xs.max().item() + 1 == pytest.approx(x1, abs=1.5)
            assert ys.min().item() == pytest.approx(y0, abs=1.5)
            assert ys.max().item() + 1 == pytest.approx(y1, abs=1.5)
            checked += 1
    assert checked >= 20


def test_flip_moves_the_box(tmp_path: Path):
    manifest = _white_box_dataset(tmp_path)
    transform = build_transform(True, resize=64, crop=64, mean=(0, 0, 0), std=(1, 1, 1))
    dataset = FineGrainedDataset(manifest, tmp_path, None, transform)
    positions = set()
    for seed in range(12):
        torch.manual_seed(seed)
        positions.add(round(dataset[0]["boxes"][1, 0].item()))
    assert len(positions) >= 2  # flipped and unflipped placements both occur


def test_items_from_synthetic_data(tiny_synth: Path):
    manifest = load_manifest(tiny_synth)
    dataset = FineGrainedDataset(manifest, tiny_synth, "test", build_transform(False, 48, 40))
    item = dataset[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 40, 40)
    assert item["boxes"].shape == (2, 4)
    assert item["label"].dtype == torch.int64
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    assert batch["image"].shape == (2, 3, 40, 40) and batch["boxes"].shape == (2, 2, 4)


def test_missing_boxes_are_marked_invalid(tiny_synth: Path):
    manifest = load_manifest(tiny_synth)
    manifest[["part_x", "part_y", "part_w", "part_h"]] = np.nan
    item = FineGrainedDataset(manifest, tiny_synth, "train", build_transform(False, 48, 40))[0]
    assert item["box_valid"].tolist() == [True, False]


@pytest.mark.fault(
    "an image that does not decode (truncated, or not an image at all)",
    sees="exit 2: `broken.jpg: image does not decode: not a readable image ... -> replace "
    "the file with a good copy (re-download, dvc pull) or remove it` (the manifest adds the "
    "listing line)",
    kept="everything: nothing is written",
)
def test_undecodable_image_names_the_file(tiny_synth: Path, tmp_path: Path):
    manifest = load_manifest(tiny_synth).head(2).copy()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    manifest.loc[0, "path"] = "broken.jpg"
    (tmp_path / "ok.jpg").write_bytes((tiny_synth / manifest.loc[1, "path"]).read_bytes())
    manifest.loc[1, "path"] = "ok.jpg"
    dataset = FineGrainedDataset(manifest, tmp_path, None, build_transform(False, 48, 40))
    with pytest.raises(DataError, match=r"broken\.jpg: image does not decode"):
        dataset[0]


def test_validation_split_is_stratified_seeded_and_leaves_test_alone(tiny_synth: Path):
    manifest = load_manifest(tiny_synth)
    carved = carve_validation(manifest, fraction=0.34, seed=7)
    assert carved.loc[manifest["split"] == "test", "split"].eq("test").all()
    per_class = carved[carved["split"] != "test"].groupby(["label", "split"]).size().unstack()
    assert (per_class["val"] == 1).all() and (per_class["train"] == 2).all()
    again = carve_validation(manifest, fraction=0.34, seed=7)
    assert again["split"].equals(carved["split"])
    other = carve_validation(manifest, fraction=0.34, seed=8)
    assert not other["split"].equals(carved["split"])
    assert manifest["split"].isin(["train", "test"]).all()  # the input is not modified


def test_existing_validation_split_is_kept(tiny_synth: Path):
    manifest = load_manifest(tiny_synth)
    manifest.loc[manifest.index[:2], "split"] = "val"
    assert carve_validation(manifest, 0.5, 0)["split"].equals(manifest["split"])


def test_crop_larger_than_resize_is_rejected():
    with pytest.raises(DataError, match="crop size 80 is larger than resize 64"):
        build_transform(True, resize=64, crop=80)
