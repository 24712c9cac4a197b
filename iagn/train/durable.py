"""Checkpoints mirrored to durable storage (params.yaml `train.checkpoint_uri`).

A pod's disk goes with the pod: with a checkpoint URI (S3, or any fsspec URL) every epoch's
`<out>.partial`, the one saved on SIGTERM and the finished checkpoint are also uploaded
there, and a step started on a fresh pod (a KFP retry) fetches the partial back and resumes.
Each step has its own prefix: `<uri>/stage<N>`, `<uri>/distill`, `<uri>/baseline`.

Under a prefix: `partial.pt.json` and `checkpoint.pt.json`, small JSON markers, each naming
the object that holds the bytes (`partial.pt.<sha256[:16]>`), its sha256 and size, the epoch
and batch, and the fingerprint of the run's identity (what `_resume_state` compares: kind,
stage, model, training config but for how many processes ran it, data, init/teacher). S3
has no rename, so the bytes go to a new key first and the marker is written LAST (one PUT:
readers see the old or the new marker, never half of one); a reader trusts only an object
whose sha256 matches its marker. A half-uploaded object, or one without a marker, is never used.

Never overwritten: a marker of another fingerprint (another configuration's checkpoint)
stops the run before training with a clear error, and each upload checks it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from iagn.errors import IagnError
from iagn.io import atomic_path, sha256_file
from iagn.redact import scrub_uri

MARKER_FORMAT = "iagn-durable-checkpoint/1"
PARTIAL, FINISHED = "partial.pt", "checkpoint.pt"


def step_uri(uri: str | None, step: str) -> str | None:
    """The prefix of one step's checkpoints under `uri` (`stage1`, `distill`, `baseline`)."""
    return f"{uri.rstrip('/')}/{step}" if uri else None


