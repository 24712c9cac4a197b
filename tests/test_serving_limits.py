"""Serving's limits against a real `iagn serve` process: the decoded size per image (a few KB
declaring 20000 x 20000 px gets 400 and leaves the server's memory where it was), the body
size (413 before the body is read), error messages that never quote the payload, and the
README's serve commands run as written from a shell without the venv on PATH.

The served model is a real (untrained) student logged with iagn.serving.log_model and
registered as `iagn@champion` in an embedded MLflow store; its checkpoint records a pixel
limit of its own (`LIMIT`), below the default, which serving must apply.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import BIN, free_port
from mlflow_server import stop_group as stop
from PIL import Image

from iagn import serving
from iagn.data.images import DEFAULT_MAX_PIXELS
from iagn.models.student import Student, StudentConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
LIMIT = 4_000_000  # the served model's data.max_pixels
MAX_BODY_MB = 1
MARKER = "ZQX-PAYLOAD-MARKER-7731"
GROWTH_LIMIT_MB = 200
README_PORT = 5001
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


# --- payloads -------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A complete, valid 1-bit PNG of width x height black pixels: ~50 KB for 20000 x 20000
    (400 MB once decoded, 1.2 GB as RGB), written a row at a time (the test holds no image)."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", data)
        + _png_chunk(b"IEND", b"")
    )


def bomb_jpeg(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) declares width x height: the issue's 13000 x
    13000 px in a few hundred bytes."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 30)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def records(*rows: dict) -> str:
    return json.dumps({"dataframe_records": list(rows)})


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- the model and the server ---------------------------------------------------------------


def student_checkpoint(class_names: list[str], max_pixels: int | None = LIMIT) -> dict:
    """A real (untrained) student: small, and serving works on it like on a trained one."""
    config = StudentConfig(
        backbone="mobilenet_v3_small",
        num_classes=len(class_names),
        weights="none",
        class_names=class_names,
    )
    torch.manual_seed(0)
    data = {
        "digest": "0" * 64,
        "format": "imagefolder",
        "root": "data",
        "class_names": class_names,
        "resize": 72,
        "crop": 64,
    }
    if max_pixels is not None:
        data["max_pixels"] = max_pixels
    return {
        "kind": "student",
        "stage": None,
        "model_config": config.to_dict(),
        "model_state": Student(config).state_dict(),
        "data": data,
        "complete": True,
        "train_config": {"seed": 0},
    }


def register_champion(project: Path, checkpoint: dict, name: str = "iagn") -> str:
    """Log `checkpoint` as the pyfunc model into `project`/mlflow.db (the store an unset
    MLFLOW_TRACKING_URI means there) and make it `<name>@champion`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
        patch.chdir(project)
        client = mlflow.MlflowClient()
        experiment = client.create_experiment("serving", (project / "mlruns").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = serving.log_model(checkpoint, name="student")
        version = mlflow.register_model(info.model_uri, name)
        client.set_registered_model_alias(name, "champion", version.version)
    return f"models:/{name}@champion"


@pytest.fixture(scope="module")
def project(tiny_synth: Path, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("serving-limits")
    class_names = sorted(p.name for p in (tiny_synth / "images").iterdir() if p.is_dir())
    uri = register_champion(root, student_checkpoint(class_names))
    image = sorted((tiny_synth / "images").rglob("*.jpg"))[0]
    return {"root": root, "uri": uri, "class_names": class_names, "image": image}


def wait_healthy(url: str, process: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if process.poll() is not None:
            pytest.fail(f"the server exited ({process.returncode}):\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                stop(process)
                pytest.fail(f"the server did not answer within {seconds:.0f} s:\n{log.read_text()}")
            time.sleep(0.3)


@pytest.fixture(scope="module")
def server(project, tmp_path_factory):
    """`iagn serve` on the champion, a 1 MiB body limit, one process (the one measured)."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {
        **os.environ,
        **QUIET,
        "MLFLOW_TRACKING_URI": f"sqlite:///{project['root'] / 'mlflow.db'}",
    }
    args = ["serve", "--model", project["uri"], "--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as output:
        process = subprocess.Popen(
            [BIN / "iagn", *args, "--max-body-mb", str(MAX_BODY_MB)],
            cwd=project["root"],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, process, log)
    yield {"url": url, "port": port, "pid": process.pid, "log": log}
    stop(process)


def post(url: str, body: str | bytes, content_type: str = "application/json"):
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(
        f"{url}/invocations", data=data, headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def status_kb(pid: int, field: str) -> int:
    """A memory figure of /proc/<pid>/status in kB (VmRSS: now; VmHWM: the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class PeakMemory:
    """The process's peak resident memory across a block, in MB above its memory before.

    The kernel's high-water mark (VmHWM), reset at the start (`clear_refs` 5), sees every
    allocation however short; where that reset is not allowed, VmRSS sampled every 2 ms."""

    def __init__(self, pid: int):
        self.pid = pid
        self.growth_mb = float("nan")

    def __enter__(self) -> PeakMemory:
        self.before = status_kb(self.pid, "VmRSS")
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self.sampler = None
        except OSError:
            self.samples = [self.before]
            self.done = threading.Event()
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.002):
            self.samples.append(status_kb(self.pid, "VmRSS"))

    def __exit__(self, *exc) -> None:
        if self.sampler is None:
            peak = status_kb(self.pid, "VmHWM")
        else:
            self.done.set()
            self.sampler.join()
            peak = max(self.samples)
        self.growth_mb = (peak - self.before) / 1024


# --- the pyfunc model itself (no server) ----------------------------------------------------


def test_images_are_checked_against_the_given_limit_from_the_header():
    started = time.perf_counter()
    with pytest.raises(serving.InputError) as error:
        serving.decode_images({"image": [b64(bomb_png(20000, 20000))]}, max_pixels=LIMIT)
    assert time.perf_counter() - started < 5  # nothing was decoded
    message = error.value.message
    assert message.startswith("row 0: `image` (")
    assert "20000 x 20000 = 400,000,000 pixels" in message and f"{LIMIT:,}" in message
    assert "downscaled" in message
    # Under the default limit a 2100 x 2000 image passes; under the model's it does not.
    image = png(Image.new("RGB", (2100, 2000), (10, 20, 30)))
    assert serving.decode_images({"image": [b64(image)]})[0].size == (2100, 2000)
    with pytest.raises(serving.InputError, match="2100 x 2000"):
        serving.decode_images({"image": [b64(image)]}, max_pixels=LIMIT)
    with pytest.raises(serving.InputError, match="row 1: `array` is too large: 2001 x 2000"):
        serving.decode_images(
            {"array": [np.zeros((4, 4, 3)), np.zeros((2000, 2001), np.uint8)]}, max_pixels=LIMIT
        )


def test_a_request_is_checked_whole_before_anything_is_decoded(monkeypatch):
    decoded = []
    monkeypatch.setattr(serving, "open_image", lambda raw, limit: decoded.append(raw))
    good = b64(png(Image.new("RGB", (8, 8))))
    with pytest.raises(serving.InputError, match="row 2: `image`"):
        list(serving.batches({"image": [good, good, b64(bomb_png(9000, 9000))]}))
    assert decoded == []


def test_images_are_decoded_a_batch_at_a_time_within_the_pixel_limit():
    small = b64(png(Image.new("RGB", (100, 100))))  # 10,000 px
    batches = list(serving.batches({"image": [small] * 7}, max_pixels=25_000))
    assert [len(batch) for batch in batches] == [2, 2, 2, 1]
    batches = list(serving.batches({"image": [small] * 5}, max_pixels=10**9, batch_size=2))
    assert [len(batch) for batch in batches] == [2, 2, 1]


def test_arrays_go_through_the_shared_decoder_alpha_on_white():
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red under the transparent pixels ...
    rgba[:2, :, 3] = 255  # ... shows only in the opaque top half
    (image,) = serving.decode_images({"array": [rgba.tolist()]})
    pixels = np.asarray(image)
    assert (pixels[:2] == [200, 0, 0]).all() and (pixels[2:] == [255, 255, 255]).all()
    with pytest.raises(serving.InputError, match="row 0: `array` has shape \\[4, 6, 2\\]"):
        serving.decode_images({"array": [np.zeros((4, 6, 2))]})
    with pytest.raises(serving.InputError, match=r"outside 0\.\.255"):
        serving.decode_images({"array": [[[[300, 0, 0]]]]})


def test_mlflows_rewrite_of_the_message_does_not_take():
    """MLflow's scoring server sets `message` to "Failed to predict data '<input>'..."."""
    error = serving.InputError("row 0: `image` is not valid base64")
    error.message = f"Failed to predict data '{MARKER}'. \nError: {error.message}"
    assert error.message == "row 0: `image` is not valid base64"
    assert MARKER not in error.serialize_as_json()
    assert json.loads(error.serialize_as_json())["error_code"] == "INVALID_PARAMETER_VALUE"


def test_a_checkpoint_without_a_limit_is_served_with_the_default(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    uri = register_champion(root, student_checkpoint(["a", "b"], max_pixels=None), name="old")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        model = mlflow.pyfunc.load_model(uri)
    assert model.unwrap_python_model().max_pixels == DEFAULT_MAX_PIXELS
    frame = pd.DataFrame({"image": [b64(png(Image.new("RGB", (40, 30))))]})
    assert model.predict(frame)["class_name"].tolist()[0] in ("a", "b")


# --- the server -----------------------------------------------------------------------------


def test_health_and_a_prediction(server, project):
    with urllib.request.urlopen(f"{server['url']}/health", timeout=10) as response:
        assert response.status == 200
    image = project["image"]
    array = np.asarray(Image.open(image).convert("RGB")).tolist()
    status, answer = post(
        server["url"], records({"image": b64(image.read_bytes())}, {"array": array})
    )
    assert status == 200, answer
    first, second = json.loads(answer)["predictions"]
    assert first["class_name"] in project["class_names"]
    assert second["class_id"] == first["class_id"]


@pytest.mark.fault(
    "a served request whose image declares 20000 x 20000 pixels (a 48 KB PNG)",
    sees="HTTP 400: `row 0: image (48,685 bytes) is too large: 20000 x 20000 = 400,000,000 "
    "pixels, above the limit data.max_pixels = ...; send a copy downscaled ...`",
    kept="the server's memory (no pixel decoded); the server goes on serving",
)
@pytest.mark.parametrize(
    ("make", "size"),
    [(lambda: bomb_png(20000, 20000), "20000 x 20000"), (lambda: bomb_jpeg(13000, 13000), None)],
    ids=["png-20000px", "jpeg-13000px"],
)
def test_a_small_file_declaring_a_huge_image_gets_400_and_no_memory(server, make, size, capsys):
    data = make()
    assert len(data) < 100_000
    body = records({"image": b64(data)})
    with PeakMemory(server["pid"]) as memory:
        status, answer = post(server["url"], body)
    assert status == 400, answer
    message = json.loads(answer)["message"]
    assert "is too large" in message and f"data.max_pixels = {LIMIT:,}" in message, message
    assert size is None or size in message
    with capsys.disabled():
        print(
            f"\n{len(data):,} bytes declaring a huge image: HTTP {status}, the server's peak "
            f"memory +{memory.growth_mb:.1f} MB"
        )
    assert memory.growth_mb < GROWTH_LIMIT_MB
    # The server is still there and still answers.
    with urllib.request.urlopen(f"{server['url']}/health", timeout=10) as response:
        assert response.status == 200


def declare_body(port: int, size: int) -> tuple[http.client.HTTPResponse, dict]:
    """POST headers that declare a `size`-byte body, and no body: the answer to a body over
    the limit must not wait for it (sending it would race the server closing the socket)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    connection.putrequest("POST", "/invocations")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(size))
    connection.endheaders()
    response = connection.getresponse()
    return response, json.loads(response.read())


@pytest.mark.fault(
    "a request body over the server's limit (declared by Content-Length, or chunked)",
    sees="HTTP 413 REQUEST_TOO_LARGE: `the request body is ... bytes, above this server's "
    "limit of ...; send fewer or smaller images per request, or start the server with a "
    "larger --max-body-mb`",
    kept="the body is never read whole; the connection is closed; the server goes on serving",
)
def test_a_declared_body_over_the_limit_gets_413_before_it_is_sent(server):
    response, answer = declare_body(server["port"], 10**10)
    assert response.status == 413
    assert response.getheader("Connection") == "close"
    assert answer["error_code"] == "REQUEST_TOO_LARGE"
    assert "10,000,000,000 bytes" in answer["message"] and "--max-body-mb" in answer["message"]


@pytest.mark.fault(
    "a request body over the server's limit (declared by Content-Length, or chunked)",
    sees="HTTP 413 REQUEST_TOO_LARGE: `the request body is ... bytes, above this server's "
    "limit of ...; send fewer or smaller images per request, or start the server with a "
    "larger --max-body-mb`",
    kept="the body is never read whole; the connection is closed; the server goes on serving",
)
def test_a_chunked_body_gets_413_once_it_passes_the_limit(server):
    connection = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=20)
    connection.putrequest("POST", "/invocations")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    chunk = b"7" * 65536
    sent = 0
    with contextlib.suppress(OSError):  # the server may close before all is sent
        while sent <= MAX_BODY_MB * 2**20 + len(chunk):
            connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
    # The body never ends (no last chunk): a 413 now proves the server stopped reading.
    response = connection.getresponse()
    answer = json.loads(response.read())
    assert response.status == 413, answer
    assert "(chunked)" in answer["message"]
    # A body within the limit still gets through the same middleware.
    status, _ = post(server["url"], records({"image": b64(png(Image.new("RGB", (8, 8))))}))
    assert status == 200


def _bad_bodies() -> list[tuple[str, str | bytes, str]]:
    m = MARKER
    return [
        ("not-json", f"not json {m}", "not valid JSON"),
        ("not-utf8", b"\xff\xfe" + m.encode(), "not UTF-8"),
        ("unknown-key", json.dumps({m: [1]}), "exactly one of the keys"),
        ("list", json.dumps([m]), "exactly one of the keys"),
        ("records-not-list", json.dumps({"dataframe_records": m}), "could not be read"),
        (
            "split-ragged",
            json.dumps({"dataframe_split": {"columns": ["image"], "data": [[m, 1]]}}),
            "could not be read",
        ),
        ("column-name", records({m: "x"}), "none of them `image` or `array`"),
        ("image-not-base64", records({"image": m}), "row 0: `image` is not valid base64"),
        ("image-not-image", records({"image": b64(m.encode() * 4)}), "does not decode"),
        ("image-a-number", records({"image": 5}), "must be a base64 string"),
        ("image-a-list", records({"image": [m, m]}), "must be a base64 string"),
        ("array-text", records({"array": m}), "row 0: `array` is not a numeric array"),
        ("array-ragged", records({"array": [[m], [1, 2]]}), "row 0: `array` is not a numeric"),
        ("array-range", records({"array": [[[300, 0, 0]]]}), "0..255"),
        ("both", records({"image": m, "array": [[1]]}), "exactly one of `image` or `array`"),
        ("inputs", json.dumps({"inputs": {"image": [m]}}), "not valid base64"),
        ("instances", json.dumps({"instances": [m]}), "none of them"),
    ]


@pytest.mark.fault(
    "a served request with bad input: no `image` or `array`, bad base64, bytes that are not "
    "an image, an array of the wrong shape, a body that is not JSON, a wrong content type",
    sees="HTTP 400 (415 for the content type) with the row, the column and what to send; no "
    "stack trace, and the payload is never quoted back",
    kept="the server goes on serving",
)
@pytest.mark.parametrize(
    ("body", "expected"), [case[1:] for case in _bad_bodies()], ids=[c[0] for c in _bad_bodies()]
)
def test_error_messages_say_what_is_wrong_and_never_quote_the_payload(server, body, expected):
    status, answer = post(server["url"], body)
    assert status == 400, answer
    assert MARKER not in answer
    assert "Traceback" not in answer and "stack_trace" not in answer
    assert expected in json.loads(answer)["message"], answer


@pytest.mark.fault(
    "a served request with bad input: no `image` or `array`, bad base64, bytes that are not "
    "an image, an array of the wrong shape, a body that is not JSON, a wrong content type",
    sees="HTTP 400 (415 for the content type) with the row, the column and what to send; no "
    "stack trace, and the payload is never quoted back",
    kept="the server goes on serving",
)
def test_an_unsupported_content_type_is_not_quoted_back(server):
    status, answer = post(server["url"], "x", content_type=f"text/{MARKER}")
    assert status == 415 and MARKER not in answer and "application/json" in answer


def test_worker_processes_serve_with_the_same_limits(project, tmp_path):
    """--workers 2: each worker imports the installed iagn (not the model's bundled copy of
    the version that logged it) and serves behind the same body limit and pixel limit."""
    port = free_port()
    log = tmp_path / "serve.log"
    env = {
        **os.environ,
        **QUIET,
        "MLFLOW_TRACKING_URI": f"sqlite:///{project['root'] / 'mlflow.db'}",
    }
    args = ["serve", "--model", project["uri"], "--port", str(port), "--workers", "2"]
    with log.open("w") as output:
        process = subprocess.Popen(
            [BIN / "iagn", *args, "--max-body-mb", str(MAX_BODY_MB)],
            cwd=project["root"],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log)
        image = b64(project["image"].read_bytes())
        assert post(url, records({"image": image}))[0] == 200
        status, answer = post(url, records({"image": b64(bomb_png(3000, 3000))}))
        assert status == 400 and f"data.max_pixels = {LIMIT:,}" in answer, answer
        response, answer = declare_body(port, MAX_BODY_MB * 2**20 + 1)
        assert response.status == 413, answer
    finally:
        stop(process)
    assert log.read_text().count("Application startup complete") == 2, log.read_text()


# --- the README's commands, as written --------------------------------------------------------


def readme_commands() -> tuple[list[str], list[str]]:
    """(server commands, client commands) of the README's "Serving the champion" part."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("**Serving the champion") : text.index("**Comparing runs")]
    servers, clients = [], []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for command in block.replace("\\\n", "").splitlines():
            command = command.strip()
            if not command or command.startswith("#"):
                continue
            (servers if " serve " in command else clients).append(command)
    return servers, clients


def fresh_shell(command: str, cwd: Path, **popen) -> subprocess.Popen:
    """`command` in a login-less shell whose PATH has no venv (what a new terminal has)."""
    env = ["env", "-i", "PATH=/usr/bin:/bin", f"HOME={os.environ.get('HOME', '/tmp')}"]
    return subprocess.Popen([*env, "bash", "-c", command], cwd=cwd, **popen)


def test_the_readme_serve_commands_work_as_written_from_a_fresh_shell(project, tmp_path):
    servers, clients = readme_commands()
    assert len(servers) == 2 and any("iagn serve" in c for c in servers), servers
    assert any("mlflow models serve" in c for c in servers), servers
    assert len(clients) == 1 and clients[0].startswith("curl "), clients
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", README_PORT)) == 0:
            pytest.skip(f"port {README_PORT} (the README's) is in use on this machine")
    # The README's working directory: the project with its .venv, ./mlflow.db, the image.
    root = project["root"]
    with contextlib.suppress(FileExistsError):
        (root / ".venv").symlink_to(BIN.parent)
    image = re.search(r"base64 -w0 (\S+?)\)", clients[0]).group(1)
    (root / image).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(project["image"], root / image)
    for command in servers:
        log = tmp_path / f"{command.split()[0].replace('/', '_')}.log"
        with log.open("w") as output:
            process = fresh_shell(
                command, root, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            wait_healthy(f"http://127.0.0.1:{README_PORT}", process, log)
            client = fresh_shell(clients[0], root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = client.communicate(timeout=120)
            assert client.returncode == 0, (command, err.decode())
            (prediction,) = json.loads(out)["predictions"]
            assert prediction["class_name"] in project["class_names"], (command, out)
        finally:
            stop(process)


def test_the_commands_defaults_are_servings(capsys):
    """iagn/commands/serve.py repeats them so that `iagn --help` does not import MLflow."""
    from iagn.cli import build_parser
    from iagn.commands import serve

    assert serve.DEFAULT_MAX_BODY_MB == serving.DEFAULT_MAX_BODY_MB
    assert serve.DEFAULT_LIMIT_CONCURRENCY == serving.DEFAULT_LIMIT_CONCURRENCY
    args = build_parser().parse_args(["serve"])
    assert (args.model, args.host, args.port, args.workers) == (
        "models:/iagn@champion",
        "127.0.0.1",
        5001,
        1,
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-body-mb", "0"])
    assert "expected a number > 0, got '0'" in capsys.readouterr().err
