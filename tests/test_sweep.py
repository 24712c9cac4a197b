"""`iagn-pipeline sweep`: hyperparameter sweeps as one KFP pipeline, tracked in MLflow.

Fast: the trials a command line makes (grid, seeded random draws) and its errors; the best
trial's choice and the trial params. Then the real KFP compiler (a ParallelFor with the
parallelism limit, the trials as a parameter, no secrets), a submission to the KFP REST test
double of tests/test_kfp_submit.py, and one sweep of 2 trials run end to end with kfp.local
on the tiny DVC project against the real MLflow server: a parent run with a child run per
trial, each trial's steps under it, the summary on the parent and the winner registered as
challenger only.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, dvc_project, smoke_params
from helpers import BIN, Background, run, start_background
from mlflow_server import SECRETS, mlflow_server
from test_kfp_submit import API, TOKEN, kfp_api, run_body

from iagn.errors import IagnError
from iagn.steps import pick_best
from iagn.steps.trial_params import apply_trial, winner_settings
from pipeline.cli import main
from pipeline.local import RunLog
from pipeline.sweep import build_sweep, split_values, trials_table

__all__ = ["kfp_api", "mlflow_server"]  # fixtures of other modules, used below

PARAMS = smoke_params()
EXPERIMENT = "iagn-sweep-local"
MODEL = "iagn-sweep-test"
SWEEP_ID = "sweep-test-local"
TRIAL_STEPS = {"train-stage-1", "train-stage-2", "train-stage-3", "distill", "evaluate-student"}
PARENT_STEPS = {"validate", "evaluate-teacher", "evaluate-student", "register"}
LOOP_TASKS = {
    "trial-params",
    "train-stage",
    "train-stage-2",
    "train-stage-3",
    "distill",
    "evaluate",
}


# --- the trials a command line makes ------------------------------------------------------


def test_a_grid_is_the_cartesian_product_in_order():
    sweep = build_sweep(
        grid=["stage3.epochs=1,2", "train.lr_head=0.01,0.02", "model.jigsaw=[8,4,2],[4,2,1]"],
        params=PARAMS,
        sweep_id="sweep-a",
    )
    assert sweep.sweep_id == "sweep-a" and sweep.kind == "grid"
    assert sweep.keys == ["stage3.epochs", "train.lr_head", "model.jigsaw"]
    assert [t["trial"] for t in sweep.trials] == [f"t{i:02d}" for i in range(8)]
    assert sweep.trials[0]["overrides"] == {
        "stage3.epochs": 1,
        "train.lr_head": 0.01,
        "model.jigsaw": [8, 4, 2],
    }
    assert sweep.trials[-1]["overrides"] == {
        "stage3.epochs": 2,
        "train.lr_head": 0.02,
        "model.jigsaw": [4, 2, 1],
    }
    assert all(isinstance(t["overrides"]["stage3.epochs"], int) for t in sweep.trials)
    # A stage section may set any train key, as params overrides may.
    assert len(build_sweep(grid=["stage2.lr_head=0.1,0.2"], params=PARAMS).trials) == 2
    assert split_values("1, 'a,b', [1,2]") == ["1", "'a,b'", "[1,2]"]
    table = trials_table(sweep).splitlines()
    assert table[0].split() == ["trial", "stage3.epochs", "train.lr_head", "model.jigsaw"]
    assert table[1].split() == ["t00", "1", "0.01", "[8,", "4,", "2]"]


def test_random_draws_are_seeded_and_within_their_ranges():
    dists = [
        "train.lr_head=loguniform(0.001,0.1)",
        "distill.kd_alpha=uniform(0.5,0.9)",
        "stage3.epochs=int(1,3)",
        "distill.student_layers=choice(2,3,4)",
    ]
    one = build_sweep(random_count=40, dists=dists, seed=7, params=PARAMS)
    again = build_sweep(random_count=40, dists=dists, seed=7, params=PARAMS)
    other = build_sweep(random_count=40, dists=dists, seed=8, params=PARAMS)
    assert one.kind == "random" and one.trials == again.trials != other.trials
    assert one.sweep_id != again.sweep_id  # a new sweep each time, the same trials
    values = {key: [t["overrides"][key] for t in one.trials] for key in one.keys}
    assert all(0.001 <= v <= 0.1 for v in values["train.lr_head"])
    assert all(0.5 <= v <= 0.9 for v in values["distill.kd_alpha"])
    assert set(values["stage3.epochs"]) == {1, 2, 3}  # both ends included
    assert set(values["distill.student_layers"]) <= {2, 3, 4}
    assert all(isinstance(v, int) for v in values["stage3.epochs"])


BAD_SWEEPS = [
    ({}, "an empty sweep"),
    ({"grid": ["stage3.epochs="]}, "has no values"),
    ({"grid": ["stage3.epochs=1,,2"]}, "an empty value"),
    ({"grid": ["stag3.epochs=1,2"]}, "'stag3.epochs': params.yaml has no 'stag3'"),
    ({"grid": ["stage3.epohcs=1,2"]}, "'stage3.epohcs': stage3 has no 'epohcs'"),
    ({"grid": ["train=1,2"]}, "dotted params.yaml keys"),
    ({"grid": ["train.lr_head=1", "train.lr_head=2"]}, "given twice"),
    ({"grid": ["data.synth=1,2"]}, "is a section of params.yaml"),
    ({"grid": ["train.lr_head=1,2,3,4,5,6,7,8", "train.seed=1,2,3,4,5,6,7,8,9"]}, "72 trials"),
    ({"random_count": 3}, "needs at least one --dist"),
    ({"dists": ["train.lr_head=uniform(0,1)"]}, "--dist needs --random"),
    (
        {"grid": ["train.seed=1"], "random_count": 2, "dists": ["train.lr_head=uniform(0,1)"]},
        "give one",
    ),
    ({"random_count": 2, "dists": ["train.lr_head=normal(0,1)"]}, "not a distribution"),
    ({"random_count": 2, "dists": ["train.lr_head=loguniform(0,1)"]}, "0 < a"),
    ({"random_count": 2, "dists": ["train.lr_head=uniform(1,0)"]}, "a <= b"),
    ({"random_count": 2, "dists": ["train.lr_head=uniform(1)"]}, "two numbers"),
    ({"random_count": 2, "dists": ["stage3.epochs=int(1.5,3)"]}, "two integers"),
    ({"random_count": 2, "dists": ["train.lr_head=uniform(a,b)"]}, "not a number"),
    ({"random_count": 0, "dists": ["train.lr_head=uniform(0,1)"]}, "1 or more"),
    ({"random_count": 65, "dists": ["train.lr_head=uniform(0,1)"]}, "--max-trials 65"),
    ({"grid": ["train.seed=1,2"], "sweep_id": "it's"}, "--sweep-id"),
]


@pytest.mark.parametrize(("given", "named"), BAD_SWEEPS, ids=[n for _, n in BAD_SWEEPS])
def test_a_bad_sweep_is_one_clear_error(given, named):
    with pytest.raises(IagnError, match=re.escape(named)):
        build_sweep(**given, params=PARAMS)


def test_max_trials_allows_a_bigger_sweep():
    grid = ["train.lr_head=1,2,3,4,5,6,7,8", "train.seed=1,2,3,4,5,6,7,8,9"]
    assert len(build_sweep(grid=grid, max_trials=72, params=PARAMS).trials) == 72
    with pytest.raises(IagnError, match="raise --max-trials to 72"):
        build_sweep(grid=grid, max_trials=71, params=PARAMS)


# --- the trials' params and the choice of the best -----------------------------------------


def test_a_trials_params_and_the_winners():
    trial = {"trial": "t01", "overrides": {"stage3.epochs": 2.0, "train.lr_head": 0.05}}
    settings = apply_trial(PARAMS, trial, "sweep-a")
    assert settings["stage3"]["epochs"] == 2 and settings["train"]["lr_head"] == 0.05
    assert settings["evaluate"]["split"] == "val"  # trials never see the test split
    assert settings["sweep"] == {
        "id": "sweep-a",
        "trial": "t01",
        "overrides": {"stage3.epochs": 2, "train.lr_head": 0.05},  # ints again (KFP's floats)
    }
    assert PARAMS["evaluate"]["split"] == "test"  # the run's params are left as they were
    with pytest.raises(IagnError, match="no section 'stag3'"):
        apply_trial(PARAMS, {"trial": "t00", "overrides": {"stag3.epochs": 1}}, "sweep-a")


def test_the_winner_is_judged_on_the_runs_split_without_its_trial(tmp_path):
    trial = apply_trial(PARAMS, {"trial": "t00", "overrides": {"train.lr_head": 0.05}}, "s")
    (tmp_path / "trial.yaml").write_text(yaml.safe_dump(trial))
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(PARAMS))
    winner = winner_settings(tmp_path / "trial.yaml", tmp_path / "base.yaml")
    assert "sweep" not in winner and winner["evaluate"]["split"] == "test"
    assert winner["train"]["lr_head"] == 0.05  # it is judged as it was trained


def _result(trial: str, top1: float, split: str = "val", **extra) -> pick_best.TrialResult:
    metrics = {"kind": "student", "split": split, "top1": top1, "pointing_game": 0.5, **extra}
    return pick_best.TrialResult(trial, {"train.lr_head": 0.01 * (int(trial[1:]) + 1)}, metrics)


def test_the_best_trial_is_chosen_on_val_with_ties_to_the_earlier(tmp_path):
    results = [_result("t00", 0.5), _result("t01", 0.75), _result("t02", 0.75)]
    assert pick_best.choose(results).trial == "t01"
    assert pick_best.choose([_result("t00", float("nan")), _result("t01", 0.1)]).trial == "t01"
    with pytest.raises(IagnError, match="'test' split"):
        pick_best.choose([_result("t00", 0.5), _result("t01", 0.9, split="test")])
    summary = pick_best.run("sweep-a", ["train.lr_head"], results, tmp_path)
    assert summary["best_trial"] == "t01" and summary["metric"] == "val_top1"
    assert summary["trials"][1]["metrics"] == {"val_top1": 0.75, "val_pointing_game": 0.5}
    markdown = (tmp_path / "summary.md").read_text()
    assert "| t01 | 0.02 | 0.75 | 0.5 | **best** |" in markdown
    assert (tmp_path / "summary.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((tmp_path / "sweep.json").read_text()) == summary


def test_local_trials_side_by_side_share_the_cores(monkeypatch):
    from pipeline.cli import share_cores

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert share_cores(1) is None and "OMP_NUM_THREADS" not in os.environ
    assert share_cores(3) == 2 and os.environ["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's choice stands
    assert share_cores(2) is None and os.environ["OMP_NUM_THREADS"] == "4"
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert share_cores(4) == 1


def test_the_console_keeps_trials_side_by_side_apart(tmp_path):
    """Two trials run the same task names at once: each end line has its own time, and an
    epoch line is not credited to the wrong one."""
    console = io.StringIO()
    log = RunLog(tmp_path / "run.log", console)
    log.watch({"train-stage": "train stage 1"})
    log.write("00:00:00.000 - INFO - Executing task 'train-stage'\n")
    log.write("00:00:00.000 - INFO - Executing task 'train-stage'\n")
    log.write("    stage 1 epoch 1/1: loss 5.6, val_acc 0.25\n")
    log.write("00:00:01.000 - INFO - Task 'train-stage' finished with status SUCCESS\n")
    log.write("    stage 1 epoch 1/1: loss 5.2, val_acc 0.25\n")
    log.write("00:00:02.000 - INFO - Task 'train-stage' finished with status SUCCESS\n")
    log.close()
    lines = [" ".join(line.split()) for line in console.getvalue().splitlines()]
    assert lines[2] == "stage 1 epoch 1/1: loss 5.6, val_acc 0.25"  # two running: no name
    assert lines[4] == "train-stage stage 1 epoch 1/1: loss 5.2, val_acc 0.25"  # one left


# --- compiling and submitting ---------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[dict, dict, str]:
    """`iagn-pipeline sweep ... -o FILE` with credentials in the environment."""
    path = tmp_path_factory.mktemp("sweep-compile") / "sweep.yaml"
    result = run(
        [
            BIN / "iagn-pipeline",
            "sweep",
            *("--grid", "stage3.epochs=1,2", "--grid", "train.lr_head=0.01,0.02"),
            *("--parallelism", "3", "--sweep-id", "sweep-compiled", "-o", path),
        ],
        cwd=REPO_ROOT,
        env={"AWS_SECRET_ACCESS_KEY": SECRETS[1], "MLFLOW_TRACKING_PASSWORD": SECRETS[3]},
    )
    documents = list(yaml.safe_load_all(path.read_text()))
    assert len(documents) == 2, "pipeline spec + platform spec"
    return documents[0], documents[1], result.stdout + path.read_text()


def test_compiled_sweep_runs_trials_in_a_parallel_for(compiled):
    spec, platform, text = compiled
    assert "sweep sweep-compiled: 4 trials (grid), 3 at a time" in text
    assert re.search(r"^  t03 +2 +0\.02$", text, re.MULTILINE), text  # the trials table
    assert spec["pipelineInfo"]["name"] == "iagn-sweep"
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["sweep_id"]["defaultValue"] == "sweep-compiled"
    trials = inputs["trials"]
    assert trials["parameterType"] == "LIST" and len(trials["defaultValue"]) == 4
    assert trials["defaultValue"][3] == {
        "trial": "t03",
        "overrides": {"stage3.epochs": 2, "train.lr_head": 0.02},
    }
    components = spec["components"]
    steps = components["comp-exit-handler-1"]["dag"]["tasks"]
    loops = [name for name, task in steps.items() if "parameterIterator" in task]
    assert len(loops) == 1
    loop = steps[loops[0]]
    assert loop["taskInfo"]["name"] == "trials"
    assert loop["iteratorPolicy"] == {"parallelismLimit": 3}
    assert loop["parameterIterator"]["items"] == {"inputParameter": "pipelinechannel--trials"}
    body = components[loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(body) == LOOP_TASKS
    # The trials wait for the one validation outside the loop (KFP lifts stage 1's
    # dependency to the loop); every trial step reads the trial's params.
    assert "validate" in loop["dependentTasks"]
    for name in LOOP_TASKS - {"trial-params"}:
        params = body[name]["inputs"]["artifacts"]["params"]["taskOutputArtifact"]
        assert params["producerTask"] == "trial-params", name
    # After the loop: pick-best collects every trial's outputs, uncached.
    pick = steps["pick-best"]
    assert pick["cachingOptions"].get("enableCache", False) is False
    collected = components["comp-pick-best"]["inputDefinitions"]["artifacts"]
    for name in ("trial_params", "evaluations", "students", "teachers"):
        assert collected[name]["isArtifactList"] is True
        assert pick["inputs"]["artifacts"][name]["taskOutputArtifact"]["producerTask"] == loops[0]
    # The winner is evaluated on test and registered without promotion.
    gate = next(c for n, c in components.items() if n.startswith("comp-condition"))
    register = gate["dag"]["tasks"]["register"]
    assert register["inputs"]["parameters"]["may_promote"]["runtimeValue"]["constant"] is False
    for task in ("evaluate-2", "evaluate-3"):
        params = steps[task]["inputs"]["artifacts"]["params"]["taskOutputArtifact"]
        assert params == {"outputArtifactKey": "best_params", "producerTask": "pick-best"}
    # Credentials stay in the Kubernetes secret: named, never their values.
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert executors["exec-pick-best"]["secretAsEnv"][0]["secretName"] == "iagn-credentials"
    for secret in SECRETS:
        assert secret not in text


def test_a_sweep_on_the_command_line_fails_clearly(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO_ROOT)
    for argv, named in [
        (["--grid", "stage3.epohcs=1,2"], "'stage3.epohcs': stage3 has no 'epohcs'"),
        (["--random", "2", "--dist", "train.lr_head=gauss(0,1)"], "not a distribution"),
        (["--grid", "stage3.epochs=1,2", "--local", "--host", "http://x"], "leave out --host"),
        (["--grid", "evaluate.split=val,test"], "evaluate.split cannot be swept"),
        (["--grid", "stage3.epochs=1", "--param", "evaluate.split=val"], "evaluate.split=val"),
        (["--grid", "stage3.epochs=1", "--parallelism", "0"], "--parallelism 0"),
        ([], "an empty sweep"),
    ]:
        code = main(["sweep", *argv, "-o", str(tmp_path / "sweep.yaml")])
        out, err = capsys.readouterr()
        assert code == 2, (argv, out, err)
        assert err.startswith("iagn-pipeline: error: ") and named in err, (argv, err)
        assert not (tmp_path / "sweep.yaml").exists()


def test_sweep_submits_the_trials_to_kfp(kfp_api, capsys, monkeypatch):
    url, state = kfp_api
    monkeypatch.chdir(REPO_ROOT)
    code = main(
        [
            "sweep",
            *("--random", "3", "--dist", "train.lr_head=loguniform(0.001,0.1)", "--seed", "5"),
            *("--sweep-id", "sweep-ci-1", "--host", url, "--token", TOKEN),
            *("--param", "data_rev=v1.0", "--param", "stage3.epochs=2"),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "run id      run-0001" in out and TOKEN not in out + err
    assert not Path("iagn_sweep.yaml").exists()  # with --host, -o alone keeps a copy
    body = run_body(state)
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in state.requests)
    assert ("POST", f"{API}/runs") in state.calls()
    assert body["display_name"] == "iagn sweep-ci-1"
    spec = body["pipeline_spec"]["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "iagn-sweep"
    parameters = body["runtime_config"]["parameters"]
    expected = build_sweep(
        random_count=3, dists=["train.lr_head=loguniform(0.001,0.1)"], seed=5, params=PARAMS
    ).trials
    assert parameters == {
        "data_rev": "v1.0",
        "params_overrides": {"stage3.epochs": 2},
        "trials": expected,
        "sweep_id": "sweep-ci-1",
    }


# --- one sweep end to end -------------------------------------------------------------------


_SWEEP: dict[str, Background] = {}


def start_local_sweep(request: pytest.FixtureRequest) -> Background:
    """`iagn-pipeline sweep --local` of 2 trials, side by side, against the MLflow server,
    started once per session in the background. A module that runs before this one can start
    it: tests/test_readme_commands.py does, when this module's sweep tests are in the
    session, so its one-step-at-a-time blocks and the sweep share the cores."""
    if "sweep" not in _SWEEP:
        server = request.getfixturevalue("mlflow_server")
        base = request.getfixturevalue("tmp_path_factory").mktemp("sweep-local")
        argv = [
            BIN / "iagn-pipeline",
            "sweep",
            *("--grid", "train.lr_head=0.01,0.05", "--sweep-id", SWEEP_ID, "--local"),
            *("--param", f"model_name={MODEL}", "--param", f"experiment={EXPERIMENT}"),
        ]
        env = server.env(EXPERIMENT)
        _SWEEP["sweep"] = start_background(request, argv, dvc_project(base), "sweep", env)
    return _SWEEP["sweep"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The local sweep's project where it was started, else one of its own."""
    if "sweep" in _SWEEP:
        return _SWEEP["sweep"].project
    return dvc_project(tmp_path_factory.mktemp("sweep-project"))


