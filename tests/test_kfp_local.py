"""`iagn-pipeline run-local`: the whole KFP DAG on this machine, tracked in a real MLflow server.

One end-to-end run (kfp.local SubprocessRunner, every component in its own process) on a
tiny DVC-tracked project: it must leave a registered `champion`, one MLflow parent run with a
nested run per step, and the KFP outputs, and print a line per task start and end while
kfp.local's full output goes to a log file. A run whose first task fails shows that task's
last lines. Around them, the parts a cluster would exercise: the exit handler marking a
parent FAILED, fetching a git revision with `dvc get`, params overrides.
"""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from conftest import dvc_project
from helpers import BIN, Background, run, start_background
from mlflow_server import (
    SECRETS,
    STEP_RUNS,
    TRACKING_PASSWORD,
    TRACKING_USER,
    mlflow_server,
)

from iagn.errors import IagnError
from iagn.params import apply_overrides, load_params
from iagn.provenance import dvc_data_version
from iagn.steps import fetch_data as datafetch
from iagn.tracking import mark_pipeline_failed
from pipeline.local import RunLog

__all__ = ["mlflow_server"]  # the session's MLflow server fixture, used below

EXPERIMENT = "iagn-kfp-local"
MODEL = "iagn-kfp-test"
TASKS = {
    "resolve-data-revision",
    "fetch-data",
    "validate",
    "train-stage",
    "train-stage-2",
    "train-stage-3",
    "distill",
    "evaluate",
    "evaluate-2",
    "register",
    "record-outcome",
}
STARTED = re.compile(r"^  started  (\S+) ", re.MULTILINE)
ENDED = re.compile(r"^  (SUCCESS|FAILURE) +(\S+) +(\d+\.\d) s$", re.MULTILINE)
LOG_FILE = re.compile(r"^iagn-pipeline: kfp.local's full log: (\S+\.log)", re.MULTILINE)
OPEN_GATE = (
    "register.gate.min_top1=0",
    "register.gate.min_pointing_game_lift=-1",
    "register.gate.max_latency_ms=60000",
)


_RUN: dict[str, Background] = {}


