"""`iagn validate`: Great Expectations checks of a dataset, the pipeline's first gate.

A copy of the tiny synthetic dataset (CUB layout) is broken in one distinct way per
expectation; one validation run must name every problem with its own expectation, the
files involved and what to do, and exit 1. The intact dataset passes; a warning-level
failure does not block.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import iagn
from PIL import Image

from iagn.cli import main
from iagn.data.readers import cub
from iagn.steps.validate import run
from iagn.validation.probe import probe_file
from iagn.validation.rules import RULES, RULES_BY_NAME
from iagn.validation.tables import classes_table, images_table

# tiny_synth: 4 classes x 6 images, 64 px high, images 1-3 of each class train, 4-6 test.
TINY_SETTINGS = {
    "workers": 1,
    "expectations": {
        "min_images_per_class": {"min_count": 3},
        "min_image_width": {"min_width": 48},
        "min_image_height": {"min_height": 48},
    },
}
LISTING_FILES = (
    "images.txt",
    "image_class_labels.txt",
    "train_test_split.txt",
    "bounding_boxes.txt",
    cub.PART_BOXES_FILE,
)


def copy_dataset(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def listed_paths(root: Path) -> dict[int, str]:
    """image id -> path relative to the dataset root, as the manifest names it."""
    rows = (line.split() for line in (root / "images.txt").read_text().splitlines())
    return {int(image_id): f"images/{rel}" for image_id, rel in rows}


def edit_lines(path: Path, edit) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(line for line in map(edit, lines) if line is not None) + "\n")


def set_row(root: Path, name: str, image_id: int, values: str) -> None:
    edit_lines(root / name, lambda line: values if line.split()[0] == str(image_id) else line)


def drop_images(root: Path, image_ids: set[int]) -> None:
    for name in LISTING_FILES:
        edit_lines(root / name, lambda line: None if int(line.split()[0]) in image_ids else line)


def write_params(path: Path, settings: dict) -> Path:
    path.write_text(yaml.safe_dump({"validate": settings}))
    return path


def cli(*args: str | Path) -> tuple[int, str, str]:
    """Run `iagn ...` in this process (GX imports once for the whole file)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def by_name(document: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in document["expectations"]}


def example_paths(entry: dict) -> set[str]:
    return {example["path"] for example in entry["examples"]}


# --- the intact dataset passes -------------------------------------------------------------


def test_synthetic_dataset_passes(tiny_synth, tmp_path):
    report = run(tiny_synth, TINY_SETTINGS, tmp_path / "out")

    assert report.success and report.blocking_failures == [] and report.warnings == []
    document = json.loads(report.report_path.read_text())
    assert document["success"] is True
    assert [e["name"] for e in document["expectations"]] == [r.name for r in RULES]
    assert all(
        e["success"] and e["unexpected_count"] in (0, None) for e in document["expectations"]
    )
    assert document["dataset"]["images"] == len(listed_paths(tiny_synth))
    assert document["dataset"]["fully_decoded"] == document["dataset"]["images"]

    summary = report.summary_path.read_text()
    assert summary.startswith("# Data validation passed")
    assert "| ✗ |" not in summary and "| ⚠ |" not in summary
    assert all(f"| ✓ | `{rule.name}` |" in summary for rule in RULES)


def test_data_docs_name_every_expectation(tiny_synth, tmp_path):
    report = run(tiny_synth, TINY_SETTINGS, tmp_path / "out")

    index = report.data_docs_path
    assert index == tmp_path / "out" / "data_docs" / "index.html" and index.is_file()
    html = index.read_text()
    # The index lists the two suites and links to this run's validation result pages.
    assert "iagn_images" in html and "iagn_classes" in html
    pages = sorted(set(re.findall(r'validations/[^"\']+\.html', html)))
    assert len(pages) == 2
    rendered = "".join((index.parent / page).read_text() for page in pages)
    missing = [rule.name for rule in RULES if rule.name not in rendered]
    assert not missing, f"Data Docs do not name {missing}"


# --- a dataset broken in every way ----------------------------------------------------------

