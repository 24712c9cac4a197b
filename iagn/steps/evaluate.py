"""Step `evaluate`: everything people need to judge a teacher or student checkpoint.

On the test split: top-1/top-5 of every head (teacher: three stage heads, fused, combined,
two-pass; student: its single head), per-class accuracy, confusion matrix, expected
calibration error with a reliability diagram (of the served, temperature-scaled prediction;
`ece_uncalibrated` without the scaling), localization of the attention against the
ground-truth boxes (pointing game and box accuracy), an attention gallery of a fixed sample
of test images, latency and throughput on the current device, parameter count and size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from iagn.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from iagn.device import device_name, pick_device
from iagn.evaluation.calibration import checkpoint_temperature
from iagn.evaluation.localization import box_hits, ground_truth_boxes, pointing_hits
from iagn.evaluation.metrics import calibration, confusion_matrix, per_class_accuracy, topk_accuracy
from iagn.evaluation.plots import attention_gallery, confusion_plot, reliability_plot
from iagn.evaluation.predictor import Predictor
from iagn.evaluation.speed import file_size_mb, measure_speed, parameter_count
from iagn.io import write_json_atomic
from iagn.models.load import load_model
from iagn.precision import resolve_precision
from iagn.train.data import prepare_step_data

METRICS_FILE = "metrics.json"


def evaluate_section(params: dict) -> dict[str, Any]:
    defaults = {
        "batch_size": 32,
        "attention_threshold": 0.5,
        "gallery_size": 8,
        "precision": "auto",
        "speed_repeats": 10,
        "split": "test",
    }
    return {**defaults, **params.get("evaluate", {})}


def run(
    model_path: str | Path,
    data: str | Path | None,
    params: dict,
    out: str | Path,
    device: str = "auto",
    quiet: bool = False,
) -> dict[str, Any]:
    """Evaluate the checkpoint at `model_path`; writes metrics.json and PNGs to `out`."""
    settings = evaluate_section(params)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, checkpoint = load_model(model_path)
    prepared = prepare_step_data(data, params)
    torch_device = pick_device(device)
    precision = resolve_precision(settings["precision"], torch_device)
    temperature = checkpoint_temperature(checkpoint)
    predictor = Predictor(
        model, torch_device, precision, settings["attention_threshold"], temperature=temperature
    )
    loader = prepared.loader(settings["split"], train=False, batch_size=settings["batch_size"])

    logits: dict[str, list] = {}
    labels, points, boxes_ok, usable = [], [], [], []
    gallery: dict[str, list] = {"images": [], "maps": [], "pred": [], "true": [], "titles": []}
    for batch in loader:
        images, batch_labels = batch["image"], batch["label"]
        predicted = predictor(images)
        for key, value in predicted.logits.items():
            logits.setdefault(key, []).append(value.cpu())
        # Localization is judged on the true class's map (the standard protocol).
        explained = (
            predictor(images, classes=batch_labels)
            if _needs_true_map(predicted, batch_labels)
            else predicted
        )
        truth, has_box = ground_truth_boxes(batch["boxes"], batch["box_valid"])
        size = tuple(images.shape[-2:])
        points.append(pointing_hits(explained.attention.cpu(), truth, size))
        boxes_ok.append(box_hits(explained.boxes.cpu(), truth))
        usable.append(has_box)
        labels.append(batch_labels)
        missing = settings["gallery_size"] - len(gallery["images"])
        for i in range(min(missing, len(images))):
            final = predicted.logits["final"][i].softmax(0)
            guess = int(final.argmax())
            name = prepared.class_names[guess]
            gallery["images"].append(images[i])
            gallery["maps"].append(predicted.attention[i].cpu())
            gallery["pred"].append(predicted.boxes[i].cpu())
            gallery["true"].append(truth[i])
            truth_name = prepared.class_names[int(batch_labels[i])]
            gallery["titles"].append(f"{name} ({float(final[guess]):.2f}); true {truth_name}")

    labels_t = torch.cat(labels)
    merged = {key: torch.cat(values) for key, values in logits.items()}
    metrics: dict[str, Any] = {"kind": checkpoint["kind"], "split": settings["split"]}
    metrics["images"] = len(labels_t)
    for key, value in merged.items():
        metrics[f"top1_{key}"] = topk_accuracy(value, labels_t, 1)
        metrics[f"top5_{key}"] = topk_accuracy(value, labels_t, 5)
    final = merged["final"]
    metrics["top1"] = metrics["top1_final"]
    metrics["top5"] = metrics["top5_final"]
    confusion = confusion_matrix(final.argmax(1), labels_t, prepared.num_classes)
    metrics["per_class_accuracy"] = dict(
        zip(prepared.class_names, per_class_accuracy(confusion), strict=True)
    )
    ece, table = calibration(final, labels_t)
    metrics["ece"] = ece
    metrics["temperature"] = temperature
    metrics["ece_uncalibrated"] = calibration(final * temperature, labels_t)[0]
    usable_t = torch.cat(usable)
    if usable_t.any():
        metrics["pointing_game"] = float(torch.cat(points)[usable_t].float().mean())
        metrics["box_accuracy"] = float(torch.cat(boxes_ok)[usable_t].float().mean())
    crop = prepared.config.crop
    speed = measure_speed(
        lambda x: predictor(x), (3, crop, crop), torch_device, repeats=settings["speed_repeats"]
    )
    metrics.update(speed)
    metrics["parameters"] = parameter_count(model)
    metrics["checkpoint_mb"] = file_size_mb(model_path)
    metrics["device"] = device_name(torch_device)
    metrics["precision"] = precision
    metrics["data_digest"] = checkpoint["data"]["digest"]  # the training data: which model
    metrics["eval_data_digest"] = prepared.split_digest(settings["split"])  # what it was tested on

    confusion_plot(confusion, prepared.class_names, out / "confusion_matrix.png")
    reliability_plot(table, ece, out / "reliability.png")
    if gallery["images"]:
        attention_gallery(
            torch.stack(gallery["images"]),
            torch.stack(gallery["maps"]),
            torch.stack(gallery["pred"]),
            torch.stack(gallery["true"]),
            gallery["titles"],
            IMAGENET_MEAN,
            IMAGENET_STD,
            out / "attention_gallery.png",
        )
    write_json_atomic(out / "reliability.json", table)
    write_json_atomic(out / METRICS_FILE, metrics)  # last: its presence means complete
    return metrics


def _needs_true_map(predicted, labels: torch.Tensor) -> bool:
    """A second pass only when some explained class is wrong (the maps explain the combined
    prediction for the teacher, the only head for the student)."""
    explained = predicted.logits.get("combined", predicted.logits["final"])
    return bool((explained.argmax(1).cpu() != labels).any())
