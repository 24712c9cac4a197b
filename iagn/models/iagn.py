"""The IAGN teacher: a ResNet trunk with three granularity stages and a fused head.

    image -> stem, layer1 -> layer2 --tap 1--> block 1 -> max pool -> head 1
                                  -> layer3 --tap 2--> block 2 -> max pool -> head 2
                                            -> layer4 --tap 3--> block 3 -> max pool -> head 3
    fused head: linear on the concatenation of the three pooled stage features

Each block is a 1x1 conv then a 3x3 conv (each with BN and ReLU); each head is one linear
layer on the globally max-pooled block features. A linear head on pooled features makes the
class activation map exact (the map is the head's weights applied at every position), so
the attention shown to people is what the classifier actually used.

`forward` takes `exits`: how many leading samples of the batch stop at tap 1, tap 2 and tap 3
(jigsaw views train only their own stage head); the remaining samples run the full network
and feed every head. One call serves all granularities of a training step, so the trunk
runs once over the concatenated batch and no sample computes layers its loss does not use.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from iagn.models.backbones import build_resnet, tap_channels

NUM_STAGES = 3


@dataclass
class ModelConfig:
    """Everything needed to rebuild the architecture (saved in every checkpoint)."""

    backbone: str = "resnet18"
    num_classes: int = 10
    stage_channels: int = 256
    weights: str = "none"
    jigsaw: tuple[int, ...] = (8, 4, 2)
    class_names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["jigsaw"] = list(self.jigsaw)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        data = dict(data)
        data["jigsaw"] = tuple(data.get("jigsaw", (8, 4, 2)))
        return cls(**data)


class IAGNOutput(NamedTuple):
    """Logits and feature maps of one forward pass (a NamedTuple, so DDP finds its tensors).

    exit_logits[k]: [exits[k], classes], stage head k on the samples that stopped at its
    tap; everything else covers the samples that ran the full network, and
    full_stage_logits holds only the heads that were asked for.
    """

    exit_logits: list[torch.Tensor]  # per stage: logits of the samples that exited there
    full_stage_logits: list[torch.Tensor]  # per stage: logits of the full samples
    fused_logits: torch.Tensor  # [n_full, classes]
    stage_maps: list[torch.Tensor]  # per stage: block features of the full samples

    def combined_logits(self) -> torch.Tensor:
        """PMG's combined prediction over the three stage heads and the fused head.

        PMG sums the four logit vectors; we average them (same argmax) so the combined
        probabilities stay comparable to a single head's for calibration."""
        return (self.fused_logits + sum(self.full_stage_logits)) / (1 + len(self.full_stage_logits))


class StageBlock(nn.Sequential):
    def __init__(self, in_channels: int, channels: int):
        super().__init__(
            nn.Conv2d(in_channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )


class IAGN(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        net = build_resnet(config.backbone, config.weights)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
        self.layers = nn.ModuleList([net.layer2, net.layer3, net.layer4])
        channels = config.stage_channels
        self.blocks = nn.ModuleList(StageBlock(c, channels) for c in tap_channels(net))
        self.heads = nn.ModuleList(nn.Linear(channels, config.num_classes) for _ in range(3))
        self.fused_head = nn.Linear(NUM_STAGES * channels, config.num_classes)

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [*self.stem.parameters(), *self.layers.parameters()]

    def head_parameters(self) -> list[nn.Parameter]:
        return [
            *self.blocks.parameters(),
            *self.heads.parameters(),
            *self.fused_head.parameters(),
        ]

    def forward(
        self, x: torch.Tensor, exits: tuple[int, int, int] = (0, 0, 0), heads: int = NUM_STAGES
    ) -> IAGNOutput:
        """x: [B, 3, H, W]; the first exits[0] samples stop at tap 1, the next exits[1] at
        tap 2, the next exits[2] at tap 3; the rest run everything. `heads`: how many stage
        heads to apply to the full samples (training stage s needs s; DDP requires that
        every computed output feeds the loss)."""
        if sum(exits) > x.shape[0]:
            raise ValueError(f"exits {exits} exceed the batch of {x.shape[0]}")
        h = self.stem(x)
        exit_logits, full_pooled, stage_maps = [], [], []
        for stage in range(NUM_STAGES):
            h = self.layers[stage](h)
            leaving, h = h[: exits[stage]], h[exits[stage] :]
            if leaving.shape[0]:
                pooled = self.blocks[stage](leaving).amax(dim=(2, 3))
                exit_logits.append(self.heads[stage](pooled))
            else:
                exit_logits.append(h.new_zeros(0, self.config.num_classes))
            # The full samples are the tail of the batch: skip those that exit deeper.
            features = self.blocks[stage](h[sum(exits[stage + 1 :]) :])
            stage_maps.append(features)
            full_pooled.append(features.amax(dim=(2, 3)))
        return IAGNOutput(
            exit_logits=exit_logits,
            full_stage_logits=[self.heads[k](full_pooled[k]) for k in range(heads)],
            fused_logits=self.fused_head(torch.cat(full_pooled, dim=1)),
            stage_maps=stage_maps,
        )

    def class_activation_map(self, output: IAGNOutput, classes: torch.Tensor) -> torch.Tensor:
        """The fused head's activation map for `classes` ([B] ints): [B, h1, w1] in [0, 1].

        The fused logit is a linear function of the max-pooled stage features, so each
        stage's contribution at every position is its slice of the fused weights applied to
        its feature map; the three contributions are upsampled to tap 1's resolution and
        summed. No extra backward pass.
        """
        channels = self.config.stage_channels
        weights = self.fused_head.weight[classes]  # [B, 3 * C]
        size = output.stage_maps[0].shape[-2:]
        total = 0
        for stage, features in enumerate(output.stage_maps):
            w = weights[:, stage * channels : (stage + 1) * channels]
            cam = torch.einsum("bc,bchw->bhw", w.to(features.dtype), features)
            total = total + F.interpolate(
                cam.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False
            ).squeeze(1)
        return normalize_map(total)

    def stage_activation_map(
        self, output: IAGNOutput, stage: int, classes: torch.Tensor
    ) -> torch.Tensor:
        """Activation map of stage head `stage` (0-based) for `classes`: [B, h, w] in [0, 1]."""
        w = self.heads[stage].weight[classes]
        features = output.stage_maps[stage]
        return normalize_map(torch.einsum("bc,bchw->bhw", w.to(features.dtype), features).float())


def normalize_map(cam: torch.Tensor) -> torch.Tensor:
    """Min-max normalize each map of [B, h, w] to [0, 1] (a flat map becomes all zeros)."""
    flat = cam.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    high = flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-8)).view_as(cam)


def build_iagn(config: ModelConfig) -> IAGN:
    return IAGN(config)
