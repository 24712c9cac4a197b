"""Step `register`: the quality gate, then the MLflow Model Registry with two aliases.

A candidate (the student; the teacher too when `register.register_teacher`) is registered
only when its evaluation (metrics.json of `iagn evaluate`) passes every check of
`register.gate` in params.yaml: top-1 at least `min_top1`, pointing game at least
`min_pointing_game_lift` above its chance level (so a map that points at random cannot
pass), latency at most `max_latency_ms` (null skips a check). The student goes
to the registered model `register.model_name`, the teacher to `<model_name>-teacher`.

Each new version carries its evaluation as tags: the metrics of VERSION_METRICS written as
`repr(float)` (exact: the float reads back bit for bit), the data it was evaluated on
(`iagn.eval_data_digest`, `iagn.eval_split`), the sha256 of the checkpoint file and of the
weights alone. It gets the alias `challenger`, and becomes `champion` by these rules (first
match wins), comparing like with like:
  1. there is no champion: promoted;
  2. the champion is the same model (same checkpoint sha256 or same weights sha256): not;
  3. the champion's evaluation data (digest and split) is not recorded or differs: not,
     with what to do (re-evaluate the champion on this data and move the alias by hand);
  4. on `promote.metric` (higher is better, except for LOWER_IS_BETTER metrics) a tie or
     worse: not; a tie never promotes;
  5. better, but more than `promote.localization_tolerance` worse on
     `promote.localization_metric`: not;
  6. otherwise promoted.
Both sides of the comparison are read back from the registry's version tags through the
same decoding (`metrics_from_tags`), so a candidate's full-precision number never meets a
champion's rounded one. The decision is recorded on the version (tag `iagn.promotion`,
"promoted: WHY" or "not promoted: WHY", and its description) and returned for
register.json.

Concurrency: reading the champion, creating the version and moving the aliases happen
inside the registry's promotion lock (iagn/registry.py: a registered model
`<name>.promotion-lock` whose creation is atomic in MLflow's database), so two pipeline runs
registering at once end with both versions and the champion alias on the better one.

Registering is idempotent: a version of the same model that carries the same pipeline run id
or the same checkpoint sha256 is reported back instead of creating a second one, and its
aliases are left as they are. A version left "pending" (its registration died between
creating it and deciding) has its decision finished by the rerun.

Everything here works on an `MlflowClient` and plain values; `iagn/runner.py` finds the
logged models and opens the step's MLflow run.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from iagn.errors import IagnError
from iagn.registry import (
    CHALLENGER,
    CHAMPION,
    LOCK_STALE_AFTER_S,
    LOCK_TIMEOUT_S,
    TAG_CHECKPOINT,
    TAG_COMPARED,
    TAG_EVAL_DEVICE,
    TAG_EVAL_DIGEST,
    TAG_EVAL_SPLIT,
    TAG_KIND,
    TAG_PROMOTION,
    TAG_WEIGHTS,
    VERSION_METRICS,
    lock_holder,
    promotion_lock,
)
from iagn.tracking import TAG_PIPELINE_RUN

LOWER_IS_BETTER = frozenset({"latency_ms", "ece", "checkpoint_mb", "parameters"})
PENDING = "pending"
_MODEL_NAME = re.compile(r"^[\w.\- ]{1,200}$")


@dataclass
class Gate:
    min_top1: float | None = None
    # Pointing game minus its chance level (what a random peak scores on these boxes).
    min_pointing_game_lift: float | None = None
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
    lock_timeout_s: float = LOCK_TIMEOUT_S  # wait this long for another registration
    lock_stale_after_s: float = LOCK_STALE_AFTER_S  # a lock this old belongs to a dead step

    def registered_name(self, kind: str) -> str:
        return self.model_name if kind == "student" else f"{self.model_name}-teacher"


def register_config(params: dict) -> RegisterConfig:
    """The `register` section of params.yaml, checked (unknown keys are named)."""
    from iagn.train.config import from_mapping  # imports torch: not for `iagn models --name`

    values = dict(params.get("register") or {})
    gate_values = values.pop("gate", None) or {}
    if "min_pointing_game" in gate_values:
        raise IagnError(
            "params.yaml register.gate.min_pointing_game was replaced by "
            "min_pointing_game_lift: an absolute floor lets a chance-level map through (a "
            "random peak hits a box covering a fifth of the image a fifth of the time). Set "
            "min_pointing_game_lift, the pointing game minus its chance level, e.g. 0.3"
        )
    gate = from_mapping(Gate, gate_values, "register.gate")
    promote = from_mapping(Promote, values.pop("promote", None) or {}, "register.promote")
    config = from_mapping(RegisterConfig, values, "register")
    config.gate, config.promote = gate, promote
    if not _MODEL_NAME.match(str(config.model_name)):
        raise IagnError(
            f"params.yaml register.model_name {config.model_name!r} must be 1-200 letters, "
            "digits, spaces, dots, dashes or underscores"
        )
    for key in ("lock_timeout_s", "lock_stale_after_s"):
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise IagnError(f"params.yaml register.{key} must be a number of seconds > 0")
    return config


@dataclass
class Candidate:
    """A model ready to register: where MLflow logged it and how it evaluated."""

    kind: str  # "student" or "teacher"
    model_uri: str  # models:/<model_id>
    run_id: str | None  # the run that logged it: the version's source run
    model_id: str | None
    checkpoint_sha256: str
    metrics: dict[str, Any]  # metrics.json of `iagn evaluate`
    tags: dict[str, str] = field(default_factory=dict)  # provenance (git, data version)
    weights_sha256: str | None = None  # of the weights alone (iagn.registry.weights_sha256)


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
    compared_with: str | None = None  # the champion's version the decision was made against

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate_failures(metrics: dict[str, Any], gate: Gate) -> list[str]:
    """Each failed check of the gate, as a sentence; empty when the model may be registered."""
    checks = (
        ("top1", gate.min_top1, "min_top1", ">="),
        ("pointing_game_lift", gate.min_pointing_game_lift, "min_pointing_game_lift", ">="),
        ("latency_ms", gate.max_latency_ms, "max_latency_ms", "<="),
    )
    failures = []
    for metric, bound, key, op in checks:
        if bound is None:
            continue
        value = metrics.get(metric)
        if not isinstance(value, int | float):
            failures.append(
                f"{metric} was not measured (a dataset without boxes has no pointing game); "
                f"set register.gate.{key} to null to skip this check"
            )
        elif (value < bound) if op == ">=" else (value > bound):
            failures.append(f"{metric} {value:.4g} is not {op} register.gate.{key} {bound:.4g}")
    return failures


def _shown(ours: float, theirs: float) -> tuple[str, str]:
    """Both numbers with the fewest digits (at least 4) that tell them apart."""
    for digits in range(4, 18):
        a, b = f"{ours:.{digits}g}", f"{theirs:.{digits}g}"
        if a != b or ours == theirs:
            return a, b
    return repr(ours), repr(theirs)


def beats(candidate: dict[str, float], champion: dict[str, float] | None, promote: Promote):
    """(whether the candidate should become champion, why) from the two sets of metrics.

    Both sets must come from the same source at the same precision (`metrics_from_tags`).
    """
    if champion is None:
        return True, "there was no champion"
    metric, place = promote.metric, promote.localization_metric
    ours, theirs = candidate.get(metric), champion.get(metric)
    if ours is None:
        return False, f"the candidate has no {metric}"
    if theirs is None:
        return True, f"the champion has no {metric}"
    shown_ours, shown_theirs = _shown(ours, theirs)
    if ours == theirs:
        return False, f"{metric} {shown_ours} ties with the champion's; a tie never promotes"
    lower = metric in LOWER_IS_BETTER
    if not (ours < theirs if lower else ours > theirs):
        return False, f"{metric} {shown_ours} does not beat the champion's {shown_theirs}"
    ours_place, theirs_place = candidate.get(place), champion.get(place)
    if (
        ours_place is not None
        and theirs_place is not None
        and ours_place < theirs_place - promote.localization_tolerance
    ):
        return False, (
            f"{metric} {shown_ours} beats {shown_theirs}, but {place} {ours_place:.4g} loses "
            f"more than {promote.localization_tolerance:g} against {theirs_place:.4g}"
        )
    return True, f"{metric} {shown_ours} beats the champion's {shown_theirs}"


def metrics_from_tags(tags: dict[str, str]) -> dict[str, float]:
    """The finite metrics among a version's tags (a NaN compares as not measured)."""
    values = {}
    for name in VERSION_METRICS:
        try:
            value = float(tags[name])
        except (KeyError, ValueError):
            continue
        if math.isfinite(value):
            values[name] = value
    return values


