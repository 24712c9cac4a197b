"""The registry step against a real MLflow server: gate, versions, tags, aliases, `iagn models`."""

from __future__ import annotations

import json
import math
import shutil
import zlib
from pathlib import Path

import pytest
import yaml
from mlflow_server import (
    MODEL_NAME,
    PIPELINE_EXPERIMENT,
    mlflow_server,
    register_args,
    tracked_pipeline,
)

from iagn import registry, runner, tracking
from iagn.checkpoint import load_checkpoint, save_checkpoint
from iagn.errors import IagnError
from iagn.io import sha256_file
from iagn.steps import register as step

__all__ = ["mlflow_server", "tracked_pipeline"]  # fixtures used by the tests below


def versions(server, name: str) -> list:
    client = server.client()
    found = client.search_model_versions(f"name = '{name}'")
    return sorted(
        (client.get_model_version(name, v.version) for v in found), key=lambda v: int(v.version)
    )


def test_the_pipeline_registered_student_and_teacher(mlflow_server, tracked_pipeline):
    client = mlflow_server.client()
    (student,) = versions(mlflow_server, MODEL_NAME)[:1]
    assert set(student.aliases) == {"champion", "challenger"}
    written = json.loads(tracked_pipeline.path("build/eval/student/metrics.json").read_text())
    tags = student.tags
    # Exactly the evaluated numbers (no rounding): what the champion comparison reads.
    for metric in ("top1", "pointing_game", "latency_ms", "ece"):
        assert float(tags[metric]) == written[metric], metric
    assert tags["iagn.kind"] == "student"
    assert tags[registry.TAG_EVAL_DIGEST] == written["eval_data_digest"]
    assert tags[registry.TAG_EVAL_SPLIT] == written["split"] == "test"
    checkpoint = load_checkpoint(tracked_pipeline.path("build/student.pt"))
    assert tags[registry.TAG_WEIGHTS] == registry.weights_sha256(checkpoint["model_state"])
    assert tags[registry.TAG_PROMOTION] == "promoted: there was no champion"
    assert "promoted: there was no champion" in student.description
    # The source run is the distill run that logged the model, in the pipeline's parent.
    source = client.get_run(student.run_id)
    assert source.data.tags[tracking.TAG_STEP] == "distill"
    assert tags[tracking.TAG_PIPELINE_RUN] == source.data.tags["mlflow.parentRunId"]
    assert tags["iagn.checkpoint_sha256"] == source.data.tags["iagn.checkpoint_sha256"]
    (teacher,) = versions(mlflow_server, f"{MODEL_NAME}-teacher")
    assert teacher.tags["iagn.kind"] == "teacher" and "champion" in teacher.aliases
    assert "top1_two_pass" in teacher.tags
    decisions = json.loads(tracked_pipeline.path("build/register/register.json").read_text())
    assert decisions["passed"] and [o["version"] for o in decisions["outcomes"]] == ["1", "1"]
    assert decisions["outcomes"][0]["reason"] == "there was no champion"


def test_registering_the_same_pipeline_run_again_creates_no_version(
    mlflow_server, tracked_pipeline, monkeypatch
):
    use_pipeline_env(tracked_pipeline, monkeypatch)
    monkeypatch.chdir(tracked_pipeline.project)
    before = len(versions(mlflow_server, MODEL_NAME))
    result = runner.register(
        "build/student.pt",
        "build/eval/student",
        tracked_pipeline.params,
        teacher="build/stage3.pt",
        teacher_eval="build/eval/teacher",
    )
    for outcome in result["outcomes"]:
        assert outcome["already_registered"] and outcome["version"] == "1", outcome
        assert outcome["champion"]  # aliases untouched
    assert len(versions(mlflow_server, MODEL_NAME)) == before


def use_pipeline_env(pipeline, monkeypatch) -> None:
    """This process tracks like the pipeline's steps (same server, experiment, pipeline run)."""
    for name, value in pipeline.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)


