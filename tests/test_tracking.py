"""MLflow tracking against a real server: parent and nested runs, tags, params, metrics,
artifacts in S3, datasets, failures, the parent's status and who ends it, DVC and KFP
parents, the embedded default, MLflow's HTTP limits, secrets."""

from __future__ import annotations

import json
import os

import pytest
from helpers import BIN, dvc, free_port, iagn, run
from mlflow_server import (
    FAKE_DATA_MD5,
    PIPELINE_EXPERIMENT,
    PIPELINE_RUN,
    SECRETS,
    STEP_RUNS,
    experiment_runs,
    mlflow_server,
    tracked_pipeline,
)

from iagn import provenance, redact, runner, tracking
from iagn.checkpoint import load_checkpoint
from iagn.errors import IagnError

__all__ = ["mlflow_server", "tracked_pipeline"]  # fixtures used by the tests below


def pipeline_runs(server) -> tuple[object, dict[str, object]]:
    """(parent, {step name: nested run}) of the shared pipeline run."""
    runs = experiment_runs(server, PIPELINE_EXPERIMENT)
    parents = [
        r for r in runs if r.data.tags.get(tracking.TAG_PIPELINE_KEY) == f"pipeline:{PIPELINE_RUN}"
    ]
    assert len(parents) == 1, [r.data.tags for r in parents]
    parent = parents[0]
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    by_step = {}
    for item in nested:  # first registration only (the registry tests register again)
        step = item.data.tags[tracking.TAG_STEP]
        if step not in by_step or item.info.start_time < by_step[step].info.start_time:
            by_step[step] = item
    return parent, by_step


@pytest.fixture(scope="module")
def runs(mlflow_server, tracked_pipeline):
    return pipeline_runs(mlflow_server)


def test_one_parent_run_and_one_nested_run_per_step(runs, tracked_pipeline):
    parent, steps = runs
    assert set(steps) == STEP_RUNS
    assert parent.info.run_name == PIPELINE_RUN
    assert parent.data.tags[tracking.TAG_ROLE] == "pipeline"
    # `iagn register`, the last step of a pipeline named by IAGN_PIPELINE_RUN, ended it.
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[tracking.TAG_OUTCOME] == "succeeded"
    head = run(["git", "rev-parse", "HEAD"], cwd=tracked_pipeline.project).stdout.strip()
    for name, step in steps.items():
        tags = step.data.tags
        assert step.info.status == "FINISHED", (name, tags.get(tracking.TAG_ERROR))
        assert tags[tracking.TAG_PIPELINE_RUN] == parent.info.run_id
        assert tags[provenance.TAG_GIT_COMMIT] == head
        assert tags[provenance.TAG_GIT_DIRTY] == "false"
        assert tags[provenance.TAG_DATA_VERSION] == FAKE_DATA_MD5
        assert tags[tracking.TAG_OUTCOME] == "succeeded"
    assert parent.data.tags[provenance.TAG_GIT_COMMIT] == head


def test_params_are_the_flattened_sections_of_each_step(runs, tracked_pipeline):
    _, steps = runs
    params = tracked_pipeline.params
    stage2 = steps["train-stage-2"].data.params
    assert stage2["train.lr_head"] == str(params["train"]["lr_head"])
    assert stage2["stage2.epochs"] == "1"
    assert stage2["model.jigsaw"] == "[8, 4, 2]"
    assert stage2["data.crop"] == "64"
    assert not any(key.startswith(("distill.", "stage1.", "register.")) for key in stage2)
    validate = steps["validate"].data.params
    assert validate["validate.expectations.min_images_per_class.min_count"] == "1"
    assert validate["validate.decode_sample"] == "null"
    assert steps["distill"].data.params["distill.student"] == "resnet18"
    assert steps["register"].data.params["register.gate.min_top1"] == "0.0"


def test_per_epoch_metrics_of_training(mlflow_server, runs):
    _, steps = runs
    client = mlflow_server.client()
    stage1 = steps["train-stage-1"].info.run_id
    assert [m.step for m in client.get_metric_history(stage1, "loss")] == [1, 2]
    for key in ("loss_head1", "val_acc", "val_acc_head1", "val_acc_fused", "images_per_s"):
        assert len(client.get_metric_history(stage1, key)) == 2, key
    assert {"lr_head", "lr_backbone", "loss_head3", "val_acc_head3"} <= set(
        steps["train-stage-3"].data.metrics
    )
    assert {"loss", "loss_kd", "val_acc"} <= set(steps["distill"].data.metrics)
    # The temperature fitted after the last epoch reaches the run too.
    for step in ("train-stage-3", "distill"):
        logged = steps[step].data.metrics
        assert 0.05 <= logged["temperature"] <= 20.0, step
        assert logged["val_nll_calibrated"] <= logged["val_nll"] + 1e-6, step


