"""A reference implementation of the PMG research training loop (Du et al., ECCV 2020).

Written from the paper's published training procedure, for benchmarking only: per batch,
four sequential forward / backward / optimizer steps (jigsaw 8, 4, 2, then the whole image
with the concatenated head at twice the loss weight); every forward runs the whole network
and all heads although each loss uses one output; the jigsaw swaps patches one by one in a
Python loop with one permutation for the whole batch; fp32, default memory format.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from iagn.models.iagn import IAGN


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
    model: IAGN, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor
) -> float:
    """One PMG batch: four sequential steps, each through the full network and all heads."""
    total = 0.0
    for stage, n in enumerate(model.config.jigsaw):
        optimizer.zero_grad()
        output = model(jigsaw_per_patch(images, n))
        loss = F.cross_entropy(output.full_stage_logits[stage], labels)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
    optimizer.zero_grad()
    output = model(images)
    loss = 2 * F.cross_entropy(output.fused_logits, labels)
    loss.backward()
    optimizer.step()
    return total + float(loss.detach())
