"""A step's run: `step_run` opens it under the pipeline's parent, `StepRun` logs into it.

What `StepRun` logs is sent through an `Outbox` (iagn/tracking/spool.py): at once while MLflow
answers, kept in a spool file beside the step's output while it does not, so that a tracking
outage never stops a step once its run exists. `step_run` sends or keeps the run's end too,
and says at the end what is still unsent and how to send it (`iagn tracking replay`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from iagn.errors import IagnError
from iagn.provenance import ENV_KFP_RUN, provenance_tags
from iagn.redact import scrub_text
from iagn.tracking.parent import (
    ERROR_CHARS,
    TAG_ERROR,
    TAG_OUTCOME,
    TAG_PIPELINE_RUN,
    Parent,
    mark_running,
    resolve_parent,
)
from iagn.tracking.spool import DATASET_DIGEST_CHARS as DATASET_DIGEST_CHARS
from iagn.tracking.spool import PROBE_TIMEOUT, Outbox, http_limits, spool_path
from iagn.tracking.spool import TAG_DATA_DIGEST as TAG_DATA_DIGEST
from iagn.tracking.store import configure, experiment_id, mlflow_errors, tracking_enabled
from iagn.tracking.trial import fail_trial, find_or_create_trial, trial_of

TAG_STEP = "iagn.step"

_METRIC_NAME_BAD = re.compile(r"[^/\w.\- :]")


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr_head": 0.02}} -> {"train.lr_head": "0.02"}; values as YAML writes them."""
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value)
    return flat


def metric_name(name: str) -> str:
    """A metric name MLflow accepts (class names may hold parentheses, quotes, commas)."""
    return _METRIC_NAME_BAD.sub("_", name)


