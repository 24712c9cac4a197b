"""How well attention finds what matters, against ground-truth boxes.

- Pointing game: the map's peak (upsampled to the image) lies inside the box.
- Box accuracy: the box derived from the map (threshold, see iagn/models/attention.py)
  overlaps the ground-truth box with IoU >= 0.5.

The ground truth is the discriminative-part box where the dataset has one (the synthetic
data), otherwise the object box (CUB, Cars, Aircraft); images without any box are skipped.
Maps are computed for the true class, the standard protocol, so localization is judged
separately from classification.
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
