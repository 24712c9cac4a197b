"""Plots people look at: confusion matrix, reliability diagram, attention gallery, curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import torch

from iagn.io import atomic_path


def _save(figure, out: Path) -> Path:
    out = Path(out)
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return out


def confusion_plot(confusion: torch.Tensor, class_names: list[str], out: Path) -> Path:
    classes = len(class_names)
    size = min(16, 3 + classes * 0.35)
    figure, axes = plt.subplots(figsize=(size, size))
    normalized = confusion.float() / confusion.sum(dim=1, keepdim=True).clamp_min(1)
    image = axes.imshow(normalized.numpy(), cmap="Blues", vmin=0, vmax=1)
    if classes <= 40:
        axes.set_xticks(range(classes), class_names, rotation=90, fontsize=7)
        axes.set_yticks(range(classes), class_names, fontsize=7)
        if classes <= 20:
            for i in range(classes):
                for j in range(classes):
                    if confusion[i, j]:
                        axes.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=6)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title("Confusion matrix (rows normalized)")
    figure.colorbar(image, ax=axes, fraction=0.046)
    return _save(figure, out)


def reliability_plot(table: list[dict], ece: float, out: Path) -> Path:
    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    centers = [(row["low"] + row["high"]) / 2 for row in table]
    accuracy = [row["accuracy"] if row["count"] else 0.0 for row in table]
    width = table[0]["high"] - table[0]["low"]
    axes.bar(centers, accuracy, width=width * 0.95, color="tab:blue", label="accuracy")
    axes.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    axes.set_xlabel("confidence")
    axes.set_ylabel("accuracy")
    axes.set_title(f"Reliability (ECE {ece:.3f})")
    axes.legend(loc="upper left")
    return _save(figure, out)


def denormalize(image: torch.Tensor, mean, std) -> np.ndarray:
    """[3, H, W] normalized tensor -> [H, W, 3] floats in [0, 1]."""
    pixels = image.float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(
        3, 1, 1
    )
    return pixels.clamp(0, 1).permute(1, 2, 0).numpy()


def upsampled(attention: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """An [h, w] map bilinearly resized to the image's (height, width), for an overlay."""
    return torch.nn.functional.interpolate(
        attention[None, None].float().cpu(), size=tuple(size), mode="bilinear", align_corners=False
    )[0, 0].numpy()


def _draw_box(axes, box, color: str, label: str | None = None) -> None:
    x0, y0, x1, y1 = (float(v) for v in box)
    axes.add_patch(
        plt.Rectangle(
            (x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.5, label=label
        )
    )


def attention_gallery(
    images: torch.Tensor,
    maps: torch.Tensor,
    predicted_boxes: torch.Tensor,
    true_boxes: torch.Tensor,
    titles: list[str],
    mean,
    std,
    out: Path,
) -> Path:
    """One row per image: the image with true (green) and predicted (red) boxes, the map."""
    count = images.shape[0]
    figure, axes = plt.subplots(count, 2, figsize=(5, 2.4 * count), squeeze=False)
    for row in range(count):
        pixels = denormalize(images[row], mean, std)
        heat = upsampled(maps[row], pixels.shape[:2])
        left, right = axes[row]
        left.imshow(pixels)
        _draw_box(left, true_boxes[row], "lime", "true part" if row == 0 else None)
        _draw_box(left, predicted_boxes[row], "red", "attention box" if row == 0 else None)
        left.set_title(titles[row], fontsize=7)
        right.imshow(pixels)
        right.imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1)
        right.set_title("attention", fontsize=7)
        for axis in (left, right):
            axis.axis("off")
    if count:
        axes[0][0].legend(loc="lower left", fontsize=6)
    figure.tight_layout()
    return _save(figure, out)


def confused_pairs_plot(rows: list[dict], mean, std, out: Path) -> Path:
    """One row per example image of a confused pair: the image with its true part box
    (where known), the attention map for its true class and the map for the class it is
    confused with, each with that class's probability and box.

    A row: {"image": [3, H, W], "part": [4] or None, "pair": "A / B", "classes": (own,
    other) names, "probabilities": (p own, p other), "maps": (own, other) [h, w],
    "boxes": (own, other) [4]}."""
    if not rows:  # the file is a pipeline output: it exists, and says why it is empty
        figure, axes = plt.subplots(figsize=(5, 1))
        axes.text(0.5, 0.5, "No errors between classes on this split", ha="center", va="center")
        axes.axis("off")
        return _save(figure, out)
    count = len(rows)
    figure, axes = plt.subplots(count, 3, figsize=(6.6, 2.3 * count), squeeze=False)
    for row, example in zip(axes, rows, strict=True):
        pixels = denormalize(example["image"], mean, std)
        row[0].imshow(pixels)
        if example["part"] is not None:
            _draw_box(row[0], example["part"], "lime")
        row[0].set_title(f"{example['pair']}\ntrue: {example['classes'][0]}", fontsize=7)
        for axis, name, probability, attention, box in zip(
            row[1:],
            example["classes"],
            example["probabilities"],
            example["maps"],
            example["boxes"],
            strict=True,
        ):
            axis.imshow(pixels)
            axis.imshow(
                upsampled(attention, pixels.shape[:2]), cmap="jet", alpha=0.5, vmin=0, vmax=1
            )
            _draw_box(axis, box, "white")
            axis.set_title(f"map for {name}\np = {probability:.2f}", fontsize=7)
        for axis in row:
            axis.axis("off")
    figure.tight_layout()
    return _save(figure, out)


