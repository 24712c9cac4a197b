"""Quality of the demo recipe on the synthetic data, measured from real runs.

Trains the IAGN teacher with the params.yaml schedule (stages 1 -> 2 -> 3), distills the
student, and trains a plain single-head ResNet of the same backbone for the same total
number of epochs on the same data; evaluates all three on the test split. Targets:
  - IAGN combined accuracy >= plain ResNet accuracy (both wall times reported),
  - attention pointing game against the discriminative-part boxes >= 0.7,
  - student within 5 points of the teacher and >= 2x faster at inference.

    python -m bench.quality
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.common import demo_params, machine, synthetic_dataset, write_results
from iagn.steps import baseline, distill, evaluate, train_stage


def main() -> None:
    params = demo_params()
    data = synthetic_dataset(params)
    epochs = sum(params.get(f"stage{s}", {}).get("epochs", 0) for s in (1, 2, 3))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        started = time.perf_counter()
        init = None
        for stage in (1, 2, 3):
            train_stage.run(stage, data, params, out / f"s{stage}.pt", init, quiet=True)
            init = out / f"s{stage}.pt"
        teacher_seconds = time.perf_counter() - started
        started = time.perf_counter()
        distill.run(init, data, params, out / "student.pt", quiet=True)
        distill_seconds = time.perf_counter() - started
        started = time.perf_counter()
        baseline.run(data, params, out / "plain.pt", epochs, quiet=True)
        plain_seconds = time.perf_counter() - started
        teacher = evaluate.run(init, data, params, out / "eval_teacher")
        student = evaluate.run(out / "student.pt", data, params, out / "eval_student")
        plain = evaluate.run(out / "plain.pt", data, params, out / "eval_plain")

    host = machine()
    checks = {
        "iagn_combined_ge_plain": teacher["top1_combined"] >= plain["top1"],
        "pointing_game_ge_0.7": teacher["pointing_game"] >= 0.7,
        "student_within_5_points": teacher["top1"] - student["top1"] <= 0.05,
        "student_2x_faster": teacher["latency_ms"] / student["latency_ms"] >= 2.0,
    }
    rows = [
        ("IAGN teacher (combined)", teacher["top1_combined"], teacher, teacher_seconds),
        ("IAGN teacher (two-pass)", teacher["top1_two_pass"], teacher, None),
        ("student (distilled)", student["top1"], student, distill_seconds),
        (
            f"plain {params['model']['backbone']}, {epochs} epochs",
            plain["top1"],
            plain,
            plain_seconds,
        ),
    ]
    lines = [
        "# Quality on the synthetic demo data",
        "",
        f"Machine: {host['cpu']} ({host['threads']} threads), torch {host['torch']}, "
        f"precision {teacher['precision']}. Data: {params['data']['synth']}, "
        f"crop {params['data']['crop']} px. Teacher schedule: "
        + ", ".join(f"stage {s} {params[f'stage{s}']['epochs']} epochs" for s in (1, 2, 3))
        + f"; student {params['distill']['epochs']} epochs.",
        "",
        "| model | test top-1 | pointing game | box acc (IoU>=0.5) | ECE | latency (ms, 1 image)"
        " | train wall time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, top1, metrics, seconds in rows:
        lines.append(
            f"| {name} | {top1:.3f} | {metrics.get('pointing_game', float('nan')):.3f} | "
            f"{metrics.get('box_accuracy', float('nan')):.3f} | {metrics['ece']:.3f} | "
            f"{metrics['latency_ms']:.1f} | "
            + (f"{seconds:.0f}" if seconds is not None else "")
            + " |"
        )
    lines += [
        "",
        "Targets: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items()),
    ]
    write_results(
        "quality",
        "\n".join(lines) + "\n",
        {
            "machine": host,
            "teacher": teacher,
            "student": student,
            "plain": plain,
            "seconds": {
                "teacher": teacher_seconds,
                "distill": distill_seconds,
                "plain": plain_seconds,
            },
            "checks": checks,
        },
    )


if __name__ == "__main__":
    main()
