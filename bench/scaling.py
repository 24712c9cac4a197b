"""Scaling out: the same training work on 1 process, 2 processes on one node, 2 nodes.

Every arm does the same work: `--steps` timed optimizer steps (after `--warmup` untimed
ones) of the stage-3 training step (iagn/train/stage_step.py, under DDP like
iagn/train/loop.py, Nesterov SGD, gradient clipping) on the same global batch, which the W
processes split (`train.batch_size` semantics: each takes batch / W). Random images, no
data loading: what is measured is compute plus DDP's gradient all-reduce.

Arms, each a fresh launch, interleaved over `--repeats` rounds (so a change of load hits
all alike); an arm's figure is the median over rounds of each round's median step:
  - `1 process`: one process, alone;
  - `1 node x 2`: `torchrun --standalone --nproc-per-node 2` (c10d on this machine);
  - `2 nodes x 1`: two torchrun launchers started separately (`--nnodes 2`, a c10d
    rendezvous on 127.0.0.1), each one node of one process.
On a CPU, OMP_NUM_THREADS is set so that the arm's processes together use every core
(cores / W threads each). Scaling efficiency = throughput_W / (W x throughput_1): 1.0 is
perfect, W processes each twice as slow per image give 0.5.

    python -m bench.scaling                   # CPU: the smoke model at 64 px, batch 8
    python -m bench.scaling --recipe paper    # GPUs: configs/cub.yaml (ResNet-50, 448 px,
                                              # batch 16) on 1 GPU, then on all of them

`--recipe paper` times the GPU recipe on one GPU, then on every visible GPU of this node
(torchrun --nproc-per-node N, NCCL), and records the GPU's name; results go to
scaling_paper.{json,md}. `--device cpu` runs that plan on the CPU (1, then `--processes`
processes), which is how the tests exercise it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from bench.common import (
    REPO,
    load_average,
    load_line,
    machine,
    machine_line,
    markdown_table,
    write_results,
)

CLASSES = 200
SMOKE = REPO / "configs" / "smoke.yaml"
PAPER = REPO / "configs" / "cub.yaml"
# What each recipe times unless flags say otherwise.
RECIPES = {
    "cpu": {"backbone": None, "px": 64, "batch_size": 8, "precision": "fp32", "steps": 10},
    "paper": {"backbone": None, "px": None, "batch_size": None, "precision": "auto", "steps": 20},
}


def recipe_params(recipe: str) -> dict:
    from iagn.params import load_params

    params = load_params(PAPER) if recipe == "paper" else load_params(REPO / "params.yaml", SMOKE)
    params["model"]["weights"] = "none"  # random weights: throughput does not depend on them
    return params


def settings_of(args: argparse.Namespace) -> dict:
    """The recipe's settings with the flags' overrides: what every arm times."""
    params = recipe_params(args.recipe)
    defaults = RECIPES[args.recipe]
    return {
        "recipe": args.recipe,
        "config": str((PAPER if args.recipe == "paper" else SMOKE).relative_to(REPO)),
        "backbone": args.backbone or defaults["backbone"] or params["model"]["backbone"],
        "stage_channels": params["model"]["stage_channels"],
        "image_px": args.px or defaults["px"] or params["data"]["crop"],
        "batch_size": args.batch_size or defaults["batch_size"] or params["train"]["batch_size"],
        "precision": args.precision or defaults["precision"],
        "classes": CLASSES,
        "steps": args.steps or defaults["steps"],
        "warmup": args.warmup,
    }


# ----------------------------------------------------------------------------- worker


def worker(settings: dict, device_choice: str, out: Path) -> None:
    """Time the steps on this process (one rank of a torchrun launch, or alone); rank 0
    writes {"seconds": [...], ...} to `out`."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from bench.common import device_name, sgd
    from iagn.evaluation.speed import timed
    from iagn.models.iagn import IAGN
    from iagn.precision import autocast, resolve_precision
    from iagn.train.config import model_config, process_batch_size, stage_config
    from iagn.train.distributed import init_runtime
    from iagn.train.stage_step import stage_step

    runtime = init_runtime(device_choice)
    device = runtime.device
    params = recipe_params(settings["recipe"])
    params["model"]["backbone"] = settings["backbone"]
    config = stage_config(params, 3)
    per_process = process_batch_size(
        settings["batch_size"], runtime.world_size, "--batch-size", nodes=runtime.nodes
    )
    precision = resolve_precision(settings["precision"], device)
    torch.manual_seed(0)  # the same initial weights on every rank (DDP checks the shapes)
    names = [f"class_{k}" for k in range(CLASSES)]
    model = IAGN(model_config(params, CLASSES, names)).to(device)
    model.train()
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    wrapped = model
    if runtime.distributed:
        ids = [device.index] if device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=ids)
    optimizer = sgd(model, params["train"])
    generator = torch.Generator().manual_seed(runtime.rank)
    px = settings["image_px"]
    images = torch.randn(per_process, 3, px, px, generator=generator).to(device)
    labels = torch.randint(0, CLASSES, (per_process,), generator=generator).to(device)
    if config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with autocast(precision, device):
            loss, _ = stage_step(wrapped, images, labels, config, model.config.jigsaw, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()

    for _ in range(settings["warmup"]):
        step()
    seconds = [timed(step, device) for _ in range(settings["steps"])]
    if runtime.is_main:
        report = {
            "seconds": seconds,
            "world_size": runtime.world_size,
            "nodes": runtime.nodes,
            "process_batch_size": per_process,
            "threads_per_process": torch.get_num_threads(),
            "device": device_name(device),
            "precision": precision,
        }
        out.write_text(json.dumps(report))
    if runtime.distributed:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- launcher


def worker_argv(settings: dict, device: str, out: Path) -> list[str]:
    argv = ["-m", "bench.scaling", "--worker", "--recipe", settings["recipe"]]
    argv += ["--backbone", settings["backbone"], "--px", str(settings["image_px"])]
    argv += ["--batch-size", str(settings["batch_size"]), "--precision", settings["precision"]]
    argv += ["--steps", str(settings["steps"]), "--warmup", str(settings["warmup"])]
    return [*argv, "--device", device, "--worker-out", str(out)]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def arm_commands(nodes: int, procs: int, entry: list[str]) -> list[list[str]]:
    """The launcher command(s) of an arm: one plain process, one torchrun on this node, or
    one torchrun per node meeting in a c10d rendezvous on 127.0.0.1."""
    if nodes == 1 and procs == 1:
        return [[sys.executable, *entry]]
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    if nodes == 1:
        return [[*torchrun, "--standalone", f"--nproc-per-node={procs}", *entry]]
    port, run_id = free_port(), uuid.uuid4().hex[:8]
    return [
        [
            *torchrun,
            f"--nnodes={nodes}",
            f"--nproc-per-node={procs}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            f"--rdzv-id={run_id}",
            f"--rdzv-conf=is_host={int(node == 0)}",
            "--local-addr=127.0.0.1",
            *entry,
        ]
        for node in range(nodes)
    ]


def run_arm(
    nodes: int, procs: int, settings: dict, device: str, threads: int, folder: Path
) -> dict:
    """One launch of an arm; the rank-0 report."""
    out = folder / f"report-{uuid.uuid4().hex[:8]}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "IAGN_TRACKING": "off"}
    logs, launchers = [], []
    for command in arm_commands(nodes, procs, worker_argv(settings, device, out)):
        log = folder / f"launcher-{len(logs)}-{uuid.uuid4().hex[:6]}.log"
        logs.append(log)
        with open(log, "w") as sink:
            launchers.append(
                subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
            )
    codes = [launcher.wait(timeout=3600) for launcher in launchers]
    if any(codes) or not out.is_file():
        shown = "\n".join(log.read_text()[-3000:] for log in logs)
        raise SystemExit(f"arm {nodes} node(s) x {procs} failed ({codes}):\n{shown}")
    return json.loads(out.read_text())


def plan(args: argparse.Namespace) -> tuple[list[tuple[str, int, int]], str, int]:
    """[(arm name, nodes, processes per node)], the workers' device and the cores (CPU) or
    GPUs the arms share."""
    if args.recipe == "paper" and args.device != "cpu":
        from iagn.train.scale import visible_gpus

        gpus = visible_gpus()
        if gpus == 0:
            raise SystemExit(
                "--recipe paper times GPUs and this machine has none visible; run it on a "
                "GPU node, or pass --device cpu to run its plan on the CPU"
            )
        arms = [("1 GPU", 1, 1)]
        if gpus > 1:
            arms.append((f"1 node x {gpus} GPUs", 1, gpus))
        return arms, "cuda", gpus
    cores = os.cpu_count() or 1
    many = args.processes
    if args.recipe == "paper":  # --device cpu: the paper plan on processes instead of GPUs
        return [("1 process", 1, 1), (f"1 node x {many}", 1, many)], "cpu", cores
    arms = [("1 process", 1, 1), (f"1 node x {many}", 1, many), (f"{many} nodes x 1", many, 1)]
    return arms, "cpu", cores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="cpu")
    parser.add_argument("--backbone", default=None, help="(cpu: params.yaml's; paper: resnet50)")
    parser.add_argument("--px", type=int, default=None, help="image size (cpu: 64, paper: 448)")
    parser.add_argument("--batch-size", type=int, default=None, help="the global batch")
    parser.add_argument("--precision", default=None, help="(cpu: fp32, paper: auto)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per launch")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="launches per arm")
    parser.add_argument("--processes", type=int, default=2, help="W of the CPU arms")
    parser.add_argument("--device", default="auto", help="cpu: run a GPU plan on the CPU")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = settings_of(args)
    if args.worker:
        worker(settings, args.device, args.worker_out)
        return

    arms, device, shared = plan(args)
    load_start = load_average()
    rounds: dict[str, list[dict]] = {name: [] for name, _, _ in arms}
    with tempfile.TemporaryDirectory(prefix="iagn-scaling-") as folder:
        for round_ in range(args.repeats):
            for name, nodes, procs in arms:
                world = nodes * procs
                # The cores split among the arm's processes (on GPUs: among the node's).
                cores = shared if device == "cpu" else os.cpu_count() or 1
                threads = max(1, cores // world)
                report = run_arm(nodes, procs, settings, device, threads, Path(folder))
                report["launch_median_s"] = statistics.median(report["seconds"])
                rounds[name].append(report)
                print(
                    f"round {round_ + 1}/{args.repeats} {name}: "
                    f"{report['launch_median_s']:.4f} s/step ({threads} thread(s) per process)",
                    flush=True,
                )
    load_end = load_average()

    batch = settings["batch_size"]
    results = {}
    for name, nodes, procs in arms:
        medians = [r["launch_median_s"] for r in rounds[name]]
        step = statistics.median(medians)
        first = rounds[name][0]
        results[name] = {
            "nodes": nodes,
            "processes_per_node": procs,
            "world_size": nodes * procs,
            "process_batch_size": first["process_batch_size"],
            "threads_per_process": first["threads_per_process"],
            "device": first["device"],
            "precision": first["precision"],
            "seconds_per_step": step,
            "seconds_per_step_min": min(medians),
            "seconds_per_step_max": max(medians),
            "images_per_s": batch / step,
            "launch_medians_s": medians,
        }
    single = results[arms[0][0]]["images_per_s"]
    # The fastest round of each arm too: on a shared machine the least disturbed figure.
    single_best = batch / results[arms[0][0]]["seconds_per_step_min"]
    for row in results.values():
        row["scaling_efficiency"] = row["images_per_s"] / (row["world_size"] * single)
        row["speedup"] = row["images_per_s"] / single
        best = batch / row["seconds_per_step_min"]
        row["scaling_efficiency_best_rounds"] = best / (row["world_size"] * single_best)

    host = machine()
    host["cores"] = os.cpu_count()
    host["device"] = results[arms[0][0]]["device"]
    loads = {"load_average_start": load_start, "load_average_end": load_end}
    rows = [
        [
            name,
            str(row["world_size"]),
            str(row["process_batch_size"]),
            str(row["threads_per_process"]),
            f"{row['seconds_per_step']:.4f}",
            f"{row['seconds_per_step_min']:.4f}-{row['seconds_per_step_max']:.4f}",
            f"{row['images_per_s']:.1f}",
            f"{row['speedup']:.2f}x",
            f"{row['scaling_efficiency']:.2f}",
            f"{row['scaling_efficiency_best_rounds']:.2f}",
        ]
        for name, row in results.items()
    ]
    title = "GPUs" if device == "cuda" else "processes and nodes"
    lines = [
        f"# Scaling out over {title}: the same global batch, the same work",
        "",
        machine_line(host) + f" {host['cores']} cores; device: {host['device']}.",
        load_line(load_start, load_end, threads=host["cores"]),
        f"Settings: {settings}. Stage-3 step under DDP on random images (no data loading); "
        "every arm a fresh launch, the arms interleaved over the rounds; s/step: median over "
        "rounds of each launch's median step [min-max of those]; images/s = global batch / "
        "s/step; efficiency = images/s / (W x images/s of 1 process); the same from each "
        "arm's fastest round (the least disturbed on a shared machine).",
        "",
        *markdown_table(
            [
                "arm",
                "W",
                "batch/process",
                "threads/process",
                "s/step",
                "min-max",
                "images/s",
                "speed-up",
                "efficiency",
                "efficiency (fastest rounds)",
            ],
            list("lrrrrrrrrr"),
            rows,
        ),
        "",
    ]
    name = "scaling_paper" if args.recipe == "paper" else "scaling"
    write_results(
        name,
        "\n".join(lines) + "\n",
        {
            "machine": host,
            "settings": {**settings, "repeats": args.repeats},
            "load": loads,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
