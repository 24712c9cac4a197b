"""Loading a checkpoint never runs code from it.

Every entry point that loads a checkpoint or model artifact (`iagn train-stage --init`,
`iagn distill --teacher`, `iagn evaluate`, `iagn predict`, `iagn explain`,
`mlflow.pyfunc.load_model` and `mlflow models serve` of a logged model whose
`artifacts/model.pt` was replaced) gets a crafted pickle whose `__reduce__` runs a shell
command that creates a marker file: the marker must not appear, and the user gets a clear
message (the CLI: exit 2, no traceback). Also: normal checkpoints round-trip with their
optimizer, scheduler, scaler and RNG state; checkpoints in the old format (numpy RNG state)
get the conversion command, which works; a checkpoint of another kind is explained.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import pickletools
import random
import re
import shlex
import shutil
import subprocess
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers import BIN, free_port, iagn
from mlflow_server import stop_group
from test_training import tiny_params

from iagn.checkpoint import (
    ALLOWED_GLOBALS,
    FORMAT,
    convert_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from iagn.errors import IagnError
from iagn.models.load import load_model
from iagn.models.student import Student, StudentConfig
from iagn.train.schedule import warmup_cosine

REFUSED = "was not loaded"
NEVER = "never holds"
UNTRACKED = {"IAGN_TRACKING": "off"}


class RunsCode:
    """Unpickling this runs `touch <marker>` (what an attacker's file would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


class ExecsCode:
    """The same through `exec`, the other classic."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def data_identity(class_names: list[str], digest: str = "0" * 64) -> dict:
    return {
        "digest": digest,
        "format": "imagefolder",
        "root": "data",
        "class_names": class_names,
        "resize": 72,
        "crop": 64,
    }


def student_payload(class_names: list[str]) -> dict:
    """A real (untrained) student checkpoint's payload: small, and predict/serve work on it."""
    config = StudentConfig(
        backbone="mobilenet_v3_small",
        num_classes=len(class_names),
        weights="none",
        class_names=class_names,
    )
    torch.manual_seed(0)
    return {
        "kind": "student",
        "stage": None,
        "model_config": config.to_dict(),
        "model_state": Student(config).state_dict(),
        "data": data_identity(class_names),
        "complete": True,
        "train_config": {"seed": 0},
    }


def crafted(path: Path, marker: Path, kind: str = "teacher", gadget=RunsCode) -> Path:
    """A checkpoint-shaped file with a code-running object where the RNG state goes."""
    payload = {
        "format": FORMAT,
        "kind": kind,
        "stage": 3,
        "model_config": {"backbone": "resnet18", "num_classes": 4},
        "model_state": {"fc.weight": torch.zeros(4, 8)},
        "data": data_identity(["a", "b", "c", "d"]),
        "complete": True,
        "rng": {"python": random.getstate(), "numpy": gadget(marker), "torch": torch.zeros(4)},
    }
    torch.save(payload, path)
    return path


def assert_refused_cleanly(result: subprocess.CompletedProcess, marker: Path) -> None:
    assert not marker.exists(), "the crafted pickle ran"
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert REFUSED in result.stderr and NEVER in result.stderr, result.stderr
    assert "posix.system" in result.stderr and "Nothing in it ran" in result.stderr


@pytest.fixture(scope="module")
def project(tiny_synth: Path, tmp_path_factory) -> dict:
    """A params.yaml for the tiny dataset and one of its images."""
    root = tmp_path_factory.mktemp("safety")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(tiny_synth)))
    image = sorted((tiny_synth / "images").rglob("*.jpg"))[0]
    class_names = sorted(p.name for p in (tiny_synth / "images").iterdir() if p.is_dir())
    return {"params": params, "image": image, "class_names": class_names}