@pytest.fixture(scope="module")
def local_sweep(request, mlflow_server):
    """The sweep's result, once it has ended."""
    result = start_local_sweep(request).result()
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return result


def test_local_sweep_tracks_each_trial_under_one_parent(local_sweep, mlflow_server):
    out = local_sweep.stdout
    assert f"sweep {SWEEP_ID}: 2 trials (grid), 2 at a time" in out
    assert re.search(r"^  t01 +0\.05$", out, re.MULTILINE), out
    assert f"registered       models:/{MODEL}@challenger (version 1, student)" in out
    for secret in SECRETS:
        assert secret not in out + local_sweep.stderr, "a credential reached the console"

    client = mlflow_server.client()
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = client.search_runs([experiment], max_results=200)
    parents = [r for r in runs if r.data.tags.get("iagn.role") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["iagn.sweep_id"] == SWEEP_ID

    def children(run_id: str) -> list:
        return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run_id]

    trials = {
        r.data.tags["iagn.sweep_trial"]: r
        for r in children(parent.info.run_id)
        if r.data.tags.get("iagn.role") == "trial"
    }
    assert sorted(trials) == ["t00", "t01"]
    for name, lr in (("t00", "0.01"), ("t01", "0.05")):
        trial = trials[name]
        assert trial.info.status == "FINISHED"
        assert trial.info.run_name == f"{name} train.lr_head={lr}"
        assert trial.data.tags["iagn.sweep_id"] == SWEEP_ID
        assert trial.data.params == {"train.lr_head": lr}
        assert {"val_top1", "val_pointing_game"} <= set(trial.data.metrics)
        steps = {r.info.run_name: r for r in children(trial.info.run_id)}
        assert set(steps) == TRIAL_STEPS
        assert {r.info.status for r in steps.values()} == {"FINISHED"}
        assert steps["train-stage-1"].data.params["train.lr_head"] == lr
    at_parent = {
        r.info.run_name for r in children(parent.info.run_id) if "iagn.step" in r.data.tags
    }
    assert at_parent == PARENT_STEPS

    # The best on the validation metric, ties to the earlier trial.
    scores = [(trials[t].data.metrics["val_top1"], -i, t) for i, t in enumerate(sorted(trials))]
    best = max(scores)[2]
    assert parent.data.tags["iagn.sweep_best_trial"] == best
    assert trials[best].data.tags["iagn.sweep_best"] == "true"
    assert f"best {best} (train.lr_head=" in out

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert artifacts == {"sweep/summary.md", "sweep/summary.png", "sweep/sweep.json"}
    folder = client.download_artifacts(parent.info.run_id, "sweep/summary.md")
    summary = Path(folder).read_text()
    assert "| t00 | 0.01 |" in summary and "| t01 | 0.05 |" in summary

    # The winner's student is registered as challenger only, from its trial's distill run.
    version = client.get_model_version_by_alias(MODEL, "challenger")
    assert "champion" not in version.aliases
    assert version.tags["iagn.promotion"].startswith("not promoted: challenger only")
    best_distill = next(
        r for r in children(trials[best].info.run_id) if r.info.run_name == "distill"
    )
    assert version.run_id == best_distill.info.run_id


