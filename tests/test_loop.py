"""The training loop (iagn/train/loop.py): fp16 loss scaling, per-rank seeds, DDP, and
the precision `auto` picks on a GPU.

The first tests drive `run_loop` with a four-number model whose gradients are known, so the
optimizer's every move can be computed by hand; the last trains a tiny IAGN's stage 3 under
torchrun (2 CPU processes, gloo) and compares it with one process.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ddp_stage3 import global_batches, spec
from helpers import run, torchrun_two
from test_preemption import one_thread

from iagn.precision import resolve_precision
from iagn.train.distributed import Runtime
from iagn.train.loop import LoopSpec, epoch_seed, run_loop

CPU = torch.device("cpu")
HERE = Path(__file__).resolve().parent


class Weights(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((4,), 0.5))


def weights_spec(batches: list[dict], step_fn, **overrides) -> LoopSpec:
    """`run_loop` on Weights: one batch per step, no validation, no schedule warm-up."""
    model = Weights()
    values = {
        "model": model,
        "param_groups": [{"params": list(model.parameters()), "lr": 0.1}],
        "epochs": 1,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "warmup_epochs": 0.0,
        "grad_clip": 1.0,
        "precision": "fp32",
        "channels_last": False,
        "seed": 0,
        "step_fn": step_fn,
        "validate_fn": lambda trained: {},
        "make_loader": lambda epoch: batches,
        "payload": lambda: {"kind": "test"},
        "description": "test",
    }
    return LoopSpec(**{**values, **overrides})


def test_fp16_clips_unscaled_gradients_and_skips_an_overflowing_step(tmp_path):
    """loss = w . x, so the gradient is x. Step 1: |x| = 5 is clipped to 1 -- the true
    gradient, not the one scaled by 2**16 (clipping that would leave a 2**16 times smaller
    step). Step 2: x holds 1e38, the loss is finite but its scaled gradient is inf: the step
    is skipped (weights and momentum untouched) and the scale halves. Step 3 moves again,
    with the momentum of step 1 alone. fp16 is a CUDA choice; its GradScaler logic is the
    same on the CPU."""
    x = torch.tensor([3.0, 4.0, 0.0, 0.0])
    overflow = torch.tensor([1e38, 0.0, 0.0, 0.0])
    batches = [{"image": v.unsqueeze(0)} for v in (x, overflow, x)]
    seen = []

    def step_fn(model, batch, generator):
        seen.append(model.w.detach().clone())
        loss = (model.w * batch["image"][0]).sum()
        return loss, {"loss": float(loss.detach())}

    result = run_loop(
        weights_spec(batches, step_fn, precision="fp16"), tmp_path / "w.pt", Runtime(CPU)
    )
    final = result["state"]["model_state"]["w"]
    w0, w1, w2 = seen
    clipped = x / x.norm()  # clip_grad_norm_ to 1
    lr = [0.1 * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in range(3)]  # cosine, 3 steps
    # Nesterov SGD's first step: buffer = g, update = g + 0.9 * buffer.
    torch.testing.assert_close(w1, w0 - lr[0] * 1.9 * clipped)
    assert torch.equal(w2, w1)  # the overflowing step changed nothing
    assert result["state"]["scaler_state"]["scale"] == 2.0**16 / 2
    # Third step: buffer = 0.9 * g + g, update = g + 0.9 * buffer (no trace of step 2).
    torch.testing.assert_close(final, w2 - lr[2] * (1 + 0.9 * 1.9) * clipped)


def test_epoch_seeds_are_distinct_for_every_rank_epoch_and_stream():
    seeds = {
        (rank, epoch, stream): epoch_seed(0, epoch, rank, stream)
        for rank in range(64)
        for epoch in range(200)
        for stream in (0, 1)
    }
    assert len(set(seeds.values())) == len(seeds)
    # Another run seed moves them all (low bits keep epoch, rank and stream).
    assert not set(seeds.values()) & {epoch_seed(1, e, r, 0) for e in range(200) for r in (0, 1)}
    with pytest.raises(ValueError, match="out of range"):
        epoch_seed(0, 0, 2**16, 0)


def test_no_two_ranks_or_epochs_of_the_loop_draw_the_same_numbers(tmp_path):
    """What the loop seeds per (rank, epoch): Python's, NumPy's and torch's global RNGs
    (augmentation) and the step's generator (jigsaw, crops). Ranks 0 and 1, 9 epochs: the
    earlier seeds gave rank 1's epoch 1 the numbers of rank 0's epoch 8."""
    draws = {}
    for rank in (0, 1):

        def step_fn(model, batch, generator, rank=rank):
            draws[rank, len([k for k in draws if k[0] == rank])] = (
                random.random(),
                float(np.random.rand()),
                float(torch.rand(())),
                float(torch.rand((), generator=generator)),
            )
            return (model.w * 0).sum(), {"loss": 0.0}

        loop = weights_spec([{"image": torch.zeros(1, 4)}], step_fn, epochs=9)
        run_loop(loop, tmp_path / f"rank{rank}.pt", Runtime(CPU, rank=rank), quiet=True)
    assert len(draws) == 18
    for stream in range(4):
        values = [draw[stream] for draw in draws.values()]
        assert len(set(values)) == len(values), stream


def test_two_process_ddp_stage3_matches_one_process(tmp_path):
    """2 ranks under torchrun (gloo) against one process on the same global batches, after
    2 optimizer steps of stage 3 (all heads, Nesterov SGD, cosine schedule).

    Tolerance: 1e-5 absolute + 1e-5 relative on every parameter. DDP all-reduces each
    rank's gradient divided by 2 where one process sums the two halves' gradients of the
    mean loss: the same numbers up to float32 rounding; measured, the parameters differ by
    at most 1.2e-7. Both sides run one thread: with two in the reference, other conv
    kernels round differently, and max pooling routes the gradient to another position
    wherever two activations were nearly tied (measured: 1.3e-4 on stem.0.weight). A
    wrong DDP moves parameters by far more than the tolerance (measured: stepping on one
    rank's half alone 0.44, on the sum of the ranks' gradients instead of their mean 0.54).
    """
    result = run(
        torchrun_two(str(HERE / "ddp_stage3.py"), str(tmp_path)),
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)},
        timeout=300,
    )
    ddp = torch.load(tmp_path / "rank0.pt", weights_only=True)
    reference = spec(global_batches())
    with one_thread():
        history = run_loop(reference, tmp_path / "one.pt", Runtime(CPU), quiet=True)["history"]
    trained = dict(reference.model.named_parameters())
    initial = spec([]).model.state_dict()
    assert ddp["parameters"].keys() == trained.keys()
    moved = 0
    for name, value in ddp["parameters"].items():
        torch.testing.assert_close(value, trained[name].detach(), atol=1e-5, rtol=1e-5)
        moved += not torch.equal(value, initial[name])
    assert moved > 0.9 * len(trained), result.stdout  # training did happen
    assert ddp["history"][0]["loss"] == pytest.approx(history[0]["loss"], rel=1e-5)


@pytest.mark.parametrize(("major", "expected"), [(7, "fp32"), (8, "bf16"), (9, "bf16")])
def test_auto_precision_on_cuda_takes_bf16_only_where_native(monkeypatch, major, expected):
    """Compute capability 8+ (A100, H100) has bf16 units; a V100 or T4 (7.x) only emulates
    it, slower than fp32, though torch.cuda.is_bf16_supported() says True there."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major)
    )
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
    assert torch.cuda.is_bf16_supported()  # emulation counts by default
    assert resolve_precision("auto", torch.device("cuda")) == expected
    assert resolve_precision("fp16", torch.device("cuda")) == "fp16"