def test_final_evaluation_metrics_and_artifacts_in_s3(mlflow_server, runs, tracked_pipeline):
    _, steps = runs
    teacher = steps["evaluate-teacher"]
    written = json.loads(tracked_pipeline.path("build/eval/teacher/metrics.json").read_text())
    for key in (
        "top1_head1",
        "top1_head3",
        "top1_fused",
        "top1_combined",
        "top1_two_pass",
        "ece",
        "pointing_game",
        "box_accuracy",
        "latency_ms",
        "throughput_ips",
    ):
        assert teacher.data.metrics[key] == pytest.approx(written[key]), key
    assert any(key.startswith("class_acc/") for key in teacher.data.metrics)

    objects = mlflow_server.s3_objects()

    def stored(run_, path: str) -> bytes:
        suffix = f"/{run_.info.run_id}/artifacts/{path}"
        matches = [key for key in objects if key.startswith("mlflow/") and key.endswith(suffix)]
        assert len(matches) == 1, (path, [k for k in objects if run_.info.run_id in k])
        return objects[matches[0]]

    for name in (
        "attention_gallery.png",
        "confusion_matrix.png",
        "reliability.png",
        "localization.png",
        "confused_pairs.png",
    ):
        assert stored(teacher, name)[:4] == b"\x89PNG"
    assert json.loads(stored(teacher, "metrics.json"))["top1"] == written["top1"]
    validate = steps["validate"]
    assert b"<html" in stored(validate, "data_docs/index.html").lower()
    assert b"expectation" in stored(validate, "summary.md").lower()
    assert json.loads(stored(validate, "validation.json"))["success"] is True
    # The models' files (weights, MLmodel, the bundled iagn package) are in S3 too.
    model_files = [key for key in objects if key.startswith("mlflow/") and "/models/" in key]
    assert any(key.endswith("/MLmodel") for key in model_files)
    assert any(key.endswith("/code/iagn/serving.py") for key in model_files)


def test_dataset_is_logged_with_its_digest(runs, tracked_pipeline):
    _, steps = runs
    digest = load_checkpoint(tracked_pipeline.path("build/stage3.pt"))["data"]["digest"]
    for name, context in (
        ("train-stage-3", "train"),
        ("distill", "train"),
        ("evaluate-student", "test"),
    ):
        inputs = steps[name].inputs.dataset_inputs
        assert len(inputs) == 1, name
        assert inputs[0].dataset.digest == digest[: tracking.DATASET_DIGEST_CHARS]
        assert inputs[0].dataset.name == f"cub:{tracked_pipeline.data.name}"
        assert [tag.value for tag in inputs[0].tags] == [context]
        assert steps[name].data.tags[tracking.TAG_DATA_DIGEST] == digest


def test_teacher_and_student_are_logged_as_models(mlflow_server, runs):
    import mlflow

    _, steps = runs
    for step, kind in (("train-stage-3", "teacher"), ("distill", "student")):
        tags = steps[step].data.tags
        assert tags["iagn.kind"] == kind
        model = mlflow.MlflowClient(mlflow_server.url).get_logged_model(tags["iagn.model_id"])
        assert model.source_run_id == steps[step].info.run_id
        assert model.name == kind


def test_no_secret_appears_in_anything_logged(mlflow_server, tracked_pipeline):
    """Fake AWS keys and a tracking password were in every step's environment and URI."""
    client = mlflow_server.client()
    texts = [*tracked_pipeline.logs, mlflow_server.log.read_text()]
    for experiment in client.search_experiments():
        texts += [experiment.artifact_location, json.dumps(experiment.tags)]
        for item in client.search_runs([experiment.experiment_id], max_results=1000):
            texts += [json.dumps(item.data.params), json.dumps(item.data.tags)]
            texts += list(item.data.metrics)
            for dataset in item.inputs.dataset_inputs:
                texts.append(str(dataset.dataset.source))
    for model in client.search_registered_models():
        for version in client.search_model_versions(f"name = '{model.name}'"):
            texts += [version.source, version.description or "", json.dumps(version.tags)]
    blob = "\n".join(texts).encode()
    blobs = [blob, *mlflow_server.s3_objects().values()]
    assert blob.count(b"\n") > 100  # the scan saw a lot
    for secret in SECRETS:
        leaks = [i for i, data in enumerate(blobs) if secret.encode() in data]
        assert not leaks, f"{secret} leaked"
    # The links MLflow prints name the server without the password.
    assert any(mlflow_server.url in text for text in tracked_pipeline.logs)


