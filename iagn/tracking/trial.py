"""The trial runs of a hyperparameter sweep: one MLflow run per trial under the sweep's parent.

A sweep (`iagn-pipeline sweep`, pipeline/sweep_dag.py) is one pipeline run: its parent run
is the sweep's parent. Every trial's steps get params with a `sweep` section
({id, trial, overrides}); `step_run` then nests the step's run under the trial's run,
which the trial's first step finds or creates here (concurrent creators agree on the
oldest, as for the pipeline's parent). A trial run carries the trial's overrides as params
under their dotted keys (`stage3.epochs`) and its validation metrics (`val_top1`, ...), so
MLflow's compare view sets the swept values against the metric. The trial's status: a
failing step marks it FAILED at once; the sweep's pick-best task ends the others FINISHED;
the exit handler of a failed sweep ends those still RUNNING.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iagn.errors import IagnError
from iagn.provenance import ENV_KFP_RUN
from iagn.tracking.parent import TAG_ERROR, TAG_OUTCOME, TAG_PIPELINE_RUN, TAG_ROLE

SECTION = "sweep"
ROLE = "trial"
TAG_SWEEP_ID = "iagn.sweep_id"
TAG_TRIAL = "iagn.sweep_trial"
TAG_BEST_TRIAL = "iagn.sweep_best_trial"  # on the sweep's parent
TAG_IS_BEST = "iagn.sweep_best"  # on each trial run: true / false
TAG_PARENT = "mlflow.parentRunId"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # safe inside a quoted search filter
NAME_CHARS = 120


@dataclass(frozen=True)
class Trial:
    sweep_id: str
    trial: str
    overrides: dict[str, Any]

    @property
    def run_name(self) -> str:
        """`t00 stage3.epochs=1 train.lr_head=0.01`: the trial and what it changes."""
        shown = " ".join(f"{key}={_value(value)}" for key, value in self.overrides.items())
        name = f"{self.trial} {shown}".strip()
        return name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 3] + "..."

    def params(self) -> dict[str, str]:
        return {key: _value(value) for key, value in self.overrides.items()}


def _value(value: Any) -> str:
    """As the step runs log params (iagn.tracking.step.flatten): strings as they are."""
    return value if isinstance(value, str) else json.dumps(value)


def trial_of(params: Mapping[str, Any] | None) -> Trial | None:
    """The trial a step belongs to (params' `sweep` section), or None outside a sweep."""
    section = (params or {}).get(SECTION)
    if not section:
        return None
    if not isinstance(section, Mapping):
        raise IagnError("params.yaml `sweep` must be a mapping {id, trial, overrides}")
    sweep_id, trial = str(section.get("id", "")), str(section.get("trial", ""))
    for name, value in (("sweep.id", sweep_id), ("sweep.trial", trial)):
        if not _ID.match(value):
            raise IagnError(
                f"params.yaml {name} {value!r} must be 1-100 letters, digits, '.', '_' or '-'"
            )
    return Trial(sweep_id, trial, dict(section.get("overrides") or {}))


def _search(client, experiment: str, query: str) -> list:
    from mlflow.entities import ViewType

    return client.search_runs(
        [experiment], query, run_view_type=ViewType.ACTIVE_ONLY, max_results=1000
    )


def _query(sweep_id: str, parent_id: str | None, trial: str | None = None) -> str:
    query = f"tags.`{TAG_ROLE}` = '{ROLE}' and tags.`{TAG_SWEEP_ID}` = '{sweep_id}'"
    if parent_id:
        query += f" and tags.`{TAG_PARENT}` = '{parent_id}'"
    if trial:
        query += f" and tags.`{TAG_TRIAL}` = '{trial}'"
    return query


def find_trial(client, experiment: str, parent_id: str | None, trial: Trial):
    """The trial's run (the oldest, should two have been created), or None."""
    runs = _search(client, experiment, _query(trial.sweep_id, parent_id, trial.trial))
    return min(runs, key=lambda run: (run.info.start_time, run.info.run_id)) if runs else None


def find_or_create_trial(
    client, experiment: str, parent_id: str | None, trial: Trial, tags: Mapping[str, str]
) -> str:
    """The trial's run id: found, or created under `parent_id` with its overrides as params.

    Two trial steps may start at once only on a cluster that runs them so (the steps of one
    trial run in sequence): each creates, then both read back and keep the oldest.
    """
    from mlflow.entities import Param

    found = find_trial(client, experiment, parent_id, trial)
    if found is not None:
        return found.info.run_id
    run_tags = {**tags, TAG_ROLE: ROLE, TAG_SWEEP_ID: trial.sweep_id, TAG_TRIAL: trial.trial}
    if parent_id:
        run_tags[TAG_PARENT] = parent_id
        run_tags[TAG_PIPELINE_RUN] = os.environ.get(ENV_KFP_RUN) or parent_id
    created = client.create_run(experiment, run_name=trial.run_name, tags=run_tags)
    run_id = created.info.run_id
    params = [Param(key, value) for key, value in trial.params().items()]
    if params:
        client.log_batch(run_id, params=params)
    if parent_id:
        _tag_parent(client, parent_id, TAG_SWEEP_ID, trial.sweep_id)
    found = find_trial(client, experiment, parent_id, trial)
    winner = found.info.run_id if found is not None else run_id
    if winner != run_id:
        client.delete_run(run_id)  # another step of this trial created it first
    return winner


def _tag_parent(client, parent_id: str, key: str, value: str) -> None:
    """Tag the sweep's parent, which the first steps of every trial do, at once when trials
    run side by side: MLflow's SQL store inserts a new tag after looking for it, so two
    writers of the same new tag collide on its unique key. The loser finds the tag set."""
    from mlflow.exceptions import MlflowException

    if client.get_run(parent_id).data.tags.get(key) == value:
        return
    try:
        client.set_tag(parent_id, key, value)
    except MlflowException:
        if client.get_run(parent_id).data.tags.get(key) != value:
            raise


def fail_trial(run_id: str | None, status: str, outcome: str, error: str) -> None:
    """A step of the trial failed: the trial's run ends with it (best effort, short waits:
    the step's own end has been sent or kept already)."""
    if not run_id:
        return
    from mlflow import MlflowClient

    from iagn.tracking.spool import PROBE_TIMEOUT, http_limits

    with http_limits(PROBE_TIMEOUT, 0), contextlib.suppress(Exception):
        client = MlflowClient()
        client.set_tag(run_id, TAG_OUTCOME, outcome)
        client.set_tag(run_id, TAG_ERROR, error)
        client.set_terminated(run_id, status)


def _pipeline_parent(client, experiment: str) -> str | None:
    from iagn.provenance import provenance_tags
    from iagn.tracking.parent import resolve_parent

    return resolve_parent(client, experiment, provenance_tags()).run_id


def log_trial_metrics(params: Mapping[str, Any], metrics: Mapping[str, float]) -> str | None:
    """Put `metrics` (the trial's validation numbers) on its trial run; the run id.

    Best effort: pick-best logs them again where they are missing, so an MLflow error here
    is a warning, not a failed evaluation.
    """
    from iagn.tracking.store import configure, experiment_id, mlflow_errors, tracking_enabled

    trial = trial_of(params)
    if trial is None or not tracking_enabled() or not metrics:
        return None
    import mlflow

    try:
        uri = configure()
        with mlflow_errors(uri):
            client = mlflow.MlflowClient()
            experiment = experiment_id(client)
            parent = _pipeline_parent(client, experiment)
            run_id = find_or_create_trial(client, experiment, parent, trial, {})
            _log_metrics(client, run_id, metrics)
    except IagnError as error:
        print(
            f"iagn: warning: the trial's metrics are not on its run yet: {error}", file=sys.stderr
        )
        return None
    return run_id


def _log_metrics(client, run_id: str, metrics: Mapping[str, float]) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])


