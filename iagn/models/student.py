"""The compact student for serving: one torchvision backbone, global average pool, linear.

A linear classifier on average-pooled features makes the class activation map faithful
(CAM, Zhou et al. 2016): each position's share of the logit is the classifier's weights
applied to its features over the number of positions, and the shares plus the bias sum to
the logit (`attribution_map`, tests/test_faithful_maps.py).

`output_stride` sets the map's resolution. ResNet-18 downsamples 32x, a 2 x 2 map at the
demo's 64 px, too coarse to point at a small part; 16 (8) runs layer4 (and layer3) at the
resolution of the layer before, by giving the first block's 3x3 conv and its downsample
1x1 conv stride 1. No weight changes shape, so the teacher's trunk still loads
(`copy_teacher_trunk`); the map gains 2x (4x) per side and the pass costs more FLOPs.

`layers` ends the ResNet earlier: 3 after layer3 (256 channels, output stride at most 16),
2 after layer2 (128 channels, output stride 8 with no downsampling undone). Layer4 at a fine
stride is most of the stride-8 student's work; without it the student is the teacher's
trunk up to its second (layers 3) or first (layers 2) tap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torchvision import models

from iagn.errors import IagnError
from iagn.models.backbones import build_resnet, load_state_dict_file
from iagn.models.iagn import normalize_map, position_shares

STUDENTS = ("resnet18", "mobilenet_v3_small", "mobilenet_v3_large")
OUTPUT_STRIDES = (32, 16, 8)


@dataclass
class StudentConfig:
    backbone: str = "resnet18"
    num_classes: int = 10
    weights: str = "none"
    class_names: list[str] = field(default_factory=list)
    # 32, 16 or 8 (resnet18 only); checkpoints written before the option existed used 32.
    output_stride: int = 32
    # ResNet layers kept (resnet18 only): 4, 3 or 2 (output stride <= 32, 16, 8).
    layers: int = 4

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


def undo_downsampling(layer: nn.Sequential) -> None:
    """Stride 1 in a torchvision ResNet layer's first block (its 3x3 conv and its
    downsample 1x1 conv): the layer keeps its input's resolution, weights unchanged."""
    block = layer[0]
    block.conv1.stride = (1, 1)
    if block.downsample is not None:
        block.downsample[0].stride = (1, 1)


class Student(nn.Module):
    def __init__(self, config: StudentConfig):
        super().__init__()
        if config.backbone not in STUDENTS:
            raise IagnError(
                f"unknown student {config.backbone!r}; choose one of: {', '.join(STUDENTS)}"
            )
        if config.output_stride not in OUTPUT_STRIDES:
            raise IagnError(
                f"student output_stride must be one of {', '.join(map(str, OUTPUT_STRIDES))}, "
                f"not {config.output_stride!r}"
            )
        if config.output_stride != 32 and config.backbone != "resnet18":
            raise IagnError(
                f"student output_stride {config.output_stride} is implemented for resnet18 "
                f"only; {config.backbone} serves at output_stride 32"
            )
        if config.layers not in (2, 3, 4) or (config.layers < 4 and config.backbone != "resnet18"):
            raise IagnError(
                f"student layers must be 4, or 3 or 2 for resnet18 (end after layer3 or layer2), "
                f"not {config.layers!r} for {config.backbone}"
            )
        finest = {2: 8, 3: 16, 4: 32}[config.layers]  # the stride without undone downsampling
        if config.output_stride > finest:
            raise IagnError(
                f"a student that ends after layer{config.layers} (layers: {config.layers}) has "
                f"output stride {finest} or less, not {config.output_stride}"
            )
        self.config = config
        if config.backbone == "resnet18":
            net = build_resnet("resnet18", config.weights)
            kept = {32: (), 16: (net.layer4,), 8: (net.layer3, net.layer4)}
            for layer in kept[config.output_stride]:
                undo_downsampling(layer)
            stages = [net.layer1, net.layer2, net.layer3, net.layer4][: config.layers]
            self.features = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, *stages)
            channels = stages[-1][-1].bn2.num_features
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
        # A shorter student takes the trunk up to its own last layer.
        trunk = [*teacher.stem, *teacher.layers][: len(self.features)]
        for target, source in zip(self.features, trunk, strict=True):
            target.load_state_dict(source.state_dict())

    def forward(
        self, x: torch.Tensor, attribution_of: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: [B, 3, H, W] -> logits [B, classes]; with `attribution_of` ([B] classes), the
        logits and their shares from `forward_with_attribution` (training calls it this
        way, so DistributedDataParallel sees the pass)."""
        if attribution_of is not None:
            return self.forward_with_attribution(x, attribution_of)
        return self.classifier(self.features(x).mean(dim=(2, 3)))

    def forward_with_map(
        self, x: torch.Tensor, classes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the activation map ([B, h, w] in [0, 1]) of `classes` (default: the
        predicted class), from one pass."""
        logits, shares = self.forward_with_attribution(x, classes)
        return logits, normalize_map(shares)

    def forward_with_attribution(
        self, x: torch.Tensor, classes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and each position's share of the logit of `classes` ([B, h, w]; the shares
        plus the classifier's bias sum to the logit)."""
        features = self.features(x)
        logits = self.classifier(features.mean(dim=(2, 3)))
        if classes is None:
            classes = logits.argmax(dim=1)
        weights = self.classifier.weight[classes].float()
        return logits, position_shares(features.float(), weights, "avg")
