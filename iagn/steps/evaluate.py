"""Step `evaluate`: everything people need to judge a teacher or student checkpoint.

Everything describes the served prediction first, exactly as the checkpoint's serving
configuration defines it (aggregation, box, crop, precision, temperature:
iagn/evaluation/serving_config.py): `top1`, `top5`, per-class accuracy, the confusion
matrix, expected calibration error with a reliability diagram (`ece_uncalibrated` without
the temperature), latency and throughput. Every other prediction of a teacher (each stage
head, fused, combined, weighted, the attended crop alone, two-pass) is reported beside it as
`top1_<name>`, a diagnostic. On the chosen split (test by default):
- localization of the attention against the ground-truth boxes (pointing game, box
  accuracy, the IoU distribution) with the chance level of each and the lift above it;
- deletion: the served class probability's drop when the most attended or random pixels
  are erased (iagn/evaluation/deletion.py);
- an attention gallery of a fixed sample of images, parameter count and size;
- the most confused class pairs (iagn/evaluation/confused.py), with a panel of where the
  model looks for each class of a pair on the images it confuses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from iagn.data.dataset import IMAGENET_MEAN, IMAGENET_STD
from iagn.device import device_name, pick_device
from iagn.evaluation.confused import ConfusedPair, confused_pairs, pick_examples
from iagn.evaluation.deletion import FRACTIONS, deletion_drops
from iagn.evaluation.localization import (
    box_chance,
    ground_truth_boxes,
    pointing_chance,
    pointing_hits,
)
from iagn.evaluation.metrics import calibration, confusion_matrix, per_class_accuracy, topk_accuracy
from iagn.evaluation.plots import (
    attention_gallery,
    confused_pairs_plot,
    confusion_plot,
    localization_plot,
    reliability_plot,
)
from iagn.evaluation.predictor import Predictor
from iagn.evaluation.serving_config import serving_config_of
from iagn.evaluation.speed import file_size_mb, measure_speed, parameter_count
from iagn.io import write_json_atomic
from iagn.models.attention import box_iou
from iagn.models.load import load_model
from iagn.train.data import prepare_step_data

METRICS_FILE = "metrics.json"
IOU_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def evaluate_section(params: dict) -> dict[str, Any]:
    defaults = {
        "batch_size": 32,
        "gallery_size": 8,
        "speed_repeats": 10,
        "split": "test",
        "deletion_fractions": list(FRACTIONS),
        "seed": 0,
        "confused_pairs": 3,
        "confused_examples": 2,
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
    serving = serving_config_of(checkpoint)
    predictor = Predictor(model, serving, torch_device, diagnostics=True)
    served_only = Predictor(model, serving, torch_device)  # no diagnostics: what is served
    loader = prepared.loader(settings["split"], train=False, batch_size=settings["batch_size"])
    fractions = tuple(float(f) for f in settings["deletion_fractions"])
    generator = torch.Generator().manual_seed(int(settings["seed"]))

    logits: dict[str, list] = {}
    seen: dict[str, list] = {}
    gallery: dict[str, list] = {"images": [], "maps": [], "pred": [], "true": [], "titles": []}
    for batch in loader:
        images, batch_labels = batch["image"], batch["label"]
        predicted = predictor(images)
        for key, value in predicted.logits.items():
            logits.setdefault(key, []).append(value.cpu())
        seen.setdefault("label", []).append(batch_labels)
        # Localization is judged on the true class's map (the standard protocol).
        maps, boxes = predictor.explain(images, batch_labels)
        truth, has_box = ground_truth_boxes(batch["boxes"], batch["box_valid"])
        size = tuple(images.shape[-2:])
        boxes = boxes.cpu()
        seen.setdefault("pointing", []).append(pointing_hits(maps.cpu(), truth, size))
        seen.setdefault("iou", []).append(box_iou(boxes, truth))
        seen.setdefault("pointing_chance", []).append(pointing_chance(truth, size))
        seen.setdefault("box_chance", []).append(box_chance(boxes, truth, size, generator))
        seen.setdefault("usable", []).append(has_box)
        for fraction, drops in deletion_drops(
            served_only, images, predicted, fractions, generator
        ).items():
            for kind, values in drops.items():
                seen.setdefault(f"deletion {fraction} {kind}", []).append(values)
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

    seen_t = {key: torch.cat(values) for key, values in seen.items()}
    labels_t = seen_t["label"]
    merged = {key: torch.cat(values) for key, values in logits.items()}
    metrics: dict[str, Any] = {"kind": checkpoint["kind"], "split": settings["split"]}
    metrics["images"] = len(labels_t)
    metrics["served"] = serving.aggregation
    metrics["serving"] = serving.to_dict()
    final = merged["final"]
    metrics["top1"] = topk_accuracy(final, labels_t, 1)
    metrics["top5"] = topk_accuracy(final, labels_t, 5)
    for key, value in merged.items():
        metrics[f"top1_{key}"] = topk_accuracy(value, labels_t, 1)
        metrics[f"top5_{key}"] = topk_accuracy(value, labels_t, 5)
    confusion = confusion_matrix(final.argmax(1), labels_t, prepared.num_classes)
    metrics["per_class_accuracy"] = dict(
        zip(prepared.class_names, per_class_accuracy(confusion), strict=True)
    )
    pairs = confused_pairs(confusion, int(settings["confused_pairs"]))
    metrics["confused_pairs"] = [pair.to_dict(prepared.class_names) for pair in pairs]
    ece, table = calibration(final, labels_t)
    metrics["ece"] = ece
    metrics["temperature"] = serving.temperature
    metrics["ece_uncalibrated"] = calibration(merged["served"], labels_t)[0]
    usable = seen_t["usable"]
    ious = seen_t["iou"][usable]
    if usable.any():
        metrics.update(_localization(seen_t, usable))
        quantiles = torch.quantile(ious, torch.tensor(IOU_QUANTILES))
        metrics["box_iou_mean"] = float(ious.mean())
        for q, value in zip(IOU_QUANTILES, quantiles.tolist(), strict=True):
            metrics[f"box_iou_p{round(q * 100)}"] = value
    deletion = {
        f"{f:g}": {
            kind: float(seen_t[f"deletion {f:g} {kind}"].mean()) for kind in ("attended", "random")
        }
        for f in fractions
    }
    for fraction, drops in deletion.items():
        percent = round(float(fraction) * 100)
        metrics[f"deletion_attended_{percent}"] = drops["attended"]
        metrics[f"deletion_random_{percent}"] = drops["random"]
    crop = prepared.config.crop
    speed = measure_speed(
        served_only,
        (3, crop, crop),
        torch_device,
        repeats=settings["speed_repeats"],
    )
    metrics.update(speed)
    metrics["parameters"] = parameter_count(model)
    metrics["checkpoint_mb"] = file_size_mb(model_path)
    metrics["device"] = device_name(torch_device)
    metrics["precision"] = serving.precision
    metrics["data_digest"] = checkpoint["data"]["digest"]  # the training data: which model
    metrics["eval_data_digest"] = prepared.split_digest(settings["split"])  # what it was tested on

    confusion_plot(confusion, prepared.class_names, out / "confusion_matrix.png")
    reliability_plot(table, ece, out / "reliability.png")
    localization_plot(ious, deletion, out / "localization.png")
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
    examples = _confused_examples(
        predictor, loader.dataset, pairs, final, labels_t, settings, prepared.class_names
    )
    confused_pairs_plot(examples, IMAGENET_MEAN, IMAGENET_STD, out / "confused_pairs.png")
    write_json_atomic(out / "reliability.json", table)
    write_json_atomic(out / METRICS_FILE, metrics)  # last: its presence means complete
    return metrics


def _confused_examples(
    predictor: Predictor,
    dataset,
    pairs: list[ConfusedPair],
    logits: torch.Tensor,
    labels: torch.Tensor,
    settings: dict,
    class_names: list[str],
) -> list[dict]:
    """The panel rows of `confused_pairs_plot`: each picked image explained twice, for its
    own class and for the class it is confused with."""
    probabilities = logits.softmax(1)
    rows = []
    for pair in pairs:
        picks = pick_examples(labels, logits.argmax(1), pair, int(settings["confused_examples"]))
        items = [dataset[index] for index, _ in picks]
        images = torch.stack([item["image"] for item in items])
        own = torch.tensor([int(item["label"]) for item in items])
        other = torch.tensor([confusing for _, confusing in picks])
        own_maps, own_boxes = predictor.explain(images, own)
        other_maps, other_boxes = predictor.explain(images, other)
        parts, has_part = ground_truth_boxes(
            torch.stack([item["boxes"] for item in items]),
            torch.stack([item["box_valid"] for item in items]),
        )
        title = f"{class_names[pair.first]} / {class_names[pair.second]}: {pair.errors} errors"
        for k, (index, confusing) in enumerate(picks):
            mine = int(own[k])
            rows.append(
                {
                    "image": images[k],
                    "part": parts[k] if has_part[k] else None,
                    "pair": title,
                    "classes": (class_names[mine], class_names[confusing]),
                    "probabilities": (
                        float(probabilities[index, mine]),
                        float(probabilities[index, confusing]),
                    ),
                    "maps": (own_maps[k].cpu(), other_maps[k].cpu()),
                    "boxes": (own_boxes[k].cpu(), other_boxes[k].cpu()),
                }
            )
    return rows


def _localization(seen: dict[str, torch.Tensor], usable: torch.Tensor) -> dict[str, float]:
    pointing = float(seen["pointing"][usable].float().mean())
    pointing_base = float(seen["pointing_chance"][usable].mean())
    boxes = float((seen["iou"][usable] >= 0.5).float().mean())
    boxes_base = float(seen["box_chance"][usable].mean())
    return {
        "pointing_game": pointing,
        "pointing_game_chance": pointing_base,
        "pointing_game_lift": pointing - pointing_base,
        "box_accuracy": boxes,
        "box_accuracy_chance": boxes_base,
        "box_accuracy_lift": boxes - boxes_base,
    }