@pytest.mark.fault(
    "an MLflow tracking server that is unreachable when a step starts",
    sees="exit 2 within seconds: `the MLflow tracking server http://... is unreachable "
    "(...); start it, fix MLFLOW_TRACKING_URI, or unset MLFLOW_TRACKING_URI ...`; no "
    "password shown",
    kept="everything: the step does not start",
)
def test_an_unreachable_server_is_a_clear_error(tracked_pipeline):
    port = free_port()  # nothing listens here
    result = iagn(
        "validate",
        "--data",
        str(tracked_pipeline.data),
        "--params",
        "params.yaml",
        "--out",
        "build/v2",
        cwd=tracked_pipeline.project,
        env={"MLFLOW_TRACKING_URI": f"http://someone:pw-secret@127.0.0.1:{port}"},
        check=False,
    )
    assert result.returncode == 2
    assert f"MLflow tracking server http://127.0.0.1:{port} is unreachable" in result.stderr
    assert "Connection refused" in result.stderr
    # The step gave up within MLflow's own limits, as configure() set them.
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT=15, MLFLOW_HTTP_REQUEST_MAX_RETRIES=2" in result.stderr
    assert "MLFLOW_TRACKING_URI" in result.stderr and "pw-secret" not in result.stderr
    assert "Traceback" not in result.stderr


def test_configure_sets_mlflows_http_limits_unless_the_user_did(mlflow_server, monkeypatch):
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    for name, value in mlflow_server.env("limits-test").items():
        monkeypatch.setenv(name, value)
    for name in tracking.HTTP_SETTINGS:
        monkeypatch.setenv(name, "0")  # so that monkeypatch restores the state before
        monkeypatch.delenv(name)
    assert tracking.configure() == mlflow_server.url
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 15
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 2

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    tracking.configure()
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 300
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 7
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_server.url  # the password moved out


@pytest.fixture
def tracked_here(mlflow_server, monkeypatch):
    """Track into the server from this process, in a fresh experiment, no pipeline variables."""

    def use(experiment: str, **env: str) -> None:
        for name in (
            tracking.ENV_PARENT_RUN,
            tracking.ENV_PIPELINE_RUN,
            provenance.ENV_KFP_RUN,
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
        ):
            monkeypatch.delenv(name, raising=False)
        for name, value in {**mlflow_server.env(experiment), **env}.items():
            monkeypatch.setenv(name, value)

    return use


