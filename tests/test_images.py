"""The one image decoder (iagn/data/images.py) and the dataset-root confinement.

Real files throughout: a PNG of a few KB that declares 20000 x 20000 pixels (a decompression
bomb), a 16-bit greyscale PNG, transparent PNGs, listing lines and symlinks that lead out of
the dataset. Every consumer (manifest, training data, validation, predict) must treat each
the same way: the bomb refused from its header, the 16-bit image refused with the same
sentence, transparency on white, escaping paths refused with the listing line named.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import iagn
from PIL import Image
from test_readers_imagefolder import make_imagefolder
from test_training import tiny_params

from iagn import runner
from iagn.data.dataset import FineGrainedDataset
from iagn.data.formats import load_manifest
from iagn.data.images import (
    BACKGROUND,
    DEFAULT_MAX_PIXELS,
    ImageError,
    image_from_array,
    image_size,
    open_image,
)
from iagn.errors import DataError, IagnError
from iagn.inference import ImageClassifier
from iagn.params import load_params
from iagn.steps import train_stage
from iagn.steps import validate as validate_step
from iagn.train.config import data_config
from iagn.train.data import prepare_step_data
from iagn.validation.probe import probe_file

REPO_ROOT = Path(__file__).resolve().parent.parent
BOMB_SIDE = 20000
# Image id -> what replaces its file in the tests below (tiny_synth: 4 classes x 6 images).
BOMB_ID, SIXTEEN_BIT_ID = 2, 9
# The validation settings of tests/test_validate.py for the tiny dataset.
TINY_VALIDATE = {
    "workers": 1,
    "expectations": {
        "min_images_per_class": {"min_count": 3},
        "min_image_width": {"min_width": 48},
        "min_image_height": {"min_height": 48},
    },
}


def png(width: int, height: int, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    """A PNG file from its parts: IHDR with the given header, one IDAT chunk, IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A valid 1-bit greyscale PNG of 20000 x 20000 pixels (400 Mpx) in about 50 KB."""
    rows = bytes((1 + BOMB_SIDE // 8) * BOMB_SIDE)  # filter byte + 2500 bytes per row
    data = png(BOMB_SIDE, BOMB_SIDE, 1, 0, zlib.compress(rows, 9))
    assert len(data) < 100_000
    return data


@pytest.fixture(scope="module")
def sixteen_bit(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("depth") / "depth.png"
    Image.new("I;16", (64, 64), 1000).save(path)
    return path.read_bytes()


def image_path(root: Path, image_id: int) -> Path:
    for line in (root / "images.txt").read_text().splitlines():
        number, rel = line.split()
        if int(number) == image_id:
            return root / "images" / rel
    raise AssertionError(f"image id {image_id} is not listed")


def with_file(source: Path, target: Path, image_id: int, content: bytes) -> Path:
    """A copy of the dataset `source` whose image `image_id` holds `content`."""
    shutil.copytree(source, target)
    image_path(target, image_id).write_bytes(content)
    return target


def no_traceback(result) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr


# --- the decoder itself ----------------------------------------------------------------------


@pytest.mark.fault(
    "a decompression bomb: a 50 KB PNG that declares 20000 x 20000 pixels",
    sees="exit 2: `bomb.png: image is too large: 20000 x 20000 = 400,000,000 pixels, above "
    "the limit data.max_pixels = 67,108,864` (the manifest adds the listing line; validate "
    "reports it as a failed expectation, exit 1)",
    kept="memory: the size is read from the header and no pixel is decoded; nothing is written",
)
def test_bomb_is_refused_from_the_header(bomb: bytes, tmp_path: Path):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    started = time.perf_counter()
    with pytest.raises(ImageError, match=r"bomb\.png: image is too large: 20000 x 20000") as info:
        open_image(path)
    assert time.perf_counter() - started < 1.0  # decoding 400 Mpx would take far longer
    assert f"data.max_pixels = {DEFAULT_MAX_PIXELS:,}" in str(info.value)
    assert "decompression bomb" in info.value.hint
    # The same header with pixel data that cannot decode: the size check comes first.
    garbage = png(BOMB_SIDE, BOMB_SIDE, 1, 0, b"not zlib data")
    with pytest.raises(ImageError, match="is too large"):
        open_image(garbage)
    with pytest.raises(ImageError, match=r"^the request image: image is too large"):
        image_size(bomb, DEFAULT_MAX_PIXELS)


def test_the_limit_is_ours_not_pils(bomb: bytes):
    """PIL's process-wide limit (a warning above 89 Mpx, an error above 179 Mpx) neither
    refuses what data.max_pixels allows nor stays changed."""
    before = Image.MAX_IMAGE_PIXELS
    assert 2 * before < BOMB_SIDE * BOMB_SIDE
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert image_size(bomb, 500_000_000) == (BOMB_SIDE, BOMB_SIDE)
    assert before == Image.MAX_IMAGE_PIXELS
    small = Image.new("RGB", (100, 100))
    with pytest.raises(ImageError, match="100 x 100 = 10,000 pixels, above the limit"):
        image_from_array(np.asarray(small), max_pixels=9_999)


@pytest.mark.fault(
    "a 16-bit or float image (PIL modes I;16, I, F)",
    sees="exit 2: `depth.png: image has mode I;16, 16-bit ... would clip ...` and to convert "
    "it to 8-bit RGB (validate: a failed rgb_convertible row, the same sentence, exit 1)",
    kept="the image; nothing trains on clipped pixels",
)
def test_sixteen_bit_is_refused_with_one_sentence_everywhere(sixteen_bit: bytes, tmp_path):
    path = tmp_path / "depth.png"
    path.write_bytes(sixteen_bit)
    with pytest.raises(ImageError) as decoded:
        open_image(path)
    with pytest.raises(ImageError) as header:
        image_size(path, DEFAULT_MAX_PIXELS)
    problem = decoded.value.problem
    assert problem == header.value.problem
    assert "mode I;16" in problem and "16-bit" in problem and "clip" in problem
    assert "8-bit RGB" in decoded.value.hint
    # validation: the same sentence, fully decoded or from the header alone
    assert probe_file(path).rgb_error == problem
    assert probe_file(path, full_decode=False).rgb_error == problem
    # arrays: 16-bit values are refused too, not wrapped or clipped
    with pytest.raises(ImageError, match=r"outside 0\.\.255"):
        image_from_array(np.full((8, 8), 1000, dtype=np.uint16))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_white(mode: str, tmp_path: Path):
    assert BACKGROUND == (255, 255, 255)
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(200, 0, 0, 0), (0, 0, 0, 128), (0, 0, 0, 255)])  # clear, half, opaque
    if mode == "P":
        # A palette image with one fully transparent entry (PNG tRNS), the usual GIF/PNG way.
        image = Image.new("P", (3, 1))
        image.putpalette([200, 0, 0, 0, 0, 0])
        image.putdata([0, 1, 1])
        image.save(tmp_path / "image.png", transparency=0)
        expected = [(255, 255, 255), (0, 0, 0), (0, 0, 0)]
    else:
        rgba.convert(mode).save(tmp_path / "image.png")
        expected = [(255, 255, 255), (127, 127, 127), (0, 0, 0)]
    decoded = open_image(tmp_path / "image.png")
    assert decoded.mode == "RGB"
    got = [decoded.getpixel((x, 0)) for x in range(3)]
    for pixel, want in zip(got, expected, strict=True):
        assert pixel == pytest.approx(want, abs=1)
    if mode == "RGBA":  # an RGBA array goes the same way
        array = image_from_array(np.asarray(rgba))
        assert [array.getpixel((x, 0)) for x in range(3)] == got


@pytest.mark.fault(
    "an image that does not decode (truncated, or not an image at all)",
    sees="exit 2: `broken.jpg: image does not decode: not a readable image ... -> replace "
    "the file with a good copy (re-download, dvc pull) or remove it` (the manifest adds the "
    "listing line)",
    kept="everything: nothing is written",
)
def test_broken_and_missing_files_are_named(tmp_path: Path):
    with pytest.raises(ImageError, match=r"absent\.jpg: image file is missing"):
        open_image(tmp_path / "absent.jpg")
    with pytest.raises(ImageError, match="not a readable image"):
        open_image(b"no image here")


# --- every consumer ----------------------------------------------------------------------------


@pytest.mark.fault(
    "a decompression bomb: a 50 KB PNG that declares 20000 x 20000 pixels",
    sees="exit 2: `bomb.png: image is too large: 20000 x 20000 = 400,000,000 pixels, above "
    "the limit data.max_pixels = 67,108,864` (the manifest adds the listing line; validate "
    "reports it as a failed expectation, exit 1)",
    kept="memory: the size is read from the header and no pixel is decoded; nothing is written",
)
def test_manifest_refuses_the_bomb_naming_the_listing_line(tiny_synth, bomb, tmp_path):
    root = with_file(tiny_synth, tmp_path / "data", BOMB_ID, bomb)
    with pytest.raises(DataError, match=rf"images.txt, line {BOMB_ID}: image .* is too large"):
        load_manifest(root)
    out = tmp_path / "manifest.csv"
    result = iagn("data", "manifest", "--root", root, "--out", out, cwd=tmp_path, check=False)
    no_traceback(result)
    assert f"line {BOMB_ID}" in result.stderr and "is too large: 20000 x 20000" in result.stderr
    assert not out.exists()


@pytest.mark.fault(
    "a 16-bit or float image (PIL modes I;16, I, F)",
    sees="exit 2: `depth.png: image has mode I;16, 16-bit ... would clip ...` and to convert "
    "it to 8-bit RGB (validate: a failed rgb_convertible row, the same sentence, exit 1)",
    kept="the image; nothing trains on clipped pixels",
)
def test_manifest_refuses_sixteen_bit(tiny_synth, sixteen_bit, tmp_path):
    root = with_file(tiny_synth, tmp_path / "data", SIXTEEN_BIT_ID, sixteen_bit)
    line = rf"images.txt, line {SIXTEEN_BIT_ID}: image .* has mode I;16, 16-bit"
    with pytest.raises(DataError, match=line):
        load_manifest(root)


@pytest.mark.fault(
    "a decompression bomb: a 50 KB PNG that declares 20000 x 20000 pixels",
    sees="exit 2: `bomb.png: image is too large: 20000 x 20000 = 400,000,000 pixels, above "
    "the limit data.max_pixels = 67,108,864` (the manifest adds the listing line; validate "
    "reports it as a failed expectation, exit 1)",
    kept="memory: the size is read from the header and no pixel is decoded; nothing is written",
)
def test_train_stage_refuses_the_bomb(tiny_synth, bomb, tmp_path):
    root = with_file(tiny_synth, tmp_path / "data", BOMB_ID, bomb)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(root)))
    result = iagn(
        "train-stage", "--stage", "1", "--params", params, "--out", tmp_path / "s1.pt",
        "--device", "cpu", "--quiet", cwd=tmp_path, check=False,
    )  # fmt: skip
    no_traceback(result)
    assert "is too large" in result.stderr and not (tmp_path / "s1.pt").exists()


def test_training_data_applies_the_same_rules(tiny_synth, bomb, sixteen_bit, tmp_path):
    """Files replaced after the manifest was built: the loader's own decode refuses them."""
    root = tmp_path / "data"
    shutil.copytree(tiny_synth, root)
    manifest = load_manifest(root)
    dataset = FineGrainedDataset(manifest, root, None)
    index = {int(i): n for n, i in enumerate(manifest["image_id"])}
    image_path(root, BOMB_ID).write_bytes(bomb)
    image_path(root, SIXTEEN_BIT_ID).write_bytes(sixteen_bit)
    transparent = image_path(root, 1)
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(transparent, format="PNG")
    with pytest.raises(ImageError, match="is too large"):
        dataset[index[BOMB_ID]]
    with pytest.raises(ImageError, match="has mode I;16"):
        dataset[index[SIXTEEN_BIT_ID]]
    assert torch.all(dataset[index[1]]["image"] == 1.0)  # white, not the stored black
    small = FineGrainedDataset(manifest, root, None, max_pixels=64 * 64 - 1)
    with pytest.raises(ImageError, match=r"above the limit data\.max_pixels = 4,095"):
        small[index[3]]


