"""Helpers for tests that drive real command-line tools (git, dvc, iagn) in subprocesses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "iagn tests",
    "GIT_AUTHOR_EMAIL": "tests@iagn.invalid",
    "GIT_COMMITTER_NAME": "iagn tests",
    "GIT_COMMITTER_EMAIL": "tests@iagn.invalid",
}


def run(args: list, cwd: Path, env: dict | None = None, check: bool = True, timeout: int = 300):
    """Run a command, returning the CompletedProcess; on failure show its output."""
    # The venv's console scripts (iagn, dvc) on PATH, as in an activated venv or `make`.
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    full_env = {**os.environ, **GIT_IDENTITY, "PATH": path, **(env or {})}
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} failed ({result.returncode}):\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return result


# `dvc repro` of the whole smoke pipeline takes about 2-3 minutes on 2 quiet cores; the
# limit leaves room for a loaded machine.
DVC_TIMEOUT_S = 900


def dvc(*args, cwd: Path, env: dict | None = None, check: bool = True):
    return run([BIN / "dvc", *args], cwd=cwd, env=env, check=check, timeout=DVC_TIMEOUT_S)


def iagn(*args, cwd: Path, env: dict | None = None, check: bool = True):
    return run([BIN / "iagn", *args], cwd=cwd, env=env, check=check)


def tiny_dvc_project(clone: Path) -> Path:
    """A fresh clone of this repository at `clone` with the smoke configuration committed in
    params.yaml and its dataset generated and tracked by DVC (data.dvc): the whole pipeline
    (`dvc repro`, `dvc exp run`) runs on it in minutes."""
    import yaml
    from conftest import REPO_ROOT, smoke_params

    run(["git", "clone", "--quiet", REPO_ROOT, clone], cwd=clone.parent)
    params_file = clone / "params.yaml"
    params_file.write_text(yaml.safe_dump(smoke_params(params_file)))
    iagn("data", "synth", "--params", "params.yaml", "--out", "data/synth", "--quiet", cwd=clone)
    dvc("add", "--quiet", "data", cwd=clone)
    run(["git", "commit", "--quiet", "-am", "tiny configuration"], cwd=clone)
    return clone


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def torchrun_two(*entry: str) -> list[str]:
    """`entry` (a script and its arguments, or `-m module ...`) as two ranks under torchrun
    on 127.0.0.1."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        *entry,
    ]


def torchrun_stage1(*entry: str) -> list[str]:
    """`train-stage --stage 1` of ./params.yaml into out/s1.pt on the CPU, two ranks under
    torchrun on 127.0.0.1; `entry` is what torchrun starts (`-m iagn.cli` or a script)."""
    return [
        *torchrun_two(*entry),
        "train-stage",
        "--stage",
        "1",
        "--params",
        "params.yaml",
        "--out",
        "out/s1.pt",
        "--device",
        "cpu",
    ]


def torchrun_node(
    *entry: str,
    nodes: int,
    port: int,
    run_id: str,
    host: bool,
    procs_per_node: int = 1,
    max_restarts: int = 0,
) -> list[str]:
    """`entry` under one torchrun launcher acting as one of `nodes` nodes on this machine:
    `procs_per_node` workers, a c10d rendezvous on 127.0.0.1:`port` that the `host`
    launcher serves (the others connect to it), job `run_id`."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        str(nodes),
        "--nproc-per-node",
        str(procs_per_node),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        run_id,
        "--rdzv-conf",
        f"is_host={int(host)}",
        "--local-addr",
        "127.0.0.1",
        "--max-restarts",
        str(max_restarts),
        *entry,
    ]


def start_logged(args: list, cwd: Path, log: Path, env: dict | None = None) -> subprocess.Popen:
    """A process in `cwd` with stdout and stderr in the file `log` (never a full pipe), the
    venv's scripts on PATH."""
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    full_env = {**os.environ, "PATH": path, **(env or {})}
    with open(log, "w") as sink:
        return subprocess.Popen(
            [str(a) for a in args], cwd=cwd, env=full_env, stdout=sink, stderr=subprocess.STDOUT
        )


def torchrun_workers(launcher_pid: int) -> dict[int, int]:
    """{global rank: pid} of the workers a torchrun launcher runs now (its descendants
    with RANK in their environment)."""
    import psutil

    workers = {}
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None:
            workers[int(rank)] = child.pid
    return workers


@dataclass
class Background:
    """A command left running in the background (a whole pipeline or sweep) while other
    modules run: its stdout and stderr go to files, since nobody reads a pipe meanwhile."""

    project: Path
    process: subprocess.Popen
    out: Path
    err: Path

    def result(self, timeout: int = 900) -> subprocess.CompletedProcess:
        """Its outcome, once it has ended."""
        self.process.wait(timeout=timeout)
        return subprocess.CompletedProcess(
            self.process.args, self.process.returncode, self.out.read_text(), self.err.read_text()
        )


def start_background(
    request, argv: list, project: Path, name: str, env: dict[str, str]
) -> Background:
    """`argv` started in `project` with `env` added, output to `<project>/../<name>.out|.err`;
    stopped with the processes it started when the test session ends, if it has not."""
    from mlflow_server import stop_group

    out, err = project.parent / f"{name}.out", project.parent / f"{name}.err"
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            argv,
            cwd=project,
            env={**os.environ, **GIT_IDENTITY, "PATH": path, **env},
            stdout=stdout,
            stderr=stderr,
            text=True,
            start_new_session=True,  # stopped with its tasks if the session ends first
        )
    request.config.add_cleanup(lambda: stop_group(process))
    return Background(project, process, out, err)
