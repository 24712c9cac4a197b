"""Logits of every head, and their accuracy: validation during training, and evaluation."""

from __future__ import annotations

import torch

from iagn.precision import autocast


@torch.no_grad()
def predict_logits(model: torch.nn.Module, loader, device: torch.device, precision: str) -> dict:
    """Per-sample logits of every head for a loader: {"fused", "head1".., "combined", "label"}.

    Works for the IAGN teacher (several heads) and the single-head student."""
    model.eval()
    outputs: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        images = batch["image"].to(device)
        with autocast(precision, device):
            result = model(images)
        for key, logits in logits_by_head(result).items():
            outputs.setdefault(key, []).append(logits.float().cpu())
        outputs.setdefault("label", []).append(batch["label"])
    return {key: torch.cat(values) for key, values in outputs.items()}


def logits_by_head(result, weights: tuple[float, ...] = ()) -> dict[str, torch.Tensor]:
    """Every one-pass prediction of a model output: the student's single head, or the
    teacher's stage heads, fused head, their average ("combined") and, given one weight per
    stage head then the fused head, their weighted sum ("weighted")."""
    if isinstance(result, torch.Tensor):  # student: one head
        return {"student": result}
    heads = {f"head{k + 1}": logits for k, logits in enumerate(result.full_stage_logits)}
    logits = {**heads, "fused": result.fused_logits, "combined": result.combined_logits()}
    if weights:
        parts = [*result.full_stage_logits, result.fused_logits]
        logits["weighted"] = weighted_sum(parts, weights)
    return logits


def weighted_sum(parts: list[torch.Tensor], weights: tuple[float, ...]) -> torch.Tensor:
    if len(parts) != len(weights):
        raise ValueError(f"{len(weights)} weights for {len(parts)} heads")
    return sum(float(w) * part.float() for w, part in zip(weights, parts, strict=True))


def accuracy_on(
    model: torch.nn.Module, loader, device: torch.device, precision: str, prefix: str = ""
) -> dict[str, float]:
    logits = predict_logits(model, loader, device, precision)
    labels = logits.pop("label")
    metrics = {
        f"{prefix}acc_{key}": float((value.argmax(1) == labels).float().mean())
        for key, value in logits.items()
    }
    main = "combined" if "combined" in logits else "student"
    metrics[f"{prefix}acc"] = metrics[f"{prefix}acc_{main}"]
    return metrics
