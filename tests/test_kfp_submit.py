"""`iagn-pipeline submit` against a test double of the KFP v2beta1 REST API on 127.0.0.1.

No cluster can run here; the double speaks the endpoints kfp.Client uses (healthz,
experiments, runs), records every request, and can reject runs or require a token. The
tests check what arrives: the compiled pipeline spec, the parameters, the bearer token, and
that errors are one clear line that never shows the token.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from helpers import free_port

from pipeline.cli import main

TOKEN = "kfp-test-token-5f4e3d2c1b"
API = "/apis/v2beta1"


@dataclass
class Request:
    method: str
    path: str
    query: dict
    headers: dict  # names in lower case
    body: dict | None


@dataclass
class FakeKfp:
    """State and switches of the test double."""

    requests: list[Request] = field(default_factory=list)
    experiments: dict[str, dict] = field(default_factory=dict)  # display name -> experiment
    reject_runs: bool = False
    required_token: str | None = None

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.requests]


def _handler(state: FakeKfp):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _record(self) -> Request:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            parts = urlsplit(self.path)
            request = Request(
                self.command,
                parts.path,
                parse_qs(parts.query),
                {key.lower(): value for key, value in self.headers.items()},
                json.loads(raw) if raw else None,
            )
            state.requests.append(request)
            return request

        def _authorized(self, request: Request) -> bool:
            if state.required_token is None:
                return True
            if request.headers.get("authorization") == f"Bearer {state.required_token}":
                return True
            self._reply(401, {"error": "unauthenticated", "code": 16, "message": "bad token"})
            return False

        def do_GET(self) -> None:
            request = self._record()
            if not self._authorized(request):
                return
            if request.path == f"{API}/healthz":
                self._reply(200, {"commit_sha": "test", "tag_name": "2.5.0", "multi_user": False})
            elif request.path == f"{API}/experiments":
                predicates = json.loads(request.query.get("filter", ["{}"])[0]).get(
                    "predicates", []
                )
                names = [p.get("string_value") or p.get("stringValue") for p in predicates]
                found = [state.experiments[n] for n in names if n in state.experiments]
                self._reply(200, {"experiments": found, "total_size": len(found)})
            else:
                self._reply(404, {"error": "not found", "code": 5, "message": request.path})

        def do_POST(self) -> None:
            request = self._record()
            if not self._authorized(request):
                return
            if request.path == f"{API}/experiments":
                name = request.body["display_name"]
                experiment = {
                    "experiment_id": str(uuid.uuid4()),
                    "display_name": name,
                    "storage_state": "AVAILABLE",
                }
                state.experiments[name] = experiment
                self._reply(200, experiment)
            elif request.path == f"{API}/runs":
                if state.reject_runs:
                    self._reply(
                        400,
                        {
                            "error": "Invalid input error: pipeline spec is invalid",
                            "code": 3,
                            "message": "Invalid input error: pipeline spec is invalid",
                        },
                    )
                    return
                body = request.body
                self._reply(
                    200,
                    {
                        "run_id": "run-0001",
                        "display_name": body.get("display_name"),
                        "experiment_id": body.get("experiment_id"),
                        "state": "PENDING",
                    },
                )
            else:
                self._reply(404, {"error": "not found", "code": 5, "message": request.path})

    return Handler


@pytest.fixture
def kfp_api() -> Iterator[tuple[str, FakeKfp]]:
    state = FakeKfp()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("package") / "iagn_pipeline.yaml"
    assert main(["compile", "-o", str(path)]) == 0
    return path


def run_body(state: FakeKfp) -> dict:
    posted = [r for r in state.requests if r.method == "POST" and r.path == f"{API}/runs"]
    assert len(posted) == 1, state.calls()
    return posted[0].body


def test_submit_sends_the_compiled_spec_and_parameters(kfp_api, package, capsys, caplog):
    url, state = kfp_api
    code = main(
        [
            "submit",
            "--host",
            url,
            "--experiment",
            "iagn-ci",
            "--package",
            str(package),
            "--token",
            TOKEN,
            "--run-name",
            "nightly",
            "--param",
            "data_repo=https://git.example.com/ml/iagn.git",
            "--param",
            "data_rev=v1.0",
            "--param",
            "stage3.epochs=2",
            "--param",
            "register.gate.min_top1=0.6",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "run id      run-0001" in out
    assert f"run URL     {url}/#/runs/details/run-0001" in out
    assert "experiment  iagn-ci (created)" in out
    assert TOKEN not in out + err + caplog.text

    assert state.calls() == [
        ("GET", f"{API}/healthz"),  # our probe
        ("GET", f"{API}/healthz"),  # kfp.Client's own
        ("GET", f"{API}/experiments"),  # ours: does it exist?
        ("GET", f"{API}/experiments"),  # kfp.Client.create_experiment looks again
        ("POST", f"{API}/experiments"),
        ("POST", f"{API}/runs"),
    ]
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in state.requests)
    body = run_body(state)
    compiled = list(yaml.safe_load_all(package.read_text()))
    assert body["pipeline_spec"] == {"pipeline_spec": compiled[0], "platform_spec": compiled[1]}
    assert body["display_name"] == "nightly"
    assert body["experiment_id"] == state.experiments["iagn-ci"]["experiment_id"]
    assert body["runtime_config"]["parameters"] == {
        "data_repo": "https://git.example.com/ml/iagn.git",
        "data_rev": "v1.0",
        "params_overrides": {"stage3.epochs": 2, "register.gate.min_top1": 0.6},
    }


def test_submit_compiles_when_no_package_and_reuses_the_experiment(
    kfp_api, package, capsys, monkeypatch
):
    url, state = kfp_api
    state.experiments["iagn"] = {"experiment_id": "exp-7", "display_name": "iagn"}
    monkeypatch.setenv("IAGN_KFP_TOKEN", TOKEN)
    state.required_token = TOKEN
    assert main(["submit", "--host", url, "--no-cache"]) == 0
    out, err = capsys.readouterr()
    assert "experiment  iagn\n" in out and TOKEN not in out + err
    assert ("POST", f"{API}/experiments") not in state.calls()
    body = run_body(state)
    assert body["experiment_id"] == "exp-7"
    assert body["runtime_config"].get("parameters") in (None, {})
    spec = body["pipeline_spec"]["pipeline_spec"]
    reference = yaml.safe_load_all(package.read_text())
    expected = next(reference)
    # --no-cache switches caching off for every task; otherwise the same pipeline.
    for dag in [
        spec["root"]["dag"],
        *(c["dag"] for c in spec["components"].values() if "dag" in c),
    ]:
        for task in dag["tasks"].values():
            assert task.get("cachingOptions", {}).get("enableCache") in (None, False)
    assert spec["root"]["inputDefinitions"] == expected["root"]["inputDefinitions"]
    assert spec["deploymentSpec"] == expected["deploymentSpec"]


def test_unreachable_host_is_one_clear_line(capsys):
    port = free_port()  # nothing listens there
    code = main(["submit", "--host", f"127.0.0.1:{port}", "--token", TOKEN])
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"cannot reach the Kubeflow Pipelines API at http://127.0.0.1:{port}" in lines[0]
    assert "--host" in lines[0] and TOKEN not in out + err


@pytest.mark.fault(
    "a KFP API that refuses the token or rejects the run",
    sees="exit 2: one line naming the host and what the API said (`refused the request (HTTP "
    "401); check --token ...`); the token never shows",
    kept="nothing is submitted",
)
def test_a_rejected_run_says_what_the_api_said(kfp_api, package, capsys):
    url, state = kfp_api
    state.reject_runs = True
    code = main(["submit", "--host", url, "--package", str(package), "--token", TOKEN])
    out, err = capsys.readouterr()
    assert code == 2
    assert "rejected the request to create the run (HTTP 400" in err
    assert "pipeline spec is invalid" in err and TOKEN not in out + err


@pytest.mark.fault(
    "a KFP API that refuses the token or rejects the run",
    sees="exit 2: one line naming the host and what the API said (`refused the request (HTTP "
    "401); check --token ...`); the token never shows",
    kept="nothing is submitted",
)
def test_a_wrong_token_is_refused_without_showing_it(kfp_api, package, capsys):
    url, state = kfp_api
    state.required_token = "the-right-token"
    code = main(["submit", "--host", url, "--package", str(package), "--token", TOKEN])
    out, err = capsys.readouterr()
    assert code == 2
    assert "refused the request (HTTP 401); check --token" in err
    assert TOKEN not in out + err
    assert state.calls() == [("GET", f"{API}/healthz")]


def test_credentials_never_travel_as_parameters(kfp_api, capsys):
    url, state = kfp_api
    code = main(
        ["submit", "--host", url, "--param", "tracking_uri=https://ci:hunter2@mlflow.example.com"]
    )
    out, err = capsys.readouterr()
    assert code == 2 and "Kubernetes secret" in err and "hunter2" not in out + err
    assert state.requests == []
    code = main(["submit", "--host", url, "--param", "no_such_parameter=1"])
    assert code == 2 and "not a pipeline parameter" in capsys.readouterr().err
