"""Benchmark: `iagn serve` under load: latency, throughput, errors and the server's memory.

The model: the smoke configuration (configs/smoke.yaml over params.yaml: 4 classes x 8
synthetic images at 64 px, one epoch per stage) trained here, stages 1-3 and the distilled
student (the model the pipeline registers), logged with iagn.serving.log_model and
registered as `iagn@champion` in an embedded MLflow store of its own. `--checkpoint` serves
a given checkpoint instead (the tests use an untrained one). The trained checkpoint is kept
in the benchmark cache (IAGN_BENCH_CACHE, default /tmp/iagn-bench) for the next run.

The server: `iagn serve` with its defaults (one worker, 16 MiB body limit) in a process of
its own on 127.0.0.1, on the same machine as the clients. The load, per payload (an "arm"):
`--clients` threads, each with its own keep-alive connection, send `--requests` requests in
all, one image per request, after one warm-up request per client (not counted):

* synth-64px-1-client: a JPEG of the synthetic dataset (the images the model was trained
  on) from one client, `--requests` / 8: the time a request takes without queueing;
* synth-64px: the same from all clients;
* photo-500x375: the same image scaled to 500 x 375 (a CUB-200 photo's size), JPEG;
* bomb-20000px: a 48 KB PNG that declares 20000 x 20000 pixels: refused with 400 from its
  header (the expected answer), at `--requests` / 4.

Latency: from sending a request to having read the whole answer; p50, p95 and max over the
arm's requests. Throughput: requests / the arm's wall time. Errors: answers other than the
expected status, and requests that failed (connection refused or reset, timeout). Memory:
the server's resident memory before the arm and its peak during it (the kernel's high-water
mark, reset at the arm's start). Results: bench/results/serving.md and .json.

    .venv/bin/python -m bench.serving_load [--requests 400] [--clients 8] [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import CACHE, REPO, machine, machine_line, markdown_table, write_results
from iagn.params import load_params
from iagn.serving import DEFAULT_MAX_BODY_MB

BIN = Path(sys.executable).parent
QUIET = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
SMOKE = "params.yaml + configs/smoke.yaml"
PRECISION = "fp32"  # what iagn.inference's predictor runs a served model in


# --- the model --------------------------------------------------------------------------------


def smoke_params() -> dict:
    return load_params(REPO / "params.yaml", REPO / "configs" / "smoke.yaml")


def trained_student(params: dict) -> Path:
    """The smoke configuration's student: stages 1-3 and distillation, cached."""
    from bench.common import synthetic_dataset
    from iagn.steps import distill, train_stage

    out = CACHE / "serving-model"
    student = out / "student.pt"
    if student.is_file():
        return student
    data = synthetic_dataset(params)
    init = None
    for stage in (1, 2, 3):
        train_stage.run(stage, data, params, out / f"s{stage}.pt", init, quiet=True)
        init = out / f"s{stage}.pt"
    distill.run(init, data, params, student, quiet=True)
    return student


def register(checkpoint: Path, store: Path) -> tuple[str, dict]:
    """Log and register `checkpoint` as iagn@champion in `store`/mlflow.db; the URI and what
    the results say about the model."""
    import mlflow

    from iagn import serving
    from iagn.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("serving-load", (store / "mlruns").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = serving.log_model(loaded, name="student")
    version = mlflow.register_model(info.model_uri, "iagn")
    client.set_registered_model_alias("iagn", "champion", version.version)
    config, data = loaded["model_config"], loaded["data"]
    about = {
        "kind": loaded["kind"],
        "backbone": config.get("backbone"),
        "classes": len(data["class_names"]),
        "resize": int(data["resize"]),
        "crop": int(data["crop"]),
        "max_pixels": data.get("max_pixels"),
        "checkpoint": str(checkpoint),
        "precision": PRECISION,
    }
    return "models:/iagn@champion", about


# --- the payloads -----------------------------------------------------------------------------


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height black pixels, a few tens of KB."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", data),
            _png_chunk(b"IEND", b""),
        ]
    )