def test_the_sweeps_trials_compare_in_the_mlflow_ui(local_sweep, mlflow_server, tmp_path):
    """What a person does after a sweep: open the parent's trial runs in MLflow's compare
    view and read the swept param against the validation metric."""
    from playwright.sync_api import expect
    from test_mlflow_ui import chromium, keep_screenshot, open_compare_view

    client = mlflow_server.client()
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    trials = client.search_runs(
        [experiment], f"tags.`iagn.role` = 'trial' and tags.`iagn.sweep_id` = '{SWEEP_ID}'"
    )
    by_trial = {r.data.tags["iagn.sweep_trial"]: r for r in trials}
    assert sorted(by_trial) == ["t00", "t01"]
    ids = [by_trial[t].info.run_id for t in sorted(by_trial)]
    with chromium() as browser:
        page = open_compare_view(browser, mlflow_server.url, ids, experiment, 1500)
        body = page.locator("body")
        for trial in by_trial.values():
            expect(body).to_contain_text(trial.info.run_name)  # "t00 train.lr_head=0.01"
        # The param's own row (the run names hold the key too).
        row = page.get_by_role("row", name=re.compile(r"^train\.lr_head "))
        expect(row).to_contain_text("0.01")
        expect(row).to_contain_text("0.05")
        # The metrics' table, and the scatter plot of the swept param against val_top1.
        expect(page.get_by_role("link", name="val_top1", exact=True)).to_be_visible()
        for trial in by_trial.values():
            value = f"{trial.data.metrics['val_top1']:.3g}"
            expect(page.get_by_role("grid").nth(1)).to_contain_text(value)
        plot = page.get_by_role("img").filter(has_text="train.lr_head")
        expect(plot.first).to_contain_text("val_top1")
        close = page.get_by_role("button", name="Close")  # the assistant's panel
        if close.count():
            close.first.click()
        shot = tmp_path / "sweep-compare.png"
        page.screenshot(path=str(shot), full_page=True)
    keep_screenshot(shot, "IAGN_SWEEP_SCREENSHOT")


