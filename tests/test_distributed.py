"""Training under torchrun with DDP (gloo, 2 CPU processes): loss goes down, rank 0 writes."""

from __future__ import annotations

from pathlib import Path

import yaml
from helpers import run, torchrun_stage1
from test_training import tiny_params

from iagn.checkpoint import load_checkpoint


def test_two_process_ddp_training(tiny_synth: Path, tmp_path: Path):
    params = tiny_params(tiny_synth, epochs=6)
    params["train"].update(
        batch_size=2, attention_crop_fraction=0.5, lr_head=0.01, lr_backbone=0.005
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
    losses = [row["loss"] for row in checkpoint["history"]]
    assert len(losses) == 6
    assert sum(losses[-2:]) < sum(losses[:2]), losses
