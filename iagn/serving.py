"""A teacher or student checkpoint as an MLflow model (pyfunc) that works from the registry alone.

The logged model bundles everything serving needs: the weights with the class names and the
preprocessing (a slim checkpoint without optimizer state, see `SERVING_KEYS`; loaded, like
every checkpoint, without running any code from the file), the `iagn` package itself
(`code_paths`, so `models:/<name>@champion` loads where iagn is not installed) and a
signature with an input example. It runs on the CPU unless IAGN_SERVING_DEVICE says
otherwise (e.g. `cuda`).

Input, a DataFrame with one image per row in either column:
    image   a base64-encoded image file (JPEG, PNG, BMP, WebP, ...; a `data:` URI is fine)
    array   an H x W x 3 RGB array of integers 0..255 (H x W grey; H x W x 4 RGBA, composited
            on white); in Python also an N x H x W x 3 batch in one cell
Output, one row per image: class_id, class_name, probability, top5 (list of {class_id,
class_name, probability}), box ([x0, y0, x1, y1] attention box in the original image's pixels).

Limits: each image may have at most the model's `data.max_pixels` pixels (recorded in the
checkpoint; `iagn.data.images.DEFAULT_MAX_PIXELS` for checkpoints without one), checked from
the file's header before any pixel is decoded, and a request's images are decoded a few at a
time (`batches`), so one request never holds more than about one image at the limit in
decoded form. `iagn serve` (`serve` below) adds a limit on the request body.

JSON for the scoring server (POST /invocations):
    {"dataframe_records": [{"image": "<base64>"}, {"array": [[[r, g, b], ...], ...]}]}
A payload without either column, bad base64, bytes that are not an image, an image above the
pixel limit or an array of the wrong shape gets HTTP 400 with a message that names the row,
the column and what to send, and never quotes the payload (`InputError`).

The HTTP server, `iagn serve` (`serve`, `build_app`): MLflow's own scoring app (the same
routes, request parsing and timeout as `mlflow models serve`) for a model loaded once, with
a limit on the request body (413, `BodyLimit`), error messages that never quote the payload
(`public_error`) and uvicorn started in this process (no `uvicorn` looked up on PATH).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gc
import io
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Object, Property, Schema
from PIL import Image

import iagn
from iagn.checkpoint import save_checkpoint
from iagn.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    image_from_array,
    image_size,
    open_image,
)
from iagn.errors import IagnError
from iagn.redact import scrub_text

_logger = logging.getLogger(__name__)

# What inference needs from a checkpoint; optimizer, scheduler and RNG states are dropped.
SERVING_KEYS = (
    "kind",
    "stage",
    "model_config",
    "model_state",
    "data",
    "complete",
    "train_config",
    "serving",  # which prediction, box, precision and temperature: what evaluate measured
    "calibration",
)
OUTPUT_COLUMNS = ("class_id", "class_name", "probability", "top5", "box")
BATCH_SIZE = 32
FORMATS_HINT = "send a JPEG, PNG, BMP or WebP file, base64-encoded"
ARRAY_HINT = "send an H x W x 3 array of integers 0..255 (RGB; H x W grey, H x W x 4 RGBA)"
# The distributions the bundled `iagn` code imports at inference time (pinned as installed).
REQUIREMENTS = (
    "mlflow",
    "torch",
    "torchvision",
    "numpy",
    "pandas",
    "pillow",
    "matplotlib",
    "pyyaml",
    "tqdm",
)

SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec(DataType.string, "image", required=False),
            # AnyType: MLflow would otherwise check every pixel in Python (seconds per image).
            ColSpec(AnyType(), "array", required=False),
        ]
    ),
    outputs=Schema(
        [
            ColSpec(DataType.long, "class_id"),
            ColSpec(DataType.string, "class_name"),
            ColSpec(DataType.double, "probability"),
            ColSpec(
                Array(
                    Object(
                        [
                            Property("class_id", DataType.long),
                            Property("class_name", DataType.string),
                            Property("probability", DataType.double),
                        ]
                    )
                ),
                "top5",
            ),
            ColSpec(Array(DataType.double), "box"),
        ]
    ),
)


class InputError(MlflowException):
    """A bad request input: the scoring server answers HTTP 400 with `message`, no stack trace.

    Messages name the row, the column, sizes and what to send, never content of the input.
    MLflow's scoring server (`mlflow models serve` and `iagn serve` alike) rewrites the message
    of an MlflowException raised by predict to "Failed to predict data '<the input table>'.
    Error: ...", which sends the start of the payload back to the client; the message of an
    InputError is fixed when it is made, so that rewrite does not take. `payload_free` tells
    `public_error` the message is safe to pass on (checked by attribute, not class, since a
    model may bring its own copy of this module)."""

    payload_free = True

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):  # set once, by MlflowException.__init__
            self._message = value


def invalid(message: str) -> InputError:
    """An input error: HTTP 400 with `message`, which must not quote the input."""
    return InputError(message)


def _missing(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, float) and np.isnan(value)


def _image_problem(row: int, raw: bytes, error: ImageError, max_pixels: int) -> InputError:
    """The 400 for an image the decoder refused: the decoder's finding, then what to send."""
    problem = error.problem
    if problem.startswith("is too large"):
        advice = f"send a copy downscaled to at most {max_pixels:,} pixels"
    elif problem.startswith("has mode"):
        advice = "convert it to 8-bit RGB (values 0..255) first"
    else:
        problem = "does not decode as an image: " + problem.removeprefix("does not decode: ")
        advice = FORMATS_HINT
    return invalid(f"row {row}: `image` ({len(raw):,} bytes) {problem}; {advice}")