def test_the_crafted_pickle_is_live(tmp_path):
    """Control: the test's payload does run code when unpickled the old way."""
    marker = tmp_path / "control"
    path = crafted(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.fault(
    "a checkpoint that runs code when unpickled (a crafted pickle), given to train-stage "
    "--init, distill --teacher, evaluate, predict, explain or checkpoint convert",
    sees="exit 2: `iagn: error: evil.pt was not loaded: it holds references to posix.system, "
    "which an iagn checkpoint never holds; ... Nothing in it ran. Do not use it: ...`",
    kept="everything: nothing in the file runs, nothing is written",
)
@pytest.mark.parametrize(
    "entry",
    ["train-stage --init", "distill --teacher", "evaluate", "predict", "explain"],
)
def test_cli_entry_points_refuse_a_crafted_pickle(entry, project, tmp_path):
    marker = tmp_path / "pwned"
    evil = crafted(tmp_path / "evil.pt", marker)
    params, image = project["params"], project["image"]
    args = {
        "train-stage --init": ["train-stage", "--stage", "2", "--init", evil],
        "distill --teacher": ["distill", "--teacher", evil],
        "evaluate": ["evaluate", "--model", evil],
        "predict": ["predict", image, "--model", evil],
        "explain": ["explain", image, "--model", evil],
    }[entry]
    out = tmp_path / ("out.png" if entry == "explain" else "out")
    if entry != "predict":
        args += ["--out", out]
    if entry not in ("predict", "explain"):
        args += ["--params", params, "--quiet"]
    result = iagn(*args, cwd=tmp_path, env=UNTRACKED, check=False)
    assert_refused_cleanly(result, marker)
    assert str(evil) in result.stderr
    assert not out.exists() or not any(out.iterdir())  # evaluate makes its folder first


@pytest.mark.fault(
    "a checkpoint that runs code when unpickled (a crafted pickle), given to train-stage "
    "--init, distill --teacher, evaluate, predict, explain or checkpoint convert",
    sees="exit 2: `iagn: error: evil.pt was not loaded: it holds references to posix.system, "
    "which an iagn checkpoint never holds; ... Nothing in it ran. Do not use it: ...`",
    kept="everything: nothing in the file runs, nothing is written",
)
@pytest.mark.parametrize(
    "variant",
    ["rng", "exec", "weights", "whole file", "protocol 4", "bare pickle", "other global"],
)
def test_every_crafted_variant_is_refused_without_running(variant, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if variant == "rng":
        crafted(path, marker)
    elif variant == "exec":
        crafted(path, marker, gadget=ExecsCode)
    elif variant == "weights":
        payload = {"format": FORMAT, **student_payload(["a", "b"])}
        payload["model_state"]["classifier.weight"] = RunsCode(marker)
        torch.save(payload, path)
    elif variant == "whole file":
        torch.save(RunsCode(marker), path)
    elif variant == "protocol 4":  # instructions torch.save never writes
        torch.save({"format": FORMAT, "x": RunsCode(marker)}, path, pickle_protocol=4)
    elif variant == "bare pickle":
        path.write_bytes(pickle.dumps({"format": FORMAT, "x": RunsCode(marker)}))
    else:  # a harmless global, but not one a checkpoint holds
        torch.save({"format": FORMAT, "kind": "teacher", "device": torch.device("cpu")}, path)
    with pytest.raises(IagnError) as error:
        load_checkpoint(path)
    assert not marker.exists()
    message = str(error.value)
    assert REFUSED in message and str(path) in message
    assert NEVER in message or "bare pickle" in message
    assert error.value.__cause__ is None


@pytest.mark.fault(
    "a checkpoint that runs code when unpickled (a crafted pickle), given to train-stage "
    "--init, distill --teacher, evaluate, predict, explain or checkpoint convert",
    sees="exit 2: `iagn: error: evil.pt was not loaded: it holds references to posix.system, "
    "which an iagn checkpoint never holds; ... Nothing in it ran. Do not use it: ...`",
    kept="everything: nothing in the file runs, nothing is written",
)
def test_a_file_with_two_pickles_is_checked_in_full(tmp_path):
    """Every pickle in the archive is read before anything is unpickled."""
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    save_checkpoint(path, student_payload(["a", "b"]))
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("model/extra.pkl", pickle.dumps(RunsCode(marker), protocol=2))
    with pytest.raises(IagnError, match=f"{REFUSED}.*posix.system.*{NEVER}"):
        load_checkpoint(path)
    assert not marker.exists()


# --- MLflow: the pyfunc model and the scoring server ---------------------------------------


@pytest.fixture(scope="module")
def logged_model(project, tmp_path_factory) -> Path:
    """A student logged as the pyfunc model (iagn.serving.log_model), downloaded to a folder."""
    from iagn import serving

    root = tmp_path_factory.mktemp("pyfunc")
    payload = student_payload(project["class_names"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        patch.chdir(root)
        client = mlflow.MlflowClient()
        experiment = client.create_experiment("safety", (root / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            info = serving.log_model({"format": FORMAT, **payload}, name="student")
        local = mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(root / "m"))
    return Path(local)


def replaced(logged_model: Path, tmp_path: Path, marker: Path) -> Path:
    """A copy of the logged model whose artifacts/model.pt an attacker replaced."""
    model = tmp_path / "model"
    shutil.copytree(logged_model, model)
    artifact = model / "artifacts" / "model.pt"
    payload = torch.load(artifact, weights_only=True)  # the genuine slim checkpoint
    payload["model_state"] = RunsCode(marker)
    torch.save(payload, artifact)
    return model


def test_pyfunc_loads_the_genuine_model(logged_model, project):
    model = mlflow.pyfunc.load_model(str(logged_model))
    encoded = base64.b64encode(project["image"].read_bytes()).decode()
    (row,) = model.predict(pd.DataFrame({"image": [encoded]})).to_dict("records")
    assert row["class_name"] in project["class_names"]


@pytest.mark.fault(
    "a registered MLflow model whose artifacts/model.pt was replaced by a crafted pickle",
    sees="`mlflow.pyfunc.load_model` raises `iagn model not loaded: ... was not loaded ...`; "
    "`mlflow models serve` stops at start-up with the same message",
    kept="everything: nothing in the file runs, the server does not start",
)
def test_pyfunc_refuses_a_replaced_artifact(logged_model, tmp_path):
    from mlflow.exceptions import MlflowException

    marker = tmp_path / "pwned"
    model = replaced(logged_model, tmp_path, marker)
    with pytest.raises(MlflowException) as error:
        mlflow.pyfunc.load_model(str(model))
    assert not marker.exists()
    message = str(error.value)
    assert "iagn model not loaded" in message and "artifacts/model.pt" in message
    assert REFUSED in message and NEVER in message and "posix.system" in message


@pytest.mark.fault(
    "a registered MLflow model whose artifacts/model.pt was replaced by a crafted pickle",
    sees="`mlflow.pyfunc.load_model` raises `iagn model not loaded: ... was not loaded ...`; "
    "`mlflow models serve` stops at start-up with the same message",
    kept="everything: nothing in the file runs, the server does not start",
)
def test_the_scoring_server_refuses_a_replaced_artifact(logged_model, tmp_path):
    """`mlflow models serve` (as tests/test_serving.py starts it) stops at startup."""
    marker = tmp_path / "pwned"
    model = replaced(logged_model, tmp_path, marker)
    log = tmp_path / "serve.log"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    with log.open("w") as output:
        process = subprocess.Popen(
            [
                BIN / "mlflow",
                "models",
                "serve",
                "-m",
                str(model),
                "--env-manager",
                "local",
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
            ],
            env=env,
            cwd=tmp_path,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            returncode = process.wait(timeout=240)
        except subprocess.TimeoutExpired:
            stop_group(process)
            pytest.fail(f"the server started on a replaced artifact:\n{log.read_text()}")
    text = log.read_text()
    assert returncode != 0, text
    assert not marker.exists()
    assert "iagn model not loaded" in text and REFUSED in text and NEVER in text


# --- The format: what a checkpoint holds, round trips, old files -----------------------------


def _draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_a_checkpoint_round_trips_with_optimizer_scheduler_scaler_and_rng(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    scheduler = warmup_cosine(optimizer, warmup_steps=2, total_steps=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for _ in range(3):
        loss = model(torch.randn(4, 6)).square().mean()
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = rng_state()
    expected = _draws()
    path = save_checkpoint(
        tmp_path / "ck.pt",
        {
            "kind": "teacher",
            "model_state": model.state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "scheduler_state": scheduler.state_dict(),
            "scaler_state": scaler.state_dict(),
            "rng": state,
            "history": [{"loss": np.float64(0.25), "epoch": np.int64(1)}],  # numpy scalars
            "epoch": 3,
        },
    )
    # Plain torch rules load it too: it names nothing beyond the allow-list.
    torch.load(path, weights_only=True)
    loaded = load_checkpoint(path)
    assert loaded["history"] == [{"loss": 0.25, "epoch": 1}]
    assert type(loaded["history"][0]["loss"]) is float
    for key, value in model.state_dict().items():
        assert torch.equal(loaded["model_state"][key], value)
    assert loaded["model_state"]._metadata == model.state_dict()._metadata

    fresh = torch.nn.Linear(6, 3)
    fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    fresh_scheduler = warmup_cosine(fresh_optimizer, warmup_steps=2, total_steps=10)
    fresh_scaler = torch.amp.GradScaler("cpu")
    fresh.load_state_dict(loaded["model_state"])
    fresh_optimizer.load_state_dict(loaded["optimizer_state"])
    fresh_scheduler.load_state_dict(loaded["scheduler_state"])
    fresh_scaler.load_state_dict(loaded["scaler_state"])
    assert fresh_scaler.get_scale() == scaler.get_scale()
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    for group, fresh_group in zip(
        optimizer.state_dict()["state"].values(),
        fresh_optimizer.state_dict()["state"].values(),
        strict=True,
    ):
        assert torch.equal(group["momentum_buffer"], fresh_group["momentum_buffer"])

    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(loaded["rng"])
    assert _draws() == expected


def test_saving_something_a_checkpoint_never_holds_fails_before_writing(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['train_config'\]\['root'\] is a pathlib"):
        save_checkpoint(tmp_path / "ck.pt", {"train_config": {"root": tmp_path}})
    assert not (tmp_path / "ck.pt").exists()


def write_old_format(path: Path, payload: dict) -> dict:
    """A checkpoint as the code before this format wrote it: numpy's RNG tuple as it is."""
    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    torch.save({"format": FORMAT, **payload, "rng": rng}, path)
    return rng


@pytest.mark.fault(
    "a checkpoint in the format from before code-free checkpoints (numpy RNG state)",
    sees="exit 2: `... was not loaded: ... in the old format ...` and the `iagn checkpoint "
    "convert ...` command to run, which converts it without running code from it",
    kept="the file, until converted; the conversion keeps its weights and RNG state",
)
def test_an_old_checkpoint_gets_the_conversion_command_which_works(project, tmp_path):
    old = tmp_path / "old model.pt"  # a space: the printed command must quote it
    rng = write_old_format(old, student_payload(project["class_names"]))
    with pytest.raises(IagnError, match=r"old format.*iagn checkpoint convert"):
        load_checkpoint(old)

    image = project["image"]
    refused = iagn("predict", image, "--model", old, cwd=tmp_path, env=UNTRACKED, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "in the old format" in refused.stderr and REFUSED in refused.stderr
    command = re.search(r"`(iagn checkpoint convert [^`]+)`", refused.stderr).group(1)
    converted = iagn(*shlex.split(command)[1:], cwd=tmp_path, env=UNTRACKED)
    assert "converted" in converted.stdout

    checkpoint = load_checkpoint(old)
    assert checkpoint["rng"]["numpy"]["key"].tolist() == rng["numpy"][1].tolist()
    np.random.seed(5)
    set_rng_state(checkpoint["rng"])
    after_conversion = np.random.rand(4)
    np.random.set_state(rng["numpy"])
    assert np.array_equal(after_conversion, np.random.rand(4))
    predicted = iagn("predict", image, "--model", old, cwd=tmp_path, env=UNTRACKED)
    assert json.loads(predicted.stdout)["class_name"] in project["class_names"]


@pytest.mark.fault(
    "a checkpoint that runs code when unpickled (a crafted pickle), given to train-stage "
    "--init, distill --teacher, evaluate, predict, explain or checkpoint convert",
    sees="exit 2: `iagn: error: evil.pt was not loaded: it holds references to posix.system, "
    "which an iagn checkpoint never holds; ... Nothing in it ran. Do not use it: ...`",
    kept="everything: nothing in the file runs, nothing is written",
)
def test_conversion_refuses_a_crafted_file(tmp_path):
    marker = tmp_path / "pwned"
    evil = crafted(tmp_path / "evil.pt", marker)
    result = iagn("checkpoint", "convert", evil, tmp_path / "new.pt", cwd=tmp_path, check=False)
    assert_refused_cleanly(result, marker)
    assert not (tmp_path / "new.pt").exists()
    # numpy arrays (allowed only here) next to the gadget change nothing.
    mixed = tmp_path / "mixed.pt"
    torch.save({"format": FORMAT, "a": np.zeros(3), "b": RunsCode(marker)}, mixed)
    with pytest.raises(IagnError, match=f"{REFUSED}.*posix.system"):
        convert_checkpoint(mixed, tmp_path / "new.pt")
    assert not marker.exists() and not (tmp_path / "new.pt").exists()


# --- A checkpoint of another kind ----------------------------------------------------------


@pytest.mark.fault(
    "a checkpoint that holds no model (an optimizer state, no kind, no weights, weights of "
    "another shape)",
    sees="exit 2: `... holds a 'optimizer', not a model ...` naming a teacher (`iagn "
    "train-stage`) or a student (`iagn distill`) as what to pass",
    kept="everything: nothing is written",
)
@pytest.mark.parametrize("command", ["evaluate", "predict", "explain"])
def test_a_checkpoint_of_another_kind_is_explained(command, project, tmp_path):
    other = tmp_path / "optimizer.pt"
    save_checkpoint(other, {"kind": "optimizer", "optimizer_state": {"state": {}}})
    out = tmp_path / "e"
    args = {
        "evaluate": ["evaluate", "--model", other, "--params", project["params"], "--out", out],
        "predict": ["predict", project["image"], "--model", other],
        "explain": ["explain", project["image"], "--model", other, "--out", tmp_path / "x.png"],
    }[command]
    result = iagn(*args, cwd=tmp_path, env=UNTRACKED, check=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "KeyError" not in result.stderr
    assert "holds a 'optimizer', not a model" in result.stderr
    assert "teacher" in result.stderr and "iagn distill" in result.stderr


@pytest.mark.fault(
    "a checkpoint that holds no model (an optimizer state, no kind, no weights, weights of "
    "another shape)",
    sees="exit 2: `... holds a 'optimizer', not a model ...` naming a teacher (`iagn "
    "train-stage`) or a student (`iagn distill`) as what to pass",
    kept="everything: nothing is written",
)
def test_checkpoints_without_a_kind_or_weights_are_explained(tmp_path):
    no_kind = save_checkpoint(tmp_path / "no_kind.pt", {"model_state": {}})
    with pytest.raises(IagnError, match="holds no model kind, not a model"):
        load_model(no_kind)
    payload = student_payload(["a", "b"])
    del payload["model_state"]
    no_weights = save_checkpoint(tmp_path / "no_weights.pt", payload)
    with pytest.raises(IagnError, match="claims to hold a student but lacks model_state"):
        load_model(no_weights)
    payload = student_payload(["a", "b"])
    payload["model_config"]["num_classes"] = 7  # weights of another shape
    mismatched = save_checkpoint(tmp_path / "mismatched.pt", payload)
    with pytest.raises(IagnError, match="do not make a student model"):
        load_model(mismatched)


def test_the_allow_list_is_what_torch_save_of_a_checkpoint_names(tmp_path):
    """A real checkpoint names only allow-listed globals (no numpy ones), so plain
    weights_only rules load it as well."""
    path = save_checkpoint(tmp_path / "ck.pt", {**student_payload(["a"]), "rng": rng_state()})
    with zipfile.ZipFile(path) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("data.pkl")]
        pickled = archive.read(name)
    named = {
        str(arg).replace(" ", ".", 1)
        for opcode, arg, _ in pickletools.genops(pickled)
        if opcode.name == "GLOBAL"
    }
    assert named <= ALLOWED_GLOBALS, named - ALLOWED_GLOBALS
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
