"""A hyperparameter sweep as one KFP v2 pipeline (`iagn-pipeline sweep`).

    resolve data revision -> fetch data (DVC) -> validate data           (once)
      -> ParallelFor(trials, parallelism):                               (each trial)
           trial params -> train stage 1 -> 2 -> 3 -> distill -> evaluate student (val)
      -> pick best (val top-1; summary to KFP and the MLflow parent)
      -> evaluate teacher and student (test) -> [gate: student passes] register (challenger)
    all inside the main pipeline's ExitHandler (pipeline/dag.py), with its task settings

Parameters: the main pipeline's (pipeline/dag.py), plus `trials` (the list
pipeline/sweep.py makes; its default is the sweep it was compiled for) and `sweep_id`.
The parallelism limit is fixed at compile time (KFP takes a number there, not a parameter).

The winner is registered as `challenger` only (register's `may_promote=False`): a sweep
picks among its own trials on validation data; whether the winner replaces the champion
is a person's decision, which the registry's recorded comparison informs.
"""

from typing import Any

from pipeline.dag import (
    REGISTER_RETRIES,
    CompileOptions,
    Tasks,
    fetch_and_validate,
    judge_and_register,
    make_pipeline,
    pipeline_parameters,
    train_and_distill,
)
from pipeline.sweep import Sweep

SWEEP_PIPELINE_NAME = "iagn-sweep"
DEFAULT_PARALLELISM = 2
LOOP_NAME = "trials"


def _sweep_steps(options: CompileOptions, parallelism: int, p: dict[str, Any]) -> None:
    from kfp import dsl

    from components.evaluate import evaluate
    from components.sweep import pick_best, trial_params

    t = Tasks(options, p)
    with t.exit_handler():
        fetch, data, check = fetch_and_validate(t)
        base = fetch.outputs["params"]
        with dsl.ParallelFor(items=p["trials"], parallelism=parallelism, name=LOOP_NAME) as trial:
            params = t.settings(
                trial_params(base_params=base, trial=trial, sweep_id=p["sweep_id"]),
                "trial params",
            )
            trial_data = {"dataset": data["dataset"], "params": params.outputs["params"]}
            teacher, student = train_and_distill(t, trial_data, check)
            evaluation = t.settings(
                evaluate(model=student.outputs["student"], **trial_data, **t.tracking),
                "evaluate student (val)",
            )
        best = pick_best(
            base_params=base,
            trial_params=dsl.Collected(params.outputs["params"]),
            evaluations=dsl.Collected(evaluation.outputs["evaluation"]),
            students=dsl.Collected(student.outputs["student"]),
            teachers=dsl.Collected(teacher),
            sweep_id=p["sweep_id"],
            **t.tracking,
        )
        # Never cached: it writes to this run's MLflow parent and trial runs.
        t.retry(t.settings(best, "pick best trial", cache=False), REGISTER_RETRIES)
        winner = {"dataset": data["dataset"], "params": best.outputs["best_params"]}
        judge_and_register(
            t,
            best.outputs["best_teacher"],
            best.outputs["best_student"],
            winner,
            may_promote=False,
        )


def build_sweep_pipeline(
    sweep: Sweep,
    options: CompileOptions | None = None,
    parallelism: int = DEFAULT_PARALLELISM,
):
    """The sweep pipeline (a KFP GraphComponent); `sweep` gives the parameters' defaults."""
    options = options or CompileOptions()
    if parallelism < 1:
        from iagn.errors import IagnError

        raise IagnError(f"--parallelism {parallelism}: run at least 1 trial at a time")
    parameters = [
        *pipeline_parameters(options),
        ("trials", list, sweep.trials),
        ("sweep_id", str, sweep.sweep_id),
    ]
    description = (
        f"IAGN sweep ({sweep.kind} over {', '.join(sweep.keys)}): fetch, validate, then per "
        f"trial ({parallelism} at a time) train, distill, evaluate on val; pick the best, "
        "evaluate it on test, register it as challenger (MLflow)"
    )
    return make_pipeline(
        SWEEP_PIPELINE_NAME,
        description,
        parameters,
        lambda p: _sweep_steps(options, parallelism, p),
    )


def sweep_arguments(sweep: Sweep) -> dict[str, Any]:
    """What a run of the sweep pipeline is given (the defaults too, said explicitly)."""
    return {"trials": sweep.trials, "sweep_id": sweep.sweep_id}


def compile_sweep(
    path: str,
    sweep: Sweep,
    options: CompileOptions | None = None,
    parallelism: int = DEFAULT_PARALLELISM,
) -> str:
    from kfp import compiler

    compiler.Compiler().compile(build_sweep_pipeline(sweep, options, parallelism), path)
    return path
