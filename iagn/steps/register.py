"""Step `register`: the quality gate, then the MLflow Model Registry with two aliases.

A candidate (the student; the teacher too when `register.register_teacher`) is registered
only when its evaluation (metrics.json of `iagn evaluate`) passes every check of
`register.gate` in params.yaml: top-1 at least `min_top1`, pointing game at least
`min_pointing_game`, latency at most `max_latency_ms` (null skips a check). The student goes
to the registered model `register.model_name`, the teacher to `<model_name>-teacher`.

The new version gets the alias `challenger`. It also becomes `champion` when there is no
champion yet, or when it beats the champion on `promote.metric` (higher is better, except
for LOWER_IS_BETTER metrics) while losing at most `promote.localization_tolerance` on
`promote.localization_metric`. The champion's numbers are read from its version tags, so a
version registered by any earlier pipeline run competes on the same terms.

Registering is idempotent: a version of the same model that carries the same pipeline run id
or the same checkpoint sha256 is reported back instead of creating a second one, and its
aliases are left as they are.

Everything here works on an `MlflowClient` and plain values; `iagn/runner.py` finds the
logged models and opens the step's MLflow run.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from iagn.errors import IagnError
from iagn.registry import CHALLENGER, CHAMPION, TAG_CHECKPOINT, TAG_KIND, VERSION_METRICS
from iagn.tracking import TAG_PIPELINE_RUN

LOWER_IS_BETTER = frozenset({"latency_ms", "ece", "checkpoint_mb", "parameters"})
_MODEL_NAME = re.compile(r"^[\w.\- ]{1,200}$")


@dataclass
class Gate:
    min_top1: float | None = None
    min_pointing_game: float | None = None
    max_latency_ms: float | None = None


@dataclass
class Promote:
    metric: str = "top1"
    localization_metric: str = "pointing_game"
    localization_tolerance: float = 0.02


@dataclass
class RegisterConfig:
    model_name: str = "iagn"
    register_teacher: bool = False
    gate: Gate = field(default_factory=Gate)
    promote: Promote = field(default_factory=Promote)

    def registered_name(self, kind: str) -> str:
        return self.model_name if kind == "student" else f"{self.model_name}-teacher"


def register_config(params: dict) -> RegisterConfig:
    """The `register` section of params.yaml, checked (unknown keys are named)."""
    from iagn.train.config import from_mapping  # imports torch: not for `iagn models --name`

    values = dict(params.get("register") or {})
    gate = from_mapping(Gate, values.pop("gate", None) or {}, "register.gate")
    promote = from_mapping(Promote, values.pop("promote", None) or {}, "register.promote")
    config = from_mapping(RegisterConfig, values, "register")
    config.gate, config.promote = gate, promote
    if not _MODEL_NAME.match(str(config.model_name)):
        raise IagnError(
            f"params.yaml register.model_name {config.model_name!r} must be 1-200 letters, "
            "digits, spaces, dots, dashes or underscores"
        )
    return config


@dataclass
class Candidate:
    """A model ready to register: where MLflow logged it and how it evaluated."""

    kind: str  # "student" or "teacher"
    model_uri: str  # models:/<model_id>
    run_id: str | None  # the run that logged it: the version's source run
    model_id: str | None
    checkpoint_sha256: str
    metrics: dict[str, Any]
    tags: dict[str, str] = field(default_factory=dict)  # provenance (git, data version)


@dataclass
class Outcome:
    kind: str
    model_name: str
    gate_passed: bool
    gate_failures: list[str] = field(default_factory=list)
    version: str | None = None
    already_registered: bool = False
    champion: bool = False
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate_failures(metrics: dict[str, Any], gate: Gate) -> list[str]:
    """Each failed check of the gate, as a sentence; empty when the model may be registered."""
    checks = (
        ("top1", gate.min_top1, "min_top1", ">="),
        ("pointing_game", gate.min_pointing_game, "min_pointing_game", ">="),
        ("latency_ms", gate.max_latency_ms, "max_latency_ms", "<="),
    )
    failures = []
    for metric, bound, key, op in checks:
        if bound is None:
            continue
        value = metrics.get(metric)
        if not isinstance(value, int | float):
            failures.append(
                f"{metric} was not measured (a dataset without boxes has no pointing_game); "
                f"set register.gate.{key} to null to skip this check"
            )
        elif (value < bound) if op == ">=" else (value > bound):
            failures.append(f"{metric} {value:.4g} is not {op} register.gate.{key} {bound:.4g}")
    return failures


def beats(candidate: dict[str, float], champion: dict[str, float] | None, promote: Promote):
    """(whether the candidate should become champion, why) from the two sets of metrics."""
    if champion is None:
        return True, "there was no champion"
    metric, place = promote.metric, promote.localization_metric
    ours, theirs = candidate.get(metric), champion.get(metric)
    if ours is None:
        return False, f"the candidate has no {metric}"
    if theirs is None:
        return True, f"the champion has no {metric}"
    lower = metric in LOWER_IS_BETTER
    if not (ours < theirs if lower else ours > theirs):
        return False, f"{metric} {ours:.4g} does not beat the champion's {theirs:.4g}"
    ours_place, theirs_place = candidate.get(place), champion.get(place)
    if (
        ours_place is not None
        and theirs_place is not None
        and ours_place < theirs_place - promote.localization_tolerance
    ):
        return False, (
            f"{metric} {ours:.4g} beats {theirs:.4g}, but {place} {ours_place:.4g} loses "
            f"more than {promote.localization_tolerance:g} against {theirs_place:.4g}"
        )
    return True, f"{metric} {ours:.4g} beats the champion's {theirs:.4g}"


def metrics_from_tags(tags: dict[str, str]) -> dict[str, float]:
    values = {}
    for name in VERSION_METRICS:
        try:
            values[name] = float(tags[name])
        except (KeyError, ValueError):
            continue
    return values


def version_tags(candidate: Candidate, pipeline_run_id: str | None) -> dict[str, str]:
    tags = {
        **candidate.tags,
        TAG_KIND: candidate.kind,
        TAG_CHECKPOINT: candidate.checkpoint_sha256,
        **{
            name: f"{float(candidate.metrics[name]):.6g}"
            for name in VERSION_METRICS
            if isinstance(candidate.metrics.get(name), int | float)
        },
    }
    if pipeline_run_id:
        tags[TAG_PIPELINE_RUN] = pipeline_run_id
    return tags


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(
            name, description="IAGN fine-grained image classifier, registered by `iagn register`"
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # a concurrent register won the race
            raise


def _existing_version(client, name: str, pipeline_run_id: str | None, sha: str):
    for version in client.search_model_versions(f"name = '{name}'"):
        tags = version.tags or {}
        if tags.get(TAG_CHECKPOINT) == sha:
            return version
        if pipeline_run_id and tags.get(TAG_PIPELINE_RUN) == pipeline_run_id:
            return version
    return None


def champion_version(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def register(
    client, candidate: Candidate, config: RegisterConfig, pipeline_run_id: str | None
) -> Outcome:
    """Register a candidate that passed the gate; set `challenger` and maybe `champion`."""
    name = config.registered_name(candidate.kind)
    outcome = Outcome(kind=candidate.kind, model_name=name, gate_passed=True)
    _ensure_registered_model(client, name)
    existing = _existing_version(client, name, pipeline_run_id, candidate.checkpoint_sha256)
    if existing is not None:
        outcome.version = str(existing.version)
        outcome.already_registered = True
        # Search results leave aliases out; the version itself has them.
        aliases = client.get_model_version(name, existing.version).aliases or []
        outcome.champion = CHAMPION in aliases
        outcome.reason = (
            f"already registered as version {existing.version} (same pipeline run or "
            "checkpoint); aliases unchanged"
        )
        return outcome
    champion = champion_version(client, name)
    created = client.create_model_version(
        name,
        source=candidate.model_uri,
        run_id=candidate.run_id,
        tags=version_tags(candidate, pipeline_run_id),
        description=f"{candidate.kind} from pipeline run {pipeline_run_id}",
        model_id=candidate.model_id,
    )
    outcome.version = str(created.version)
    client.set_registered_model_alias(name, CHALLENGER, created.version)
    promote, outcome.reason = beats(
        {k: float(v) for k, v in candidate.metrics.items() if isinstance(v, int | float)},
        None if champion is None else metrics_from_tags(champion.tags or {}),
        config.promote,
    )
    if promote:
        client.set_registered_model_alias(name, CHAMPION, created.version)
        outcome.champion = True
    return outcome