def test_local_sweep_leaves_the_kfp_outputs(local_sweep):
    project = _SWEEP["sweep"].project
    run_dirs = sorted((project / "build" / "kfp").glob("iagn-sweep-*"))
    assert len(run_dirs) == 1
    outputs = run_dirs[0]
    for i, lr in enumerate((0.01, 0.05)):
        params = yaml.safe_load(
            next(outputs.glob(f"for-loop-*-iteration-{i}/trial-params/params")).read_text()
        )
        assert params["train"]["lr_head"] == lr and params["evaluate"]["split"] == "val"
        metrics = next(outputs.glob(f"for-loop-*-iteration-{i}/evaluate/evaluation/metrics.json"))
        assert json.loads(metrics.read_text())["split"] == "val"
    pick = outputs / "pick-best"
    assert "**best**" in (pick / "summary").read_text()
    assert "data:image/png;base64," in (pick / "report").read_text()
    best_params = yaml.safe_load((pick / "best_params").read_text())
    assert "sweep" not in best_params and best_params["evaluate"]["split"] == "test"
    splits = {
        json.loads(p.read_text())["kind"]: json.loads(p.read_text())["split"]
        for p in outputs.glob("evaluate-*/evaluation/metrics.json")
    }
    assert splits == {"teacher": "test", "student": "test"}  # only the winner sees test
    decision = json.loads((outputs / "register" / "result" / "register.json").read_text())
    assert decision["passed"] and not decision["outcomes"][0]["champion"]


