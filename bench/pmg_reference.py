"""A reference implementation of the PMG research training loop (Du et al., ECCV 2020).

Written from the paper's published training procedure and model, for benchmarking only:
per batch, four sequential forward / backward / optimizer steps (jigsaw 8, 4, 2, then the
whole image with the concatenated head at twice the loss weight); every forward runs the
whole network and all heads although each loss uses one output; the jigsaw swaps patches
one by one in a Python loop with one permutation for the whole batch.

`PMGNet` carries PMG's own heads (`reference_step` also runs on our IAGN model, whose
forward returns the same output type). Precision, memory format and gradient clipping are
the caller's: the benchmarks give every loop the same ones.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from iagn.models.backbones import build_resnet, tap_channels
from iagn.models.iagn import IAGNOutput
from iagn.precision import autocast


class BasicConv(nn.Sequential):
    """PMG's conv block: conv, BatchNorm (PMG's momentum 0.01), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(out_channels, momentum=0.01),
            nn.ReLU(inplace=True),
        )


def pmg_classifier(in_features: int, hidden: int, classes: int) -> nn.Sequential:
    """PMG's classifier: BatchNorm, Linear, BatchNorm, ELU, Linear."""
    return nn.Sequential(
        nn.BatchNorm1d(in_features),
        nn.Linear(in_features, hidden),
        nn.BatchNorm1d(hidden),
        nn.ELU(inplace=True),
        nn.Linear(hidden, classes),
    )


class PMGNet(nn.Module):
    """PMG's model on a torchvision ResNet: per tap a 1x1 then 3x3 conv block to half the
    last tap's channels (1024 on ResNet-50), a global max pool, a classifier per stage and
    one on the concatenation. `feature_size` is PMG's 512 at the paper's scale."""

    def __init__(self, backbone: str, num_classes: int, feature_size: int, weights: str = "none"):
        super().__init__()
        net = build_resnet(backbone, weights)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
        self.layers = nn.ModuleList([net.layer2, net.layer3, net.layer4])
        taps = tap_channels(net)
        width = taps[-1] // 2
        self.blocks = nn.ModuleList(
            nn.Sequential(BasicConv(c, feature_size, 1), BasicConv(feature_size, width, 3))
            for c in taps
        )
        self.heads = nn.ModuleList(pmg_classifier(width, feature_size, num_classes) for _ in taps)
        self.concat_head = pmg_classifier(width * len(taps), feature_size, num_classes)

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [*self.stem.parameters(), *self.layers.parameters()]

    def head_parameters(self) -> list[nn.Parameter]:
        return [
            *self.blocks.parameters(),
            *self.heads.parameters(),
            *self.concat_head.parameters(),
        ]

    def forward(self, x: torch.Tensor) -> IAGNOutput:
        """x: [B, 3, H, W]; every head on every sample, as PMG computes them."""
        h = self.stem(x)
        pooled = []
        for layer, block in zip(self.layers, self.blocks, strict=True):
            h = layer(h)
            pooled.append(block(h).amax(dim=(2, 3)))
        return IAGNOutput(
            exit_logits=[],
            full_stage_logits=[head(p) for head, p in zip(self.heads, pooled, strict=True)],
            fused_logits=self.concat_head(torch.cat(pooled, dim=1)),
            stage_maps=[],
        )


def jigsaw_per_patch(images: torch.Tensor, n: int) -> torch.Tensor:
    """PMG's jigsaw: a Python loop of n*n patch swaps, one shuffle for the whole batch."""
    block = images.shape[-1] // n
    cells = [(a, b) for a in range(n) for b in range(n)]
    random.shuffle(cells)
    out = images.clone()
    for x, y in cells:
        temp = out[..., 0:block, 0:block].clone()
        out[..., 0:block, 0:block] = out[
            ..., x * block : (x + 1) * block, y * block : (y + 1) * block
        ].clone()
        out[..., x * block : (x + 1) * block, y * block : (y + 1) * block] = temp
    return out


def reference_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    jigsaw: tuple[int, ...] = (8, 4, 2),
    precision: str = "fp32",
    grad_clip: float = 0.0,
) -> float:
    """One PMG batch: four sequential steps, each through the full network and all heads.

    Returns the batch's training loss, the sum of the four (weights 1, 1, 1, 2)."""

    def update(inputs: torch.Tensor, loss_of) -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision, images.device):
            loss = loss_of(model(inputs))
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        return float(loss.detach())

    total = 0.0
    for stage, n in enumerate(jigsaw):
        total += update(
            jigsaw_per_patch(images, n),
            lambda out, k=stage: F.cross_entropy(out.full_stage_logits[k].float(), labels),
        )
    return total + update(images, lambda out: 2 * F.cross_entropy(out.fused_logits.float(), labels))
