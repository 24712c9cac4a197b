"""Classification metrics: top-k accuracy, per-class accuracy, confusion, calibration."""

from __future__ import annotations

import itertools

import torch


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return float((top == labels.unsqueeze(1)).any(dim=1).float().mean())


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """[classes, classes] counts; rows are true classes, columns predicted ones."""
    index = labels * classes + predicted
    return torch.bincount(index, minlength=classes * classes).reshape(classes, classes)


def per_class_accuracy(confusion: torch.Tensor) -> list[float]:
    totals = confusion.sum(dim=1).clamp_min(1)
    return (confusion.diag().float() / totals.float()).tolist()


def calibration(
    logits: torch.Tensor, labels: torch.Tensor, bins: int = 15
) -> tuple[float, list[dict]]:
    """Expected calibration error (equal-width confidence bins) and the reliability table."""
    probabilities = logits.softmax(dim=1)
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece, table = 0.0, []
    for low, high in itertools.pairwise(edges):
        inside = (confidence > low) & (confidence <= high)
        count = int(inside.sum())
        if count:
            accuracy = float(correct[inside].mean())
            mean_confidence = float(confidence[inside].mean())
            ece += count / len(labels) * abs(accuracy - mean_confidence)
        else:
            accuracy = mean_confidence = float("nan")
        table.append(
            {
                "low": float(low),
                "high": float(high),
                "count": count,
                "accuracy": accuracy,
                "confidence": mean_confidence,
            }
        )
    return ece, table
