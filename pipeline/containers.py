"""`iagn-pipeline run-local --runner docker`: every task in the component image.

kfp.local's DockerRunner starts each task as a container of the image through the Docker
API (Docker's daemon, or `podman system service`), mounts the pipeline root at the same
path and reads the exit code. What it cannot do by itself, done here instead:

* The image. The compiled tasks take their image from the `image` pipeline parameter, a
  placeholder that kfp.local does not resolve (it would try to pull the placeholder), so
  the built pipeline's executors are given the image's tag itself; and kfp.local pulls any
  image it does not find among the engine's tags, so the tag is checked (and spelled as the
  engine lists it: podman says `localhost/iagn:dev` for `iagn:dev`) before the run.
* What a cluster provides. The pipeline root is written by the image's user (10001), as a
  pod writes to the artifact store: it is made writable for it. The project is mounted
  read-only at its own path and fetched as a cluster fetches it: the commit (`data_rev`,
  default HEAD) with git and `dvc get` from its default DVC remote, which is mounted
  read-only at its own path when it is a folder. Credentials and MLflow settings of this
  environment become the containers' environment (as the Kubernetes secret does on a
  cluster), never a pipeline parameter. With no MLFLOW_TRACKING_URI, runs go to a SQLite
  store in `<pipeline root>/mlflow` (a mounted volume); a tracking server on this machine is
  reached over the host's network.
* The exit code. kfp.local starts each container with auto_remove and asks for its exit
  code after the logs end; by then the engine has removed it, and kfp.local takes the
  "not found" for success (with podman every failing task passed). So kfp.local talks to
  the engine through `ApiProxy`, a pass-through of the Docker API on a socket of its own
  that turns auto_remove off in each container's create request; the containers (labelled
  with the pipeline run's key) are removed when the run ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from iagn.errors import IagnError
from iagn.provenance import ENV_PIPELINE_RUN
from pipeline.dag import SECRET_KEYS_OPTIONAL, SECRET_KEYS_REQUIRED

CONTAINER_USER = 10001  # the Dockerfile's numeric USER
RUN_LABEL = "iagn.pipeline_run"  # on every task's container: removed together at the end
# Where the Docker API usually is when DOCKER_HOST is unset: Docker's daemon, rootful podman
# (`systemctl start podman.socket`, scripts/container_engine.sh socket), rootless podman.
SOCKETS = (
    "/var/run/docker.sock",
    "/run/podman/podman.sock",
    "{runtime}/podman/podman.sock",
    "{runtime}/docker.sock",
)
# This environment's settings the containers get: the Kubernetes secret's keys on a cluster
# (pipeline.dag), the experiment, and what keeps the libraries quiet.
PASSED_ENV = (
    *SECRET_KEYS_REQUIRED,
    *SECRET_KEYS_OPTIONAL,
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_DISABLE_TELEMETRY",
    "DO_NOT_TRACK",
)
SETUP_HINT = (
    "install and configure podman with `bash scripts/container_engine.sh setup`, start its "
    "Docker API with `bash scripts/container_engine.sh socket` (or start the docker daemon), "
    "or set DOCKER_HOST to a Docker API socket"
)


@dataclass
class ContainerRun:
    """What the containers get besides the image: mounts, environment, user, arguments."""

    base_url: str
    engine: str
    image: str
    arguments: dict[str, Any]
    mounts: list[tuple[str, bool]] = field(default_factory=list)  # (path, read_only)
    environment: dict[str, str] = field(default_factory=dict)
    working_dir: str | None = None
    notes: list[str] = field(default_factory=list)

    def runner(self):
        """kfp.local's DockerRunner with this run's settings."""
        from docker.types import Mount
        from kfp import local

        args: dict[str, Any] = {
            "labels": {RUN_LABEL: self.environment.get(ENV_PIPELINE_RUN, "")},
            # 127.0.0.1 is this machine: an MLflow server or an S3 endpoint on it is reachable.
            "network_mode": "host",
            "user": str(CONTAINER_USER),
            "environment": dict(self.environment),
            "mounts": [
                Mount(target=path, source=path, type="bind", read_only=read_only)
                for path, read_only in self.mounts
            ],
        }
        if self.working_dir:
            args["working_dir"] = self.working_dir
        return local.DockerRunner(**args)


def _runtime_dir() -> str:
    return os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"


def docker_api() -> tuple[str, str]:
    """(base_url, engine) of the Docker API that answers: $DOCKER_HOST, else the usual
    sockets. Sets DOCKER_HOST, which kfp.local's docker client reads."""
    import docker

    given = os.environ.get("DOCKER_HOST", "").strip()
    candidates = (
        [given] if given else [f"unix://{p.format(runtime=_runtime_dir())}" for p in SOCKETS]
    )
    tried = []
    for url in candidates:
        if url.startswith("unix://") and not Path(url[len("unix://") :]).exists():
            tried.append(f"{url} (no socket)")
            continue
        try:
            client = docker.DockerClient(base_url=url, timeout=20)
            version = client.version()
            client.close()
        except Exception as exc:  # the docker package raises several kinds for a dead socket
            tried.append(f"{url} ({type(exc).__name__})")
            continue
        names = [c.get("Name", "") for c in version.get("Components", [])]
        engine = names[0] if names else "Docker"
        os.environ["DOCKER_HOST"] = url
        return url, f"{engine} {version.get('Version', '')}".strip()
    where = "DOCKER_HOST" if given else "no DOCKER_HOST; tried"
    raise IagnError(f"no Docker API answers ({where} {', '.join(tried)}): {SETUP_HINT}")


