"""Training speed as time-to-accuracy: validation accuracy against training wall time.

Four arms train from scratch in one run, on the same data and batches, with the same
optimizer, warm-up + cosine schedule, gradient clipping, memory format and precision
(bench/tta_arms.py): ours with `jigsaw_views: split` and `all` (the default, PMG's jigsaw
work per image), the PMG research loop with PMG's heads, and a plain ResNet of the same
backbone. Ours and PMG train `--epochs` epochs; the plain ResNet as many epochs as fit in
ours' wall time (from ours' first run and a timing of plain batches), so the two compare at
equal time. Each arm runs on every seed; the validation split is evaluated a few times per
epoch, with the training clock paused.

Targets, judged on the seed-mean curves (per-seed counts alongside):
  1. ours reaches the best validation accuracy the PMG loop attains in its budget within
     1/3 of the PMG loop's wall time;
  2. at equal wall time ours' validation accuracy is at least the plain ResNet's.
The run fails (exit 1) if an arm's training loss is not finite or does not fall (mean of
the last epoch below the first's). Progress goes to stderr, one line per arm, seed, epoch.

    python -m bench.time_to_accuracy           # data/synth (`make data`), ~25 min on 2 cores
    python -m bench.time_to_accuracy --quick   # smoke overlay, tiny 32 px data: for tests
    python -m bench.time_to_accuracy --threads 1   # a CPU other jobs share: no thread thrash
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from bench import common
from bench.common import (
    REPO,
    device_name,
    load_average,
    machine,
    machine_line,
    synthetic_dataset,
    write_results,
)
from bench.tta_arms import ARMS, LossCheckError, seconds_per_batch, train_arm
from bench.tta_markdown import markdown
from bench.tta_report import plot, summarize, target_plain, target_pmg
from iagn.device import pick_device
from iagn.params import load_params, merge_params
from iagn.precision import resolve_precision
from iagn.train.config import data_config, stage_config
from iagn.train.data import prepare_data

NAME = "time_to_accuracy"


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --quick: the smoke overlay with enough 32 px images for a few batches per epoch, so every
# arm's loss falls within seconds of training.
QUICK = {
    "data": {"synth": {"images_per_class": 16, "size": 32}, "resize": 36, "crop": 32},
    "train": {"batch_size": 8},
}


def load(quick: bool) -> tuple[dict, object]:
    """Params and prepared data: data/synth with params.yaml, or tiny generated data."""
    if quick:
        params = load_params(REPO / "params.yaml", REPO / "configs" / "smoke.yaml")
        params = merge_params(params, QUICK)
        root = synthetic_dataset(params)
    else:
        params = load_params(REPO / "params.yaml")
        root = REPO / params["data"]["root"]
        if not (root / "images.txt").is_file():
            raise SystemExit(f"{root} is missing: run `make data` first")
    return params, prepare_data(root, data_config(params))


def run_all(args, params, data, precision, device) -> dict[str, list[dict]]:
    """Every arm on every seed, interleaved so that load changes hit all arms alike."""
    runs: dict[str, list[dict]] = {name: [] for name in ARMS}
    plain_epochs = args.plain_epochs
    for seed in range(args.seeds):
        for name, arm in ARMS.items():
            epochs = args.epochs
            if name == "plain_resnet":
                if plain_epochs is None:
                    ours = runs[f"ours_{stage_config(params, 3).jigsaw_views}"][0]
                    plain_epochs = matched_epochs(ours, params, data, precision)
                    log(f"plain_resnet: {plain_epochs} epochs fill ours' wall time")
                epochs = plain_epochs
            run = train_arm(
                arm, params, data, seed, epochs, args.evals_per_epoch, precision, device, log
            )
            runs[name].append(run)
    return runs


def matched_epochs(ours_run: dict, params: dict, data, precision: str) -> int:
    """Epochs of the plain ResNet that take about as long as ours' first run."""
    config = stage_config(params, 3)
    batches = len(data.loader("train", True, config.batch_size))
    per_batch = seconds_per_batch(
        ARMS["plain_resnet"], params, data, precision, pick_device(), steps=5
    )
    return max(2, round(ours_run["train_seconds"] / (per_batch * batches)))