@pytest.mark.fault(
    "a student that fails the gate (register.gate: top-1, pointing game, latency)",
    sees="exit 1: `iagn: student not registered: it failed the gate` with each failed check "
    "and its threshold (`register.gate.min_top1 1.01`), and what to change",
    kept="the registry as it was (no version, the champion stays); the run is marked FAILED",
)
def test_a_model_that_fails_the_gate_is_not_registered(mlflow_server, tracked_pipeline, tmp_path):
    params = json.loads(json.dumps(tracked_pipeline.params))
    params["register"]["gate"].update(min_top1=1.01, max_latency_ms=0.001)
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump(params))
    before = len(versions(mlflow_server, MODEL_NAME))
    args = list(register_args())
    args[args.index("params.yaml")] = str(strict)
    result = tracked_pipeline.iagn(*args, check=False, IAGN_PIPELINE_RUN="gate-check")
    assert result.returncode == 1
    assert "student not registered: it failed the gate" in result.stderr
    assert "top1" in result.stderr and "register.gate.min_top1 1.01" in result.stderr
    assert "latency_ms" in result.stderr
    assert len(versions(mlflow_server, MODEL_NAME)) == before
    runs = mlflow_server.client().search_runs(
        [mlflow_server.client().get_experiment_by_name(PIPELINE_EXPERIMENT).experiment_id],
        "attributes.run_name = 'gate-check'",
    )
    assert runs[0].info.status == "FAILED"


def _candidate(
    pipeline, tmp_path: Path, name: str, same_weights: bool = False, **changes: float | str
) -> tuple[Path, Path]:
    """A copy of the student (new file; weights nudged unless `same_weights`) and its
    evaluation with `changes`."""
    checkpoint = load_checkpoint(pipeline.path("build/student.pt"))
    checkpoint["note"] = name  # another checkpoint file: another sha256
    if not same_weights:  # another model, as far as the registry can tell
        weight = next(t for t in checkpoint["model_state"].values() if t.is_floating_point())
        weight[(0,) * weight.dim()] += (zlib.crc32(name.encode()) % 1000 + 1) * 1e-6
    path = tmp_path / f"{name}.pt"
    save_checkpoint(path, checkpoint)
    evaluation = tmp_path / f"{name}-eval"
    shutil.copytree(pipeline.path("build/eval/student"), evaluation)
    metrics = json.loads((evaluation / "metrics.json").read_text())
    metrics.update(changes)
    (evaluation / "metrics.json").write_text(json.dumps(metrics))
    return path, evaluation


@pytest.mark.fault(
    "an identical model registered again (the same deterministic training rerun: another file, "
    "the same weights; or the same numbers)",
    sees="a new version with the alias challenger only, and on it, in register.json and "
    "printed: `not promoted: identical to the champion (version N): the same weights` (or "
    "`top1 ... ties with the champion's; a tie never promotes`)",
    kept="the champion alias",
)
def test_an_identical_model_never_replaces_the_champion(
    mlflow_server, tracked_pipeline, tmp_path, monkeypatch
):
    """The finding: the same deterministic student trained again (another file, the same
    weights and numbers) became champion, its full-precision top-1 against a rounded tag."""
    use_pipeline_env(tracked_pipeline, monkeypatch)
    client = mlflow_server.client()
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert champion.tags["iagn.checkpoint_sha256"] == sha256_file(
        tracked_pipeline.path("build/student.pt")
    )
    params = json.loads(json.dumps(tracked_pipeline.params))
    params["register"]["register_teacher"] = False

    # The same weights evaluated again: registered (a new file), never champion.
    path, evaluation = _candidate(tracked_pipeline, tmp_path, "retrained", same_weights=True)
    monkeypatch.setenv(tracking.ENV_PIPELINE_RUN, "identical-a")
    result = runner.register(path, evaluation, params, out=tmp_path / "identical-a")
    (outcome,) = result["outcomes"]
    expected = f"identical to the champion (version {champion.version}): the same weights"
    assert outcome["version"] != champion.version and not outcome["champion"]
    assert outcome["reason"] == expected and outcome["compared_with"] == champion.version
    recorded = client.get_model_version(MODEL_NAME, outcome["version"])
    assert recorded.tags[registry.TAG_PROMOTION] == f"not promoted: {expected}"
    assert f"not promoted: {expected}" in recorded.description
    written = json.loads((tmp_path / "identical-a" / "register.json").read_text())
    assert written["outcomes"][0]["reason"] == expected
    aliases = client.get_registered_model(MODEL_NAME).aliases
    assert aliases["champion"] == champion.version and aliases["challenger"] == outcome["version"]

    # Other weights, the very same numbers: a tie, which never promotes.
    path, evaluation = _candidate(tracked_pipeline, tmp_path, "same-numbers")
    monkeypatch.setenv(tracking.ENV_PIPELINE_RUN, "identical-b")
    (outcome,) = runner.register(path, evaluation, params)["outcomes"]
    assert not outcome["champion"]
    assert "ties with the champion's; a tie never promotes" in outcome["reason"]
    assert client.get_registered_model(MODEL_NAME).aliases["champion"] == champion.version