def evaluation_of(tags: dict[str, str]) -> tuple[str, str] | None:
    """(data digest, split) a version was evaluated on; None when not recorded."""
    digest, split = tags.get(TAG_EVAL_DIGEST), tags.get(TAG_EVAL_SPLIT)
    return (digest, split) if digest and split else None


def version_tags(candidate: Candidate, pipeline_run_id: str | None) -> dict[str, str]:
    metrics = candidate.metrics
    tags = {
        **candidate.tags,
        TAG_KIND: candidate.kind,
        TAG_CHECKPOINT: candidate.checkpoint_sha256,
        # repr: the shortest text that reads back as the same float (no rounding).
        **{
            name: repr(float(metrics[name]))
            for name in VERSION_METRICS
            if isinstance(metrics.get(name), int | float) and not isinstance(metrics[name], bool)
        },
    }
    # The digest of the images evaluated (`eval_data_digest`); metrics files written before
    # evaluate recorded it have only `data_digest`, the checkpoint's training data.
    digest = metrics.get("eval_data_digest") or metrics.get("data_digest")
    if digest:
        tags[TAG_EVAL_DIGEST] = str(digest)
        tags[TAG_EVAL_SPLIT] = str(metrics.get("split") or "test")
    if metrics.get("device"):
        tags[TAG_EVAL_DEVICE] = str(metrics["device"])
    if candidate.weights_sha256:
        tags[TAG_WEIGHTS] = candidate.weights_sha256
    if pipeline_run_id:
        tags[TAG_PIPELINE_RUN] = pipeline_run_id
    return tags


