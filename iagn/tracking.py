"""Experiment tracking with MLflow: one parent run per pipeline execution, a nested run per step.

Every step (validate, each training stage, distill, evaluate, register) runs inside
`step_run(...)`, whichever orchestrator calls it (the `iagn` CLI, `dvc repro`, a KFP
component, a notebook): see `iagn/runner.py`.

Where runs go
    MLFLOW_TRACKING_URI unset: MLflow's embedded default, the SQLite file `mlflow.db` in the
    current (project) folder, artifacts under `mlruns/` beside it. Set: any tracking server,
    e.g. one with an S3 artifact store (the server proxies artifacts with
    `--artifacts-destination s3://...`, or the client writes them itself, reading
    MLFLOW_S3_ENDPOINT_URL for MinIO/Ceph and the AWS_* credentials).
    Credentials in the URI (`https://user:password@host`) are moved to
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD before MLflow sees the URI, so they
    never show in printed run links, errors or tags. A server that does not answer within
    PROBE_TIMEOUT_S seconds stops the step at once with an IagnError (MLflow itself would
    retry for minutes).
    MLFLOW_EXPERIMENT_NAME names the experiment (default `iagn`).

The parent run of a step (first match wins)
    1. IAGN_PARENT_RUN_ID: that run (set it to attach steps to a run you created).
    2. IAGN_PIPELINE_RUN (any name: a CI job id, a date), else KFP_RUN_ID: the run tagged
       `iagn.pipeline_key` = that name; the first step creates it, later steps (other
       processes, other machines) find it. An explicit name wins over DVC detection so that
       steps run inside and outside `dvc repro` can share one parent.
    3. `dvc repro` / `dvc exp run` among this process's ancestors (walked through /proc):
       the run tagged with that DVC process (host, pid, start time), so all stages of one
       repro share one parent.
    4. An active MLflow run in this process (a notebook): nested under it.
    5. Otherwise the step run is a top-level run.
    The parent's status follows its steps: RUNNING while one runs, FINISHED after a success,
    FAILED (or KILLED) when a step fails, including a blocking verdict (validation or the
    registry gate failed). Parents this process did not resolve from the list above (an
    active notebook run) are left alone.

Tags on parent and step runs
    iagn.pipeline_run_id   KFP_RUN_ID when set, else the parent's run id (top-level: its own)
    iagn.step              the step (validate, train-stage-1, ..., register)
    iagn.git_commit, iagn.git_dirty, iagn.dvc_data_version, iagn.kfp_run_id: where the run
                           comes from (iagn/provenance.py; IAGN_GIT_COMMIT and
                           IAGN_DATA_VERSION stand in where there is no checkout or data.dvc)
Params of a step run are the flattened params.yaml sections the step reads
(`train.lr_head`, `stage3.epochs`, ...). Nothing is taken from the environment beyond the
variables above: no credentials, no URIs with user info.

IAGN_TRACKING=off runs the steps untracked; under torchrun only rank 0 tracks.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from iagn.errors import IagnError
from iagn.provenance import ENV_KFP_RUN, dvc_ancestor, provenance_tags
from iagn.provenance import dvc_data_version as dvc_data_version  # re-exported (KFP fetch)
from iagn.redact import scrub_text, scrub_uri

ENV_PARENT_RUN = "IAGN_PARENT_RUN_ID"
ENV_PIPELINE_RUN = "IAGN_PIPELINE_RUN"
ENV_TRACKING = "IAGN_TRACKING"
DEFAULT_EXPERIMENT = "iagn"
PROBE_TIMEOUT_S = 5.0

TAG_STEP = "iagn.step"
TAG_ROLE = "iagn.role"
TAG_PIPELINE_KEY = "iagn.pipeline_key"
TAG_PIPELINE_RUN = "iagn.pipeline_run_id"
TAG_DATA_DIGEST = "iagn.data_digest"
TAG_OUTCOME = "iagn.outcome"
TAG_ERROR = "iagn.error"
TAG_FAILED_TASK = "iagn.kfp_failed_task"

# MLflow caps a dataset digest at 36 characters; the full manifest sha256 is a run tag.
DATASET_DIGEST_CHARS = 32
_PIPELINE_NAME = re.compile(r"^[^'\"\\\x00-\x1f]{1,200}$")
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


# --- where runs go --------------------------------------------------------------------------


def tracking_enabled() -> bool:
    if os.environ.get(ENV_TRACKING, "").strip().lower() in ("off", "0", "false", "no"):
        return False
    return int(os.environ.get("RANK", "0")) == 0  # torchrun: rank 0 speaks for all ranks


def _credentials_out_of_uri() -> None:
    """Move `user:password@` from the tracking URI to MLflow's credential variables."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(user))
    if password:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(password))
    clean = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    if os.environ.get("MLFLOW_TRACKING_URI") == uri:
        os.environ["MLFLOW_TRACKING_URI"] = clean
    if mlflow.get_tracking_uri() != clean:  # set with mlflow.set_tracking_uri()
        mlflow.set_tracking_uri(clean)