def record_sweep(
    sweep_id: str,
    trials: list[tuple[Trial, Mapping[str, float]]],
    best: str,
    files: list[Path],
) -> dict[str, Any]:
    """After the trials: each trial run gets its metrics (where missing) and ends FINISHED
    (a cached trial ran no step, so its run is created here); the sweep's parent gets the
    sweep's tags and `files` under `sweep/`. Returns the parent's and trials' run ids."""
    from iagn.tracking.store import configure, experiment_id, mlflow_errors, tracking_enabled

    if not tracking_enabled():
        return {}
    import mlflow

    uri = configure()
    with mlflow_errors(uri):
        client = mlflow.MlflowClient()
        experiment = experiment_id(client)
        parent = _pipeline_parent(client, experiment)
        runs = {}
        for trial, metrics in trials:
            run_id = find_or_create_trial(client, experiment, parent, trial, {})
            run = client.get_run(run_id)
            missing = {k: v for k, v in metrics.items() if k not in run.data.metrics}
            if missing:
                _log_metrics(client, run_id, missing)
            client.set_tag(run_id, TAG_IS_BEST, str(trial.trial == best).lower())
            if run.info.status != "FINISHED":
                client.set_terminated(run_id, "FINISHED")
            runs[trial.trial] = run_id
        if parent:
            client.set_tag(parent, TAG_SWEEP_ID, sweep_id)
            client.set_tag(parent, TAG_BEST_TRIAL, best)
            for path in files:
                client.log_artifact(parent, str(path), "sweep")
    return {"parent_run_id": parent, "experiment_id": experiment, "trial_runs": runs, "uri": uri}


def end_open_trials(status: str) -> int:
    """A failed sweep's exit handler: trial runs of this pipeline still RUNNING end `status`
    (FAILED or KILLED). Best effort; returns how many it ended."""
    from iagn.tracking.parent import find_pipeline_parent, pipeline_key
    from iagn.tracking.store import configure, experiment_id, tracking_enabled

    key = pipeline_key() if tracking_enabled() else None
    if key is None:
        return 0
    import mlflow

    ended = 0
    with contextlib.suppress(Exception):
        configure()
        client = mlflow.MlflowClient()
        experiment = experiment_id(client)
        parent = find_pipeline_parent(client, experiment, key[0])
        if parent is None:
            return 0
        query = f"tags.`{TAG_ROLE}` = '{ROLE}' and tags.`{TAG_PARENT}` = '{parent.info.run_id}'"
        for run in _search(client, experiment, query):
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, status)
                ended += 1
    return ended
