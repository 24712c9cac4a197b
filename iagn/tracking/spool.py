"""What a step sends to MLflow, and where it is kept while MLflow does not answer.

Tracking outages do not stop a step. The step's run is created when the step starts (a
tracking server that does not answer then is an error at once: nothing has run yet). From
then on every call of `StepRun` (params, per-epoch metrics, tags, artifacts, the dataset,
the model, the run's end) is one record, sent through an `Outbox`:

    server answers   the record is sent at once, under MLflow's HTTP limits lowered for the
                     call (`http_limits`): LIVE_TIMEOUT s per small request (the configured
                     timeout for uploads: artifacts, models), LIVE_RETRIES retry. A refused
                     connection then fails at once, a server that accepts and never answers
                     after 2 x LIVE_TIMEOUT s, an artifact store that fails behind the
                     server (HTTP 500 from its artifact proxy) after two of its own attempts.
    it does not      only outages count (`outage_reason`): no connection, reset, timeouts,
                     HTTP 408/429/502/503/504, HTTP 500 from the server's artifact proxy, S3
                     endpoint errors and S3 5xx. Anything else (a deleted experiment or run,
                     an invalid value, a 4xx) is raised as before: it is no outage, and
                     waiting would not fix it. On an outage the step prints one warning to
                     stderr that names the server (its URI without credentials) and the spool
                     file, appends the record to the spool, and carries on.
    the watch        for an HTTP tracking server, a thread asks it for /health every
                     WATCH_INTERVAL s (WATCH_TIMEOUT s, no retry) while the step runs: an
                     outage is reported within seconds even when the step logs nothing for an
                     hour (a long epoch), and calls made meanwhile do not wait on the server.
    while away       later records go straight to the spool, in order. At most every
                     PROBE_INTERVAL s (at once when the watch sees the server back) a record
                     first asks the server for the run (one request, PROBE_TIMEOUT s, no
                     retry: a step loses at most that much per probe); if it answers, the
                     spool is sent in order, then the new record.
    step ends        the run's end (status, and what it means for the parent run,
                     iagn/tracking/parent.py) is a record too. One last probe; if the server
                     answers, everything is sent. If not, a final message says what was not
                     sent, where it is kept and how to send it: `iagn tracking replay SPOOL`.
                     The step itself still succeeds (exit 0): its files do not depend on
                     MLflow.

The spool: JSON lines, `<output>.mlflow-spool-<run id, 8 chars>.jsonl` beside the step's
output (a checkpoint, a folder), or under IAGN_TRACKING_SPOOL_DIR when set (e.g. a volume
that outlives a KFP pod), or `./mlflow-spool/` for a step without an output. It exists only
while something is unsent: created with the first kept record, removed when all is sent.
The first line describes the run; each further line is one call, with the run id:

    {"op": "run", "run_id": ..., "step": "train-stage-1", "uri": "http://host:5000",
     "experiment_id": "1", "format": 1, "spooled_at": "2026-12-02T00:37:05+00:00"}
    {"op": "metrics", "run_id": ..., "metrics": {"loss": 1.2}, "step": 2,
     "timestamp": 1796170625123, "model_id": null}
    {"op": "params", "params": {...}}  {"op": "tags", "tags": {...}}
    {"op": "artifact", "path": "/abs/path", "artifact_path": null, "directory": false}
    {"op": "dataset", "identity": {"root": ..., "format": ..., "digest": ...},
     "context": "train"}
    {"op": "model", "checkpoint": "/abs/stage3.pt", "sha256": ..., "kind": "teacher"}
    {"op": "end", "status": "FINISHED", "outcome": "succeeded", "error": "",
     "step": ..., "parent_id": ..., "parent_source": "pipeline", "ends_pipeline": false}

Metrics keep their step (the epoch) and the time they were measured; artifacts are kept by
path and sent as the files are when sent; the model by its checkpoint, sent only if the
checkpoint still has the recorded sha256. `replay` (the `iagn tracking replay` command)
sends a spool under MLflow's configured limits, refuses one written for another tracking
URI, and keeps whatever it could not send.

MLflow reads MLFLOW_HTTP_REQUEST_TIMEOUT and MLFLOW_HTTP_REQUEST_MAX_RETRIES at each request
(mlflow.utils.rest_utils.http_request, MLflow 3.17), so `http_limits` sets them around a
call. That is not thread-safe: MLflow calls from other threads meanwhile get the same limits.
An S3 store the client writes itself (no artifact proxy) follows boto3's own retries and
timeouts (AWS_MAX_ATTEMPTS, AWS_RETRY_MODE), not these.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from iagn.errors import IagnError
from iagn.io import write_text_atomic
from iagn.redact import scrub_text, scrub_uri
from iagn.tracking.parent import Parent, finish, record_failure
from iagn.tracking.store import HTTP_SETTINGS

ENV_SPOOL_DIR = "IAGN_TRACKING_SPOOL_DIR"
SPOOL_MARK = ".mlflow-spool-"
SPOOL_GLOB = f"*{SPOOL_MARK}*.jsonl"
FORMAT = 1
# Limits of a call made while the step runs. Short, because a step must not wait long on a
# server that went away, and nothing is lost when a call gives up: its record is kept.
LIVE_TIMEOUT = 4  # seconds per request; uploads keep MLFLOW_HTTP_REQUEST_TIMEOUT
LIVE_RETRIES = 1
PROBE_TIMEOUT = 2  # "does the server answer again?": one request, no retry
PROBE_INTERVAL = 30.0  # seconds between probes while the server is away
# The watch: a thread that asks a tracking server for /health while the step runs, so that
# an outage is reported within seconds even when the step logs nothing for a long while (an
# epoch of an hour), and kept records are sent at the next call once the server is back.
WATCH_INTERVAL = 5.0
WATCH_TIMEOUT = 3
UPLOADS = frozenset({"artifact", "model"})  # records whose request carries a file

TAG_DATA_DIGEST = "iagn.data_digest"
# MLflow caps a dataset digest at 36 characters; the full manifest sha256 is a run tag.
DATASET_DIGEST_CHARS = 32
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
# HTTP answers that say "not now" rather than "wrong request".
_TRANSIENT_STATUS = frozenset({408, 429, 502, 503, 504})
_STATUS = re.compile(r"too many (\d{3}) error responses|error code (\d{3}) != 200")
_S3_TRANSIENT_CODES = frozenset(
    {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"}
)

Handlers = Mapping[str, Callable[[Mapping[str, Any]], object]]


class MissingFile(IagnError):
    """An artifact or checkpoint kept by path is gone (or changed) by the time it is sent."""


# --- where the spool goes ---------------------------------------------------------------------


def spool_path(step: str, run_id: str, beside: str | os.PathLike | None = None) -> Path:
    """The spool file of run `run_id` of `step` (see the module doc); not created here."""
    name = f"{SPOOL_MARK}{run_id[:8]}.jsonl"
    directory = os.environ.get(ENV_SPOOL_DIR, "").strip()
    if directory:
        return Path(directory).resolve() / f"{step}{name}"
    if beside is not None:
        output = Path(beside).resolve()
        return output.with_name(output.name + name)
    return Path.cwd().resolve() / "mlflow-spool" / f"{step}{name}"


# --- what counts as an outage -----------------------------------------------------------------


def _strip_pool(text: str) -> str:
    # urllib3 prefixes "HTTPConnectionPool(host='h', port=1): " (the host is named elsewhere).
    if text.startswith(("HTTPConnection", "HTTPSConnection")) and ": " in text:
        return text.split(": ", 1)[1]
    return text


def _connection_text(error: BaseException) -> str:
    inner: Any = error.args[0] if error.args else error
    inner = getattr(inner, "reason", inner)  # MaxRetryError -> the last failure
    if isinstance(inner, BaseException) and len(inner.args) == 2:
        first, second = inner.args
        if isinstance(second, str):  # ConnectTimeoutError(connection, message)
            return _strip_pool(second)
        if isinstance(first, str) and isinstance(second, BaseException):
            # ProtocolError("Connection aborted.", ConnectionResetError(104, "..."))
            return f"{first.rstrip('.')}: {getattr(second, 'strerror', None) or second}"
    return _strip_pool(str(inner))


def _link_reason(link: BaseException) -> tuple[str, str] | None:
    """(origin, reason) if this one exception of a chain is an outage: origin `server` (the
    tracking server), `artifacts` (the store behind its artifact proxy) or `s3`."""
    from mlflow.exceptions import MlflowException
    from requests import exceptions as http

    if isinstance(link, http.RetryError | MlflowException):
        text = str(getattr(link, "message", None) or link)
        found = _STATUS.search(text)
        status = int(found.group(1) or found.group(2)) if found else None
        if status in _TRANSIENT_STATUS:
            return "server", f"HTTP {status}"
        if status == 500 and "/mlflow-artifacts/" in text:
            return "artifacts", "HTTP 500 from the server's artifact proxy"
        if getattr(link, "error_code", "") == "TEMPORARILY_UNAVAILABLE":
            return "server", "TEMPORARILY_UNAVAILABLE"
        return None
    if isinstance(link, http.ConnectionError | http.Timeout | http.ChunkedEncodingError):
        return "server", _connection_text(link)
    try:
        from botocore import exceptions as s3
    except ImportError:  # pragma: no cover - boto3 is a dependency
        s3 = None
    if s3 is not None:
        if isinstance(link, s3.ConnectionError | s3.HTTPClientError):
            return "s3", f"{type(link).__name__}: {link}"
        if isinstance(link, s3.ClientError):
            status = link.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            code = link.response.get("Error", {}).get("Code", "")
            if status >= 500 or code in _S3_TRANSIENT_CODES:
                return "s3", f"{code or status}: {link}"
            return None
    if isinstance(link, ConnectionError | TimeoutError):  # socket level, below requests/boto
        return "server", f"{type(link).__name__}: {link}"
    return None


def outage(error: BaseException) -> tuple[str, str] | None:
    """(origin, reason, scrubbed) when `error` means MLflow or its artifact store is away.

    None for everything else: an answer that the call itself is wrong (4xx, a deleted run,
    an invalid value) or an error of our own. The whole chain (`raise ... from`, implicit
    context) is read: MLflow wraps requests' errors, boto3 wraps botocore's.
    """
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        found = _link_reason(link)
        if found is not None:
            return found[0], scrub_text(found[1])
        link = link.__cause__ or link.__context__
    return None


def outage_reason(error: BaseException) -> str | None:
    """Why `error` is an outage (one line, no credentials), or None if it is not one."""
    found = outage(error)
    return found[1] if found else None


# --- MLflow's limits around one call ----------------------------------------------------------


def _configured(name: str) -> int | None:
    try:
        return int(os.environ.get(name) or HTTP_SETTINGS[name])
    except ValueError:
        return None  # MLflow will complain about it itself


@contextlib.contextmanager
def http_limits(timeout: int | None, retries: int) -> Iterator[None]:
    """MLflow's HTTP timeout (None: unchanged) and retries lowered, never raised, for a block.

    MLflow 3.17 reads both variables at every request, so this holds for the calls inside;
    not thread-safe (see the module doc).
    """
    limits = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": retries}
    if timeout is not None:
        limits["MLFLOW_HTTP_REQUEST_TIMEOUT"] = timeout
    saved = {name: os.environ.get(name) for name in limits}
    try:
        for name, value in limits.items():
            configured = _configured(name)
            if configured is not None:
                os.environ[name] = str(min(configured, value))
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _live_limits(op: str):
    return http_limits(None if op in UPLOADS else LIVE_TIMEOUT, LIVE_RETRIES)


# --- sending one record -----------------------------------------------------------------------


def dataset_input(identity: Mapping[str, Any], context: str):
    """The dataset a checkpoint records (`data` of iagn/checkpoint.py) as MLflow's input."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types.schema import ColSpec, Schema
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    root = Path(str(identity.get("root", ".")))
    with warnings.catch_warnings():
        # MLflow registers the local source twice ("" and "file" schemes) and warns that a
        # path matches both; they are the same class.
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(root))
    dataset = MetaDataset(
        source=source,
        name=f"{identity.get('format', 'dataset')}:{root.name}",
        digest=str(identity["digest"])[:DATASET_DIGEST_CHARS],
        schema=Schema([ColSpec(kind, name) for name, kind in _MANIFEST_TYPES.items()]),
    )
    return DatasetInput(dataset._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)])


