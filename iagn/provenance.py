"""Where a run comes from: git commit, DVC data version, KFP run, and `dvc repro` ancestry.

The tags `iagn/tracking/` puts on every parent and step run:
    iagn.git_commit        IAGN_GIT_COMMIT when set (container images have no checkout), else
                           `git rev-parse HEAD` in the current folder; iagn.git_dirty says
                           whether tracked files had uncommitted changes
    iagn.dvc_data_version  IAGN_DATA_VERSION when set, else the md5 in ./data.dvc
    iagn.kfp_run_id        KFP_RUN_ID (the KFP components set it from the pipeline run)
    iagn.dvc_exp           DVC_EXP_NAME: the experiment's name, which `dvc exp run` (queued
                           or not) sets for every stage command; `dvc repro` does not
`dvc_ancestor` finds the `dvc repro` / `dvc exp run` process a step runs under (Linux /proc),
so that all stages of one repro can share a parent run.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import yaml

# The KFP run id in a task's environment (from its pod's `pipeline/runid` label). Defined
# here only: pipeline/dag.py sets it in every task, components and iagn.tracking read it.
ENV_KFP_RUN = "KFP_RUN_ID"
# Any name for one pipeline execution outside KFP (run-local, CI): its steps share a parent run.
ENV_PIPELINE_RUN = "IAGN_PIPELINE_RUN"
ENV_GIT_COMMIT = "IAGN_GIT_COMMIT"
ENV_DATA_VERSION = "IAGN_DATA_VERSION"
# Set by DVC for the stage commands of an experiment (dvc/repo/experiments/queue/base.py), as
# are DVC_EXP_BASELINE_REV and DVC_ROOT: the project's root, also from a queued experiment's
# temporary workspace under .dvc/tmp/exps.
ENV_DVC_EXP = "DVC_EXP_NAME"
ENV_DVC_ROOT = "DVC_ROOT"
TAG_KFP_RUN = "iagn.kfp_run_id"
TAG_GIT_COMMIT = "iagn.git_commit"
TAG_GIT_DIRTY = "iagn.git_dirty"
TAG_DATA_VERSION = "iagn.dvc_data_version"
TAG_DVC_EXP = "iagn.dvc_exp"


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def provenance_tags() -> dict[str, str]:
    """Git commit and DVC data version of what this step runs on (absent ones left out)."""
    tags = {}
    commit = os.environ.get(ENV_GIT_COMMIT) or _git("rev-parse", "HEAD")
    if commit:
        tags[TAG_GIT_COMMIT] = commit
        tags["mlflow.source.git.commit"] = commit
        if not os.environ.get(ENV_GIT_COMMIT):
            dirty = _git("status", "--porcelain", "--untracked-files=no")
            if dirty is not None:
                tags[TAG_GIT_DIRTY] = str(bool(dirty)).lower()
    version = os.environ.get(ENV_DATA_VERSION) or dvc_data_version()
    if version:
        tags[TAG_DATA_VERSION] = version
    kfp_run = os.environ.get(ENV_KFP_RUN)
    if kfp_run:
        tags[TAG_KFP_RUN] = kfp_run
    dvc_exp = dvc_experiment()
    if dvc_exp:
        tags[TAG_DVC_EXP] = dvc_exp
    return tags


def dvc_experiment() -> str | None:
    """The name of the DVC experiment this stage runs in, if any."""
    return os.environ.get(ENV_DVC_EXP, "").strip() or None


def dvc_data_version(path: str | Path = "data.dvc") -> str | None:
    """The md5 that `data.dvc` records for the tracked data folder, if there is one."""
    try:
        document = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    outs = document.get("outs") if isinstance(document, dict) else None
    md5s = [out["md5"] for out in outs or [] if isinstance(out, dict) and out.get("md5")]
    return str(md5s[0]) if md5s else None


def _proc_stat(pid: int) -> tuple[int, int]:
    """(parent pid, start time in clock ticks) from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # Field 2, the command name, is in parentheses and may hold spaces: split after it.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[19])


def is_dvc_command(argv: Sequence[str]) -> bool:
    """`dvc ...`, `python .../bin/dvc ...` or `python -m dvc ...` (not a path mentioning dvc)."""
    if any(os.path.basename(arg) == "dvc" for arg in argv[:2]):
        return True
    return any(a == "-m" and b == "dvc" for a, b in itertools.pairwise(argv))


def _is_dvc(pid: int) -> bool:
    raw = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return is_dvc_command([arg.decode(errors="replace") for arg in raw if arg])


def dvc_ancestor() -> tuple[int, int] | None:
    """(pid, start time) of the nearest `dvc` process among this process's ancestors."""
    pid = os.getppid()
    for _ in range(64):  # a bound, in case /proc is strange
        if pid <= 1:
            return None
        try:
            parent, started = _proc_stat(pid)
            if _is_dvc(pid):
                return pid, started
        except (OSError, ValueError, IndexError):
            return None  # no /proc (macOS) or the process just ended
        pid = parent
    return None