def finite(value):
    """JSON has no infinity: an unreached time becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke data, for tests")
    parser.add_argument(
        "--epochs", type=int, default=None, help="ours and PMG (default 10; --quick: 4)"
    )
    parser.add_argument("--plain-epochs", type=int, default=None, help="default: time-matched")
    parser.add_argument("--seeds", type=int, default=None, help="default 3 (--quick: 2)")
    parser.add_argument("--evals-per-epoch", type=int, default=None, help="default 2 (--quick: 1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads for the run (default: torch's); on a CPU shared with other "
        "jobs, 1 avoids the thread contention that slows every step",
    )
    args = parser.parse_args(argv)
    # 10 epochs: at 4 every arm was still near chance on the demo data; 10 fit ~25 min on 2
    # cores. --quick: 4, enough for every arm's loss to fall on its tiny data.
    args.epochs = args.epochs or (4 if args.quick else 10)
    args.seeds = args.seeds or (2 if args.quick else 3)
    args.evals_per_epoch = args.evals_per_epoch or (1 if args.quick else 2)

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        run(args)
    finally:
        torch.set_num_threads(threads)  # the caller's setting (tests run in one process)


def run(args) -> None:
    params, data = load(args.quick)
    device = pick_device()
    config = stage_config(params, 3)
    precision = resolve_precision(config.precision, device)
    load_start = load_average()
    try:
        runs = run_all(args, params, data, precision, device)
    except LossCheckError as exc:
        raise SystemExit(f"time_to_accuracy FAILED: {exc}") from None

    summary = {name: summarize(arm_runs) for name, arm_runs in runs.items()}
    # The targets judge ours as params.yaml trains it (train.jigsaw_views).
    ours = f"ours_{config.jigsaw_views}"
    targets = {
        "ours_reaches_pmg_best_in_third_of_time": target_pmg(
            runs[ours], runs["pmg"], summary, ours
        ),
        "ours_at_least_plain_at_equal_time": target_plain(
            runs[ours], runs["plain_resnet"], summary, ours
        ),
    }
    backbone = params["model"]["backbone"]
    settings = {
        "data": str(data.root.relative_to(REPO) if data.root.is_relative_to(REPO) else data.root),
        "train_images": int((data.manifest["split"] == "train").sum()),
        "val_images": int((data.manifest["split"] == "val").sum()),
        "classes": data.num_classes,
        "image_px": data.config.crop,
        "backbone": backbone,
        "stage_channels": params["model"]["stage_channels"],
        "batch_size": config.batch_size,
        "lr_backbone": config.lr_backbone,
        "lr_head": config.lr_head,
        "warmup_epochs": config.warmup_epochs,
        "grad_clip": config.grad_clip,
        "channels_last": config.channels_last,
        "precision": config.precision,
        "precision_resolved": precision,
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "epochs": {name: run[0]["epochs"] for name, run in runs.items()},
        "plain_epochs_matched": args.plain_epochs is None,
        "seeds": args.seeds,
        "evals_per_epoch": args.evals_per_epoch,
        "quick": args.quick,
        "load_average": {"start": load_start, "end": load_average(), "cores": os.cpu_count()},
    }
    labels = {
        "ours_split": "ours (jigsaw_views: split)",
        "ours_all": "ours (jigsaw_views: all)",
        "pmg": "PMG loop (PMG heads, 4 steps/batch)",
        "plain_resnet": f"plain {backbone} (GAP + linear)",
    }
    host = machine()
    title = (
        f"{backbone}, {data.config.crop} px, {precision}, {args.seeds} seeds: {device_name(device)}"
    )
    plot(summary, labels, common.RESULTS / f"{NAME}.png", title)
    served = {name: arm.served for name, arm in ARMS.items()}
    text = markdown(machine_line(host), settings, summary, targets, labels, served)
    data_out = {"machine": host, "settings": settings, "summary": summary, "targets": targets}
    write_results(NAME, text, finite({**data_out, "runs": runs}))


if __name__ == "__main__":
    main()