def start_local_run(request: pytest.FixtureRequest) -> Background:
    """`iagn-pipeline run-local` on a git + DVC project with the tiny configuration (its
    dataset pushed to a remote), its credentials in the environment only: started once per
    session, in the background. A module that runs before this one can start it:
    tests/test_dvc_pipeline.py does, when this module's run-local tests are in the session,
    so its one-stage-at-a-time pipelines and the run share the cores."""
    if "run" not in _RUN:
        server = request.getfixturevalue("mlflow_server")
        base = request.getfixturevalue("tmp_path_factory").mktemp("kfp-local")
        argv = [
            BIN / "iagn-pipeline",
            "run-local",
            f"--param=model_name={MODEL}",
            f"--param=experiment={EXPERIMENT}",
            *[f"--param={item}" for item in OPEN_GATE],
        ]
        env = server.env(EXPERIMENT)
        _RUN["run"] = start_background(request, argv, dvc_project(base), "run-local", env)
    return _RUN["run"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The run's project where it was started, else one of its own."""
    if "run" in _RUN:
        return _RUN["run"].project
    return dvc_project(tmp_path_factory.mktemp("kfp-local"))


@pytest.fixture(scope="module")
def local_run(request, mlflow_server):
    """`iagn-pipeline run-local`'s result, once it has ended."""
    result = start_local_run(request).result()
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return result


def test_run_local_registers_a_champion_under_one_parent_run(local_run, mlflow_server):
    out = local_run.stdout
    assert "kfp.local run succeeded" in out
    assert f"registered       models:/{MODEL}@champion (version 1, student)" in out
    for secret in SECRETS:
        assert secret not in out + local_run.stderr, "a credential reached the console"

    client = mlflow_server.client()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("iagn.role") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    # Ended by the exit handler (record_outcome), the only one that ends a KFP parent.
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["iagn.outcome"] == "succeeded"
    assert parent.data.tags["iagn.pipeline_key"].startswith("pipeline:kfp-local-")
    steps = {
        r.info.run_name: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(steps) == STEP_RUNS
    assert {r.info.status for r in steps.values()} == {"FINISHED"}
    # The dataset version comes with the fetched data (the steps see no data.dvc).
    assert steps["train-stage-1"].data.tags["iagn.dvc_data_version"].endswith(".dir")

    version = client.get_model_version_by_alias(MODEL, "champion")
    assert version.run_id == steps["distill"].info.run_id
    assert version.tags["iagn.pipeline_run_id"] == parent.info.run_id


def test_run_local_leaves_the_kfp_outputs(local_run):
    project = _RUN["run"].project
    run_dirs = sorted((project / "build" / "kfp").glob("iagn-*"))
    assert len(run_dirs) == 1
    outputs = run_dirs[0]
    params = yaml.safe_load((outputs / "fetch-data" / "params").read_text())
    assert params["register"]["gate"]["min_top1"] == 0  # the overrides, as ints again
    assert (outputs / "fetch-data" / "dataset" / "images.txt").is_file()
    assert (outputs / "validate" / "report" / "data_docs" / "index.html").is_file()
    assert "Data validation passed" in (outputs / "validate" / "checks").read_text()
    reports = {
        json.loads((p / "metrics.json").read_text())["kind"]: p.parent
        for p in outputs.glob("evaluate*/evaluation")
    }
    assert set(reports) == {"teacher", "student"}
    html = (reports["student"] / "report").read_text()
    assert "Attention gallery" in html and "data:image/png;base64," in html
    assert "the student passes" in (reports["student"] / "summary").read_text()
    decision = json.loads((outputs / "register" / "result" / "register.json").read_text())
    assert decision["passed"] and decision["outcomes"][0]["champion"]
    # The champion's model card: the register task's HTML output, and where the report says.
    card = (outputs / "register" / "card").read_text()
    assert f"Model card: {MODEL} version 1 (student)" in card
    assert card == Path(decision["outcomes"][0]["card"]).read_text()
    assert f"(`iagn models card {MODEL}@champion`;" in local_run.stdout


def test_run_local_prints_a_line_per_task_and_logs_the_rest(local_run):
    project = _RUN["run"].project
    out = local_run.stdout
    assert sorted(STARTED.findall(out)) == sorted(TASKS), "one start line per task"
    ended = ENDED.findall(out)
    assert sorted(task for _, task, _ in ended) == sorted(TASKS), "one end line per task"
    assert {status for status, _, _ in ended} == {"SUCCESS"}
    for noise in ("executor_input", "parameterValues", "outputFile", "KFP Executor"):
        assert noise not in out, f"kfp.local's {noise} reached the console"
    assert len(out.splitlines()) < 45, out

    shown = LOG_FILE.search(out)[1]
    assert f"  log              {shown}" in out  # in the summary too
    logged = (project / shown).read_text()
    assert logged.count("Got executor_input:") == len(TASKS)
    for task in TASKS:
        assert f"Executing task '{task}'" in logged
        assert f"Task '{task}' finished with status SUCCESS" in logged
    assert "stage 1: val accuracy" in logged  # the tasks' own output
    # Every task ran in the preloaded interpreter: none differed from it (pipeline/warm.py).
    assert "fresh interpreter" not in logged


def test_run_local_shows_the_failing_tasks_last_lines(project, mlflow_server, tmp_path):
    experiment = "iagn-kfp-local-failure"
    result = run(
        [
            BIN / "iagn-pipeline",
            "run-local",
            "--param=data_rev=no-such-branch",
            f"--param=experiment={experiment}",
            f"--pipeline-root={tmp_path / 'kfp'}",
        ],
        cwd=project,
        env=mlflow_server.env(experiment),
        check=False,
        timeout=600,
    )
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    error = "iagn: error: revision 'no-such-branch' is not in the git repository"
    assert re.search(r"^  FAILURE +resolve-data-revision +\d+\.\d s$", out, re.MULTILINE), out
    assert re.search(rf"^ +\| {re.escape(error)}", out, re.MULTILINE), out
    assert STARTED.findall(out) == ["resolve-data-revision", "record-outcome"]
    assert "kfp.local run FAILED" in out and "the failing task's last lines are above" in out
    assert "executor_input" not in out
    assert error in Path(LOG_FILE.search(out)[1]).read_text()


def test_the_console_shows_epochs_and_a_tail_without_the_executor_input(tmp_path):
    """kfp.local's lines as it writes them (colours, a task's output indented by 4), in
    pieces that split lines: epoch lines show as they come; a failure shows the task's last
    lines, without the JSON of its executor input."""
    transcript = (
        "00:11:00.719 - INFO - Executing task \x1b[96m'train-stage-2'\x1b[0m\n"
        "00:11:00.720 - INFO - Streamed logs:\n\n"
        "    [KFP Executor 2026-12-02 00:11:00,766 INFO]: Got executor_input:\n"
        "    {\n"
        '        "inputs": {\n'
        '            "parameterValues": {"stage": 2}\n'
        "        }\n"
        "    }\n"
        "    train-stage-2 epoch 1/2: loss 2.1, val_acc 0.25\n"
        "    train-stage-2 epoch 2/2: loss 1.9, val_acc 0.5\n"
        "    RuntimeError: out of memory\n"
        "    \n\n"
        "00:11:10.172 - ERROR - Task \x1b[96m'train-stage-2'\x1b[0m finished with status "
        "\x1b[91mFAILURE\x1b[0m\n"
    )
    console = io.StringIO()
    log = RunLog(tmp_path / "run.log", console)
    log.watch({"train-stage-2": "train stage 2"})
    for start in range(0, len(transcript), 7):
        log.write(transcript[start : start + 7])
    log.unwatch()
    log.close()
    lines = [" ".join(line.split()) for line in console.getvalue().splitlines()]
    assert lines[:3] == [
        "started train-stage-2 train stage 2",
        "train-stage-2 train-stage-2 epoch 1/2: loss 2.1, val_acc 0.25",
        "train-stage-2 train-stage-2 epoch 2/2: loss 1.9, val_acc 0.5",
    ]
    assert re.fullmatch(r"FAILURE train-stage-2 \d+\.\d s", lines[3])
    assert [line.split("| ", 1)[1] for line in lines[5:]] == [
        "train-stage-2 epoch 1/2: loss 2.1, val_acc 0.25",
        "train-stage-2 epoch 2/2: loss 1.9, val_acc 0.5",
        "RuntimeError: out of memory",
    ]
    assert "parameterValues" not in console.getvalue()
    assert (tmp_path / "run.log").read_text() == re.sub(r"\x1b\[[0-9;]*m", "", transcript)


def test_exit_handler_marks_the_parent_failed(mlflow_server, monkeypatch):
    env = mlflow_server.env(EXPERIMENT, IAGN_PIPELINE_RUN="kfp-exit-handler-test")
    env["MLFLOW_TRACKING_URI"] = mlflow_server.url  # credentials below, not in the URI
    env["MLFLOW_TRACKING_USERNAME"] = TRACKING_USER
    env["MLFLOW_TRACKING_PASSWORD"] = TRACKING_PASSWORD
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("KFP_RUN_ID", raising=False)
    reason = "KFP: exit-handler-1 ended FAILED: train-stage-2 OOMKilled"
    # A failure before any step run (e.g. fetch-data): the FAILED parent is created.
    marked = mark_pipeline_failed(reason, "exit-handler-1")
    run_id = marked["run_id"]
    assert marked["status"] == "FAILED" and marked["uri"] == mlflow_server.url
    again = mark_pipeline_failed(reason, "exit-handler-1")
    assert again["run_id"] == run_id  # found, not created again
    parent = mlflow_server.client().get_run(run_id)
    assert parent.info.status == "FAILED"
    tags = parent.data.tags
    assert tags["iagn.role"] == "pipeline" and tags["iagn.outcome"] == "failed"
    assert tags["iagn.error"] == reason and tags["iagn.kfp_failed_task"] == "exit-handler-1"
    assert tags["iagn.pipeline_key"] == "pipeline:kfp-exit-handler-test"


def test_fetch_a_git_revision_with_dvc_get(project, tmp_path):
    url = f"file://{project}"
    head = run(["git", "rev-parse", "HEAD"], cwd=project).stdout.strip()
    assert datafetch.resolve_revision(url, "main") == head
    assert datafetch.resolve_revision(str(project), "HEAD") == head
    assert datafetch.resolve_revision(str(project), "").startswith(f"working-copy:{head}:")
    fetched = datafetch.fetch(
        url, head, {"stage3.epochs": 2.0}, tmp_path / "dataset", tmp_path / "params.yaml"
    )
    assert (fetched.dataset / "images.txt").is_file()
    assert fetched.metadata["images"] == 32
    assert fetched.metadata["dvc_md5"] == dvc_data_version(project / "data.dvc")
    assert fetched.metadata["source"] == "dvc get" and fetched.metadata["revision"] == head
    assert load_params(fetched.params)["stage3"]["epochs"] == 2
    with pytest.raises(IagnError, match="not a branch or tag"):
        datafetch.resolve_revision(url, "no-such-branch")


def test_params_overrides():
    params = {"stage2": {"epochs": 1}, "register": {"gate": {"min_top1": 0.5}}}
    apply_overrides(params, {"stage2.lr_head": 0.005, "register.gate.min_top1": 0.0})
    apply_overrides(params, {"stage2.epochs": 3.0})  # KFP's Struct numbers are floats
    assert params == {
        "stage2": {"epochs": 3, "lr_head": 0.005},
        "register": {"gate": {"min_top1": 0}},
    }
    assert isinstance(params["stage2"]["epochs"], int)
    with pytest.raises(IagnError, match="no section 'stage9'"):
        apply_overrides(params, {"stage9.epochs": 1})
    with pytest.raises(IagnError, match="dotted key"):
        apply_overrides(params, {"epochs": 1})


def test_the_task_client_falls_back_to_the_plain_interpreter(tmp_path):
    """Without a zygote (or for a command it does not serve) a task still runs, uncached."""
    from pipeline.warm import CLIENT

    client = tmp_path / "python"
    client.write_text(CLIENT.format(python=sys.executable, socket=str(tmp_path / "none.sock")))
    client.chmod(0o755)
    served = run([client, "-m", "platform"], cwd=tmp_path)  # a `-m` task: zygote, else plain
    assert "Linux" in served.stdout
    plain = run([client, "-c", "import sys; print(sys.argv[1:])", "x"], cwd=tmp_path)
    assert plain.stdout.strip() == "['x']"
