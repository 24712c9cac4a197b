"""Benchmark: `iagn validate` on a dataset of CUB-200-2011's size, every image fully decoded.

The dataset is the synthetic generator's output at CUB's scale and image size: 200 classes,
11,788 listed images (200 x 59 generated, 12 dropped from the listing as CUB's classes
differ in size), 375 px high and about 400-500 px wide, JPEG. It is generated once and
cached under /tmp (IAGN_BENCH_CACHE), because generating takes a few minutes.

Measured: the whole step (read the listing, probe and fully decode every image in worker
processes, hash, build the tables, run both GX suites, render the Data Docs, write the
reports), with all cores and with one process for comparison, best of two runs each. The files are
read from the OS page cache (warmed by reading them first), so this is decoding
throughput, not disk speed. Results: printed and written to bench/results/validate.md.

    .venv/bin/python bench/validate_throughput.py
"""

from __future__ import annotations

import os
import platform
import resource
import tempfile
import time
from pathlib import Path

from iagn.data.readers.cub import PART_BOXES_FILE
from iagn.data.synth import SynthConfig, generate
from iagn.device import cpu_model
from iagn.io import write_text_atomic
from iagn.params import load_params, section
from iagn.steps.validate import run  # sets GX_ANALYTICS_ENABLED=false before GX is imported

REPO = Path(__file__).resolve().parent.parent
CONFIG = SynthConfig(classes=200, images_per_class=59, size=375, seed=0)
IMAGES = 11_788  # CUB-200-2011
REPEATS = 2
CACHE = Path(os.environ.get("IAGN_BENCH_CACHE", "/tmp/iagn-bench")) / "cub-size-synth"
RESULTS = REPO / "bench" / "results" / "validate.md"
LISTINGS = (
    "images.txt",
    "image_class_labels.txt",
    "train_test_split.txt",
    "bounding_boxes.txt",
    PART_BOXES_FILE,
)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the decoding workers)."""
    own, children = (
        resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def idle_fraction(seconds: float = 1.0) -> float:
    """Share of all cores idle over `seconds` (from /proc/stat): other work on the machine."""

    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(1, total1 - total0)


def dataset() -> Path:
    """The cached dataset, generated (and trimmed to 11,788 listed images) when absent."""
    marker = CACHE / ".complete"
    if marker.is_file() and marker.read_text() == repr(CONFIG):
        return CACHE
    print(f"generating {CONFIG.classes * CONFIG.images_per_class} images into {CACHE} ...")
    started = time.perf_counter()
    generate(CACHE, CONFIG, workers=os.cpu_count() or 1)
    # Drop the last image of the first 12 classes from every listing: 11,788 images, and
    # classes of 58 and 59 images, as CUB's classes differ in size too.
    surplus = CONFIG.classes * CONFIG.images_per_class - IMAGES
    dropped = {str((c + 1) * CONFIG.images_per_class) for c in range(surplus)}
    for name in LISTINGS:
        path = CACHE / name
        lines = [line for line in path.read_text().splitlines() if line.split()[0] not in dropped]
        path.write_text("\n".join(lines) + "\n")
    marker.write_text(repr(CONFIG))
    print(f"generated in {time.perf_counter() - started:.0f} s")
    return CACHE


def timed_run(root: Path, settings: dict, workers: int) -> dict:
    probe_done: list[float] = []
    seen = 0

    def progress(advance: int, total: int) -> None:  # marks the end of the probe phase
        nonlocal seen
        seen += advance
        if seen == total:
            probe_done.append(time.perf_counter())

    idle = idle_fraction()
    with tempfile.TemporaryDirectory(prefix="iagn-bench-validate-") as out:
        cpu_before = cpu_seconds()
        started = time.perf_counter()
        report = run(root, {**settings, "workers": workers}, out, progress=progress)
        seconds = time.perf_counter() - started
        cpu = cpu_seconds() - cpu_before
    images = report.document["dataset"]["images"]
    assert report.success, f"the benchmark dataset should pass: {report.blocking_failures}"
    assert report.document["dataset"]["fully_decoded"] == images
    probe = probe_done[0] - started
    return {
        "workers": workers,
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "probe_seconds": probe,
        "probe_images_per_s": images / probe,
        "gx_seconds": seconds - probe,
        "cores_used": cpu / seconds,
        "idle_before": idle,
    }


def main() -> None:
    root = dataset()
    settings = dict(section(load_params(REPO / "params.yaml"), "validate"))
    settings["decode_sample"] = None  # the point: decode every image
    cores = os.cpu_count() or 1
    import great_expectations  # noqa: F401 - import once, outside the timed runs

    # Warm the page cache, so both runs measure decoding and not the first disk read.
    size_mb = sum(len(p.read_bytes()) for p in (root / "images").rglob("*.jpg")) / 1e6
    rows = [
        min((timed_run(root, settings, w) for _ in range(REPEATS)), key=lambda r: r["seconds"])
        for w in (cores, 1)
    ]
    lines = [
        "# `iagn validate` throughput",
        "",
        "Full decode of every image (`decode_sample: null`), CUB-200-2011-sized synthetic "
        f"dataset: {rows[0]['images']} images of {CONFIG.classes} classes, {CONFIG.size} px "
        f"high, ~400-500 px wide JPEG ({size_mb:.0f} MB on disk, read from the page cache).",
        "",
        f"- CPU: {cpu_model()} ({cores} cores visible); wall-clock times, best of "
        f"{REPEATS} runs each (other work on a shared machine only slows a run down)",
        f"- Python {platform.python_version()}, `bench/validate_throughput.py`",
        "",
        "| workers | images | total s | images/s | probe s | probe images/s | GX + reports s "
        "| cores used | CPU idle before |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['images']} | {r['seconds']:.1f} | {r['images_per_s']:.0f} | "
            f"{r['probe_seconds']:.1f} | {r['probe_images_per_s']:.0f} | {r['gx_seconds']:.1f} "
            f"| {r['cores_used']:.2f} | {r['idle_before']:.0%} |"
        )
    lines += [
        "",
        "total = the whole step; probe = read the listing + open, fully decode, mode-check "
        "and hash every file in worker processes; GX + reports = derived tables, both "
        "Great Expectations suites, Data Docs, validation.json and summary.md. cores used = "
        "CPU seconds of the step and its workers / wall seconds; CPU idle before = share of "
        "the machine idle in the second before the run (less than 100% means other work "
        "competed for the cores).",
        "",
    ]
    text = "\n".join(lines)
    write_text_atomic(RESULTS, text)
    print(text)
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
