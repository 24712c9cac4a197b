"""A hyperparameter sweep's own components: each trial's params, and picking the best trial.

`trial_params` runs first in every trial (pipeline/sweep_dag.py's ParallelFor); what it
writes is the params every later step of that trial reads. `pick_best` runs once after all
trials (their outputs as `dsl.Collected` lists) and hands the winner on to the test-split
evaluation and the registry.
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Markdown, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def trial_params(
    base_params: Input[Artifact], trial: dict, sweep_id: str, params: Output[Artifact]
):
    """The trial's params.yaml: the run's params, the trial's overrides, validation only.

    Args:
        base_params: The run's params.yaml (fetch-data's, with --param overrides).
        trial: {"trial": "t00", "overrides": {dotted key: value}} (one item of `trials`).
        sweep_id: The sweep's id.
        params: base_params + the overrides + `evaluate.split: val` + a `sweep` section
            {id, trial, overrides}, which nests the trial's MLflow runs under its trial run.
    """
    import yaml

    from components.runtime import readable_errors, sweep_metadata, write_text
    from iagn.steps.trial_params import trial_settings

    with readable_errors():
        settings = trial_settings(base_params.path, trial, sweep_id)
    write_text(params.path, yaml.safe_dump(settings, sort_keys=False))
    params.metadata.update(sweep_metadata(settings))
    params.metadata["overrides"] = settings["sweep"]["overrides"]
    print(f"trial {trial.get('trial')}: {settings['sweep']['overrides']}")


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def pick_best(
    base_params: Input[Artifact],
    trial_params: Input[list[Artifact]],
    evaluations: Input[list[Artifact]],
    students: Input[list[Model]],
    teachers: Input[list[Model]],
    sweep_id: str,
    tracking_uri: str,
    experiment: str,
    summary: Output[Markdown],
    report: Output[HTML],
    result: Output[Artifact],
    best_student: Output[Model],
    best_teacher: Output[Model],
    best_params: Output[Artifact],
) -> str:
    """Choose the best trial on the validation metric; summarize the sweep in KFP and MLflow.

    Args:
        base_params: The run's params.yaml (its evaluate.split is the winner's test split).
        trial_params: Every trial's params (collected from the trials).
        evaluations: Every trial's student evaluation on the validation split.
        students: Every trial's student checkpoint.
        teachers: Every trial's stage-3 checkpoint.
        sweep_id: The sweep's id.
        tracking_uri: MLflow tracking URI ("" = the environment's, else ./mlflow.db).
        experiment: MLflow experiment ("" = $MLFLOW_EXPERIMENT_NAME, else iagn).
        summary: The table of every trial (overrides, validation numbers, the best).
        report: The table and the plot of val top-1 against each swept key.
        result: sweep.json, summary.md and summary.png (also on the MLflow parent run).
        best_student: The winning trial's student.
        best_teacher: The winning trial's teacher.
        best_params: The winner's params for the test split: its overrides, no `sweep`.

    Returns:
        The winning trial's id.
    """
    import shutil
    from pathlib import Path

    import yaml

    from components.pages import sweep_html
    from components.runtime import by_trial, configure_step, readable_errors, write_text
    from iagn.params import load_params
    from iagn.steps import pick_best as step
    from iagn.steps.trial_params import winner_settings
    from iagn.tracking.trial import record_sweep, trial_of

    with readable_errors():
        configure_step(tracking_uri, experiment)
        params = by_trial(trial_params, "trial params")
        trials = {trial: trial_of(load_params(a.path)) for trial, a in params.items()}
        evaluated = by_trial(evaluations, "evaluations", list(trials))
        results = [
            step.TrialResult(trial, trials[trial].overrides, step.read_metrics(a.path))
            for trial, a in evaluated.items()
        ]
        keys = list(dict.fromkeys(key for t in trials.values() for key in t.overrides))
        chosen = step.run(sweep_id, keys, results, result.path)
        best = chosen["best_trial"]
        shutil.copyfile(by_trial(students, "students", list(trials))[best].path, best_student.path)
        shutil.copyfile(by_trial(teachers, "teachers", list(trials))[best].path, best_teacher.path)
        settings = winner_settings(params[best].path, base_params.path)
        write_text(best_params.path, yaml.safe_dump(settings, sort_keys=False))
        folder = Path(result.path)
        scores = [(trials[r.trial], step.trial_metrics(r.metrics)) for r in results]
        files = [folder / step.SUMMARY_MD, folder / step.SUMMARY_PNG, folder / step.SWEEP_JSON]
        tracked = record_sweep(sweep_id, scores, best, files)
    write_text(summary.path, (folder / step.SUMMARY_MD).read_text())
    write_text(report.path, sweep_html(chosen, folder / step.SUMMARY_PNG))
    for artifact in (best_student, best_teacher, best_params):
        artifact.metadata.update({"sweep_id": sweep_id, "sweep_trial": best})
    best_student.metadata.update({"framework": "pytorch", "kind": "student"})
    best_teacher.metadata.update({"framework": "pytorch", "kind": "teacher"})
    parent = tracked.get("parent_run_id") or ""
    result.metadata.update({"sweep_id": sweep_id, "best_trial": best, "mlflow_run_id": parent})
    value = next(t["metrics"] for t in chosen["trials"] if t["trial"] == best)
    print(f"sweep {sweep_id}: best trial {best} {chosen['best_overrides']} ({value})")
    return best