def overlay(image: np.ndarray, heat: np.ndarray, box, title: str, out: Path) -> Path:
    """A single explanation: image, heatmap overlay, box, title."""
    figure, axes = plt.subplots(figsize=(5, 5 * image.shape[0] / image.shape[1]))
    axes.imshow(image)
    axes.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    _draw_box(axes, box, "white")
    axes.set_title(title, fontsize=9)
    axes.axis("off")
    return _save(figure, out)


def training_curves(history: list[dict], out: Path, title: str) -> Path:
    epochs = [row["epoch"] for row in history]
    figure, (loss_axes, acc_axes) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key in sorted({k for row in history for k in row if k.startswith("loss")}):
        loss_axes.plot(epochs, [row.get(key, np.nan) for row in history], marker="o", label=key)
    loss_axes.set_xlabel("epoch")
    loss_axes.set_title("training loss")
    loss_axes.legend(fontsize=7)
    for key in sorted({k for row in history for k in row if k.startswith("val_acc_")}):
        acc_axes.plot(epochs, [row.get(key, np.nan) for row in history], marker="o", label=key)
    acc_axes.set_xlabel("epoch")
    acc_axes.set_title("validation accuracy")
    acc_axes.legend(fontsize=7)
    figure.suptitle(title)
    return _save(figure, out)


def localization_plot(ious: torch.Tensor, deletion: dict[str, dict[str, float]], out: Path):
    """Left: the distribution of attention-box IoU with the ground truth; right: the served
    class probability's drop when the most attended vs random pixels are erased."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.hist(ious.numpy(), bins=20, range=(0, 1), color="tab:blue")
    left.axvline(0.5, linestyle="--", color="gray", label="IoU 0.5 (a hit)")
    left.set_xlabel("IoU of the attention box with the true box")
    left.set_ylabel("images")
    left.set_title("Attention boxes")
    left.legend()
    if deletion:
        fractions = sorted(float(key) for key in deletion)
        for kind, color in (("attended", "tab:red"), ("random", "tab:gray")):
            drops = [deletion[f"{f:g}"][kind] for f in fractions]
            right.plot([100 * f for f in fractions], drops, "o-", color=color, label=kind)
        right.set_xlabel("pixels erased (%)")
        right.set_ylabel("drop of the served class probability")
        right.set_title("Deletion: attended vs random pixels")
        right.legend()
    else:
        right.set_axis_off()
    return _save(figure, out)


def sweep_plot(
    keys: list[str],
    rows: list[tuple[str, dict, float]],
    best: str,
    out: Path,
    metric: str = "val top-1",
) -> Path:
    """A sweep: `metric` against each swept key, one panel per key, the best trial marked.

    `rows` are (trial, overrides, value). Numbers on a numeric axis (logarithmic where the
    values span 20x or more), anything else (lists, strings) as categories.
    """
    panels = max(1, len(keys))
    figure, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.4), squeeze=False)
    for axis, key in zip(axes[0], keys, strict=False):
        values = [overrides.get(key) for _, overrides, _ in rows]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if numeric:
            xs = [float(v) for v in values]
            if min(xs) > 0 and max(xs) >= 20 * min(xs):
                axis.set_xscale("log")
        else:
            labels = list(dict.fromkeys(str(v) for v in values))
            xs = [float(labels.index(str(v))) for v in values]
            axis.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
        ys = [value for _, _, value in rows]
        axis.scatter(xs, ys, color="tab:blue", zorder=2)
        for (trial, _, value), x in zip(rows, xs, strict=True):
            axis.annotate(trial, (x, value), fontsize=7, xytext=(3, 3), textcoords="offset points")
            if trial == best:
                axis.scatter([x], [value], s=160, facecolors="none", edgecolors="tab:red", zorder=3)
        axis.set_xlabel(key)
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    figure.suptitle(f"{metric} per trial (circled: best, {best})", fontsize=9)
    figure.tight_layout()
    return _save(figure, out)
