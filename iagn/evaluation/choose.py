"""Choose a model's served prediction on the validation split (never the test split).

After training, for the settings in params.yaml `serve` (`ServeSettings`):
1. Box: every box method, threshold (and size, for centroid boxes) is scored on the true
   class's map against the ground-truth boxes (box accuracy, IoU >= 0.5; ties: mean IoU,
   then the earlier candidate); without boxes the default (threshold 0.5) stays.
2. Teacher prediction: fused, combined, weighted (one non-negative weight per head, fitted
   on the validation split's negative log-likelihood) and two-pass (the best one-pass
   prediction on the full image and on the attended crop, each crop weight) are scored by
   validation top-1, cheapest first: fused or combined (the better; a tie keeps fused),
   then weighted and two-pass only if they beat that by `min_gain` (a point or two of
   validation accuracy is a few images: noise, not a reason to pay for a second pass). The
   validation split both fits the weights and picks the winner, so its score is
   optimistic; the test split (`iagn evaluate`) gives the unbiased figure.
3. Temperature: fitted on the chosen prediction (iagn/evaluation/calibration.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from iagn.evaluation.calibration import calibrate
from iagn.evaluation.heads import logits_by_head, weighted_sum
from iagn.evaluation.localization import ground_truth_boxes
from iagn.evaluation.predictor import Predictor, default_serving
from iagn.evaluation.serving_config import ONE_PASS, ServeSettings, ServingConfig
from iagn.models.attention import box_iou, boxes_from_maps
from iagn.precision import autocast


@torch.no_grad()
def choose_serving(
    model: torch.nn.Module, loader, device: torch.device, settings: ServeSettings
) -> tuple[ServingConfig, dict[str, Any]]:
    """The serving configuration for `model` chosen on `loader` (the validation split) and
    the temperature fit's statistics (`calibrate`)."""
    base = replace(
        default_serving(model),
        precision=settings.precision,
        crop_threshold=settings.crop_threshold,
        crop_margin=settings.crop_margin,
    )
    predictor = Predictor(model, base, device)
    seen = _one_pass_outputs(predictor, loader)
    config, box_scores = _choose_box(base, seen, settings)
    labels = seen["label"]
    if predictor.is_teacher:
        config, scores, served = _choose_prediction(model, config, seen, loader, device, settings)
    else:
        served = seen["student"]
        scores = {"student": _accuracy(served, labels)}
    fitted = calibrate(served, labels, "val")
    chosen_on = {
        "split": "val",
        "images": len(labels),
        "top1_served": _accuracy(served, labels),
        "top1": scores,
        "box_accuracy": box_scores,
    }
    config = replace(config, temperature=fitted["temperature"], chosen_on=chosen_on)
    return config, fitted


def _one_pass_outputs(predictor: Predictor, loader) -> dict[str, Any]:
    """Every one-pass logit, the label, the true class's map and the ground-truth box."""
    seen: dict[str, list] = {}
    model, device = predictor.model, predictor.device
    for batch in loader:
        images, labels = batch["image"].to(device), batch["label"].to(device)
        with autocast(predictor.serving.precision, device):
            if predictor.is_teacher:
                output = model(images)
                logits = logits_by_head(output)
                parts = [*output.full_stage_logits, output.fused_logits]
                logits["parts"] = torch.stack([p.float() for p in parts], dim=1)
                cam = model.class_activation_map(output, labels)
            else:
                student, cam = model.forward_with_map(images, labels)
                logits = {"student": student}
        for key, value in logits.items():
            seen.setdefault(key, []).append(value.float().cpu())
        truth, usable = ground_truth_boxes(batch["boxes"], batch["box_valid"])
        seen.setdefault("label", []).append(batch["label"])
        seen.setdefault("map", []).append(cam.float().cpu())
        seen.setdefault("truth", []).append(truth)
        seen.setdefault("usable", []).append(usable)
        seen.setdefault("size", [tuple(images.shape[-2:])])
    return {key: value[0] if key == "size" else torch.cat(value) for key, value in seen.items()}


