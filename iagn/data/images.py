"""The one image decoder: every reader, the training data, validation, predict, explain and
serving open images here, so they all refuse and convert the same images the same way.

Rules, in the order they apply:

1. Size, from the header alone: an image whose width x height exceeds `max_pixels`
   (params.yaml `data.max_pixels`, default `DEFAULT_MAX_PIXELS`) is refused before a single
   pixel is decoded. A few kilobytes of PNG can declare 20000 x 20000 pixels (a
   decompression bomb); decoding it would take gigabytes.
2. Decoding: truncated or corrupt image data is an error naming the file.
3. Mode: 16-bit and float images (PIL modes I, I;16*, F) are refused. PIL "converts" them to
   RGB by clipping every value to 0..255, which turns them into washed-out pictures, and no
   conversion is right for all of them: the white point of an "I" or "F" image is not in
   the file. `iagn validate` applies the same rule (its `rgb_convertible` expectation calls
   `rgb_problem`). 16-bit colour PNGs are not affected: PIL reads them as 8-bit RGB.
4. Transparency (RGBA, LA, PA, and palette or grey images with a transparent colour) is
   composited on `BACKGROUND`, white: transparent pixels keep whatever colour the file stores
   under them (often black or leftovers of editing), which would otherwise show.
5. Everything else (greyscale, 1-bit, palette, CMYK, YCbCr, ...) converts to RGB.

Errors are `ImageError`s (a `DataError`, and a `ValueError` for callers that catch bad
values generically) that name the file (or "the request image" for bytes) and say what to do.

PIL has a decompression-bomb check of its own inside `Image.open`, against the process-wide
`Image.MAX_IMAGE_PIXELS`: it would warn about or refuse images before `max_pixels` is
consulted. The header is therefore parsed with PIL's check lifted for that moment, under a
lock (from bytes read beforehand, so no file I/O waits on the lock), and `max_pixels`
decides. PIL's checks during decoding (a TIFF tile or GIF frame larger than the header says)
still apply; their errors become `ImageError`s too.
"""

from __future__ import annotations

import functools
import io
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from iagn.errors import DataError

# 8192 x 8192 (67 Mpx, 200 MB decoded): far above the photos of real fine-grained datasets
# (CUB-200-2011's are at most 500 px a side, Stanford Cars' and FGVC-Aircraft's a few
# thousand), below PIL's own warning level (89 Mpx), and the side limit serving puts on arrays.
DEFAULT_MAX_PIXELS = 8192 * 8192
BACKGROUND = (255, 255, 255)
REQUEST_IMAGE = "the request image"
# PIL "converts" these to RGB by clipping every value to 0..255.
CLIPPING_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

MODE_HINT = (
    "convert the image to 8-bit RGB, rescaling its values to 0..255 (e.g. "
    "`magick in.png -depth 8 out.png`), or remove it from the dataset"
)
DECODE_HINT = "replace the file with a good copy (re-download, `dvc pull`) or remove it"
ARRAY_HINT = "pass an H x W x 3 (RGB), H x W x 4 (RGBA) or H x W (grey) array of values 0..255"

_PIL_CHECK_LOCK = threading.Lock()

Source = str | os.PathLike | bytes | bytearray | memoryview


class ImageError(DataError, ValueError):
    """An image the decoder refuses. `problem` is the finding alone ("is too large: ..."),
    without file name or hint, for callers that put it into a message of their own."""

    def __init__(self, problem: str, *, path: object, hint: str):
        self.problem = problem
        super().__init__(f"image {problem}", path=path, hint=hint)


def _check_limit(max_pixels: int) -> None:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise DataError(
            f"the pixel limit must be a whole number >= 1, got {max_pixels!r}",
            hint="set params.yaml data.max_pixels to e.g. 67108864 (8192 x 8192)",
        )


def check_pixels(size: tuple[int, int], max_pixels: int, name: object) -> None:
    """ImageError when an image of `size` (width, height) has more than `max_pixels` pixels."""
    _check_limit(max_pixels)
    width, height = size
    if width * height > max_pixels:
        raise ImageError(
            f"is too large: {width} x {height} = {width * height:,} pixels, above the limit "
            f"data.max_pixels = {max_pixels:,}",
            path=name,
            hint="replace it with a downscaled copy or remove it; raise data.max_pixels only "
            "for files you trust (a small file declaring a huge size is a decompression bomb)",
        )


def image_name(source: Source, name: object = None) -> object:
    """What errors call `source`: `name` if given, else the path or "the request image"."""
    if name is not None:
        return name
    return REQUEST_IMAGE if isinstance(source, bytes | bytearray | memoryview) else Path(source)


