"""Shared set-up for the benchmarks: machine description, data, result files."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from iagn.data.synth import SynthConfig, generate
from iagn.device import cpu_has_native_bf16, cpu_model
from iagn.device import device_name as device_name  # re-exported for the benchmarks
from iagn.io import write_text_atomic
from iagn.params import load_params

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
CACHE = Path(os.environ.get("IAGN_BENCH_CACHE", "/tmp/iagn-bench"))


def machine() -> dict:
    info = {
        "cpu": cpu_model(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_line(host: dict) -> str:
    """The results files' "Machine:" line for `machine()`'s description."""
    gpu = f", GPU {host['gpu']}" if "gpu" in host else ""
    return (
        f"Machine: {host['cpu']} ({host['threads']} threads, native bf16: "
        f"{host['cpu_native_bf16']}), torch {host['torch']}{gpu}."
    )


def load_average() -> float:
    """The 1-minute load average: recorded at a run's start and end, since other jobs on
    the machine slow every timed figure."""
    return os.getloadavg()[0]


def load_line(start: float, end: float, threads: int, interleaved: bool = True) -> str:
    """The results files' "Load:" line: whether the run had the CPU to itself.
    `interleaved`: the compared runs alternate, so a change of load hits all alike."""
    cores = os.cpu_count() or 1
    line = (
        f"Load: 1-minute load average {start:.1f} at the start, {end:.1f} at the end, on "
        f"{cores} cores, {threads} torch thread(s)"
    )
    if max(start, end) > 0.75 * cores:
        line += ": the run shared the CPU with other work, so wall times carry that noise"
        if interleaved:
            line += " (the compared runs are interleaved so it hits all alike)"
    return line + "."


def markdown_table(header: list[str], align: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a Markdown table; `align` per column: "l" or "r"."""
    rule = ["---" if a == "l" else "---:" for a in align]
    return [f"| {' | '.join(cells)} |" for cells in (header, rule, *rows)]


def loop_sgd(param_groups: list[dict], momentum: float, weight_decay: float):
    """The optimizer iagn/train/loop.py's `run_loop` builds (Nesterov SGD), for every loop a
    benchmark compares; keep the two the same."""
    return torch.optim.SGD(
        param_groups, momentum=momentum, weight_decay=weight_decay, nesterov=True
    )


def sgd(model, train: dict) -> torch.optim.Optimizer:
    """`loop_sgd` with the model's two learning-rate groups (`backbone_parameters`,
    `head_parameters`), from a params.yaml `train` section."""
    groups = [
        {"params": model.backbone_parameters(), "lr": train["lr_backbone"]},
        {"params": model.head_parameters(), "lr": train["lr_head"]},
    ]
    return loop_sgd(groups, train["momentum"], train["weight_decay"])


def demo_params() -> dict:
    return load_params(REPO / "params.yaml")


def synthetic_dataset(params: dict) -> Path:
    """The demo's synthetic dataset (params data.synth), generated once into the cache."""
    settings = params["data"]["synth"]
    name = "synth-" + "-".join(f"{k}{v}" for k, v in sorted(settings.items()))
    root = CACHE / name
    if not (root / "images.txt").is_file():
        generate(root, SynthConfig(**settings), workers=os.cpu_count() or 1)
    return root


def write_results(name: str, markdown: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RESULTS / f"{name}.json", json.dumps(data, indent=2) + "\n")
    path = write_text_atomic(RESULTS / f"{name}.md", markdown)
    print(markdown)
    return path
