"""Keeping credentials out of what we print, log, tag and compile.

URIs may carry `user:password@` (or a token in that place) and tokens in the query string;
everything that shows a URI or an error message from a tool that may echo one goes through
here.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def scrub_uri(uri: str) -> str:
    """`uri` without user info and query (where tokens hide): safe to print, tag and log."""
    parts = urlsplit(uri)
    if not parts.netloc:
        return uri  # sqlite:///path, file paths: no credentials possible
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def scrub_text(text: str) -> str:
    """`user:password@` in any URI inside a message replaced by `***@`."""
    return _USERINFO.sub("***@", text)