@pytest.mark.fault(
    "a 16-bit or float image (PIL modes I;16, I, F)",
    sees="exit 2: `depth.png: image has mode I;16, 16-bit ... would clip ...` and to convert "
    "it to 8-bit RGB (validate: a failed rgb_convertible row, the same sentence, exit 1)",
    kept="the image; nothing trains on clipped pixels",
)
@pytest.mark.fault(
    "a decompression bomb: a 50 KB PNG that declares 20000 x 20000 pixels",
    sees="exit 2: `bomb.png: image is too large: 20000 x 20000 = 400,000,000 pixels, above "
    "the limit data.max_pixels = 67,108,864` (the manifest adds the listing line; validate "
    "reports it as a failed expectation, exit 1)",
    kept="memory: the size is read from the header and no pixel is decoded; nothing is written",
)
def test_validation_reports_both_as_failed_expectations(tiny_synth, bomb, sixteen_bit, tmp_path):
    root = with_file(tiny_synth, tmp_path / "data", BOMB_ID, bomb)
    image_path(root, SIXTEEN_BIT_ID).write_bytes(sixteen_bit)
    report = validate_step.run(root, TINY_VALIDATE, tmp_path / "out")
    assert not report.success
    assert {"images_decode", "rgb_convertible"} <= set(report.blocking_failures)
    entries = {e["name"]: e for e in report.document["expectations"]}
    decode_text = json.dumps(entries["images_decode"])
    assert "is too large: 20000 x 20000" in decode_text
    assert "has mode I;16, 16-bit" in json.dumps(entries["rgb_convertible"])


