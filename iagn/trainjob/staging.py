"""Inputs and outputs of a TrainJob, through durable storage (S3, or any fsspec URL such as
a `file://` path on a volume every pod mounts at the same place).

Under a job's prefix `<storage_uri>/<job name>`:
    inputs/<name>/...   what the task uploads before it creates the job: a file input as
                        inputs/<name>/<its file name>, a folder input's files under it
    inputs.json         written LAST, after every input: what is there (each file's size and
                        sha256); nodes trust nothing without it
    outputs/<name>/...  what node 0 uploads after the step succeeded: everything in the
                        output's local folder (the checkpoint and the `<stem>.history.json`
                        and `<stem>.metrics.json` the training step writes beside it)
    outputs.json        written LAST by node 0: the job's done marker
S3 has no rename: bytes first, marker last (one PUT), so a reader sees a whole set or none.
Files are checked against their marker's sha256 when downloaded.

The filesystem, its quick-failing reachability options and the error wording are those of
durable checkpoints (iagn.train.durable).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from iagn.errors import IagnError
from iagn.io import sha256_file
from iagn.redact import scrub_uri
from iagn.train.durable import Mirror, _cause, _protocols

INPUTS_MARKER, OUTPUTS_MARKER = "inputs.json", "outputs.json"
INPUTS_FORMAT, OUTPUTS_FORMAT = "iagn-trainjob-inputs/1", "iagn-trainjob-outputs/1"


class Store:
    """One job's prefix in durable storage."""

    def __init__(self, prefix: str):
        self.prefix = prefix.rstrip("/")
        self.shown = scrub_uri(self.prefix)
        self._fs_path: tuple[Any, str] | None = None

    def _fs(self, quick: bool = False):
        if quick:
            return Mirror(self.prefix, "")._fs(quick=True)
        if self._fs_path is None:
            self._fs_path = Mirror(self.prefix, "")._fs()
        return self._fs_path

    def _error(self, exc: BaseException, doing: str) -> IagnError:
        return IagnError(f"TrainJob storage {self.shown}: could not {doing}: {_cause(exc)}")

    # --- both sides ---------------------------------------------------------------------

    def probe(self, what: str = "TrainJob storage", fix: str = "distributed.storage_uri") -> None:
        """The prefix is reachable and writable: write and delete a small object, quickly."""
        try:
            fs, path = self._fs(quick=True)
            if "file" in _protocols(fs):
                fs.makedirs(path, exist_ok=True)
            probe = f"{path}/.probe-{uuid.uuid4().hex}"
            fs.pipe_file(probe, b"iagn")
            fs.rm_file(probe)
        except Exception as exc:
            raise IagnError(
                f"{what} {self.shown} is not writable: {_cause(exc)}. Nothing was created on "
                f"the cluster; fix {fix} (or the credentials) and rerun"
            ) from None

    def marker(self, name: str) -> dict | None:
        fs, path = self._fs()
        try:
            return json.loads(fs.cat_file(f"{path}/{name}"))
        except FileNotFoundError:
            return None
        except ValueError:
            return None
        except Exception as exc:
            raise self._error(exc, f"read {name}") from None

    def _put(self, files: Mapping[str, Path]) -> None:
        """Upload `files` (key under the prefix -> local file)."""
        if not files:
            return
        fs, path = self._fs()
        remote = [f"{path}/{key}" for key in files]
        if "file" in _protocols(fs):
            for target in remote:
                fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.put([str(local) for local in files.values()], remote)

    def _write_marker(self, name: str, data: dict) -> None:
        fs, path = self._fs()
        if "file" in _protocols(fs):
            fs.makedirs(path, exist_ok=True)
        fs.pipe_file(f"{path}/{name}", json.dumps(data, indent=1, sort_keys=True).encode())

    def _get(self, files: Mapping[str, dict], under: str, into: Path) -> None:
        """Download each listed file (rel -> {size, sha256}) from `under`/rel to `into`/rel
        and check it against its entry."""
        fs, path = self._fs()
        pairs = [(f"{path}/{under}/{rel}", into / rel) for rel in files]
        for _, local in pairs:
            local.parent.mkdir(parents=True, exist_ok=True)
        if pairs:
            fs.get([remote for remote, _ in pairs], [str(local) for _, local in pairs])
        for rel, (_, local) in zip(files, pairs, strict=True):
            entry = files[rel]
            if local.stat().st_size != entry["size"] or sha256_file(local) != entry["sha256"]:
                raise IagnError(
                    f"TrainJob storage {self.shown}/{under}/{rel} does not match its marker "
                    "(changed or half-written); rerun the step"
                )

    # --- the task: inputs up, outputs down -----------------------------------------------

    def stage_inputs(self, inputs: Mapping[str, Path], log) -> None:
        """Upload `inputs` unless the same files are there already (a retried task)."""
        wanted = {name: describe(Path(local)) for name, local in inputs.items()}
        try:
            present = self.marker(INPUTS_MARKER)
            if present and present.get("format") == INPUTS_FORMAT and present["inputs"] == wanted:
                log(f"inputs already in {self.shown}/inputs (complete); not uploading again")
                return
            files = {}
            for name, local in inputs.items():
                local = Path(local)
                for rel in wanted[name]["files"]:
                    files[f"inputs/{name}/{rel}"] = local / rel if local.is_dir() else local
            log(f"uploading {len(files)} input file(s) to {self.shown}/inputs")
            self._put(files)
            self._write_marker(INPUTS_MARKER, {"format": INPUTS_FORMAT, "inputs": wanted})
        except IagnError:
            raise
        except Exception as exc:
            raise self._error(exc, "upload the inputs") from None

    def clear_outputs(self) -> None:
        """Remove an earlier attempt's done marker (its files are replaced by the next)."""
        fs, path = self._fs()
        try:
            fs.rm_file(f"{path}/{OUTPUTS_MARKER}")
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self._error(exc, f"remove {OUTPUTS_MARKER}") from None

    def outputs_ready(self) -> dict | None:
        marker = self.marker(OUTPUTS_MARKER)
        return marker if marker and marker.get("format") == OUTPUTS_FORMAT else None

    def fetch_outputs(self, outputs: Mapping[str, Path], log) -> list[Path]:
        """Download each output's files beside its local path (`outputs[name]`)."""
        marker = self.outputs_ready()
        if marker is None:
            raise IagnError(
                f"the TrainJob finished but {self.shown}/{OUTPUTS_MARKER} is missing: node 0 "
                "did not upload its outputs (see its log above); rerun the step"
            )
        fetched = []
        try:
            for name, local in outputs.items():
                local = Path(local)
                files = marker["outputs"].get(name, {}).get("files", {})
                if local.name not in files:
                    raise IagnError(
                        f"the TrainJob's output {name} has no {local.name} in {self.shown}/"
                        f"outputs/{name} (it holds {', '.join(sorted(files)) or 'nothing'})"
                    )
                self._get(files, f"outputs/{name}", local.parent)
                fetched += [local.parent / rel for rel in files]
        except IagnError:
            raise
        except Exception as exc:
            raise self._error(exc, "download the outputs") from None
        log(f"downloaded {len(fetched)} output file(s) from {self.shown}/outputs")
        return fetched

    # --- a node: inputs down, outputs up -------------------------------------------------

    def fetch_inputs(self, names, into: Path) -> dict[str, Path]:
        """Download the inputs under `into`/<name>; their local paths (a file input: the
        file, a folder input: the folder)."""
        marker = self.marker(INPUTS_MARKER)
        if not marker or marker.get("format") != INPUTS_FORMAT:
            raise IagnError(
                f"{self.shown}/{INPUTS_MARKER} is missing: the task that created this TrainJob "
                "did not finish uploading its inputs"
            )
        paths = {}
        try:
            for name in names:
                entry = marker["inputs"].get(name)
                if entry is None:
                    raise IagnError(f"{self.shown}/{INPUTS_MARKER} lists no input {name}")
                base = into / name
                self._get(entry["files"], f"inputs/{name}", base)
                paths[name] = base / entry["name"] if entry["kind"] == "file" else base
        except IagnError:
            raise
        except Exception as exc:
            raise self._error(exc, "download the inputs") from None
        return paths

    def push_outputs(self, folders: Mapping[str, Path]) -> None:
        """Upload each output folder's files, then the done marker."""
        described = {}
        files = {}
        try:
            for name, folder in folders.items():
                entry = describe(folder) if folder.is_dir() else {"files": {}}
                described[name] = {"files": entry["files"]}
                for rel in entry["files"]:
                    files[f"outputs/{name}/{rel}"] = folder / rel
            self._put(files)
            self._write_marker(OUTPUTS_MARKER, {"format": OUTPUTS_FORMAT, "outputs": described})
        except Exception as exc:
            raise self._error(exc, "upload the outputs") from None


def check_writable(uri: str, what: str, fix: str) -> None:
    """Before a TrainJob is created: `uri` (e.g. train.checkpoint_uri, which the nodes write
    their checkpoints to) is reachable and writable from here, or an IagnError naming `what`
    and the setting to `fix`."""
    from iagn.trainjob.names import local_storage_uri

    Store(local_storage_uri(uri)).probe(what, fix)


def describe(local: Path) -> dict[str, Any]:
    """A file or folder as the markers list it: kind, name, each file's size and sha256."""
    if not local.exists():
        raise IagnError(f"TrainJob input {local} does not exist")
    if local.is_dir():
        found = sorted(p for p in local.rglob("*") if p.is_file())
        files = {p.relative_to(local).as_posix(): _entry(p) for p in found}
        return {"kind": "dir", "name": local.name, "files": files}
    return {"kind": "file", "name": local.name, "files": {local.name: _entry(local)}}


def _entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}
