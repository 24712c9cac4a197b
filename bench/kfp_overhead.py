"""Benchmark: what running the pipeline through KFP (kfp.local) costs over calling the steps.

All arms run the same tiny pipeline (the tests' configuration: 4 classes x 8 images at
64 px, one epoch per stage, an open registry gate) on their own copy of the same git + DVC
project, tracked into their own embedded MLflow store, in the same benchmark run:

* direct: one Python process calls iagn.runner's steps in order (validate, train stages
  1-3, distill, evaluate teacher and student, register): imports are paid once.
* kfp: `iagn-pipeline run-local` as `make demo` runs it: kfp.local's SubprocessRunner, every
  component (resolve revision, fetch data, the eight steps, the exit handler) a process of
  its own, forked from one interpreter that has imported torch, MLflow and iagn already
  (pipeline/warm.py); the data is fetched with DVC and copied.
* kfp-cold: `iagn-pipeline run-local --cold`: every task a fresh interpreter that imports
  everything again (plain kfp.local), for reference.

Wall-clock time of each arm as a whole (start of its process to its end), best of
`--repeats` (default 1), arms rotating. Also measured: one bare process start with the
imports a step needs, what the cold arm pays per task. Target: kfp / direct <= 1.15.
Results: bench/results/kfp_overhead.md and .json.

    .venv/bin/python -m bench.kfp_overhead [--repeats 2] [--no-cold]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.common import CACHE, REPO, machine, write_results
from iagn.params import load_params

BIN = Path(sys.executable).parent
TARGET = 1.15
QUIET = {
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
}
IMPORTS = "import kfp.dsl, torch, mlflow, iagn.runner, iagn.steps.train_stage"

DIRECT = """
import sys, time
from pathlib import Path
from iagn import runner
from iagn.params import load_params

params = load_params("params.yaml")
data, out = "data/synth", Path("build/direct")
runner.validate(data, params, out / "validate")
init = None
for stage in (1, 2, 3):
    runner.train_stage(stage, data, params, out / f"stage{stage}.pt", init=init, quiet=True)
    init = out / f"stage{stage}.pt"
runner.distill(init, data, params, out / "student.pt", quiet=True)
runner.evaluate(init, data, params, out / "eval-teacher", quiet=True)
runner.evaluate(out / "student.pt", data, params, out / "eval-student", quiet=True)
result = runner.register(
    out / "student.pt", out / "eval-student", params, init, out / "eval-teacher", out / "register"
)
assert result["passed"], result
"""


def tiny_params() -> dict:
    """params.yaml with the tests' smoke overlay (configs/smoke.yaml), on data/synth."""
    params = load_params(REPO / "params.yaml", REPO / "configs" / "smoke.yaml")
    params["data"]["root"] = "data/synth"
    return params


def _run(args: list, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env={**os.environ, **QUIET, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, args))} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def make_project(root: Path) -> Path:
    """A git + DVC project with the tiny configuration, its data pushed to a local remote."""
    if root.exists():
        shutil.rmtree(root)
    project = root / "project"
    project.mkdir(parents=True)
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    git = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@iagn.invalid"}
    git |= {"GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@iagn.invalid"}
    _run(["git", "init", "--quiet", "-b", "main"], project)
    synth = [BIN / "iagn", "data", "synth", "--params", "params.yaml", "--out", "data/synth"]
    _run([*synth, "--quiet"], project)
    _run([BIN / "dvc", "init", "--quiet"], project)
    _run([BIN / "dvc", "remote", "add", "-d", "store", root / "dvc-store"], project)
    _run([BIN / "dvc", "add", "--quiet", "data"], project)
    _run([BIN / "dvc", "push", "--quiet"], project)
    _run(["git", "add", "-A"], project, git)
    _run(["git", "commit", "--quiet", "-m", "tiny project"], project, git)
    return project


def timed(args: list, cwd: Path, env: dict) -> float:
    started = time.perf_counter()
    _run(args, cwd, env)
    return time.perf_counter() - started


def arm_direct(project: Path, key: str) -> float:
    return timed([sys.executable, "-c", DIRECT], project, {"IAGN_PIPELINE_RUN": key})


def arm_kfp(project: Path, key: str) -> float:
    return timed([BIN / "iagn-pipeline", "run-local"], project, {"IAGN_PIPELINE_RUN": key})


