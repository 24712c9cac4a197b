"""`iagn-pipeline submit`: send a compiled pipeline to a Kubeflow Pipelines cluster.

Uses `kfp.Client`, which speaks the v2beta1 REST API: GET /apis/v2beta1/healthz, GET and
POST /apis/v2beta1/experiments, POST /apis/v2beta1/runs (the pipeline spec travels inline
in the run). The host is probed first with a short timeout, so an unreachable or wrong
host is one clear line instead of kfp's minute of retries. The token goes only into the
Authorization header; it is never printed or logged.
"""

from __future__ import annotations

import contextlib
import io
import json
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from iagn.errors import IagnError

HEALTHZ = "/apis/v2beta1/healthz"
PROBE_TIMEOUT_S = 10.0


@dataclass
class Submitted:
    run_id: str
    url: str
    experiment_id: str
    experiment_created: bool


def normalize_host(host: str) -> str:
    host = host.strip().rstrip("/")
    if not host:
        raise IagnError("--host is empty; pass the KFP API URL, e.g. http://localhost:8080")
    if "://" not in host:
        host = "http://" + host
    if "@" in urlsplit(host).netloc:
        raise IagnError("--host must not carry credentials; pass the token with --token")
    return host


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or exc
    return str(reason).strip() or type(exc).__name__


def probe(host: str, token: str | None) -> dict[str, Any]:
    """GET healthz: the host answers as a KFP API (with these credentials) or IagnError."""
    request = urllib.request.Request(host + HEALTHZ, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise IagnError(
                f"the Kubeflow Pipelines API at {host} refused the request (HTTP {exc.code}); "
                "check --token (a bearer token the cluster accepts) and your access"
            ) from None
        raise IagnError(
            f"{host}{HEALTHZ} answered HTTP {exc.code} {exc.reason}: is --host the KFP API "
            "(the ml-pipeline-ui or ml-pipeline service, no path)?"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        raise IagnError(
            f"cannot reach the Kubeflow Pipelines API at {host} ({_reason(exc)}); check the "
            "--host URL, that the KFP API runs and that this machine can reach it (e.g. "
            "`kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`, then "
            "--host http://localhost:8080)"
        ) from None
    try:
        answer = json.loads(body or b"{}")
    except json.JSONDecodeError:
        raise IagnError(
            f"{host}{HEALTHZ} did not answer JSON: is --host the KFP API (no path), not a "
            "login page? Pass a token with --token if the cluster needs one"
        ) from None
    return answer if isinstance(answer, dict) else {}


def _api_message(exc: BaseException) -> str:
    body = getattr(exc, "body", None)
    if body:
        try:
            parsed = json.loads(body)
            if isinstance(parsed, dict):
                return str(parsed.get("message") or parsed.get("error") or body).strip()
        except (TypeError, ValueError):
            pass
        return str(body).strip()[:500]
    return str(exc).strip()[:500]


@contextlib.contextmanager
def _api_errors(host: str, action: str):
    """kfp_server_api / urllib3 failures as one IagnError naming the host and the action."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except kfp_server_api.ApiException as exc:
        if exc.status in (None, 0):
            raise IagnError(
                f"lost the connection to the Kubeflow Pipelines API at {host} while trying to "
                f"{action}: {_api_message(exc)}; check the network and retry"
            ) from None
        raise IagnError(
            f"the Kubeflow Pipelines API at {host} rejected the request to {action} "
            f"(HTTP {exc.status} {exc.reason}): {_api_message(exc)}"
        ) from None
    except urllib3.exceptions.HTTPError as exc:
        raise IagnError(
            f"lost the connection to the Kubeflow Pipelines API at {host} while trying to "
            f"{action} ({_reason(exc)}); check the network and retry"
        ) from None


def without_caching(package: str | Path, target: str | Path) -> Path:
    """A copy of a compiled pipeline with caching off for every task, nested DAGs included.

    kfp.Client's `enable_caching=False` only reaches the root DAG's tasks, and every step of
    this pipeline sits inside the ExitHandler's sub-DAG.
    """
    import yaml

    documents = list(yaml.safe_load_all(Path(package).read_text()))
    spec = documents[0]
    dags = [spec["root"].get("dag", {})]
    dags += [c["dag"] for c in spec.get("components", {}).values() if "dag" in c]
    for dag in dags:
        for task in dag.get("tasks", {}).values():
            task["cachingOptions"] = {"enableCache": False}
    Path(target).write_text(yaml.safe_dump_all(documents, sort_keys=False))
    return Path(target)


def submit(
    host: str,
    package: str,
    arguments: dict[str, Any],
    experiment: str,
    run_name: str,
    token: str | None = None,
    namespace: str | None = None,
) -> Submitted:
    """Create the experiment if missing and start a run of `package` with `arguments`.

    Caching is as compiled (see `without_caching` to turn it off); never kfp's
    `enable_caching=True`, which would also cache `register`.
    """
    import kfp

    host = normalize_host(host)
    probe(host, token)
    quiet = io.StringIO()  # kfp prints links and logs; this command prints its own lines
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP v2.0.0-beta.2+"
        with _api_errors(host, "connect"):
            extra = {"namespace": namespace} if namespace else {}
            client = kfp.Client(host=host, existing_token=token or None, **extra)
        created = False
        with _api_errors(host, f"look up the experiment {experiment!r}"):
            try:
                found = client.get_experiment(experiment_name=experiment, namespace=namespace)
            except ValueError as exc:
                if "No experiment is found" not in str(exc):
                    raise IagnError(f"experiment {experiment!r}: {exc}") from None
                found = None
        if found is None:
            with _api_errors(host, f"create the experiment {experiment!r}"):
                found = client.create_experiment(name=experiment, namespace=namespace)
            created = True
        with _api_errors(host, "create the run"):
            run = client.run_pipeline(
                experiment_id=found.experiment_id,
                job_name=run_name,
                pipeline_package_path=package,
                params=arguments,
            )
    return Submitted(
        run_id=run.run_id,
        url=f"{host}/#/runs/details/{run.run_id}",
        experiment_id=found.experiment_id,
        experiment_created=created,
    )