def _probe(uri: str) -> None:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S):
            return
    except urllib.error.HTTPError:
        return  # it answered; authentication and routes are MLflow's business
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise IagnError(
            f"the MLflow tracking server {scrub_uri(uri)} is unreachable ({reason}); start it, "
            "fix MLFLOW_TRACKING_URI, or unset MLFLOW_TRACKING_URI to track into the embedded "
            "store ./mlflow.db"
        ) from None


def configure() -> str:
    """Point MLflow at the configured store and check that it answers; the URI, scrubbed."""
    import mlflow

    _credentials_out_of_uri()
    uri = mlflow.get_tracking_uri()
    if urlsplit(uri).scheme in ("http", "https"):
        _probe(uri)
    return scrub_uri(uri)


@contextlib.contextmanager
def mlflow_errors(uri: str) -> Iterator[None]:
    """MLflow, HTTP and S3 failures as one IagnError that names the store and what to check."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    try:
        from botocore.exceptions import BotoCoreError, ClientError

        s3_errors: tuple = (BotoCoreError, ClientError)
    except ImportError:  # pragma: no cover - boto3 is a dependency
        s3_errors = ()
    try:
        yield
    except (MlflowException, RequestException, *s3_errors) as exc:
        message = getattr(exc, "message", None) or str(exc)
        raise IagnError(
            f"MLflow tracking at {uri} failed: {type(exc).__name__}: {scrub_text(message)}\n"
            "  -> check that the tracking server runs and MLFLOW_TRACKING_URI is right; for "
            "artifacts in S3 also MLFLOW_S3_ENDPOINT_URL and the AWS credentials (of the "
            "server when it proxies artifacts, else of this process)"
        ) from None


def experiment_id(client) -> str:
    """The id of the experiment MLFLOW_EXPERIMENT_NAME (default `iagn`), created if needed."""
    from mlflow.exceptions import MlflowException

    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # another step created it in the meantime
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise IagnError(
            f"the MLflow experiment {name!r} is deleted; restore it (`mlflow experiments "
            "restore`) or set MLFLOW_EXPERIMENT_NAME to another name"
        )
    return experiment.experiment_id


def pipeline_key() -> tuple[str, str] | None:
    """(key, run name) of the pipeline execution this process belongs to, if any."""
    for variable, prefix in ((ENV_PIPELINE_RUN, "pipeline"), (ENV_KFP_RUN, "kfp")):
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
        host = socket.gethostname()
        return f"dvc:{host}:{dvc[0]}:{dvc[1]}", f"dvc repro {host} pid {dvc[0]}"
    return None


# --- runs -----------------------------------------------------------------------------------


def find_pipeline_parent(client, experiment: str, key: str):
    """The parent run tagged with pipeline `key` (the oldest active one), or None."""
    from mlflow.entities import ViewType

    query = f"tags.`{TAG_PIPELINE_KEY}` = '{key}'"
    runs = client.search_runs(
        [experiment], query, run_view_type=ViewType.ACTIVE_ONLY, max_results=20
    )
    return min(runs, key=lambda run: (run.info.start_time, run.info.run_id)) if runs else None


def _pipeline_parent(client, experiment: str, key: str, name: str, tags: dict) -> str:
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


def pipeline_parent(client, experiment: str, tags: dict | None = None) -> str | None:
    """The parent run of this process's pipeline execution (`pipeline_key`), found or created
    (with `tags`, default `provenance_tags()`); None when this process belongs to none.
    Also for code that marks a pipeline FAILED from outside a step (a KFP exit handler)."""
    key = pipeline_key()
    if key is None:
        return None
    return _pipeline_parent(client, experiment, key[0], key[1], tags or provenance_tags())


def mark_pipeline_failed(reason: str, task: str = "") -> dict[str, str]:
    """Mark this process's pipeline parent run FAILED, creating it if no step did.

    For what step runs cannot see themselves (the KFP exit handler calls this): a pod
    killed for memory, an image that does not start, a failed data fetch before any step
    run existed. Returns the parent as `describe_pipeline_parent` does ({} when tracking
    is off or this process belongs to no pipeline).
    """
    if not tracking_enabled():
        return {}
    if pipeline_key() is None:
        print("iagn: no pipeline run key (KFP_RUN_ID / IAGN_PIPELINE_RUN): nothing to mark")
        return {}
    import mlflow

    uri = configure()
    with mlflow_errors(uri):
        client = mlflow.MlflowClient()
        experiment = experiment_id(client)
        run_id = pipeline_parent(client, experiment)
        client.set_tag(run_id, TAG_OUTCOME, "failed")
        client.set_tag(run_id, TAG_ERROR, scrub_text(reason)[:5000])
        if task:
            client.set_tag(run_id, TAG_FAILED_TASK, task)
        client.set_terminated(run_id, "FAILED")
    return {"run_id": run_id, "experiment_id": experiment, "status": "FAILED", "uri": uri}


def describe_pipeline_parent() -> dict[str, str]:
    """Where this pipeline run's MLflow parent is: run_id, experiment_id, status, uri.

    Best effort ({} when tracking is off, there is no key or no parent, or MLflow does not
    answer): the exit handler reports it, and a lookup must not fail a run that succeeded.
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


