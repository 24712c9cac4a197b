"""A step's run: `step_run` opens it under the pipeline's parent, `StepRun` logs into it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
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
    finish,
    mark_running,
    record_failure,
    resolve_parent,
)
from iagn.tracking.store import configure, experiment_id, mlflow_errors, tracking_enabled

TAG_STEP = "iagn.step"
TAG_DATA_DIGEST = "iagn.data_digest"

# MLflow caps a dataset digest at 36 characters; the full manifest sha256 is a run tag.
DATASET_DIGEST_CHARS = 32
_METRIC_NAME_BAD = re.compile(r"[^/\w.\- :]")
# Manifest columns (iagn/data/manifest.py) and their types, for the dataset's schema in MLflow.
_MANIFEST_TYPES = {
    "image_id": "long",
    "path": "string",
    "label": "long",
    "class_name": "string",
    "split": "string",
    **dict.fromkeys(("x", "y", "w", "h", "part_x", "part_y", "part_w", "part_h"), "double"),
    "width": "long",
    "height": "long",
    "sha256": "string",
}


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
    """The MLflow run of one step; every method is a no-op when tracking is off."""

    run_id: str | None = None
    parent_id: str | None = None
    pipeline_run_id: str | None = None
    experiment_id: str | None = None
    uri: str = ""
    blocked: str | None = None
    _logged: dict[int, set[str]] = field(default_factory=dict)  # epoch -> metric names

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def log_params(self, params: Mapping[str, Any], sections: Sequence[str]) -> None:
        if not self.active:
            return
        import mlflow

        flat = {}
        for name in sections:
            value = params.get(name)
            if isinstance(value, Mapping):
                flat.update(flatten(value, f"{name}."))
        with mlflow_errors(self.uri):
            mlflow.log_params(flat)

    def log_metrics(
        self, metrics: Mapping[str, Any], step: int | None = None, model_id: str | None = None
    ) -> None:
        """Numeric values only (strings and nested values are skipped), names made valid."""
        if not self.active:
            return
        import mlflow

        numeric = {
            metric_name(k): float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
        if numeric:
            with mlflow_errors(self.uri):
                mlflow.log_metrics(numeric, step=step, model_id=model_id)

    def log_epoch(self, epoch: int, record: Mapping[str, Any]) -> None:
        """The epoch callback of train_stage.run / distill.run: loss, accuracies, lr, speed."""
        if not self.active:
            return
        values = {k: v for k, v in record.items() if k != "epoch"}
        self.log_metrics(values, step=epoch)
        self._logged.setdefault(epoch, set()).update(values)

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
        if not self.active or not Path(path).exists():
            return
        import mlflow

        with mlflow_errors(self.uri):
            if Path(path).is_dir():
                mlflow.log_artifacts(str(path), artifact_path)
            else:
                mlflow.log_artifact(str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.active:
            return
        import mlflow

        with mlflow_errors(self.uri):
            mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_dataset(self, identity: Mapping[str, Any], context: str) -> None:
        """The dataset a checkpoint records (`data` of iagn/checkpoint.py) as an input."""
        if not self.active or not identity.get("digest"):
            return
        import mlflow
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.types.schema import ColSpec, Schema

        root = Path(str(identity.get("root", ".")))
        with warnings.catch_warnings():
            # MLflow registers the local source twice ("" and "file" schemes) and warns that
            # a path matches both; they are the same class.
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(root.resolve()))
        dataset = MetaDataset(
            source=source,
            name=f"{identity.get('format', 'dataset')}:{root.name}",
            digest=str(identity["digest"])[:DATASET_DIGEST_CHARS],
            schema=Schema([ColSpec(kind, name) for name, kind in _MANIFEST_TYPES.items()]),
        )
        with mlflow_errors(self.uri):
            mlflow.log_input(dataset, context=context)
            mlflow.set_tag(TAG_DATA_DIGEST, str(identity["digest"]))

    def block(self, reason: str) -> None:
        """The step ran but its verdict stops the pipeline: the runs end FAILED with a reason."""
        self.blocked = reason


def _start(step: str) -> tuple[StepRun, Parent]:
    import mlflow
    from mlflow import MlflowClient

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
        run = mlflow.start_run(
            experiment_id=experiment,
            run_name=step,
            nested=active is not None,
            parent_run_id=parent.run_id if active is None else None,
            tags={**tags, TAG_STEP: step},
        )
        run_id = run.info.run_id
        pipeline_run = os.environ.get(ENV_KFP_RUN) or parent.run_id or run_id
        mlflow.set_tag(TAG_PIPELINE_RUN, pipeline_run)
    return StepRun(run_id, parent.run_id, pipeline_run, experiment, uri), parent


def _end(
    step: str, status: str, outcome: str, error: str, parent: Parent, ends_pipeline: bool
) -> None:
    """End the step's run, then what it means for the parent (see iagn/tracking/parent.py)."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.end_run(status)
    if not parent.managed:
        return
    if status != "FINISHED":
        record_failure(MlflowClient(), parent.run_id, status, outcome, f"{step}: {error}")
    elif ends_pipeline and parent.ended_by_last_step:
        finish(MlflowClient(), parent.run_id)


@contextlib.contextmanager
def step_run(
    step: str,
    params: Mapping[str, Any] | None = None,
    sections: Sequence[str] = (),
    ends_pipeline: bool = False,
) -> Iterator[StepRun]:
    """A nested MLflow run for `step` under this pipeline execution's parent (see package doc).

    Logs the flattened `sections` of `params`. An exception inside marks the run and the
    parent FAILED (KILLED on Ctrl-C) and propagates; `StepRun.block` does the same without
    an exception. A success leaves the parent RUNNING, unless `ends_pipeline` (this step is
    the pipeline's last) and the parent comes from IAGN_PIPELINE_RUN or a DVC repro: then
    the parent ends FINISHED (or stays FAILED). Under KFP the exit handler ends it instead.
    """
    if not tracking_enabled():
        yield StepRun()
        return
    run, parent = _start(step)
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
            _end(step, status, outcome, error, parent, ends_pipeline)
        raise
    with mlflow_errors(run.uri):
        if run.blocked:
            reason = scrub_text(run.blocked)[:ERROR_CHARS]
            run.set_tags({TAG_OUTCOME: "blocked", TAG_ERROR: reason})
            _end(step, "FAILED", "blocked", reason, parent, ends_pipeline)
        else:
            run.set_tags({TAG_OUTCOME: "succeeded"})
            _end(step, "FINISHED", "succeeded", "", parent, ends_pipeline)