# expectation -> the image ids its failure must name (None: a per-class expectation)
BREAKS = {
    "files_exist": {14},
    "images_decode": {2, 8},
    "label_in_range": {20},
    "unique_paths": {1, 25},
    "no_leakage": {19, 22},
    "boxes_valid": {9},
    "min_image_width": {10},
    "min_image_height": {10},
    "min_images_per_class": None,
}


@pytest.fixture(scope="module")
def broken(tiny_synth, tmp_path_factory):
    """tiny_synth with one distinct problem per image; the CLI's exit code, output, report."""
    tmp = tmp_path_factory.mktemp("broken")
    root = copy_dataset(tiny_synth, tmp / "data")
    paths = listed_paths(root)
    image = {image_id: root / rel for image_id, rel in paths.items()}

    # corrupt: a JPEG marker, then garbage; truncated: the second half of the file is gone
    image[2].write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    image[8].write_bytes(image[8].read_bytes()[: image[8].stat().st_size // 2])
    image[14].unlink()  # missing file
    image[22].write_bytes(image[19].read_bytes())  # a train image reappears in test
    set_row(root, "image_class_labels.txt", 20, "20 7")  # only 4 classes
    set_row(root, "bounding_boxes.txt", 9, "9 60 5 50 20")  # past the right edge
    # too small (40x30); its boxes shrink with it so only the size expectations fire
    Image.new("RGB", (40, 30), (90, 120, 60)).save(image[10], quality=90)
    set_row(root, "bounding_boxes.txt", 10, "10 1 1 10 10")
    set_row(root, cub.PART_BOXES_FILE, 10, "10 2 2 5 5")
    drop_images(root, {17, 18})  # class 3 keeps one test image
    # image 1 listed a second time, as id 25 (same split: a repeat, not a leak)
    rel = paths[1].removeprefix("images/")
    for name, row in (
        ("images.txt", f"25 {rel}"),
        ("image_class_labels.txt", "25 1"),
        ("train_test_split.txt", "25 1"),
    ):
        with open(root / name, "a") as handle:
            handle.write(row + "\n")
    paths[25] = paths[1]

    params = write_params(tmp / "params.yaml", TINY_SETTINGS)
    out = tmp / "out"
    code, stdout, stderr = cli(
        "validate", "--data", root, "--params", params, "--out", out, "--quiet"
    )
    document = json.loads((out / "validation.json").read_text())
    return {
        "code": code,
        "stdout": stdout,
        "stderr": stderr,
        "document": document,
        "paths": paths,
        "out": out,
    }


@pytest.mark.fault(
    "a dataset with broken content: a truncated image, a label past the class list, a class "
    "with too few images, a test image copied into train, a box past the edge",
    sees="exit 1: `iagn: error: data validation failed: 5 blocking expectations failed: "
    "...`, each with the offending files (and annotation lines) and what to do; "
    "validation.json, summary.md, Data Docs",
    kept="the dataset; the pipeline stops before training",
)
def test_broken_dataset_blocks_with_exit_1(broken):
    assert broken["code"] == 1, broken["stderr"]
    document = broken["document"]
    assert document["success"] is False
    assert set(document["blocking_failures"]) == set(BREAKS)
    assert "iagn: error: data validation failed" in broken["stderr"]
    assert "data validation FAILED" in broken["stdout"]


@pytest.mark.fault(
    "a dataset with broken content: a truncated image, a label past the class list, a class "
    "with too few images, a test image copied into train, a box past the edge",
    sees="exit 1: `iagn: error: data validation failed: 5 blocking expectations failed: "
    "...`, each with the offending files (and annotation lines) and what to do; "
    "validation.json, summary.md, Data Docs",
    kept="the dataset; the pipeline stops before training",
)
@pytest.mark.parametrize("name", sorted(BREAKS))
def test_each_problem_is_named_by_its_expectation(broken, name):
    entry = by_name(broken["document"])[name]
    assert entry["success"] is False and entry["level"] == "blocking"
    assert entry["expectation"].startswith("expect_")
    expected_ids = BREAKS[name]
    if expected_ids is not None:
        expected = {broken["paths"][i] for i in expected_ids}
        assert entry["unexpected_count"] == len(expected_ids)
        assert example_paths(entry) == expected
        assert all(example["detail"] for example in entry["examples"])
        for path in expected:
            assert path in broken["stderr"]
    # The error names the expectation and says what to do.
    assert f"✗ {name} (blocking)" in broken["stderr"]
    assert entry["hint"] in broken["stderr"]


def test_class_counts_name_the_thin_classes(broken):
    entry = by_name(broken["document"])["min_images_per_class"]
    thin = {(e["class_name"], e["split"], e["count"]) for e in entry["examples"]}
    # class 3 lost two test images; class 4 lost a train image to the out-of-range label
    assert {(name[4:], split, count) for name, split, count in thin} == {
        ("Rings_2", "test", 1),
        ("Rays_3", "train", 2),
    }


def test_unbroken_expectations_stay_green(broken):
    entries = by_name(broken["document"])
    green = {name for name, entry in entries.items() if entry["success"]}
    assert green == {rule.name for rule in RULES} - set(BREAKS)


def test_problem_details_point_at_the_cause(broken):
    entries = by_name(broken["document"])
    decode = {e["path"]: e["detail"] for e in entries["images_decode"]["examples"]}
    assert "truncated" in decode[broken["paths"][8]]
    assert "image_class_labels.txt, line" in entries["label_in_range"]["examples"][0]["detail"]
    assert "bounding_boxes.txt, line" in entries["boxes_valid"]["examples"][0]["detail"]
    leak = {e["path"]: e["detail"] for e in entries["no_leakage"]["examples"]}
    assert broken["paths"][19] in leak[broken["paths"][22]]


def test_broken_summary_marks_failures(broken):
    summary = (broken["out"] / "summary.md").read_text()
    assert "FAILED" in summary
    for name in BREAKS:
        assert f"| ✗ | `{name}` | blocking |" in summary
    assert broken["paths"][14] in summary


# --- levels, switches, options ---------------------------------------------------------------


def test_warning_level_does_not_block(tiny_synth, tmp_path):
    root = copy_dataset(tiny_synth, tmp_path / "data")
    small = root / listed_paths(root)[5]
    Image.new("RGB", (40, 30), (90, 120, 60)).save(small)
    set_row(root, "bounding_boxes.txt", 5, "5 1 1 10 10")
    set_row(root, cub.PART_BOXES_FILE, 5, "5 2 2 5 5")
    settings = {
        **TINY_SETTINGS,
        "decode_sample": 5,
        "expectations": {
            **TINY_SETTINGS["expectations"],
            "min_image_width": {"level": "warning", "min_width": 48},
            "min_image_height": {"enabled": False},
        },
    }
    params = write_params(tmp_path / "params.yaml", settings)
    code, stdout, stderr = cli(
        "validate", "--data", root, "--params", params, "--out", tmp_path / "out", "--quiet"
    )

    assert code == 0, stderr
    document = json.loads((tmp_path / "out" / "validation.json").read_text())
    assert document["success"] is True and document["blocking_failures"] == []
    assert document["warnings"] == ["min_image_width"]
    assert document["disabled"] == ["min_image_height"]
    assert "min_image_height" not in by_name(document)
    assert document["dataset"]["fully_decoded"] == 5
    assert re.search(r"⚠ min_image_width\s+warning", stdout)
    assert "warning" in stderr and str(listed_paths(root)[5]) in stderr
    assert "| ⚠ | `min_image_width` | warning |" in (tmp_path / "out" / "summary.md").read_text()


@pytest.mark.fault(
    "`iagn validate` on a dataset whose listing cannot be read (a layout file missing)",
    sees="exit 2 naming the file",
    kept="the dataset; an earlier validation.json is removed on purpose, so a stale success "
    "never passes the gate",
)
def test_unreadable_listing_exits_2_and_drops_a_stale_report(tiny_synth, tmp_path):
    root = copy_dataset(tiny_synth, tmp_path / "data")
    (root / "image_class_labels.txt").unlink()
    out = tmp_path / "out"
    out.mkdir()
    (out / "validation.json").write_text('{"success": true}')
    params = write_params(tmp_path / "params.yaml", TINY_SETTINGS)

    code, _, stderr = cli(
        "validate", "--data", root, "--format", "cub", "--params", params, "--out", out
    )

    assert code == 2
    assert "image_class_labels.txt" in stderr
    assert not (out / "validation.json").exists()  # no stale "success" for later steps


@pytest.mark.fault(
    "a params.yaml key or value that is wrong (an unknown key or expectation, a level "
    "`fatal`, a count `ten`, a non-positive max_pixels)",
    sees="exit 2: the key and what is allowed, e.g. `params.yaml validate.expectations has "
    "unknown names ['no_such_check']`, `train has unknown keys ['learning_rate']`",
    kept="everything: the step does not start",
)
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"expectations": {"no_such_check": {}}}, "unknown names ['no_such_check']"),
        ({"expectations": {"no_leakage": {"level": "fatal"}}}, "no_leakage.level"),
        ({"expectations": {"min_images_per_class": {"min_count": "ten"}}}, "min_count"),
        ({"decode_sample": 0}, "decode_sample"),
    ],
)
def test_bad_params_are_named(tiny_synth, tmp_path, settings, message):
    params = write_params(tmp_path / "params.yaml", settings)
    code, _, stderr = cli(
        "validate", "--data", tiny_synth, "--params", params, "--out", tmp_path / "out"
    )
    assert code == 2 and message in stderr and "params.yaml" in stderr


