"""Predictions with explanations, the same for evaluation, `iagn predict`, and serving.

Teacher (IAGN): one pass gives the three stage heads, the fused head and their combined
prediction; the fused head's activation map gives the attention box; the two-pass
prediction averages the combined logits of the full image and of the attended crop
(the box grown by a fixed margin, resized to the input size).
Student: one pass, its own activation map and box.
"final", what is served, is that prediction divided by the checkpoint's fitted temperature
(iagn/evaluation/calibration.py): the same argmax, calibrated probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from iagn.evaluation.heads import logits_by_head
from iagn.models.attention import boxes_from_maps, crop_and_resize, expand_boxes
from iagn.models.iagn import IAGN
from iagn.precision import autocast

TEST_CROP_MARGIN = 0.1


@dataclass
class Prediction:
    """For a batch of B images of size H x W."""

    logits: dict[str, torch.Tensor]  # head name -> [B, classes]; "final" is what we serve
    attention: torch.Tensor  # [B, h, w] in [0, 1], for the predicted (or given) class
    boxes: torch.Tensor  # [B, 4] XYXY pixels of the input image


class Predictor:
    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        attention_threshold: float = 0.5,
        two_pass: bool = True,
        temperature: float = 1.0,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.precision = precision
        self.threshold = attention_threshold
        self.two_pass = two_pass
        self.temperature = temperature
        self.is_teacher = isinstance(model, IAGN)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, classes: torch.Tensor | None = None) -> Prediction:
        """`classes`: explain these classes instead of the predicted ones (e.g. the truth)."""
        images = images.to(self.device)
        size = tuple(images.shape[-2:])
        with autocast(self.precision, self.device):
            if not self.is_teacher:
                logits, cam = self.model.forward_with_map(
                    images, None if classes is None else classes.to(self.device)
                )
                logits = {"student": logits.float()}
                logits["final"] = logits["student"] / self.temperature
                return Prediction(logits, cam, boxes_from_maps(cam, size, self.threshold))
            output = self.model(images)
            logits = {k: v.float() for k, v in logits_by_head(output).items()}
            target = logits["combined"].argmax(1) if classes is None else classes.to(self.device)
            cam = self.model.class_activation_map(output, target)
            boxes = boxes_from_maps(cam, size, self.threshold)
            served = logits["combined"]
            if self.two_pass:
                crops = crop_and_resize(images, expand_boxes(boxes, size, TEST_CROP_MARGIN))
                second = self.model(crops).combined_logits().float()
                logits["two_pass"] = served = (logits["combined"] + second) / 2
            logits["final"] = served / self.temperature
        return Prediction(logits, cam, boxes)
