"""The pipeline's parent run: which run it is, and its status (see the package doc).

Status rule. Steps set a parent they found or created by key (IAGN_PIPELINE_RUN, KFP_RUN_ID,
a DVC repro) RUNNING when they start and FAILED (KILLED on Ctrl-C) when they fail or block;
a failure is final at once. FINISHED is written only by `finish`, which the one ender of
each pipeline calls: the KFP exit handler (`end_pipeline`), or, for a DVC repro or a named
pipeline run outside KFP, the last step (`register`: `step_run(..., ends_pipeline=True)`).

MLflow has no compare-and-set, so "never turn a failure into FINISHED" rests on this: a
failure is recorded in the tag `iagn.outcome`, which nothing but failures writes while
steps run (a step start writes only the status), and the ender reads that tag and writes
the final status after every other step of its pipeline has ended: KFP runs the exit
handler after all tasks; `dvc repro` runs one stage at a time, `register` last, and stops
at the first failure; a named run outside KFP is ordered by whoever runs its steps. So the
ender has no concurrent writer, and the one window left, a step start that read "not
failed" just before a sibling failed and then wrote RUNNING over FAILED, keeps the tag,
from which the ender restores FAILED.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass

from iagn.errors import IagnError
from iagn.provenance import (
    ENV_KFP_RUN,
    ENV_PIPELINE_RUN,
    dvc_ancestor,
    dvc_experiment,
    provenance_tags,
)
from iagn.redact import scrub_text
from iagn.tracking.store import configure, experiment_id, mlflow_errors, tracking_enabled

ENV_PARENT_RUN = "IAGN_PARENT_RUN_ID"

TAG_ROLE = "iagn.role"
TAG_PIPELINE_KEY = "iagn.pipeline_key"
TAG_PIPELINE_RUN = "iagn.pipeline_run_id"
TAG_OUTCOME = "iagn.outcome"
TAG_ERROR = "iagn.error"
TAG_FAILED_TASK = "iagn.kfp_failed_task"

FAILED_STATUSES = ("FAILED", "KILLED")
# Values of iagn.outcome that record a failure (a step's outcome, copied to its parent).
FAILED_OUTCOMES = {"failed": "FAILED", "blocked": "FAILED", "killed": "KILLED"}
ERROR_CHARS = 5000
_PIPELINE_NAME = re.compile(r"^[^'\"\\\x00-\x1f]{1,200}$")

# Where a parent comes from: the prefix of its pipeline key, or how it was named.
SOURCE_PIPELINE = "pipeline"  # IAGN_PIPELINE_RUN
SOURCE_KFP = "kfp"  # KFP_RUN_ID
SOURCE_DVC = "dvc"  # a `dvc repro` / `dvc exp run` ancestor
SOURCE_EXPLICIT = "explicit"  # IAGN_PARENT_RUN_ID
SOURCE_ACTIVE = "active"  # an MLflow run active in this process (a notebook)


@dataclass(frozen=True)
class Parent:
    """The parent run of a step (run_id None: the step is a top-level run) and its source."""

    run_id: str | None = None
    source: str = ""

    @property
    def managed(self) -> bool:
        """Whether steps set its status: only parents found or created by a pipeline key.

        A run named by IAGN_PARENT_RUN_ID or active in this process belongs to whoever
        started it; steps nest under it and leave its status alone.
        """
        return self.run_id is not None and self.source in (
            SOURCE_PIPELINE,
            SOURCE_KFP,
            SOURCE_DVC,
        )

    @property
    def ended_by_last_step(self) -> bool:
        """Whether the pipeline's last step ends it (not KFP: its exit handler does)."""
        return self.managed and self.source in (SOURCE_PIPELINE, SOURCE_DVC)


