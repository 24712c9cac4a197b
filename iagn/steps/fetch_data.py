"""The fetch-data step: the versioned dataset and its params.yaml, with git and DVC.

Two sources:

* a git repository (URL, or a local path with a revision): the revision is resolved to a
  commit, then `dvc get` downloads the dataset folder (`data.root` of the params.yaml at
  that commit) from the repository's default DVC remote. The remote's endpoint comes from
  AWS_ENDPOINT_URL and its credentials from the AWS_* environment (the Kubernetes secret),
  never from the repository or a pipeline parameter.
* the working copy (a local path and no revision; what `iagn-pipeline run-local` uses):
  `dvc pull` of the dataset folder in place from the configured default remote, then a
  copy. When the pull cannot run (no DVC project, no remote, an unreachable remote) but the
  folder is there, that folder is used as it is, with a warning: a working copy may hold
  data that no remote has yet.

DVC runs through iagn.dvc_remote (the running environment's DVC; a failing remote is
explained with the setting to fix). Called by the KFP fetch-data components and by
`iagn fetch-data`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iagn.dvc_remote import configured_remote, explain_failure, run_dvc, run_quietly, transfer
from iagn.errors import IagnError
from iagn.params import apply_overrides, load_params
from iagn.redact import scrub_text

SHA = re.compile(r"^[0-9a-f]{40}$")
GIT_TIMEOUT_S = 300


@dataclass(frozen=True)
class Fetched:
    dataset: Path  # the dataset folder (any supported layout)
    params: Path  # params.yaml with the run's overrides applied
    metadata: dict[str, Any]  # repo, revision, data root, DVC md5, images


def is_url(repo: str) -> bool:
    return "://" in repo or bool(re.match(r"^[\w.-]+@[\w.-]+:", repo))  # scp-like git@host:x


def local_folder(repo: str) -> Path:
    """`repo` as a local folder (not a URL); an IagnError when there is no such folder."""
    folder = Path(repo or ".")
    if not folder.is_dir():
        problem = "is a file" if folder.exists() else "does not exist"
        raise IagnError(
            f"the project repository {repo} {problem}; pass the project's folder (with "
            "params.yaml and data.dvc) or its git URL as data_repo / --repo"
        )
    return folder.resolve()


def working_copy(repo: str, revision: str) -> Path | None:
    """The local folder to use as it is, or None when the source is a git revision."""
    if revision or is_url(repo):
        return None
    return local_folder(repo)


def _git(args: list[str], cwd: Path | None, timeout: int = GIT_TIMEOUT_S):
    return run_quietly(["git", *args], cwd, timeout)


def _last_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if "ERROR" in line or "fatal" in line]
    return scrub_text((errors or lines or ["(no output)"])[-1].strip())


def resolve_revision(repo: str, rev: str) -> str:
    """The commit `rev` names in `repo`; for the working copy, a fingerprint of it."""
    folder = working_copy(repo, rev)
    if folder is not None:
        head = _git(["rev-parse", "HEAD"], folder)
        md5 = _dvc_md5(folder)
        commit = head.stdout.strip() if head.returncode == 0 else "no-git"
        return f"working-copy:{commit}:{md5 or 'no-dvc'}"
    if SHA.match(rev):
        return rev
    wanted = rev or "HEAD"
    if not is_url(repo):  # a local repository: rev-parse understands every revision syntax
        done = _git(["rev-parse", "--verify", f"{wanted}^{{commit}}"], local_folder(repo), 60)
        if done.returncode == 0:
            return done.stdout.strip()
        raise IagnError(
            f"revision {wanted!r} is not in the git repository {repo or '.'}: "
            f"{_last_line(done)}; pass a branch, tag or commit of it as data_rev"
        )
    done = _git(["ls-remote", "--", repo, wanted], None)
    if done.returncode != 0:
        raise IagnError(
            f"cannot read the git repository {scrub_text(repo)}: {_last_line(done)}\n"
            "  -> check data_repo and that the repository is readable from where the step "
            "runs (network, a public or mirrored repository)"
        )
    refs = [line.split("\t") for line in done.stdout.splitlines() if "\t" in line]
    # A branch wins over a tag of the same name, as in `git checkout`; peeled tags (^{})
    # point at the commit rather than the tag object.
    for suffix in (f"refs/heads/{wanted}", f"refs/tags/{wanted}^{{}}", f"refs/tags/{wanted}"):
        for sha, name in refs:
            if name == suffix or (wanted == "HEAD" and name == "HEAD"):
                return sha
    raise IagnError(
        f"revision {wanted!r} is not a branch or tag of {scrub_text(repo)}; pass an existing "
        "branch, tag or full 40-character commit as data_rev"
    )


def _dvc_md5(folder: Path) -> str | None:
    from iagn.provenance import dvc_data_version

    return dvc_data_version(folder / "data.dvc")


def _data_root(params: dict, where: str) -> str:
    root = str((params.get("data") or {}).get("root") or "")
    if not root or Path(root).is_absolute() or ".." in Path(root).parts:
        raise IagnError(
            f"params.yaml of {where} must set data.root to the dataset folder inside the "
            f"repository (e.g. data/synth), not {root!r}"
        )
    return root


def _write_params(params: dict, target: Path) -> None:
    import yaml

    from iagn.io import write_text_atomic

    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, yaml.safe_dump(params, sort_keys=False))


def _count_images(folder: Path) -> int:
    suffixes = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
    return sum(1 for p in folder.rglob("*") if p.suffix.lower() in suffixes)


def _fetch_working_copy(folder: Path, overrides: dict | None, dataset: Path, params_out: Path):
    if not (folder / "params.yaml").is_file():
        raise IagnError(
            f"{folder} has no params.yaml: run from the project folder, or set data_repo to "
            "the project (a git repository with params.yaml and data.dvc)"
        )
    params = apply_overrides(load_params(folder / "params.yaml"), overrides)
    root = _data_root(params, str(folder))
    source = folder / root
    note = "dvc pull"
    try:
        # Watched like `iagn remote pull`: an S3 server that dies mid-transfer stops it.
        transfer("pull", folder, [root])
    except IagnError as error:
        why = str(error)
        if not source.is_dir():
            raise IagnError(
                f"{source} is not in the working copy, and {why}\n"
                f"  (or run `make data` in {folder})"
            ) from None
        note = "working copy as is"
        first_line = why.splitlines()[0]
        print(
            f"iagn: warning: {first_line}; using the working copy's {root} as it is",
            file=sys.stderr,
        )
    shutil.copytree(source, dataset, dirs_exist_ok=True)
    _write_params(params, params_out)
    return {"source": note, "repo": str(folder), "data_root": root}


def _dvc_get(repo: Path, path: str, revision: str, out: Path, shown: str) -> None:
    args = ["get", "--quiet", str(repo), path, "--rev", revision, "-o", str(out), "--force"]
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "").strip()
    if endpoint:  # the S3 endpoint (MinIO, Ceph) of the remote, for this run only
        args += ["--remote-config", f"endpointurl={endpoint}"]
    done = run_dvc(args, None)
    if done.returncode != 0:
        # In a pod the endpoint and credentials come from the Kubernetes secret's AWS_*.
        raise IagnError(
            f"`dvc get` of {path} from {shown}@{revision[:12]} failed: "
            + explain_failure(done.stdout + done.stderr, configured_remote(repo))
            + "\n  In a pipeline pod: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY come from the Kubernetes secret; check also that the data "
            "was pushed (`iagn remote push`)"
        )


def _git_folder(repo: str, tmp: Path) -> Path:
    """A local repository to read from: `repo` itself, or one clone of a URL (blobs lazily)."""
    if not is_url(repo):
        return local_folder(repo)
    clone = tmp / "repo"
    done = _git(
        ["clone", "--quiet", "--filter=blob:none", "--no-checkout", "--", repo, str(clone)], None
    )
    if done.returncode != 0:
        raise IagnError(
            f"cannot clone {scrub_text(repo)}: {_last_line(done)}\n"
            "  -> check data_repo and that the repository is readable from where the step runs"
        )
    return clone


def _git_show(folder: Path, revision: str, path: str) -> str | None:
    done = _git(["show", f"{revision}:{path}"], folder)
    return done.stdout if done.returncode == 0 else None


def _fetch_revision(
    repo: str, revision: str, overrides: dict | None, dataset: Path, params_out: Path
):
    import yaml

    from iagn.provenance import dvc_data_version

    shown = scrub_text(repo)
    with tempfile.TemporaryDirectory(prefix="iagn-fetch-") as tmp:
        folder = _git_folder(repo, Path(tmp))
        text = _git_show(folder, revision, "params.yaml")
        if text is None:
            raise IagnError(
                f"{shown} has no params.yaml at {revision[:12]}; set data_repo to the project "
                "repository (params.yaml, data.dvc and the DVC remote configuration)"
            )
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise IagnError(f"params.yaml of {shown}@{revision[:12]} is not a mapping")
        params = apply_overrides(loaded, overrides)
        root = _data_root(params, f"{shown}@{revision[:12]}")
        md5 = None
        dvc_file = _git_show(folder, revision, "data.dvc")
        if dvc_file is not None:
            (Path(tmp) / "data.dvc").write_text(dvc_file)
            md5 = dvc_data_version(Path(tmp) / "data.dvc")
        if dataset.exists():  # `dvc get -o` creates the folder itself
            shutil.rmtree(dataset)
        _dvc_get(folder, root, revision, dataset, shown)
    _write_params(params, params_out)
    return {"source": "dvc get", "repo": shown, "data_root": root, "dvc_md5": md5}


def fetch(
    repo: str,
    revision: str,
    overrides: dict | None,
    dataset: str | os.PathLike,
    params_out: str | os.PathLike,
) -> Fetched:
    """Put the dataset folder at `dataset` and the effective params.yaml at `params_out`.

    `revision` is what `resolve_revision` returned: a commit, or a working-copy fingerprint.
    """
    dataset, params_out = Path(dataset), Path(params_out)
    if revision.startswith("working-copy:"):
        folder = working_copy(repo, "")
        assert folder is not None
        metadata = _fetch_working_copy(folder, overrides, dataset, params_out)
        metadata["dvc_md5"] = _dvc_md5(folder)
    else:
        metadata = _fetch_revision(repo, revision, overrides, dataset, params_out)
    metadata = {k: v for k, v in metadata.items() if v is not None}
    metadata["revision"] = revision
    metadata["images"] = _count_images(dataset)
    if not metadata["images"]:
        raise IagnError(
            f"the fetched dataset {metadata['data_root']} holds no images; check data.root in "
            "params.yaml and that the data was pushed to the DVC remote"
        )
    return Fetched(dataset, params_out, metadata)
