"""Training steps per second at the paper's scale: our stage-3 step vs the PMG research loop.

`bench/time_to_accuracy.py` trains both loops for whole epochs on the demo data (64 px
ResNet-18) and compares accuracy against wall time; this one times single optimizer steps
on the recipe the speed target is about: `configs/cub.yaml` (ResNet-50, 448 px, batch 16,
stage blocks of 512 channels, 200 classes), on random images, without data loading. Weights start
random (no download); throughput does not depend on them. Loops, one after the other on the
same device:
  - ours at automatic precision (bf16 where native, else fp32) with the recipe's
    channels_last, and ours at fp32;
  - the reference loop with PMG's own heads (bench/pmg_reference.py: 4 sequential
    forward/backward/step per batch, per-patch Python jigsaw) at fp32.
Every loop runs in the recipe's memory format (channels_last) with its gradient clipping
and the training loop's optimizer; each reports the median and the min-max of its timed
steps.

    python -m bench.step_throughput                          # the recipe: 448 px, batch 16
    python -m bench.step_throughput --px 224 --batch-size 8  # a CPU-sized run

A CPU at 448 px takes minutes per reference step; the results file records the settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections.abc import Callable

import torch

from bench.common import (
    REPO,
    device_name,
    machine,
    machine_line,
    markdown_table,
    sgd,
    write_results,
)
from bench.pmg_reference import PMGNet, reference_step
from iagn.device import pick_device
from iagn.evaluation.speed import timed
from iagn.models.iagn import IAGN
from iagn.params import load_params
from iagn.precision import autocast, resolve_precision
from iagn.train.config import model_config, stage_config
from iagn.train.stage_step import stage_step

RECIPE = REPO / "configs" / "cub.yaml"
CLASSES = 200


def seconds_per_step(
    step: Callable[[], None], device: torch.device, warmup: int, steps: int
) -> list[float]:
    """Wall times of `steps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    return [timed(step, device) for _ in range(steps)]


def spread(times: list[float]) -> dict:
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def prepare(model: torch.nn.Module, device: torch.device, channels_last: bool):
    model = model.to(device)
    model.train()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def time_ours(params, images, labels, precision, device, warmup, steps) -> list[float]:
    """One optimizer step of the training loop (iagn/train/loop.py) around `stage_step`."""
    config = stage_config(params, 3)
    torch.manual_seed(0)
    names = [f"class_{k}" for k in range(CLASSES)]
    model = prepare(IAGN(model_config(params, CLASSES, names)), device, config.channels_last)
    optimizer = sgd(model, params["train"])
    if config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        with autocast(precision, device):
            loss, _ = stage_step(model, images, labels, config, model.config.jigsaw, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()

    return seconds_per_step(step, device, warmup, steps)


def time_reference(params, images, labels, device, warmup, steps) -> list[float]:
    """PMG's batch (PMG's heads, feature size = the recipe's stage channels) in the same
    memory format and with the same clipping as ours."""
    config = stage_config(params, 3)
    torch.manual_seed(0)
    model_params = params["model"]
    model = PMGNet(model_params["backbone"], CLASSES, model_params["stage_channels"])
    model = prepare(model, device, config.channels_last)
    optimizer = sgd(model, params["train"])
    if config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    jigsaw = tuple(model_params["jigsaw"])

    def step() -> None:
        reference_step(model, optimizer, images, labels, jigsaw, "fp32", config.grad_clip)

    return seconds_per_step(step, device, warmup, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--px", type=int, default=None, help="image size (recipe: 448)")
    parser.add_argument("--batch-size", type=int, default=None, help="(recipe: 16)")
    parser.add_argument("--backbone", default=None, help="(recipe: resnet50)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    args = parser.parse_args()

    params = load_params(RECIPE)
    params["model"]["weights"] = "none"
    if args.backbone:
        params["model"]["backbone"] = args.backbone
    px = args.px or params["data"]["crop"]
    batch = args.batch_size or params["train"]["batch_size"]
    device = pick_device()
    auto = resolve_precision("auto", device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, px, px, generator=generator).to(device)
    labels = torch.randint(0, CLASSES, (batch,), generator=generator).to(device)
    timing = {"warmup": args.warmup, "steps": args.steps}

    where = device_name(device)

    def report(name: str, precision: str, times: list[float]) -> dict:
        value = statistics.median(times)
        print(f"{name} ({precision}, {where}): {batch / value:.2f} images/s", flush=True)
        return spread(times)

    times = time_ours(params, images, labels, auto, device, **timing)
    seconds = {"ours_auto": report("ours auto", auto, times)}
    if auto != "fp32":
        times = time_ours(params, images, labels, "fp32", device, **timing)
        seconds["ours_fp32"] = report("ours", "fp32", times)
    else:
        seconds["ours_fp32"] = seconds["ours_auto"]  # auto resolved to fp32 here
    times = time_reference(params, images, labels, device, **timing)
    seconds["reference_fp32"] = report("reference", "fp32", times)
    precisions = {"ours_auto": auto, "ours_fp32": "fp32", "reference_fp32": "fp32"}
    reference = seconds["reference_fp32"]["median"]
    results = {
        name: {
            "precision": precisions[name],
            "seconds_per_step": value["median"],
            "seconds_per_step_min": value["min"],
            "seconds_per_step_max": value["max"],
            "images_per_s": batch / value["median"],
            "speedup_vs_reference": reference / value["median"],
        }
        for name, value in seconds.items()
    }

    host = machine()
    config = dataclasses.asdict(stage_config(params, 3))
    settings = {
        "recipe": str(RECIPE.relative_to(REPO)),
        "backbone": params["model"]["backbone"],
        "stage_channels": params["model"]["stage_channels"],
        "image_px": px,
        "batch_size": batch,
        "classes": CLASSES,
        "device": str(device),
        "jigsaw_views": config["jigsaw_views"],
        "attention_crop_fraction": config["attention_crop_fraction"],
        "channels_last": config["channels_last"],
        **timing,
    }
    rows = [
        [
            name,
            row["precision"],
            f"{row['seconds_per_step']:.3f}",
            f"{row['seconds_per_step_min']:.3f}-{row['seconds_per_step_max']:.3f}",
            f"{row['images_per_s']:.2f}",
            f"{row['speedup_vs_reference']:.2f}x",
        ]
        for name, row in results.items()
    ]
    lines = [
        "# Training step throughput at the paper's scale: IAGN stage 3 vs the PMG loop",
        "",
        machine_line(host),
        f"Settings: {settings}. Random images, no data loading; every loop in the same "
        "memory format; s/step: median [min-max] of the timed steps, images/s and speed-up "
        "from the medians.",
        "",
        *markdown_table(
            ["loop", "precision", "s/step", "min-max", "images/s", "speed-up"],
            list("llrrrr"),
            rows,
        ),
        "",
    ]
    write_results(
        "step_throughput",
        "\n".join(lines) + "\n",
        {"machine": host, "settings": settings, "results": results},
    )


if __name__ == "__main__":
    main()