def arm_kfp_cold(project: Path, key: str) -> float:
    command = [BIN / "iagn-pipeline", "run-local", "--cold"]
    return timed(command, project, {"IAGN_PIPELINE_RUN": key})


ARMS = {"direct": arm_direct, "kfp": arm_kfp, "kfp-cold": arm_kfp_cold}


def process_start(repeats: int = 3) -> float:
    """Best time of a fresh process importing what a component needs (paid per KFP task)."""
    return min(timed([sys.executable, "-c", IMPORTS], REPO, {}) for _ in range(repeats))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs per arm (best is kept)")
    parser.add_argument("--no-cold", action="store_true", help="skip the kfp-cold arm")
    args = parser.parse_args(argv)
    # No arm may inherit a tracking server or a pipeline key from the caller's shell.
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "KFP_RUN_ID"):
        os.environ.pop(name, None)
    arms = [arm for arm in ARMS if not (args.no_cold and arm == "kfp-cold")]
    base = CACHE / "kfp-overhead"
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for repeat in range(args.repeats):
        # Rotate the order, so that no arm always runs on a warmer (or busier) machine.
        order = arms[repeat % len(arms) :] + arms[: repeat % len(arms)]
        for arm in order:
            project = make_project(base / arm)
            seconds = ARMS[arm](project, f"bench-{arm}-{repeat}")
            times[arm].append(seconds)
            print(f"{arm:>8}: {seconds:6.1f} s", flush=True)
    startup = process_start()
    best = {arm: min(values) for arm, values in times.items()}
    direct = best["direct"]
    ratio = best["kfp"] / direct
    tasks = 11  # resolve, fetch, validate, 3 stages, distill, 2 evaluations, register, exit
    info = machine()
    data = {
        "machine": info,
        "configuration": "tests' tiny pipeline: 4 classes x 8 images, 64 px, 1 epoch per stage",
        "repeats": args.repeats,
        "seconds": times,
        "best_s": best,
        "ratio": ratio,
        "ratio_cold": best["kfp-cold"] / direct if "kfp-cold" in best else None,
        "target_ratio": TARGET,
        "meets_target": ratio <= TARGET,
        "process_start_with_imports_s": startup,
        "kfp_tasks": tasks,
    }
    verdict = "meets" if ratio <= TARGET else "misses"
    spread = list(times.items())
    rows = [
        f"| direct: iagn.runner steps in one process | {direct:.1f} | 1.00x |",
        f"| kfp: `iagn-pipeline run-local` ({tasks} tasks, preloaded interpreter) | "
        f"{best['kfp']:.1f} | {ratio:.2f}x |",
    ]
    if "kfp-cold" in best:
        rows.append(
            f"| kfp-cold: `iagn-pipeline run-local --cold` (plain kfp.local) | "
            f"{best['kfp-cold']:.1f} | {best['kfp-cold'] / direct:.2f}x |"
        )
    markdown = "\n".join(
        [
            "# KFP local-run overhead",
            "",
            f"Machine: {info['cpu']} ({info['threads']} threads), torch {info['torch']}, "
            f"Python {info['python']}. Best of {args.repeats} run(s) per arm, arms rotating.",
            "Configuration: the tests' tiny pipeline (4 classes x 8 images at 64 px, one epoch "
            "per stage, open gate), each arm on its own copy of the same git + DVC project "
            "with its own embedded MLflow store.",
            "",
            "| arm | wall time (s) | vs direct |",
            "| --- | ---: | ---: |",
            *rows,
            "",
            f"`run-local` / direct: **{ratio:.2f}x** (target <= {TARGET:.2f}x: {verdict} it); "
            f"{best['kfp'] - direct:.1f} s more for {tasks} tasks, DVC fetch and copy included.",
            "All runs (s): "
            + "; ".join(f"{arm} {', '.join(f'{v:.1f}' for v in runs)}" for arm, runs in spread)
            + ". The machine may be shared: a slow outlier is other load, hence the best of each.",
            "",
            f"A fresh process importing what a component needs (`{IMPORTS}`) takes "
            f"{startup:.1f} s here, and its teardown about 2 s more: plain kfp.local pays both "
            "per task. run-local forks each task from one interpreter that imported them once "
            "(pipeline/warm.py); each task is still a process of its own.",
            "",
        ]
    )
    write_results("kfp_overhead", markdown, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
