"""`iagn serve` and `mlflow models serve` on the registry's champion: real images in, 4xx for
bad input, no payload in any message. The limits: tests/test_serving_limits.py."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import BIN, free_port
from mlflow_server import MODEL_NAME, mlflow_server, stop_group, tracked_pipeline
from PIL import Image

from iagn import serving

__all__ = ["mlflow_server", "tracked_pipeline"]  # fixtures used by the tests below


# `iagn serve` (the README's recommended server) and `mlflow models serve`, the same model.
SERVERS = ("iagn serve", "mlflow models serve")


def server_command(server: str) -> list:
    if server == "iagn serve":
        return [BIN / "iagn", "serve", "--model", f"models:/{MODEL_NAME}@champion"]
    return [
        BIN / "mlflow",
        "models",
        "serve",
        "-m",
        f"models:/{MODEL_NAME}@champion",
        "--env-manager",
        "local",
    ]


@pytest.fixture(scope="module", params=SERVERS)
def scoring_server(request, mlflow_server, tracked_pipeline, tmp_path_factory):
    """A real scoring server process for models:/<name>@champion, CPU, this environment."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    # `mlflow models serve` starts `uvicorn` by name: the venv's bin must be on PATH.
    env = {**os.environ, **tracked_pipeline.env, "PATH": f"{BIN}:{os.environ['PATH']}"}
    process = subprocess.Popen(
        [*server_command(request.param), "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # stop_group ends its uvicorn worker too
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            pytest.fail(f"{request.param} exited:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline:
                stop_group(process)
                pytest.fail(f"{request.param} did not start:\n{log.read_text()}")
            time.sleep(0.5)
    yield url, request.param
    stop_group(process)


def post(url: str, body: bytes | str, content_type: str = "application/json"):
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(
        f"{url}/invocations", data=data, headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_a_real_image_gets_class_probability_top5_and_box(scoring_server, tracked_pipeline):
    url, _ = scoring_server
    path = sorted((tracked_pipeline.data / "images").rglob("*.jpg"))[0]
    width, height = Image.open(path).size
    payload = {"dataframe_records": [{"image": base64.b64encode(path.read_bytes()).decode()}]}
    status, answer = post(url, json.dumps(payload))
    assert status == 200, answer
    (prediction,) = answer["predictions"]
    class_names = json.loads((tracked_pipeline.path("build/eval/student/metrics.json")).read_text())
    assert prediction["class_name"] in class_names["per_class_accuracy"]
    assert 0.0 < prediction["probability"] <= 1.0
    assert len(prediction["top5"]) == 4  # 4 classes
    assert prediction["top5"][0]["class_id"] == prediction["class_id"]
    x0, y0, x1, y1 = prediction["box"]
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height

    # The same image as an RGB array, next to a second image in one request.
    array = np.asarray(Image.open(path).convert("RGB")).tolist()
    both = {"dataframe_records": [{"array": array}, payload["dataframe_records"][0]]}
    status, answer = post(url, json.dumps(both))
    assert status == 200, answer
    first, second = answer["predictions"]
    assert first["class_id"] == second["class_id"] == prediction["class_id"]
    assert first["probability"] == pytest.approx(prediction["probability"], abs=1e-3)


MARKER = "QZV-PAYLOAD-MARKER-5190"


@pytest.mark.fault(
    "a served request with bad input: no `image` or `array`, bad base64, bytes that are not "
    "an image, an array of the wrong shape, a body that is not JSON, a wrong content type",
    sees="HTTP 400 (415 for the content type) with the row, the column and what to send; no "
    "stack trace, and the payload is never quoted back",
    kept="the server goes on serving",
)
@pytest.mark.parametrize(
    ("body", "message"),
    [
        (json.dumps({"dataframe_records": [{"picture": "x"}]}), "none of them `image`"),
        (json.dumps({"dataframe_records": [{"image": "%%% not base64 %%%"}]}), "not valid base64"),
        (
            json.dumps(
                {"dataframe_records": [{"image": base64.b64encode(b"plain text").decode()}]}
            ),
            "does not decode as an image",
        ),
        (json.dumps({"dataframe_records": [{"array": [[1, 2], [3]]}]}), "`array`"),
        (json.dumps({"dataframe_records": [{"array": [[[300, 0, 0]]]}]}), "0..255"),
    ],
)
def test_bad_input_gets_a_4xx_with_a_message(scoring_server, body, message):
    url, _ = scoring_server
    status, answer = post(url, body)
    assert 400 <= status < 500, (status, answer)
    assert message in answer
    assert "Traceback" not in answer and "stack_trace" not in answer


@pytest.mark.parametrize(
    "row",
    [
        {"image": MARKER},
        {"image": base64.b64encode(MARKER.encode() * 3).decode()},
        {"array": MARKER},
        {"array": [[[MARKER, 0, 0]]]},
        {MARKER: "x"},
    ],
    ids=["image-text", "image-bytes", "array-text", "array-cell", "column-name"],
)
def test_the_models_errors_never_quote_the_payload_under_either_server(scoring_server, row):
    """MLflow's server prefixes a model's error with the input table; ours keep their message."""
    url, _ = scoring_server
    status, answer = post(url, json.dumps({"dataframe_records": [row]}))
    assert status == 400, answer
    assert MARKER not in answer and "Failed to predict data" not in answer
    assert json.loads(answer)["message"].startswith(("row 0: ", "the input has")), answer


@pytest.mark.fault(
    "a served request with bad input: no `image` or `array`, bad base64, bytes that are not "
    "an image, an array of the wrong shape, a body that is not JSON, a wrong content type",
    sees="HTTP 400 (415 for the content type) with the row, the column and what to send; no "
    "stack trace, and the payload is never quoted back",
    kept="the server goes on serving",
)
def test_a_body_that_is_not_json_is_not_quoted_back(scoring_server):
    url, server = scoring_server
    status, answer = post(url, f"this is not json {MARKER}")
    assert status == 400
    if server == "mlflow models serve":
        # MLflow's own JSON error quotes the body; the README says so and points to iagn serve.
        assert "Invalid input" in answer
    else:
        assert MARKER not in answer and "not valid JSON" in answer


def test_the_registered_model_bundles_code_weights_signature_and_example(
    mlflow_server, tracked_pipeline, tmp_path, monkeypatch
):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)  # the registry's too
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{MODEL_NAME}@champion", dst_path=str(tmp_path)
    )
    root = Path(local)
    assert (root / "code" / "iagn" / "inference.py").is_file()
    assert (root / "artifacts" / "model.pt").is_file()
    assert (root / "serving_input_example.json").is_file()
    model = mlflow.models.Model.load(str(root / "MLmodel"))
    assert [spec.name for spec in model.signature.inputs.inputs] == ["image", "array"]
    assert model.metadata["kind"] == "student" and len(model.metadata["class_names"]) == 4
    # No optimizer state: the served file is far smaller than the training checkpoint.
    served = (root / "artifacts" / "model.pt").stat().st_size
    assert served < 0.7 * tracked_pipeline.path("build/student.pt").stat().st_size


def test_decode_images_accepts_batches_and_explains_errors():
    image = np.zeros((8, 6, 3), dtype=np.uint8)
    assert len(serving.decode_images(np.stack([image, image]))) == 2
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    encoded = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    (decoded,) = serving.decode_images({"image": [encoded]})
    assert decoded.size == (6, 8)
    with pytest.raises(Exception, match="row 0: `array` has shape \\[8, 6, 2\\]"):
        serving.decode_images({"array": [np.zeros((8, 6, 2))]})
    with pytest.raises(Exception, match="give exactly one of"):
        serving.decode_images({"image": [encoded], "array": [image]})