def engine_tag(base_url: str, image: str) -> str:
    """`image` as the engine lists it (kfp.local pulls an image it does not find by tag)."""
    import docker

    client = docker.DockerClient(base_url=base_url, timeout=60)
    try:
        found = client.images.get(image)
    except docker.errors.ImageNotFound:
        raise IagnError(
            f"the image {image} is not in the container engine at {base_url}: build it with "
            f"`make image IMAGE={image}` (or pass --image TAG of a built image)"
        ) from None
    finally:
        client.close()
    wanted = image if ":" in image.rsplit("/", 1)[-1] else f"{image}:latest"
    for tag in found.tags:
        if tag == wanted or tag.endswith(f"/{wanted}"):
            return tag
    return found.tags[0] if found.tags else wanted


def check_runs(base_url: str, image: str) -> None:
    """One trivial container of `image`, as the tasks will run: an engine that answers but
    cannot start containers (runtime, ulimits, storage) says so here, not as a traceback
    from inside kfp.local."""
    import docker

    client = docker.DockerClient(base_url=base_url, timeout=300)
    try:
        client.containers.run(
            image, ["true"], remove=True, network_mode="host", user=str(CONTAINER_USER)
        )
    except docker.errors.DockerException as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        raise IagnError(
            f"the container engine at {base_url} cannot run a container of {image} "
            f"({lines[-1][:300]}): {SETUP_HINT}"
        ) from None
    finally:
        client.close()


def _git(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=60
    )


def _project_revision(project: Path, data_rev: str) -> tuple[str, list[str]]:
    """The commit the containers fetch, and a note when the working copy differs from it."""
    if data_rev:
        return data_rev, []
    head = _git(["rev-parse", "HEAD"], project)
    if head.returncode != 0:
        raise IagnError(
            f"--runner docker fetches a commit of the project with git and DVC, as a cluster "
            f"does, and {project} has no commit: commit params.yaml and data.dvc "
            "(`git init && git add params.yaml data.dvc .dvc/config && git commit`), or run "
            "without --runner docker"
        )
    commit = head.stdout.strip()
    notes = []
    changed = _git(["status", "--porcelain", "--untracked-files=no"], project).stdout
    if changed.strip():
        notes.append(
            f"the containers fetch commit {commit[:12]} (HEAD) of {project}, as a cluster "
            "would: uncommitted changes are not in it (commit them, or pass --param data_rev=...)"
        )
    return commit, notes


def _dvc_remote_folder(project: Path) -> Path | None:
    """The default DVC remote when it is a folder on this machine (not s3:// etc.)."""
    from iagn.dvc_remote import configured_remote

    remote = configured_remote(project)
    if remote is None or not remote.url or "://" in remote.url:
        return None
    folder = Path(remote.url)
    if not folder.is_absolute():  # DVC reads it relative to the config's folder
        folder = project / ".dvc" / folder
    return folder.resolve()


def _writable_for_container(folder: Path) -> None:
    """The image's user writes here, as a pod writes to the pipeline's artifact store."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(folder, CONTAINER_USER, -1)
    else:  # a rootful engine's 10001 or a rootless engine's mapped one: neither is us
        folder.chmod(0o777)


def _local_store(uri: str) -> Path | None:
    """The folder of a file or SQLite MLflow store on this machine."""
    parts = urlsplit(uri)
    if parts.scheme == "sqlite" and parts.path not in ("", "/:memory:"):
        return Path(parts.path.lstrip("/") if uri.startswith("sqlite:///") else parts.path)
    if parts.scheme == "file" or (not parts.scheme and uri):
        return Path(parts.path or uri)
    return None


def prepare(image: str, pipeline_root: Path, arguments: dict[str, Any], key: str) -> ContainerRun:
    """Check the engine and the image, and say what the containers get."""
    base_url, engine = docker_api()
    tag = engine_tag(base_url, image)
    check_runs(base_url, tag)
    arguments = dict(arguments)
    run = ContainerRun(base_url, engine, tag, arguments)

    repo = str(arguments.get("data_repo") or "")
    if "://" not in repo and "@" not in repo.split("/", 1)[0]:
        project = Path(repo or ".").resolve()
        arguments["data_repo"] = str(project)
        arguments["data_rev"], notes = _project_revision(
            project, str(arguments.get("data_rev") or "")
        )
        run.notes += notes
        run.mounts.append((str(project), True))
        remote = _dvc_remote_folder(project)
        if remote is not None and not remote.is_relative_to(project):
            run.mounts.append((str(remote), True))

    env = {name: os.environ[name] for name in PASSED_ENV if os.environ.get(name)}
    env[ENV_PIPELINE_RUN] = key
    _writable_for_container(pipeline_root)
    uri = env.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        store = pipeline_root / "mlflow"
        _writable_for_container(store)
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
        run.working_dir = str(store)  # the store's default artifact root is ./mlruns
        run.notes.append(
            f"no MLFLOW_TRACKING_URI: the containers track to {env['MLFLOW_TRACKING_URI']}"
        )
    elif (folder := _local_store(uri)) is not None:
        folder = folder.resolve()
        folder = folder if folder.is_dir() else folder.parent
        run.mounts.append((str(folder), False))
        run.working_dir = str(folder)
        run.notes.append(
            f"MLflow store {folder} is mounted into the containers: the image's user "
            f"({CONTAINER_USER}) needs write access to it"
        )
    run.environment = env
    return run


def pin_image(pipeline, image: str) -> None:
    """Give every task of the built pipeline the image itself instead of the `image`
    parameter's placeholder, which kfp.local does not resolve."""
    for executor in pipeline.pipeline_spec.deployment_spec["executors"].values():
        if "container" in executor:
            executor["container"]["image"] = image