@pytest.fixture(scope="module")
def checkpoint(tiny_synth: Path, tmp_path_factory) -> Path:
    """A stage-1 model trained with a pixel limit of its own, to see it travel."""
    out = tmp_path_factory.mktemp("model") / "s1.pt"
    params = tiny_params(tiny_synth)
    params["data"]["max_pixels"] = 10_000_000
    train_stage.run(1, None, params, out, quiet=True)
    return out


@pytest.mark.fault(
    "a 16-bit or float image (PIL modes I;16, I, F)",
    sees="exit 2: `depth.png: image has mode I;16, 16-bit ... would clip ...` and to convert "
    "it to 8-bit RGB (validate: a failed rgb_convertible row, the same sentence, exit 1)",
    kept="the image; nothing trains on clipped pixels",
)
@pytest.mark.fault(
    "a decompression bomb: a 50 KB PNG that declares 20000 x 20000 pixels",
    sees="exit 2: `bomb.png: image is too large: 20000 x 20000 = 400,000,000 pixels, above "
    "the limit data.max_pixels = 67,108,864` (the manifest adds the listing line; validate "
    "reports it as a failed expectation, exit 1)",
    kept="memory: the size is read from the header and no pixel is decoded; nothing is written",
)
def test_predict_refuses_bomb_and_sixteen_bit(checkpoint, bomb, sixteen_bit, tmp_path):
    for name, content, message in (
        ("bomb.png", bomb, "bomb.png: image is too large: 20000 x 20000 = 400,000,000 pixels, "
         "above the limit data.max_pixels = 10,000,000"),
        ("depth.png", sixteen_bit, "depth.png: image has mode I;16, 16-bit"),
    ):  # fmt: skip
        (tmp_path / name).write_bytes(content)
        result = iagn("predict", name, "--model", checkpoint, cwd=tmp_path, check=False)
        no_traceback(result)
        assert message in result.stderr


