"""params.yaml `distributed:`: the same `iagn` training command on several processes.

Real processes: `iagn train-stage` re-runs itself under torchrun (gloo, CPU) when
distributed.procs_per_node > 1, passes a SIGTERM on to the workers, and refuses bad scale
settings before anything trains.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from helpers import BIN, run
from test_training import tiny_params

from iagn.checkpoint import load_checkpoint
from iagn.errors import EXIT_PREEMPTED

ENV = {"OMP_NUM_THREADS": "1", "IAGN_TRACKING": "off"}
TRAIN = ["train-stage", "--stage", "1", "--params", "params.yaml", "--out", "out/s1.pt"]
TRAIN += ["--device", "cpu", "--quiet"]


def scaled_project(tmp_path: Path, data: Path, epochs: int = 1, **distributed) -> Path:
    params = tiny_params(data, epochs=epochs)
    params["train"]["batch_size"] = 2  # the global batch: one image per process
    params["distributed"] = distributed
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "out").mkdir()
    return tmp_path


def test_procs_per_node_runs_the_step_on_that_many_processes(tiny_synth, tmp_path):
    project = scaled_project(tmp_path, tiny_synth, procs_per_node=2)
    result = run([BIN / "iagn", *TRAIN], cwd=project, env=ENV)
    assert "2 processes under torchrun" in result.stderr
    assert result.stdout.count("stage 1 done") == 1  # rank 0 reports, once
    checkpoint = load_checkpoint(project / "out" / "s1.pt")
    assert checkpoint["complete"] and checkpoint["train_config"]["world_size"] == 2
    written = sorted(path.name for path in (project / "out").iterdir())
    assert written == ["s1.history.json", "s1.metrics.json", "s1.pt"]  # rank 0 only


def test_default_scale_trains_in_the_calling_process(tiny_synth, tmp_path):
    project = scaled_project(tmp_path, tiny_synth)  # an empty section: the defaults
    result = run([BIN / "iagn", *TRAIN], cwd=project, env=ENV)
    assert "torchrun" not in result.stderr
    assert load_checkpoint(project / "out" / "s1.pt")["train_config"]["world_size"] == 1


@pytest.mark.fault(
    "SIGTERM to a step that runs on several processes (distributed.procs_per_node > 1)",
    sees="exit code 143, as from one process; the rerun prints `resuming out/s1.pt.partial ...`",
    kept="every worker's state at the same batch in `<out>.partial` (torchrun passes the "
    "signal on); the finished epochs are kept, not retrained",
)
def test_sigterm_reaches_the_workers_and_the_rerun_resumes(tiny_synth, tmp_path):
    project = scaled_project(tmp_path, tiny_synth, epochs=10, procs_per_node=2)
    partial = project / "out" / "s1.pt.partial"
    log = (project / "log.txt").open("w")
    proc = subprocess.Popen(
        [BIN / "iagn", *TRAIN],
        cwd=project,
        env={**os.environ, **ENV},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert partial.exists(), (project / "log.txt").read_text()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == EXIT_PREEMPTED, (project / "log.txt").read_text()
    saved = load_checkpoint(partial)
    assert not saved["complete"] and saved["train_config"]["world_size"] == 2
    assert not (project / "out" / "s1.pt").exists()

    loud = [arg for arg in TRAIN if arg != "--quiet"]  # rank 0 says where it resumes
    result = run([BIN / "iagn", *loud], cwd=project, env=ENV)
    assert "resuming out/s1.pt.partial" in result.stdout
    finished = load_checkpoint(project / "out" / "s1.pt")
    assert finished["complete"] and len(finished["history"]) == 10
    assert finished["history"][: saved["epoch"]] == saved["history"]  # kept, not retrained


BAD_SCALE = {
    "no nodes": ({"nodes": 0}, "distributed.nodes must be a whole number of 1 or more"),
    "negative processes": ({"procs_per_node": -1}, "distributed.procs_per_node must be"),
    "processes as words": ({"procs_per_node": "two"}, "or auto (one per visible GPU)"),
    "a typo": ({"proc_per_node": 2}, "unknown key(s) proc_per_node"),
    "negative restarts": ({"max_restarts": -1}, "distributed.max_restarts must be 0 or more"),
    "several nodes here": ({"nodes": 2}, "needs a launcher on each"),
    "a batch 3 processes cannot share": (
        {"procs_per_node": 3},
        "is not divisible by the 3 processes (1 node x 3); use a multiple of 3",
    ),
}


# Every case for train-stage; distill shares the check (iagn.commands.common.run_scaled),
# so two of them show it is wired there too.
CASES = [("train-stage", case) for case in sorted(BAD_SCALE)]
CASES += [("distill", "several nodes here"), ("distill", "a batch 3 processes cannot share")]


@pytest.mark.fault(
    "a bad `distributed:` setting: 0 nodes, a negative or non-numeric process count, a "
    "misspelt key, several nodes outside Kubeflow Trainer, a batch the processes cannot share",
    sees="exit 2 before training: `params.yaml distributed.nodes must be a whole number of 1 "
    "or more, got 0` / `unknown key(s) proc_per_node; known: ...` / `... needs a launcher on "
    "each, which Kubeflow Trainer provides ...` / `params.yaml train.batch_size 2 is not "
    "divisible by the 3 processes (1 node x 3); use a multiple of 3 ...`",
    kept="everything: nothing trains, no output is written",
)
@pytest.mark.parametrize(("command", "case"), CASES)
def test_bad_scale_is_refused_before_training(case, command, tiny_synth, tmp_path):
    distributed, message = BAD_SCALE[case]
    project = scaled_project(tmp_path, tiny_synth, **distributed)
    if command == "distill":
        teacher = project / "teacher.pt"
        teacher.write_bytes(b"never read")  # refused before the teacher is opened
        argv = ["distill", "--teacher", teacher, "--params", "params.yaml"]
        argv += ["--out", "out/student.pt", "--device", "cpu"]
    else:
        argv = TRAIN
    result = run([BIN / "iagn", *argv], cwd=project, env=ENV, check=False)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert list((project / "out").iterdir()) == []  # nothing trained, nothing written