def _send_end(client, record: Mapping[str, Any]) -> None:
    """The step's run ends, then what that means for the parent (iagn/tracking/parent.py)."""
    import mlflow

    run_id, status = record["run_id"], record["status"]
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status)  # also leaves MLflow's stack of active runs in this process
    else:
        client.set_terminated(run_id, status)
    parent = Parent(record.get("parent_id"), record.get("parent_source", ""))
    if not parent.managed:
        return
    if status != "FINISHED":
        error = f"{record.get('step', '')}: {record.get('error', '')}"
        record_failure(client, parent.run_id, status, record.get("outcome", "failed"), error)
    elif record.get("ends_pipeline") and parent.ended_by_last_step:
        finish(client, parent.run_id)


def send(record: Mapping[str, Any], handlers: Handlers | None = None) -> None:
    """Send one record to MLflow (`handlers` send ops of layers above: the `model`)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    op, run_id = record["op"], record["run_id"]
    if handlers and op in handlers:
        handlers[op](record)
        return
    client = MlflowClient()
    if op == "run":
        if client.get_run(run_id).info.lifecycle_stage == "deleted":
            raise IagnError(
                f"MLflow run {run_id} ({record.get('step')}) is deleted; restore it "
                f"(`mlflow runs restore --run-id {run_id}`) to send what was kept for it"
            )
    elif op == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in record["params"].items()])
    elif op == "metrics":
        step, stamp, model = record.get("step") or 0, record["timestamp"], record.get("model_id")
        metrics = [
            Metric(k, v, stamp, step, model_id=model, run_id=run_id)
            for k, v in record["metrics"].items()
        ]
        client.log_batch(run_id, metrics=metrics)
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
    elif op == "artifact":
        path = Path(record["path"])
        if not path.exists():
            raise MissingFile(f"{path} no longer exists")
        if path.is_dir():
            client.log_artifacts(run_id, str(path), record.get("artifact_path"))
        else:
            client.log_artifact(run_id, str(path), record.get("artifact_path"))
    elif op == "dataset":
        identity = record["identity"]
        client.log_inputs(run_id, datasets=[dataset_input(identity, record["context"])])
        client.set_tag(run_id, TAG_DATA_DIGEST, str(identity["digest"]))
    elif op == "end":
        _send_end(client, record)
    elif op == "model":
        raise IagnError("a kept model is sent by `iagn tracking replay` (it needs iagn's runner)")
    else:
        raise IagnError(f"unknown spool record {op!r}: written by a newer iagn? Upgrade iagn")


# --- what a list of records holds, in words ---------------------------------------------------


def _ranges(numbers: Sequence[int]) -> str:
    """[2, 3, 5] -> '2-3, 5'."""
    runs: list[list[int]] = []
    for number in sorted(set(numbers)):
        if runs and number == runs[-1][1] + 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def describe(records: Sequence[Mapping[str, Any]]) -> str:
    """'metrics of epochs 2-3 (26 values), 1 artifact (summary.md), the run's end (FINISHED)'."""
    metrics = [r for r in records if r["op"] == "metrics"]
    parts = []
    if metrics:
        values = sum(len(r["metrics"]) for r in metrics)
        steps = [int(r.get("step") or 0) for r in metrics if r.get("step")]
        of = f" of epoch{'s' * (len(set(steps)) != 1)} {_ranges(steps)}" if steps else ""
        parts.append(f"metrics{of} ({values} value{'s' * (values != 1)})")
    if any(r["op"] == "params" for r in records):
        parts.append("the params")
    tags = sum(1 for r in records if r["op"] == "tags")
    if tags:
        parts.append(f"{tags} tag update{'s' * (tags != 1)}")
    artifacts = [Path(r["path"]).name for r in records if r["op"] == "artifact"]
    if artifacts:
        s = "s" * (len(artifacts) != 1)
        parts.append(f"{len(artifacts)} artifact{s} ({', '.join(artifacts)})")
    if any(r["op"] == "dataset" for r in records):
        parts.append("the dataset input")
    parts += [f"the {r['kind']} model ({r['checkpoint']})" for r in records if r["op"] == "model"]
    parts += [f"the run's end ({r['status']})" for r in records if r["op"] == "end"]
    return ", ".join(parts) or "nothing"


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _origin_name(origin: str, uri: str) -> str:
    if origin == "artifacts":
        return f"the artifact store behind the MLflow tracking server {uri}"
    if origin == "s3":
        endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        return f"the S3 artifact store {scrub_uri(endpoint) if endpoint else '(AWS)'}"
    return f"the MLflow tracking server {uri}"