def image_bytes(value: Any, row: int) -> bytes:
    """The encoded image file of an `image` cell: base64 text (a `data:` URI is fine) or bytes."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)  # Python callers may pass the file's bytes as they are
    if not isinstance(value, str):
        raise invalid(f"row {row}: `image` must be a base64 string, got {type(value).__name__}")
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        # binascii's reasons ("Incorrect padding", "Non-base64 digit found") quote no input.
        raise invalid(
            f"row {row}: `image` is not valid base64 ({exc}); send the image file's bytes "
            "base64-encoded"
        ) from None


def images_from_array(
    value: Any, row: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[Image.Image]:
    """H x W (grey), H x W x 3 (RGB), H x W x 4 (RGBA, composited on white) or a batch
    N x H x W x C, through the decoder's `image_from_array` (same limit and rules)."""
    try:
        array = np.asarray(value)
    except ValueError:  # ragged nested lists
        array = np.asarray([], dtype=object)
    if array.ndim == 4 and array.dtype != object:
        return [image for item in array for image in images_from_array(item, row, max_pixels)]
    try:
        return [image_from_array(array, max_pixels, name=f"row {row}")]
    except ImageError as exc:
        problem = exc.problem
        if problem.startswith("is not a numeric array"):
            problem = "is not a numeric array of equal-length rows"
        raise invalid(f"row {row}: `array` {problem}; {ARRAY_HINT}") from None


def _rows(model_input: Any) -> Iterator[tuple[int, str, Any]]:
    """(row, column, value) for each row of a pyfunc input, after the checks of its shape."""
    if isinstance(model_input, np.ndarray):
        yield 0, "array", model_input
        return
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if not isinstance(model_input, pd.DataFrame):
        raise invalid(
            f"expected a table with a column `image` or `array`, got {type(model_input).__name__}"
        )
    columns = [name for name in ("image", "array") if name in model_input.columns]
    if not columns:
        # Other columns are not named back: their names are part of the payload.
        raise invalid(
            f"the input has {len(model_input.columns)} column(s), none of them `image` or "
            "`array`; give `image` (a base64-encoded image file) or `array` (H x W x 3 RGB "
            "values 0..255), one per row"
        )
    for row, values in enumerate(model_input[columns].itertuples(index=False)):
        given = {name: value for name, value in zip(columns, values, strict=True)}
        given = {name: value for name, value in given.items() if not _missing(value)}
        if len(given) != 1:
            raise invalid(f"row {row}: give exactly one of `image` or `array`, got {len(given)}")
        ((column, value),) = given.items()
        yield row, column, value


