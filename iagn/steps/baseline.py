"""A plain single-head ResNet trained with cross-entropy: the yardstick IAGN must beat.

Same backbone, data, preprocessing, optimizer and schedule as the teacher; no jigsaw, no
attention, no distillation. Used by bench/quality.py; its checkpoint is a "student" kind,
so `iagn evaluate` reads it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch.nn.functional as F

from iagn.models.student import Student, StudentConfig
from iagn.precision import resolve_precision
from iagn.train.calibrated import finish_calibrated
from iagn.train.config import serve_settings, stage_config
from iagn.train.data import prepare_step_data
from iagn.train.distributed import init_runtime
from iagn.train.durable import step_uri
from iagn.train.loop import run_loop, seed_everything, standard_spec


def run(
    data: str | Path | None, params: dict, out: str | Path, epochs: int, quiet: bool = False
) -> dict[str, Any]:
    runtime = init_runtime("auto")
    config = stage_config(params, 3)  # the teacher's shared hyperparameters
    serve = serve_settings(params)
    prepared = prepare_step_data(data, params)
    precision = resolve_precision(config.precision, runtime.device)
    model_cfg = StudentConfig(
        backbone=params["model"]["backbone"],
        num_classes=prepared.num_classes,
        weights=params["model"]["weights"],
        class_names=prepared.class_names,
    )
    seed_everything(config.seed)
    model = Student(model_cfg)

    def step_fn(wrapped, batch, generator):
        loss = F.cross_entropy(wrapped(batch["image"]).float(), batch["label"])
        return loss, {"loss": float(loss.detach())}

    spec = standard_spec(
        replace(config, epochs=epochs),
        prepared,
        runtime,
        precision,
        model=model,
        param_groups=[
            {"params": list(model.features.parameters()), "lr": config.lr_backbone},
            {"params": list(model.classifier.parameters()), "lr": config.lr_head},
        ],
        step_fn=step_fn,
        payload=lambda: {
            "kind": "student",
            "stage": None,
            "model_config": model_cfg.to_dict(),
            "train_config": {**config.recorded(), "epochs": epochs, "baseline": True},
            "data": prepared.identity(),
        },
        description="baseline",
        checkpoint_uri=step_uri(config.checkpoint_uri, "baseline"),
    )
    result = run_loop(spec, Path(out), runtime, quiet=quiet)
    finished = finish_calibrated(model, result, Path(out), runtime, prepared, config, serve)
    return {"checkpoint": Path(out), "history": finished["history"]}