def replay_command(path: Path) -> str:
    return f"iagn tracking replay {path}"


def _say(message: str) -> None:
    print(f"iagn: {message}", file=sys.stderr, flush=True)


# --- a step's outbox --------------------------------------------------------------------------


class Outbox:
    """A step run's records: sent at once while MLflow answers, kept in the spool while not.

    Used from the step's thread; `watch` adds one thread that only changes `away` and
    `last_probe` (under the lock) and passes its HTTP limits to MLflow as arguments, never
    through the variables `http_limits` sets for the step's thread.
    """

    def __init__(self, run_id: str, step: str, uri: str, experiment_id: str, path: Path):
        self.run_id, self.step, self.uri, self.experiment_id = run_id, step, uri, experiment_id
        self.path = path
        self.handlers: dict[str, Callable] = {}
        self.pending: list[dict[str, Any]] = []  # kept records, in order (the spool's lines)
        self.away: tuple[str, str] | None = None  # (origin, reason) while MLflow is away
        self.last_probe = 0.0
        self._header: dict[str, Any] | None = None
        self._warned = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def submit(self, op: str, fields: Mapping[str, Any], handlers: Handlers | None = None) -> bool:
        """Send the record now, or keep it; True when it was sent. Non-outage errors raise."""
        record = {"op": op, "run_id": self.run_id, **fields}
        self.handlers.update(handlers or {})
        if self.away is not None and not (self._probe_due() and self.flush()):
            self._keep(record)
            return False
        try:
            with _live_limits(op):
                send(record, self.handlers)
        except Exception as error:
            found = outage(error)
            if found is None:
                raise
            self._went_away(self._upload_origin(found, op), record)
            self._keep(record)
            return False
        return True

    def _server_answers(self) -> tuple[str, str] | None:
        """One short request to the tracking server: None if it answers, else the outage."""
        from mlflow import MlflowClient

        try:
            with http_limits(PROBE_TIMEOUT, 0):
                MlflowClient().get_run(self.run_id)
        except Exception as error:
            found = outage(error)
            if found is None:
                raise
            return found
        return None

    def _upload_origin(self, found: tuple[str, str], op: str) -> tuple[str, str]:
        """An upload cut off (reset, aborted) by a server that otherwise answers: the store
        behind it failed (the server drops the upload when it cannot pass it on to S3)."""
        if found[0] != "server" or op not in UPLOADS or self._server_answers() is not None:
            return found
        return "artifacts", f"uploads fail: {found[1]}"

    def lookup(self, read: Callable[[], Any], default: Any = None) -> Any:
        """A read the step can do without (e.g. a model id to link metrics to); `default`
        while MLflow is away."""
        if self.away is not None and not (self._probe_due() and self.flush()):
            return default
        try:
            with http_limits(LIVE_TIMEOUT, LIVE_RETRIES):
                return read()
        except Exception as error:
            found = outage(error)
            if found is None:
                raise
            self._went_away(found, None)
            return default

    def _probe_due(self) -> bool:
        return time.monotonic() - self.last_probe >= PROBE_INTERVAL

    def flush(self) -> bool:
        """If MLflow answers (one short probe), send the kept records in order; True when
        it answers and none is left."""

        if self.away is None and not self.pending:
            return True
        self.last_probe = time.monotonic()
        # The tracking server, whatever was away: when it was the artifact store behind it
        # (or S3), the first kept upload is the real test, one attempt per probe.
        found = self._server_answers()
        if found is not None:
            with self._lock:
                self.away = found
            return False
        sent: list[dict[str, Any]] = []
        try:
            while self.pending:
                record = self.pending[0]
                try:
                    with _live_limits(record["op"]):
                        send(record, self.handlers)
                except MissingFile as gone:
                    _say(f"warning: not sent to MLflow: {gone}")
                except Exception as error:
                    found = outage(error)
                    if found is None:
                        raise
                    found = self._upload_origin(found, record["op"])
                    with self._lock:
                        self.away = found
                    return False
                sent.append(self.pending.pop(0))
        finally:
            self._rewrite()
        with self._lock:
            origin = self.away[0] if self.away else "server"
            self.away = None
        done = f": sent what {self.step} kept ({describe(sent)}); {self.path} removed"
        _say(f"{_origin_name(origin, self.uri)} answers again" + (done if sent else ""))
        return True

    def _went_away(self, found: tuple[str, str], record: Mapping[str, Any] | None) -> None:
        """MLflow is away: say so once per outage (the first time in full)."""
        with self._lock:
            was_away, self.away = self.away is not None, found
            self.last_probe = time.monotonic()
            if was_away:
                return
            who = _origin_name(found[0], self.uri)
            if self._warned:
                _say(f"warning: {who} does not answer again ({found[1]}); kept in {self.path}")
                return
            self._warned = True
            what = f" while sending {describe([record])}" if record else ""
            _say(
                f"warning: {who} does not answer ({found[1]}){what}; {self.step} goes on. What "
                f"it logs to MLflow meanwhile is kept in {self.path} and sent once the server "
                "answers again, at the latest when the step ends."
            )

    def watch(self) -> None:
        """Start the watch (see WATCH_INTERVAL) for an HTTP tracking server."""
        import mlflow

        uri = mlflow.get_tracking_uri()  # with credentials moved out (store.configure)
        if not uri.startswith(("http://", "https://")) or self._watcher is not None:
            return
        self._watcher = threading.Thread(
            target=self._watch, args=(uri,), name=f"iagn-mlflow-watch-{self.step}", daemon=True
        )
        self._watcher.start()

    def _watch(self, uri: str) -> None:
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        creds = get_default_host_creds(uri)
        while not self._stop.wait(WATCH_INTERVAL):
            found: tuple[str, str] | None = None
            try:
                # Limits as arguments, not the variables `http_limits` sets: another thread.
                answer = http_request(
                    creds,
                    "/health",
                    "GET",
                    max_retries=0,
                    timeout=WATCH_TIMEOUT,
                    raise_on_status=False,
                )
                if answer.status_code in _TRANSIENT_STATUS:
                    found = ("server", f"HTTP {answer.status_code}")
            except Exception as error:
                found = outage(error)
            if self._stop.is_set():
                return
            if found is not None:
                self._went_away(found, None)
            else:
                with self._lock:
                    if self.away is not None and self.away[0] == "server":
                        self.last_probe = 0.0  # back: the step's next call sends what is kept

    def stop_watch(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=WATCH_TIMEOUT + 1)

    def _keep(self, record: dict[str, Any]) -> None:
        if self._header is None:
            self._header = {
                "op": "run",
                "run_id": self.run_id,
                "step": self.step,
                "uri": self.uri,
                "experiment_id": self.experiment_id,
                "format": FORMAT,
                "spooled_at": _now_iso(),
            }
        self.pending.append(record)
        if len(self.pending) == 1 and not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append(self._header)
        self._append(record)

    def _append(self, record: Mapping[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _rewrite(self) -> None:
        if not self.pending:
            self.path.unlink(missing_ok=True)
        elif self._header is not None:
            lines = [json.dumps(r) for r in (self._header, *self.pending)]
            write_text_atomic(self.path, "\n".join(lines) + "\n")

    def close(self) -> bool:
        """At the step's end: one last try; if MLflow still does not answer, say what is
        kept and how to send it. True when nothing is left unsent."""
        self.stop_watch()
        if not self.pending or self.flush():
            return True
        origin, reason = self.away or ("server", "")
        _say(
            f"warning: {_origin_name(origin, self.uri)} still does not answer ({reason}). Not "
            f"sent to MLflow run {self.run_id} ({self.step}): {describe(self.pending)}. The "
            f"step's own files are written; what MLflow lacks is kept in {self.path}. Send it "
            f"once the server answers:\n    {replay_command(self.path)}"
        )
        return False


# --- replaying a spool ------------------------------------------------------------------------


def read_spool(path: Path) -> list[dict[str, Any]]:
    """The records of a spool file; a torn last line (a process killed mid-write) is left
    out with a warning."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise IagnError(f"{path} does not exist (a spool is removed once sent)") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                _say(f"warning: {path}:{number} is cut off (written when the step died); skipped")
                continue
            raise IagnError(f"{path}:{number} is not a spool record (JSON)") from None
        if not isinstance(record, dict) or "op" not in record or "run_id" not in record:
            raise IagnError(f"{path}:{number} is not a spool record (no op / run_id)")
        records.append(record)
    return records


def find_spools(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Spool files among `paths`; a folder stands for the spools anywhere below it."""
    found: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            found += sorted(item.rglob(SPOOL_GLOB))
        else:
            found.append(item)
    return found


@contextlib.contextmanager
def _run_active(run_id: str) -> Iterator[None]:
    """The run active in this process while a record needs it (a model logs into it)."""
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    if active is not None:
        raise IagnError(f"MLflow run {active.info.run_id} is active; end it before replaying")
    status = mlflow.MlflowClient().get_run(run_id).info.status
    mlflow.start_run(run_id=run_id)
    try:
        yield
    finally:
        mlflow.end_run(status)  # back to how it was; a kept `end` record sets the final one


def replay(path: Path, handlers: Handlers | None = None) -> dict[str, Any]:
    """Send spool `path` to the tracking store MLflow is configured for, in order.

    Returns {"runs": {run_id: step}, "sent": [records], "skipped": [messages]}. Removes the
    file when everything is sent; otherwise rewrites it with what is left and raises an
    IagnError that says why (an outage: run again later; anything else: what to fix).
    """
    import mlflow

    records = read_spool(path)
    headers = {r["run_id"]: r for r in records if r["op"] == "run"}
    here = scrub_uri(mlflow.get_tracking_uri())
    for header in headers.values():
        if header.get("uri") and header["uri"] != here:
            raise IagnError(
                f"{path} was kept for the tracking store {header['uri']}, but MLflow is set "
                f"to {here}; set MLFLOW_TRACKING_URI to {header['uri']} (and its credentials "
                "in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) and run again"
            )
    sent: list[dict[str, Any]] = []
    skipped: list[str] = []
    left = list(records)
    try:
        while left:
            record = left[0]
            try:
                context = _run_active(record["run_id"]) if record["op"] == "model" else None
                with context or contextlib.nullcontext():
                    send(record, handlers)
            except MissingFile as gone:
                skipped.append(f"{describe([record])}: {gone}")
            except IagnError:
                raise
            except Exception as error:
                found = outage(error)
                if found is None:
                    message = getattr(error, "message", None) or str(error)
                    raise IagnError(
                        f"MLflow refused {describe([record])} of run {record['run_id']} "
                        f"({type(error).__name__}: {scrub_text(message)}); nothing after it "
                        f"was sent and {path} keeps it"
                    ) from None
                origin, reason = found
                total = sum(1 for r in records if r["op"] != "run")
                raise IagnError(
                    f"{_origin_name(origin, here)} does not answer ({reason}); sent "
                    f"{len(sent)} of {total} records, the rest is kept in {path}: run "
                    f"`{replay_command(path)}` again once it answers"
                ) from None
            if record["op"] != "run":
                sent.append(record)
            left.pop(0)
    finally:
        if left:
            runs = {r["run_id"] for r in left}
            kept = [h for i, h in headers.items() if i in runs and h not in left]
            lines = [json.dumps(r) for r in (*kept, *left)]
            write_text_atomic(path, "\n".join(lines) + "\n")
        else:
            path.unlink(missing_ok=True)
    return {
        "runs": {i: h.get("step", "") for i, h in headers.items()},
        "sent": sent,
        "skipped": skipped,
    }
