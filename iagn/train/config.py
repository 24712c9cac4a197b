"""Typed configs built from params.yaml sections, with errors for unknown or bad keys."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from iagn.data.images import DEFAULT_MAX_PIXELS
from iagn.errors import IagnError
from iagn.evaluation.serving_config import ServeSettings
from iagn.models.iagn import POOLINGS, ModelConfig
from iagn.models.student import OUTPUT_STRIDES
from iagn.params import section
from iagn.redact import scrub_uri

# Query parameters that carry secrets (presigned URLs, SAS tokens).
_SECRET_QUERY = ("key", "secret", "token", "signature", "credential", "password")


def check_uri(value: Any, where: str) -> None:
    """A usable checkpoint URI (or None): a URL with a known scheme and no credentials."""
    if value is None:
        return
    if not isinstance(value, str) or "://" not in value:
        shown = "a value with @ (not shown)" if "@" in str(value) else repr(value)
        raise IagnError(
            f"params.yaml {where}.checkpoint_uri must be a URL such as s3://bucket/path (or "
            f"file:///mnt/volume/path for a mounted volume), or null; got {shown}"
        )
    parts = urlsplit(value)
    secret_query = any(
        any(word in name.lower() for word in _SECRET_QUERY) for name, _ in parse_qsl(parts.query)
    )
    if "@" in parts.netloc or secret_query:
        # Params are logged to MLflow and printed: the URI must not carry the secret.
        raise IagnError(
            f"params.yaml {where}.checkpoint_uri holds credentials ({scrub_uri(value)} with "
            "user info or a token); remove them and give them in the environment instead "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, on Kubernetes from a secret): params "
            "are logged to MLflow"
        )
    import fsspec

    try:
        fsspec.get_filesystem_class(parts.scheme)
    except (ImportError, ValueError) as exc:
        raise IagnError(
            f"params.yaml {where}.checkpoint_uri: no filesystem for {parts.scheme}:// ({exc}); "
            "use s3:// (s3fs is installed) or install the fsspec package for that scheme"
        ) from None


def from_mapping(cls, values: dict[str, Any], where: str):
    """Build dataclass `cls` from `values`, naming unknown keys and the params section."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise IagnError(f"params.yaml `{where}` has unknown keys {unknown}; known: {sorted(known)}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise IagnError(f"params.yaml `{where}`: {exc}") from None


@dataclass
class DataConfig:
    root: str = "data/synth"
    format: str = "auto"
    synth: dict = field(default_factory=dict)
    val_fraction: float = 0.2
    split_seed: int = 0
    resize: int = 146
    crop: int = 128
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused from their header
    allow_outside_root: bool = False  # listed images may resolve outside the dataset root

    @property
    def format_or_none(self) -> str | None:
        return None if self.format in ("auto", "", None) else self.format

    def check(self) -> None:
        limit = self.max_pixels
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise IagnError(
                f"params.yaml data.max_pixels must be a whole number of pixels >= 1, got "
                f"{limit!r}; e.g. {DEFAULT_MAX_PIXELS} (8192 x 8192)"
            )
        if not isinstance(self.allow_outside_root, bool):
            raise IagnError(
                "params.yaml data.allow_outside_root must be true or false, got "
                f"{self.allow_outside_root!r}"
            )


@dataclass
class StageConfig:
    """Hyperparameters of one progressive stage: the shared `train` section plus `stageN`."""

    stage: int = 1
    epochs: int = 4
    batch_size: int = 16
    lr_head: float = 0.02
    lr_backbone: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5
    grad_clip: float = 5.0
    precision: str = "auto"
    channels_last: bool = True
    seed: int = 0
    kd_temperature: float = 4.0
    kd_alpha: float = 0.5
    jigsaw_views: str = "all"
    attention_crop_fraction: float = 0.25
    attention_crop_margin: tuple[float, float] = (0.1, 0.3)
    attention_threshold: float = 0.5
    attention_drop: bool = False
    drop_threshold: float = 0.6
    num_workers: int = 0
    # Where every epoch's checkpoint is also uploaded (iagn/train/durable.py); None: local only
    checkpoint_uri: str | None = None

    def recorded(self) -> dict:
        """The config a checkpoint records (its resume identity): all but checkpoint_uri,
        which says where copies go, not how the model trains (a moved prefix resumes)."""
        values = asdict(self)
        values.pop("checkpoint_uri")
        return values

    def check(self) -> None:
        check_uri(self.checkpoint_uri, f"train/stage{self.stage}")
        if self.stage not in (1, 2, 3):
            raise IagnError(f"--stage must be 1, 2 or 3, got {self.stage}")
        if self.epochs < 1 or self.batch_size < 1:
            raise IagnError("epochs and batch_size must be at least 1")
        if self.jigsaw_views not in ("split", "all"):
            raise IagnError(f"train.jigsaw_views must be split or all, got {self.jigsaw_views!r}")
        if not 0.0 <= self.attention_crop_fraction <= 1.0:
            raise IagnError("train.attention_crop_fraction must be in [0, 1]")
        self.attention_crop_margin = tuple(self.attention_crop_margin)


