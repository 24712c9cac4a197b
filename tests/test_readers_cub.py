"""CUB-200-2011 reader and the manifest: exact rows, and errors that name file and line."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from iagn.data.formats import load_manifest, resolve
from iagn.data.manifest import COLUMNS, manifest_digest, read_manifest, write_manifest
from iagn.errors import DataError


@pytest.fixture
def cub(tiny_synth: Path, tmp_path: Path) -> Path:
    """A writable copy of the tiny synthetic dataset, unpacked like the official archive."""
    root = tmp_path / "download" / "CUB_200_2011"
    shutil.copytree(tiny_synth, root)
    return root


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_manifest_rows_match_the_annotation_files(cub: Path):
    manifest = load_manifest(cub)
    assert list(manifest.columns) == list(COLUMNS)
    first = manifest.iloc[0]
    image_id, rel = _lines(cub / "images.txt")[0].split()
    assert first["image_id"] == int(image_id)
    assert first["path"] == f"images/{rel}"
    assert first["label"] == 0
    assert first["class_name"] == _lines(cub / "classes.txt")[0].split()[1]
    assert first["split"] == "train"
    box = [float(v) for v in _lines(cub / "bounding_boxes.txt")[0].split()[1:]]
    assert [first[c] for c in ("x", "y", "w", "h")] == pytest.approx(box)
    assert first["sha256"] == hashlib.sha256((cub / first["path"]).read_bytes()).hexdigest()
    assert manifest["label"].max() == 3


def test_parent_folder_of_the_archive_is_accepted(cub: Path):
    name, root = resolve(cub.parent)
    assert (name, root) == ("cub", cub)
    assert len(load_manifest(cub.parent)) == 24


def test_manifest_roundtrip_and_digest(cub: Path, tmp_path: Path):
    manifest = load_manifest(cub)
    out = write_manifest(manifest, tmp_path / "m" / "manifest.csv")
    again = read_manifest(out)
    assert manifest_digest(again) == manifest_digest(manifest)
    assert not list(out.parent.glob(".*tmp"))  # no temporary file left behind
    changed = manifest.copy()
    changed.loc[0, "label"] = 1
    assert manifest_digest(changed) != manifest_digest(manifest)


@pytest.mark.fault(
    "a manifest write that fails midway (disk full)",
    sees="the error",
    kept="the previous manifest, byte for byte; no half-written file beside it",
)
def test_failed_write_keeps_previous_manifest(cub: Path, tmp_path: Path):
    out = tmp_path / "out" / "manifest.csv"
    write_manifest(load_manifest(cub), out)
    before = out.read_bytes()

    class Exploding(pd.DataFrame):
        def to_csv(self, *args, **kwargs):
            Path(args[0]).write_text("half")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_manifest(Exploding(load_manifest(cub)), out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["manifest.csv"]


def _rewrite(path: Path, line_index: int, text: str) -> None:
    lines = _lines(path)
    lines[line_index] = text
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.fault(
    "a dataset without one of its layout files (train_test_split.txt, the Cars test labels, ...)",
    sees="exit 2: the missing file and the layout it belongs to, and where to get it",
    kept="everything: no manifest is written",
)
def test_missing_layout_file(cub: Path):
    (cub / "train_test_split.txt").unlink()
    with pytest.raises(DataError, match=r"train_test_split.txt.*\n.*CUB_200_2011"):
        load_manifest(cub, "cub")


@pytest.mark.fault(
    "a listed image that does not exist",
    sees="exit 2: `images.txt, line 5: image ... does not exist` (Cars: the .mat record)",
    kept="everything: no manifest is written",
)
def test_listed_image_that_does_not_exist(cub: Path):
    rel = _lines(cub / "images.txt")[4].split()[1]
    (cub / "images" / rel).unlink()
    with pytest.raises(DataError, match=r"images.txt, line 5: image .* does not exist"):
        load_manifest(cub)


@pytest.mark.fault(
    "an image that does not decode (truncated, or not an image at all)",
    sees="exit 2: `broken.jpg: image does not decode: not a readable image ... -> replace "
    "the file with a good copy (re-download, dvc pull) or remove it` (the manifest adds the "
    "listing line)",
    kept="everything: nothing is written",
)
def test_listed_image_that_does_not_decode(cub: Path):
    rel = _lines(cub / "images.txt")[2].split()[1]
    (cub / "images" / rel).write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match=r"images.txt, line 3: .* not a readable image"):
        load_manifest(cub)


@pytest.mark.fault(
    "a label outside the class list",
    sees="exit 2: `image_class_labels.txt, line 7: label 9 of image '...' is outside the "
    "class list (1..4) -> use a class id that the class list defines, or add the class`",
    kept="everything: no manifest is written",
)
def test_label_outside_the_class_list(cub: Path):
    _rewrite(cub / "image_class_labels.txt", 6, "7 9")
    with pytest.raises(DataError, match=r"image_class_labels.txt, line 7: label 9 .*1..4"):
        load_manifest(cub)


@pytest.mark.fault(
    "a bounding box outside its image",
    sees="exit 2: `bounding_boxes.txt, line 2: bounding box ... lies outside the ... image`",
    kept="everything: no manifest is written",
)
def test_box_outside_the_image(cub: Path):
    _rewrite(cub / "bounding_boxes.txt", 1, "2 10.0 10.0 500.0 20.0")
    with pytest.raises(DataError, match=r"bounding_boxes.txt, line 2: bounding box .* outside"):
        load_manifest(cub)


@pytest.mark.fault(
    "a malformed listing line",
    sees="exit 2: `images.txt, line 4: expected at least 2 fields ...`",
    kept="everything: no manifest is written",
)
def test_malformed_line(cub: Path):
    _rewrite(cub / "images.txt", 3, "4")
    with pytest.raises(DataError, match=r"images.txt, line 4: expected at least 2 fields"):
        load_manifest(cub)


@pytest.mark.fault(
    "an unknown --format, or a folder with no known dataset layout",
    sees="exit 2: `unknown dataset format 'inat'` / `cannot tell the dataset layout of ...`, "
    "with the layouts it knows and their marker files",
    kept="everything: nothing is written",
)
def test_unknown_format_name(cub: Path):
    with pytest.raises(DataError, match=r"unknown dataset format 'inat'.*\n.*cub, cars"):
        load_manifest(cub, "inat")


@pytest.mark.fault(
    "an unknown --format, or a folder with no known dataset layout",
    sees="exit 2: `unknown dataset format 'inat'` / `cannot tell the dataset layout of ...`, "
    "with the layouts it knows and their marker files",
    kept="everything: nothing is written",
)
def test_folder_with_no_known_layout(tmp_path: Path):
    (tmp_path / "random").mkdir()
    with pytest.raises(DataError, match="cannot tell the dataset layout"):
        load_manifest(tmp_path / "random")


def test_cli_manifest_and_error(cub: Path, tmp_path: Path):
    out = tmp_path / "manifest.csv"
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "iagn.cli",
            "data",
            "manifest",
            "--format",
            "cub",
            "--root",
            str(cub),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "images       24 (train 12, test 12)" in ok.stdout
    assert len(read_manifest(out)) == 24
    _rewrite(cub / "image_class_labels.txt", 0, "1 99")
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "iagn.cli",
            "data",
            "manifest",
            "--root",
            str(cub),
            "--out",
            str(tmp_path / "other.csv"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert "image_class_labels.txt, line 1: label 99" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not (tmp_path / "other.csv").exists()


def test_box_overshooting_by_a_pixel_is_clamped(cub: Path):
    width = load_manifest(cub).loc[1, "width"]
    _rewrite(cub / "bounding_boxes.txt", 1, f"2 -0.8 3.0 {width:.1f} 20.0")
    row = load_manifest(cub).iloc[1]
    assert (row["x"], row["w"]) == (0.0, width - 0.8)
