"""SIGTERM during training: a save at the next batch boundary, exit code 143, an exact resume.

Real signals throughout: sent by the step itself (in-process, to hit chosen batches), and to
real `iagn train-stage` and `torchrun` processes once their first epoch is saved (wherever
it then lands: the assertions hold for any batch). Every run uses one CPU thread, so the
in-process uninterrupted run and the subprocesses compute bit for bit the same numbers.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import BIN, run, torchrun_stage1
from test_training import tiny_params

import iagn.steps.train_stage as train_stage_module
from iagn.checkpoint import load_checkpoint
from iagn.errors import EXIT_PREEMPTED, Preempted
from iagn.steps import train_stage

STOPPED = re.compile(
    r"stopped by SIGTERM after epoch (\d+) batch (\d+); saved (\S+); "
    r"rerun the same command to resume"
)
EPOCHS = 3
BATCHES = 8  # 8 training images at batch size 1; torchrun's 2 ranks: 4 each of global batch 2
ENV = {"OMP_NUM_THREADS": "1", "IAGN_TRACKING": "off"}
# Differ between an interrupted and an uninterrupted run by nature.
TIMING = {"images_per_s", "epoch_seconds"}


def preempt_params(data: Path, epochs: int = EPOCHS, processes: int = 1) -> dict:
    """One image per process and step: batch_size is the global batch of `processes`."""
    params = tiny_params(data, epochs=epochs)
    # Attention crops and jigsaw draws use the step's generator, augmentation the global
    # RNG: a resume must restore both mid-epoch.
    params["train"].update(batch_size=processes, attention_crop_fraction=0.5)
    return params


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def straight(tiny_synth: Path, tmp_path_factory) -> dict:
    """The uninterrupted run every resumed run must end equal to."""
    out = tmp_path_factory.mktemp("straight") / "s1.pt"
    with one_thread():
        train_stage.run(1, None, preempt_params(tiny_synth), out, device="cpu", quiet=True)
    return load_checkpoint(out)


def assert_same_training(resumed: dict, straight: dict) -> None:
    """Bit-identical weights and per-epoch numbers (measured: CPU fp32 resumes exactly)."""
    assert resumed["complete"] and resumed["epoch"] == straight["epoch"]
    assert resumed["step"] == straight["step"]
    for key, value in straight["model_state"].items():
        assert torch.equal(value, resumed["model_state"][key]), key
    for before, after in zip(straight["history"], resumed["history"], strict=True):
        assert {k: v for k, v in before.items() if k not in TIMING} == {
            k: v for k, v in after.items() if k not in TIMING
        }


def assert_partial_matches(partial: Path, epoch: int, batch: int, world_size: int = 1) -> dict:
    """The partial a stop 'after epoch `epoch` batch `batch`' left: mid-epoch state with the
    batch reached, or the finished epoch when the stop came after its last batch."""
    saved = load_checkpoint(partial)
    assert not saved["complete"]
    assert saved["train_config"]["world_size"] == world_size
    mid = saved.get("mid_epoch")
    if mid is None:  # stopped at the end of epoch `epoch`, after its validation
        assert saved["epoch"] == epoch and len(saved["history"]) == epoch
    else:
        assert saved["epoch"] == epoch - 1 and mid["batch"] == batch
        assert len(mid["ranks"]) == world_size
        for rank in mid["ranks"]:
            assert set(rank) == {"rng", "generator", "sums", "seen"}
            assert rank["seen"] == batch  # one image per process and step
            assert rank["sums"]["loss"] > 0
    return saved


@pytest.mark.fault(
    "SIGTERM during training (a preempted node, `kubectl delete pod`, a DVC or KFP stop), "
    "also under torchrun",
    sees="exit code 143: `stopped by SIGTERM after epoch E batch B; saved out/s1.pt.partial; "
    "rerun the same command to resume`; every torchrun rank stops at the same batch",
    kept="`--out` untouched; the epoch in progress up to that batch in `<out>.partial`; the "
    "rerun ends bit for bit as an uninterrupted run",
)
def test_sigterm_saves_mid_epoch_and_the_rerun_ends_bit_identical(
    tiny_synth, tmp_path, monkeypatch, capsys, straight
):
    real_step = train_stage_module.stage_step
    calls = {"n": 0}
    # Step n of the run (counted across the reruns) receives SIGTERM while it computes:
    # step 3 is in the middle of epoch 1; step 16 is the last batch of epoch 2, after which
    # the run stops before validating.
    signal_at = {3, 2 * BATCHES}

    def step_receiving_sigterm(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] in signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_stage_module, "stage_step", step_receiving_sigterm)
    params, out = preempt_params(tiny_synth), tmp_path / "s1.pt"
    partial = tmp_path / "s1.pt.partial"
    handler = signal.getsignal(signal.SIGTERM)

    for epoch, batch in ((1, 3), (2, BATCHES)):
        with one_thread(), pytest.raises(Preempted) as stopped:
            train_stage.run(1, None, params, out, device="cpu", quiet=True)
        assert stopped.value.code == EXIT_PREEMPTED == 143
        line = f"after epoch {epoch} batch {batch}; saved {partial}; rerun the same command"
        assert line in str(stopped.value)
        assert capsys.readouterr().err.count("stopped by SIGTERM") == 1
        assert signal.getsignal(signal.SIGTERM) is handler  # the loop put it back
        assert not out.exists()  # downstream never sees a half-trained model
        saved = assert_partial_matches(partial, epoch, batch)
        assert "mid_epoch" in saved and saved["step"] == calls["n"]

    with one_thread():
        train_stage.run(1, None, params, out, device="cpu", quiet=True)
    assert calls["n"] == EPOCHS * BATCHES  # no batch computed twice, none skipped
    assert not partial.exists()
    assert_same_training(load_checkpoint(out), straight)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited ({proc.returncode}) before writing {path}"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


def start(args: list, cwd: Path) -> tuple[subprocess.Popen, Path]:
    """A process with stdout and stderr in one file (tqdm never fills a pipe)."""
    log = cwd / f"log-{time.monotonic_ns()}.txt"
    env = {**os.environ, **ENV, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [str(a) for a in args], cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    return proc, log


def sigterm_after_first_epoch(proc: subprocess.Popen, partial: Path) -> float:
    """SIGTERM once epoch 1 is saved (epoch 2 is then starting); seconds until the exit."""
    wait_for(partial, proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    return time.monotonic() - sent


@pytest.mark.fault(
    "SIGTERM during training (a preempted node, `kubectl delete pod`, a DVC or KFP stop), "
    "also under torchrun",
    sees="exit code 143: `stopped by SIGTERM after epoch E batch B; saved out/s1.pt.partial; "
    "rerun the same command to resume`; every torchrun rank stops at the same batch",
    kept="`--out` untouched; the epoch in progress up to that batch in `<out>.partial`; the "
    "rerun ends bit for bit as an uninterrupted run",
)
def test_sigterm_to_train_stage_exits_143_and_the_rerun_resumes(tiny_synth, tmp_path, straight):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(preempt_params(tiny_synth)))
    command = [BIN / "iagn", "train-stage", "--stage", "1", "--params", "params.yaml"]
    command += ["--out", "out/s1.pt", "--device", "cpu"]
    partial = tmp_path / "out" / "s1.pt.partial"
    proc, log = start(command, tmp_path)
    seconds = sigterm_after_first_epoch(proc, partial)
    output = log.read_text()
    assert proc.returncode == EXIT_PREEMPTED, output
    # The batch in progress and one save, well within Kubernetes' default 30 s grace period.
    assert seconds < 30, output
    stops = STOPPED.findall(output)
    assert len(stops) == 1, output
    epoch, batch, saved_to = int(stops[0][0]), int(stops[0][1]), stops[0][2]
    assert saved_to == "out/s1.pt.partial" and 1 <= batch <= BATCHES and epoch >= 1
    assert_partial_matches(partial, epoch, batch)
    assert not (tmp_path / "out" / "s1.pt").exists()

    rerun = run(command, cwd=tmp_path, env=ENV)
    assert "resuming out/s1.pt.partial" in rerun.stdout
    assert "stage 1 done" in rerun.stdout and not partial.exists()
    assert_same_training(load_checkpoint(tmp_path / "out" / "s1.pt"), straight)


# torchrun runs this instead of `-m iagn.cli` to see each rank's exit code (torchrun reports
# none once it was itself signalled); POISON_RANK makes that rank's loss NaN from step 3 on.
RANK_SCRIPT = """
import os, sys
import iagn.steps.train_stage as module
from iagn.cli import main