def _resolve_parent(client, experiment: str, tags: dict) -> tuple[str | None, bool]:
    """(parent run id, whether this module manages its status)."""
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
        return explicit, True
    parent = pipeline_parent(client, experiment, tags)
    if parent is not None:
        return parent, True
    active = mlflow.active_run()
    if active is not None:
        return active.info.run_id, False
    return None, False


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
    _epochs_logged: set[int] = field(default_factory=set)

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def _client(self):
        from mlflow import MlflowClient

        return MlflowClient()

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
        self.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
        self._epochs_logged.add(epoch)

    def log_history(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Epochs not seen by `log_epoch` (trained before a resume, in an earlier process)."""
        for record in history:
            epoch = int(record.get("epoch", 0))
            if epoch and epoch not in self._epochs_logged:
                self.log_epoch(epoch, record)

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
        """The dataset a checkpoint records (`data` of iagn/train/checkpoint.py) as an input."""
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


def _end(run: StepRun, status: str, managed_parent: bool) -> None:
    import mlflow
    from mlflow import MlflowClient

    mlflow.end_run(status)
    if not (managed_parent and run.parent_id):
        return
    client = MlflowClient()
    if status == "FINISHED":
        # A sibling that failed meanwhile (parallel KFP steps) keeps the parent FAILED.
        if client.get_run(run.parent_id).info.status != "FAILED":
            client.set_terminated(run.parent_id, "FINISHED")
    else:
        client.set_terminated(run.parent_id, status)


def _start(step: str) -> tuple[StepRun, bool]:
    import mlflow
    from mlflow import MlflowClient

    uri = configure()
    with mlflow_errors(uri):
        client = MlflowClient()
        experiment = experiment_id(client)
        tags = provenance_tags()
        parent, managed = _resolve_parent(client, experiment, tags)
        if managed and parent:
            client.update_run(parent, status="RUNNING")
        active = mlflow.active_run()
        if active is not None and parent and active.info.run_id != parent:
            raise IagnError(
                f"MLflow run {active.info.run_id} is active in this process, but this step "
                f"belongs under run {parent}; end the active run (mlflow.end_run()) first"
            )
        run = mlflow.start_run(
            experiment_id=experiment,
            run_name=step,
            nested=active is not None,
            parent_run_id=parent if active is None else None,
            tags={**tags, TAG_STEP: step},
        )
        run_id = run.info.run_id
        pipeline_run = os.environ.get(ENV_KFP_RUN) or parent or run_id
        mlflow.set_tag(TAG_PIPELINE_RUN, pipeline_run)
    return StepRun(run_id, parent, pipeline_run, experiment, uri), managed


@contextlib.contextmanager
def step_run(
    step: str, params: Mapping[str, Any] | None = None, sections: Sequence[str] = ()
) -> Iterator[StepRun]:
    """A nested MLflow run for `step` under this pipeline execution's parent (see module doc).

    Logs the flattened `sections` of `params`. An exception inside marks the run and the
    parent FAILED (KILLED on Ctrl-C) and propagates; `StepRun.block` does the same without
    an exception.
    """
    if not tracking_enabled():
        yield StepRun()
        return
    run, managed = _start(step)
    try:
        run.log_params(params or {}, sections)
        yield run
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        # The step's own error is what the user must see; tracking trouble here is secondary.
        error = scrub_text(f"{type(exc).__name__}: {exc}")[:5000]
        with contextlib.suppress(Exception):
            run.set_tags({TAG_OUTCOME: "failed", TAG_ERROR: error})
        with contextlib.suppress(Exception):
            _end(run, status, managed)
        raise
    with mlflow_errors(run.uri):
        if run.blocked:
            run.set_tags({TAG_OUTCOME: "blocked", TAG_ERROR: run.blocked[:5000]})
            _end(run, "FAILED", managed)
        else:
            run.set_tags({TAG_OUTCOME: "succeeded"})
            _end(run, "FINISHED", managed)