def payloads(params: dict) -> list[dict]:
    """The arms: name, JSON body, expected status, what the image is."""
    from bench.common import synthetic_dataset

    root = synthetic_dataset(params)
    path = sorted((root / "images").rglob("*.jpg"))[0]
    image = Image.open(path).convert("RGB")
    photo = _jpeg(image.resize((500, 375), Image.Resampling.BICUBIC))
    bomb = bomb_png(20000, 20000)

    def body(data: bytes) -> bytes:
        encoded = base64.b64encode(data).decode()
        return json.dumps({"dataframe_records": [{"image": encoded}]}).encode()

    synth = f"synthetic JPEG, {image.width} x {image.height} px, {path.stat().st_size:,} bytes"
    return [
        dict(name="synth-64px-1-client", body=body(path.read_bytes()), status=200, share=0.125,
             clients=1, image=f"{synth}, from one client"),
        dict(name="synth-64px", body=body(path.read_bytes()), status=200, share=1.0,
             image=synth),
        dict(name="photo-500x375", body=body(photo), status=200, share=1.0,
             image=f"JPEG, 500 x 375 px, {len(photo):,} bytes"),
        dict(name="bomb-20000px", body=body(bomb), status=400, share=0.25,
             image=f"PNG declaring 20000 x 20000 px, {len(bomb):,} bytes"),
    ]  # fmt: skip


