"""The compact student for serving: one torchvision backbone, global average pool, linear.

A linear classifier on average-pooled features makes the class activation map exact
(CAM, Zhou et al. 2016), so the student explains its predictions the way the teacher does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torchvision import models

from iagn.errors import IagnError
from iagn.models.backbones import build_resnet, load_state_dict_file
from iagn.models.iagn import normalize_map

STUDENTS = ("resnet18", "mobilenet_v3_small", "mobilenet_v3_large")


@dataclass
class StudentConfig:
    backbone: str = "resnet18"
    num_classes: int = 10
    weights: str = "none"
    class_names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StudentConfig:
        return cls(**data)


def _mobilenet(name: str, weights: str) -> tuple[nn.Module, int]:
    builder = getattr(models, name)
    enum = {
        "mobilenet_v3_small": models.MobileNet_V3_Small_Weights.IMAGENET1K_V1,
        "mobilenet_v3_large": models.MobileNet_V3_Large_Weights.IMAGENET1K_V1,
    }[name]
    net = builder(weights=enum if weights == "imagenet" else None)
    if weights not in ("none", "imagenet", "", None):
        state = {
            k: v for k, v in load_state_dict_file(weights).items() if not k.startswith("classifier")
        }
        net.load_state_dict(state, strict=False)
    return net.features, net.features[-1].out_channels


class Student(nn.Module):
    def __init__(self, config: StudentConfig):
        super().__init__()
        if config.backbone not in STUDENTS:
            raise IagnError(
                f"unknown student {config.backbone!r}; choose one of: {', '.join(STUDENTS)}"
            )
        self.config = config
        if config.backbone == "resnet18":
            net = build_resnet("resnet18", config.weights)
            self.features = nn.Sequential(
                net.conv1,
                net.bn1,
                net.relu,
                net.maxpool,
                net.layer1,
                net.layer2,
                net.layer3,
                net.layer4,
            )
            channels = 512
        else:
            self.features, channels = _mobilenet(config.backbone, config.weights)
        self.classifier = nn.Linear(channels, config.num_classes)

    def copy_teacher_trunk(self, teacher: nn.Module, teacher_backbone: str) -> None:
        """Start from the teacher's trained trunk (same torchvision architecture only).

        The teacher's trunk is `stem` (conv1 .. layer1) + `layers` (layer2 .. layer4), the
        student's the same modules in one Sequential; the student keeps its own classifier.
        """
        if teacher_backbone != self.config.backbone:
            raise IagnError(
                f"distill.student_init: teacher needs a student of the teacher's architecture "
                f"({teacher_backbone}), not {self.config.backbone}; use student_init: weights"
            )
        trunk = [*teacher.stem, *teacher.layers]
        for target, source in zip(self.features, trunk, strict=True):
            target.load_state_dict(source.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] -> logits [B, classes]."""
        return self.classifier(self.features(x).mean(dim=(2, 3)))

    def forward_with_map(
        self, x: torch.Tensor, classes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the activation map ([B, h, w] in [0, 1]) of `classes` (default: the
        predicted class), from one pass."""
        features = self.features(x)
        logits = self.classifier(features.mean(dim=(2, 3)))
        if classes is None:
            classes = logits.argmax(dim=1)
        weights = self.classifier.weight[classes].to(features.dtype)
        cam = torch.einsum("bc,bchw->bhw", weights, features).float()
        return logits, normalize_map(cam)