def _choose_box(base: ServingConfig, seen: dict, settings: ServeSettings):
    usable = seen["usable"]
    if not usable.any():
        return base, {}
    maps, truth = seen["map"][usable], seen["truth"][usable]
    scored = []
    for method in settings.box_methods:
        sizes = settings.box_sizes if method == "centroid" else (base.box_size,)
        for threshold in settings.box_thresholds:
            for box_size in sizes:
                boxes = boxes_from_maps(maps, seen["size"], threshold, method, box_size)
                iou = box_iou(boxes, truth)
                score = (float((iou >= 0.5).float().mean()), float(iou.mean()))
                name = f"{method}@{threshold}" + (f"x{box_size}" if method == "centroid" else "")
                box = {"box_method": method, "box_threshold": threshold, "box_size": box_size}
                scored.append((score, name, box))
    best = max(scored, key=lambda item: item[0])  # max keeps the first of equal scores
    config = replace(base, **best[2])
    return config, {name: score[0] for score, name, _ in scored}


def _choose_prediction(model, config, seen, loader, device, settings: ServeSettings):
    labels = seen["label"]
    candidates: list[tuple[str, ServingConfig]] = []
    for name in ONE_PASS:
        if name not in settings.aggregations:
            continue
        weights = fit_head_weights(seen["parts"], labels) if name == "weighted" else ()
        candidates.append((name, replace(config, aggregation=name, weights=weights)))
    only_two_pass = not candidates  # then it is served, on the combined prediction
    if only_two_pass:
        candidates.append(("combined", replace(config, aggregation="combined")))
    one_pass = [(name, c, _accuracy(_served_logits(c, seen), labels)) for name, c in candidates]
    best_name, best, best_score = one_pass[0]
    for name, candidate, score in one_pass[1:]:  # cheapest first
        if score >= best_score + _gain(name, best_name, settings):
            best_name, best, best_score = name, candidate, score
    scores = {name: score for name, _, score in one_pass if name in settings.aggregations}
    served = _served_logits(best, seen)
    if "two_pass" in settings.aggregations:
        full, crop = _crop_logits(model, best, loader, device)
        bar = -1.0 if only_two_pass else best_score + settings.min_gain
        for weight in settings.crop_weights:
            mixed = (1 - weight) * full + weight * crop
            score = scores[f"two_pass@{weight}"] = _accuracy(mixed, labels)
            if score >= bar and (best.aggregation != "two_pass" or score > best_score):
                best_score, served = score, mixed
                best = replace(best, aggregation="two_pass", base=best_name, crop_weight=weight)
    return best, scores, served


def _gain(name: str, current: str, settings: ServeSettings) -> float:
    """What `name` must add to `current`'s score to replace it: fused and combined cost the
    same (one pass, nothing fitted), so a strict improvement; weighted must earn its fit."""
    return settings.min_gain if name == "weighted" else 1e-9


def _crop_logits(model, config: ServingConfig, loader, device):
    """The one-pass prediction of `config` on the full images and on their attended crops."""
    predictor = Predictor(
        model, replace(config, aggregation="two_pass", base=config.aggregation), device
    )
    full, crop = [], []
    for batch in loader:
        logits = predictor(batch["image"]).logits
        full.append(logits[config.aggregation].cpu())
        crop.append(logits["crop"].cpu())
    return torch.cat(full), torch.cat(crop)


def _served_logits(config: ServingConfig, seen: dict) -> torch.Tensor:
    if config.aggregation == "weighted":
        return weighted_sum(list(seen["parts"].unbind(1)), config.weights)
    return seen[config.aggregation]


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


def fit_head_weights(parts: torch.Tensor, labels: torch.Tensor) -> tuple[float, ...]:
    """Non-negative weights w ([heads]) minimizing the NLL of sum_k w_k parts[:, k] on
    `labels`; parts: [N, heads, classes]. Starts from the plain average."""
    count = parts.shape[1]
    log_w = torch.full((count,), -float(torch.log(torch.tensor(float(count)))))
    log_w.requires_grad_(True)
    optimizer = torch.optim.LBFGS([log_w], lr=0.1, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        mixed = (parts * log_w.exp().view(1, count, 1)).sum(dim=1)
        loss = F.cross_entropy(mixed, labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return tuple(float(w) for w in log_w.detach().exp())
