"""Step `distill`: the finished IAGN teacher teaches a compact single-head student.

The teacher runs in eval mode with its served prediction, as its checkpoint's serving
configuration defines it (chosen on the validation split: iagn/evaluation/choose.py). The
student (ResNet-18 or MobileNetV3 from torchvision) learns from its logits with the KD
loss (KL at temperature T, weight alpha) plus cross-entropy on the labels (weight 1 -
alpha). Teacher logits are computed on the fly for the same augmented batch the student
sees, so the student learns the teacher's function, not a frozen table.

So that the served student also explains itself, its map can learn the teacher's attention:
`student_output_stride` gives it a finer grid and `attention_weight` adds attention
transfer (iagn/train/losses.py) between its per-position logit shares and the teacher's
attention, both for the class the teacher's attention explains.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch.nn.functional as F

from iagn.checkpoint import load_checkpoint
from iagn.errors import IagnError
from iagn.evaluation.predictor import Predictor
from iagn.evaluation.serving_config import serving_config_of
from iagn.io import sha256_file
from iagn.models.load import model_from_checkpoint
from iagn.models.student import Student, StudentConfig
from iagn.precision import resolve_precision
from iagn.train.calibrated import finish_calibrated
from iagn.train.config import checkpoint_uri, distill_config, serve_settings
from iagn.train.data import prepare_step_data
from iagn.train.distributed import Runtime, init_runtime
from iagn.train.durable import step_uri
from iagn.train.loop import run_loop, seed_everything, standard_spec
from iagn.train.losses import attention_transfer_loss, kd_loss


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
    serve = serve_settings(params)
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
    # The target is the teacher's served prediction, exactly as its checkpoint defines it.
    teacher_serving = serving_config_of(teacher_ckpt)
    teacher_model = Predictor(model_from_checkpoint(teacher_ckpt), teacher_serving, runtime.device)
    student_cfg = StudentConfig(
        backbone=config.student,
        num_classes=prepared.num_classes,
        weights=config.student_weights,
        class_names=prepared.class_names,
        output_stride=config.student_output_stride,
        layers=config.student_layers,
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
        taught = teacher_model(images)
        target = taught.logits["final"]
        logs = {}
        if config.attention_weight > 0:
            # The student's map of the class the teacher's attention explains, towards it.
            explained = taught.logits[teacher_serving.one_pass].argmax(dim=1)
            logits, shares = wrapped(images, attribution_of=explained)
            at = attention_transfer_loss(shares, taught.attention)
            logs["loss_at"] = float(at.detach())
        else:
            logits, at = wrapped(images), 0.0
        ce = F.cross_entropy(logits.float(), labels)
        kd = kd_loss(logits, target, config.kd_temperature)
        loss = (1 - config.kd_alpha) * ce + config.kd_alpha * kd + config.attention_weight * at
        return loss, {
            "loss": float(loss.detach()),
            "loss_ce": float(ce.detach()),
            "loss_kd": float(kd.detach()),
            **logs,
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
                "serving": teacher_serving.to_dict(),  # the target the student learned
            },
            "data": teacher_ckpt["data"],
        },
        description="distill",
        checkpoint_uri=step_uri(checkpoint_uri(params), "distill"),
        callbacks=callbacks or [],
    )
    result = run_loop(spec, Path(out), runtime, quiet=quiet)
    return finish_calibrated(student, result, Path(out), runtime, prepared, config, serve)
