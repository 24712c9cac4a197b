"""Predictions with explanations, the same for evaluation, `iagn predict`, serving and
distillation: everything that defines them comes from the checkpoint's `ServingConfig`.

Teacher (IAGN): one pass gives the stage heads, the fused head and their one-pass
aggregations (iagn/evaluation/heads.py); the fused head's attribution map, for the class the
one-pass prediction picks, gives the attention and its box; `two_pass` adds the one-pass
prediction on the attended crop (the box above `crop_threshold` grown by `crop_margin`,
resized to the input size: drawn like training's attention crops, independent of the box
shown) with weight `crop_weight`. Student: one pass, its own map and box.
"served" is the prediction the configuration names; "final", what people get, is "served"
divided by the fitted temperature: the same argmax, calibrated probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from iagn.evaluation.heads import logits_by_head
from iagn.evaluation.serving_config import ServingConfig
from iagn.models.attention import boxes_from_maps, crop_and_resize, expand_boxes
from iagn.models.iagn import IAGN
from iagn.precision import autocast


@dataclass
class Prediction:
    """For a batch of B images of size H x W."""

    logits: dict[str, torch.Tensor]  # name -> [B, classes]; "final" is what we serve
    attention: torch.Tensor  # [B, h, w] in [0, 1], for the predicted (or given) class
    boxes: torch.Tensor  # [B, 4] XYXY pixels of the input image


def default_serving(model: torch.nn.Module) -> ServingConfig:
    return ServingConfig() if isinstance(model, IAGN) else ServingConfig(aggregation="student")


class Predictor:
    """`diagnostics`: also compute the predictions that are not served (a teacher's
    two-pass when it serves one pass), for evaluation's comparison."""

    def __init__(
        self,
        model: torch.nn.Module,
        serving: ServingConfig | None = None,
        device: torch.device | str = "cpu",
        diagnostics: bool = False,
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.serving = serving or default_serving(model)
        self.diagnostics = diagnostics
        self.is_teacher = isinstance(model, IAGN)
        if self.is_teacher == (self.serving.aggregation == "student"):
            raise ValueError(f"aggregation {self.serving.aggregation!r} does not fit this model")

    def _boxes(self, cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        serving = self.serving
        return boxes_from_maps(
            cam, size, serving.box_threshold, serving.box_method, serving.box_size
        )

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> Prediction:
        images = images.to(self.device)
        size = tuple(images.shape[-2:])
        serving = self.serving
        with autocast(serving.precision, self.device):
            if not self.is_teacher:
                logits, cam = self.model.forward_with_map(images)
                logits = {"student": logits.float(), "served": logits.float()}
            else:
                output = self.model(images)
                logits = {k: v.float() for k, v in logits_by_head(output, serving.weights).items()}
                one = logits[serving.one_pass]
                cam = self.model.class_activation_map(output, one.argmax(1))
                if serving.aggregation == "two_pass" or self.diagnostics:
                    crops = self.attended_crops(images, cam)
                    crop = logits_by_head(self.model(crops), serving.weights)[serving.one_pass]
                    logits["crop"] = crop.float()
                    w = serving.crop_weight
                    logits["two_pass"] = (1 - w) * one + w * logits["crop"]
                logits["served"] = logits[serving.aggregation]
        logits["final"] = logits["served"] / serving.temperature
        return Prediction(logits, cam, self._boxes(cam, size))

    def attended_crops(self, images: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
        """The crops two-pass classifies: drawn like training's attention crops."""
        size = tuple(images.shape[-2:])
        boxes = boxes_from_maps(cam, size, self.serving.crop_threshold)
        return crop_and_resize(images, expand_boxes(boxes, size, self.serving.crop_margin))

    @torch.no_grad()
    def explain(self, images: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The attention map [B, h, w] and box [B, 4] of given `classes` (e.g. the truth);
        one pass, no prediction."""
        images, classes = images.to(self.device), classes.to(self.device)
        with autocast(self.serving.precision, self.device):
            if self.is_teacher:
                cam = self.model.class_activation_map(self.model(images), classes)
            else:
                cam = self.model.forward_with_map(images, classes)[1]
        return cam, self._boxes(cam, tuple(images.shape[-2:]))
