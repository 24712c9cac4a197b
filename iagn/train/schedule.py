"""Cosine learning-rate schedule with linear warm-up, stepped once per optimizer step."""

from __future__ import annotations

import math

import torch


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, final_scale: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """LR factor rises linearly over `warmup_steps`, then follows a cosine to `final_scale`."""
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return final_scale + (1 - final_scale) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