@pytest.mark.fault(
    "a candidate evaluated on other data than the champion (another dataset digest or split)",
    sees="a new version with the alias challenger only: `not promoted: the champion (version "
    "N) was evaluated on the test split of data ..., this version on the val split ..., so "
    "their numbers do not compare; re-evaluate the champion on this data (...) and ...`",
    kept="the champion alias",
)
def test_a_champion_evaluated_on_other_data_is_not_compared(
    mlflow_server, tracked_pipeline, tmp_path, monkeypatch
):
    use_pipeline_env(tracked_pipeline, monkeypatch)
    client = mlflow_server.client()
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    params = json.loads(json.dumps(tracked_pipeline.params))
    params["register"]["register_teacher"] = False
    # Far better, but measured on the validation split: no comparison, no promotion.
    path, evaluation = _candidate(
        tracked_pipeline, tmp_path, "other-split", split="val", top1=1.0, pointing_game=1.0
    )
    monkeypatch.setenv(tracking.ENV_PIPELINE_RUN, "other-data")
    (outcome,) = runner.register(path, evaluation, params)["outcomes"]
    assert not outcome["champion"]
    reason = outcome["reason"]
    digest = champion.tags[registry.TAG_EVAL_DIGEST][:12]
    assert f"the champion (version {champion.version}) was evaluated on the test split" in reason
    assert f"this version on the val split of data {digest}" in reason
    assert "do not compare" in reason and "iagn evaluate --model" in reason
    assert client.get_registered_model(MODEL_NAME).aliases["champion"] == champion.version


