"""Step `distill`: the finished IAGN teacher teaches a compact single-head student.

The teacher runs in eval mode with its best prediction: the two-pass combined logits (full
image + attended crop, all heads). The student (ResNet-18 or MobileNetV3 from torchvision)
learns from them with the KD loss (KL at temperature T, weight alpha) plus cross-entropy on
the labels (weight 1 - alpha). Teacher logits are computed on the fly for the same augmented
batch the student sees, so the student learns the teacher's function, not a frozen table.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch.nn.functional as F

from iagn.checkpoint import load_checkpoint
from iagn.errors import IagnError
from iagn.evaluation.predictor import Predictor
from iagn.io import sha256_file
from iagn.models.load import model_from_checkpoint
from iagn.models.student import Student, StudentConfig
from iagn.precision import resolve_precision
from iagn.train.calibrated import finish_calibrated
from iagn.train.config import distill_config
from iagn.train.data import prepare_step_data
from iagn.train.distributed import Runtime, init_runtime
from iagn.train.loop import run_loop, seed_everything, standard_spec
from iagn.train.losses import kd_loss


def run(
    teacher: str | Path,
    data: str | Path | None,
    params: dict,
    out: str | Path,
    device: str = "auto",
    quiet: bool = False,
    callbacks: list | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    runtime = runtime or init_runtime(device)
    config = distill_config(params)
    prepared = prepare_step_data(data, params)
    teacher_ckpt = load_checkpoint(teacher, kind="teacher")
    teacher_sha256 = sha256_file(teacher)
    if teacher_ckpt["data"]["digest"] != prepared.digest:
        raise IagnError(
            f"teacher {teacher} was trained on other data (manifest digest "
            f"{teacher_ckpt['data']['digest'][:12]}, this dataset {prepared.digest[:12]}); "
            "distill on the dataset the teacher was trained on"
        )
    if not teacher_ckpt.get("complete"):
        raise IagnError(f"teacher {teacher} is an unfinished run; finish stage 3 first")
    precision = resolve_precision(config.precision, runtime.device)
    teacher_model = Predictor(
        model_from_checkpoint(teacher_ckpt),
        runtime.device,
        precision,
        attention_threshold=params.get("evaluate", {}).get("attention_threshold", 0.5),
    )
    student_cfg = StudentConfig(
        backbone=config.student,
        num_classes=prepared.num_classes,
        weights=config.student_weights,
        class_names=prepared.class_names,
    )
    seed_everything(config.seed)
    student = Student(student_cfg)
    teacher_backbone = teacher_ckpt["model_config"]["backbone"]
    if config.student_init == "teacher" or (
        config.student_init == "auto" and teacher_backbone == config.student
    ):
        # The teacher's trunk already holds the fine-grained features: the student starts
        # there and distillation mostly teaches its single head to match the ensemble.
        student.copy_teacher_trunk(teacher_model.model, teacher_backbone)

    def step_fn(wrapped, batch, generator):
        images, labels = batch["image"], batch["label"]
        target = teacher_model(images).logits["final"]
        logits = wrapped(images)
        ce = F.cross_entropy(logits.float(), labels)
        kd = kd_loss(logits, target, config.kd_temperature)
        loss = (1 - config.kd_alpha) * ce + config.kd_alpha * kd
        return loss, {
            "loss": float(loss.detach()),
            "loss_ce": float(ce.detach()),
            "loss_kd": float(kd.detach()),
        }

    spec = standard_spec(
        config,
        prepared,
        runtime,
        precision,
        model=student,
        param_groups=[{"params": list(student.parameters()), "lr": config.lr}],
        step_fn=step_fn,
        payload=lambda: {
            "kind": "student",
            "stage": None,
            "model_config": student_cfg.to_dict(),
            "train_config": {**asdict(config), "precision_resolved": precision},
            "teacher": {
                "digest": teacher_ckpt["data"]["digest"],
                "path": str(teacher),
                "sha256": teacher_sha256,
            },
            "data": teacher_ckpt["data"],
        },
        description="distill",
        callbacks=callbacks or [],
    )
    result = run_loop(spec, Path(out), runtime, quiet=quiet)
    return finish_calibrated(student, result, Path(out), runtime, prepared, config, precision)
