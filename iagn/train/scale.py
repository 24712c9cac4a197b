"""How many processes a training step spans: the `distributed:` section of params.yaml.

One process (the default) runs the step in the caller's process, as always. Several
processes on one node re-run the same `iagn` command under `torchrun --nproc-per-node N`
(`torchrun_command`); several nodes need one launcher per node, which Kubeflow Trainer
provides (the pipeline's components create a TrainJob, `iagn.trainjob`). Under any launcher
`train.batch_size` and `distill.batch_size` stay the global batch: each of the W processes
takes batch_size / W of it, so scaling out does not change the recipe.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from iagn.errors import IagnError

DEFAULT_RUNTIME = "torch-distributed"
# Environment torchrun (torchelastic) sets in every worker it starts.
LAUNCHED_BY_TORCHRUN = "TORCHELASTIC_RUN_ID"


@dataclass(frozen=True)
class Scale:
    nodes: int = 1
    procs_per_node: int = 1
    runtime: str = DEFAULT_RUNTIME
    resources_per_node: dict[str, Any] = field(default_factory=dict)
    timeout_minutes: float = 1440.0
    max_restarts: int = 0
    storage_uri: str | None = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def on_trainer(self) -> bool:
        """Several nodes: a Kubeflow Trainer TrainJob runs the step."""
        return self.nodes > 1


def _count(section: Mapping[str, Any], key: str, default: int, gpus: int | None) -> int:
    value = section.get(key, default)
    if key == "procs_per_node" and value == "auto":
        return max(1, visible_gpus() if gpus is None else gpus)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        hint = " or auto (one per visible GPU)" if key == "procs_per_node" else ""
        raise IagnError(
            f"params.yaml distributed.{key} must be a whole number of 1 or more{hint}, "
            f"got {value!r}"
        )
    return value


def scale_from_params(params: Mapping[str, Any], gpus: int | None = None) -> Scale:
    """The checked `distributed:` section (absent: one process). `gpus` is what
    `procs_per_node: auto` counts (default: the GPUs this process sees)."""
    section = params.get("distributed") or {}
    if not isinstance(section, Mapping):
        raise IagnError("params.yaml `distributed` must be a mapping (see README)")
    unknown = sorted(set(section) - set(Scale.__dataclass_fields__))
    if unknown:
        raise IagnError(
            f"params.yaml distributed: unknown key(s) {', '.join(unknown)}; known: "
            + ", ".join(Scale.__dataclass_fields__)
        )
    runtime = section.get("runtime") or DEFAULT_RUNTIME
    resources = section.get("resources_per_node") or {}
    if not isinstance(resources, Mapping):
        raise IagnError(
            "params.yaml distributed.resources_per_node must be a mapping like "
            "{cpu: 8, memory: 64Gi, nvidia.com/gpu: 4}"
        )
    timeout = section.get("timeout_minutes", 1440)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise IagnError(
            f"params.yaml distributed.timeout_minutes must be a positive number, got {timeout!r}"
        )
    restarts = section.get("max_restarts", 0)
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
        raise IagnError(f"params.yaml distributed.max_restarts must be 0 or more, got {restarts!r}")
    return Scale(
        nodes=_count(section, "nodes", 1, gpus),
        procs_per_node=_count(section, "procs_per_node", 1, gpus),
        runtime=str(runtime),
        resources_per_node=dict(resources),
        timeout_minutes=float(timeout),
        max_restarts=restarts,
        storage_uri=section.get("storage_uri") or None,
    )


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def under_launcher() -> bool:
    """Whether this process is a worker that torchrun (or Trainer's torchrun) started."""
    return LAUNCHED_BY_TORCHRUN in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def torchrun_command(
    argv: Sequence[str], placement: Sequence[str], max_restarts: int = 0
) -> list[str]:
    """`iagn <argv>` under torchrun. `placement` says where the workers are: this node alone
    (`--standalone --nproc-per-node=N`, a c10d rendezvous on a free local port) or a
    TrainJob's node (`--nnodes`, `--node-rank`, `--master-addr`, ... from Trainer). After a
    worker fails, torchrun restarts the whole group up to `max_restarts` times; each restart
    resumes from the last epoch's partial checkpoint."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *placement,
        f"--max-restarts={int(max_restarts)}",
        "-m",
        "iagn.cli",
        *argv,
    ]


def run_forwarding_signals(command: Sequence[str]) -> tuple[int, list[int]]:
    """Run `command`, passing SIGTERM and SIGINT sent to this process on to it (Kubernetes and
    a user's Ctrl-C signal only this process): its exit code and the signals passed on."""
    import signal
    import subprocess

    process = subprocess.Popen(list(command))
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return process.wait(), received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_under_torchrun(scale: Scale, argv: Sequence[str]) -> int:
    """Run `iagn <argv>` under torchrun on this node and return its exit code.

    SIGTERM and SIGINT reach torchrun, which passes them to every worker, and the workers
    save a checkpoint at the same batch (`iagn.train.loop`). torchrun itself then exits 1,
    so a forwarded SIGTERM ends this process with EXIT_PREEMPTED, the code the
    single-process step uses."""
    import signal

    from iagn.errors import EXIT_PREEMPTED

    if scale.on_trainer:
        raise IagnError(
            f"distributed.nodes is {scale.nodes}: a step on several nodes needs a launcher on "
            "each, which Kubeflow Trainer provides: run it through the KFP pipeline (README "
            '"Training on several GPUs and nodes"), or start `torchrun --nnodes` on every '
            "node yourself; for this machine alone set distributed.nodes: 1"
        )
    placement = ["--standalone", f"--nproc-per-node={scale.procs_per_node}"]
    code, received = run_forwarding_signals(torchrun_command(argv, placement, scale.max_restarts))
    if signal.SIGTERM in received and code != 0:
        return EXIT_PREEMPTED
    return code
