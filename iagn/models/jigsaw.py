"""The jigsaw generator of progressive multi-granularity training, vectorized on the device.

`jigsaw(x, n)` cuts each image into n x n patches and shuffles them with a permutation drawn
independently per sample, in a handful of tensor ops (no Python loop over patches).

Sizes not divisible by n: the image is centre-cropped to the largest multiple of n in each
dimension (at most n - 1 pixels per dimension), shuffled, and zero-padded back to its
original size, so views of every granularity can share one batch. Use crop sizes that are
multiples of 8 (the defaults are) and nothing is cropped at all.
"""

from __future__ import annotations

import torch


def crop_to_multiple(x: torch.Tensor, n: int) -> torch.Tensor:
    """Centre-crop [B, C, H, W] so that H and W are multiples of n."""
    height, width = x.shape[-2:]
    new_h, new_w = height - height % n, width - width % n
    top, left = (height - new_h) // 2, (width - new_w) // 2
    return x[..., top : top + new_h, left : left + new_w]


def jigsaw(x: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shuffle n x n patches of each image in [B, C, H, W]; n = 1 returns the input."""
    if n < 1:
        raise ValueError(f"jigsaw granularity must be >= 1, got {n}")
    if n == 1:
        return x
    original = x.shape[-2:]
    height, width = original
    if height < n or width < n:
        raise ValueError(
            f"image of {height}x{width} pixels is too small for a {n}x{n} jigsaw; "
            f"use images of at least {n} pixels per side (better: {n * 8})"
        )
    x = crop_to_multiple(x, n)
    batch, channels, height, width = x.shape
    ph, pw = height // n, width // n
    # [B, C, n, ph, n, pw] -> [B, n*n, C, ph, pw]: one row per patch.
    patches = x.reshape(batch, channels, n, ph, n, pw).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(batch, n * n, channels, ph, pw)
    noise = torch.rand(batch, n * n, generator=generator, device="cpu").to(x.device)
    order = noise.argsort(dim=1)
    index = order.view(batch, n * n, 1, 1, 1).expand_as(patches)
    shuffled = patches.gather(1, index)
    # Back to [B, C, H, W].
    shuffled = shuffled.reshape(batch, n, n, channels, ph, pw).permute(0, 3, 1, 4, 2, 5)
    shuffled = shuffled.reshape(batch, channels, height, width)
    pad_h, pad_w = original[0] - height, original[1] - width
    if pad_h or pad_w:
        top, left = pad_h // 2, pad_w // 2
        shuffled = torch.nn.functional.pad(shuffled, (left, pad_w - left, top, pad_h - top))
    return shuffled
