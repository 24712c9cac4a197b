"""Tracking outages do not stop a step: a real MLflow server killed while a stage trains, its
S3 artifact store stopped while a step logs artifacts; what MLflow missed is kept in a spool
file and sent later (by the step itself, or by `iagn tracking replay`).

The server here is one of this module's own (not the session's shared one): it is killed
and restarted on the same port with the same SQLite database, and its moto S3 server is
stopped and restarted. Times (kill -> warning) are printed, not asserted: run with `-s` to
see them; the README records them with the machine.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
import yaml
from helpers import BIN, free_port, iagn
from mlflow_server import (
    FAKE_AWS,
    QUIET,
    TRACKING_PASSWORD,
    TRACKING_USER,
    _boto_credentials,
    _wait_until_healthy,
    stop_group,
)
from moto.server import ThreadedMotoServer
from test_training import tiny_params

from iagn import cli, provenance, runner, tracking
from iagn.errors import IagnError
from iagn.tracking import spool
from iagn.tracking.step import StepRun

EXPERIMENT = "outage-test"


@dataclass
class KillableServer:
    """`mlflow server` (SQLite, artifacts proxied to a moto S3 bucket) that tests may kill
    and start again on the same port, and whose S3 server they may stop and start."""

    workdir: Path
    port: int
    s3_port: int
    bucket: str
    process: subprocess.Popen | None = None
    moto: ThreadedMotoServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self, **extra: str) -> dict[str, str]:
        return {
            **QUIET,
            **FAKE_AWS,
            "MLFLOW_TRACKING_URI": self.url.replace(
                "://", f"://{TRACKING_USER}:{TRACKING_PASSWORD}@"
            ),
            "MLFLOW_EXPERIMENT_NAME": EXPERIMENT,
            **extra,
        }

    def start_s3(self) -> None:
        # moto keeps its buckets per process, so a restarted server still has the bucket.
        self.moto = ThreadedMotoServer(ip_address="127.0.0.1", port=self.s3_port, verbose=False)
        self.moto.start()

    def stop_s3(self) -> None:
        if self.moto is not None:
            self.moto.stop()
            self.moto = None

    def start(self) -> None:
        log = self.workdir / "mlflow-server.log"
        env = {
            **os.environ,
            **QUIET,
            **FAKE_AWS,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        self.process = subprocess.Popen(
            [
                BIN / "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.workdir / 'mlflow.db'}",
                "--artifacts-destination",
                f"s3://{self.bucket}/mlflow",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            cwd=self.workdir,
            env=env,
            stdout=log.open("a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _wait_until_healthy(f"{self.url}/health", self.process, log, seconds=90)

    def kill(self) -> None:
        """SIGKILL, as a crashed or preempted server: no goodbye to its clients."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.reap()

    def reap(self) -> None:
        if self.process is not None:
            self.process.wait(timeout=30)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ensure_running(self) -> None:
        if self.moto is None:
            self.start_s3()
        if not self.running():
            self.start()

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.url)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("outage-server")
    s3_port = free_port()
    killable = KillableServer(workdir, free_port(), s3_port, f"iagn-outage-{s3_port}")
    killable.start_s3()
    boto3.client("s3", endpoint_url=killable.s3_endpoint, **_boto_credentials()).create_bucket(
        Bucket=killable.bucket
    )
    killable.start()
    yield killable
    if killable.process is not None:
        stop_group(killable.process)
    killable.stop_s3()


@pytest.fixture
def tracked_here(server, monkeypatch):
    """Track into the killable server from this process (restored after the test)."""
    server.ensure_running()
    for name in (
        tracking.ENV_PARENT_RUN,
        tracking.ENV_PIPELINE_RUN,
        provenance.ENV_KFP_RUN,
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        *tracking.HTTP_SETTINGS,
    ):
        monkeypatch.setenv(name, "x")  # so that monkeypatch restores the state before
        monkeypatch.delenv(name)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} CPUs"


# --- a server killed while a stage trains -------------------------------------------------------