def batches(
    model_input: Any, max_pixels: int = DEFAULT_MAX_PIXELS, batch_size: int = BATCH_SIZE
) -> Iterator[list[Image.Image]]:
    """The images of a pyfunc input (see the module docstring), a batch at a time.

    Every row is checked first, without decoding a pixel (base64, the header's size against
    `max_pixels`, the mode), so a bad row is refused before any work is done. Then the images
    are decoded batch by batch: at most `batch_size` images and, beyond the first, no more
    than `max_pixels` pixels in all, so decoded pixels in memory stay near one image at the
    limit however many a request holds. InputError (HTTP 400) for bad input."""
    pending: list[tuple[int, bytes | Image.Image, int]] = []  # row, source, pixels
    for row, column, value in _rows(model_input):
        if column == "array":  # its pixels are in memory already, as the request's values
            pending += [
                (row, image, image.width * image.height)
                for image in images_from_array(value, row, max_pixels)
            ]
            continue
        raw = image_bytes(value, row)
        try:
            width, height = image_size(raw, max_pixels)
        except ImageError as exc:
            raise _image_problem(row, raw, exc, max_pixels) from None
        pending.append((row, raw, width * height))
    if not pending:
        raise invalid("the input holds no images")
    batch: list[Image.Image] = []
    pixels = 0
    for row, source, size in pending:
        if batch and (len(batch) >= batch_size or pixels + size > max_pixels):
            yield batch
            batch, pixels = [], 0
        if isinstance(source, bytes):
            try:
                source = open_image(source, max_pixels)
            except ImageError as exc:  # data broken past the header
                raise _image_problem(row, source, exc, max_pixels) from None
        batch.append(source)
        pixels += size
    yield batch


def decode_images(model_input: Any, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Image.Image]:
    """All images of a pyfunc input at once (Python callers); serving uses `batches`."""
    return [image for batch in batches(model_input, max_pixels) for image in batch]


class IagnModel(mlflow.pyfunc.PythonModel):
    """pyfunc flavour of a checkpoint: loads once, classifies and explains images per call."""

    def load_context(self, context) -> None:
        """Loads `artifacts/model.pt` like every iagn checkpoint: never running code from it
        (iagn/checkpoint.py). A replaced or damaged file stops the load with an
        MlflowException that says what is wrong; nothing in the file ran."""
        from iagn.inference import ImageClassifier

        device = os.environ.get("IAGN_SERVING_DEVICE", "cpu")
        try:
            self.classifier = ImageClassifier.from_checkpoint(
                context.artifacts["checkpoint"], device=device
            )
        except IagnError as error:
            raise MlflowException(f"iagn model not loaded: {error}") from None

    @property
    def max_pixels(self) -> int:
        """The pixel limit per image: the model's training data's (`data.max_pixels`)."""
        return self.classifier.max_pixels

    # A DataFrame hint makes MLflow keep SIGNATURE (it infers no schema from DataFrame hints);
    # `batches` also takes the dicts and arrays that Python callers may pass.
    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        results: list[dict] = []
        for batch in batches(model_input, self.max_pixels):
            results.extend(self.classifier.predict_images(batch)[0])
            del batch  # the decoded images go before the next batch is decoded
        return pd.DataFrame(results, columns=list(OUTPUT_COLUMNS))


def example_image(size: int) -> str:
    """A deterministic noise image as base64 PNG: the input example stored with the model."""
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def requirements() -> list[str]:
    pinned = []
    for name in REQUIREMENTS:
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pinned.append(name)
    return pinned


def slim_checkpoint(checkpoint: dict) -> dict:
    """What the MLflow model bundles of a checkpoint: `SERVING_KEYS` only."""
    return {key: checkpoint[key] for key in SERVING_KEYS if key in checkpoint}


def log_model(checkpoint: dict, name: str = "model", tags: dict | None = None):
    """Log `checkpoint` (a loaded teacher or student) as a pyfunc model into the active run.

    Returns MLflow's ModelInfo (`model_uri`, `model_id`, ...).
    """
    data = checkpoint["data"]
    with tempfile.TemporaryDirectory(prefix="iagn-model-") as tmp:
        slim = Path(tmp) / "model.pt"
        save_checkpoint(slim, slim_checkpoint(checkpoint))
        # A clean copy of the package (no caches): `import iagn` works from the model folder.
        code = Path(tmp) / "code" / "iagn"
        shutil.copytree(
            Path(iagn.__file__).parent,
            code,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
            artifacts={"checkpoint": str(slim)},
            code_paths=[str(code)],
            signature=SIGNATURE,
            input_example=pd.DataFrame({"image": [example_image(int(data["crop"]))]}),
            pip_requirements=requirements(),
            metadata={
                "kind": checkpoint["kind"],
                "class_names": list(data["class_names"]),
                "resize": int(data["resize"]),
                "crop": int(data["crop"]),
                "data_digest": data["digest"],
                "iagn_version": iagn.__version__,
            },
            tags=tags,
        )


# --- the HTTP server: `iagn serve` -----------------------------------------------------------

