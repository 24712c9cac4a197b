"""`run_on_trainer`: one step as a Kubeflow Trainer TrainJob, from the KFP task that waits for it.

1. Checks, before anything is created on the cluster (no GPU time is spent on bad input):
   the scale (nodes, processes, GPUs of 1 or more), the arguments and their placeholders,
   the inputs exist, KFP_RUN_ID is set (it names the job), the storage is writable, and
   (when a job must be created) the runtime exists and is a torch runtime and the secret
   exists with the required keys.
2. The job's name derives from the KFP run and the step. When it exists already (a retried
   task), the task reattaches to it: a running job is waited for, a Complete one's outputs are
   downloaded. A Failed one is reported, deleted and created anew: a retry is meant to try
   again, and the step resumes from its durable checkpoint when train.checkpoint_uri is set.
3. Otherwise the inputs go to storage (skipped when the same files are there), the previous
   attempt's done marker is removed, and the TrainJob is created.
4. While it runs, node 0's log is copied into the task's log. Complete: the outputs are
   downloaded. Failed: IagnError with the job's reason and message (and warning events).
   Past distributed.timeout_minutes (the job's activeDeadlineSeconds as well): deleted, error.
5. SIGTERM or SIGINT (KFP's cancel and timeouts send SIGTERM to the task): the job is deleted,
   then the task exits with 128 + the signal's number.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from iagn.errors import IagnError
from iagn.redact import scrub_uri
from iagn.train.scale import Scale
from iagn.trainjob import manifest as m
from iagn.trainjob.cluster import Cluster
from iagn.trainjob.names import (
    current_namespace,
    job_name,
    kfp_run_id,
    local_storage_uri,
    shared_volume,
    storage_prefix,
)
from iagn.trainjob.staging import Store

POLL_SECONDS = 10.0  # how often the job's status is read
GONE_WAIT_SECONDS = 120.0  # how long a deleted job may take to go before one is recreated
LOG_DRAIN_SECONDS = 10.0  # how long the log follower may finish after the job ended
MAX_API_FAILURES = 6  # consecutive failed status reads before giving up


class _Cancelled(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def run_on_trainer(
    *,
    step: str,
    argv: list[str],
    inputs: dict[str, Path],
    outputs: dict[str, Path],
    scale: Scale,
    image: str,
    secret: str,
    storage_uri: str,
    namespace: str | None = None,
    log=print,
    node_selector: dict[str, str] | None = None,
    tolerations: list[dict] | None = None,
    api_client=None,
) -> None:
    """Run `iagn <argv>` on `scale.nodes` nodes as a TrainJob and bring `outputs` back.

    `argv` refers to inputs and outputs as `{name}` (iagn.trainjob.manifest); `inputs` maps a
    name to a local file or folder, `outputs` a name to the local file the task wants (the
    files the step writes beside it come too). `secret` names the Kubernetes secret of the
    pipeline's steps ("" for none). `node_selector` and `tolerations` place the nodes' pods
    (tolerations None: the GPU taint of each GPU resource in scale.resources_per_node).
    `api_client`: a kubernetes ApiClient (default: in-cluster, else the kubeconfig)."""
    emit = _emitter(log)
    m.check_scale(scale)
    m.check_arguments(argv, list(inputs), list(outputs))
    if not image:
        raise IagnError("the TrainJob needs the pipeline's container image; none was given")
    if not storage_uri:
        raise IagnError(
            "a step on several nodes passes its inputs and outputs through durable storage: "
            "set distributed.storage_uri (an s3:// prefix, or a file:// path on a volume "
            "every pod mounts)"
        )
    for name, local in inputs.items():
        if not Path(local).exists():
            raise IagnError(f"TrainJob input {name}: {local} does not exist")
    run_id = kfp_run_id()
    name = job_name(run_id, step)
    volume = shared_volume(storage_uri)
    if volume and not Path(volume[1]).is_dir():
        raise IagnError(
            f"storage {storage_uri}: the PersistentVolumeClaim {volume[0]} is not mounted at "
            f"{volume[1]} in this task's pod; the pipeline must mount it there (the TrainJob's "
            "nodes mount it at the same path). Nothing was created"
        )
    store = Store(storage_prefix(local_storage_uri(storage_uri), name))
    store.probe()
    cluster = Cluster(current_namespace(namespace), api_client)
    where = f"TrainJob {name} (namespace {cluster.namespace})"

    with _cancel_on_signals():
        try:
            existing = cluster.get_job(name)
            state = _state(existing) if existing else None
            if existing and state[0] == m.FAILED:
                emit(
                    f"{where} failed before ({_reason(state)}); deleting it and starting "
                    "again (a retry)"
                )
                cluster.delete_job(name)
                _wait_gone(cluster, name)
                existing = None
            if existing:
                emit(f"reattaching to {where}")
            else:
                _create(
                    cluster,
                    store,
                    name,
                    run_id,
                    step,
                    argv,
                    inputs,
                    outputs,
                    scale,
                    image,
                    secret,
                    {"volume": volume, "node_selector": node_selector, "tolerations": tolerations},
                    emit,
                )
                emit(
                    f"created {where}: {scale.nodes} node(s) x {scale.procs_per_node} "
                    f"process(es), runtime {scale.runtime}"
                )
            _wait(cluster, name, where, scale, emit)
        except _Cancelled as stop:
            emit(f"{signal.Signals(stop.signum).name}: deleting {where}")
            try:
                cluster.delete_job(name)
            except IagnError as exc:
                print(f"iagn: warning: could not delete {where}: {exc}", file=sys.stderr)
            raise SystemExit(128 + stop.signum) from None
    store.fetch_outputs(outputs, emit)


def _create(
    cluster, store, name, run_id, step, argv, inputs, outputs, scale, image, secret, pod, emit
):
    kind, runtime = cluster.find_runtime(scale.runtime)
    if "torch" not in ((runtime.get("spec") or {}).get("mlPolicy") or {}):
        raise IagnError(
            f"Trainer runtime {scale.runtime!r} is not a torch runtime (its spec.mlPolicy has "
            "no torch): the nodes need the PET_* variables it sets for torchrun; use "
            "torch-distributed or a copy of it"
        )
    if secret:
        keys = cluster.secret_keys(secret)
        if keys is None:
            raise IagnError(
                f"the Kubernetes secret {secret!r} does not exist in namespace "
                f"{cluster.namespace}; create it (README: Credentials) or compile with "
                "--secret NAME. Nothing was created"
            )
        missing = [key for key in m.SECRET_KEYS_REQUIRED if key not in keys]
        if missing:
            raise IagnError(
                f"the Kubernetes secret {secret!r} has no {', '.join(missing)}; add the "
                "key(s). Nothing was created"
            )
    store.stage_inputs(inputs, emit)
    store.clear_outputs()
    spec = m.node_spec(
        store.prefix,
        argv,
        list(inputs),
        {key: Path(path).name for key, path in outputs.items()},
        scale.max_restarts,
    )
    manifest = m.build(
        name=name,
        namespace=cluster.namespace,
        run_id=run_id,
        step=step,
        scale=scale,
        runtime_kind=kind,
        image=image,
        secret=secret,
        spec=spec,
        storage_shown=scrub_uri(store.prefix),
        **pod,
    )
    cluster.create_job(manifest)


def _state(job: dict) -> tuple[str | None, str, str]:
    """(COMPLETE, FAILED or None, reason, message) from the job's conditions."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in (m.COMPLETE, m.FAILED) and condition.get("status") == "True":
            return condition["type"], condition.get("reason") or "", condition.get("message") or ""
    return None, "", ""