# Runs `iagn` with StepRun.log_epoch wrapped: it says when each epoch's logging starts and
# ends, and kills the server (its process group) right after epoch 1 was logged.
DRIVER = """
import os, signal, sys, time
from iagn import cli
from iagn.tracking.step import StepRun

original = StepRun.log_epoch

def log_epoch(self, epoch, record):
    started = time.monotonic()
    print(f"outage-test: epoch {epoch} logging starts", file=sys.stderr, flush=True)
    original(self, epoch, record)
    took = time.monotonic() - started
    print(f"outage-test: epoch {epoch} logging took {took:.2f} s", file=sys.stderr, flush=True)
    if epoch == 1:
        os.killpg(int(os.environ["OUTAGE_SERVER_PGID"]), signal.SIGKILL)
        print("outage-test: server killed", file=sys.stderr, flush=True)

StepRun.log_epoch = log_epoch
sys.exit(cli.main(sys.argv[1:]))
"""


def run_stamped(args: list, cwd: Path, env: dict) -> tuple[int, list[tuple[float, str]], str]:
    """Run a command; (exit code, stderr lines with the time each arrived, stdout)."""
    process = subprocess.Popen(
        [str(a) for a in args],
        cwd=cwd,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append((time.monotonic(), line.rstrip("\n")))

    reader = threading.Thread(target=read)
    reader.start()
    stdout = process.stdout.read() if process.stdout else ""
    code = process.wait(timeout=600)
    reader.join()
    return code, lines, stdout


def first(lines: list[tuple[float, str]], text: str) -> tuple[float, str]:
    found = [item for item in lines if text in item[1]]
    assert found, f"no stderr line with {text!r}:\n" + "\n".join(line for _, line in lines)
    return found[0]


@pytest.mark.fault(
    "the MLflow tracking server dies while a step trains (SIGKILL after epoch 1 of 3)",
    sees="one warning, `the MLflow tracking server ... does not answer ...`, naming the "
    "spool file; training finishes, exit 0; at the end what is missing and the `iagn "
    "tracking replay SPOOL` command that sends it",
    kept="every epoch's metrics, the tags, artifacts, dataset, model and the run's end in "
    "`<out>.mlflow-spool-<run>.jsonl` until sent; the checkpoint as always",
)
def test_a_killed_server_does_not_stop_training(server, tiny_synth, tmp_path):
    server.ensure_running()
    project = tmp_path / "project"
    project.mkdir()
    params = tiny_params(tiny_synth)
    params["stage1"]["epochs"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    (project / "driver.py").write_text(DRIVER)
    out = project / "build" / "stage1.pt"
    env = server.env(OUTAGE_SERVER_PGID=str(server.process.pid))
    args = ["train-stage", "--stage", "1", "--out", out, "--params", "params.yaml", "--quiet"]
    started = time.monotonic()
    code, lines, stdout = run_stamped([BIN / "python", "driver.py", *args], project, env)
    elapsed = time.monotonic() - started
    server.reap()
    stderr = "\n".join(line for _, line in lines)
    assert code == 0, stderr

    # Training ran all epochs; the checkpoint and the metrics files are written.
    history = json.loads(out.with_name("stage1.history.json").read_text())
    assert [record["epoch"] for record in history] == [1, 2, 3]
    assert out.is_file() and out.with_name("stage1.metrics.json").is_file()
    assert "stage 1 done" in stdout

    # One warning, naming the server (no password) and the spool.
    (path,) = out.parent.glob(spool.SPOOL_GLOB)
    assert path.name.startswith("stage1.pt.mlflow-spool-")
    killed, _ = first(lines, "outage-test: server killed")
    warned, warning = first(lines, "does not answer")
    assert f"warning: the MLflow tracking server {server.url} does not answer" in warning
    assert str(path) in warning
    assert sum("does not answer" in line and "still" not in line for _, line in lines) == 1
    assert TRACKING_PASSWORD not in stderr

    # The spool holds epochs 2 and 3 (epoch 1 reached the server), with their steps and
    # times, the model-free stage's dataset and tags, and the run's end.
    records = spool.read_spool(path)
    header = records[0]
    assert header["op"] == "run" and header["uri"] == server.url
    assert header["step"] == "train-stage-1"
    steps = {r["step"] for r in records if r["op"] == "metrics"}
    assert {2, 3} <= steps and 1 not in steps
    epoch3 = next(r for r in records if r["op"] == "metrics" and r["step"] == 3)
    assert epoch3["metrics"]["loss"] == pytest.approx(history[2]["loss"])
    assert any(r["op"] == "dataset" for r in records)
    (end,) = [r for r in records if r["op"] == "end"]
    assert end["status"] == "FINISHED"

    # The final message: what was not sent, where it is, the command that sends it.
    final, message = first(lines, "still does not answer")
    assert "metrics of epochs 2-3" in stderr and f"iagn tracking replay {path}" in stderr
    assert "the run's end (FINISHED)" in message
    took = [first(lines, f"epoch {epoch} logging took")[1].split()[-2] for epoch in (2, 3)]
    print(
        f"\n[outage] {machine()}: server killed -> warning {warned - killed:.2f} s; logging "
        f"epochs 2 and 3 took {took[0]} s and {took[1]} s; kill -> final message "
        f"{final - killed:.2f} s; the whole command {elapsed:.1f} s"
    )

    # Still down: replay keeps everything and says so (exit code 2).
    down = iagn("tracking", "replay", path, cwd=project, env=env, check=False)
    assert down.returncode == 2, down.stderr
    assert f"the MLflow tracking server {server.url} does not answer" in down.stderr
    assert "the rest is kept in" in down.stderr and path.is_file()

    # The server is back (same database, same port): replay sends it all and removes it.
    server.start()
    sent = iagn("tracking", "replay", out.parent, cwd=project, env=env)
    assert header["run_id"] in sent.stdout and "metrics of epochs 2-3" in sent.stdout
    assert not path.exists()
    client = server.client()
    run = client.get_run(header["run_id"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    assert run.data.metrics["val_acc"] == pytest.approx(history[2]["val_acc"])
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.TAG_OUTCOME] == "succeeded"
    assert run.data.tags[tracking.TAG_DATA_DIGEST]
    assert len(run.inputs.dataset_inputs) == 1


# --- the S3 store behind the server stopped while a step logs artifacts ------------------------


@pytest.mark.fault(
    "the tracking server's S3 artifact store stops while a step logs its artifacts",
    sees="a warning naming the artifact store behind the tracking server and the spool file; "
    "the step succeeds; `iagn tracking replay` sends the artifacts later",
    kept="the step's outputs; the artifacts to send, in the spool",
)
def test_a_stopped_artifact_store_does_not_stop_a_step(
    server, tracked_here, tiny_synth, tmp_path, monkeypatch, capsys
):
    from mlflow_server import pipeline_params

    said: list[tuple[float, str]] = []
    say = spool._say
    monkeypatch.setattr(
        spool, "_say", lambda message: (said.append((time.monotonic(), message)), say(message))
    )
    stopped: list[float] = []
    log_artifact = StepRun.log_artifact

    def stop_s3_first(self, path, artifact_path=None):
        if not stopped:
            server.stop_s3()
            stopped.append(time.monotonic())
        log_artifact(self, path, artifact_path)

    monkeypatch.setattr(StepRun, "log_artifact", stop_s3_first)
    out = tmp_path / "validate"
    report = runner.validate(tiny_synth, pipeline_params(tiny_synth), out)
    assert report.success and (out / "validation.json").is_file()

    (path,) = tmp_path.glob(spool.SPOOL_GLOB)
    assert path.name.startswith("validate.mlflow-spool-")
    warned, warning = next((t, m) for t, m in said if "does not answer" in m)
    assert f"the artifact store behind the MLflow tracking server {server.url}" in warning
    records = spool.read_spool(path)
    artifacts = [Path(r["path"]) for r in records if r["op"] == "artifact"]
    assert {p.name for p in artifacts} == {"validation.json", "summary.md", "data_docs"}
    assert all(p.is_absolute() for p in artifacts)
    assert [r["status"] for r in records if r["op"] == "end"] == ["FINISHED"]
    assert f"iagn tracking replay {path}" in capsys.readouterr().err
    print(
        f"\n[outage] {machine()}: S3 stopped -> warning {warned - stopped[0]:.2f} s; "
        f"S3 stopped -> step done {said[-1][0] - stopped[0]:.2f} s"
    )

    server.start_s3()
    assert cli.main(["tracking", "replay", str(path)]) == 0
    assert not path.exists()
    run_id = records[0]["run_id"]
    client = server.client()
    listed = {item.path for item in client.list_artifacts(run_id)}
    assert {"validation.json", "summary.md", "data_docs"} <= listed
    assert "index.html" in {Path(i.path).name for i in client.list_artifacts(run_id, "data_docs")}
    assert client.get_run(run_id).info.status == "FINISHED"


# --- back while the step still runs; user errors are not outages -------------------------------


def test_the_step_sends_what_it_kept_when_the_server_answers_again(
    server, tracked_here, monkeypatch, capsys
):
    monkeypatch.setattr(spool, "PROBE_INTERVAL", 0.0)  # probe at every call
    with tracking.step_run("train-stage-2", output=server.workdir / "s2.pt") as run:
        run.log_epoch(1, {"epoch": 1, "loss": 1.0})
        server.kill()
        run.log_epoch(2, {"epoch": 2, "loss": 0.5})
        assert run.spool is not None and run.spool.is_file()
        server.start()
        run.log_epoch(3, {"epoch": 3, "loss": 0.25})
        assert not run.spool.exists()
    err = capsys.readouterr().err
    assert f"the MLflow tracking server {server.url} answers again" in err
    assert "still does not answer" not in err
    history = server.client().get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert server.client().get_run(run.run_id).info.status == "FINISHED"


def test_user_errors_are_not_taken_for_outages(server, tracked_here):
    with pytest.raises(IagnError, match="MLflow tracking at"), tracking.step_run("x") as run:
        server.client().delete_run(run.run_id)
        run.log_metrics({"loss": 1.0}, step=1)
    assert run.spool is not None and not run.spool.exists()


def test_what_counts_as_an_outage():
    from botocore.exceptions import ClientError, EndpointConnectionError
    from mlflow.exceptions import MlflowException, RestException
    from requests.exceptions import ConnectionError, ReadTimeout, RetryError

    def wrapped(cause: BaseException, url: str = "/api/2.0/mlflow/runs/log-batch"):
        try:
            try:
                raise cause
            except Exception as error:
                # As MLflow does (rest_utils.http_request): the cause only as the context.
                raise MlflowException(f"API request to http://h:1{url} failed: {error}")  # noqa: B904
        except MlflowException as outer:
            return outer

    refused = ConnectionError("HTTPConnectionPool(host='h', port=1): Connection refused")
    assert spool.outage(wrapped(refused)) == ("server", "Connection refused")
    assert spool.outage(wrapped(ReadTimeout("read timed out")))[0] == "server"
    assert spool.outage(wrapped(RetryError("too many 503 error responses")))[1] == "HTTP 503"
    assert spool.outage(wrapped(RetryError("too many 500 error responses"))) is None
    artifact = wrapped(
        RetryError("/api/2.0/mlflow-artifacts/x (too many 500 error responses)"),
        "/api/2.0/mlflow-artifacts/artifacts/x",
    )
    assert spool.outage(artifact)[0] == "artifacts"
    assert spool.outage(EndpointConnectionError(endpoint_url="http://s3:9"))[0] == "s3"

    def s3_error(status: int, code: str) -> ClientError:
        answer = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return ClientError(answer, "PutObject")

    assert spool.outage(s3_error(503, "SlowDown"))[0] == "s3"
    assert spool.outage(s3_error(403, "AccessDenied")) is None
    deleted = RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no run"})
    assert spool.outage(deleted) is None
    assert spool.outage(ValueError("invalid metric")) is None
    secret = ConnectionError("HTTPConnectionPool(host='h'): http://u:pw@h:1 refused")
    assert "pw" not in spool.outage(secret)[1]


def test_http_limits_lower_mlflows_settings_for_a_call_only(monkeypatch):
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    with spool.http_limits(spool.LIVE_TIMEOUT, spool.LIVE_RETRIES):
        assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == spool.LIVE_TIMEOUT
        assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == spool.LIVE_RETRIES
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 15
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # never raised above the user's
    with spool.http_limits(spool.LIVE_TIMEOUT, 0):
        assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 1
        assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 0
    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 2
    assert spool.describe(
        [
            {"op": "metrics", "metrics": {"a": 1, "b": 2}, "step": 2},
            {"op": "metrics", "metrics": {"a": 1}, "step": 3},
            {"op": "metrics", "metrics": {"a": 1}, "step": 5},
            {"op": "artifact", "path": "/x/summary.md"},
            {"op": "end", "status": "FAILED"},
        ]
    ) == ("metrics of epochs 2-3, 5 (4 values), 1 artifact (summary.md), the run's end (FAILED)")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-s"]))
