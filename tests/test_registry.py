"""The registry step against a real MLflow server: gate, versions, tags, aliases, `iagn models`."""

from __future__ import annotations

import json
import shutil
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

from iagn import runner, tracking
from iagn.checkpoint import load_checkpoint, save_checkpoint
from iagn.errors import IagnError
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
    assert float(tags["top1"]) == pytest.approx(written["top1"], abs=1e-5)
    assert float(tags["pointing_game"]) == pytest.approx(written["pointing_game"], abs=1e-5)
    assert float(tags["latency_ms"]) == pytest.approx(written["latency_ms"], rel=1e-4)
    assert tags["iagn.kind"] == "student"
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


def _candidate(pipeline, tmp_path: Path, name: str, **changes: float) -> tuple[Path, Path]:
    """A copy of the student (new file, same weights) and its evaluation with `changes`."""
    checkpoint = load_checkpoint(pipeline.path("build/student.pt"))
    checkpoint["note"] = name  # another checkpoint file: another sha256
    path = tmp_path / f"{name}.pt"
    save_checkpoint(path, checkpoint)
    evaluation = tmp_path / f"{name}-eval"
    shutil.copytree(pipeline.path("build/eval/student"), evaluation)
    metrics = json.loads((evaluation / "metrics.json").read_text())
    metrics.update(changes)
    (evaluation / "metrics.json").write_text(json.dumps(metrics))
    return path, evaluation


def test_champion_changes_only_for_a_better_model_that_still_localizes(
    mlflow_server, tracked_pipeline, tmp_path, monkeypatch
):
    use_pipeline_env(tracked_pipeline, monkeypatch)
    client = mlflow_server.client()
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    top1, place = float(champion.tags["top1"]), float(champion.tags["pointing_game"])
    params = json.loads(json.dumps(tracked_pipeline.params))
    params["register"]["register_teacher"] = False
    params["register"]["gate"]["min_pointing_game"] = None  # the candidates below lose some

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
    gate = step.Gate(min_top1=0.8, min_pointing_game=0.5, max_latency_ms=20)
    good = {"top1": 0.9, "pointing_game": 0.6, "latency_ms": 10}
    assert step.gate_failures(good, gate) == []
    failures = step.gate_failures({"top1": 0.7, "latency_ms": 30}, gate)
    assert len(failures) == 3
    assert "pointing_game was not measured" in failures[1]
    assert step.gate_failures({"top1": 0.7}, step.Gate(min_top1=None)) == []


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
