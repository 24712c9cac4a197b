"""Numeric precision: `auto` picks bf16 only where it is fast.

On CPUs without native bf16 (no `avx512_bf16` / `amx_bf16` in /proc/cpuinfo) autocast to
bf16 is emulated and about 2x slower than fp32 (measured, ../shared/STACK.md), and
`torch.ops.mkldnn._is_mkldnn_bf16_supported()` says True there anyway, so we read the flags.
"""

from __future__ import annotations

import contextlib

import torch

from iagn.device import cpu_has_native_bf16
from iagn.errors import IagnError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(name: str, device: torch.device) -> str:
    """The concrete precision ("fp32", "bf16" or "fp16") for `name` on `device`."""
    if name not in PRECISIONS:
        raise IagnError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    if name == "auto":
        if device.type == "cuda":
            # V100/T4 emulate bf16 (slower than fp32): only native support counts.
            return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise IagnError("fp16 needs a CUDA GPU; use precision auto, fp32 or bf16 on CPU")
    return name


def autocast(precision: str, device: torch.device):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16, whose small gradients underflow to zero without it; a
    pass-through for fp32 and bf16 (bf16 has fp32's exponent range)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