def test_a_failing_step_marks_its_run_and_the_parent_failed(
    mlflow_server, tracked_here, tracked_pipeline
):
    tracked_here("failing-test", IAGN_PIPELINE_RUN="failing-run")
    params = tracked_pipeline.params
    missing = tracked_pipeline.path("build/missing.pt")
    with pytest.raises(IagnError, match=r"missing\.pt does not exist"):
        runner.train_stage(2, tracked_pipeline.data, params, missing.with_name("x.pt"), missing)
    runs = experiment_runs(mlflow_server, "failing-test")
    parent = next(r for r in runs if r.info.run_name == "failing-run")
    (step,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert step.info.status == "FAILED" and parent.info.status == "FAILED"
    assert "does not exist" in step.data.tags[tracking.TAG_ERROR]
    assert step.data.tags[tracking.TAG_OUTCOME] == "failed"
    assert parent.data.tags[tracking.TAG_OUTCOME] == "failed"
    assert parent.data.tags[tracking.TAG_ERROR].startswith("train-stage-2: IagnError: ")


def parent_run(server, step: tracking.StepRun):
    return server.client().get_run(step.parent_id)


def test_a_successful_step_leaves_the_parent_running_the_end_finishes_it_once(
    mlflow_server, tracked_here
):
    tracked_here("end-test", IAGN_PIPELINE_RUN="end-run")
    with tracking.step_run("validate") as first:
        pass
    assert mlflow_server.client().get_run(first.run_id).info.status == "FINISHED"
    assert parent_run(mlflow_server, first).info.status == "RUNNING"
    with tracking.step_run("train-stage-1") as second:
        pass
    assert second.parent_id == first.parent_id
    assert parent_run(mlflow_server, first).info.status == "RUNNING"

    # The pipeline's end (the KFP exit handler calls this) sets FINISHED.
    ended = tracking.end_pipeline("FINISHED")
    assert ended["run_id"] == first.parent_id and ended["status"] == "FINISHED"
    parent = parent_run(mlflow_server, first)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[tracking.TAG_OUTCOME] == "succeeded"
    assert tracking.describe_pipeline_parent()["status"] == "FINISHED"
    # Once: ending it again (a retried exit handler) writes nothing.
    assert tracking.end_pipeline("FINISHED")["status"] == "FINISHED"
    assert parent_run(mlflow_server, first).info.end_time == parent.info.end_time


def test_a_failed_parent_stays_failed(mlflow_server, tracked_here):
    tracked_here("sticky-test", IAGN_PIPELINE_RUN="sticky-run")
    with tracking.step_run("validate") as checked:
        checked.block("blocking expectations failed: min_images_per_class")
    failed = parent_run(mlflow_server, checked)
    assert failed.info.status == "FAILED"
    assert failed.data.tags[tracking.TAG_OUTCOME] == "blocked"
    assert failed.data.tags[tracking.TAG_ERROR] == (
        "validate: blocking expectations failed: min_images_per_class"
    )

    # Later steps succeed, another one fails, the last stage succeeds: still FAILED, with
    # the first failure's reason.
    with tracking.step_run("train-stage-1") as later:
        assert parent_run(mlflow_server, later).info.status == "FAILED"  # not RUNNING again
    with pytest.raises(RuntimeError, match="boom"), tracking.step_run("train-stage-2"):
        raise RuntimeError("boom")
    with tracking.step_run("register", ends_pipeline=True) as last:
        pass
    parent = parent_run(mlflow_server, last)
    assert last.parent_id == checked.parent_id
    assert parent.info.status == "FAILED"
    assert parent.info.end_time == failed.info.end_time
    assert parent.data.tags[tracking.TAG_ERROR] == failed.data.tags[tracking.TAG_ERROR]

    # The pipeline's end after a failure: FAILED whatever it is told.
    assert tracking.end_pipeline("FINISHED")["status"] == "FAILED"
    # The window MLflow leaves open (no compare-and-set): a step start read "not failed"
    # just before a sibling failed, then wrote RUNNING. The end restores FAILED from the tag.
    mlflow_server.client().update_run(last.parent_id, status="RUNNING")
    assert tracking.end_pipeline("FINISHED")["status"] == "FAILED"
    assert parent_run(mlflow_server, last).info.status == "FAILED"
    marked = tracking.mark_pipeline_failed("KFP: iagn-steps ended FAILED", "iagn-steps")
    assert marked["status"] == "FAILED"
    tags = parent_run(mlflow_server, last).data.tags
    assert tags[tracking.TAG_ERROR] == failed.data.tags[tracking.TAG_ERROR]
    assert tags[tracking.TAG_FAILED_TASK] == "iagn-steps"


def test_the_kfp_exit_handler_ends_the_parent(mlflow_server, tracked_here):
    """components/on_exit.py's function as KFP calls it after the steps, with their status."""
    from kfp import dsl

    from components.on_exit import record_outcome

    def exit_handler(state: str, message: str | None = None) -> dict:
        status = dsl.PipelineTaskFinalStatus(
            state=state,
            pipeline_job_resource_name="",
            pipeline_task_name="exit-handler-1",
            error_code=None if message is None else 2,
            error_message=message,
        )
        return json.loads(record_outcome.python_func(status, tracking_uri="", experiment=""))

    tracked_here("exit-handler-test", KFP_RUN_ID="kfp-run-ok")
    with tracking.step_run("register", ends_pipeline=True) as step:
        pass
    assert parent_run(mlflow_server, step).info.status == "RUNNING"
    ended = exit_handler("SUCCEEDED")
    assert ended["run_id"] == step.parent_id and ended["status"] == "FINISHED"
    assert parent_run(mlflow_server, step).info.status == "FINISHED"

    # A step failed: FAILED, and KFP's verdict does not overwrite the step's reason.
    tracked_here("exit-handler-test", KFP_RUN_ID="kfp-run-failed")
    with pytest.raises(RuntimeError), tracking.step_run("evaluate") as step:
        raise RuntimeError("evaluation broke")
    assert exit_handler("FAILED", "evaluate-teacher failed")["status"] == "FAILED"
    tags = parent_run(mlflow_server, step).data.tags
    assert tags[tracking.TAG_ERROR] == "evaluate: RuntimeError: evaluation broke"
    assert tags[tracking.TAG_FAILED_TASK] == "exit-handler-1"

    # Cancelled before any step run existed: the parent is created, KILLED.
    tracked_here("exit-handler-test", KFP_RUN_ID="kfp-run-cancelled")
    ended = exit_handler("CANCELLED", "cancelled by the user")
    assert ended["status"] == "KILLED"
    parent = mlflow_server.client().get_run(ended["run_id"])
    assert parent.info.status == "KILLED"
    assert parent.data.tags[tracking.TAG_PIPELINE_KEY] == "kfp:kfp-run-cancelled"
    assert parent.data.tags[tracking.TAG_ERROR] == (
        "KFP: exit-handler-1 ended CANCELLED: cancelled by the user"
    )


def test_the_last_stage_ends_only_a_named_or_dvc_parent(mlflow_server, tracked_here):
    # A named pipeline run outside KFP: register (ends_pipeline) ends the parent.
    tracked_here("last-stage-test", IAGN_PIPELINE_RUN="named-run")
    with tracking.step_run("evaluate") as evaluated:
        pass
    assert parent_run(mlflow_server, evaluated).info.status == "RUNNING"
    with tracking.step_run("register", ends_pipeline=True) as registered:
        pass
    parent = parent_run(mlflow_server, registered)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[tracking.TAG_OUTCOME] == "succeeded"

    # Under KFP the exit handler ends the parent, not register.
    tracked_here("last-stage-test", KFP_RUN_ID="kfp-run-end")
    with tracking.step_run("register", ends_pipeline=True) as registered:
        pass
    assert parent_run(mlflow_server, registered).info.status == "RUNNING"
    assert tracking.end_pipeline("FINISHED")["run_id"] == registered.parent_id
    assert parent_run(mlflow_server, registered).info.status == "FINISHED"

    # Alone (no pipeline key): the step run is top-level and ends itself.
    tracked_here("last-stage-test")
    with tracking.step_run("register", ends_pipeline=True) as alone:
        pass
    assert alone.parent_id is None
    assert mlflow_server.client().get_run(alone.run_id).info.status == "FINISHED"
    assert tracking.end_pipeline("FINISHED") == {}


def test_kfp_run_id_and_an_explicit_parent(mlflow_server, tracked_here, monkeypatch):
    tracked_here("kfp-test", KFP_RUN_ID="kfp-run-42")
    with tracking.step_run("validate") as first:
        pass
    with tracking.step_run("train-stage-1") as second:
        pass
    assert first.parent_id == second.parent_id is not None
    assert first.pipeline_run_id == second.pipeline_run_id == "kfp-run-42"
    client = mlflow_server.client()
    parent = client.get_run(first.parent_id)
    assert parent.data.tags[tracking.TAG_PIPELINE_KEY] == "kfp:kfp-run-42"
    assert parent.info.status == "RUNNING"  # the exit handler ends it
    assert client.get_run(second.run_id).data.tags[provenance.TAG_KFP_RUN] == "kfp-run-42"

    # A run named by IAGN_PARENT_RUN_ID belongs to whoever started it: its status is theirs.
    monkeypatch.setenv(tracking.ENV_PARENT_RUN, first.run_id)
    with pytest.raises(RuntimeError), tracking.step_run("distill") as third:
        raise RuntimeError("a failed step under an explicit parent")
    assert client.get_run(third.run_id).data.tags["mlflow.parentRunId"] == first.run_id
    assert client.get_run(third.run_id).info.status == "FAILED"
    assert client.get_run(first.run_id).info.status == "FINISHED"

    monkeypatch.setenv(tracking.ENV_PARENT_RUN, "0" * 32)
    with (
        pytest.raises(IagnError, match="is not a run of this tracking store"),
        tracking.step_run("distill"),
    ):
        pass


def test_all_stages_of_one_dvc_repro_share_a_parent(mlflow_server, tmp_path):
    """Real `dvc repro`, two stages, each a separate process opening a step run."""
    project = tmp_path / "dvc_project"  # "dvc" in a path must not count as DVC
    project.mkdir()
    run(["git", "init", "--quiet", "-b", "main"], cwd=project)
    dvc("init", "--quiet", cwd=project)
    # Each stage writes its run id and the parent's status after its step; the second, the
    # pipeline's last stage, ends the parent as `iagn register` does.
    step = (
        "from pathlib import Path\nfrom mlflow import MlflowClient\nfrom iagn import tracking\n"
        "with tracking.step_run('{name}', ends_pipeline={last}) as r: pass\n"
        "status = MlflowClient().get_run(r.parent_id).info.status\n"
        "Path('{name}.txt').write_text(f'{{r.run_id}} {{status}}')"
    )
    stages = {}
    for name, previous in (("first", None), ("second", "first.txt")):
        script = project / f"{name}.py"
        script.write_text(step.format(name=name, last=previous is not None))
        stages[name] = {
            "cmd": f"{BIN / 'python'} {script.name}",
            "deps": [script.name, *([previous] if previous else [])],
            "outs": [{f"{name}.txt": {"cache": False}}],
        }
    import yaml

    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    env = mlflow_server.env("dvc-test")
    dvc("repro", "--quiet", cwd=project, env=env)
    written = {name: (project / f"{name}.txt").read_text().split() for name in ("first", "second")}
    assert written["first"][1] == "RUNNING" and written["second"][1] == "FINISHED"
    client = mlflow_server.client()
    parents = {client.get_run(i).data.tags["mlflow.parentRunId"] for i, _ in written.values()}
    assert len(parents) == 1
    parent = client.get_run(parents.pop())
    assert parent.data.tags[tracking.TAG_PIPELINE_KEY].startswith("dvc:")
    assert parent.info.status == "FINISHED"

    # A second repro is a second pipeline execution: a new parent.
    (project / "first.py").write_text(step.format(name="first", last=False) + "\n# changed")
    dvc("repro", "--quiet", cwd=project, env=env)
    again = (project / "first.txt").read_text().split()[0]
    assert client.get_run(again).data.tags["mlflow.parentRunId"] != parent.info.run_id


def test_is_dvc_matches_the_dvc_command_not_paths():
    assert provenance.is_dvc_command(["/venv/bin/python3", "/venv/bin/dvc", "repro"])
    assert provenance.is_dvc_command(["dvc", "exp", "run"])
    assert provenance.is_dvc_command(["python", "-m", "dvc", "repro"])
    assert not provenance.is_dvc_command(["/bin/sh", "-c", "python /tmp/dvc_project/first.py"])
    assert not provenance.is_dvc_command(["python", "/tmp/dvc/first.py"])


def test_embedded_default_is_sqlite_and_local_artifacts_in_the_project(
    tiny_synth, tmp_path, monkeypatch
):
    from mlflow_server import pipeline_params

    for name in ("MLFLOW_TRACKING_URI", tracking.ENV_PIPELINE_RUN, provenance.ENV_KFP_RUN):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "embedded")
    monkeypatch.chdir(tmp_path)
    report = runner.validate(tiny_synth, pipeline_params(tiny_synth), tmp_path / "validate")
    assert report.success
    assert (tmp_path / "mlflow.db").is_file()
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("embedded")
    location = experiment.artifact_location.removeprefix("file://")
    assert location == str(tmp_path / "mlruns" / experiment.experiment_id)
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "validate" and found.info.status == "FINISHED"
    assert found.data.metrics["validation_success"] == 1.0
    artifacts = tmp_path / "mlruns" / experiment.experiment_id / found.info.run_id / "artifacts"
    assert (artifacts / "data_docs" / "index.html").is_file()


def test_tracking_off_runs_the_step_untracked(tiny_synth, tmp_path, monkeypatch):
    monkeypatch.setenv(tracking.ENV_TRACKING, "off")
    monkeypatch.chdir(tmp_path)
    with tracking.step_run("validate", {"validate": {"a": 1}}, ("validate",)) as step:
        step.log_metrics({"x": 1.0})
    assert not step.active and not (tmp_path / "mlflow.db").exists()


def test_scrubbing_and_flattening():
    assert redact.scrub_uri("https://u:p@mlflow.example.com:443/x?token=t") == (
        "https://mlflow.example.com:443/x"
    )
    assert redact.scrub_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    assert redact.scrub_text("failed: http://a:b@h/api") == "failed: http://***@h/api"
    assert tracking.flatten({"a": {"b": [1, 2], "c": None, "d": "x", "e": {}}}) == {
        "a.b": "[1, 2]",
        "a.c": "null",
        "a.d": "x",
        "a.e": "{}",
    }
    assert tracking.metric_name("class_acc/Ram C/V (2012), 'x'") == "class_acc/Ram C/V _2012__ _x_"