DEFAULT_MAX_BODY_MB = 16.0  # a few camera photos per request, base64-encoded
DEFAULT_LIMIT_CONCURRENCY = 32
MODEL_PATH_ENV = "IAGN_SERVE_MODEL_PATH"  # for the worker processes of --workers N
MAX_BODY_ENV = "IAGN_SERVE_MAX_BODY_BYTES"
PROTOCOL_HINT = (
    'send a JSON object such as {"dataframe_records": [{"image": "<base64 image file>"}]} '
    'or {"dataframe_records": [{"array": [[[r, g, b], ...], ...]}]} with Content-Type: '
    "application/json"
)


def _error_body(error_code: str, message: str) -> bytes:
    """The JSON of an error response, in the shape of MLflow's (`error_code`, `message`)."""
    return json.dumps({"error_code": error_code, "message": message}).encode()


class _BodyTooLarge(Exception):
    """Raised inside the app by BodyLimit's receive once a body passes the limit."""


class BodyLimit:
    """ASGI middleware: HTTP 413 for a request body larger than `max_bytes`.

    A declared Content-Length over the limit is answered before a byte of the body is read
    (a client that sent `Expect: 100-continue` never sends it). A body without one (chunked)
    is counted as the app reads it, and answered with 413 as soon as the count passes the
    limit, without reading the rest. Either way the connection is closed after the 413, so
    the server does not read what the client still sends."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _message(self, size: str) -> str:
        return (
            f"the request body is {size}, above this server's limit of "
            f"{self.max_bytes:,} bytes ({self.max_bytes / 2**20:g} MiB); send fewer or smaller "
            "images per request, or start the server with a larger --max-body-mb"
        )

    async def _refuse(self, send, size: str) -> None:
        body = _error_body("REQUEST_TOO_LARGE", self._message(size))
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # uvicorn's HTTP parser has already refused a Content-Length that is not a number.
        lengths = [int(v) for k, v in scope["headers"] if k.lower() == b"content-length"]
        if lengths and max(lengths) > self.max_bytes:
            await self._refuse(send, f"{max(lengths):,} bytes (Content-Length)")
            return
        received = 0
        refused = started = False

        async def limited_receive():
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message) -> None:
            nonlocal started
            if refused:
                return  # the app's own answer to _BodyTooLarge (a 500) is not sent
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            # _BodyTooLarge comes back as it is or wrapped (an ExceptionGroup from the task
            # group of MLflow's timeout middleware): the flag says which failure this is.
            if not refused:
                raise
            if not started:
                await self._refuse(send, f"more than {self.max_bytes:,} bytes (chunked)")


def public_error(error: MlflowException) -> tuple[int, str, str]:
    """(HTTP status, error code, message) of a refused request, the message free of payload.

    Our own input errors pass as they are (`InputError`). MLflow's parser quotes the body in
    some of its messages (invalid JSON: the whole body; a schema mismatch: the input table),
    so its errors get a message of our own, from the error's type and cause; the server log
    keeps the start of MLflow's message for whoever runs the server."""
    status = error.get_http_status_code()
    if getattr(error, "payload_free", False):
        return status, error.error_code, error.message
    cause = error.__cause__
    if isinstance(cause, json.JSONDecodeError):
        message = (
            f"the body is not valid JSON ({cause.msg} at line {cause.lineno} column "
            f"{cause.colno}, character {cause.pos}); {PROTOCOL_HINT}"
        )
    elif isinstance(cause, UnicodeDecodeError):
        message = f"the body is not UTF-8 text (byte {cause.start:,} is not); {PROTOCOL_HINT}"
    elif "exactly one of the input fields" in error.message:
        message = (
            "the JSON body must be an object with exactly one of the keys dataframe_records, "
            f"dataframe_split, instances or inputs; {PROTOCOL_HINT}"
        )
    else:
        _logger.warning(
            "refused a request (%s): %.300s", error.error_code, error.message.replace("\n", " ")
        )
        message = (
            "the input could not be read as a table of `image` or `array` rows (MLflow's input "
            f"parsing refused it: {error.error_code}); {PROTOCOL_HINT}"
        )
    return status, error.error_code, message