def test_classifier_decodes_with_the_checkpoints_limit(checkpoint, tiny_synth, tmp_path):
    classifier = ImageClassifier.from_checkpoint(checkpoint)
    assert classifier.max_pixels == 10_000_000
    photo = image_path(tiny_synth, 1)
    with Image.open(photo) as image:
        width, height = image.size
        as_rgba = image.convert("RGBA")
    assert classifier.predict_files([photo])[0]["class_name"]
    assert classifier.predict_images([as_rgba])[0][0]["class_name"]  # alpha: composited
    classifier.max_pixels = width * height - 1
    with pytest.raises(ImageError, match="is too large"):
        classifier.predict_files([photo])
    with pytest.raises(ImageError, match=r"^image 0: image is too large"):
        classifier.predict_images([as_rgba])
    with pytest.raises(ImageError, match="is too large"):
        classifier.explain_file(photo, tmp_path / "explain.png")


# --- paths stay inside the dataset root --------------------------------------------------------


def outside_image(tmp_path: Path) -> Path:
    """An image outside the dataset, large enough for any tiny_synth box."""
    secret = tmp_path / "outside" / "secret.jpg"
    secret.parent.mkdir()
    Image.new("RGB", (100, 100), (1, 2, 3)).save(secret)
    return secret


@pytest.mark.fault(
    "a listing line or a symlink that leads outside the dataset root "
    "(`../../../home/me/secret.jpg`)",
    sees="exit 2: `images.txt, line 4: image '...' (id 4) points outside the dataset root "
    "... -> remove the line (or the link), or set params.yaml data.allow_outside_root: true "
    "...`",
    kept="the file outside the root is never read",
)
def test_listing_line_leading_out_is_refused(tiny_synth, tmp_path):
    root = tmp_path / "datasets" / "cub"
    shutil.copytree(tiny_synth, root)
    secret = outside_image(tmp_path)
    lines = (root / "images.txt").read_text().splitlines()
    lines[3] = "4 ../../../outside/secret.jpg"  # relative to images/
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    message = (
        r"images.txt, line 4: image 'images/\.\./\.\./\.\./outside/secret\.jpg' \(id 4\) points "
        f"outside the dataset root {re.escape(str(root.resolve()))} "
        rf"\(resolved to {re.escape(str(secret.resolve()))}\)\n.*allow_outside_root: true"
    )
    with pytest.raises(DataError, match=message):
        load_manifest(root)
    # validation reads the same listing: refused before any file is read
    with pytest.raises(DataError, match=r"line 4: .* points outside the dataset root"):
        validate_step.run(root, TINY_VALIDATE, tmp_path / "validate")
    manifest = load_manifest(root, allow_outside_root=True)
    assert manifest.set_index("image_id").loc[4, "path"] == "images/../../../outside/secret.jpg"


