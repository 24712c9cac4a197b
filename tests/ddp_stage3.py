"""Stage-3 training of a tiny IAGN through `run_loop`, the same under DDP and in one process.

Under torchrun (`python -m torch.distributed.run --nproc-per-node 2 tests/ddp_stage3.py OUT`)
each rank trains on its half of every global batch and rank 0 saves its parameters and the
loop's history to OUT. tests/test_loop.py runs the single-process reference in-process with
the same pieces: the whole global batch per step, computed as the two ranks compute it.

Why the reference splits the batch: DDP averages the ranks' gradients, but BatchNorm
normalizes each rank's half with that half's statistics and `stage_step` divides each half
among the granularities on its own; so "the same global batch" in one process is the two
halves' forward passes, each with its rank's random draws, and the mean of their losses.
One backward of that mean gives the gradient DDP's all-reduce gives, the same clipping and
optimizer step follow in `run_loop`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from iagn.models.iagn import IAGN, ModelConfig
from iagn.train.config import StageConfig
from iagn.train.loop import LoopSpec, run_loop
from iagn.train.stage_step import stage_step

RANKS, PER_RANK, STEPS, CLASSES = 2, 4, 2, 4
JIGSAW = (8, 4, 2)
# No attention crops: they come from an eval-mode pass, i.e. from BN running statistics,
# which DDP takes from rank 0 (broadcast_buffers) and one process accumulates from both
# halves; training-mode passes use batch statistics only.
# Clipping runs (as in training) but never bites: a gradient of the wrong scale (a sum of the
# ranks' instead of their mean) then shows in the step.
CONFIG = StageConfig(
    stage=3, attention_crop_fraction=0.0, lr_head=0.05, lr_backbone=0.02, grad_clip=1e3
)


def global_batches() -> list[dict]:
    """STEPS batches of RANKS * PER_RANK images (64 px) with each rank's step seed."""
    generator = torch.Generator().manual_seed(11)
    return [
        {
            "image": torch.rand(RANKS * PER_RANK, 3, 64, 64, generator=generator),
            "label": torch.randint(0, CLASSES, (RANKS * PER_RANK,), generator=generator),
            "seed": torch.tensor([100 * step + rank for rank in range(RANKS)]),
        }
        for step in range(STEPS)
    ]


def rank_batches(rank: int) -> list[dict]:
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return [
        {"image": b["image"][rows], "label": b["label"][rows], "seed": b["seed"][rank : rank + 1]}
        for b in global_batches()
    ]


def step_on_halves(model, batch: dict, generator: torch.Generator):
    """`stage_step` on each rank's half of `batch` (one half under DDP), with that rank's
    own generator; the mean loss. (The loop's generator differs per rank by design.)"""
    losses, logs = [], {}
    for half, seed in enumerate(batch["seed"].tolist()):
        rows = slice(half * PER_RANK, (half + 1) * PER_RANK)
        loss, half_logs = stage_step(
            model,
            batch["image"][rows],
            batch["label"][rows],
            CONFIG,
            JIGSAW,
            torch.Generator().manual_seed(seed),
        )
        losses.append(loss)
        for key, value in half_logs.items():
            logs[key] = logs.get(key, 0.0) + value / len(batch["seed"])
    return sum(losses) / len(losses), logs


def spec(batches: list[dict]) -> LoopSpec:
    """A stage-3 LoopSpec as iagn/steps/train_stage.py builds it, over fixed `batches`."""
    torch.manual_seed(0)
    model = IAGN(ModelConfig(num_classes=CLASSES, stage_channels=16))
    return LoopSpec(
        model=model,
        param_groups=[
            {"params": model.backbone_parameters(), "lr": CONFIG.lr_backbone},
            {"params": model.head_parameters(), "lr": CONFIG.lr_head},
        ],
        epochs=1,
        momentum=CONFIG.momentum,
        weight_decay=CONFIG.weight_decay,
        warmup_epochs=0.0,
        grad_clip=CONFIG.grad_clip,
        precision="fp32",
        channels_last=True,
        seed=0,
        step_fn=step_on_halves,
        validate_fn=lambda trained: {},
        make_loader=lambda epoch: batches,
        payload=lambda: {"kind": "teacher", "stage": 3},
        description="ddp parity",
        ddp_find_unused=False,  # stage 3: every parameter gets a loss
    )


def main(out: Path) -> None:
    from iagn.train.distributed import init_runtime

    runtime = init_runtime("cpu")
    assert runtime.world_size == RANKS, runtime
    loop_spec = spec(rank_batches(runtime.rank))
    result = run_loop(loop_spec, out / "ddp.pt", runtime, quiet=True)
    if runtime.is_main:
        parameters = {k: p.detach().clone() for k, p in loop_spec.model.named_parameters()}
        torch.save({"parameters": parameters, "history": result["history"]}, out / "rank0.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