def test_console_script_help():
    result = iagn("validate", "--help", cwd=Path.cwd())
    for word in ("--data", "--params", "--out", "--format", "--quiet", "Exit code"):
        assert word in result.stdout


# --- the pieces, without Great Expectations --------------------------------------------------


def test_probe_reports_instead_of_raising(tmp_path):
    sixteen_bit = tmp_path / "depth.png"
    Image.new("I;16", (8, 8), 1000).save(sixteen_bit)
    cmyk = tmp_path / "print.jpg"
    Image.new("CMYK", (8, 8), (0, 50, 100, 0)).save(cmyk)
    garbage = tmp_path / "notes.jpg"
    garbage.write_text("not an image")

    assert probe_file(tmp_path / "absent.jpg").exists is False
    probe = probe_file(sixteen_bit)
    assert probe.decoded and probe.decode_error is None and "16-bit" in probe.rgb_error
    probe = probe_file(cmyk)
    assert probe.decoded and probe.rgb_error is None and probe.mode == "CMYK"
    probe = probe_file(garbage)
    assert probe.exists and probe.sha256 and "not an image" in probe.decode_error
    header_only = probe_file(cmyk, full_decode=False)
    assert not header_only.decoded and (header_only.width, header_only.height) == (8, 8)


def test_tables_catch_name_clashes_and_empty_classes(tiny_synth, tmp_path):
    root = copy_dataset(tiny_synth, tmp_path / "data")
    names = (root / "classes.txt").read_text().splitlines()
    # class 4 gets class 3's name; class 2 loses all its train images
    (root / "classes.txt").write_text("\n".join([*names[:3], f"4 {names[2].split()[1]}"]) + "\n")
    drop_images(root, {7, 8, 9})
    raw = cub.read(root)
    probes = [probe_file(root / r.path) for r in raw.records]

    images = images_table(raw, probes)
    clashing = images[images["class_name_problem"].notna()]
    assert set(clashing["label"]) == {2, 3}
    assert "used by labels 2, 3" in clashing["class_name_problem"].iloc[0]
    classes = classes_table(images, raw.class_names)
    empty = classes[(classes["label"] == 1) & (classes["split"] == "train")]
    assert int(empty["count"].iloc[0]) == 0
    assert classes["train_ratio"].max() == float("inf")
    assert RULES_BY_NAME["max_class_imbalance"].level == "warning"