@pytest.mark.fault(
    "a listing line or a symlink that leads outside the dataset root "
    "(`../../../home/me/secret.jpg`)",
    sees="exit 2: `images.txt, line 4: image '...' (id 4) points outside the dataset root "
    "... -> remove the line (or the link), or set params.yaml data.allow_outside_root: true "
    "...`",
    kept="the file outside the root is never read",
)
def test_symlink_leading_out_is_refused(tiny_synth, tmp_path):
    root = tmp_path / "cub"
    shutil.copytree(tiny_synth, root)
    secret = outside_image(tmp_path)
    link = image_path(root, 5)
    link.unlink()
    link.symlink_to(secret)
    with pytest.raises(DataError, match=r"images.txt, line 5: .* points outside the dataset root"):
        load_manifest(root)
    assert len(load_manifest(root, allow_outside_root=True)) == 24
    # a link that stays inside the root is fine
    stash = root / "stash" / "five.jpg"
    stash.parent.mkdir()
    shutil.copy(image_path(tiny_synth, 5), stash)
    link.unlink()
    link.symlink_to(stash)
    assert len(load_manifest(root)) == 24


@pytest.mark.fault(
    "a listing line or a symlink that leads outside the dataset root "
    "(`../../../home/me/secret.jpg`)",
    sees="exit 2: `images.txt, line 4: image '...' (id 4) points outside the dataset root "
    "... -> remove the line (or the link), or set params.yaml data.allow_outside_root: true "
    "...`",
    kept="the file outside the root is never read",
)
def test_imagefolder_link_leading_out_is_refused(tmp_path):
    root = make_imagefolder(tmp_path / "folder")
    elsewhere = make_imagefolder(tmp_path / "elsewhere")
    # The test images of one class are a link to a folder of another dataset.
    shutil.rmtree(root / "test" / "Sooty_Albatross")
    (root / "test" / "Sooty_Albatross").symlink_to(elsewhere / "train" / "Sooty_Albatross")
    with pytest.raises(DataError, match=r"test/Sooty_Albatross/d\.bmp.* points outside"):
        load_manifest(root)
    manifest = load_manifest(root, allow_outside_root=True)
    assert set(manifest[manifest["split"] == "test"]["path"]) == {
        "test/Black_footed_Albatross/g.jpg",
        "test/Sooty_Albatross/d.bmp",
        "test/Sooty_Albatross/e.webp",
    }