def _short_data(evaluation: tuple[str, str]) -> str:
    digest, split = evaluation
    return f"the {split} split of data {digest[:12]}"


def decide(
    name: str,
    candidate: dict[str, str],
    champion: dict[str, str] | None,
    champion_version: str | None,
    promote: Promote,
) -> tuple[bool, str]:
    """(promote?, why) for a version against the champion, both as registry tags."""
    if champion is None:
        return True, "there was no champion"
    who = f"the champion (version {champion_version})"
    if candidate.get(TAG_CHECKPOINT) == champion.get(TAG_CHECKPOINT):
        return False, f"identical to {who}: the same checkpoint file"
    weights = candidate.get(TAG_WEIGHTS)
    if weights and weights == champion.get(TAG_WEIGHTS):
        return False, f"identical to {who}: the same weights"
    ours, theirs = evaluation_of(candidate), evaluation_of(champion)
    if ours is None or theirs is None or ours != theirs:
        if theirs is None:
            what = f"{who} has no recorded evaluation data (registered by an older iagn)"
        elif ours is None:
            what = "this version has no recorded evaluation data"
        else:
            what = f"{who} was evaluated on {_short_data(theirs)}, this version on " + (
                _short_data(ours)
            )
        return False, (
            f"{what}, so their numbers do not compare; re-evaluate the champion on this data "
            f"(`mlflow artifacts download -u models:/{name}/{champion_version} -d champion`, "
            "`iagn evaluate --model champion/artifacts/model.pt --data DATA --out "
            "build/eval/champion`) and, if this version is better, move the alias: "
            f"MlflowClient().set_registered_model_alias('{name}', 'champion', VERSION)"
        )
    return beats(metrics_from_tags(candidate), metrics_from_tags(champion), promote)


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
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None  # no champion yet
        raise