# --- the server -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(uri: str, store: Path, log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, **QUIET, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"}
    with log.open("w") as output:
        process = subprocess.Popen(
            [BIN / "iagn", "serve", "--model", uri, "--host", "127.0.0.1", "--port", str(port)],
            cwd=store,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 300
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"iagn serve exited ({process.returncode}):\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process, port
        except OSError:
            if time.monotonic() > deadline:
                stop_server(process)
                raise RuntimeError(f"iagn serve did not start:\n{log.read_text()}") from None
            time.sleep(0.3)


def stop_server(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def memory_mb(pid: int, field: str) -> float:
    """VmRSS (now) or VmHWM (the peak) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --- the load ---------------------------------------------------------------------------------


def _client(port: int, body: bytes, count: int, expected: int, out: list, start: threading.Barrier):
    """One client: a keep-alive connection, a warm-up request, then `count` timed requests."""
    headers = {"Content-Type": "application/json"}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def send() -> int:
        nonlocal connection
        try:
            connection.request("POST", "/invocations", body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            if response.getheader("Connection", "").lower() == "close":
                connection.close()
            return response.status
        except (OSError, http.client.HTTPException):
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            return -1

    send()  # warm-up: the connection, the first forward pass
    start.wait()
    for _ in range(count):
        began = time.perf_counter()
        status = send()
        out.append((time.perf_counter() - began, status, status == expected))
    connection.close()


def run_arm(port: int, pid: int, arm: dict, requests: int, clients: int) -> dict:
    clients = arm.get("clients", clients)
    total = max(clients, round(requests * arm["share"]))
    counts = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]
    results: list[tuple[float, int, bool]] = []
    start = threading.Barrier(clients + 1)
    threads = [
        threading.Thread(target=_client, args=(port, arm["body"], n, arm["status"], results, start))
        for n in counts
    ]
    for thread in threads:
        thread.start()
    start.wait()  # every client has warmed up
    load = os.getloadavg()[0]  # other work on the machine shows in the latencies
    rss_before = memory_mb(pid, "VmRSS")
    peak_known = reset_peak(pid)
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    latencies = np.array([seconds for seconds, _, _ in results]) * 1000
    statuses: dict[str, int] = {}
    for _, status, _ in results:
        key = str(status) if status > 0 else "failed"
        statuses[key] = statuses.get(key, 0) + 1
    return {
        "image": arm["image"],
        "body_bytes": len(arm["body"]),
        "expected_status": arm["status"],
        "requests": len(results),
        "clients": clients,
        "statuses": statuses,
        "errors": sum(1 for _, _, ok in results if not ok),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p95_ms": round(float(np.percentile(latencies, 95)), 1),
        "max_ms": round(float(latencies.max()), 1),
        "mean_ms": round(float(latencies.mean()), 1),
        "throughput_rps": round(len(results) / wall, 1),
        "wall_s": round(wall, 2),
        "load_average_1min": round(load, 2),
        "server_rss_mb_before": round(rss_before, 1),
        "server_peak_mb": round(memory_mb(pid, "VmHWM"), 1) if peak_known else None,
    }


def markdown(data: dict) -> str:
    settings, model = data["settings"], data["model"]
    rows = []
    for name, arm in data["arms"].items():
        peak = arm["server_peak_mb"]
        rows.append(
            [
                name,
                str(arm["clients"]),
                str(arm["requests"]),
                str(arm["expected_status"]),
                f"{arm['p50_ms']:.1f}",
                f"{arm['p95_ms']:.1f}",
                f"{arm['max_ms']:.1f}",
                f"{arm['throughput_rps']:.1f}",
                str(arm["errors"]),
                f"{arm['load_average_1min']:.1f}",
                f"{arm['server_rss_mb_before']:.0f}",
                "n/a" if peak is None else f"{peak:.0f}",
            ]
        )
    table = markdown_table(
        [
            "payload",
            "clients",
            "requests",
            "expected",
            "p50 (ms)",
            "p95 (ms)",
            "max (ms)",
            "requests/s",
            "errors",
            "load avg",
            "server RSS before (MB)",
            "server peak (MB)",
        ],
        ["l", *["r"] * 11],
        rows,
    )
    images = [f"- {name}: {arm['image']}" for name, arm in data["arms"].items()]
    lines = [
        "# Serving under load (`iagn serve`)",
        "",
        machine_line(data["machine"]),
        f"Model: the {model['kind']} ({model['backbone']}, {model['classes']} classes, "
        f"resize {model['resize']} / crop {model['crop']} px), {model['source']}; served with "
        f"`iagn serve` defaults (1 worker, {settings['max_body_mb']:g} MiB body limit) on the "
        f"CPU in {model['precision']}, server and clients on this machine.",
        f"Load: {settings['clients']} clients, each with a keep-alive connection, one image "
        f"per request, {settings['requests']} requests per payload (a quarter of that for the "
        "bomb, an eighth from one client) after one warm-up request per client. Errors: "
        "answers other than the expected status, and failed requests. Load avg: the "
        "machine's 1-minute load average as the arm started (2 cores: above 2, other work "
        "was competing for them).",
        "",
        *table,
        "",
        "Payloads:",
        *images,
        "",
        "Latency is from sending a request to reading the whole answer: with several clients "
        "it includes the wait behind the others' requests (one client: the time a request "
        "itself takes). The server's peak is its resident memory's high-water mark during "
        "the arm (reset at the start of each).",
        "",
        "    .venv/bin/python -m bench.serving_load --requests "
        f"{settings['requests']} --clients {settings['clients']}",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="requests per payload")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--checkpoint", type=Path, default=None, help="serve this instead")
    args = parser.parse_args()

    params = smoke_params()
    if args.checkpoint is None:
        checkpoint = trained_student(params)
        source = f"trained here with {SMOKE} (stages 1-3, distilled)"
    else:
        checkpoint = args.checkpoint
        source = f"the given checkpoint {checkpoint.name}"
    arms = payloads(params)
    with tempfile.TemporaryDirectory(prefix="iagn-serving-load-") as tmp:
        store = Path(tmp)
        saved_uri = os.environ.get("MLFLOW_TRACKING_URI")
        try:
            uri, model = register(checkpoint, store)
        finally:
            if saved_uri is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = saved_uri
        model["source"] = source
        process, port = start_server(uri, store, store / "serve.log")
        host = machine()
        print(f"serving on {host['cpu']} ({host['threads']} threads), {PRECISION}", flush=True)
        try:
            results = {}
            for arm in arms:
                results[arm["name"]] = run_arm(port, process.pid, arm, args.requests, args.clients)
                row = results[arm["name"]]
                print(
                    f"{arm['name']}: {row['requests']} requests, p50 {row['p50_ms']} ms, "
                    f"p95 {row['p95_ms']} ms, {row['throughput_rps']} requests/s, "
                    f"{row['errors']} errors",
                    flush=True,
                )
        finally:
            stop_server(process)
    data = {
        "machine": host,
        "model": model,
        "settings": {
            "requests": args.requests,
            "clients": args.clients,
            "workers": 1,
            "max_body_mb": DEFAULT_MAX_BODY_MB,
        },
        "arms": results,
    }
    write_results("serving", markdown(data), data)


if __name__ == "__main__":
    main()
