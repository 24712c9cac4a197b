"""`iagn predict` and `iagn explain`: JSON lines and an explanation PNG from a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import iagn
from test_training import tiny_params

from iagn.inference import ImageClassifier
from iagn.steps import train_stage


@pytest.fixture(scope="module")
def checkpoint(tiny_synth: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("infer") / "s1.pt"
    train_stage.run(1, None, tiny_params(tiny_synth), out, quiet=True)
    return out


def _images(root: Path, count: int) -> list[Path]:
    return sorted((root / "images").rglob("*.jpg"))[:count]


def test_predict_prints_one_json_line_per_image(checkpoint: Path, tiny_synth: Path):
    images = _images(tiny_synth, 2)
    result = iagn("predict", *images, "--model", checkpoint, "--device", "cpu", cwd=tiny_synth)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(p) for p in images]
    for line in lines:
        assert 0 <= line["class_id"] < 4 and line["class_name"].startswith("00")
        assert len(line["top5"]) == 4  # 4 classes: top-k is capped
        assert line["top5"][0]["class_id"] == line["class_id"]
        assert sum(t["probability"] for t in line["top5"]) == pytest.approx(1.0, abs=1e-4)
        x0, y0, x1, y1 = line["box"]
        assert 0 <= x0 < x1 and 0 <= y0 < y1


def test_explain_writes_a_png(checkpoint: Path, tiny_synth: Path, tmp_path: Path):
    out = tmp_path / "explain.png"
    result = iagn(
        "explain", _images(tiny_synth, 1)[0], "--model", checkpoint, "--out", out, cwd=tiny_synth
    )
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "explanation written to" in result.stdout


@pytest.mark.fault(
    "an image that does not decode (truncated, or not an image at all)",
    sees="exit 2: `broken.jpg: image does not decode: not a readable image ... -> replace "
    "the file with a good copy (re-download, dvc pull) or remove it` (the manifest adds the "
    "listing line)",
    kept="everything: nothing is written",
)
def test_predict_on_a_broken_image_names_it(checkpoint: Path, tmp_path: Path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    result = iagn("predict", broken, "--model", checkpoint, cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "broken.jpg: image does not decode" in result.stderr
    assert "Traceback" not in result.stderr


def test_boxes_map_back_to_original_image_coordinates(checkpoint: Path):
    classifier = ImageClassifier.from_checkpoint(checkpoint)
    # A 144 x 96 image: resized to 108 x 72 (shorter side 72), centre crop 64 x 64.
    box = classifier._to_original(torch.tensor([0.0, 0.0, 64.0, 64.0]), 144, 96)
    scale = 72 / 96
    assert box == pytest.approx([22 / scale, 4 / scale, 86 / scale, 68 / scale], abs=0.01)
