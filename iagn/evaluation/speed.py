"""Inference speed and size on the current device."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of `fn()`, waiting for the GPU's queued work on both ends."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def measure_speed(
    predict: Callable[[torch.Tensor], object],
    image_shape: tuple[int, int, int],
    device: torch.device,
    batch_size: int = 32,
    repeats: int = 10,
) -> dict[str, float]:
    """Median single-image latency (ms) and batched throughput (images/s) of `predict`."""
    single = torch.randn(1, *image_shape, device=device)
    batch = torch.randn(batch_size, *image_shape, device=device)
    for _ in range(2):  # warm-up: allocator, kernels, oneDNN primitive caches
        predict(single)
        predict(batch)
    latencies = [timed(lambda: predict(single), device) for _ in range(repeats)]
    batch_times = [timed(lambda: predict(batch), device) for _ in range(max(2, repeats // 3))]
    return {
        "latency_ms": 1000 * statistics.median(latencies),
        "throughput_ips": batch_size / statistics.median(batch_times),
    }


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def file_size_mb(path: str | Path) -> float:
    return Path(path).stat().st_size / 2**20
