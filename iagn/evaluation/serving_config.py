"""The serving configuration: every setting that defines a model's served prediction.

A teacher has several possible predictions (its fused head, the average of its heads, a
weighted sum of its heads fitted on validation data, a second pass on the attended crop)
and each draws its attention box some way. After training, `iagn.evaluation.choose`
picks them on the validation split and the training step stores the result in the
checkpoint (`serving`). Evaluation, `iagn predict` / `explain`, the MLflow model and
distillation's teacher target all build their `Predictor` from this one object, so a metric
describes exactly the prediction that is served.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from iagn.models.attention import BOX_METHODS

# One-pass teacher predictions, cheapest first (ties in the choice go to the cheaper one).
ONE_PASS = ("fused", "combined", "weighted")
AGGREGATIONS = (*ONE_PASS, "two_pass", "student")


@dataclass(frozen=True)
class ServingConfig:
    """How a checkpoint's model predicts and explains; stored in the checkpoint."""

    # fused | combined | weighted | two_pass (teacher) or student.
    aggregation: str = "combined"
    # two_pass: the one-pass prediction applied to the full image and to the attended crop.
    base: str = "combined"
    # weighted: one weight per stage head, then the fused head (fitted on validation data).
    weights: tuple[float, ...] = ()
    # two_pass's crop: the box around the map above crop_threshold, grown by crop_margin x
    # its size on each side, as training's attention crops are (train.attention_threshold,
    # the middle of train.attention_crop_margin); independent of the box shown to people.
    crop_threshold: float = 0.5
    crop_margin: float = 0.2
    crop_weight: float = 0.5  # two_pass = (1 - w) x full image + w x crop
    # threshold: the box around every pixel above the threshold; component: only the region
    # connected to the peak; centroid: a box_size x the image box at that region's centre.
    box_method: str = "threshold"
    box_threshold: float = 0.5
    box_size: float = 0.25
    precision: str = "fp32"
    temperature: float = 1.0
    # What the choice saw: split, images, the validation score of every candidate.
    chosen_on: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r}; one of {AGGREGATIONS}")
        if self.base not in ONE_PASS:
            raise ValueError(f"two-pass base must be one of {ONE_PASS}, not {self.base!r}")
        if self.box_method not in BOX_METHODS:
            raise ValueError(f"unknown box method {self.box_method!r}; one of {BOX_METHODS}")

    @property
    def one_pass(self) -> str:
        """The single-pass prediction: the aggregation itself, or two_pass's base."""
        return self.base if self.aggregation == "two_pass" else self.aggregation

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["weights"] = list(self.weights)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServingConfig:
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["weights"] = tuple(values.get("weights", ()))
        return cls(**values)


def serving_config_of(checkpoint: dict[str, Any]) -> ServingConfig:
    """The checkpoint's serving configuration. Checkpoints written before it existed served
    the two-pass combined prediction (teacher) or the single head (student) at a threshold
    of 0.5, in fp32, with the fitted temperature they stored under `calibration`."""
    if isinstance(checkpoint.get("serving"), dict):
        return ServingConfig.from_dict(checkpoint["serving"])
    temperature = float((checkpoint.get("calibration") or {}).get("temperature", 1.0))
    aggregation = "two_pass" if checkpoint.get("kind") == "teacher" else "student"
    return ServingConfig(aggregation=aggregation, temperature=temperature)


@dataclass(frozen=True)
class ServeSettings:
    """params.yaml `serve`: the candidates the choice on the validation split compares."""

    precision: str = "fp32"
    aggregations: tuple[str, ...] = ("fused", "combined", "weighted", "two_pass")
    # A costlier prediction (weighted over fused or combined, two passes over one) is served
    # only when it beats the cheaper one's validation top-1 by at least this.
    min_gain: float = 0.02
    crop_threshold: float = 0.5
    crop_margin: float = 0.2
    crop_weights: tuple[float, ...] = (0.25, 0.5)
    box_methods: tuple[str, ...] = BOX_METHODS
    box_thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    box_sizes: tuple[float, ...] = (0.15, 0.2, 0.25, 0.3, 0.4, 0.5)  # centroid boxes

    def problems(self) -> list[str]:
        known = (*ONE_PASS, "two_pass")
        wrong = [a for a in self.aggregations if a not in known]
        problems = [f"aggregations: unknown {wrong}; choose from {known}"] if wrong else []
        if not self.aggregations:
            problems.append("aggregations: list at least one")
        if [m for m in self.box_methods if m not in BOX_METHODS] or not self.box_methods:
            problems.append(f"box_methods: choose one or more of {BOX_METHODS}")
        if not self.box_thresholds or not all(0 < t < 1 for t in self.box_thresholds):
            problems.append("box_thresholds: list fractions of the peak between 0 and 1")
        if not all(0 < w <= 1 for w in self.crop_weights) or not self.crop_weights:
            problems.append("crop_weights: list weights in (0, 1]")
        if self.precision not in ("fp32", "bf16", "fp16"):
            problems.append("precision: fp32, bf16 or fp16 (what every consumer serves in)")
        if not 0 <= self.min_gain < 1:
            problems.append("min_gain: a top-1 difference in [0, 1)")
        if not 0 < self.crop_threshold < 1:
            problems.append("crop_threshold: a fraction of the peak between 0 and 1")
        if self.crop_margin < 0:
            problems.append("crop_margin: must be >= 0")
        return problems