def _reason(state: tuple[str | None, str, str]) -> str:
    _, reason, message = state
    return ": ".join(part for part in (reason, message) if part) or "no reason given"


def _wait_gone(cluster: Cluster, name: str) -> None:
    deadline = time.monotonic() + GONE_WAIT_SECONDS
    while cluster.get_job(name) is not None:
        if time.monotonic() > deadline:
            raise IagnError(
                f"TrainJob {name} was deleted but is still there after "
                f"{GONE_WAIT_SECONDS:.0f} s (finalizers?); delete it by hand"
            )
        time.sleep(min(POLL_SECONDS, 2.0))


def _wait(cluster: Cluster, name: str, where: str, scale: Scale, emit) -> None:
    deadline = time.monotonic() + scale.timeout_minutes * 60
    follower = _NodeLog(cluster, name, emit)
    follower.start()
    failures = 0
    try:
        while True:
            try:
                job = cluster.get_job(name)
                failures = 0
            except IagnError:
                failures += 1
                if failures >= MAX_API_FAILURES:
                    raise
                time.sleep(POLL_SECONDS)
                continue
            if job is None:
                raise IagnError(f"{where} disappeared (deleted by someone else?); rerun the step")
            state = _state(job)
            if state[0] == m.COMPLETE:
                emit(f"{where} is Complete")
                return
            if state[0] == m.FAILED:
                follower.finish()
                raise IagnError(f"{where} failed: {_reason(state)}{_events(cluster, name)}")
            if time.monotonic() > deadline:
                cluster.delete_job(name)
                raise IagnError(
                    f"{where} ran past distributed.timeout_minutes ({scale.timeout_minutes:g}); "
                    "it was deleted"
                )
            time.sleep(POLL_SECONDS)
    finally:
        follower.finish()


