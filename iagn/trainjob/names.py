"""Names: the TrainJob's (from the KFP run and the step), its storage prefix, the namespace.

A TrainJob's name is a DNS-1035 label (Trainer names the JobSet, its headless service and
its pods after it, so it stays short: at most `MAX_NAME` characters): `iagn-<step>-<hash>`,
where the hash is of the KFP run id and the step. The same run and step always give the same
name, which is what makes a retried task find (reattach to) the job its first attempt made.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from iagn.errors import IagnError
from iagn.provenance import ENV_KFP_RUN

MAX_NAME = 40
STEP_CHARS = 16
HASH_CHARS = 10
# Where a pod finds the namespace of its service account.
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DEFAULT_NAMESPACE = "default"
_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def kfp_run_id() -> str:
    """The KFP run this task belongs to (KFP_RUN_ID); an error outside a KFP run."""
    run_id = os.environ.get(ENV_KFP_RUN, "").strip()
    if not run_id:
        raise IagnError(
            f"a step on several nodes runs as a Kubeflow Trainer TrainJob named after its KFP "
            f"run, and {ENV_KFP_RUN} is not set: run it from a KFP pipeline compiled with "
            "`iagn-pipeline compile --nodes N` (on a cluster, not kfp.local), or set "
            "distributed.nodes: 1 to train on this machine"
        )
    return run_id


def job_name(run_id: str, step: str) -> str:
    """`iagn-<step>-<hash of run id and step>`: a DNS-1035 label of at most MAX_NAME chars."""
    if not run_id or not step:
        raise IagnError(f"a TrainJob name needs a run id and a step, got {run_id!r}, {step!r}")
    slug = re.sub(r"[^a-z0-9]+", "-", step.lower()).strip("-")[:STEP_CHARS].strip("-")
    digest = hashlib.sha256(f"{run_id}\n{step}".encode()).hexdigest()[:HASH_CHARS]
    name = f"iagn-{slug}-{digest}" if slug else f"iagn-{digest}"
    assert len(name) <= MAX_NAME and _LABEL.match(name), name
    return name


def label_value(text: str) -> str:
    """`text` as a Kubernetes label value (63 characters of [-_.A-Za-z0-9], alphanumeric ends)."""
    value = re.sub(r"[^-_.A-Za-z0-9]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


def storage_prefix(storage_uri: str, name: str) -> str:
    """Where a job's inputs and outputs live: `<storage_uri>/<job name>`."""
    return f"{storage_uri.rstrip('/')}/{name}"


# `pvc://CLAIM/path`: the PersistentVolumeClaim CLAIM, mounted at SHARED_ROOT/CLAIM in the
# task's pod (the pipeline mounts it) and, through the TrainJob, in every node's container.
SHARED_SCHEME = "pvc"
SHARED_ROOT = "/mnt/iagn-shared"


def shared_volume(storage_uri: str) -> tuple[str, str] | None:
    """(claim, mount path) of a `pvc://CLAIM/path` storage URI; None for any other URI."""
    parts = urlsplit(storage_uri)
    if parts.scheme != SHARED_SCHEME:
        return None
    if not _LABEL.match(parts.netloc or "") and not re.match(
        r"^[a-z0-9][-.a-z0-9]*$", parts.netloc
    ):
        raise IagnError(
            f"storage URI {storage_uri!r}: pvc://CLAIM/path needs the name of a "
            "PersistentVolumeClaim as CLAIM"
        )
    return parts.netloc, f"{SHARED_ROOT}/{parts.netloc}"


def local_storage_uri(storage_uri: str) -> str:
    """The URI to read and write `storage_uri` with here: a `pvc://CLAIM/path` is the file
    path under the claim's mount; anything else is itself."""
    shared = shared_volume(storage_uri)
    if shared is None:
        return storage_uri
    path = urlsplit(storage_uri).path.strip("/")
    return f"file://{shared[1]}" + (f"/{path}" if path else "")


def current_namespace(namespace: str | None = None) -> str:
    """`namespace` when given, else the pod's service-account namespace, else `default`."""
    if namespace:
        return namespace
    try:
        found = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    except OSError:
        found = ""
    return found or DEFAULT_NAMESPACE
