"""The README's commands run, exactly as written, on the smoke configuration.

Every command line of the README's ```bash blocks (continuation lines joined, comments
included) is either in RUN or in SKIPPED with the reason it cannot run here (a cluster, a
real S3 or container registry, a long run that another test covers); a command in neither
list, or an entry that is no longer in the README, fails test_every_command_is_run_or_skipped.

The commands of each block run in one `bash` (so `export` and `source` reach the lines
after them), in README order, in a fresh clone of the repository whose params.yaml is the
smoke configuration (configs/smoke.yaml merged over params.yaml: one epoch per stage on 4
classes x 8 images), with its dataset generated and pushed to the clone's own DVC remote,
`.venv` linked to this environment, iagn on PATH, and a HOME whose ~/datasets holds small
CUB-200-2011, FGVC-Aircraft and Stanford Cars layouts. The training commands run once;
later blocks (`iagn register`, `dvc repro`) use their checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, smoke_params
from helpers import BIN, GIT_IDENTITY, dvc, run
from mlflow_server import mlflow_server

__all__ = ["mlflow_server"]  # the session's MLflow server: test_sweep's local sweep tracks to it

README = REPO_ROOT / "README.md"

# Run as written. Comments say what a command relies on beyond the smoke project.
RUN = {
    # ~/datasets/...: small official layouts in the test's HOME
    "iagn data manifest --root ~/datasets/CUB_200_2011 --out build/cub.csv",
    "iagn data manifest --format aircraft --level family --root ~/datasets/fgvc-aircraft-2013b "
    "--out build/air.csv",
    "iagn data summary --data ~/datasets/stanford_cars",
    "iagn data synth --out data/mine --classes 20 --images-per-class 60 --size 160 --seed 1",
    "iagn data synth --params params.yaml --out data/synth",
    "iagn validate --data data/synth --params params.yaml --out build/validate",
    "iagn train-stage --stage 1 --out build/models/stage1.pt",
    "iagn train-stage --stage 2 --init build/models/stage1.pt --out build/models/stage2.pt",
    "iagn train-stage --stage 3 --init build/models/stage2.pt --out build/models/stage3.pt",
    "iagn distill --teacher build/models/stage3.pt --out build/models/student.pt",
    "iagn evaluate --model build/models/stage3.pt --out build/eval/teacher",
    "iagn evaluate --model build/models/student.pt --out build/eval/student",
    # img1.jpg, img2.jpg: two images of the smoke dataset
    "iagn predict img1.jpg img2.jpg --model build/models/student.pt",
    "iagn explain img1.jpg --model build/models/stage3.pt --out explain.png",
    "iagn checkpoint convert build/models/stage3.pt",
    # old.pt: stage3.pt written in the format before code-free checkpoints
    "iagn checkpoint convert old.pt new.pt",
    "iagn register --student build/models/student.pt --student-eval build/eval/student "
    "--teacher build/models/stage3.pt --teacher-eval build/eval/teacher --out build/register",
    # after removing data/, as on a machine without the data (BEFORE)
    "dvc pull data.dvc",
    "dvc status data.dvc",
    # The S3 remote's set-up runs in a copy of the project (IN_A_COPY): it makes a remote
    # that does not exist here the default.
    "dvc remote add -d store s3://my-bucket/iagn",
    "dvc remote modify store endpointurl https://minio.example.com",
    "dvc remote modify --local store access_key_id AKIA...",
    "dvc remote modify --local store secret_access_key ...",
    "export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...",
    'git add .dvc/config && git commit -m "use the S3 remote"',
    "source .venv/bin/activate",
    # after `dvc commit` of what the commands above made (BEFORE): nothing changed
    "dvc repro",
    "dvc exp show",
    "dvc params diff",
    "dvc metrics show",
    "dvc metrics diff",
    "dvc plots diff HEAD",
    "iagn remote push",
    "iagn-pipeline compile -o iagn_pipeline.yaml",
    "iagn-pipeline compile --gpu --gpus 4 --nodes 2 -o iagn_pipeline.yaml",
    "iagn-pipeline sweep --grid stage3.epochs=4,8 --grid train.lr_head=0.01,0.02 -o "
    "iagn_sweep.yaml",
    # after the `iagn register` above: its champion, version 1, has a card
    "iagn models card iagn@champion",
    "iagn models card iagn/1 --out card/",
    "iagn-pipeline compile -o gpu.yaml --gpu --accelerator nvidia.com/gpu --gpus 1 "
    "--node-selector cloud.google.com/gke-accelerator=nvidia-tesla-a100",
    "export IAGN_IMAGE=registry.example.com/ml/iagn:0.1.0",
    "iagn-pipeline compile -o iagn_pipeline.yaml --image registry.example.com/ml/iagn:0.1.1",
    "IAGN_IMAGE=registry.example.com/ml/iagn:0.1.0-cu128 iagn-pipeline compile --gpu -o gpu.yaml",
}

# Not run here, and why.
NO_CLUSTER = (
    "needs a Kubernetes cluster with Kubeflow Trainer; tests/test_trainjob.py runs the "
    "launcher against kmock's Kubernetes API and plays Trainer's controller"
)
SKIPPED = {
    'kubectl apply --server-side -k "https://github.com/kubeflow/trainer.git/manifests/overlays/'
    'manager?ref=v2.3.0"': NO_CLUSTER,
    'kubectl apply --server-side -k "https://github.com/kubeflow/trainer.git/manifests/overlays/'
    'runtimes?ref=v2.3.0"': NO_CLUSTER,
    "kubectl get clustertrainingruntimes": NO_CLUSTER,
    "kubectl apply -f deploy/trainer/rbac.yaml": NO_CLUSTER + "; tests/test_trainjob_rbac.py "
    "checks the manifests grant exactly the calls the code makes",
    "iagn-pipeline submit --host https://kfp.example.com --experiment iagn --gpu --gpus 4 "
    "--nodes 2 --param distributed.storage_uri=s3://ml-artifacts/iagn-trainjobs --param "
    "train.checkpoint_uri=s3://ml-artifacts/iagn-ckpt/run-42": NO_CLUSTER,
    "kubectl -n kubeflow get trainjobs -l app.kubernetes.io/managed-by=iagn": NO_CLUSTER,
    "make demo": "sets up .venv (pip) and runs the DAG at demo scale (7 min); "
    "tests/test_kfp_local.py runs the same `iagn-pipeline run-local` on the smoke configuration",
    "make test": "the test suite itself",
    "python -m bench.step_throughput --backbone resnet50 --px 224 --batch-size 8 --steps 10": (
        "a benchmark (about 3 minutes); tests/test_bench.py runs it at a toy scale"
    ),
    "python -m bench.time_to_accuracy": "a benchmark (about 25 minutes); "
    "tests/test_bench_time_to_accuracy.py runs its --quick mode",
    # The team tracking server: PostgreSQL and S3 that do not exist here.
    "MLFLOW_S3_ENDPOINT_URL=https://minio.example.com AWS_ACCESS_KEY_ID=... "
    "AWS_SECRET_ACCESS_KEY=... mlflow server --backend-store-uri postgresql://mlflow@db/mlflow "
    "--artifacts-destination s3://ml-artifacts/mlflow --host 0.0.0.0 --port 5000": "needs "
    "PostgreSQL and S3; tests/mlflow_server.py runs the same server on SQLite and moto S3",
    "export MLFLOW_TRACKING_URI=https://mlflow.example.com": "a client setting for that "
    "server; tests/test_tracking.py points the steps at a real server the same way",
    "export MLFLOW_TRACKING_USERNAME=... MLFLOW_TRACKING_PASSWORD=...": "as above",
    # Serving: servers that stay up; run as written from a shell without the venv by
    # tests/test_serving_limits.py.
    ".venv/bin/iagn serve --model models:/iagn@champion --port 5001": "a server that stays "
    "up; tests/test_serving_limits.py runs it as written from a shell without the venv",
    "curl -s localhost:5001/invocations -H 'Content-Type: application/json' -d "
    '"{\\"dataframe_records\\": [{\\"image\\": \\"$(base64 -w0 data/synth/images/'
    '002.Checker_000deg/Checker_000deg_0003_123.jpg)\\"}]}"': "needs the server above; "
    "tests/test_serving_limits.py runs it as written",
    'PATH="$PWD/.venv/bin:$PATH" .venv/bin/mlflow models serve -m models:/iagn@champion '
    "--env-manager local --port 5001": "a server that stays up; tests/test_serving_limits.py "
    "runs it as written",
    "dvc exp run -S stage3.epochs=3 -S train.kd_alpha=0.3": "retrains every stage and the "
    "student (minutes); tests/test_dvc_pipeline.py runs `dvc exp run -S` on the smoke "
    "configuration",
    "iagn models card iagn@challenger --open": "opens a web browser; the same download as "
    "the two card commands run above",
    # DVC's queue: minutes of training per experiment.
    "dvc exp run --queue -S distill.lr=0.01 --name lr-low": "queued trainings (minutes); "
    "tests/test_dvc_sweep.py queues and runs two on the smoke configuration",
    "dvc exp run --queue -S distill.lr=0.05 -S stage3.epochs=2 --name lr-high": "as above",
    "dvc queue start -j 2": "as above",
    "dvc queue status": "as above",
    "dvc queue logs lr-high": "as above",
    "dvc exp show --drop '.*' --keep "
    "'Experiment|State|distill.lr|stage3.epochs|build/eval/.*/metrics.json:top1$'": "as above",
    "dvc exp apply lr-high": "as above",
    # Sweeps on KFP: a cluster, or minutes of training.
    "iagn-pipeline sweep --random 8 --dist 'train.lr_head=loguniform(0.001,0.1)' --dist "
    "'distill.kd_alpha=uniform(0.5,0.9)' --dist 'stage3.epochs=int(4,8)' --seed 1 "
    "--parallelism 4 --host http://localhost:8080": "needs a KFP cluster; tests/test_sweep.py "
    "submits a sweep to a double of the KFP REST API",
    "iagn-pipeline sweep --grid train.lr_head=0.01,0.05 --local": "trains two trials (minutes); "
    "tests/test_sweep.py runs a local sweep on the smoke configuration",
    # Kubeflow Pipelines: a cluster.
    "iagn-pipeline submit --host http://localhost:8080 --experiment iagn --param "
    "data_repo=https://github.com/acme/iagn.git --param data_rev=v1.2 --param "
    "tracking_uri=http://mlflow.mlflow.svc:5000 --param stage3.epochs=20": "needs a KFP "
    "cluster; tests/test_kfp_submit.py submits to a double of the KFP REST API",
    "iagn-pipeline submit --host ... --param image=registry.example.com/ml/iagn:0.1.1": "as above",
    "iagn-pipeline run-local --param stage3.epochs=2": "the whole DAG (minutes); "
    "tests/test_kfp_local.py runs run-local on the smoke configuration",
    "kubectl -n <kfp-namespace> create secret generic iagn-credentials --from-literal="
    "AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=... --from-literal="
    "AWS_ENDPOINT_URL=https://minio.example.com --from-literal=MLFLOW_S3_ENDPOINT_URL="
    "https://minio.example.com --from-literal=MLFLOW_TRACKING_URI=https://mlflow.example.com "
    "--from-literal=MLFLOW_TRACKING_USERNAME=... --from-literal=MLFLOW_TRACKING_PASSWORD=...": (
        "needs a Kubernetes cluster"
    ),
    # Container images: an engine, a registry, minutes of building.
    "make image": "builds the image (a container engine, minutes); tests/test_dockerfile.py",
    "IMAGE=registry.example.com/ml/iagn:0.1.0 make image": "as above",
    "IMAGE=registry.example.com/ml/iagn:0.1.0-cu128 "
    "TORCH_INDEX=https://download.pytorch.org/whl/cu128 make image": "as above, CUDA torch",
    "docker login registry.example.com": "needs the registry",
    "make image PUSH=1": "needs a container engine and the registry",
    "IAGN_IMAGE=registry.example.com/ml/iagn:0.1.0-cu128 "
    "TORCH_INDEX=https://download.pytorch.org/whl/cu128 make image PUSH=1": "as above",
    "make image IMAGE=localhost/iagn:dev": "builds the image; tests/test_container.py",
    "iagn-pipeline run-local --runner docker --image localhost/iagn:dev --param "
    "stage3.epochs=2": "the whole DAG in containers (an engine, minutes); tests/test_container.py",
    "iagn-pipeline run-local --runner docker --image localhost/iagn:dev": "as above",
    "BASE_IMAGE=localhost/iagn-base:3.11-bookworm make image": "builds the image",
    "docker run --rm --network host -e MLFLOW_TRACKING_URI=http://mlflow.example:5000 -e "
    "MLFLOW_TRACKING_USERNAME -e MLFLOW_TRACKING_PASSWORD -e MLFLOW_S3_ENDPOINT_URL -e "
    "AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY registry.example.com/ml/iagn:0.1.0 mlflow "
    "models serve -m models:/iagn@champion --env-manager local --host 0.0.0.0 --port 5001": (
        "a container engine, the registry and the tracking server"
    ),
    "curl -fsS http://127.0.0.1:5001/ping": "needs the server above",
    "sudo bash scripts/container_engine.sh setup": "installs a container engine (root)",
    "sudo bash scripts/container_engine.sh socket": "starts the engine's socket (root)",
}

# Blocks holding one of these commands run in a fresh clone of the project, not in it ...
IN_A_COPY = {"dvc remote add -d store s3://my-bucket/iagn"}
# ... where these are not run: the remote they made the default, an S3 server at
# minio.example.com, does not exist here. (The `dvc repro` block's `iagn remote push`, to the
# project's own default remote, runs.)
SKIPPED_IN_A_COPY = {
    "iagn remote push": "tests/test_dvc_remote.py and tests/test_dvc_data.py push to a real "
    "S3 server (moto) configured the same way",
    "iagn remote pull": "tests/test_dvc_data.py pulls into a fresh clone from moto",
    "iagn remote status": "tests/test_dvc_remote.py",
}


@dataclass(frozen=True)
class Command:
    text: str  # as written: continuation lines and comments included
    key: str  # without the comment, whitespace collapsed: the entry in RUN or SKIPPED
    line: int


def without_comment(text: str) -> str:
    """`text` up to an unquoted ` #`, continuation lines joined, whitespace collapsed."""
    joined = re.sub(r"\\\n\s*", " ", text)
    quote, escaped = None, False
    for index, char in enumerate(joined):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or joined[index - 1].isspace()):
            joined = joined[:index]
            break
    return " ".join(joined.split())


def bash_blocks(text: str) -> list[list[Command]]:
    blocks = []
    for match in re.finditer(r"^```bash\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        first_line = text[: match.start()].count("\n") + 2
        commands, pending, start = [], "", 0
        for offset, line in enumerate(match.group(1).splitlines()):
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            start = start if pending else first_line + offset
            pending += line
            if line.endswith("\\"):
                pending += "\n"
                continue
            commands.append(Command(pending, without_comment(pending), start))
            pending = ""
        blocks.append(commands)
    return blocks


BLOCKS = bash_blocks(README.read_text())


def in_a_copy(block: list[Command]) -> bool:
    return any(command.key in IN_A_COPY for command in block)


def skipped_in(block: list[Command]) -> dict[str, str]:
    """The block's commands that are not run, with why."""
    skipped = {**SKIPPED, **(SKIPPED_IN_A_COPY if in_a_copy(block) else {})}
    return {command.key: skipped[command.key] for command in block if command.key in skipped}


