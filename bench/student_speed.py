"""Served speed of the teacher and of each student shape, measured side by side.

The served prediction is the one `iagn evaluate` times (iagn/evaluation/predictor.py with
its default serving configuration: the teacher's fused head, a student's one pass; both
with the attention map and box), in the precision `serve.precision` gives. Speed does not
depend on the weights, so the models are untrained: this ranks the shapes a user can pick
(`distill.student_output_stride`, `distill.student_layers`) against the teacher before any
training. The shapes run in rounds, one timing of each per round, so a change of load hits
all alike; a cell is the median over rounds. Accuracy and localization of the trained
students: README "The student explains itself" and bench/results/quality.md.

    python -m bench.student_speed [--rounds 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench.common import (
    demo_params,
    load_average,
    load_line,
    machine,
    machine_line,
    markdown_table,
    write_results,
)
from iagn.evaluation.predictor import Predictor
from iagn.evaluation.serving_config import ServingConfig
from iagn.evaluation.speed import measure_speed, parameter_count
from iagn.models.iagn import IAGN
from iagn.models.student import Student, StudentConfig
from iagn.train.config import model_config

# (output stride, ResNet layers kept) of the resnet18 student
STUDENT_SHAPES = ((32, 4), (16, 4), (8, 4), (16, 3), (8, 3), (8, 2))


def models(params: dict, classes: int) -> dict[str, torch.nn.Module]:
    teacher = IAGN(model_config(params, classes, [str(k) for k in range(classes)]))
    built = {"teacher (fused, served)": teacher}
    for stride, layers in STUDENT_SHAPES:
        config = StudentConfig(num_classes=classes, output_stride=stride, layers=layers)
        built[f"student, stride {stride}, {layers} layers"] = Student(config)
    return built


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timings of each model")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    params = demo_params()
    classes, crop = params["data"]["synth"]["classes"], params["data"]["crop"]
    precision = params["serve"]["precision"]
    device = torch.device("cpu")
    predictors = {
        name: Predictor(
            model,
            ServingConfig(
                aggregation="fused" if isinstance(model, IAGN) else "student", precision=precision
            ),
            device,
        )
        for name, model in models(params, classes).items()
    }
    load_start = load_average()
    timings: dict[str, list[dict]] = {name: [] for name in predictors}
    for _ in range(args.rounds):
        for name, predictor in predictors.items():
            timings[name].append(measure_speed(predictor, (3, crop, crop), device, repeats=10))
    teacher_name = next(iter(predictors))
    rows, results = [], {}
    for name, runs in timings.items():
        latency = statistics.median(r["latency_ms"] for r in runs)
        throughput = statistics.median(r["throughput_ips"] for r in runs)
        results[name] = {
            "latency_ms": latency,
            "latency_ms_range": [
                min(r["latency_ms"] for r in runs),
                max(r["latency_ms"] for r in runs),
            ],
            "throughput_ips": throughput,
            "parameters": parameter_count(predictors[name].model),
        }
    teacher = results[teacher_name]
    for name, result in results.items():
        result["speedup_latency"] = teacher["latency_ms"] / result["latency_ms"]
        result["speedup_throughput"] = result["throughput_ips"] / teacher["throughput_ips"]
        low, high = result["latency_ms_range"]
        rows.append(
            [
                name,
                f"{result['latency_ms']:.2f} [{low:.2f}, {high:.2f}]",
                f"{result['speedup_latency']:.2f}x",
                f"{result['throughput_ips']:.0f}",
                f"{result['speedup_throughput']:.2f}x",
                f"{result['parameters'] / 1e6:.1f} M",
            ]
        )
    host = machine()
    lines = [
        "# Served speed: the teacher against each student shape",
        "",
        machine_line(host) + f" Precision served: {precision}.",
        load_line(load_start, load_average(), torch.get_num_threads()),
        "",
        f"Input {crop} px, {classes} classes (the demo's), resnet18 backbone, untrained "
        f"weights. Latency: median of 10 single-image predictions per round, then the median "
        f"over {args.rounds} rounds [min, max]; throughput: batches of 32. Speed-up: against "
        "the teacher, same run.",
        "",
        *markdown_table(
            ["model", "latency ms", "speed-up", "images/s (batch 32)", "speed-up", "parameters"],
            list("lrrrrr"),
            rows,
        ),
        "",
    ]
    write_results(
        "student_speed",
        "\n".join(lines),
        {"machine": host, "precision": precision, "rounds": args.rounds, "models": results},
    )


if __name__ == "__main__":
    main()