def test_champion_changes_only_for_a_better_model_that_still_localizes(
    mlflow_server, tracked_pipeline, tmp_path, monkeypatch
):
    use_pipeline_env(tracked_pipeline, monkeypatch)
    client = mlflow_server.client()
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    top1, place = float(champion.tags["top1"]), float(champion.tags["pointing_game"])
    params = json.loads(json.dumps(tracked_pipeline.params))
    params["register"]["register_teacher"] = False
    params["register"]["gate"]["min_pointing_game_lift"] = None  # the candidates below lose some

    # Better top-1, but it gives up localization: challenger only.
    path, evaluation = _candidate(
        tracked_pipeline, tmp_path, "sharper", top1=top1 + 0.1, pointing_game=place - 0.5
    )
    monkeypatch.setenv(tracking.ENV_PIPELINE_RUN, "promote-a")
    result = runner.register(path, evaluation, params)
    (outcome,) = result["outcomes"]
    assert not outcome["champion"] and "loses more than 0.02" in outcome["reason"]
    aliases = client.get_registered_model(MODEL_NAME).aliases
    assert aliases["challenger"] == outcome["version"] != aliases["champion"]

    # Better, but a sweep's winner (may_promote False): challenger only, the verdict kept.
    path, evaluation = _candidate(
        tracked_pipeline, tmp_path, "swept", top1=top1 + 0.1, pointing_game=place
    )
    monkeypatch.setenv(tracking.ENV_PIPELINE_RUN, "promote-swept")
    (outcome,) = runner.register(path, evaluation, params, may_promote=False)["outcomes"]
    assert not outcome["champion"]
    assert outcome["reason"].startswith("challenger only (a sweep's winner); it would be: top1")
    aliases = client.get_registered_model(MODEL_NAME).aliases
    assert aliases["challenger"] == outcome["version"] != aliases["champion"]

    # Better top-1 within the localization tolerance: the new champion.
    path, evaluation = _candidate(
        tracked_pipeline, tmp_path, "better", top1=top1 + 0.1, pointing_game=place - 0.01
    )
    monkeypatch.setenv(tracking.ENV_PIPELINE_RUN, "promote-b")
    (outcome,) = runner.register(path, evaluation, params)["outcomes"]
    assert outcome["champion"]
    aliases = client.get_registered_model(MODEL_NAME).aliases
    assert aliases["champion"] == aliases["challenger"] == outcome["version"]
    # The model was not logged by a tracked training run, so register logged it itself.
    version = client.get_model_version(MODEL_NAME, outcome["version"])
    assert client.get_run(version.run_id).data.tags[tracking.TAG_STEP] == "register"

    table = tracked_pipeline.iagn("models", "--params", "params.yaml").stdout
    rows = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert rows[outcome["version"]].split()[1] == "champion,challenger"
    assert rows["1"].split()[1] == "-"
    assert f"{top1 + 0.1:.4g}" in rows[outcome["version"]]
    assert table.splitlines()[1].split()[:4] == ["version", "aliases", "kind", "top1"]


def test_models_names_a_missing_registered_model(tracked_pipeline):
    result = tracked_pipeline.iagn("models", "--name", "no-such-model", check=False)
    assert result.returncode == 2
    assert "no registered model named 'no-such-model'" in result.stderr


def test_gate_checks():
    gate = step.Gate(min_top1=0.8, min_pointing_game_lift=0.5, max_latency_ms=20)
    good = {"top1": 0.9, "pointing_game": 0.7, "pointing_game_lift": 0.6, "latency_ms": 10}
    assert step.gate_failures(good, gate) == []
    failures = step.gate_failures({"top1": 0.7, "latency_ms": 30}, gate)
    assert len(failures) == 3
    assert "pointing_game_lift was not measured" in failures[1]
    assert step.gate_failures({"top1": 0.7}, step.Gate(min_top1=None)) == []
    # A map at chance on large boxes: a high pointing game, no lift; the gate stops it.
    at_chance = {**good, "pointing_game": 0.55, "pointing_game_lift": 0.02}
    assert step.gate_failures(at_chance, gate) == [
        "pointing_game_lift 0.02 is not >= register.gate.min_pointing_game_lift 0.5"
    ]


def test_the_absolute_pointing_floor_is_refused_with_its_replacement():
    params = {"register": {"gate": {"min_pointing_game": 0.05}}}
    with pytest.raises(IagnError, match="replaced by min_pointing_game_lift"):
        step.register_config(params)


def test_promotion_rules():
    promote = step.Promote(metric="top1", localization_metric="pointing_game")
    champion = {"top1": 0.8, "pointing_game": 0.6}
    assert step.beats({"top1": 0.8, "pointing_game": 0.9}, champion, promote)[0] is False
    assert step.beats({"top1": 0.81, "pointing_game": 0.585}, champion, promote)[0] is True
    assert step.beats({"top1": 0.81, "pointing_game": 0.57}, champion, promote)[0] is False
    assert step.beats({"top1": 0.1}, None, promote) == (True, "there was no champion")
    faster = step.Promote(metric="latency_ms")
    assert step.beats({"latency_ms": 5}, {"latency_ms": 9}, faster)[0] is True
    assert step.beats({"latency_ms": 12}, {"latency_ms": 9}, faster)[0] is False


