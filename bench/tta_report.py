"""Summaries, target checks and the plot of the time-to-accuracy benchmark.

A run is one arm on one seed: {"train_seconds", "curve": [{"seconds", "epoch", "val_acc",
"val_acc_by_prediction"}]} with the same evaluation points for every seed of an arm, so curves
average point by point. `val_acc` is the arm's served prediction; the others are diagnostics.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

PMG_TIME_FRACTION = 1 / 3  # target 1: ours reaches PMG's best in this share of PMG's time


def spread(values: list[float]) -> dict:
    """Mean, min and max; an unreached target's time (inf) makes mean and max inf."""
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def mean_curve(runs: list[dict]) -> list[dict]:
    """Point by point over seeds: mean seconds, and mean / min / max validation accuracy."""
    points = zip(*(run["curve"] for run in runs), strict=True)
    return [
        {
            "seconds": statistics.fmean(p["seconds"] for p in point),
            "epoch": point[0]["epoch"],
            **{f"acc_{k}": v for k, v in spread([p["val_acc"] for p in point]).items()},
        }
        for point in points
    ]


def trained(curve: list[dict]) -> list[dict]:
    """The evaluations after some training: the untrained model's (epoch 0) is on the plot
    only, so that chance level at 0 s never counts as reaching an accuracy."""
    return [p for p in curve if p["epoch"] > 0]


def time_to_reach(curve: list[dict], accuracy: float, key: str = "val_acc") -> float:
    """Training seconds of the first evaluation at or above `accuracy`; inf if none."""
    return next((p["seconds"] for p in trained(curve) if p[key] >= accuracy - 1e-9), math.inf)


def best(curve: list[dict], key: str = "val_acc") -> float:
    return max(p[key] for p in trained(curve))


def best_by(curve: list[dict], seconds: float, key: str = "val_acc") -> float:
    """The best accuracy of the evaluations within `seconds` of training."""
    return max(p[key] for p in trained(curve) if p["seconds"] <= seconds + 1e-9)


def best_by_prediction(runs: list[dict]) -> dict[str, float]:
    """Seed-mean best accuracy of every prediction an arm has (diagnostics)."""
    first = trained(runs[0]["curve"])[0].get("val_acc_by_prediction", {})
    return {
        key: statistics.fmean(
            max(p["val_acc_by_prediction"][key] for p in trained(run["curve"])) for run in runs
        )
        for key in first
    }


def summarize(runs: list[dict]) -> dict:
    bests = [best(run["curve"]) for run in runs]
    return {
        "best_val_acc_by_prediction": best_by_prediction(runs),
        "epochs": runs[0]["epochs"],
        "train_seconds": spread([run["train_seconds"] for run in runs]),
        "best_val_acc": spread(bests),
        "seconds_to_best": spread(
            [time_to_reach(run["curve"], acc) for run, acc in zip(runs, bests, strict=True)]
        ),
        "epoch_loss": [
            statistics.fmean(epoch)
            for epoch in zip(*(r["epoch_losses"] for r in runs), strict=True)
        ],
        "curve": mean_curve(runs),
    }


def target_pmg(
    ours: list[dict], pmg: list[dict], summary: dict, ours_name: str = "ours_split"
) -> dict:
    """Target 1: ours (the arm `ours_name`) reaches the best accuracy PMG attains in its
    budget within 1/3 of PMG's wall time. Judged on the seed-mean curves; per seed for the
    spread."""
    ratios = [
        time_to_reach(o["curve"], best(r["curve"])) / r["train_seconds"]
        for o, r in zip(ours, pmg, strict=True)
    ]
    pmg_curve, ours_curve = summary["pmg"]["curve"], summary[ours_name]["curve"]
    pmg_best = best(pmg_curve, "acc_mean")
    reach = time_to_reach(ours_curve, pmg_best, "acc_mean")
    ratio = reach / pmg_curve[-1]["seconds"]
    return {
        "ours": ours_name,
        "pmg_best_val_acc": pmg_best,
        "pmg_seconds": pmg_curve[-1]["seconds"],
        "ours_seconds_to_reach": reach,
        "time_ratio": ratio,
        "threshold": PMG_TIME_FRACTION,
        "met": ratio <= PMG_TIME_FRACTION,
        "per_seed_ratio": spread(ratios),
        "seeds_met": sum(r <= PMG_TIME_FRACTION for r in ratios),
    }


def target_plain(
    ours: list[dict], plain: list[dict], summary: dict, ours_name: str = "ours_split"
) -> dict:
    """Target 2: at equal wall time (the shorter of the two runs) ours' best validation
    accuracy so far is at least the plain ResNet's."""
    gaps = []
    for o, p in zip(ours, plain, strict=True):
        seconds = min(o["train_seconds"], p["train_seconds"])
        gaps.append(best_by(o["curve"], seconds) - best_by(p["curve"], seconds))
    ours_curve, plain_curve = summary[ours_name]["curve"], summary["plain_resnet"]["curve"]
    seconds = min(ours_curve[-1]["seconds"], plain_curve[-1]["seconds"])
    ours_acc = best_by(ours_curve, seconds, "acc_mean")
    plain_acc = best_by(plain_curve, seconds, "acc_mean")
    return {
        "ours": ours_name,
        "seconds": seconds,
        "ours_val_acc": ours_acc,
        "plain_val_acc": plain_acc,
        "met": ours_acc >= plain_acc,
        "per_seed_gap": spread(gaps),
        "seeds_met": sum(gap >= 0 for gap in gaps),
    }


def plot(summary: dict, labels: dict[str, str], path: Path, title: str) -> Path:
    """Validation accuracy against training seconds: seed mean, min-max band per arm."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, arm in summary.items():
        curve = arm["curve"]
        seconds = [p["seconds"] for p in curve]
        (line,) = ax.plot(seconds, [p["acc_mean"] for p in curve], marker=".", label=labels[name])
        low, high = [p["acc_min"] for p in curve], [p["acc_max"] for p in curve]
        ax.fill_between(seconds, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("training wall time (s, validation excluded)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
