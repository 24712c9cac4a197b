"""The IAGN teacher: a ResNet trunk with three granularity stages and a fused head.

    image -> stem, layer1 -> layer2 --tap 1--> block 1 -> pool -> head 1
                                  -> layer3 --tap 2--> block 2 -> pool -> head 2
                                            -> layer4 --tap 3--> block 3 -> pool -> head 3
    fused head: linear on the concatenation of the three pooled stage features

Each block is a 1x1 conv then a 3x3 conv (each with BN and ReLU); each head is one linear
layer on the globally pooled block features (`pooling`: "max", PMG's, or "avg").

The attention shown to people is faithful: `attribution_map` splits the fused logit into
one contribution per position of tap 1's grid, and those contributions plus the head's bias
sum to the logit exactly (tests/test_faithful_maps.py). With average pooling a position's
contribution is the head's weights applied to its features, divided by the number of
positions (CAM, Zhou et al. 2016); with max pooling each channel contributes only at the
position of its maximum, the one position the pooled feature came from. Deeper stages'
coarser cells are spread evenly over the tap-1 cells they cover, so no contribution is
counted twice or lost.

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
    # Checkpoints written before the option existed pooled with max.
    pooling: str = "max"

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


POOLINGS = ("max", "avg")


def global_pool(features: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, C, h, w] -> [B, C]."""
    return features.amax(dim=(2, 3)) if pooling == "max" else features.mean(dim=(2, 3))


class IAGN(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {config.pooling!r}; choose one of {POOLINGS}")
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
                pooled = global_pool(self.blocks[stage](leaving), self.config.pooling)
                exit_logits.append(self.heads[stage](pooled))
            else:
                exit_logits.append(h.new_zeros(0, self.config.num_classes))
            # The full samples are the tail of the batch: skip those that exit deeper.
            features = self.blocks[stage](h[sum(exits[stage + 1 :]) :])
            stage_maps.append(features)
            full_pooled.append(global_pool(features, self.config.pooling))
        return IAGNOutput(
            exit_logits=exit_logits,
            full_stage_logits=[self.heads[k](full_pooled[k]) for k in range(heads)],
            fused_logits=self.fused_head(torch.cat(full_pooled, dim=1)),
            stage_maps=stage_maps,
        )

    def attribution_map(self, output: IAGNOutput, classes: torch.Tensor) -> torch.Tensor:
        """Each tap-1 position's share of the fused logit of `classes` ([B] ints): [B, h1, w1]
        whose sum plus the head's bias is the fused logit (exactly, up to float rounding)."""
        channels = self.config.stage_channels
        weights = self.fused_head.weight[classes]  # [B, 3 * C]
        size = output.stage_maps[0].shape[-2:]
        total = 0
        for stage, features in enumerate(output.stage_maps):
            w = weights[:, stage * channels : (stage + 1) * channels]
            shares = position_shares(features.float(), w.float(), self.config.pooling)
            total = total + spread_to(shares, size)
        return total

    def class_activation_map(self, output: IAGNOutput, classes: torch.Tensor) -> torch.Tensor:
        """`attribution_map` min-max normalized per image to [0, 1] (no extra pass)."""
        return normalize_map(self.attribution_map(output, classes))

    def stage_activation_map(
        self, output: IAGNOutput, stage: int, classes: torch.Tensor
    ) -> torch.Tensor:
        """Activation map of stage head `stage` (0-based) for `classes`: [B, h, w] in [0, 1]."""
        w = self.heads[stage].weight[classes].float()
        features = output.stage_maps[stage].float()
        return normalize_map(position_shares(features, w, self.config.pooling))


def position_shares(features: torch.Tensor, weights: torch.Tensor, pooling: str) -> torch.Tensor:
    """Each position's share of `weights` . pool(`features`): features [B, C, h, w], weights
    [B, C] -> [B, h, w], summing over positions to the pooled dot product."""
    if pooling == "avg":
        positions = features.shape[-2] * features.shape[-1]
        return torch.einsum("bc,bchw->bhw", weights, features) / positions
    # Max pooling: channel c's pooled value is its value at its argmax, so its whole
    # contribution lands there (the first maximum, as amax's gradient would pick one).
    flat = features.flatten(2)  # [B, C, hw]
    peak = flat.argmax(dim=2, keepdim=True)
    pooled = flat.gather(2, peak).squeeze(2)  # [B, C]
    shares = torch.zeros_like(flat[:, 0])  # [B, hw]
    shares.scatter_add_(1, peak.squeeze(2), weights * pooled)
    return shares.view(features.shape[0], *features.shape[-2:])


def spread_to(shares: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, h, w] shares -> [B, H, W] (H >= h, W >= w): each cell's share divided evenly among
    the finer cells nearest-neighbour upsampling gives it, so the total is unchanged."""
    if tuple(shares.shape[-2:]) == tuple(size):
        return shares
    height, width = shares.shape[-2:]
    cells = torch.arange(height * width, device=shares.device, dtype=torch.float32)
    owner = F.interpolate(cells.view(1, 1, height, width), size=size, mode="nearest").long()
    counts = torch.bincount(owner.flatten(), minlength=height * width).clamp_min(1)
    upsampled = F.interpolate(shares.unsqueeze(1), size=size, mode="nearest").squeeze(1)
    return upsampled / counts[owner[0, 0]].to(shares.dtype)


def normalize_map(cam: torch.Tensor) -> torch.Tensor:
    """Min-max normalize each map of [B, h, w] to [0, 1] (a flat map becomes all zeros)."""
    flat = cam.flatten(1)
    low = flat.min(dim=1, keepdim=True).values
    high = flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-8)).view_as(cam)


def build_iagn(config: ModelConfig) -> IAGN:
    return IAGN(config)