def _events(cluster: Cluster, name: str) -> str:
    try:
        pods = {pod.metadata.name for pod in cluster.node_pods(name)}
        found = cluster.warnings({name, *pods})
    except IagnError:
        return ""
    return ("\n  " + "\n  ".join(found[-5:])) if found else ""


class _NodeLog(threading.Thread):
    """Copies node 0's log into ours: follows its pod's `node` container while the job runs;
    a pod that does not exist yet (or a container not started) is waited for, a restarted
    container is followed again."""

    def __init__(self, cluster: Cluster, name: str, emit):
        super().__init__(name=f"log-{name}", daemon=True)
        self.cluster, self.job, self.emit = cluster, name, emit
        self.stop = threading.Event()

    def run(self) -> None:
        followed: set[tuple[str, int]] = set()
        while True:
            stopping = self.stop.is_set()  # then one last look: a log not yet copied
            # The log is a convenience: never the reason a step fails.
            with contextlib.suppress(Exception):
                self._follow(followed)
            if stopping:
                return
            self.stop.wait(min(POLL_SECONDS, 5.0))

    def _follow(self, followed: set[tuple[str, int]]) -> None:
        pods = self.cluster.node_pods(self.job)
        pod = pods[-1] if pods else None
        if pod is None or not _started(pod):
            return
        key = (pod.metadata.name, _restarts(pod))
        if key in followed:
            return
        followed.add(key)
        for line in self.cluster.log_lines(pod.metadata.name):
            self.emit(f"[node 0] {line}")

    def finish(self) -> None:
        self.stop.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(LOG_DRAIN_SECONDS)


def _started(pod) -> bool:
    return (pod.status.phase if pod.status else None) in ("Running", "Succeeded", "Failed")


def _restarts(pod) -> int:
    statuses = (pod.status.container_statuses if pod.status else None) or []
    return sum(status.restart_count or 0 for status in statuses if status.name == m.NODE)


class _cancel_on_signals:
    """SIGTERM and SIGINT raise _Cancelled in the main thread (elsewhere: nothing changes)."""

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._raise)
        return self

    @staticmethod
    def _raise(signum, _frame):
        raise _Cancelled(signum)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def _emitter(log) -> Callable[[str], None]:
    if log is print:
        return lambda text: print(text, flush=True)
    return log