@dataclass
class DistillConfig:
    student: str = "resnet18"
    student_init: str = "auto"  # auto | teacher | weights
    student_weights: str = "none"
    # Student's map resolution (resnet18: 32, 16 or 8; MobileNet: 32), see iagn/models/student.py
    student_output_stride: int = 32
    # ResNet layers the resnet18 student keeps: 4, 3 (ends after layer3) or 2 (after layer2)
    student_layers: int = 4
    epochs: int = 6
    batch_size: int = 16
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5
    grad_clip: float = 5.0
    kd_temperature: float = 4.0
    kd_alpha: float = 0.7
    # Weight of attention transfer: the student's map towards the teacher's attention (0: off)
    attention_weight: float = 0.0
    precision: str = "auto"
    channels_last: bool = True
    seed: int = 0
    num_workers: int = 0

    def check(self) -> None:
        if self.student_init not in ("auto", "teacher", "weights"):
            raise IagnError(
                f"distill.student_init must be auto, teacher or weights, not {self.student_init!r}"
            )
        if self.student_output_stride not in OUTPUT_STRIDES:
            raise IagnError(
                "distill.student_output_stride must be one of "
                f"{', '.join(map(str, OUTPUT_STRIDES))}, not {self.student_output_stride!r}"
            )
        if not self.attention_weight >= 0:
            raise IagnError(
                f"distill.attention_weight must be >= 0 (0 disables), not {self.attention_weight!r}"
            )


def data_config(params: dict) -> DataConfig:
    config = from_mapping(DataConfig, section(params, "data"), "data")
    config.check()
    return config


def model_config(params: dict, num_classes: int, class_names: list[str]) -> ModelConfig:
    values = dict(section(params, "model"))
    values.update(num_classes=num_classes, class_names=list(class_names))
    config = from_mapping(ModelConfig, values, "model")
    config.jigsaw = tuple(config.jigsaw)
    if len(config.jigsaw) != 3:
        raise IagnError("params.yaml model.jigsaw must list three granularities, e.g. [8, 4, 2]")
    if config.pooling not in POOLINGS:
        raise IagnError(
            f"params.yaml model.pooling must be one of {', '.join(POOLINGS)}, "
            f"got {config.pooling!r}"
        )
    return config


def stage_config(params: dict, stage: int) -> StageConfig:
    values = {**section(params, "train"), **params.get(f"stage{stage}", {}), "stage": stage}
    config = from_mapping(StageConfig, values, f"train/stage{stage}")
    config.check()
    return config


def distill_config(params: dict) -> DistillConfig:
    config = from_mapping(DistillConfig, section(params, "distill"), "distill")
    config.check()
    return config


def checkpoint_uri(params: dict) -> str | None:
    """`train.checkpoint_uri`: distill takes it from `train` too (one key for the pipeline;
    each step gets its own prefix under it, iagn/train/durable.py)."""
    uri = section(params, "train").get("checkpoint_uri")
    check_uri(uri, "train")
    return uri


def resolve_data_dir(data: str | Path | None, config: DataConfig) -> Path:
    """`--data` wins over params.yaml data.root."""
    return Path(data) if data else Path(config.root)


def serve_settings(params: dict) -> ServeSettings:
    """params.yaml `serve`: what the choice of the served prediction compares."""
    values = dict(section(params, "serve")) if "serve" in params else {}
    for key in ("aggregations", "crop_weights", "box_methods", "box_thresholds", "box_sizes"):
        if key in values:
            values[key] = tuple(values[key])
    settings = from_mapping(ServeSettings, values, "serve")
    problems = settings.problems()
    if problems:
        raise IagnError("params.yaml `serve`: " + "; ".join(problems))
    return settings


def process_batch_size(batch_size: int, world_size: int, key: str, nodes: int = 1) -> int:
    """Each process's share of the global batch `batch_size` (params.yaml `key`, such as
    train.batch_size) when `world_size` processes on `nodes` nodes train together.

    The global batch is the recipe: W processes each take batch_size / W, so the optimizer
    steps on the same number of images whatever the scale. A batch that does not split
    evenly would change that (or leave a rank without images); it is refused, saying what
    to set."""
    if world_size <= 1:
        return batch_size
    if batch_size % world_size == 0:
        return batch_size // world_size
    if world_size % max(nodes, 1) == 0:
        plural = "s" if nodes > 1 else ""
        layout = f"{max(nodes, 1)} node{plural} x {world_size // max(nodes, 1)}"
    else:
        layout = f"on {nodes} nodes"
    smallest = "" if batch_size >= world_size else f" (at least {world_size})"
    raise IagnError(
        f"params.yaml {key} {batch_size} is not divisible by the {world_size} processes "
        f"({layout}); use a multiple of {world_size}{smallest}: {key} is the global batch, "
        f"each process takes {key} / {world_size}"
    )
