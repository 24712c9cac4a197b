"""The step-throughput benchmark runs end to end at a toy scale and writes its results."""

from __future__ import annotations

import json
import sys

import bench.common
from bench import step_throughput


def test_step_throughput_times_all_loops_and_writes_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    argv = ["step_throughput", "--backbone", "resnet18", "--px", "64", "--batch-size", "4"]
    monkeypatch.setattr(sys, "argv", [*argv, "--steps", "1", "--warmup", "0"])
    step_throughput.main()

    data = json.loads((tmp_path / "step_throughput.json").read_text())
    assert data["settings"]["backbone"] == "resnet18"
    assert data["settings"]["image_px"] == 64
    results = data["results"]
    assert set(results) == {"ours_auto", "ours_fp32", "reference_fp32"}
    for row in results.values():
        assert row["seconds_per_step"] > 0
        assert abs(row["images_per_s"] * row["seconds_per_step"] - 4) < 1e-6
    assert results["reference_fp32"]["speedup_vs_reference"] == 1.0
    table = (tmp_path / "step_throughput.md").read_text()
    assert "| reference_fp32 | fp32 |" in table
    assert data["machine"]["cpu"] in table
    # Every printed figure names its precision and the CPU it ran on.
    figures = [line for line in capsys.readouterr().out.splitlines() if line.endswith(" images/s")]
    assert len(figures) == 2  # ours (auto = fp32 here) and the reference
    assert all(f"fp32, {data['machine']['cpu']}" in line for line in figures), figures