def test_every_command_is_run_or_skipped():
    unlisted, listed = [], set()
    for block in BLOCKS:
        skipped = skipped_in(block)
        for command in block:
            listed.add(command.key)
            if command.key not in RUN and command.key not in skipped:
                unlisted.append(f"README.md:{command.line}: {command.key}")
    assert not unlisted, (
        "README commands in neither RUN nor SKIPPED (tests/test_readme_commands.py): run "
        "them, or say why they cannot run here:\n" + "\n".join(unlisted)
    )
    assert not set(RUN) & set(SKIPPED), f"both run and skipped: {set(RUN) & set(SKIPPED)}"
    stale = sorted((set(RUN) | set(SKIPPED) | set(SKIPPED_IN_A_COPY)) - listed)
    assert not stale, "no longer in the README's bash blocks:\n" + "\n".join(stale)


# --- the smoke project ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory, request) -> dict:
    """A fresh clone with the smoke params.yaml and its dataset committed and pushed to the
    clone's DVC remote; HOME with ~/datasets; the environment the blocks run in.

    When tests/test_sweep.py's local sweep runs in the same session, it starts first: it runs
    in the background while the blocks run one step at a time, so the two share the cores."""
    if any(
        item.path.name == "test_sweep.py" and "local_sweep" in getattr(item, "fixturenames", ())
        for item in request.session.items
    ):
        from test_sweep import start_local_sweep

        start_local_sweep(request)
    from test_readers_aircraft import make_aircraft
    from test_readers_cars import make_cars

    from iagn.data.synth import SynthConfig, generate

    base = tmp_path_factory.mktemp("readme")
    clone = base / "iagn"
    run(["git", "clone", "--quiet", REPO_ROOT, clone], cwd=base)
    params_file = clone / "params.yaml"
    params = smoke_params(params_file)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    synth = SynthConfig(**params["data"]["synth"])
    generate(clone / "data" / "synth", synth)
    dvc("add", "--quiet", "data", cwd=clone)
    dvc("push", "--quiet", cwd=clone)
    run(["git", "commit", "--quiet", "-am", "the smoke configuration"], cwd=clone)
    (clone / ".venv").symlink_to(BIN.parent)
    images = sorted((clone / "data" / "synth" / "images").rglob("*.jpg"))
    shutil.copy(images[0], clone / "img1.jpg")
    shutil.copy(images[-1], clone / "img2.jpg")

    home = base / "home"
    generate(home / "datasets" / "CUB_200_2011", synth)
    make_aircraft(home / "datasets" / "fgvc-aircraft-2013b")
    make_cars(home / "datasets" / "stanford_cars")

    dropped = ("MLFLOW_", "IAGN_", "AWS_", "KFP_", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env.update(GIT_IDENTITY)
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return {"clone": clone, "home": home, "env": env}


def make_old_checkpoint(clone: Path) -> None:
    """old.pt: stage3.pt as the code before code-free checkpoints wrote it."""
    from test_checkpoint_safety import write_old_format

    from iagn.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(clone / "build" / "models" / "stage3.pt")
    write_old_format(clone / "old.pt", {k: v for k, v in checkpoint.items() if k != "rng"})


def without_data(clone: Path) -> None:
    """No data/, as on a machine without the data (the commands above also wrote data/mine
    into it, which `dvc pull` would rightly refuse to remove)."""
    shutil.rmtree(clone / "data")


def commit_outs(clone: Path) -> None:
    """dvc.lock from the outs the README's commands made with the same params and code."""
    dvc("commit", "--force", "--quiet", cwd=clone)


# Before the block holding the command.
BEFORE = {
    "iagn checkpoint convert old.pt new.pt": make_old_checkpoint,
    "dvc pull data.dvc": without_data,
    "dvc repro": commit_outs,
}


def block_id(block: list[Command]) -> str:
    return f"line {block[0].line}: {block[0].key[:60]}" if block else "empty"


def script(block: list[Command], skipped_keys) -> str:
    lines = ["set -eo pipefail"]
    for command in block:
        if command.key in skipped_keys:
            lines.append(f"# skipped: {command.key}")
            continue
        lines.append(f"printf '%s\\n' {shlex.quote('$ ' + command.key)} >&2")
        lines.append(command.text)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("block", BLOCKS, ids=[block_id(block) for block in BLOCKS])
def test_the_block_runs_as_written(block: list[Command], project: dict):
    skipped = skipped_in(block)
    if all(command.key in skipped for command in block):
        pytest.skip("; ".join(f"{key[:50]}: {why}" for key, why in skipped.items()))
    clone = project["clone"]
    where = clone
    if in_a_copy(block):
        where = clone.parent / f"copy-{block[0].line}"
        run(["git", "clone", "--quiet", clone, where], cwd=clone.parent)
    for command in block:
        if command.key in BEFORE:
            BEFORE[command.key](where)
    result = subprocess.run(
        ["bash", "-c", script(block, skipped)],
        cwd=where,
        env=project["env"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    shown = (
        f"exit code {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )
    assert result.returncode == 0, shown
    assert "Traceback" not in result.stderr, shown
    check = CHECKS.get(block[0].key)
    if check:
        check(where, result, project["env"])


# --- what some blocks must have done (keyed by the block's first command) -------------------


def _manifests(clone: Path, result, env: dict) -> None:
    assert (clone / "build" / "cub.csv").is_file() and (clone / "build" / "air.csv").is_file()
    assert "format       cars" in result.stdout


def _training(clone: Path, result, env: dict) -> None:
    for name in ("stage1.pt", "stage2.pt", "stage3.pt", "student.pt"):
        assert (clone / "build" / "models" / name).is_file(), name
    for kind in ("teacher", "student"):
        assert json.loads((clone / "build" / "eval" / kind / "metrics.json").read_text())
    predictions = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [p["image"] for p in predictions] == ["img1.jpg", "img2.jpg"]
    assert (clone / "explain.png").read_bytes()[:4] == b"\x89PNG"


def _register(clone: Path, result, env: dict) -> None:
    decisions = json.loads((clone / "build" / "register" / "register.json").read_text())
    assert decisions["passed"], decisions
    listed = subprocess.run(
        ["iagn", "models"], cwd=clone, env=env, capture_output=True, text=True, check=True
    )
    assert "champion" in listed.stdout, listed.stdout


def _repro(clone: Path, result, env: dict) -> None:
    assert "Running stage" not in result.stdout, "dvc repro ran a stage the commands had made"


CHECKS = {
    "iagn data manifest --root ~/datasets/CUB_200_2011 --out build/cub.csv": _manifests,
    "iagn train-stage --stage 1 --out build/models/stage1.pt": _training,
    "iagn register --student build/models/student.pt --student-eval build/eval/student "
    "--teacher build/models/stage3.pt --teacher-eval build/eval/teacher --out build/register": (
        _register
    ),
    "source .venv/bin/activate": _repro,
}