@pytest.mark.fault(
    "a sweep trial whose step fails (a swept value training refuses)",
    sees="exit 1: the FAILURE line of the trial's task and its last lines (`iagn: error: epochs "
    "and batch_size must be at least 1`); `kfp.local run FAILED`",
    kept="the MLflow parent and the trial runs, FAILED with the step's error; nothing is "
    "registered",
)
def test_a_failing_trial_fails_its_run_and_the_sweep(project, mlflow_server, tmp_path):
    experiment = "iagn-sweep-failure"
    result = run(
        [
            BIN / "iagn-pipeline",
            "sweep",
            *("--grid", "train.batch_size=0,-1", "--sweep-id", "sweep-test-failure", "--local"),
            *("--param", f"experiment={experiment}", "--pipeline-root", tmp_path / "kfp"),
        ],
        cwd=project,
        env=mlflow_server.env(experiment),
        check=False,
        timeout=600,
    )
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "kfp.local run FAILED" in out
    assert re.search(r"^  FAILURE +train-stage +\d+\.\d s$", out, re.MULTILINE), out
    # Two trials fail side by side: the error is the task's own line or kfp's summary of it.
    error = r"^ *\| +iagn: error: epochs and batch_size must be at least 1$"
    assert re.search(error, out, re.MULTILINE), out
    assert "pick-best" not in out and "register" not in out

    client = mlflow_server.client()
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parent = next(r for r in runs if r.data.tags.get("iagn.role") == "pipeline")
    assert parent.info.status == "FAILED"
    trials = [r for r in runs if r.data.tags.get("iagn.role") == "trial"]
    assert sorted(r.data.tags["iagn.sweep_trial"] for r in trials) == ["t00", "t01"]
    for trial in trials:
        assert trial.info.status == "FAILED"
        assert trial.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert trial.data.tags["iagn.error"].startswith("train-stage-1: IagnError: epochs")


