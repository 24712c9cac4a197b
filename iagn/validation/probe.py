"""Probe image files for validation: exists, full decode, mode, size and content hash.

The manifest builder stops at the first bad file (`iagn.data.manifest._probe` raises);
validation must instead report every broken file in one go, so here each failure becomes
data in a `FileProbe` and nothing raises.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from iagn.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    decode,
    mode_problem,
    open_header,
    rgb_problem,
)

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


def probe_file(
    path: str | os.PathLike, full_decode: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS
) -> FileProbe:
    """Probe one file; never raises for a bad file (the failure is in the result).

    The decoder's rules (`iagn.data.images`) decide: an image above `max_pixels` is a
    decode error found from the header; `rgb_error` is the decoder's mode rule, from the
    header alone when the file is not fully decoded.
    """
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
        with open_header(data, max_pixels, name=path) as image:
            (width, height), mode = image.size, image.mode
            if not full_decode:
                return FileProbe(True, width, height, mode, digest, rgb_error=mode_problem(mode))
            decode(image, max_pixels, name=path)  # catches truncated and corrupt image data
            rgb_error = rgb_problem(image)
    except ImageError as exc:
        return FileProbe(True, width, height, mode, digest, decode_error=exc.problem)
    return FileProbe(True, width, height, mode, digest, decoded=True, rgb_error=rgb_error)


def _probe_job(job: tuple[str, bool, int]) -> FileProbe:
    return probe_file(*job)


def probe_files(
    paths: Sequence[str | os.PathLike],
    full_decode: Sequence[bool],
    workers: int = 1,
    progress: Callable[[int], object] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[FileProbe]:
    """Probe files in order; `workers` > 1 decodes in that many processes (decoding is CPU
    bound, so threads would share one core under the GIL for the Python parts)."""
    jobs = [(str(p), bool(d), max_pixels) for p, d in zip(paths, full_decode, strict=True)]
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
