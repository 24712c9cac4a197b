"""Shared parsing of the whitespace-separated annotation files the official datasets ship."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from iagn.errors import DataError


def require_file(path: Path, what: str, hint: str) -> Path:
    if not path.is_file():
        raise DataError(f"missing {what}", path=path, hint=hint)
    return path


def read_rows(path: Path, min_fields: int, maxsplit: int = -1) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, fields) for each non-empty line, checking the field count.

    `maxsplit` keeps the tail of a line together (names with spaces, e.g. "Boeing 707-320").
    """
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            text = line.strip()
            if not text:
                continue
            fields = text.split(None, maxsplit) if maxsplit >= 0 else text.split()
            if len(fields) < min_fields:
                raise DataError(
                    f"expected at least {min_fields} fields, found {len(fields)}: {text!r}",
                    path=path,
                    line=number,
                    hint="the file is truncated or not in the dataset's official format",
                )
            yield number, fields


def parse_int(value: str, path: Path, line: int, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{what} {value!r} is not an integer", path=path, line=line) from None


def parse_float(value: str, path: Path, line: int, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise DataError(f"{what} {value!r} is not a number", path=path, line=line) from None
