"""Training under torchrun with DDP (gloo, 2 CPU processes): loss goes down, rank 0 writes;
batch_size is the global batch, split evenly over the processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import run, torchrun_stage1
from test_training import tiny_params
from torch.utils.data import DataLoader

from iagn.checkpoint import load_checkpoint, save_checkpoint
from iagn.errors import IagnError
from iagn.train.config import process_batch_size
from iagn.train.data import ShardedGlobalBatches, global_order, loader_seed
from iagn.train.loop import LoopSpec, _resume_state, resume_identity


def test_two_process_ddp_training(tiny_synth: Path, tmp_path: Path):
    params = tiny_params(tiny_synth, epochs=6)
    # The global batch: 2 images per process and step, 2 steps per epoch.
    params["train"].update(
        batch_size=4, attention_crop_fraction=0.5, lr_head=0.01, lr_backbone=0.005
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run(
        torchrun_stage1("-m", "iagn.cli"),
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.stdout.count("stage 1 done") == 1  # only rank 0 reports
    # Only rank 0 writes: the checkpoint and its history/metrics files, nothing per rank.
    written = sorted(p.name for p in out_dir.iterdir())
    assert written == ["s1.history.json", "s1.metrics.json", "s1.pt"]
    checkpoint = load_checkpoint(out_dir / "s1.pt")
    assert checkpoint["train_config"]["world_size"] == 2
    assert checkpoint["train_config"]["process_batch_size"] == 2
    assert checkpoint["train_config"]["batch_size"] == 4
    assert checkpoint["step"] == 6 * 2  # 8 images / global batch 4, per epoch
    losses = [row["loss"] for row in checkpoint["history"]]
    assert len(losses) == 6
    assert sum(losses[-2:]) < sum(losses[:2]), losses


@pytest.mark.parametrize(("size", "batch"), [(8, 4), (13, 4), (100, 12), (6, 8)])
@pytest.mark.parametrize("world", [2, 4])
def test_the_ranks_batches_join_into_one_process_batches(size, batch, world):
    """Joined in rank order, the ranks' k-th batches are one process's k-th batch."""
    seed = loader_seed(seed=3, epoch=5)
    one = DataLoader(
        list(range(size)),
        batch_size=batch,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        drop_last=size > batch,
    )
    expected = [b.tolist() for b in one]
    if size < batch:  # one batch of all images; W processes take a multiple of W of them
        expected = [expected[0][: size - size % world]]
    shards = [list(ShardedGlobalBatches(size, batch, r, world, seed)) for r in range(world)]
    assert all(len(shard) == len(expected) for shard in shards)
    joined = [[i for shard in shards for i in shard[k]] for k in range(len(expected))]
    assert joined == expected
    assert [len(b) for b in shards[0]] == [len(b) // world for b in expected]
    assert global_order(size, seed) == [
        int(i)
        for i in DataLoader(
            list(range(size)), shuffle=True, generator=torch.Generator().manual_seed(seed)
        )
    ]


def test_a_batch_that_does_not_split_says_what_to_set():
    assert process_batch_size(32, 4, "train.batch_size", nodes=2) == 8
    assert process_batch_size(30, 1, "train.batch_size") == 30
    with pytest.raises(IagnError) as error:
        process_batch_size(30, 4, "train.batch_size", nodes=2)
    assert (
        "train.batch_size 30 is not divisible by the 4 processes (2 nodes x 2); use a "
        "multiple of 4" in str(error.value)
    )
    with pytest.raises(IagnError, match=r"distill.batch_size 2 .*\(1 node x 4\).*at least 4"):
        process_batch_size(2, 4, "distill.batch_size")


def spec_with(payload: dict) -> LoopSpec:
    return LoopSpec(
        model=torch.nn.Linear(1, 1),
        param_groups=[],
        epochs=2,
        momentum=0.9,
        weight_decay=0.0,
        warmup_epochs=0.0,
        grad_clip=0.0,
        precision="fp32",
        channels_last=False,
        seed=0,
        step_fn=None,
        validate_fn=None,
        make_loader=None,
        payload=lambda: payload,
    )


def test_the_resume_identity_leaves_out_the_number_of_processes(tmp_path):
    payload = {"kind": "teacher", "stage": 1, "train_config": {"batch_size": 8, "seed": 0}}
    two = {
        **payload,
        "train_config": {"batch_size": 8, "seed": 0, "world_size": 2, "process_batch_size": 4},
    }
    one = {
        **payload,
        "train_config": {"batch_size": 8, "seed": 0, "world_size": 1, "process_batch_size": 8},
    }
    other_batch = {**one, "train_config": {**one["train_config"], "batch_size": 16}}
    assert resume_identity(two) == resume_identity(one) != resume_identity(other_batch)

    partial = tmp_path / "s1.pt.partial"
    saved = {**two, "epoch": 1, "step": 2, "history": [{}], "complete": False}
    save_checkpoint(partial, saved)
    # Saved at an epoch's end by 2 processes: one process with the same global batch resumes.
    assert _resume_state(partial, spec_with(one), world_size=1)["epoch"] == 1
    assert _resume_state(partial, spec_with(other_batch), world_size=1) is None
    # Saved mid-epoch by 2 processes: refused under another number, resumed under 2.
    mid = {"batch": 1, "seconds": 1.0, "ranks": [{"seen": 4}, {"seen": 4}]}
    save_checkpoint(partial, {**saved, "mid_epoch": mid})
    with pytest.raises(IagnError, match=r"stopped after batch 1 by 2 process\(es\); this run"):
        _resume_state(partial, spec_with(one), world_size=1)
    assert _resume_state(partial, spec_with(two), world_size=2)["mid_epoch"] == mid
