"""The step-throughput benchmark runs end to end at a toy scale and writes its results."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import bench.common
from bench import step_throughput
from iagn import device


@pytest.mark.parametrize("flags", [{"avx2"}, {"amx_bf16"}], ids=["fp32-cpu", "bf16-cpu"])
def test_step_throughput_times_all_loops_and_writes_results(tmp_path, monkeypatch, capsys, flags):
    # Both answers of `auto`, whatever this machine's CPU is: a CPU with native bf16 times
    # ours twice (auto = bf16, then fp32), one without times it once.
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    argv = ["step_throughput", "--backbone", "resnet18", "--px", "64", "--batch-size", "4"]
    monkeypatch.setattr(sys, "argv", [*argv, "--steps", "1", "--warmup", "0"])
    step_throughput.main()

    data = json.loads((tmp_path / "step_throughput.json").read_text())
    assert data["settings"]["backbone"] == "resnet18"
    assert data["settings"]["image_px"] == 64
    results = data["results"]
    assert set(results) == {"ours_auto", "ours_fp32", "reference_fp32"}
    auto = results["ours_auto"]["precision"]
    assert auto == ("bf16" if "amx_bf16" in flags else "fp32")
    assert data["settings"]["channels_last"]  # every loop, the reference included
    for row in results.values():
        assert 0 < row["seconds_per_step_min"] <= row["seconds_per_step"]
        assert row["seconds_per_step"] <= row["seconds_per_step_max"]
        assert abs(row["images_per_s"] * row["seconds_per_step"] - 4) < 1e-6
    assert results["reference_fp32"]["speedup_vs_reference"] == 1.0
    table = (tmp_path / "step_throughput.md").read_text()
    assert "| reference_fp32 | fp32 |" in table
    assert f"| ours_auto | {auto} |" in table
    assert data["machine"]["cpu"] in table
    # Every printed figure names its precision and the CPU it ran on; ours is timed once
    # more at fp32 only when auto chose something else.
    out = capsys.readouterr().out.splitlines()
    figures = [line for line in out if line.endswith(" images/s")]
    assert len(figures) == (2 if auto == "fp32" else 3), figures
    assert f"ours auto ({auto}, {data['machine']['cpu']}" in figures[0]
    assert all(f", {data['machine']['cpu']}" in line for line in figures), figures
    assert f"reference (fp32, {data['machine']['cpu']}" in figures[-1]


def test_serving_load_reports_latency_errors_and_memory_per_payload(tmp_path, monkeypatch):
    """The serving benchmark end to end at a toy size, on an untrained student."""
    from test_serving_limits import student_checkpoint

    from bench import serving_load
    from iagn.checkpoint import save_checkpoint

    checkpoint = save_checkpoint(tmp_path / "student.pt", student_checkpoint(["a", "b", "c"]))
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    argv = ["serving_load", "--requests", "16", "--clients", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--checkpoint", str(checkpoint)])
    serving_load.main()

    data = json.loads((tmp_path / "serving.json").read_text())
    assert data["settings"] == {"requests": 16, "clients": 2, "workers": 1, "max_body_mb": 16.0}
    assert data["model"]["kind"] == "student" and data["model"]["classes"] == 3
    arms = data["arms"]
    assert set(arms) == {"synth-64px-1-client", "synth-64px", "photo-500x375", "bomb-20000px"}
    assert arms["synth-64px"]["requests"] == arms["photo-500x375"]["requests"] == 16
    assert arms["bomb-20000px"]["requests"] == 4 and arms["bomb-20000px"]["expected_status"] == 400
    assert arms["synth-64px-1-client"]["clients"] == 1 and arms["synth-64px"]["clients"] == 2
    for name, arm in arms.items():
        assert arm["errors"] == 0, (name, arm["statuses"])
        assert 0 < arm["p50_ms"] <= arm["p95_ms"] <= arm["max_ms"], arm
        assert arm["throughput_rps"] > 0 and arm["server_rss_mb_before"] > 0
    table = (tmp_path / "serving.md").read_text()
    assert data["machine"]["cpu"] in table
    assert "| synth-64px | 2 | 16 | 200 |" in table and "| bomb-20000px | 2 | 4 | 400 |" in table


def test_quality_targets_hold_only_when_every_seed_meets_them(tmp_path, monkeypatch):
    """A win on the mean that one seed does not share is not reported as met."""
    from bench import quality

    def run(teacher_top1: float, plain_top1: float) -> dict:
        common = {
            "pointing_game": 0.8,
            "pointing_game_chance": 0.07,
            "box_accuracy": 0.6,
            "box_accuracy_chance": 0.02,
            "deletion_attended_20": 0.5,
            "deletion_random_20": 0.1,
            "ece": 0.05,
            "latency_ms": 10.0,
            "train_seconds": 1.0,
            "precision": "fp32",
        }
        teacher = {**common, "top1": teacher_top1, "top1_fused": teacher_top1, "served": "fused"}
        return {
            "teacher": teacher,
            "student": {**common, "top1": teacher_top1 - 0.01, "latency_ms": 4.0},
            "plain": {**common, "top1": plain_top1},
        }

    runs = [run(0.80, 0.70), run(0.69, 0.70)]  # mean 0.745 vs 0.70, but seed 1 loses
    checks = quality.checks(runs)
    assert checks["teacher_ge_plain"] is False
    assert checks["student_within_5_points"] and checks["student_2x_faster"]
    params = {
        "data": {"synth": {"classes": 10}, "crop": 64},
        "model": {"backbone": "resnet18"},
        "distill": {"student": "resnet18", "epochs": 6},
        **{f"stage{s}": {"epochs": 1} for s in (1, 2, 3)},
    }
    host = {"cpu": "Test CPU", "cpu_native_bf16": False, "threads": 1, "torch": "x"}
    markdown, data = quality.report(params, runs, [0, 1], (0.5, 0.7), host)
    assert "0.745 (0.690-0.800)" in markdown and "teacher_ge_plain: NO" in markdown
    assert data["summary"]["teacher"]["top1"]["min"] == 0.69
    assert "Machine: Test CPU (1 threads" in markdown and data["params"] == params
    # A plain ResNet whose erased "attention" hurts no more than random pixels does not
    # fail the check: it judges the served models' maps.
    runs[0]["plain"]["deletion_attended_20"] = 0.0
    assert quality.checks(runs)["attended_erase_hurts_more"]
    runs[0]["student"]["deletion_attended_20"] = 0.0
    assert not quality.checks(runs)["attended_erase_hurts_more"]
    # --report-only writes the report again from the stored runs, on the stored machine.
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    bench.common.write_results("quality", markdown, data)
    quality.main(["--report-only"])
    again = (tmp_path / "quality.md").read_text()
    assert "Machine: Test CPU (1 threads" in again and "attended_erase_hurts_more: NO" in again


def test_student_speed_times_the_teacher_and_every_student_shape(tmp_path, monkeypatch):
    from bench import student_speed

    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    threads = torch.get_num_threads()
    student_speed.main(["--rounds", "1", "--threads", "1"])
    torch.set_num_threads(threads)

    data = json.loads((tmp_path / "student_speed.json").read_text())
    models = data["models"]
    assert len(models) == 1 + len(student_speed.STUDENT_SHAPES)
    teacher = models["teacher (fused, served)"]
    assert teacher["speedup_latency"] == 1.0
    for row in models.values():
        low, high = row["latency_ms_range"]
        assert 0 < low <= row["latency_ms"] <= high
        assert row["speedup_latency"] == pytest.approx(teacher["latency_ms"] / row["latency_ms"])
    # Ending after layer3 drops layer4's 8.4 M weights: a quarter of the ResNet-18 trunk.
    three = models["student, stride 8, 3 layers"]["parameters"]
    assert three < models["student, stride 8, 4 layers"]["parameters"] / 3
    assert "| teacher (fused, served) |" in (tmp_path / "student_speed.md").read_text()


def test_scaling_paper_recipe_runs_its_plan_on_the_cpu_and_writes_results(tmp_path, monkeypatch):
    """`python -m bench.scaling --recipe paper` at a toy size with --device cpu: the GPU plan
    (1 process, then all of them under torchrun) on CPU processes, results written."""
    from bench import scaling

    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    argv = ["--recipe", "paper", "--device", "cpu", "--backbone", "resnet18", "--px", "64"]
    scaling.main([*argv, "--batch-size", "2", "--steps", "2", "--warmup", "0", "--repeats", "1"])

    data = json.loads((tmp_path / "scaling_paper.json").read_text())
    settings = data["settings"]
    assert settings["recipe"] == "paper" and settings["config"] == "configs/cub.yaml"
    assert settings["backbone"] == "resnet18" and settings["image_px"] == 64
    assert settings["batch_size"] == 2 and settings["stage_channels"] == 512
    results = data["results"]
    assert list(results) == ["1 process", "1 node x 2"]
    one, two = results["1 process"], results["1 node x 2"]
    assert (one["world_size"], one["process_batch_size"]) == (1, 2)
    assert (two["world_size"], two["process_batch_size"]) == (2, 1)  # the global batch split
    cores = data["machine"]["cores"]
    assert one["threads_per_process"] == cores and two["threads_per_process"] == max(1, cores // 2)
    assert data["machine"]["device"] == one["device"]  # what ran it: here the CPU model
    assert one["device"].startswith(data["machine"]["cpu"])
    for row in results.values():
        assert len(row["launch_medians_s"]) == 1
        assert abs(row["images_per_s"] * row["seconds_per_step"] - 2) < 1e-9
        expected = row["images_per_s"] / (row["world_size"] * one["images_per_s"])
        assert row["scaling_efficiency"] == pytest.approx(expected)
    assert one["scaling_efficiency"] == 1.0
    assert set(data["load"]) == {"load_average_start", "load_average_end"}
    table = (tmp_path / "scaling_paper.md").read_text()
    assert "| 1 node x 2 | 2 | 1 |" in table and data["machine"]["cpu"] in table


def test_scaling_paper_recipe_without_a_gpu_says_so(monkeypatch):
    from bench import scaling
    from iagn.train import scale

    monkeypatch.setattr(scale, "visible_gpus", lambda: 0)
    with pytest.raises(SystemExit, match="has none visible; run it on a GPU node"):
        scaling.main(["--recipe", "paper"])
