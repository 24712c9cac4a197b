"""How well attention finds what matters, against ground-truth boxes.

- Pointing game: the map's peak (upsampled to the image) lies inside the box.
- Box accuracy: the box derived from the map (threshold, see iagn/models/attention.py)
  overlaps the ground-truth box with IoU >= 0.5.

The ground truth is the discriminative-part box where the dataset has one (the synthetic
data), otherwise the object box (CUB, Cars, Aircraft); images without any box are skipped.
Maps are computed for the true class, the standard protocol, so localization is judged
separately from classification.

Chance levels say what a map that knows nothing would score: for the pointing game, a
uniformly random peak lands in the box with probability box area / image area; for box
accuracy, the predicted box (its own width and height) placed uniformly at random in the
image. The lift above chance is what the map adds; the registry gates on it.
"""

from __future__ import annotations

import torch

from iagn.models.attention import box_iou, peak_points


def ground_truth_boxes(
    boxes: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """From dataset items' boxes [B, 2, 4] and validity [B, 2]: the part box where valid,
    else the object box; returns (boxes [B, 4], usable [B])."""
    use_part = valid[:, 1]
    chosen = torch.where(use_part.unsqueeze(1), boxes[:, 1], boxes[:, 0])
    return chosen, valid[:, 1] | valid[:, 0]


def pointing_hits(cam: torch.Tensor, truth: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    points = peak_points(cam, size)
    x, y = points[:, 0], points[:, 1]
    return (x >= truth[:, 0]) & (x <= truth[:, 2]) & (y >= truth[:, 1]) & (y <= truth[:, 3])


def box_hits(predicted: torch.Tensor, truth: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    return box_iou(predicted, truth) >= threshold


def pointing_chance(truth: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Per image, the chance a uniformly random point of the image lies in `truth`: [B]."""
    height, width = size
    limits = torch.tensor([width, height, width, height], dtype=truth.dtype)
    clipped = torch.minimum(truth.clamp_min(0), limits)
    area = (clipped[:, 2:] - clipped[:, :2]).clamp_min(0).prod(dim=1)
    return area / (height * width)


def box_chance(
    predicted: torch.Tensor,
    truth: torch.Tensor,
    size: tuple[int, int],
    generator: torch.Generator,
    samples: int = 64,
) -> torch.Tensor:
    """Per image, the fraction of `samples` uniformly random placements of the predicted
    box (same size) that overlap `truth` with IoU >= 0.5: [B]."""
    height, width = size
    wh = (predicted[:, 2:] - predicted[:, :2]).clamp(min=1.0)
    wh = torch.minimum(wh, torch.tensor([float(width), float(height)]))
    room = torch.tensor([float(width), float(height)]) - wh  # [B, 2]
    corner = torch.rand(len(predicted), samples, 2, generator=generator) * room[:, None]
    placed = torch.cat([corner, corner + wh[:, None]], dim=2)  # [B, samples, 4]
    ious = box_iou(placed.flatten(0, 1), truth.repeat_interleave(samples, dim=0).float())
    return (ious.view(len(predicted), samples) >= 0.5).float().mean(dim=1)
