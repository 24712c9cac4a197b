"""The TrainJob manifest, for Kubeflow Trainer TRAINER_VERSION (API trainer.kubeflow.org/v1alpha1).

The API server prunes a field its CRD does not know, silently; and Trainer renamed fields
between releases (v2.0 podSpecOverrides, v2.1 podTemplateOverrides, v2.2+ runtimePatches). So
the manifest targets one release and is checked against that release's models, the
`kubeflow-trainer-api` package of the same version: `checked` round-trips it through them and
refuses a manifest that loses anything on the way.

Each node runs `iagn trainjob-node` (iagn/commands/trainjob.py, iagn.trainjob.node) in the
pipeline's image; what it runs comes in one environment variable, NODE_SPEC_ENV (JSON: the
storage prefix, the `iagn` arguments with their placeholders, the input and output names, the
restarts). Credentials come from the same Kubernetes secret as the pipeline's steps, key by key
(`secretKeyRef`): their values never appear in the manifest, the arguments or the logs.

Placeholders: an element of `argv` may hold `{name}` for an input or output `name`; each node
replaces it with the local path of that input (downloaded) or output (to be uploaded), e.g.
["train-stage", "--data", "{dataset}", "--out", "{model}"] or "--out={model}". A `{...}` that
names no input or output is refused before anything is created.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from iagn.errors import IagnError
from iagn.provenance import ENV_DATA_VERSION, ENV_GIT_COMMIT, ENV_KFP_RUN, ENV_PIPELINE_RUN
from iagn.train.scale import Scale

TRAINER_VERSION = "v2.3.0"  # the Trainer release whose CRDs these manifests are written for
TRAINER_API_PACKAGE = "kubeflow-trainer-api==2.3.*"  # its models (pyproject.toml)
GROUP, VERSION = "trainer.kubeflow.org", "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TrainJob"
PLURAL = "trainjobs"
CLUSTER_RUNTIME_KIND, RUNTIME_KIND = "ClusterTrainingRuntime", "TrainingRuntime"
CLUSTER_RUNTIME_PLURAL, RUNTIME_PLURAL = "clustertrainingruntimes", "trainingruntimes"
# Trainer's torch runtime runs each node's trainer in the container `node` of the JobSet's
# replicated job `node`; JobSet and the Job controller label its pods.
NODE = "node"
POD_LABEL_JOBSET = "jobset.sigs.k8s.io/jobset-name"
POD_LABEL_REPLICATED_JOB = "jobset.sigs.k8s.io/replicatedjob-name"
POD_LABEL_INDEX = "batch.kubernetes.io/job-completion-index"
# Conditions of a finished TrainJob.
COMPLETE, FAILED = "Complete", "Failed"

NODE_COMMAND = ("iagn", "trainjob-node")
PATCH_MANAGER = "iagn.trainjob"  # who owns the runtime patch (Trainer keys patches by it)
SHARED_VOLUME = "iagn-shared"
NODE_SPEC_ENV = "IAGN_TRAINJOB_SPEC"
NODE_SPEC_FORMAT = "iagn-trainjob-node/1"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_STEP = "iagn/step"
LABEL_RUN = "iagn/kfp-run-id"
ANNOTATION_STEP, ANNOTATION_RUN, ANNOTATION_STORAGE = "iagn/step", "iagn/kfp-run-id", "iagn/storage"

# The pipeline secret's keys, each exposed as the variable of the same name, in the
# pipeline's tasks (pipeline/dag.py) as on a TrainJob's nodes.
SECRET_KEYS_REQUIRED = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
SECRET_KEYS_OPTIONAL = (
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
# The task's own settings (not secrets) the nodes need as well, passed on when set: the
# run's identity for MLflow's parent run and provenance tags, the experiment, the tracking
# URI when the task has one without credentials (else it comes from the secret).
FORWARDED_ENV = (
    ENV_KFP_RUN,
    ENV_PIPELINE_RUN,
    ENV_GIT_COMMIT,
    ENV_DATA_VERSION,
    "IAGN_PARENT_RUN_ID",
    "IAGN_TRACKING",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_TRACKING_URI",
)

PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_-]+)\}")
NAME = re.compile(r"^[A-Za-z0-9_-]{1,63}$")


def placeholders(argv: Sequence[str]) -> set[str]:
    return {match for item in argv for match in PLACEHOLDER.findall(item)}


def substitute(argv: Sequence[str], paths: Mapping[str, object]) -> list[str]:
    """`argv` with each `{name}` replaced by `paths[name]`."""

    def one(match: re.Match) -> str:
        return str(paths[match.group(1)])

    return [PLACEHOLDER.sub(one, item) for item in argv]


def check_arguments(argv: Sequence[str], inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """Names are [A-Za-z0-9_-], none both an input and an output, every placeholder known."""
    for name in [*inputs, *outputs]:
        if not NAME.match(name):
            raise IagnError(
                f"TrainJob input/output name {name!r}: use 1-63 letters, digits, '-' or '_'"
            )
    both = sorted(set(inputs) & set(outputs))
    if both:
        raise IagnError(f"TrainJob: {', '.join(both)} is both an input and an output")
    unknown = sorted(placeholders(argv) - set(inputs) - set(outputs))
    if unknown:
        raise IagnError(
            f"TrainJob arguments name {', '.join('{' + u + '}' for u in unknown)}, which is no "
            f"input or output (inputs: {', '.join(inputs) or 'none'}; outputs: "
            f"{', '.join(outputs) or 'none'})"
        )
    if any(not isinstance(item, str) for item in argv):
        raise IagnError(f"TrainJob arguments must be strings, got {list(argv)!r}")


def check_scale(scale: Scale) -> None:
    for what, value in (("nodes", scale.nodes), ("procs_per_node", scale.procs_per_node)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise IagnError(
                f"distributed.{what} must be a whole number of 1 or more, got {value!r}; nothing "
                "was created"
            )
    if not scale.runtime:
        raise IagnError("distributed.runtime is empty: name the Trainer runtime (README)")
    if not (scale.timeout_minutes > 0):
        raise IagnError(
            f"distributed.timeout_minutes must be positive, got {scale.timeout_minutes}"
        )
    resources = scale.resources_per_node
    for key, value in resources.get("limits", resources).items():
        if key.endswith("gpu") and _number(value) is not None and _number(value) <= 0:
            raise IagnError(
                f"distributed.resources_per_node {key}: {value!r} GPUs per node; ask for 1 or "
                "more, or leave it out for CPU nodes"
            )


def _number(value: object) -> float | None:
    try:
        return float(str(value))
    except ValueError:
        return None


def resources(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """params' `resources_per_node` as a ResourceRequirements: `{limits: ..., requests: ...}`
    as given, or a flat mapping `{cpu: 8, nvidia.com/gpu: 4}` as limits (requests default to
    them); quantities as strings."""
    if not spec:
        return None
    if set(spec) <= {"limits", "requests"}:
        return {key: {k: str(v) for k, v in (spec[key] or {}).items()} for key in spec}
    return {"limits": {key: str(value) for key, value in spec.items()}}


def node_spec(
    prefix: str,
    argv: Sequence[str],
    inputs: Sequence[str],
    outputs: Mapping[str, str],
    max_restarts: int,
) -> dict[str, Any]:
    """What each node runs (NODE_SPEC_ENV): `outputs` maps a name to its file name."""
    return {
        "format": NODE_SPEC_FORMAT,
        "prefix": prefix,
        "argv": list(argv),
        "inputs": list(inputs),
        "outputs": dict(outputs),
        "max_restarts": max_restarts,
    }


def has_credentials(uri: str) -> bool:
    try:
        parts = urlsplit(uri)
    except ValueError:
        return True
    return bool(parts.username or parts.password)


def environment(
    spec: Mapping[str, Any], secret: str, env: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """The trainer's env: the node spec, the task's FORWARDED_ENV that are set, and the
    secret's keys by reference (optional ones optional). A tracking URI of the task without
    credentials is passed on as it is (the task's parameter may have set it); one with
    credentials only ever comes from the secret."""
    env = os.environ if env is None else env
    entries = [{"name": NODE_SPEC_ENV, "value": json.dumps(spec, separators=(",", ":"))}]
    forwarded = set()
    for name in FORWARDED_ENV:
        value = env.get(name, "")
        if value and not (name == "MLFLOW_TRACKING_URI" and has_credentials(value)):
            entries.append({"name": name, "value": value})
            forwarded.add(name)
    if secret:
        for key, optional in [
            *((k, False) for k in SECRET_KEYS_REQUIRED),
            *((k, True) for k in SECRET_KEYS_OPTIONAL),
        ]:
            if key in forwarded:
                continue
            ref: dict[str, Any] = {"name": secret, "key": key}
            if optional:
                ref["optional"] = True
            entries.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return entries


def build(
    *,
    name: str,
    namespace: str,
    run_id: str,
    step: str,
    scale: Scale,
    runtime_kind: str,
    image: str,
    secret: str,
    spec: Mapping[str, Any],
    storage_shown: str,
    env: Mapping[str, str] | None = None,
    volume: tuple[str, str] | None = None,
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The TrainJob, checked against the models of TRAINER_VERSION (`checked`). `volume`:
    (claim, mount path) of a PersistentVolumeClaim every node mounts (shared storage);
    `node_selector` and `tolerations` place the nodes' pods (`runtime_patch`)."""
    from iagn.trainjob.names import label_value

    trainer: dict[str, Any] = {
        "image": image,
        "command": list(NODE_COMMAND),
        "numNodes": scale.nodes,
        "numProcPerNode": scale.procs_per_node,
        "env": environment(spec, secret, env),
    }
    requirements = resources(scale.resources_per_node)
    if requirements:
        trainer["resourcesPerNode"] = requirements
    manifest = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                LABEL_MANAGED_BY: "iagn",
                LABEL_STEP: label_value(step),
                LABEL_RUN: label_value(run_id),
            },
            "annotations": {
                ANNOTATION_STEP: step,
                ANNOTATION_RUN: run_id,
                ANNOTATION_STORAGE: storage_shown,
            },
        },
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": runtime_kind, "name": scale.runtime},
            # The controller fails the job at its deadline (reason DeadlineExceeded); the
            # launcher watches the same clock and deletes the job itself as well.
            "activeDeadlineSeconds": max(1, math.ceil(scale.timeout_minutes * 60)),
            "trainer": trainer,
        },
    }
    patch = runtime_patch(volume, node_selector, gpu_tolerations(scale, tolerations))
    if patch:
        manifest["spec"]["runtimePatches"] = [patch]
    return checked(manifest)


