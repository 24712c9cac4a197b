"""Step `train-stage`: progressive training of one IAGN stage.

Stage s starts from stage s-1's checkpoint (`init`; without one, from the backbone weights
in params.yaml: stage 3 alone is then the full multi-granularity step from scratch),
trains heads 1..s on jigsaw views of granularity n_1..n_s plus the fused head on whole
images and attention crops, with stage-wise distillation from the fused head (see
iagn/train/stage_step.py), and writes a checkpoint after every epoch.

Parameters that train: the whole backbone at `lr_backbone`, all stage blocks, the active
heads and the fused head at `lr_head` (heads of later stages receive no loss yet).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from iagn.checkpoint import check_compatible, load_checkpoint
from iagn.errors import IagnError
from iagn.io import sha256_file
from iagn.models.iagn import IAGN, ModelConfig
from iagn.precision import resolve_precision
from iagn.train.calibrated import finish_calibrated
from iagn.train.config import (
    model_config,
    serve_settings,
    stage_config,
)
from iagn.train.data import PreparedData, prepare_step_data
from iagn.train.distributed import Runtime, init_runtime
from iagn.train.durable import step_uri
from iagn.train.loop import run_loop, seed_everything, standard_spec
from iagn.train.stage_step import ActiveHeads, stage_step


def _check_image_size(crop: int, jigsaw_sizes: tuple[int, ...]) -> None:
    finest = max(jigsaw_sizes)
    if crop < finest * 4:
        raise IagnError(
            f"crop size {crop} px is too small for a {finest}x{finest} jigsaw (patches of "
            f"{crop // finest} px); use data.crop >= {finest * 4} or a coarser model.jigsaw"
        )


def build_model(
    params: dict, data: PreparedData, init: Path | None, stage: int
) -> tuple[IAGN, ModelConfig]:
    config = model_config(params, data.num_classes, data.class_names)
    _check_image_size(data.config.crop, config.jigsaw)
    if init is not None:
        previous = load_checkpoint(init, kind="teacher")
        check_compatible(previous, config.backbone, data.num_classes, init)
        if previous["data"]["digest"] != data.digest:
            raise IagnError(
                f"checkpoint {init} was trained on other data (manifest digest "
                f"{previous['data']['digest'][:12]}, this dataset {data.digest[:12]}); "
                "use the same --data for every stage"
            )
        if previous.get("stage", 0) >= stage:
            raise IagnError(
                f"--init {init} is a stage {previous.get('stage')} checkpoint; stage {stage} "
                f"starts from stage {stage - 1}"
            )
        config = ModelConfig.from_dict({**previous["model_config"], "weights": "none"})
        model = IAGN(config)
        model.load_state_dict(previous["model_state"])
        return model, config
    return IAGN(config), config


def run(
    stage: int,
    data: str | Path | None,
    params: dict,
    out: str | Path,
    init: str | Path | None = None,
    device: str = "auto",
    quiet: bool = False,
    callbacks: list | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Train stage `stage`; returns {"checkpoint", "history", "metrics"}."""
    runtime = runtime or init_runtime(device)
    config = stage_config(params, stage)
    serve = serve_settings(params)  # checked now, used once training is done
    prepared = prepare_step_data(data, params)
    seed_everything(config.seed)  # the same initial weights on every run and every rank
    model, model_cfg = build_model(params, prepared, Path(init) if init else None, stage)
    precision = resolve_precision(config.precision, runtime.device)
    out = Path(out)
    train_config = {
        **config.recorded(),
        "precision_resolved": precision,
        "world_size": runtime.world_size,  # a resumed run must split the data the same way
    }
    train_config["attention_crop_margin"] = list(config.attention_crop_margin)
    # A rerun after the previous stage was retrained must not continue the old partial run.
    init_identity = {"path": str(init), "sha256": sha256_file(init)} if init else None

    def step_fn(wrapped, batch, generator):
        return stage_step(
            wrapped, batch["image"], batch["label"], config, model_cfg.jigsaw, generator
        )

    spec = standard_spec(
        config,
        prepared,
        runtime,
        precision,
        model=model,
        param_groups=[
            {"params": model.backbone_parameters(), "lr": config.lr_backbone},
            {"params": model.head_parameters(), "lr": config.lr_head},
        ],
        step_fn=step_fn,
        payload=lambda: {
            "kind": "teacher",
            "stage": stage,
            "model_config": model_cfg.to_dict(),
            "train_config": train_config,
            "data": prepared.identity(),
            "init": init_identity,
        },
        validate_view=lambda trained: ActiveHeads(trained, stage),
        description=f"stage {stage}",
        checkpoint_uri=step_uri(config.checkpoint_uri, f"stage{stage}"),
        ddp_find_unused=stage < 3,  # heads of later stages get no loss yet
        callbacks=callbacks or [],
    )
    result = run_loop(spec, out, runtime, quiet=quiet)
    return finish_calibrated(model, result, out, runtime, prepared, config, serve)