def test_trial_runs_are_found_or_created_once_and_ended_by_the_exit_handler(
    mlflow_server, monkeypatch
):
    """Trial runs without a pipeline around them: created once however many steps start at
    the same moment, metrics put on them, and those left RUNNING ended by a failed sweep's
    exit handler."""
    from concurrent.futures import ThreadPoolExecutor

    import mlflow

    from iagn.provenance import provenance_tags
    from iagn.tracking import configure, experiment_id
    from iagn.tracking.parent import resolve_parent
    from iagn.tracking.trial import (
        end_open_trials,
        find_or_create_trial,
        log_trial_metrics,
        trial_of,
    )

    env = mlflow_server.env("iagn-sweep-trials", IAGN_PIPELINE_RUN="sweep-trials-test")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("KFP_RUN_ID", raising=False)
    params = apply_trial(PARAMS, {"trial": "t00", "overrides": {"stage3.epochs": 2}}, "sweep-x")
    trial = trial_of(params)
    configure()
    client = mlflow.MlflowClient()
    experiment = experiment_id(client)
    parent = resolve_parent(client, experiment, provenance_tags()).run_id

    def create(_):
        return find_or_create_trial(client, experiment, parent, trial, {})

    with ThreadPoolExecutor(4) as pool:
        created = set(pool.map(create, range(4)))
    assert len(created) == 1, "concurrent creators agree on one trial run"
    run_id = created.pop()
    assert log_trial_metrics(params, {"val_top1": 0.5}) == run_id
    trial_run = client.get_run(run_id)
    assert trial_run.data.metrics == {"val_top1": 0.5}
    assert trial_run.data.params == {"stage3.epochs": "2"}
    assert trial_run.info.run_name == "t00 stage3.epochs=2"
    assert client.get_run(parent).data.tags["iagn.sweep_id"] == "sweep-x"
    assert log_trial_metrics({"train": {}}, {"val_top1": 0.5}) is None  # not a trial

    assert end_open_trials("FAILED") == 1
    assert client.get_run(run_id).info.status == "FAILED"
    assert end_open_trials("FAILED") == 0
