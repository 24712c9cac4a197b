"""One node of a TrainJob: `iagn trainjob-node` (the trainer command of every node).

Reads what to run from NODE_SPEC_ENV, downloads the inputs into a local working folder,
then runs
    python -m torch.distributed.run --nnodes N --nproc-per-node P --node-rank R
        --master-addr A --master-port M --max-restarts K -m iagn.cli <argv>
with N, P, R, A, M from the PET_* variables Trainer's torch runtime sets on every node, and
`{name}` in argv replaced by the local paths. When the step succeeds, node 0 (rank 0 writes
every output) uploads the outputs and then the done marker. SIGTERM and SIGINT are passed on
to torchrun, which passes them to the workers (they save a partial checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from iagn.errors import IagnError
from iagn.train.scale import run_forwarding_signals, torchrun_command
from iagn.trainjob import manifest as m
from iagn.trainjob.staging import Store

# What Trainer's torch runtime sets on every node (torchrun also reads them as its defaults).
PET_ENV = (
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
)


def read_spec(env=None) -> dict:
    env = os.environ if env is None else env
    text = env.get(m.NODE_SPEC_ENV)
    if not text:
        raise IagnError(
            f"{m.NODE_SPEC_ENV} is not set: `iagn trainjob-node` is the command of a TrainJob "
            "that iagn created (iagn.trainjob), not one to run by hand"
        )
    try:
        spec = json.loads(text)
    except ValueError as exc:
        raise IagnError(f"{m.NODE_SPEC_ENV} is not JSON: {exc}") from None
    if not isinstance(spec, dict) or spec.get("format") != m.NODE_SPEC_FORMAT:
        raise IagnError(f"{m.NODE_SPEC_ENV} is not an {m.NODE_SPEC_FORMAT} spec")
    return spec


def launcher_env(env=None) -> dict[str, str]:
    env = os.environ if env is None else env
    missing = [name for name in PET_ENV if not env.get(name)]
    if missing:
        raise IagnError(
            f"{', '.join(missing)} not set: the TrainJob's runtime must be a Kubeflow Trainer "
            "torch runtime (mlPolicy.torch), which sets them on every node"
        )
    return {name: env[name] for name in PET_ENV}


def placement(pet: dict[str, str]) -> list[str]:
    """torchrun's arguments for this node's place in the TrainJob, from Trainer's PET_*."""
    return [
        f"--nnodes={pet['PET_NNODES']}",
        f"--nproc-per-node={pet['PET_NPROC_PER_NODE']}",
        f"--node-rank={pet['PET_NODE_RANK']}",
        f"--master-addr={pet['PET_MASTER_ADDR']}",
        f"--master-port={pet['PET_MASTER_PORT']}",
    ]


def run_node(workdir: Path) -> int:
    """Run this node's share of the step; the exit code of torchrun (0: done)."""
    spec = read_spec()
    pet = launcher_env()
    rank = int(pet["PET_NODE_RANK"])
    store = Store(spec["prefix"])
    workdir = Path(workdir)
    print(f"node {rank}: inputs from {store.shown}", flush=True)
    paths = store.fetch_inputs(spec["inputs"], workdir / "inputs")
    folders = {}
    for name, filename in spec["outputs"].items():
        folder = workdir / "outputs" / name
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        folders[name] = folder
        paths[name] = folder / filename
    argv = m.substitute(spec["argv"], paths)
    command = torchrun_command(argv, placement(pet), spec.get("max_restarts", 0))
    print(f"node {rank}: {' '.join(command[1:])}", flush=True)
    code, _ = run_forwarding_signals(command)
    if code != 0:
        print(f"node {rank}: torchrun exited with {code}", file=sys.stderr, flush=True)
        return code
    if rank == 0:
        store.push_outputs(folders)
        print(f"node 0: outputs uploaded to {store.shown}/outputs", flush=True)
    return 0
