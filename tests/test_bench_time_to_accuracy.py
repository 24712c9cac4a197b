"""The time-to-accuracy benchmark: its quick mode end to end, and its loss check.

Nothing here asserts a time or an accuracy level: only what the run wrote and that an arm
whose loss does not fall fails the run.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import bench.common
from bench import time_to_accuracy, tta_arms
from bench.tta_arms import Arm, LossCheckError, check_losses, one_step

ARMS = {"ours_split", "ours_all", "pmg", "plain_resnet"}


def test_quick_run_writes_curves_targets_table_and_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    threads = torch.get_num_threads()
    # One thread: seconds, not minutes, when other jobs share this CPU.
    time_to_accuracy.main(["--quick", "--threads", "1"])
    assert torch.get_num_threads() == threads  # restored for the next test

    data = json.loads((tmp_path / "time_to_accuracy.json").read_text())
    settings = data["settings"]
    assert settings["quick"] and settings["seeds"] == 2 and data["machine"]["threads"] == 1
    assert settings["precision_resolved"] in ("fp32", "bf16")
    assert set(data["runs"]) == set(data["summary"]) == ARMS
    for name, runs in data["runs"].items():
        assert len(runs) == 2
        epochs = settings["epochs"][name]
        for run in runs:
            # the loss check passed: every epoch's mean is finite and the last below the first
            losses = run["epoch_losses"]
            assert len(losses) == epochs and all(math.isfinite(x) for x in losses)
            assert losses[-1] < losses[0], (name, losses)
            # one evaluation before training, then one per epoch; the clock only moves on
            seconds = [point["seconds"] for point in run["curve"]]
            assert len(seconds) == epochs + 1 and seconds[0] == 0.0
            assert seconds == sorted(seconds) and seconds[-1] == run["train_seconds"]
            assert all(0.0 <= point["val_acc"] <= 1.0 for point in run["curve"])
            # The curve follows the arm's served prediction, fixed in advance; every other
            # prediction is kept beside it.
            served = tta_arms.ARMS[name].served
            for point in run["curve"]:
                assert point["val_acc"] == point["val_acc_by_prediction"][served]
        summary = data["summary"][name]
        best = summary["best_val_acc"]
        assert best["min"] <= best["mean"] <= best["max"]
        assert len(summary["curve"]) == epochs + 1
        if name != "plain_resnet":
            assert {"fused", "combined"} <= set(summary["best_val_acc_by_prediction"])
    # Ours and PMG train the same epochs; the plain ResNet's are sized to ours' time.
    assert settings["epochs"]["ours_split"] == settings["epochs"]["pmg"] == 4
    assert settings["plain_epochs_matched"]
    targets = data["targets"]
    assert set(targets) == {
        "ours_reaches_pmg_best_in_third_of_time",
        "ours_at_least_plain_at_equal_time",
    }
    for target in targets.values():
        assert isinstance(target["met"], bool) and 0 <= target["seeds_met"] <= 2

    table = (tmp_path / "time_to_accuracy.md").read_text()
    assert data["machine"]["cpu"] in table and settings["device"] in table
    assert f"= {settings['precision_resolved']} for every arm" in table
    assert "ours its fused head" in table and "PMG its combined prediction" in table
    assert "![validation accuracy against training time](time_to_accuracy.png)" in table
    for label in ("ours (jigsaw_views: split)", "ours (jigsaw_views: all)", "PMG loop"):
        assert f"| {label}" in table
    for target in targets.values():
        assert ("**yes**" if target["met"] else "**no**") in table
    assert (tmp_path / "time_to_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Progress: one stderr line per arm, seed and epoch.
    progress = [line for line in capsys.readouterr().err.splitlines() if " epoch " in line]
    assert len(progress) == 2 * sum(settings["epochs"].values()), progress


def test_check_losses_needs_finite_falling_losses():
    check_losses("arm", [[2.0, 1.8], [1.5, 1.2]])
    with pytest.raises(LossCheckError, match="did not fall"):
        check_losses("arm", [[1.0, 1.0], [1.1, 0.9]])  # equal means: not below
    with pytest.raises(LossCheckError, match="did not fall"):
        check_losses("arm", [[1.0], [0.5], [1.2]])  # only first and last epoch count
    with pytest.raises(LossCheckError, match="not finite"):
        check_losses("arm", [[2.0, math.nan], [1.0]])
    with pytest.raises(LossCheckError, match="at least 2 epochs"):
        check_losses("arm", [[2.0, 1.0]])


def constant_loss_arm(value: float) -> Arm:
    """The plain ResNet, training on a loss that never moves (or is NaN)."""
    plain = tta_arms.ARMS["plain_resnet"]

    def loss(model, images, labels, ctx):
        return model(images).sum() * 0.0 + value

    return Arm("ours_split", plain.build, plain.groups, one_step(loss), plain.served)


@pytest.mark.parametrize(("value", "message"), [(1.0, "did not fall"), (math.nan, "became nan")])
def test_an_arm_whose_loss_does_not_fall_fails_the_run(tmp_path, monkeypatch, value, message):
    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    monkeypatch.setattr(time_to_accuracy, "ARMS", {"ours_split": constant_loss_arm(value)})
    with pytest.raises(SystemExit) as stopped:
        time_to_accuracy.main(["--quick", "--epochs", "2", "--seeds", "1", "--threads", "1"])
    assert f"time_to_accuracy FAILED: ours_split seed 0: training loss {message}" in str(
        stopped.value
    )
    assert not (tmp_path / "time_to_accuracy.json").exists()


def test_curves_average_point_by_point_and_targets_use_them():
    from bench.tta_report import summarize, target_plain, target_pmg

    def run(points, seconds):
        curve = [{"seconds": s, "epoch": float(k), "val_acc": a} for k, (s, a) in enumerate(points)]
        return {"epochs": 2, "train_seconds": seconds, "curve": curve, "epoch_losses": [2, 1]}

    ours = [run([(0, 0.1), (10, 0.5), (20, 0.6)], 20), run([(0, 0.1), (12, 0.3), (22, 0.6)], 22)]
    pmg = [run([(0, 0.1), (60, 0.3), (120, 0.4)], 120)] * 2
    plain = [run([(0, 0.1), (10, 0.7), (20, 0.8)], 20)] * 2
    summary = {
        "ours_split": summarize(ours),
        "pmg": summarize(pmg),
        "plain_resnet": summarize(plain),
    }
    assert summary["ours_split"]["curve"][1] == {
        "seconds": 11.0,
        "epoch": 1.0,
        "acc_mean": 0.4,
        "acc_min": 0.3,
        "acc_max": 0.5,
    }
    assert summary["ours_split"]["seconds_to_best"] == {"mean": 21.0, "min": 20, "max": 22}
    # PMG's best (0.4) reached by ours' mean curve at 11 s of PMG's 120 s
    first = target_pmg(ours, pmg, summary)
    assert first["met"] and first["ours_seconds_to_reach"] == 11.0
    assert first["seeds_met"] == 2
    # at 20 s (the shorter run) the plain ResNet is ahead
    second = target_plain(ours, plain, summary)
    assert not second["met"] and second["seeds_met"] == 0
    assert second["plain_val_acc"] == pytest.approx(0.8)
    # a curve that never reaches PMG's best: the target is missed, never divided by zero
    never = [run([(0, 0.1), (10, 0.2), (20, 0.3)], 20)] * 2
    summary["ours_split"] = summarize(never)
    assert not target_pmg(never, pmg, summary)["met"]
    assert math.isinf(target_pmg(never, pmg, summary)["time_ratio"])