def _alias_version(client, name: str, alias: str) -> str | None:
    number = client.get_registered_model(name).aliases.get(alias)
    return None if number is None else str(number)


def _decide_and_record(
    client, name: str, version: str, promote: Promote, outcome: Outcome, may_promote: bool
):
    """Under the lock: compare with the champion, move the aliases, record the decision."""
    # Both sides read back from the registry: the same tags, the same precision.
    ours = client.get_model_version(name, version).tags or {}
    champion = champion_version(client, name)
    challenger = _alias_version(client, name, CHALLENGER)
    # The newest version is the challenger (a rerun of an older pending one leaves it).
    if challenger is None or int(challenger) <= int(version):
        client.set_registered_model_alias(name, CHALLENGER, version)
    if champion is not None and str(champion.version) == version:
        promoted, reason = True, "it is the champion already"  # a rerun after the alias moved
    else:
        outcome.compared_with = None if champion is None else str(champion.version)
        promoted, reason = decide(
            name,
            ours,
            None if champion is None else champion.tags or {},
            outcome.compared_with,
            promote,
        )
        if promoted and not may_promote:
            promoted, reason = False, f"{CHALLENGER} only (a sweep's winner); it would be: {reason}"
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    # Recorded after the aliases: a "pending" tag means the aliases may not be set yet.
    decision = f"{'promoted' if promoted else 'not promoted'}: {reason}"
    if outcome.compared_with is not None:
        client.set_model_version_tag(name, version, TAG_COMPARED, outcome.compared_with)
    client.set_model_version_tag(name, version, TAG_PROMOTION, decision)
    run = ours.get(TAG_PIPELINE_RUN)
    client.update_model_version(
        name, version, description=f"{outcome.kind} from pipeline run {run}; {decision}"
    )
    outcome.champion, outcome.reason = promoted, reason


def register(
    client,
    candidate: Candidate,
    config: RegisterConfig,
    pipeline_run_id: str | None,
    may_promote: bool = True,
) -> Outcome:
    """Register a candidate that passed the gate; set `challenger` and maybe `champion`.

    `may_promote` False (a sweep's winner): `challenger` only; the decision records whether
    the rules would have promoted it, for a person to move `champion`.
    """
    name = config.registered_name(candidate.kind)
    outcome = Outcome(kind=candidate.kind, model_name=name, gate_passed=True)
    _ensure_registered_model(client, name)
    with promotion_lock(
        client,
        name,
        lock_holder(pipeline_run_id),
        timeout_s=config.lock_timeout_s,
        stale_after_s=config.lock_stale_after_s,
    ):
        existing = _existing_version(client, name, pipeline_run_id, candidate.checkpoint_sha256)
        if existing is not None:
            outcome.version = str(existing.version)
            # Search results leave aliases out; the version itself has them.
            found = client.get_model_version(name, existing.version)
            recorded = (found.tags or {}).get(TAG_PROMOTION)
            if recorded != PENDING:
                outcome.already_registered = True
                outcome.champion = CHAMPION in (found.aliases or [])
                outcome.reason = (
                    f"already registered as version {existing.version} (same pipeline run or "
                    "checkpoint); aliases unchanged"
                    + (f"; recorded then: {recorded}" if recorded else "")
                )
                return outcome
            # Its registration died before deciding: decide now, against today's champion,
            # and report it as registered now (its aliases are set now).
        else:
            created = client.create_model_version(
                name,
                source=candidate.model_uri,
                run_id=candidate.run_id,
                tags={**version_tags(candidate, pipeline_run_id), TAG_PROMOTION: PENDING},
                description=f"{candidate.kind} from pipeline run {pipeline_run_id}; deciding",
                model_id=candidate.model_id,
            )
            outcome.version = str(created.version)
        _decide_and_record(client, name, outcome.version, config.promote, outcome, may_promote)
    return outcome
