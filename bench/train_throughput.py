"""Training throughput: our batched IAGN stage step vs the PMG research loop.

Both train the same architecture from scratch on the same data with the same batch size,
epochs, optimizer and schedule, in one run on one machine. Reported: training images/s
(wall time of the training epochs), and test accuracy of the combined prediction, for
  - ours at automatic precision (bf16 only where native, else fp32) and channels_last,
  - ours at fp32,
  - the reference loop (4 sequential forward/backward/step per batch, per-patch Python
    jigsaw, fp32, default memory format).
All on the same device (a CUDA GPU when there is one). `bench/step_throughput.py` times
single steps at the paper's scale (ResNet-50, 448 px) instead.

    python bench/train_throughput.py [--epochs 6] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

from bench.common import (
    demo_params,
    device_name,
    machine,
    machine_line,
    markdown_table,
    sgd,
    synthetic_dataset,
    write_results,
)
from bench.pmg_reference import reference_step
from iagn.checkpoint import load_checkpoint
from iagn.device import pick_device
from iagn.evaluation.heads import accuracy_on
from iagn.models.iagn import IAGN
from iagn.precision import resolve_precision
from iagn.steps import train_stage
from iagn.train.config import data_config, model_config
from iagn.train.data import prepare_data
from iagn.train.loop import seed_everything
from iagn.train.schedule import warmup_cosine


def run_ours(params: dict, data: Path, precision: str, epochs: int, out: Path) -> dict:
    params = copy.deepcopy(params)
    params["train"]["precision"] = precision
    params["stage3"] = {"epochs": epochs}
    started = time.perf_counter()
    result = train_stage.run(3, data, params, out, quiet=True)
    wall = time.perf_counter() - started
    history = result["history"]
    train_seconds = sum(h["epoch_seconds"] for h in history)
    images = sum(h["images_per_s"] * h["epoch_seconds"] for h in history)
    resolved = resolve_precision(precision, pick_device())
    print(
        f"ours ({precision} = {resolved}), {len(history)} epochs: "
        f"{images / train_seconds:.1f} images/s ({device_name(pick_device())})",
        flush=True,
    )
    prepared = prepare_data(data, data_config(params))
    model = IAGN(model_config(params, prepared.num_classes, prepared.class_names))
    model.load_state_dict(load_checkpoint(out)["model_state"])
    device = pick_device()
    test = accuracy_on(model.to(device), prepared.loader("test", False, 64), device, "fp32")
    return {
        "precision": history[-1].get("precision", precision),
        "images_per_s": images / train_seconds,
        "train_seconds": train_seconds,
        "wall_seconds": wall,
        "test_acc_combined": test["acc_combined"],
        "test_acc_fused": test["acc_fused"],
    }


def run_reference(params: dict, data: Path, epochs: int) -> dict:
    config = params["train"]
    prepared = prepare_data(data, data_config(params))
    seed_everything(config["seed"])
    device = pick_device()  # the device ours trains on
    model = IAGN(model_config(params, prepared.num_classes, prepared.class_names)).to(device)
    optimizer = sgd(model, config)
    steps = epochs * len(prepared.loader("train", True, config["batch_size"]))
    # The reference takes 4 optimizer steps per batch.
    scheduler = warmup_cosine(optimizer, 0, 4 * steps)
    train_seconds, seen = 0.0, 0
    for epoch in range(epochs):
        loader = prepared.loader("train", True, config["batch_size"], config["seed"], epoch)
        model.train()
        started = time.perf_counter()
        for batch in loader:
            reference_step(model, optimizer, batch["image"].to(device), batch["label"].to(device))
            for _ in range(4):
                scheduler.step()
            seen += batch["image"].shape[0]
        train_seconds += time.perf_counter() - started
        print(
            f"reference epoch {epoch + 1}/{epochs}: {seen / train_seconds:.1f} images/s "
            f"(fp32, {device_name(device)})",
            flush=True,
        )
    test = accuracy_on(model, prepared.loader("test", False, 64), device, "fp32")
    return {
        "precision": "fp32",
        "images_per_s": seen / train_seconds,
        "train_seconds": train_seconds,
        "test_acc_combined": test["acc_combined"],
        "test_acc_fused": test["acc_fused"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args()
    params = demo_params()
    if args.batch_size:
        params["train"]["batch_size"] = args.batch_size
    data = synthetic_dataset(params)
    auto = resolve_precision("auto", pick_device())
    with tempfile.TemporaryDirectory() as tmp:
        results = {"ours_auto": run_ours(params, data, "auto", args.epochs, Path(tmp) / "a.pt")}
        if auto != "fp32":
            results["ours_fp32"] = run_ours(params, data, "fp32", args.epochs, Path(tmp) / "b.pt")
        else:
            results["ours_fp32"] = results["ours_auto"]  # auto resolved to fp32 here
    results["reference_fp32"] = run_reference(params, data, args.epochs)
    results["ours_auto"]["precision"] = auto
    reference = results["reference_fp32"]["images_per_s"]
    for row in results.values():
        row["speedup_vs_reference"] = row["images_per_s"] / reference
    host = machine()
    settings = {
        "backbone": params["model"]["backbone"],
        "image_px": params["data"]["crop"],
        "batch_size": params["train"]["batch_size"],
        "epochs": args.epochs,
        "train_images": int(
            (prepare_data(data, data_config(params)).manifest["split"] == "train").sum()
        ),
        "jigsaw_views": params["train"]["jigsaw_views"],
        "attention_crop_fraction": params["train"]["attention_crop_fraction"],
    }
    rows = [
        [
            name,
            row["precision"],
            f"{row['images_per_s']:.1f}",
            f"{row['speedup_vs_reference']:.2f}x",
            f"{row['test_acc_combined']:.3f}",
            f"{row['test_acc_fused']:.3f}",
        ]
        for name, row in results.items()
    ]
    header = ["loop", "precision", "images/s", "speed-up"]
    header += ["test acc (combined)", "test acc (fused)"]
    lines = [
        "# Training throughput: IAGN stage step vs the PMG research loop",
        "",
        machine_line(host),
        f"Settings: {settings}. Same data, model, optimizer and schedule; one run.",
        "",
        *markdown_table(header, list("llrrrr"), rows),
        "",
    ]
    write_results(
        "train_throughput",
        "\n".join(lines) + "\n",
        {"machine": host, "settings": settings, "results": results},
    )


if __name__ == "__main__":
    main()