# --- the two params -----------------------------------------------------------------------------


@pytest.mark.parametrize("params_file", ["params.yaml", "configs/cub.yaml"])
def test_params_files_carry_the_defaults(params_file: str):
    config = data_config(load_params(REPO_ROOT / params_file))
    assert config.max_pixels == DEFAULT_MAX_PIXELS and config.allow_outside_root is False


@pytest.mark.fault(
    "a params.yaml key or value that is wrong (an unknown key or expectation, a level "
    "`fatal`, a count `ten`, a non-positive max_pixels)",
    sees="exit 2: the key and what is allowed, e.g. `params.yaml validate.expectations has "
    "unknown names ['no_such_check']`, `train has unknown keys ['learning_rate']`",
    kept="everything: the step does not start",
)
@pytest.mark.parametrize(
    ("key", "value"),
    [("max_pixels", 0), ("max_pixels", "large"), ("max_pixels", True), ("allow_outside_root", 1)],
)
def test_bad_settings_are_named(key: str, value):
    with pytest.raises(IagnError, match=f"params.yaml data.{key} must be"):
        data_config({"data": {key: value}})


def linked_outside(tiny_synth: Path, tmp_path: Path) -> tuple[Path, dict]:
    """A copy of the dataset whose image 5 links outside it, and the smoke params for it."""
    root = tmp_path / "cub"
    shutil.copytree(tiny_synth, root)
    link = image_path(root, 5)
    link.unlink()
    link.symlink_to(outside_image(tmp_path))
    return root, tiny_params(root)


def test_allow_outside_root_reaches_the_readers(tiny_synth, tmp_path):
    _, params = linked_outside(tiny_synth, tmp_path)
    with pytest.raises(DataError, match="points outside the dataset root"):
        prepare_step_data(None, params)
    params["data"]["allow_outside_root"] = True
    prepared = prepare_step_data(None, params)
    assert prepared.identity()["max_pixels"] == DEFAULT_MAX_PIXELS
    assert len(prepared.manifest) == 24


def test_validate_reads_with_the_data_sections_limits(tiny_synth, tmp_path, monkeypatch):
    """`iagn validate` applies data.max_pixels and data.allow_outside_root as training will."""
    monkeypatch.setenv("IAGN_TRACKING", "off")
    root, params = linked_outside(tiny_synth, tmp_path)
    with pytest.raises(DataError, match="points outside the dataset root"):
        runner.validate(root, params, tmp_path / "refused")
    params["data"]["allow_outside_root"] = True
    assert runner.validate(root, params, tmp_path / "allowed").document["dataset"]["images"] == 24

    params["data"]["max_pixels"] = 64 * 64 - 1  # every 64 x 64 image is now one pixel too large
    report = runner.validate(root, params, tmp_path / "lowered")
    assert "images_decode" in report.blocking_failures
