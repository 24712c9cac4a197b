"""`dvc repro` runs the whole pipeline for real on a tiny configuration; reruns are partial."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import yaml
from helpers import dvc, iagn, run, tiny_dvc_project
from mlflow.tracking import MlflowClient
from mlflow_server import mlflow_server

__all__ = ["mlflow_server"]  # the session's MLflow server: the runs started below track to it

STAGES = ("validate", "stage1", "stage2", "stage3", "distill", "evaluate", "register")


def ran(output: str) -> set[str]:
    return {stage for stage in STAGES if f"Running stage '{stage}'" in output}


def selected(request: pytest.FixtureRequest, module: str, fixture: str) -> bool:
    """Whether this session runs a test of `module` that uses `fixture`."""
    return any(
        item.path.name == module and fixture in getattr(item, "fixturenames", ())
        for item in request.session.items
    )


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory, request) -> Path:
    """A fresh clone with the tiny configuration committed and its dataset generated.

    This module's pipelines keep about one core busy (one stage process at a time), so the
    slow runs of two later modules start first when they are in the session, and run in the
    background meanwhile: tests/test_dvc_sweep.py's DVC queue and tests/test_kfp_local.py's
    `iagn-pipeline run-local`. Those modules wait for them and check their results."""
    if selected(request, "test_dvc_sweep.py", "sweep"):
        from test_dvc_sweep import start_queue

        start_queue(request)
    if selected(request, "test_kfp_local.py", "local_run"):
        from test_kfp_local import start_local_run

        start_local_run(request)
    return tiny_dvc_project(tmp_path_factory.mktemp("dvc") / "clone")


def test_repro_runs_every_stage_then_nothing(pipeline_repo: Path):
    first = dvc("repro", cwd=pipeline_repo)
    assert ran(first.stdout) == set(STAGES), first.stdout
    for path in (
        "build/models/stage3.pt",
        "build/models/student.pt",
        "build/validate/data_docs",
        "build/eval/teacher/attention_gallery.png",
    ):
        assert (pipeline_repo / path).exists(), path
    teacher = json.loads((pipeline_repo / "build/eval/teacher/metrics.json").read_text())
    assert teacher["kind"] == "teacher" and 0 <= teacher["top1"] <= 1
    shown = json.loads(dvc("metrics", "show", "--json", cwd=pipeline_repo).stdout)
    assert "top1_combined" in json.dumps(shown)
    assert "pointing_game" in json.dumps(shown)
    history = json.loads((pipeline_repo / "build/models/stage3.history.json").read_text())
    assert [row["epoch"] for row in history] == [1]

    # One parent run for the repro, a nested run per step, in the embedded default store.
    client = MlflowClient(tracking_uri=f"sqlite:///{pipeline_repo / 'mlflow.db'}")
    runs = client.search_runs(
        [client.get_experiment_by_name("iagn").experiment_id], max_results=100
    )
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED"  # ended by `register`, the last stage
    steps = {r.data.tags.get("iagn.step") for r in runs if r not in parents}
    assert {"validate", "distill", "evaluate-teacher", "evaluate-student", "register"} <= steps
    assert {"train-stage-1", "train-stage-2", "train-stage-3"} <= steps
    assert all(
        r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        for r in runs
        if r not in parents
    )

    second = dvc("repro", cwd=pipeline_repo)
    assert ran(second.stdout) == set(), second.stdout
    run(["git", "add", "-A"], cwd=pipeline_repo)
    run(["git", "commit", "--quiet", "-m", "pipeline results"], cwd=pipeline_repo)


def test_a_failed_stage_leaves_the_previous_outs_intact(pipeline_repo: Path):
    kept = ["build/models/stage2.pt", "build/models/stage2.metrics.json"]
    kept += ["build/models/stage2.history.json", "build/models/stage3.pt"]
    before = {path: (pipeline_repo / path).read_bytes() for path in kept}
    params_file = pipeline_repo / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["stage2"]["batch_size"] = 0
    params_file.write_text(yaml.safe_dump(params))
    failed = dvc("repro", cwd=pipeline_repo, check=False)
    assert failed.returncode != 0
    assert ran(failed.stdout) == {"stage2"}, failed.stdout
    assert "batch_size must be at least 1" in failed.stderr + failed.stdout
    assert {path: (pipeline_repo / path).read_bytes() for path in kept} == before
    params_file.write_text(original)
    assert "Data and pipelines are up to date" in dvc("status", cwd=pipeline_repo).stdout


def test_an_experiment_changing_a_stage2_param_reruns_stage2_and_what_follows(
    pipeline_repo: Path,
):
    """`dvc exp run -S` (a `dvc repro` with the override written to params.yaml) reruns the
    changed stage and what follows it, nothing else, and leaves the results in the workspace.
    One run for both: each rerun stage is a process of several seconds."""
    result = dvc("exp", "run", "-S", "stage2.epochs=2", cwd=pipeline_repo)
    assert ran(result.stdout) == {"stage2", "stage3", "distill", "evaluate", "register"}, (
        result.stdout
    )
    params = yaml.safe_load((pipeline_repo / "params.yaml").read_text())
    assert params["stage2"]["epochs"] == 2  # applied to the workspace
    history = json.loads((pipeline_repo / "build/models/stage2.history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]  # the override reached the stage
    diff = dvc("params", "diff", cwd=pipeline_repo).stdout
    assert "stage2.epochs" in diff, diff
    metrics_diff = dvc("metrics", "diff", "--all", cwd=pipeline_repo).stdout
    assert "build/eval/teacher/metrics.json" in metrics_diff
    plots = dvc("plots", "show", "--json", cwd=pipeline_repo).stdout
    assert "Validation accuracy per epoch" in plots
    shown = dvc("exp", "show", "--no-pager", "--csv", cwd=pipeline_repo).stdout
    rows = list(csv.DictReader(io.StringIO(shown)))
    assert {row["stage2.epochs"] for row in rows} == {"1", "2"}, shown  # baseline, experiment


def test_pipeline_outs_push_to_s3_and_pull_into_a_fresh_clone(pipeline_repo: Path, s3_server):
    run(["git", "add", "-A"], cwd=pipeline_repo)
    run(["git", "commit", "--quiet", "--allow-empty", "-m", "experiment"], cwd=pipeline_repo)
    dvc("remote", "add", "-d", "s3", f"s3://{s3_server.bucket}/dvc", cwd=pipeline_repo)
    dvc("remote", "modify", "s3", "endpointurl", s3_server.endpoint, cwd=pipeline_repo)
    run(["git", "commit", "--quiet", "-am", "S3 remote"], cwd=pipeline_repo)
    env = s3_server.credentials_env()  # credentials only in the environment
    pushed = iagn("remote", "push", cwd=pipeline_repo, env=env).stdout
    assert "DVC remote 's3'" in pushed and "pushed" in pushed
    # The dataset's files plus every checkpoint the stages produced.
    assert len(s3_server.keys()) > 4 * 8

    fresh = pipeline_repo.parent / "fresh"
    run(["git", "clone", "--quiet", pipeline_repo, fresh], cwd=pipeline_repo.parent)
    assert not (fresh / "build/models/stage3.pt").exists()
    iagn("remote", "pull", "--quiet", cwd=fresh, env=env)
    for path in ("build/models/stage1.pt", "build/models/stage3.pt", "build/models/student.pt"):
        assert (fresh / path).read_bytes() == (pipeline_repo / path).read_bytes(), path
    assert "Data and pipelines are up to date" in dvc("status", cwd=fresh).stdout
    assert ran(dvc("repro", cwd=fresh).stdout) == set()