def fingerprint(payload: dict, keys: tuple[str, ...] | None = None) -> str:
    """A run's identity as one hash: `keys` of its checkpoint payload (all of it without
    `keys`: the loop passes its `resume_identity`), canonical JSON."""
    identity = payload if keys is None else {key: payload.get(key) for key in keys}
    text = json.dumps(identity, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


@dataclass
class Mirror:
    """One step's checkpoints at `uri` (its prefix), for a run of identity `fingerprint`."""

    uri: str
    fingerprint: str

    @property
    def shown(self) -> str:
        return scrub_uri(self.uri)

    def _fs(self, quick: bool = False):
        """The filesystem and the prefix's path in it; `quick`: few retries (the reachability
        check must fail in seconds, not after s3fs's back-off of ~10 s per call)."""
        import fsspec

        options: dict[str, Any] = {}
        if urlsplit(self.uri).scheme in ("s3", "s3a") and quick:
            options = {"config_kwargs": {"connect_timeout": 5, "retries": {"max_attempts": 1}}}
        # A fresh instance: fsspec's cache would keep the credentials and endpoint
        # (AWS_ENDPOINT_URL, read by botocore) of the first call.
        fs, path = fsspec.url_to_fs(self.uri, skip_instance_cache=True, **options)
        if options:
            fs.retries = 1  # s3fs's own retries (a class attribute; the instance is new)
        return fs, path.rstrip("/")

    def _error(self, exc: BaseException, doing: str) -> IagnError:
        return IagnError(
            f"checkpoint URI {self.shown}: could not {doing}: {_cause(exc)}. Nothing was "
            "trained and no checkpoint was changed; fix it and rerun, or set "
            "train.checkpoint_uri: null to keep checkpoints on the local disk only"
        )

    def _marker(self, fs, path: str, name: str) -> dict | None:
        """The marker of `name`; None when there is none or it is unreadable (not trusted)."""
        try:
            raw = fs.cat_file(f"{path}/{name}.json")
        except FileNotFoundError as exc:
            if _missing_bucket(exc):
                raise
            return None
        try:
            marker = json.loads(raw)
            if marker.get("format") == MARKER_FORMAT:
                return marker
        except (ValueError, AttributeError):
            pass
        _warn(f"{self.shown}/{name}.json is not an iagn checkpoint marker; not trusted")
        return None

    def _refuse_foreign(self, marker: dict | None, name: str) -> None:
        if marker is not None and marker.get("fingerprint") != self.fingerprint:
            raise IagnError(
                f"checkpoint URI {self.shown} already holds {name} (epoch {marker.get('epoch')}) "
                "of another configuration (model, training params, data or init differ); it "
                "was left untouched and nothing was trained. Use another train.checkpoint_uri "
                "for this run (e.g. one per pipeline run), or delete that prefix if the old "
                "checkpoint is no longer wanted"
            )

    def prepare(self, partial: Path) -> None:
        """Before training: the URI is reachable and writable, holds no checkpoint of another
        configuration, and when `partial` is absent locally, the remote partial (else the
        finished checkpoint) of this run is fetched into it."""
        try:
            fs, path = self._fs(quick=True)
            markers = {name: self._marker(fs, path, name) for name in (PARTIAL, FINISHED)}
            for name, marker in markers.items():
                self._refuse_foreign(marker, name)
            probe = f"{path}/.probe-{uuid.uuid4().hex}"  # can we write? (read-only creds)
            if "file" in _protocols(fs):
                fs.makedirs(path, exist_ok=True)
            fs.pipe_file(probe, b"iagn")
            fs.rm_file(probe)
        except IagnError:
            raise
        except Exception as exc:
            raise self._error(exc, "read and write it") from None
        if partial.exists():
            return  # this pod's own partial is at least as recent
        for name, marker in markers.items():
            if marker is not None and self._fetch(fs, path, name, marker, partial):
                return

    def _fetch(self, fs, path: str, name: str, marker: dict, target: Path) -> bool:
        """Download the object `marker` names to `target`, only if its bytes match."""
        source = f"{path}/{marker.get('object')}"
        try:
            with atomic_path(target) as tmp:
                fs.get_file(source, str(tmp))
                size, digest = tmp.stat().st_size, sha256_file(tmp)
                if size != marker.get("size") or digest != marker.get("sha256"):
                    _warn(
                        f"{self.shown}/{marker.get('object')} does not match its marker "
                        f"({size} bytes, sha256 {digest[:12]}); not trusted, starting without it"
                    )
                    raise _Untrusted
        except _Untrusted:
            return False
        except FileNotFoundError:
            _warn(f"{self.shown}/{name}.json names a missing object; starting without it")
            return False
        except Exception as exc:
            raise self._error(exc, f"fetch {name}") from None
        epoch, batch = marker.get("epoch"), marker.get("batch")
        where = f"in epoch {epoch + 1}, batch {batch}" if batch else f"after epoch {epoch}"
        print(f"fetched {self.shown}/{name} ({where}) to {target}", flush=True)
        return True

    def upload(self, local: Path, name: str, epoch: int, batch: int = 0) -> None:
        """Upload `local` as `name` (PARTIAL or FINISHED): bytes first, marker last, then the
        object the old marker named is removed. Raises IagnError; the caller decides."""
        try:
            fs, path = self._fs()
            previous = self._marker(fs, path, name)
            self._refuse_foreign(previous, name)
            digest = sha256_file(local)
            marker = {
                "format": MARKER_FORMAT,
                "object": f"{name}.{digest[:16]}",
                "sha256": digest,
                "size": local.stat().st_size,
                "epoch": epoch,
                "batch": batch,
                "fingerprint": self.fingerprint,
            }
            if "file" in _protocols(fs):
                fs.makedirs(path, exist_ok=True)
            fs.put_file(str(local), f"{path}/{marker['object']}")
            fs.pipe_file(f"{path}/{name}.json", json.dumps(marker, indent=1).encode())
            if previous and previous.get("object") not in (None, marker["object"]):
                fs.rm_file(f"{path}/{previous['object']}")
        except IagnError:
            raise
        except Exception as exc:
            raise IagnError(
                f"could not upload {local} to {self.shown}/{name}: {_cause(exc)}"
            ) from None

    def drop_partial(self) -> None:
        """Remove the remote partial (the finished checkpoint is uploaded): marker first, so
        no reader ever sees a marker without its object."""
        try:
            fs, path = self._fs()
            marker = self._marker(fs, path, PARTIAL)
            if marker is None or marker.get("fingerprint") != self.fingerprint:
                return
            fs.rm_file(f"{path}/{PARTIAL}.json")
            fs.rm_file(f"{path}/{marker['object']}")
        except Exception as exc:  # the finished checkpoint is up; a leftover partial is harmless
            _warn(f"could not remove {self.shown}/{PARTIAL}: {_cause(exc)}")

    def mirror(self, local: Path, name: str, epoch: int, batch: int = 0) -> bool:
        """`upload` during training: a failure is a warning (the local file is intact and
        the next save tries again), never the end of the run. True when uploaded."""
        try:
            self.upload(local, name, epoch, batch)
            return True
        except IagnError as exc:
            _warn(f"{exc}; {local} is kept locally (the next save uploads again)")
            return False


class _Untrusted(Exception):
    pass


def _protocols(fs) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _missing_bucket(exc: BaseException) -> bool:
    return "bucket" in str(exc).lower()


def _cause(exc: BaseException) -> str:
    """What went wrong, in words that say what to do."""
    name, text = type(exc).__name__, str(exc)
    if isinstance(exc, FileNotFoundError) and _missing_bucket(exc):
        return "the bucket does not exist; create it or fix the bucket name in the URI"
    if "NoCredentials" in name or "Unable to locate credentials" in text:
        return (
            "no credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (on Kubernetes "
            "from a secret)"
        )
    if "EndpointConnection" in name or "Could not connect" in text or "refused" in text.lower():
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        where = f" {endpoint} (AWS_ENDPOINT_URL)" if endpoint else ""
        return (
            f"cannot connect to the storage server{where}: {text}; check the endpoint and "
            "that the server is up"
        )
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return f"access denied ({text}); the credentials must allow reading and writing it"
    return f"{name}: {text}"