@dataclass
class StepRun:
    """The MLflow run of one step; every method is a no-op when tracking is off.

    Logging never stops the step on a tracking outage: what cannot be sent is kept and sent
    later (iagn/tracking/spool.py). Errors that are no outage (a deleted run, an invalid
    value) raise an IagnError as before.
    """

    run_id: str | None = None
    parent_id: str | None = None
    pipeline_run_id: str | None = None
    experiment_id: str | None = None
    uri: str = ""
    blocked: str | None = None
    outbox: Outbox | None = None
    trial_id: str | None = None  # a sweep trial's run, between the parent and this run
    _logged: dict[int, set[str]] = field(default_factory=dict)  # epoch -> metric names

    @property
    def active(self) -> bool:
        return self.run_id is not None

    @property
    def spool(self) -> Path | None:
        """Where this run's unsent records are kept (the file exists only while some are)."""
        return self.outbox.path if self.outbox is not None else None

    def _submit(self, op: str, handlers: Mapping[str, Callable] | None = None, **fields) -> None:
        assert self.outbox is not None
        with mlflow_errors(self.uri):
            self.outbox.submit(op, fields, handlers)

    def log_params(self, params: Mapping[str, Any], sections: Sequence[str]) -> None:
        if not self.active:
            return
        flat = {}
        for name in sections:
            value = params.get(name)
            if isinstance(value, Mapping):
                flat.update(flatten(value, f"{name}."))
        if flat:
            self._submit("params", params=flat)

    def log_metrics(
        self, metrics: Mapping[str, Any], step: int | None = None, model_id: str | None = None
    ) -> None:
        """Numeric values only (strings and nested values are skipped), names made valid."""
        if not self.active:
            return
        numeric = {
            metric_name(k): float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        if numeric:
            self._submit(
                "metrics",
                metrics=numeric,
                step=step or 0,
                timestamp=int(time.time() * 1000),  # when measured, also if sent later
                model_id=model_id,
            )

    def log_epoch(self, epoch: int, record: Mapping[str, Any]) -> None:
        """The epoch callback of train_stage.run / distill.run: loss, accuracies, lr, speed."""
        if not self.active:
            return
        values = {k: v for k, v in record.items() if k != "epoch"}
        self.log_metrics(values, step=epoch)
        self._logged.setdefault(epoch, set()).update(values)  # sent or kept: not again

    def log_history(self, history: Sequence[Mapping[str, Any]]) -> None:
        """What `log_epoch` did not see: epochs trained before a resume (in an earlier
        process), and values joined to an epoch after its callback ran (the calibration
        fitted after the last epoch, iagn/train/calibrated.py)."""
        for record in history:
            epoch = int(record.get("epoch", 0))
            seen = self._logged.get(epoch, set())
            missing = {k: v for k, v in record.items() if k != "epoch" and k not in seen}
            if epoch and missing:
                self.log_epoch(epoch, missing)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file or a folder; kept by path while MLflow is away (sent as it is then)."""
        if not self.active or not Path(path).exists():
            return
        resolved = Path(path).resolve()
        self._submit(
            "artifact",
            path=str(resolved),
            artifact_path=artifact_path,
            directory=resolved.is_dir(),
        )

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active:
            return
        self._submit("tags", tags={k: str(v) for k, v in tags.items()})

    def log_dataset(self, identity: Mapping[str, Any], context: str) -> None:
        """The dataset a checkpoint records (`data` of iagn/checkpoint.py) as an input."""
        if not self.active or not identity.get("digest"):
            return
        kept = {
            "root": str(Path(str(identity.get("root", "."))).resolve()),
            "format": identity.get("format", "dataset"),
            "digest": str(identity["digest"]),
        }
        self._submit("dataset", identity=kept, context=context)

    def log_model(
        self, checkpoint: str | Path, kind: str, send: Callable[[Mapping[str, Any]], object]
    ) -> None:
        """Log the model of `checkpoint` with `send` (a layer above knows how: the runner's
        `send_model`), which gets the record {checkpoint, sha256, kind, run_id} while this
        run is active; kept by checkpoint path and sha256 while MLflow is away."""
        if not self.active:
            return
        from iagn.io import sha256_file

        path = Path(checkpoint).resolve()
        self._submit(
            "model", {"model": send}, checkpoint=str(path), sha256=sha256_file(path), kind=kind
        )

    def lookup(self, read: Callable[[], Any], default: Any = None) -> Any:
        """`read()` (a search the step can do without), or `default` while MLflow is away."""
        if not self.active:
            return default
        assert self.outbox is not None
        with mlflow_errors(self.uri):
            return self.outbox.lookup(read, default)

    def block(self, reason: str) -> None:
        """The step ran but its verdict stops the pipeline: the runs end FAILED with a reason."""
        self.blocked = reason

    def end(
        self, step: str, status: str, outcome: str, error: str, parent: Parent, last: bool
    ) -> None:
        """End the run, then what it means for the parent (iagn/tracking/parent.py); kept
        like any record while MLflow is away, then one last try to send what is kept."""
        if not self.active:
            return
        assert self.outbox is not None
        try:
            self._submit(
                "end",
                status=status,
                outcome=outcome,
                error=error,
                step=step,
                parent_id=parent.run_id,
                parent_source=parent.source,
                ends_pipeline=last,
            )
            self.outbox.close()
        finally:
            self.outbox.stop_watch()
            _leave_active_run(self.run_id, status)


def _leave_active_run(run_id: str | None, status: str) -> None:
    """Take the run off MLflow's stack of active runs in this process, if still there (its
    end was kept): `mlflow.end_run` leaves the stack before it asks the server, which may
    not answer (a short try; the kept `end` record is what counts)."""
    import mlflow

    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:
        return
    with http_limits(PROBE_TIMEOUT, 0), contextlib.suppress(Exception):
        mlflow.end_run(status)


def _start(
    step: str, output: str | Path | None, params: Mapping[str, Any] | None = None
) -> tuple[StepRun, Parent]:
    import mlflow
    from mlflow import MlflowClient

    trial = trial_of(params)
    uri = configure()
    with mlflow_errors(uri):
        client = MlflowClient()
        experiment = experiment_id(client)
        tags = provenance_tags()
        parent = resolve_parent(client, experiment, tags)
        if parent.managed:
            mark_running(client, parent.run_id)
        active = mlflow.active_run()
        if active is not None and parent.run_id and active.info.run_id != parent.run_id:
            raise IagnError(
                f"MLflow run {active.info.run_id} is active in this process, but this step "
                f"belongs under run {parent.run_id}; end the active run (mlflow.end_run()) first"
            )
        # A sweep's trial step: its run goes under the trial's run, itself under the parent
        # (iagn/tracking/trial.py); the parent's status is handled as for any step.
        trial_id = None
        if trial is not None and active is None:
            trial_id = find_or_create_trial(client, experiment, parent.run_id, trial, tags)
        run = mlflow.start_run(
            experiment_id=experiment,
            run_name=step,
            nested=active is not None,
            parent_run_id=(trial_id or parent.run_id) if active is None else None,
            tags={**tags, TAG_STEP: step},
        )
        run_id = run.info.run_id
        pipeline_run = os.environ.get(ENV_KFP_RUN) or parent.run_id or run_id
    outbox = Outbox(run_id, step, uri, experiment, spool_path(step, run_id, output))
    outbox.watch()
    step_run_ = StepRun(
        run_id, parent.run_id, pipeline_run, experiment, uri, outbox=outbox, trial_id=trial_id
    )
    try:
        step_run_.set_tags({TAG_PIPELINE_RUN: pipeline_run})
    except BaseException:
        outbox.stop_watch()
        raise
    return step_run_, parent


@contextlib.contextmanager
def step_run(
    step: str,
    params: Mapping[str, Any] | None = None,
    sections: Sequence[str] = (),
    ends_pipeline: bool = False,
    output: str | Path | None = None,
) -> Iterator[StepRun]:
    """A nested MLflow run for `step` under this pipeline execution's parent (see package doc).

    Logs the flattened `sections` of `params`. An exception inside marks the run and the
    parent FAILED (KILLED on Ctrl-C) and propagates; `StepRun.block` does the same without
    an exception. A success leaves the parent RUNNING, unless `ends_pipeline` (this step is
    the pipeline's last) and the parent comes from IAGN_PIPELINE_RUN or a DVC repro: then
    the parent ends FINISHED (or stays FAILED). Under KFP the exit handler ends it instead.

    A tracking server that does not answer when the step starts is an IagnError; one that
    goes away later is not (iagn/tracking/spool.py): what the step logs meanwhile is kept
    in a spool file beside `output` (the step's checkpoint or folder) and sent when MLflow
    answers again, at the latest by `iagn tracking replay`.
    """
    if not tracking_enabled():
        yield StepRun()
        return
    run, parent = _start(step, output, params)
    try:
        run.log_params(params or {}, sections)
        yield run
    except BaseException as exc:
        killed = isinstance(exc, KeyboardInterrupt)
        status, outcome = ("KILLED", "killed") if killed else ("FAILED", "failed")
        # The step's own error is what the user must see; tracking trouble here is secondary.
        error = scrub_text(f"{type(exc).__name__}: {exc}")[:ERROR_CHARS]
        with contextlib.suppress(Exception):
            run.set_tags({TAG_OUTCOME: outcome, TAG_ERROR: error})
        with contextlib.suppress(Exception):
            run.end(step, status, outcome, error, parent, ends_pipeline)
        fail_trial(run.trial_id, status, outcome, f"{step}: {error}")
        raise
    if run.blocked:
        reason = scrub_text(run.blocked)[:ERROR_CHARS]
        run.set_tags({TAG_OUTCOME: "blocked", TAG_ERROR: reason})
        run.end(step, "FAILED", "blocked", reason, parent, ends_pipeline)
        fail_trial(run.trial_id, "FAILED", "blocked", f"{step}: {reason}")
    else:
        run.set_tags({TAG_OUTCOME: "succeeded"})
        run.end(step, "FINISHED", "succeeded", "", parent, ends_pipeline)