def pipeline_key() -> tuple[str, str] | None:
    """(key, run name) of the pipeline execution this process belongs to, if any.

    The key's prefix before the first colon is its source: pipeline, kfp or dvc.
    """
    for variable, prefix in ((ENV_PIPELINE_RUN, SOURCE_PIPELINE), (ENV_KFP_RUN, SOURCE_KFP)):
        name = os.environ.get(variable, "").strip()
        if name:
            if not _PIPELINE_NAME.match(name):
                raise IagnError(
                    f"{variable}={name!r} must be 1-200 characters without quotes, backslashes "
                    "or control characters"
                )
            return f"{prefix}:{name}", name
    dvc = dvc_ancestor()
    if dvc is not None:
        # Keyed by the DVC process, not the experiment's name: one name can be run again (on
        # another baseline, after `dvc exp remove`), each run its own parent. Under `dvc queue
        # start` the nearest dvc ancestor is the experiment's own `dvc exp exec-run` process.
        host = socket.gethostname()
        key = f"{SOURCE_DVC}:{host}:{dvc[0]}:{dvc[1]}"
        experiment = dvc_experiment()
        return key, f"dvc exp {experiment}" if experiment else f"dvc repro {host} pid {dvc[0]}"
    return None


def find_pipeline_parent(client, experiment: str, key: str):
    """The parent run tagged with pipeline `key` (the oldest active one), or None."""
    from mlflow.entities import ViewType

    query = f"tags.`{TAG_PIPELINE_KEY}` = '{key}'"
    runs = client.search_runs(
        [experiment], query, run_view_type=ViewType.ACTIVE_ONLY, max_results=20
    )
    return min(runs, key=lambda run: (run.info.start_time, run.info.run_id)) if runs else None


def _find_or_create(client, experiment: str, key: str, name: str, tags: dict) -> str:
    """Find the parent tagged `key`, or create it; concurrent creators agree on the oldest."""
    found = find_pipeline_parent(client, experiment, key)
    if found is not None:
        return found.info.run_id
    created = client.create_run(
        experiment, run_name=name, tags={**tags, TAG_PIPELINE_KEY: key, TAG_ROLE: "pipeline"}
    )
    run_id = created.info.run_id
    client.set_tag(run_id, TAG_PIPELINE_RUN, os.environ.get(ENV_KFP_RUN) or run_id)
    found = find_pipeline_parent(client, experiment, key)
    winner = found.info.run_id if found is not None else run_id
    if winner != run_id:
        client.delete_run(run_id)  # another step of this pipeline created the parent first
    return winner


def resolve_parent(client, experiment: str, tags: dict) -> Parent:
    """The parent of a step starting now, in the order the package doc lists."""
    import mlflow

    explicit = os.environ.get(ENV_PARENT_RUN, "").strip()
    if explicit:
        from mlflow.exceptions import MlflowException

        try:
            client.get_run(explicit)
        except MlflowException:
            raise IagnError(
                f"{ENV_PARENT_RUN}={explicit} is not a run of this tracking store; unset it "
                "or set it to an existing run id"
            ) from None
        return Parent(explicit, SOURCE_EXPLICIT)
    key = pipeline_key()
    if key is not None:
        run_id = _find_or_create(client, experiment, key[0], key[1], tags)
        return Parent(run_id, key[0].partition(":")[0])
    active = mlflow.active_run()
    if active is not None:
        return Parent(active.info.run_id, SOURCE_ACTIVE)
    return Parent()


def _failure(run) -> str | None:
    """The failure status a run records (FAILED or KILLED), or None."""
    recorded = FAILED_OUTCOMES.get(run.data.tags.get(TAG_OUTCOME, ""))
    if recorded:
        return recorded
    return run.info.status if run.info.status in FAILED_STATUSES else None


def mark_running(client, run_id: str) -> None:
    """A step starts: the parent is RUNNING again, unless a failure is recorded (final)."""
    run = client.get_run(run_id)
    if _failure(run) is None and run.info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")


def record_failure(
    client, run_id: str, status: str, outcome: str, error: str, task: str = ""
) -> str:
    """Mark the parent failed at once; the first failure's outcome and error are kept.

    Two failures at the same moment may both write their tags (the last one's error
    stays): either way the parent records a failure. Returns the status it ends with.
    """
    from mlflow.entities import RunTag

    run = client.get_run(run_id)
    recorded = _failure(run)
    tags = []
    if recorded is None:
        tags += [RunTag(TAG_OUTCOME, outcome), RunTag(TAG_ERROR, scrub_text(error)[:ERROR_CHARS])]
    if task:
        tags.append(RunTag(TAG_FAILED_TASK, task))
    if tags:
        client.log_batch(run_id, tags=tags)
    final = recorded or status
    if run.info.status != final:
        client.set_terminated(run_id, final)
    return final


