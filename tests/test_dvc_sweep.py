"""Sweeps with DVC: `dvc exp run --queue -S ...`, then `dvc queue start -j N`, for real.

Two named experiments of the tiny configuration run from the queue (DVC's celery workers,
each in a temporary copy under .dvc/tmp/exps) against a real MLflow server: `dvc exp show`
lists both with their params and metrics, and MLflow has one parent run per experiment,
tagged `iagn.dvc_exp` with its name, the step runs of that experiment and no other under it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import BIN, DVC_TIMEOUT_S, GIT_IDENTITY, dvc, tiny_dvc_project
from mlflow_server import STEP_RUNS, experiment_runs, mlflow_server, stop_group

from iagn import provenance
from iagn.tracking import parent, store

__all__ = ["mlflow_server"]  # the session's MLflow server fixture, used below

EXPERIMENT = "iagn-dvc-sweep-test"
# Each trial's `-S` overrides, as `dvc exp show` and the step runs' params give them back.
TRIALS = {
    "lr-low": {"distill.lr": "0.01"},
    "lr-high": {"distill.lr": "0.05", "stage3.epochs": "2"},
}
# The step run that logs each swept param (the sections it reads, iagn/runner.py).
LOGGED_BY = {"distill.lr": "distill", "stage3.epochs": "train-stage-3"}
# Two experiments at once (measured on 2 shared cores with OMP_NUM_THREADS=1: 188 s for the
# queue, 221 s one at a time); it also checks that concurrent experiments never share a parent.
JOBS = 2


def queue_status(project: Path, env: dict) -> dict[str, str]:
    """Experiment name -> Queued / Running / Success / Failed, from `dvc queue status`."""
    lines = dvc("queue", "status", cwd=project, env=env).stdout.splitlines()
    rows = [line.split() for line in lines if line.strip()]
    # "Task  Name  Created  Status" rows; the time may hold a space ("11:13 AM").
    return {row[1]: row[-1] for row in rows[1:] if len(row) >= 4 and row[1] in TRIALS}


def wait_for_queue(project: Path, env: dict, seconds: float) -> dict[str, str]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status = queue_status(project, env)
        failed = [name for name, state in status.items() if state == "Failed"]
        if failed:
            logs = {name: dvc("queue", "logs", name, cwd=project, env=env) for name in failed}
            raise AssertionError(
                "\n".join(
                    f"experiment {name} failed:\n{r.stdout}\n{r.stderr}" for name, r in logs.items()
                )
            )
        if len(status) == len(TRIALS) and all(s == "Success" for s in status.values()):
            return status
        time.sleep(5)
    dvc("queue", "kill", *TRIALS, cwd=project, env=env, check=False)
    raise AssertionError(f"the queue did not finish within {seconds:.0f} s: {status}")


@dataclass
class Queue:
    project: Path
    env: dict
    started: float  # time.monotonic() when the workers started
    starter: subprocess.Popen  # `dvc queue start`


_QUEUE: dict[str, Queue] = {}


def start_queue(request: pytest.FixtureRequest) -> Queue:
    """The tiny project with both trials queued and DVC's workers started, once per session.

    The workers run in the background (as `dvc queue start` leaves them), so a module that
    runs before this one can start them: tests/test_dvc_pipeline.py does, when this module's
    tests are in the session, and its own pipeline runs share the two cores with them."""
    if "queue" not in _QUEUE:
        server = request.getfixturevalue("mlflow_server")
        factory = request.getfixturevalue("tmp_path_factory")
        project = tiny_dvc_project(factory.mktemp("dvc-sweep") / "clone")
        env = server.env(EXPERIMENT)
        for name, overrides in TRIALS.items():
            sets = [arg for key, value in overrides.items() for arg in ("-S", f"{key}={value}")]
            dvc("exp", "run", "--queue", *sets, "--name", name, cwd=project, env=env)
        started = time.monotonic()
        # Not waited for: its workers hold its output open until they end (one idle worker
        # was seen to stay for minutes after the queue had finished, until `queue stop`).
        log = (project.parent / "queue-start.log").open("w")
        path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"  # the stages run `iagn`
        starter = subprocess.Popen(
            [BIN / "dvc", "queue", "start", "-j", str(JOBS)],
            cwd=project,
            env={**os.environ, **GIT_IDENTITY, "PATH": path, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its workers in its process group (stop_group)
        )
        log.close()

        def stop() -> None:  # workers and any experiment still running end with the session
            dvc("queue", "stop", "--kill", cwd=project, env=env, check=False)
            stop_group(starter)

        request.config.add_cleanup(stop)
        _QUEUE["queue"] = Queue(project, env, started, starter)
    return _QUEUE["queue"]


@pytest.fixture(scope="module")
def sweep(request, mlflow_server):
    """The tiny project with both trials queued and run; (project, seconds the queue took)."""
    queue = start_queue(request)
    try:
        wait_for_queue(queue.project, queue.env, DVC_TIMEOUT_S)
        seconds = time.monotonic() - queue.started
    finally:
        dvc("queue", "stop", cwd=queue.project, env=queue.env, check=False)  # idle workers end
        stop_group(queue.starter)  # and any worker that stays
    return queue.project, seconds


@pytest.mark.slow
@pytest.mark.timeout(1200)  # two tiny pipelines: about 3 minutes on 2 quiet cores
def test_exp_show_lists_the_queued_trials(sweep):
    project, seconds = sweep
    print(f"dvc queue start -j {JOBS}: {len(TRIALS)} experiments done within {seconds:.0f} s")
    shown = json.loads(dvc("exp", "show", "--json", cwd=project).stdout)
    experiments = {
        exp["name"]: exp["revs"][0]["data"]
        for baseline in shown
        for exp in baseline.get("experiments") or []
    }
    assert set(TRIALS) <= set(experiments), list(experiments)
    for name, overrides in TRIALS.items():
        data = experiments[name]
        params = data["params"]["params.yaml"]["data"]
        for key, value in overrides.items():
            section, field = key.split(".")
            assert str(params[section][field]) == value, (name, key)
        metrics = data["metrics"]
        assert 0 <= metrics["build/eval/student/metrics.json"]["data"]["top1"] <= 1
        # The override reached the stage, not only params.yaml: epochs trained.
        stage3 = metrics["build/models/stage3.metrics.json"]["data"]
        assert stage3["epoch"] == params["stage3"]["epochs"], name


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_each_trial_has_one_mlflow_parent_named_after_it(sweep, mlflow_server):
    runs = experiment_runs(mlflow_server, EXPERIMENT)
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    by_name = {run.data.tags.get(provenance.TAG_DVC_EXP): run for run in parents}
    assert sorted(by_name) == sorted(TRIALS) and len(parents) == len(TRIALS), [
        (run.info.run_name, run.data.tags) for run in parents
    ]
    for name, overrides in TRIALS.items():
        top = by_name[name]
        assert top.info.run_name == f"dvc exp {name}"
        assert top.info.status == "FINISHED"  # ended by `register`, as under `dvc repro`
        assert top.data.tags[parent.TAG_PIPELINE_KEY].startswith("dvc:")
        steps = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == top.info.run_id]
        by_step = {run.data.tags["iagn.step"]: run for run in steps}
        assert set(by_step) == STEP_RUNS and len(steps) == len(STEP_RUNS), sorted(by_step)
        assert all(run.data.tags[provenance.TAG_DVC_EXP] == name for run in steps)
        assert all(run.info.status == "FINISHED" for run in steps)
        for key, value in overrides.items():
            assert by_step[LOGGED_BY[key]].data.params[key] == value, (name, key)
    keys = {run.data.tags[parent.TAG_PIPELINE_KEY] for run in parents}
    assert len(keys) == len(TRIALS)


def test_the_experiment_name_tags_runs_only_inside_an_experiment(monkeypatch):
    for name in (provenance.ENV_PIPELINE_RUN, provenance.ENV_KFP_RUN):
        monkeypatch.delenv(name, raising=False)  # they would name the parent instead
    monkeypatch.setenv("DVC_EXP_NAME", "lr-low")
    assert provenance.provenance_tags()[provenance.TAG_DVC_EXP] == "lr-low"
    monkeypatch.setattr(parent, "dvc_ancestor", lambda: (4242, 17))
    key, name = parent.pipeline_key()
    assert name == "dvc exp lr-low" and key.endswith(":4242:17")
    monkeypatch.delenv("DVC_EXP_NAME")
    assert provenance.TAG_DVC_EXP not in provenance.provenance_tags()
    assert parent.pipeline_key()[1].startswith("dvc repro ")


def test_a_queued_experiment_tracks_into_the_project_store(tmp_path, monkeypatch):
    """The embedded default store would be ./mlflow.db of the temporary copy DVC deletes."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    root = tmp_path / "project"
    workspace = root / ".dvc" / "tmp" / "exps" / "tmp1234"
    workspace.mkdir(parents=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.setenv("DVC_EXP_NAME", "lr-low")

    monkeypatch.chdir(root)  # `dvc exp run` in the workspace: MLflow's default stays
    assert store.dvc_project_root() is None
    monkeypatch.chdir(workspace)
    assert store.configure() == f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient()
    created = client.get_experiment(store.experiment_id(client))
    assert created.artifact_location == (root / "mlruns").as_uri()
    assert (root / "mlflow.db").exists() and not (workspace / "mlflow.db").exists()

    # A tracking URI the user set is kept.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert store.configure(check=False) == "http://127.0.0.1:1"


def test_steps_opening_a_new_sqlite_store_at_once_all_start(tmp_path):
    """Queued experiments meet the project's new mlflow.db together: MLflow alone creates its
    tables unlocked (measured: 2-3 of 3 such processes failed); configure() locks it."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    code = (
        "import mlflow; from iagn.tracking import configure, experiment_id; configure(); "
        "print(experiment_id(mlflow.MlflowClient()))"
    )
    steps = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    done = [(step.communicate(timeout=120), step.returncode) for step in steps]
    assert all(code == 0 for _, code in done), [err[-2000:] for (_, err), _ in done]
    assert len({out.strip() for (out, _), _ in done}) == 1  # one experiment `iagn`
