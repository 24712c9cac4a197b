"""A teacher or student checkpoint as an MLflow model (pyfunc) that works from the registry alone.

The logged model bundles everything serving needs: the weights with the class names and the
preprocessing (a slim checkpoint without optimizer state, see `SERVING_KEYS`; loaded, like
every checkpoint, without running any code from the file), the `iagn` package itself
(`code_paths`, so `models:/<name>@champion` loads where iagn is not installed) and a
signature with an input example. It runs on the CPU unless IAGN_SERVING_DEVICE says
otherwise (e.g. `cuda`).

Input, a DataFrame with one image per row in either column:
    image   a base64-encoded image file (JPEG, PNG, BMP, WebP, ...; a `data:` URI is fine)
    array   an H x W x 3 (or H x W grey) RGB array of integers 0..255; in Python also an
            N x H x W x 3 batch in one cell
Output, one row per image: class_id, class_name, probability, top5 (list of {class_id,
class_name, probability}), box ([x0, y0, x1, y1] attention box in the original image's pixels).

JSON for `mlflow models serve` (POST /invocations):
    {"dataframe_records": [{"image": "<base64>"}, {"array": [[[r, g, b], ...], ...]}]}
A payload without either column, bad base64, bytes that are not an image or an array of the
wrong shape gets HTTP 400 with a message saying which row and what to send.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import shutil
import tempfile
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
from iagn.data.images import ImageError, open_image

# What inference needs from a checkpoint; optimizer, scheduler and RNG states are dropped.
SERVING_KEYS = ("kind", "stage", "model_config", "model_state", "data", "complete", "train_config")
OUTPUT_COLUMNS = ("class_id", "class_name", "probability", "top5", "box")
BATCH_SIZE = 32
MAX_SIDE = 8192  # pixels; larger arrays are refused before they exhaust memory
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


def invalid(message: str) -> MlflowException:
    """An input error: the scoring server answers HTTP 400 with `message`, no stack trace."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _missing(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, float) and np.isnan(value)


def image_from_base64(value: Any, row: int) -> Image.Image:
    if isinstance(value, bytes | bytearray):
        raw = bytes(value)  # Python callers may pass the file's bytes as they are
    elif isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise invalid(
                f"row {row}: `image` is not valid base64 ({exc}); send the image file's bytes "
                "base64-encoded"
            ) from None
    else:
        raise invalid(f"row {row}: `image` must be a base64 string, got {type(value).__name__}")
    try:
        return open_image(raw)  # the decoder training and predict use: pixel limit, modes
    except ImageError as exc:
        reason = exc.problem
        raise invalid(
            f"row {row}: `image` ({len(raw)} bytes) does not decode as an image ({reason}); "
            "send a JPEG, PNG, BMP or WebP file, base64-encoded"
        ) from None


def images_from_array(value: Any, row: int) -> list[Image.Image]:
    """H x W (grey), H x W x 3 (RGB), H x W x 4 (alpha dropped) or N x H x W x 3."""
    try:
        array = np.asarray(value)
    except ValueError:
        array = np.asarray([], dtype=object)
    shape_hint = "send an H x W x 3 array of integers 0..255 (RGB)"
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise invalid(
            f"row {row}: `array` is not a numeric array of equal-length rows; {shape_hint}"
        )
    if array.ndim == 4:
        return [image for item in array for image in images_from_array(item, row)]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or 0 in array.shape:
        raise invalid(f"row {row}: `array` has shape {list(array.shape)}; {shape_hint}")
    if max(array.shape[:2]) > MAX_SIDE:
        raise invalid(f"row {row}: `array` is larger than {MAX_SIDE} px on a side; resize it")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise invalid(f"row {row}: `array` values must lie in 0..255; {shape_hint}")
    return [Image.fromarray(np.rint(array[..., :3]).astype(np.uint8))]


def decode_images(model_input: Any) -> list[Image.Image]:
    """The images of a pyfunc input (see the module docstring); MlflowException 400 if bad."""
    if isinstance(model_input, np.ndarray):
        return images_from_array(model_input, 0)
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if not isinstance(model_input, pd.DataFrame):
        raise invalid(
            f"expected a table with a column `image` or `array`, got {type(model_input).__name__}"
        )
    columns = [name for name in ("image", "array") if name in model_input.columns]
    if not columns:
        raise invalid(
            f"the input has columns {list(map(str, model_input.columns))} but needs `image` (a "
            "base64-encoded image file) or `array` (H x W x 3 RGB values 0..255), one per row"
        )
    images: list[Image.Image] = []
    for row, values in enumerate(model_input[columns].itertuples(index=False)):
        given = {name: value for name, value in zip(columns, values, strict=True)}
        given = {name: value for name, value in given.items() if not _missing(value)}
        if len(given) != 1:
            raise invalid(f"row {row}: give exactly one of `image` or `array`, got {len(given)}")
        if "image" in given:
            images.append(image_from_base64(given["image"], row))
        else:
            images.extend(images_from_array(given["array"], row))
    if not images:
        raise invalid("the input holds no images")
    return images


class IagnModel(mlflow.pyfunc.PythonModel):
    """pyfunc flavour of a checkpoint: loads once, classifies and explains images per call."""

    def load_context(self, context) -> None:
        """Loads `artifacts/model.pt` like every iagn checkpoint: never running code from it
        (iagn/checkpoint.py). A replaced or damaged file stops the load with an
        MlflowException that says what is wrong; nothing in the file ran."""
        from iagn.errors import IagnError
        from iagn.inference import ImageClassifier

        device = os.environ.get("IAGN_SERVING_DEVICE", "cpu")
        try:
            self.classifier = ImageClassifier.from_checkpoint(
                context.artifacts["checkpoint"], device=device
            )
        except IagnError as error:
            raise MlflowException(f"iagn model not loaded: {error}") from None

    # A DataFrame hint makes MLflow keep SIGNATURE (it infers no schema from DataFrame hints);
    # `decode_images` also takes the dicts and arrays that Python callers may pass.
    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        images = decode_images(model_input)
        results: list[dict] = []
        for start in range(0, len(images), BATCH_SIZE):
            results.extend(self.classifier.predict_images(images[start : start + BATCH_SIZE])[0])
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


def log_model(checkpoint: dict, name: str = "model", tags: dict | None = None):
    """Log `checkpoint` (a loaded teacher or student) as a pyfunc model into the active run.

    Returns MLflow's ModelInfo (`model_uri`, `model_id`, ...).
    """
    data = checkpoint["data"]
    with tempfile.TemporaryDirectory(prefix="iagn-model-") as tmp:
        slim = Path(tmp) / "model.pt"
        save_checkpoint(slim, {key: checkpoint[key] for key in SERVING_KEYS if key in checkpoint})
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
