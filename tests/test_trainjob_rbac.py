"""deploy/trainer/rbac.yaml grants the pipeline's service account exactly the Kubernetes calls
the TrainJob launcher makes (iagn.trainjob.cluster.API_CALLS, which every call it makes goes
through): none missing, none extra."""

from __future__ import annotations

from pathlib import Path

import yaml

from iagn.trainjob.cluster import API_CALLS, ApiCall

RBAC = Path(__file__).resolve().parent.parent / "deploy" / "trainer" / "rbac.yaml"
SERVICE_ACCOUNT = {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}


def documents() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(RBAC.read_text()) if doc]


def granted() -> tuple[set[ApiCall], dict[ApiCall, list[str]]]:
    """What the bound roles allow: (call, ...) and the resourceNames each is limited to."""
    docs = documents()
    roles = {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs if "rules" in doc}
    calls, names = set(), {}
    for binding in (doc for doc in docs if doc["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        assert SERVICE_ACCOUNT in binding["subjects"], binding["metadata"]["name"]
        role = roles[(binding["roleRef"]["kind"], binding["roleRef"]["name"])]
        scope = "cluster" if role["kind"] == "ClusterRole" else "namespace"
        if scope == "namespace":
            assert role["metadata"]["namespace"] == binding["metadata"]["namespace"]
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        call = ApiCall(group, resource, verb, scope)
                        calls.add(call)
                        if rule.get("resourceNames"):
                            names[call] = rule["resourceNames"]
    return calls, names


def test_the_manifests_are_kubernetes_rbac_objects():
    kinds = sorted(doc["kind"] for doc in documents())
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"]
    for doc in documents():
        assert doc["apiVersion"] == "rbac.authorization.k8s.io/v1"


def test_the_rbac_grants_exactly_what_the_launcher_calls():
    calls, _ = granted()
    missing = sorted(map(str, set(API_CALLS) - calls))
    extra = sorted(map(str, calls - set(API_CALLS)))
    assert not missing, f"the launcher calls these, rbac.yaml does not grant them: {missing}"
    assert not extra, f"rbac.yaml grants more than the launcher calls: {extra}"


def test_only_the_pipelines_secret_is_readable():
    from pipeline.dag import DEFAULT_SECRET

    _, names = granted()
    assert names == {ApiCall("", "secrets", "get"): [DEFAULT_SECRET]}
