"""Probe image files for validation: exists, full decode, mode, size and content hash.

The manifest builder stops at the first bad file (`iagn.data.manifest._probe` raises);
validation must instead report every broken file in one go, so here each failure becomes
data in a `FileProbe` and nothing raises.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

# PIL "converts" these to RGB by clipping every value to 0..255, so a 16-bit or float image
# quietly turns into a washed-out picture: the kind of breakage validation is for.
CLIPPING_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# Below this many files a process pool costs more to start than it saves.
POOL_MIN_FILES = 64


@dataclass(frozen=True)
class FileProbe:
    """What probing one file found; `decode_error` / `rgb_error` are None when fine."""

    exists: bool
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    sha256: str | None = None
    decoded: bool = False  # fully decoded, not only the header read
    decode_error: str | None = None
    rgb_error: str | None = None


def _rgb_problem(image: Image.Image) -> str | None:
    if image.mode == "RGB":
        return None
    if image.mode in CLIPPING_MODES:
        return (
            f"mode {image.mode} holds 16-bit or float values; converting it to RGB clips "
            "them to 0..255 (a washed-out image)"
        )
    try:
        image.convert("RGB")
    except Exception as exc:  # any conversion failure is the finding itself
        return f"mode {image.mode} does not convert to RGB: {exc}"
    return None


def probe_file(path: str | os.PathLike, full_decode: bool = True) -> FileProbe:
    """Probe one file; never raises for a bad file (the failure is in the result)."""
    path = Path(path)
    if not path.is_file():
        return FileProbe(exists=False)
    try:
        data = path.read_bytes()  # read once: the hash and the decoder share the bytes
    except OSError as exc:
        return FileProbe(exists=True, decode_error=f"cannot read the file: {exc.strerror}")
    digest = hashlib.sha256(data).hexdigest()
    width = height = mode = None
    try:
        with Image.open(io.BytesIO(data)) as image:
            (width, height), mode = image.size, image.mode
            if not full_decode:
                return FileProbe(True, width, height, mode, digest)
            image.load()  # the full decode: catches truncated and corrupt image data
            rgb_error = _rgb_problem(image)
    except UnidentifiedImageError:
        error = f"not an image PIL can read (unknown format or corrupt header, {len(data)} bytes)"
        return FileProbe(True, sha256=digest, decode_error=error)
    except Exception as exc:  # decoders raise many types; all mean "broken"
        error = f"does not decode: {exc}" if str(exc) else f"does not decode: {type(exc).__name__}"
        return FileProbe(True, width, height, mode, digest, decode_error=error)
    return FileProbe(True, width, height, mode, digest, decoded=True, rgb_error=rgb_error)


def _probe_job(job: tuple[str, bool]) -> FileProbe:
    return probe_file(*job)


def probe_files(
    paths: Sequence[str | os.PathLike],
    full_decode: Sequence[bool],
    workers: int = 1,
    progress: Callable[[int], object] | None = None,
) -> list[FileProbe]:
    """Probe files in order; `workers` > 1 decodes in that many processes (decoding is CPU
    bound, so threads would share one core under the GIL for the Python parts)."""
    jobs = [(str(p), bool(d)) for p, d in zip(paths, full_decode, strict=True)]
    if workers <= 1 or len(jobs) < POOL_MIN_FILES:
        return _collect(map(_probe_job, jobs), progress)
    # Chunks amortize inter-process overhead yet stay small enough for a smooth progress bar.
    chunksize = max(1, min(64, len(jobs) // (workers * 8)))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return _collect(pool.map(_probe_job, jobs, chunksize=chunksize), progress)


def _collect(probes: Iterable[FileProbe], progress: Callable[[int], object] | None) -> list:
    results = []
    for probe in probes:
        results.append(probe)
        if progress is not None:
            progress(1)
    return results