def build_app(model, max_body_bytes: int):
    """The ASGI app for a loaded pyfunc model: MLflow's scoring app (`/invocations`, `/ping`,
    `/health`, `/version`, MLflow's request timeout), its `/invocations` route replaced by
    one that calls MLflow's same `invocations` function but answers errors with
    `public_error`, all behind `BodyLimit`."""
    from mlflow.pyfunc import scoring_server
    from starlette.responses import Response

    app = scoring_server.init(model)
    app.router.routes[:] = [
        route for route in app.router.routes if getattr(route, "path", None) != "/invocations"
    ]
    input_schema = model.metadata.get_input_schema()

    async def invocations(request) -> Response:
        body = await request.body()
        content_type = request.headers.get("content-type", "")
        try:
            # A thread, as MLflow's own route does: the event loop keeps serving /health.
            result = await asyncio.to_thread(
                scoring_server.invocations, body, content_type, model, input_schema
            )
        except MlflowException as error:
            status, code, message = public_error(error)
            return Response(_error_body(code, message), status, media_type="application/json")
        finally:
            del body
        if result.status == 415:  # MLflow's text quotes the Content-Type header back
            message = (
                "unsupported Content-Type; send application/json (charset utf-8), text/csv or "
                "application/vnd.apache.parquet"
            )
            return Response(_error_body("BAD_REQUEST", message), 415, media_type="application/json")
        return Response(result.response, result.status, media_type=result.mimetype)

    # A plain Starlette route: FastAPI would read its parameters from the query string.
    app.add_route("/invocations", invocations, methods=["POST"])
    return BodyLimit(app, max_body_bytes)


def load_served_model(model_uri: str, folder: str):
    """The pyfunc model at `model_uri`, downloaded into `folder` (which must outlive it: the
    model's code path points there); IagnError saying what to do when it does not load."""
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=folder)
        return local, mlflow.pyfunc.load_model(local)
    except MlflowException as error:
        raise IagnError(
            f"the model {model_uri} did not load: {scrub_text(error.message)}; register a "
            "model first (`make demo`, `iagn register`), check MLFLOW_TRACKING_URI (unset: "
            "./mlflow.db in this folder), or pass --model a model folder or a runs:/ URI"
        ) from None


def app_from_environment():
    """uvicorn's app factory in each worker process of `serve(..., workers=N)`."""
    model = mlflow.pyfunc.load_model(os.environ[MODEL_PATH_ENV])
    return build_app(model, int(os.environ[MAX_BODY_ENV]))


def serve(
    model_uri: str,
    host: str = "127.0.0.1",
    port: int = 5001,
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2**20),
    workers: int = 1,
    limit_concurrency: int | None = DEFAULT_LIMIT_CONCURRENCY,
) -> None:
    """Serve `model_uri` over HTTP until interrupted (see `build_app`), with uvicorn run in
    this process: `mlflow models serve` starts a `uvicorn` found on PATH instead, which fails
    outside an activated venv.

    `limit_concurrency`: connections and requests at a time (per worker) at most; more get
    503. With the body limit, it bounds what requests can hold in memory at once. The model
    is downloaded once and loaded here first, so a model that does not load stops the command
    with a message; with `workers` > 1 each worker process then loads its own copy from the
    download (memory: one model per worker)."""
    import uvicorn

    # A bar per downloaded file (the model's ~90 code files) is noise in a server's log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    options = {"host": host, "port": port, "limit_concurrency": limit_concurrency}
    search_path = list(sys.path)
    with tempfile.TemporaryDirectory(prefix="iagn-serve-") as folder:
        local, model = load_served_model(model_uri, folder)
        max_pixels = getattr(model.unwrap_python_model(), "max_pixels", DEFAULT_MAX_PIXELS)
        print(
            f"iagn serve: {model_uri} on http://{host}:{port} (POST /invocations, GET /health); "
            f"request bodies up to {max_body_bytes / 2**20:g} MiB, images up to "
            f"{max_pixels:,} pixels, {workers} worker(s), at most {limit_concurrency} "
            "connections each",
            flush=True,
        )
        if workers == 1:
            uvicorn.run(build_app(model, max_body_bytes), **options)
            return
        del model
        gc.collect()
        # Loading put the model's bundled copy of iagn first on sys.path; worker processes
        # start with this process's sys.path, and must import this iagn (the factory, the
        # limits), as this process did, not the copy of whatever version logged the model.
        sys.path[:] = search_path
        os.environ[MODEL_PATH_ENV] = local
        os.environ[MAX_BODY_ENV] = str(max_body_bytes)
        uvicorn.run("iagn.serving:app_from_environment", factory=True, workers=workers, **options)