def gpu_tolerations(
    scale: Scale, tolerations: Sequence[Mapping[str, Any]] | None
) -> list[dict[str, Any]]:
    """`tolerations`; when None, the usual taint of a GPU pool for each GPU resource the
    nodes ask for (`nvidia.com/gpu`: NoSchedule), as the pipeline's GPU tasks get."""
    if tolerations is not None:
        return [dict(t) for t in tolerations]
    spec = resources(scale.resources_per_node) or {}
    asked = {**(spec.get("requests") or {}), **(spec.get("limits") or {})}
    return [
        {"key": key, "operator": "Exists", "effect": "NoSchedule"}
        for key in sorted(asked)
        if key.endswith("/gpu")
    ]


def runtime_patch(
    volume: tuple[str, str] | None,
    node_selector: Mapping[str, str] | None,
    tolerations: Sequence[Mapping[str, Any]],
) -> dict[str, Any] | None:
    """A runtime patch (Trainer v2.2+ `runtimePatches`, owned by PATCH_MANAGER) of every
    node's pod: the PersistentVolumeClaim `volume[0]` mounted at `volume[1]` in the `node`
    container, the node selector, the tolerations. None when there is nothing to patch."""
    pod: dict[str, Any] = {}
    if volume:
        claim, mount_path = volume
        pod["volumes"] = [{"name": SHARED_VOLUME, "persistentVolumeClaim": {"claimName": claim}}]
        pod["containers"] = [
            {"name": NODE, "volumeMounts": [{"name": SHARED_VOLUME, "mountPath": mount_path}]}
        ]
    if node_selector:
        pod["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod["tolerations"] = [dict(t) for t in tolerations]
    if not pod:
        return None
    replicated = {"name": NODE, "template": {"spec": {"template": {"spec": pod}}}}
    return {
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [replicated]}}},
    }


