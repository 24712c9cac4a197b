"""The component image for real: built with `make image`'s script, checked inside and layer by
layer, the whole KFP DAG run with every task in a container of it (`iagn-pipeline run-local
--runner docker`) to a registered champion, and the champion served from the image.

Needs a container engine with its Docker API (docker, or podman's `system service`):
`.ci/run` (make test) installs and configures podman (scripts/container_engine.sh). Where no
engine can run, the module is skipped with the reason, unless IAGN_REQUIRE_CONTAINERS=1
(.ci/run sets it), which turns the skip into a failure.

The image is built as `localhost/iagn:test`; with a warm layer cache (the engine's) and
pip's cache (a build cache mount) a rebuild after a code change takes seconds.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import stat
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO_ROOT, dvc_project
from helpers import BIN, free_port, run
from mlflow_server import SECRETS, STEP_RUNS, mlflow_server

__all__ = ["mlflow_server"]  # the session's MLflow server fixture, used below

pytestmark = pytest.mark.slow
IMAGE = os.environ.get("IAGN_TEST_IMAGE", "localhost/iagn:test")
BASH = "/bin/bash"
EXPERIMENT = "iagn-container"
MODEL = "iagn-container-test"
OPEN_GATE = (
    "register.gate.min_top1=0",
    "register.gate.min_pointing_game_lift=-1",
    "register.gate.max_latency_ms=60000",
)
# Paths no layer may hold: the repository, DVC's cache, MLflow stores, build outputs and
# data of the project, credentials, the CA bundle given to pip as a build secret.
FORBIDDEN = re.compile(
    r"(^|/)\.git(/|$)|(^|/)\.dvc/cache(/|$)|(^|/)mlflow\.db$|(^|/)mlruns(/|$)"
    r"|^opt/iagn/(build|data|\.dvcstore|mlartifacts)(/|$)|(^|/)\.netrc$|(^|/)\.aws/"
    r"|(^|/)\.docker/config\.json$|^run/secrets/"
)


def _engine() -> str:
    """The Docker API's URL, starting podman's service when podman can run but none answers.
    Skips (or fails under IAGN_REQUIRE_CONTAINERS=1) when no engine can run containers."""
    from iagn.errors import IagnError
    from pipeline.containers import docker_api

    try:
        return docker_api()[0]
    except IagnError as first:
        reason = str(first)
    script = [BASH, "scripts/container_engine.sh"]
    if subprocess.run([*script, "check"], cwd=REPO_ROOT, capture_output=True).returncode:
        reason = (
            "no container engine can run here (docker, or podman: `bash "
            "scripts/container_engine.sh setup` as root installs and configures it)"
        )
    else:
        started = subprocess.run([*script, "socket"], cwd=REPO_ROOT, capture_output=True, text=True)
        if started.returncode == 0:
            os.environ["DOCKER_HOST"] = "unix:///run/podman/podman.sock"
            try:
                return docker_api()[0]
            except IagnError as error:
                reason = str(error)
        else:
            reason = f"podman's Docker API did not start: {started.stderr.strip()}"
    if os.environ.get("IAGN_REQUIRE_CONTAINERS") == "1":
        pytest.fail(f"IAGN_REQUIRE_CONTAINERS=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def client():
    import docker

    base_url = _engine()
    docker_client = docker.DockerClient(base_url=base_url, timeout=600)
    yield docker_client
    docker_client.close()


@pytest.fixture(scope="module")
def image(client) -> str:
    """`make image`'s script builds the image (cached layers: seconds after a code change)."""
    started = time.monotonic()
    result = subprocess.run(
        ["bash", "scripts/build_image.sh"],
        cwd=REPO_ROOT,
        env={**os.environ, "IMAGE": IMAGE},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    print(f"image build: {time.monotonic() - started:.0f} s")
    return client.images.get(IMAGE).tags[0]


def _sh(client, image: str, script: str, **kwargs) -> str:
    output = client.containers.run(
        image, ["sh", "-c", script], remove=True, stderr=True, network_mode="host", **kwargs
    )
    return output.decode()


@pytest.mark.timeout(1800)  # the first test builds the image: minutes when nothing is cached
def test_the_image_runs_the_commands_as_a_numeric_non_root_user(client, image):
    out = _sh(
        client,
        image,
        "iagn --help >/dev/null && echo iagn-ok; iagn-pipeline --help >/dev/null && "
        "echo pipeline-ok; pip check; echo uid=$(id -u) home=$HOME; touch $HOME/x && "
        "echo home-writable; t=$(mktemp) && echo tmp-writable $t; python3 -c "
        "'import tempfile; print(\"tempdir\", tempfile.gettempdir())'; for tool in gcc cc "
        "g++ make ld; do command -v $tool >/dev/null && echo compiler $tool; done; "
        "git --version; dvc --version",
    )
    assert "iagn-ok" in out and "pipeline-ok" in out, out
    assert "No broken requirements found." in out, out
    assert "uid=10001 home=/home/iagn" in out, out
    assert "home-writable" in out and "tmp-writable /tmp/" in out, out
    assert "compiler" not in out, out
    assert "git version" in out, out
    config = client.images.get(image).attrs["Config"]
    assert config["User"] == "10001"
    assert not any(re.search(r"KEY|SECRET|TOKEN|PASSWORD", e) for e in config.get("Env") or [])


class _Chunks(io.RawIOBase):
    """A file over the Docker API's image tar stream (tarfile reads it in stream mode)."""

    def __init__(self, chunks):
        self.chunks = iter(chunks)
        self.rest = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.rest:
            try:
                self.rest = next(self.chunks)
            except StopIteration:
                return 0
        size = min(len(buffer), len(self.rest))
        buffer[:size] = self.rest[:size]
        self.rest = self.rest[size:]
        return size


def _saved_layers(client, image: str) -> list[list[str]]:
    """Each layer's paths, from the image as the Docker API saves it (a tar of layer tars):
    any engine, local or not, but it streams the whole image (gigabytes, a minute or more)."""
    layers = []
    stream = io.BufferedReader(_Chunks(client.images.get(image).save(chunk_size=1 << 20)), 1 << 20)
    with tarfile.open(fileobj=stream, mode="r|") as outer:
        for member in outer:
            if not member.isfile() or not member.name.endswith(".tar"):
                continue
            with tarfile.open(fileobj=outer.extractfile(member), mode="r|") as layer:
                layers.append([m.name for m in layer])
    return layers


def _stored_layers(client, image: str) -> list[list[str]] | None:
    """Each layer's paths, read from the engine's overlay storage on this machine: the
    directory of each layer holds exactly the files of that layer (a deleted file as a 0/0
    character device, which a saved layer calls .wh.NAME). Names only, so seconds where a
    save streams gigabytes. None where the layers are not there to read (another storage
    driver, an engine on another machine)."""
    attrs = client.images.get(image).attrs
    driver = attrs.get("GraphDriver") or {}
    data = driver.get("Data") or {}
    if driver.get("Name") not in ("overlay", "overlay2") or not data.get("UpperDir"):
        return None
    lower = data.get("LowerDir")
    dirs = [Path(d) for d in reversed(lower.split(":"))] if lower else []
    dirs.append(Path(data["UpperDir"]))
    if len(dirs) != len(attrs["RootFS"]["Layers"]) or not all(
        os.access(d, os.R_OK | os.X_OK) for d in dirs
    ):
        return None
    layers = []
    for root in dirs:
        names = []
        for folder, subdirs, files in os.walk(root):
            for name in subdirs + files:
                path = Path(folder, name)
                mode = path.lstat()
                if stat.S_ISCHR(mode.st_mode) and mode.st_rdev == 0:
                    path = path.with_name(f".wh.{name}")
                names.append(path.relative_to(root).as_posix())
        layers.append(names)
    return layers


@pytest.mark.timeout(1800)
def test_no_layer_holds_the_repository_data_stores_or_credentials(client, image):
    """Every layer, not only the final file system: a file deleted in a later layer is still
    in the image."""
    layers = _stored_layers(client, image)
    if layers is None:
        layers = _saved_layers(client, image)
    found = [
        f"layer {index}: {name}"
        for index, names in enumerate(layers, 1)
        for name in names
        if FORBIDDEN.search(name)
    ]
    assert len(layers) >= 5, "the image's layers were not found"
    assert sum(map(len, layers)) > 1000, "the layers hold next to nothing"
    assert not found, "\n".join(found[:20])


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git + DVC project with the tiny configuration, its data pushed to a folder remote
    outside the project (mounted into the containers)."""
    return dvc_project(tmp_path_factory.mktemp("container"))


@pytest.fixture(scope="module")
def container_run(image, project, mlflow_server):
    """`iagn-pipeline run-local --runner docker` once, tracking to the MLflow server."""
    started = time.monotonic()
    result = run(
        [
            BIN / "iagn-pipeline",
            "run-local",
            "--runner=docker",
            f"--image={image}",
            f"--param=model_name={MODEL}",
            f"--param=experiment={EXPERIMENT}",
            *[f"--param={item}" for item in OPEN_GATE],
        ],
        cwd=project,
        env=mlflow_server.env(EXPERIMENT),
        check=False,
        timeout=1200,
    )
    print(f"DAG in containers: {time.monotonic() - started:.0f} s")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    return result


@pytest.mark.timeout(1800)  # the build and the DAG: minutes on 2 shared cores
def test_the_dag_runs_in_containers_to_a_registered_champion(
    client, container_run, project, mlflow_server, image
):
    def client_env(tag: str) -> list[str]:
        return client.images.get(tag).attrs["Config"].get("Env") or []

    out = container_run.stdout
    assert f"every task in a container of {image}" in out
    assert "kfp.local run succeeded" in out
    assert f"registered       models:/{MODEL}@champion (version 1, student)" in out
    for secret in SECRETS:
        assert secret not in out + container_run.stderr, "a credential reached the console"
    logged = Path(re.search(r"kfp.local's full log: (\S+\.log)", out)[1])
    logged = logged if logged.is_absolute() else project / logged
    assert logged.read_text().count(f"Found image '{image}'") == 11  # every task, no pull

    tracking = mlflow_server.client()
    experiment = tracking.get_experiment_by_name(EXPERIMENT)
    runs = tracking.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("iagn.role") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["iagn.outcome"] == "succeeded"
    steps = {
        r.info.run_name: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(steps) == STEP_RUNS
    assert {r.info.status for r in steps.values()} == {"FINISHED"}
    # The image's commit (make image's IAGN_GIT_COMMIT): a container has no checkout to read.
    env = dict(e.split("=", 1) for e in client_env(image))
    assert re.fullmatch(r"[0-9a-f]{40}", env["IAGN_GIT_COMMIT"])
    assert steps["distill"].data.tags["iagn.git_commit"] == env["IAGN_GIT_COMMIT"]
    assert steps["train-stage-1"].data.tags["iagn.dvc_data_version"].endswith(".dir")
    version = tracking.get_model_version_by_alias(MODEL, "champion")
    assert version.run_id == steps["distill"].info.run_id

    # The outputs were written by the image's user, in the mounted pipeline root.
    (run_dir,) = (project / "build" / "kfp").glob("iagn-*")
    assert (run_dir / "fetch-data" / "dataset" / "images.txt").stat().st_uid == 10001
    assert (run_dir / "fetch-data").stat().st_uid == 10001


@pytest.mark.timeout(1800)
def test_the_image_serves_the_champion(client, image, container_run, project, mlflow_server):
    """`mlflow models serve` in a container of the image (the documented command), a real
    image over 127.0.0.1."""
    port = free_port()
    env = mlflow_server.env(EXPERIMENT)
    container = client.containers.run(
        image,
        [
            "mlflow",
            "models",
            "serve",
            "-m",
            f"models:/{MODEL}@champion",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        detach=True,
        network_mode="host",
        environment=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            container.reload()
            assert container.status in ("created", "running"), container.logs().decode()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, container.logs().decode()[-3000:]
                time.sleep(1)
        path = sorted((project / "data" / "synth").rglob("*.jpg"))[0]
        body = json.dumps(
            {"dataframe_records": [{"image": base64.b64encode(path.read_bytes()).decode()}]}
        ).encode()
        request = urllib.request.Request(
            f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        (prediction,) = answer["predictions"]
        assert 0.0 < prediction["probability"] <= 1.0
        assert len(prediction["top5"]) == 4  # the tiny dataset's 4 classes
        logs = container.logs().decode()
        for secret in SECRETS:
            assert secret not in logs, "a credential reached the server's log"
    finally:
        container.remove(force=True)


@pytest.mark.timeout(900)
def test_a_failing_task_fails_the_run_in_containers(image, project, tmp_path):
    """kfp.local's Docker runner took every failing container for a success (auto_remove);
    run-local's Docker API pass-through keeps the exit code. Without MLFLOW_TRACKING_URI the
    containers track to a SQLite store in the pipeline root, where the exit handler marks
    the parent run FAILED."""
    import mlflow

    root = tmp_path / "kfp"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    result = subprocess.run(
        [
            str(BIN / "iagn-pipeline"),
            "run-local",
            "--runner=docker",
            f"--image={image}",
            "--param=data_rev=no-such-branch",
            f"--pipeline-root={root}",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert re.search(r"^  FAILURE +resolve-data-revision ", out, re.MULTILINE), out
    assert re.search(r"^  SUCCESS +record-outcome ", out, re.MULTILINE), out
    assert "revision 'no-such-branch' is not in the git repository" in out
    assert "Found image" not in out  # kfp.local's line, in the log only
    store = f"sqlite:///{root / 'mlflow' / 'mlflow.db'}"
    assert f"the containers track to {store}" in out
    client = mlflow.MlflowClient(store)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, max_results=10)
    (parent,) = [r for r in runs if r.data.tags.get("iagn.role") == "pipeline"]
    assert parent.info.status == "FAILED"
    assert parent.data.tags["iagn.kfp_failed_task"]
