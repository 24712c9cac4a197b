"""Deletion: does erasing what the map points at hurt the prediction more than chance?

For each image, the served prediction's class and probability are taken; then the top
fraction of pixels by attention (the map upsampled to the image) are erased (set to 0, the
normalized mean colour) and the same class's probability is measured again; likewise for
the same number of uniformly random pixels. A faithful map's attended erase hurts more.
"""

from __future__ import annotations

import torch

from iagn.evaluation.predictor import Prediction, Predictor
from iagn.models.attention import upsample_map

FRACTIONS = (0.1, 0.2, 0.5)


def served_probability(prediction: Prediction, classes: torch.Tensor) -> torch.Tensor:
    return prediction.logits["final"].softmax(1).gather(1, classes[:, None])[:, 0].cpu()


@torch.no_grad()
def deletion_drops(
    predictor: Predictor,
    images: torch.Tensor,
    prediction: Prediction,
    fractions: tuple[float, ...],
    generator: torch.Generator,
) -> dict[str, dict[str, torch.Tensor]]:
    """{fraction: {"attended": drops [B], "random": drops [B]}} for one batch, given the
    batch's served `prediction`."""
    classes = prediction.logits["final"].argmax(1)
    before = served_probability(prediction, classes)
    batch, _, height, width = images.shape
    attention = upsample_map(prediction.attention.float().cpu(), (height, width)).flatten(1)
    noise = torch.rand(batch, height * width, generator=generator)
    drops: dict[str, dict[str, torch.Tensor]] = {}
    for fraction in fractions:
        count = max(1, round(fraction * height * width))
        drops[f"{fraction:g}"] = {
            kind: before - served_probability(predictor(_erase(images, scores, count)), classes)
            for kind, scores in (("attended", attention), ("random", noise))
        }
    return drops


def _erase(images: torch.Tensor, scores: torch.Tensor, count: int) -> torch.Tensor:
    """`images` with the `count` highest-scoring pixels of each image set to 0."""
    keep = torch.ones_like(scores)
    keep.scatter_(1, scores.topk(count, dim=1).indices, 0.0)
    return images * keep.view(images.shape[0], 1, *images.shape[-2:]).to(images.dtype)