def checked(manifest: dict[str, Any]) -> dict[str, Any]:
    """`manifest`, once it is known to survive the TrainJob models of TRAINER_VERSION whole:
    a field they do not know (a typo, a field of another Trainer release) would be pruned by
    the API server without a word, so it is refused here."""
    from kubeflow_trainer_api.models.trainer_v1alpha1_train_job import TrainerV1alpha1TrainJob

    try:
        model = TrainerV1alpha1TrainJob.from_dict(manifest)
    except ValueError as exc:
        raise IagnError(
            f"the TrainJob manifest is not a Trainer {TRAINER_VERSION} TrainJob: {exc}"
        ) from None
    again = model.to_dict() if model is not None else None
    if again != manifest:
        lost = sorted(_differences(manifest, again or {}))
        raise IagnError(
            f"the TrainJob manifest has field(s) Trainer {TRAINER_VERSION} does not know, which "
            f"the API server would drop: {', '.join(lost)}"
        )
    return manifest


def _differences(sent: Any, kept: Any, path: str = "") -> list[str]:
    if isinstance(sent, dict) and isinstance(kept, dict):
        found = []
        for key in sent.keys() | kept.keys():
            found += _differences(sent.get(key), kept.get(key), f"{path}.{key}" if path else key)
        return found
    if isinstance(sent, list) and isinstance(kept, list) and len(sent) == len(kept):
        return [
            d
            for i, (a, b) in enumerate(zip(sent, kept, strict=True))
            for d in _differences(a, b, f"{path}[{i}]")
        ]
    return [] if sent == kept else [path or "(the whole manifest)"]