CREATE = re.compile(rb"^POST (/v[0-9.]+)?/containers/create[?\s]")


class ApiProxy:
    """The Docker API at `upstream` (unix://...) on a socket of its own, passed through
    byte for byte except a container's create request, whose HostConfig.AutoRemove is
    turned off, so that the exit code is still there when kfp.local asks for it.

    Used as a context manager: DOCKER_HOST names the proxy inside (kfp.local's client reads
    it), and on the way out the run's containers are removed and DOCKER_HOST restored.
    """

    def __init__(self, upstream: str, label: str) -> None:
        if not upstream.startswith("unix://"):
            raise IagnError(
                f"--runner docker needs the Docker API on a unix socket, not {upstream}: set "
                "DOCKER_HOST=unix:///PATH.sock"
            )
        self.upstream = upstream[len("unix://") :]
        self.label = label
        self.folder = Path(tempfile.mkdtemp(prefix="iagn-docker-api-"))
        self.path = self.folder / "docker.sock"
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._saved: str | None = None
        self._closing = threading.Event()

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    def __enter__(self) -> ApiProxy:
        self.server.bind(str(self.path))
        self.server.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()
        self._saved = os.environ.get("DOCKER_HOST")
        os.environ["DOCKER_HOST"] = self.url
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        self.server.close()
        if self._saved is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = self._saved
        self.remove_containers()
        with contextlib.suppress(OSError):
            self.path.unlink()
            self.folder.rmdir()

    def remove_containers(self) -> None:
        import docker

        client = docker.DockerClient(base_url=f"unix://{self.upstream}", timeout=120)
        try:
            for container in client.containers.list(
                all=True, filters={"label": f"{RUN_LABEL}={self.label}"}
            ):
                with contextlib.suppress(docker.errors.APIError):
                    container.remove(force=True)
        finally:
            client.close()

    # --- the pass-through ---

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(self.upstream)
        except OSError:
            client.close()
            return
        back = threading.Thread(target=self._pipe, args=(upstream, client), daemon=True)
        back.start()
        try:
            self._requests(client, upstream)
        finally:
            with contextlib.suppress(OSError):
                upstream.shutdown(socket.SHUT_WR)
            back.join(timeout=600)
            client.close()
            upstream.close()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        """Forward the client's requests one by one, rewriting container creations."""
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                data = client.recv(1 << 16)
                if not data:
                    if buffer:
                        upstream.sendall(buffer)
                    return
                buffer += data
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            lines = head.split(b"\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
                # Not what the docker package sends for these calls: pass the rest as it is.
                upstream.sendall(head + b"\r\n\r\n" + buffer)
                self._pipe(client, upstream)
                return
            length = int(headers.get(b"content-length", b"0") or 0)
            while len(buffer) < length:
                data = client.recv(1 << 16)
                if not data:
                    break
                buffer += data
            body, buffer = buffer[:length], buffer[length:]
            if CREATE.match(lines[0]) and body:
                body = self._keep_container(body)
                lines = [
                    line for line in lines if not line.lower().startswith(b"content-length:")
                ] + [b"Content-Length: " + str(len(body)).encode()]
                head = b"\r\n".join(lines)
            upstream.sendall(head + b"\r\n\r\n" + body)

    @staticmethod
    def _keep_container(body: bytes) -> bytes:
        try:
            spec = json.loads(body)
        except ValueError:
            return body
        if isinstance(spec, dict) and isinstance(spec.get("HostConfig"), dict):
            spec["HostConfig"]["AutoRemove"] = False
        return json.dumps(spec).encode()