def _read(source: Source, name: object) -> bytes:
    """The encoded bytes of `source`: read whole, so headers parse from memory (see above)."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    try:
        return Path(source).read_bytes()
    except FileNotFoundError:
        raise ImageError(
            "file is missing", path=name, hint="restore it (`dvc pull`, re-extract the dataset)"
        ) from None
    except OSError as exc:
        raise ImageError(
            f"file cannot be read: {exc.strerror or exc}",
            path=name,
            hint="check that the path names a readable file",
        ) from None


@contextmanager
def open_header(source: Source, max_pixels: int, *, name: object = None) -> Iterator[Image.Image]:
    """The image with only its header read, after the size check: mode and size are known,
    no pixel is decoded yet. `name` is what errors call it (default: the path, or
    "the request image" for bytes)."""
    name = image_name(source, name)
    data = _read(source, name)
    try:
        with _PIL_CHECK_LOCK:
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                image = Image.open(io.BytesIO(data))
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except UnidentifiedImageError:
        raise ImageError(
            "does not decode: not a readable image (not an image format PIL knows, or its "
            f"header is corrupt; {len(data):,} bytes)",
            path=name,
            hint=DECODE_HINT,
        ) from None
    except (OSError, ValueError) as exc:
        raise ImageError(f"does not decode: {exc}", path=name, hint=DECODE_HINT) from None
    with image:
        check_pixels(image.size, max_pixels, name)
        yield image


def decode(image: Image.Image, max_pixels: int, *, name: object) -> None:
    """Decode all pixels of an image from `open_header`; broken data raises ImageError."""
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        # A TIFF tile or GIF frame larger than the header: PIL's own check caught it.
        raise ImageError(
            f"is too large: {exc}", path=name, hint="replace the file or remove it"
        ) from None
    except Exception as exc:  # decoders raise many types; all mean broken image data
        reason = str(exc) or type(exc).__name__
        raise ImageError(f"does not decode: {reason}", path=name, hint=DECODE_HINT) from None
    check_pixels(image.size, max_pixels, name)  # decoding may grow it (GIF frames)


@functools.cache
def mode_problem(mode: str) -> str | None:
    """Why images of PIL mode `mode` cannot become 8-bit RGB faithfully; None if they can.

    Known from the header alone, so the manifest refuses such images without decoding them.
    """
    if mode in CLIPPING_MODES:
        return (
            f"has mode {mode}, 16-bit or float values that converting to 8-bit RGB would clip "
            "to 0..255 (a washed-out image)"
        )
    try:
        Image.new(mode, (1, 1)).convert("RGBA" if mode in ALPHA_MODES or mode == "P" else "RGB")
    except (ValueError, OSError) as exc:
        return f"has mode {mode}, which does not convert to RGB ({exc})"
    return None


def to_rgb(image: Image.Image, *, name: object = REQUEST_IMAGE) -> Image.Image:
    """A new 8-bit RGB image of a decoded `image`: the mode rule, then alpha on BACKGROUND."""
    problem = mode_problem(image.mode)
    if problem:
        raise ImageError(problem, path=name, hint=MODE_HINT)
    try:
        if image.mode in ALPHA_MODES or "transparency" in image.info:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(
            f"has mode {image.mode} and does not convert to RGB ({exc})", path=name, hint=MODE_HINT
        ) from None


def rgb_problem(image: Image.Image) -> str | None:
    """Why a decoded image is refused by `to_rgb`, or None: validation's `rgb_convertible`."""
    try:
        to_rgb(image)
    except ImageError as exc:
        return exc.problem
    return None


def open_image(
    source: Source, max_pixels: int = DEFAULT_MAX_PIXELS, *, name: object = None
) -> Image.Image:
    """Decode a file (path) or an encoded image (bytes) into an 8-bit RGB image, applying
    every rule of this module; ImageError names `name` (default: the path, or
    "the request image" for bytes) and says what to do."""
    name = image_name(source, name)
    with open_header(source, max_pixels, name=name) as image:
        decode(image, max_pixels, name=name)
        return to_rgb(image, name=name)


def image_size(source: Source, max_pixels: int, *, name: object = None) -> tuple[int, int]:
    """(width, height) from the header alone, after the checks that need no decoding: the
    pixel limit and the mode rule."""
    name = image_name(source, name)
    with open_header(source, max_pixels, name=name) as image:
        problem = mode_problem(image.mode)
        if problem:
            raise ImageError(problem, path=name, hint=MODE_HINT)
        return image.size


def check_image(image: Image.Image, max_pixels: int, *, name: object) -> Image.Image:
    """An image given already decoded (predict from PIL images): the same limit and rules."""
    check_pixels(image.size, max_pixels, name)
    return to_rgb(image, name=name)


def image_from_array(
    array: object, max_pixels: int = DEFAULT_MAX_PIXELS, *, name: object = "the array"
) -> Image.Image:
    """An RGB image from pixel values 0..255: H x W (grey), H x W x 3 (RGB) or H x W x 4
    (RGBA, composited on BACKGROUND). Float values are rounded; values outside 0..255 (16-bit
    or float data not rescaled) are refused, as the mode rule refuses such files."""
    try:
        pixels = np.asarray(array)
    except ValueError:  # ragged nested lists
        pixels = np.asarray([], dtype=object)
    numeric = np.issubdtype(pixels.dtype, np.integer) or np.issubdtype(pixels.dtype, np.floating)
    if not numeric:
        problem = f"is not a numeric array (dtype {pixels.dtype})"
        raise ImageError(problem, path=name, hint=ARRAY_HINT)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (3, 4)):
        raise ImageError(f"has shape {list(pixels.shape)}", path=name, hint=ARRAY_HINT)
    if 0 in pixels.shape:
        raise ImageError("is empty", path=name, hint=ARRAY_HINT)
    height, width = pixels.shape[:2]
    check_pixels((width, height), max_pixels, name)
    if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 255:
        raise ImageError(
            f"holds values outside 0..255 ({pixels.min()}..{pixels.max()}): 16-bit or float "
            "data must be rescaled to 0..255 first",
            path=name,
            hint=ARRAY_HINT,
        )
    image = Image.fromarray(np.rint(pixels).astype(np.uint8))
    return to_rgb(image, name=name)