if os.environ.get("POISON_RANK") == os.environ["RANK"]:
    real, calls = module.stage_step, [0]

    def poisoned(*args, **kwargs):
        loss, logs = real(*args, **kwargs)
        calls[0] += 1
        return (loss * float("nan") if calls[0] >= 3 else loss), logs

    module.stage_step = poisoned
code = main(sys.argv[1:])
with open(f"exit-{os.environ['RANK']}", "w") as file:
    file.write(str(code))
sys.exit(code)
"""


@pytest.mark.fault(
    "SIGTERM during training (a preempted node, `kubectl delete pod`, a DVC or KFP stop), "
    "also under torchrun",
    sees="exit code 143: `stopped by SIGTERM after epoch E batch B; saved out/s1.pt.partial; "
    "rerun the same command to resume`; every torchrun rank stops at the same batch",
    kept="`--out` untouched; the epoch in progress up to that batch in `<out>.partial`; the "
    "rerun ends bit for bit as an uninterrupted run",
)
def test_sigterm_to_torchrun_stops_every_rank_at_the_same_batch(tiny_synth, tmp_path):
    params = preempt_params(tiny_synth, processes=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    partial = tmp_path / "out" / "s1.pt.partial"
    proc, log = start(torchrun_stage1("rank.py"), tmp_path)
    seconds = sigterm_after_first_epoch(proc, partial)
    output = log.read_text()
    # torchrun forwards SIGTERM to the workers and SIGKILLs them after its 30 s shutdown
    # timeout: both left on their own, with 143, rank 0 after saving and saying so once.
    assert seconds < 60 and "forcefully exiting" not in output, output
    assert proc.returncode == 1  # torchrun's own: it raises on the signal (README says so)
    exits = {rank: (tmp_path / f"exit-{rank}").read_text() for rank in (0, 1)}
    assert exits == {0: "143", 1: "143"}, output
    stops = STOPPED.findall(output)
    assert len(stops) == 1, output
    epoch, batch = int(stops[0][0]), int(stops[0][1])
    assert 1 <= batch <= BATCHES // 2 and epoch >= 1
    saved = assert_partial_matches(partial, epoch, batch, world_size=2)
    assert saved["train_config"]["process_batch_size"] == 1

    if "mid_epoch" in saved:
        # A mid-epoch partial holds 2 ranks' places in the data: one process refuses it.
        before = partial.read_bytes()
        alone = [BIN / "iagn", "train-stage", "--stage", "1", "--params", "params.yaml"]
        alone += ["--out", "out/s1.pt", "--device", "cpu"]
        refused = run(alone, cwd=tmp_path, env=ENV, check=False)
        assert refused.returncode == 2, refused.stderr
        assert "by 2 process(es); this run has 1" in refused.stderr
        assert "rerun with 2 process(es)" in refused.stderr
        assert partial.read_bytes() == before  # untouched

    rerun = run(torchrun_stage1("-m", "iagn.cli"), cwd=tmp_path, env=ENV)
    assert rerun.stdout.count("resuming out/s1.pt.partial") == 1
    assert rerun.stdout.count("stage 1 done") == 1 and not partial.exists()
    finished = load_checkpoint(tmp_path / "out" / "s1.pt")
    assert finished["complete"] and len(finished["history"]) == EPOCHS
    assert finished["step"] == EPOCHS * BATCHES // 2


def test_a_nan_loss_on_one_rank_stops_every_rank(tiny_synth, tmp_path):
    """Before, the rank with the NaN raised alone and the other waited forever in its next
    collective; now they agree on it first and all exit with the user-error code."""
    params = preempt_params(tiny_synth, epochs=1, processes=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    result = run(
        torchrun_stage1("rank.py"),
        cwd=tmp_path,
        env={**ENV, "POISON_RANK": "1"},
        check=False,
        timeout=300,  # a hang would last gloo's 30 minutes
    )
    output = result.stdout + result.stderr
    exits = {rank: (tmp_path / f"exit-{rank}").read_text() for rank in (0, 1)}
    assert exits == {0: "2", 1: "2"}, output
    assert "loss became nan at epoch 1, step 3" in output
    assert "loss became non-finite on another rank at epoch 1, step 3" in output
    assert "no epoch finished, so nothing was saved" in output
    assert not (tmp_path / "out" / "s1.pt").exists()