def test_register_config_is_checked():
    config = step.register_config({"register": {"model_name": "birds", "gate": {"min_top1": 0.5}}})
    assert config.registered_name("teacher") == "birds-teacher"
    assert config.gate.min_top1 == 0.5 and config.promote.metric == "top1"
    with pytest.raises(IagnError, match=r"register.gate` has unknown keys \['min_top5'\]"):
        step.register_config({"register": {"gate": {"min_top5": 0.5}}})
    with pytest.raises(IagnError, match="model_name"):
        step.register_config({"register": {"model_name": "it's"}})


def _tags(top1: float, **extra: str) -> dict[str, str]:
    candidate = step.Candidate(
        kind="student",
        model_uri="models:/m-1",
        run_id=None,
        model_id=None,
        checkpoint_sha256=extra.pop("sha", "a" * 64),
        weights_sha256=extra.pop("weights", "w" * 64),
        metrics={"top1": top1, "pointing_game": 0.5, "data_digest": "d" * 64, "split": "test"},
    )
    return {**step.version_tags(candidate, "run"), **extra}


def test_promotion_compares_like_with_like():
    promote = step.Promote()
    # The finding's numbers: written and read back through one encoding, exactly.
    tags = _tags(0.74333334)
    assert tags["top1"] == "0.74333334"
    assert step.metrics_from_tags(tags)["top1"] == 0.74333334
    again = _tags(0.74333334, sha="b" * 64, weights="v" * 64)
    promoted, reason = step.decide("iagn", again, tags, "1", promote)
    assert not promoted and reason == "top1 0.7433 ties with the champion's; a tie never promotes"
    # Digits enough to tell two close numbers apart.
    better = _tags(0.74333335, sha="b" * 64, weights="v" * 64)
    assert step.decide("iagn", better, tags, "1", promote) == (
        True,
        "top1 0.7433334 beats the champion's 0.7433333",
    )
    # The same checkpoint file or the same weights: never promoted, whatever the numbers.
    same_file = _tags(0.9, weights="v" * 64)
    assert step.decide("iagn", same_file, tags, "1", promote) == (
        False,
        "identical to the champion (version 1): the same checkpoint file",
    )
    same_weights = _tags(0.9, sha="b" * 64)
    assert step.decide("iagn", same_weights, tags, "1", promote)[1].endswith("the same weights")
    # Other evaluation data, or none recorded (a champion registered by an older iagn).
    other = _tags(0.9, sha="b" * 64, weights="v" * 64, **{registry.TAG_EVAL_DIGEST: "e" * 64})
    promoted, reason = step.decide("iagn", other, tags, "1", promote)
    assert not promoted and "was evaluated on the test split of data dddddddddddd" in reason
    assert "this version on the test split of data eeeeeeeeeeee" in reason
    assert "models:/iagn/1" in reason and "set_registered_model_alias('iagn'" in reason
    legacy = {"top1": "0.743333", "iagn.checkpoint_sha256": "c" * 64}
    promoted, reason = step.decide("iagn", better, legacy, "1", promote)
    assert not promoted and "has no recorded evaluation data" in reason
    assert step.decide("iagn", better, None, None, promote) == (True, "there was no champion")


def test_metrics_from_tags_skips_what_is_not_a_finite_number():
    tags = {"top1": "nan", "ece": "inf", "pointing_game": "0.5", "latency_ms": "fast"}
    assert step.metrics_from_tags(tags) == {"pointing_game": 0.5}
    assert math.isnan(float(_tags(float("nan"))["top1"]))
    promote = step.Promote()
    assert step.beats({"top1": 0.8}, {"top1": 0.8}, promote)[0] is False
    assert step.beats({"top1": 0.8}, {}, promote) == (True, "the champion has no top1")


def test_weights_digest_ignores_everything_but_the_weights():
    import torch

    state = {"w": torch.ones(2, 3), "steps": torch.tensor(7), "h": torch.zeros(2).bfloat16()}
    digest = registry.weights_sha256(state)
    assert registry.weights_sha256(dict(reversed(state.items()))) == digest
    state["w"][0, 0] = 1.0000001
    assert registry.weights_sha256(state) != digest
