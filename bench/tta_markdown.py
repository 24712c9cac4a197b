"""The Markdown report of the time-to-accuracy benchmark: every number comes from the run."""

from __future__ import annotations

import math

from bench.common import load_line, markdown_table


def _seconds(value: float) -> str:
    return "never" if not math.isfinite(value) else f"{value:.1f}"


def _spread(row: dict, fmt) -> str:
    return f"{fmt(row['mean'])} [{fmt(row['min'])}, {fmt(row['max'])}]"


def _acc(value: float) -> str:
    return f"{value:.3f}"


def _yes(met: bool) -> str:
    return "**yes**" if met else "**no**"


def _predictions(arm: dict, served: str) -> str:
    """Every prediction's seed-mean best, the served one in bold."""
    heads = arm.get("best_val_acc_by_prediction", {})
    shown = [k for k in ("fused", "combined") if k in heads]
    return ", ".join(
        f"**{k} {heads[k]:.3f}**" if k == served else f"{k} {heads[k]:.3f}" for k in shown
    )


def markdown(
    machine: str,
    settings: dict,
    summary: dict,
    targets: dict,
    labels: dict,
    served: dict[str, str],
) -> str:
    seeds = settings["seeds"]
    rows = [
        [
            labels[name],
            str(arm["epochs"]),
            _spread(arm["train_seconds"], _seconds),
            f"{served[name]}: " + _spread(arm["best_val_acc"], _acc),
            _predictions(arm, served[name]) or "-",
            _spread(arm["seconds_to_best"], _seconds),
            f"{arm['epoch_loss'][0]:.3f} -> {arm['epoch_loss'][-1]:.3f}",
        ]
        for name, arm in summary.items()
    ]
    pmg = targets["ours_reaches_pmg_best_in_third_of_time"]
    plain = targets["ours_at_least_plain_at_equal_time"]
    ratio = pmg["time_ratio"]
    reached = (
        f"ours at {_seconds(pmg['ours_seconds_to_reach'])} s = {ratio:.2f} of PMG's time"
        if math.isfinite(ratio)
        else "ours never reached it"
    )
    per_seed_ratio = pmg["per_seed_ratio"]
    if math.isfinite(per_seed_ratio["max"]):
        ratio_text = _spread(per_seed_ratio, lambda v: f"{v:.2f}")
    elif math.isfinite(per_seed_ratio["min"]):
        ratio_text = f"min {per_seed_ratio['min']:.2f}, some seed never reached it"
    else:
        ratio_text = "no seed reached it"
    gap = plain["per_seed_gap"]
    target_rows = [
        [
            f"1. ours reaches PMG's best ({pmg['pmg_best_val_acc']:.3f}) within 1/3 of PMG's "
            f"time ({pmg['pmg_seconds']:.1f} s)",
            reached,
            f"time ratio: {ratio_text}; {pmg['seeds_met']}/{seeds} seeds <= 1/3",
            _yes(pmg["met"]),
        ],
        [
            f"2. at equal time ({plain['seconds']:.1f} s) ours >= plain ResNet",
            f"ours {plain['ours_val_acc']:.3f}, plain {plain['plain_val_acc']:.3f}",
            f"ours - plain {_spread(gap, lambda v: f'{v:+.3f}')}; "
            f"{plain['seeds_met']}/{seeds} seeds >= 0",
            _yes(plain["met"]),
        ],
    ]
    load = settings["load_average"]
    chance = 1 / settings["classes"]
    epochs = ", ".join(f"{name} {count}" for name, count in settings["epochs"].items())
    plain_epochs = "matched to ours' wall time" if settings["plain_epochs_matched"] else "fixed"
    lines = [
        "# Training speed as time-to-accuracy: ours vs the PMG loop vs a plain ResNet",
        "",
        machine,
        f"Device: {settings['device']}. Precision: train.precision `{settings['precision']}` "
        f"= {settings['precision_resolved']} for every arm.",
        load_line(load["start"], load["end"], settings["threads"]),
        "",
        f"Data: `{settings['data']}`, {settings['classes']} classes (chance {chance:.3f}), "
        f"{settings['train_images']} training and {settings['val_images']} validation images "
        f"at {settings['image_px']} px. Model: {settings['backbone']}, stage blocks of "
        f"{settings['stage_channels']} channels. Training: batch {settings['batch_size']}, lr "
        f"backbone {settings['lr_backbone']} / heads {settings['lr_head']}, warm-up "
        f"{settings['warmup_epochs']} epoch, clipping {settings['grad_clip']}, channels_last "
        f"{settings['channels_last']}; epochs: {epochs} (plain ResNet: {plain_epochs}); "
        f"{seeds} seeds; {settings['evals_per_epoch']} validation(s) per epoch.",
        "",
        "All arms train from scratch with the training loop's optimizer (Nesterov SGD), "
        "warm-up + cosine schedule per batch, gradient clipping, memory format and precision, "
        "on the same batches per seed. Ours is the stage-3 step alone (all heads from the "
        "first batch; the pipeline's default runs stages 1 and 2 first). The clock counts "
        "training only (data loading included, validation excluded). Each arm's curve is the "
        "prediction its method serves, fixed before the run (choosing the best on this same "
        "validation split would flatter the curve it is measured on): ours its fused head, "
        "what iagn's chooser (`iagn/evaluation/choose.py`) served on every seed of "
        "`bench/results/quality.md`; PMG its combined prediction (heads and concatenated "
        "classifier, as the PMG paper reports); the plain ResNet its one head. The other "
        "predictions' best accuracies are listed beside it. Cells: mean [min, max] over "
        f"{seeds} seeds; best and time to best count evaluations after training started "
        "(the untrained model is plotted at 0 s only).",
        "",
        *markdown_table(
            [
                "arm",
                "epochs",
                "train time (s)",
                "best val acc (served)",
                "each prediction's best (mean)",
                "time to best (s)",
                "loss",
            ],
            list("lrrrlrr"),
            rows,
        ),
        "",
        "Loss: training loss, mean over seeds of the first and last epoch's mean; the run "
        "fails when any arm's does not fall or is not finite.",
        "",
        f"Targets, for ours as params.yaml trains it ({labels[pmg['ours']]}), "
        "judged on the seed-mean curves (best accuracy so far at each time):",
        "",
        *markdown_table(
            ["target", "seed-mean curves", "per seed", "met"], list("lllr"), target_rows
        ),
        "",
        *(
            [
                "PMG's best is at chance level here, so target 1 says nothing about how fast "
                "ours learns.",
                "",
            ]
            if pmg["pmg_best_val_acc"] <= chance + 1e-9
            else []
        ),
        "![validation accuracy against training time](time_to_accuracy.png)",
        "",
    ]
    return "\n".join(lines)