def finish(client, run_id: str, status: str = "FINISHED", reason: str = "", task: str = "") -> str:
    """End the pipeline's parent: the one place that writes FINISHED (see the module doc).

    FINISHED unless a failure is recorded; a failure stays (FAILED or KILLED). Ending an
    ended parent again changes nothing. Returns the status the parent ends with.
    """
    if status != "FINISHED":
        outcome = "killed" if status == "KILLED" else "failed"
        return record_failure(client, run_id, status, outcome, reason, task)
    run = client.get_run(run_id)
    recorded = _failure(run)
    if recorded is not None:
        if run.info.status != recorded:  # a step start wrote RUNNING over the failure
            client.set_terminated(run_id, recorded)
        return recorded
    if run.info.status != "FINISHED" or run.data.tags.get(TAG_OUTCOME) != "succeeded":
        client.set_tag(run_id, TAG_OUTCOME, "succeeded")
        client.set_terminated(run_id, "FINISHED")
    return "FINISHED"


def end_pipeline(status: str = "FINISHED", reason: str = "", task: str = "") -> dict[str, str]:
    """End this process's pipeline parent from outside a step (the KFP exit handler).

    `status`: FINISHED when the pipeline succeeded (the parent stays FAILED if a step
    failed), FAILED or KILLED with the `reason` and failed `task` as tags otherwise. A
    failure creates the parent if no step did (a pod killed for memory, an image that does
    not start, a failed data fetch); a success without one (every step cached) leaves none.
    Returns run_id, experiment_id, status and uri ({} when tracking is off, this process
    belongs to no pipeline, or there is no parent to finish).
    """
    if status not in ("FINISHED", *FAILED_STATUSES):
        raise ValueError(f"status {status!r}: expected FINISHED, FAILED or KILLED")
    if not tracking_enabled():
        return {}
    key = pipeline_key()
    if key is None:
        print("iagn: no pipeline run key (KFP_RUN_ID / IAGN_PIPELINE_RUN): no parent to end")
        return {}
    import mlflow

    uri = configure()
    with mlflow_errors(uri):
        client = mlflow.MlflowClient()
        experiment = experiment_id(client)
        if status == "FINISHED":
            found = find_pipeline_parent(client, experiment, key[0])
            if found is None:
                return {}
            run_id = found.info.run_id
        else:
            run_id = _find_or_create(client, experiment, key[0], key[1], provenance_tags())
        final = finish(client, run_id, status, reason, task)
    return {"run_id": run_id, "experiment_id": experiment, "status": final, "uri": uri}


def mark_pipeline_failed(reason: str, task: str = "") -> dict[str, str]:
    """`end_pipeline("FAILED", reason, task)`: what step runs cannot see themselves."""
    return end_pipeline("FAILED", reason, task)


def describe_pipeline_parent() -> dict[str, str]:
    """Where this pipeline run's MLflow parent is: run_id, experiment_id, status, uri.

    Best effort ({} when tracking is off, there is no key or no parent, or MLflow does not
    answer): for reports, which must not fail a run that succeeded.
    """
    key = pipeline_key() if tracking_enabled() else None
    if key is None:
        return {}
    try:
        import mlflow

        uri = configure()
        with mlflow_errors(uri):
            client = mlflow.MlflowClient()
            experiment = experiment_id(client)
            parent = find_pipeline_parent(client, experiment, key[0])
    except IagnError as error:
        print(f"iagn: warning: cannot look up the MLflow parent run: {error}", file=sys.stderr)
        return {}
    if parent is None:
        return {}
    return {
        "run_id": parent.info.run_id,
        "experiment_id": experiment,
        "status": parent.info.status,
        "uri": uri,
    }
