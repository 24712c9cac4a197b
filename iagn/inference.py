"""Classify and explain images from files, PIL images or arrays with a checkpoint.

The preprocessing (resize the shorter side, centre crop, ImageNet normalization) and the
serving configuration (which prediction, box, precision and temperature: chosen on the
validation split after training) come from the checkpoint, so a model is usable from its
file alone and predicts exactly what `iagn evaluate` measured. Images go through the decoder's
rules (`iagn.data.images`: pixel limit, 16-bit/float refused, alpha on white), with the
pixel limit the model's training data had (`data.max_pixels`, recorded in the checkpoint).
Boxes are returned in the coordinates of the original image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from iagn.data.dataset import IMAGENET_MEAN, IMAGENET_STD, build_transform
from iagn.data.images import DEFAULT_MAX_PIXELS, check_image, image_from_array, open_image
from iagn.device import pick_device
from iagn.evaluation.plots import overlay
from iagn.evaluation.predictor import Predictor
from iagn.evaluation.serving_config import ServingConfig, serving_config_of
from iagn.models.load import load_model


class ImageClassifier:
    def __init__(
        self,
        model: torch.nn.Module,
        class_names: list[str],
        resize: int,
        crop: int,
        device: str = "cpu",
        serving: ServingConfig | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.class_names = list(class_names)
        self.max_pixels = max_pixels
        self.resize, self.crop = resize, crop
        self.transform = build_transform(False, resize, crop)
        self.predictor = Predictor(model, serving, pick_device(device))

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> ImageClassifier:
        model, checkpoint = load_model(path)
        data = checkpoint["data"]
        return cls(
            model,
            data["class_names"],
            data["resize"],
            data["crop"],
            device,
            serving=serving_config_of(checkpoint),
            # Checkpoints from before the limit existed carry none: the default applies.
            max_pixels=data.get("max_pixels", DEFAULT_MAX_PIXELS),
        )

    def _to_original(self, box: torch.Tensor, width: int, height: int) -> list[float]:
        """Undo resize + centre crop: a box in crop pixels -> original image pixels."""
        scale = self.resize / min(width, height)
        resized_w, resized_h = round(width * scale), round(height * scale)
        left, top = (resized_w - self.crop) / 2, (resized_h - self.crop) / 2
        x0, y0, x1, y1 = box.tolist()
        return [
            max(0.0, (x0 + left) / scale),
            max(0.0, (y0 + top) / scale),
            min(float(width), (x1 + left) / scale),
            min(float(height), (y1 + top) / scale),
        ]

    def predict_images(self, images: list[Image.Image]) -> tuple[list[dict[str, Any]], Any]:
        """One result dict per image: class_id, class_name, probability, top5, box."""
        images = [
            check_image(image, self.max_pixels, name=f"image {index}")
            for index, image in enumerate(images)
        ]
        tensors = torch.stack([self.transform(image) for image in images])
        prediction = self.predictor(torch.as_tensor(tensors))
        probabilities = prediction.logits["final"].softmax(dim=1).cpu()
        results = []
        for index, image in enumerate(images):
            top = probabilities[index].topk(min(5, len(self.class_names)))
            best = int(top.indices[0])
            results.append(
                {
                    "class_id": best,
                    "class_name": self.class_names[best],
                    "probability": float(top.values[0]),
                    "top5": [
                        {
                            "class_id": int(i),
                            "class_name": self.class_names[int(i)],
                            "probability": float(p),
                        }
                        for p, i in zip(top.values, top.indices, strict=True)
                    ],
                    "box": self._to_original(prediction.boxes[index].cpu(), *image.size),
                }
            )
        return results, prediction

    def predict_files(self, paths: list[str | Path]) -> list[dict[str, Any]]:
        return self.predict_images([open_image(p, self.max_pixels) for p in paths])[0]

    def predict_arrays(self, arrays: list[np.ndarray]) -> list[dict[str, Any]]:
        """Arrays of values 0..255: H x W, H x W x 3 (RGB) or H x W x 4 (RGBA)."""
        return self.predict_images(
            [
                image_from_array(a, self.max_pixels, name=f"array {index}")
                for index, a in enumerate(arrays)
            ]
        )[0]

    def explain_file(self, path: str | Path, out: str | Path) -> dict[str, Any]:
        """Write a PNG: the centre-cropped image, heatmap, attention box, class, probability."""
        image = open_image(path, self.max_pixels)
        results, prediction = self.predict_images([image])
        result = results[0]
        tensor = self.transform(image)
        pixels = (
            tensor * torch.tensor(IMAGENET_STD).view(3, 1, 1)
            + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        ).clamp(0, 1)
        heat = torch.nn.functional.interpolate(
            prediction.attention[:1, None].float().cpu(),
            size=pixels.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )[0, 0]
        overlay(
            pixels.permute(1, 2, 0).numpy(),
            heat.numpy(),
            prediction.boxes[0].cpu(),
            f"{result['class_name']}  p={result['probability']:.2f}",
            Path(out),
        )
        return result
