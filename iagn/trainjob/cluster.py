"""The Kubernetes API calls the launcher makes, and nothing else.

API_CALLS lists every (API group, resource, verb) the launcher uses; each call goes through
`Cluster._call`, which refuses one that is not listed. deploy/trainer/rbac.yaml grants the
pipeline's service account these (tests/test_trainjob_rbac.py checks it covers API_CALLS),
so the list, the code and the RBAC cannot drift apart.

The client is the official `kubernetes` package: in a pod, the service account's in-cluster
configuration; elsewhere, the kubeconfig ($KUBECONFIG or ~/.kube/config).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from iagn.errors import IagnError
from iagn.trainjob import manifest as m


@dataclass(frozen=True)
class ApiCall:
    group: str  # "" is the core API
    resource: str
    verb: str
    scope: str = "namespace"  # or "cluster"


API_CALLS = (
    ApiCall(m.GROUP, m.PLURAL, "create"),
    ApiCall(m.GROUP, m.PLURAL, "get"),
    ApiCall(m.GROUP, m.PLURAL, "delete"),
    ApiCall(m.GROUP, m.RUNTIME_PLURAL, "get"),
    ApiCall(m.GROUP, m.RUNTIME_PLURAL, "list"),
    ApiCall(m.GROUP, m.CLUSTER_RUNTIME_PLURAL, "get", "cluster"),
    ApiCall(m.GROUP, m.CLUSTER_RUNTIME_PLURAL, "list", "cluster"),
    ApiCall("", "secrets", "get"),  # only the one secret: rbac.yaml names it (resourceNames)
    ApiCall("", "pods", "list"),
    ApiCall("", "pods/log", "get"),
    ApiCall("", "events", "list"),
)
RBAC_HINT = (
    "grant the pipeline's service account the Role and ClusterRole in deploy/trainer/ "
    "(README: Training on several nodes)"
)


class Gone(Exception):
    """The object does not exist (HTTP 404)."""


class Cluster:
    def __init__(self, namespace: str, api_client: Any = None):
        from kubernetes import client

        self.namespace = namespace
        self.api_client = api_client or _connect()
        self.custom = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)

    @property
    def host(self) -> str:
        return self.api_client.configuration.host

    def _call(self, call: ApiCall, function: Callable, *args, **kwargs) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        if call not in API_CALLS:
            raise AssertionError(f"{call} is not in API_CALLS (deploy/trainer/rbac.yaml)")
        where = "" if call.scope == "cluster" else f" in namespace {self.namespace}"
        what = f"{call.verb} {call.resource}" + (f".{call.group}" if call.group else "")
        try:
            return function(*args, **kwargs)
        except ApiException as exc:
            if exc.status == 404:
                raise Gone(what) from None
            if exc.status in (401, 403):
                raise IagnError(
                    f"the Kubernetes API refused to {what}{where} ({exc.status} {exc.reason}): "
                    f"{RBAC_HINT}"
                ) from None
            raise IagnError(
                f"the Kubernetes API failed to {what}{where}: {exc.status} {exc.reason}"
                f"{': ' + _message(exc) if _message(exc) else ''}"
            ) from None
        except HTTPError as exc:
            raise IagnError(
                f"cannot reach the Kubernetes API at {self.host} to {what}: {exc}"
            ) from None

    # --- TrainJobs ----------------------------------------------------------------------

    def get_job(self, name: str) -> dict | None:
        call = ApiCall(m.GROUP, m.PLURAL, "get")
        try:
            return self._call(
                call,
                self.custom.get_namespaced_custom_object,
                m.GROUP,
                m.VERSION,
                self.namespace,
                m.PLURAL,
                name,
            )
        except Gone:
            return None

    def create_job(self, manifest: dict) -> dict:
        return self._call(
            ApiCall(m.GROUP, m.PLURAL, "create"),
            self.custom.create_namespaced_custom_object,
            m.GROUP,
            m.VERSION,
            self.namespace,
            m.PLURAL,
            manifest,
        )

    def delete_job(self, name: str) -> bool:
        """Delete the job and, in the background, its JobSet and pods; False if absent."""
        try:
            self._call(
                ApiCall(m.GROUP, m.PLURAL, "delete"),
                self.custom.delete_namespaced_custom_object,
                m.GROUP,
                m.VERSION,
                self.namespace,
                m.PLURAL,
                name,
                propagation_policy="Background",
            )
            return True
        except Gone:
            return False

    # --- runtimes -----------------------------------------------------------------------

    def find_runtime(self, name: str) -> tuple[str, dict]:
        """(kind, object) of the runtime `name`: the namespace's TrainingRuntime, else the
        ClusterTrainingRuntime; an error listing the runtimes there are when neither exists."""
        try:
            runtime = self._call(
                ApiCall(m.GROUP, m.RUNTIME_PLURAL, "get"),
                self.custom.get_namespaced_custom_object,
                m.GROUP,
                m.VERSION,
                self.namespace,
                m.RUNTIME_PLURAL,
                name,
            )
            return m.RUNTIME_KIND, runtime
        except Gone:
            pass
        try:
            runtime = self._call(
                ApiCall(m.GROUP, m.CLUSTER_RUNTIME_PLURAL, "get", "cluster"),
                self.custom.get_cluster_custom_object,
                m.GROUP,
                m.VERSION,
                m.CLUSTER_RUNTIME_PLURAL,
                name,
            )
            return m.CLUSTER_RUNTIME_KIND, runtime
        except Gone:
            pass
        existing = self._runtime_names()
        listed = ", ".join(existing) if existing else "none: is Kubeflow Trainer installed?"
        raise IagnError(
            f"Kubeflow Trainer runtime {name!r} (distributed.runtime) does not exist as a "
            f"ClusterTrainingRuntime or a TrainingRuntime in namespace {self.namespace}; the "
            f"runtimes there are: {listed}. Nothing was created"
        )

    def _runtime_names(self) -> list[str]:
        names = []
        for call, function, args in (
            (
                ApiCall(m.GROUP, m.CLUSTER_RUNTIME_PLURAL, "list", "cluster"),
                self.custom.list_cluster_custom_object,
                (m.GROUP, m.VERSION, m.CLUSTER_RUNTIME_PLURAL),
            ),
            (
                ApiCall(m.GROUP, m.RUNTIME_PLURAL, "list"),
                self.custom.list_namespaced_custom_object,
                (m.GROUP, m.VERSION, self.namespace, m.RUNTIME_PLURAL),
            ),
        ):
            try:
                found = self._call(call, function, *args)
            except Gone:  # the CRD is not installed
                continue
            kind = "ClusterTrainingRuntime" if call.scope == "cluster" else "TrainingRuntime"
            names += [f"{item['metadata']['name']} ({kind})" for item in found.get("items", [])]
        return sorted(names)

    # --- the secret ---------------------------------------------------------------------

    def secret_keys(self, name: str) -> set[str] | None:
        """The keys of the secret `name`; None when it does not exist."""
        try:
            secret = self._call(
                ApiCall("", "secrets", "get"),
                self.core.read_namespaced_secret,
                name,
                self.namespace,
            )
        except Gone:
            return None
        return set(secret.data or {}) | set(secret.string_data or {})

    # --- pods, logs, events -------------------------------------------------------------

    def node_pods(self, job: str, index: int = 0) -> list[Any]:
        """The pods of node `index` of TrainJob `job` (newest last)."""
        selector = {
            m.POD_LABEL_JOBSET: job,
            m.POD_LABEL_REPLICATED_JOB: m.NODE,
            m.POD_LABEL_INDEX: str(index),
        }
        found = self._call(
            ApiCall("", "pods", "list"),
            self.core.list_namespaced_pod,
            self.namespace,
            label_selector=",".join(f"{k}={v}" for k, v in selector.items()),
        )
        pods = [
            pod
            for pod in found.items
            if all((pod.metadata.labels or {}).get(k) == v for k, v in selector.items())
        ]
        return sorted(pods, key=lambda pod: str(pod.metadata.creation_timestamp or ""))

    def log_lines(self, pod: str, container: str = m.NODE) -> Iterator[str]:
        """The container's log, followed until the container ends."""
        response = self._call(
            ApiCall("", "pods/log", "get"),
            self.core.read_namespaced_pod_log,
            pod,
            self.namespace,
            container=container,
            follow=True,
            _preload_content=False,
        )
        pending = b""
        try:
            for chunk in response.stream(amt=4096, decode_content=True):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode(errors="replace")
            if pending:
                yield pending.decode(errors="replace")
        finally:
            response.release_conn()

    def warnings(self, names: set[str]) -> list[str]:
        """Warning events about the objects `names` (the job, its pods), oldest first."""
        found = self._call(
            ApiCall("", "events", "list"), self.core.list_namespaced_event, self.namespace
        )
        events = [
            event
            for event in found.items
            if event.type == "Warning" and event.involved_object.name in names
        ]
        events.sort(key=lambda event: str(event.last_timestamp or event.event_time or ""))
        return [f"{e.involved_object.name}: {e.reason}: {e.message}" for e in events]


def _message(exc: Any) -> str:
    import json

    try:
        return json.loads(exc.body).get("message", "")
    except (TypeError, ValueError, AttributeError):
        return ""


def _connect():
    """An API client: in-cluster (a pod's service account), else the kubeconfig."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        try:
            # $KUBECONFIG as it is now (the client reads it once, when first imported).
            config.load_kube_config(
                config_file=os.environ.get("KUBECONFIG") or None,
                client_configuration=configuration,
            )
        except (config.ConfigException, OSError) as exc:
            raise IagnError(
                "no Kubernetes API to create the TrainJob on: not in a pod with a service "
                f"account, and no usable kubeconfig ($KUBECONFIG or ~/.kube/config): {exc}"
            ) from None
    return client.ApiClient(configuration)
