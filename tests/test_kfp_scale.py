"""The training components at the scale their inputs ask for, run by kfp.local.

A task given more than one GPU (`gpus`, what `iagn-pipeline compile --gpu --gpus N` wires
from the pipeline's gpu_count) runs its step under torchrun with a process per GPU; here
the processes run on the CPU (gloo). Its output artifact is rank 0's checkpoint, its KFP
metrics the last epoch's, and a task left at the defaults trains in its own process.
"""

import re
from pathlib import Path

import pytest
import yaml
from kfp import dsl, local
from kfp.dsl import Artifact, Dataset
from test_training import tiny_params

from components.distill import distill
from components.train_stage import train_stage
from iagn.checkpoint import load_checkpoint


@dsl.pipeline(name="scaled-steps")
def scaled_steps(data_uri: str, params_uri: str):
    dataset = dsl.importer(artifact_uri=data_uri, artifact_class=Dataset, reimport=False)
    params = dsl.importer(artifact_uri=params_uri, artifact_class=Artifact, reimport=False)
    inputs = {"dataset": dataset.output, "params": params.output}
    tracking = {"tracking_uri": "", "experiment": ""}
    init = None
    for stage in (1, 2, 3):
        previous = {} if init is None else {"init": init}
        gpus = {"gpus": 2} if stage == 1 else {}  # stage 1 as if given two GPUs
        task = train_stage(stage=stage, **inputs, **tracking, **previous, **gpus)
        init = task.outputs["model"]
    distill(teacher=init, **inputs, **tracking, gpus=2)


@pytest.fixture(scope="module")
def outputs(tiny_synth: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kfp-scale")
    params = tiny_params(tiny_synth)
    params["train"]["batch_size"] = params["distill"]["batch_size"] = 2  # 1 per process
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    mp = pytest.MonkeyPatch()
    mp.setenv("IAGN_TRACKING", "off")
    mp.setenv("OMP_NUM_THREADS", "1")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "runs"))
    try:
        scaled_steps(data_uri=str(tiny_synth), params_uri=str(root / "params.yaml"))
    finally:
        mp.undo()
    (run,) = (root / "runs").iterdir()
    return run


def checkpoint(run: Path, task: str, output: str) -> dict:
    return load_checkpoint(run / task / output)


def test_a_task_given_two_gpus_trains_on_two_processes(outputs):
    stage1 = checkpoint(outputs, "train-stage", "model")
    assert stage1["complete"] and stage1["train_config"]["world_size"] == 2
    # Rank 0's files only: the checkpoint and its history and metrics beside it.
    written = sorted(path.name for path in (outputs / "train-stage").glob("model*"))
    assert written == ["model", "model.history.json", "model.metrics.json"]
    assert not list((outputs / "train-stage").glob("*.partial"))


def test_a_task_at_the_defaults_trains_in_its_own_process(outputs):
    assert checkpoint(outputs, "train-stage-2", "model")["train_config"]["world_size"] == 1
    assert checkpoint(outputs, "train-stage-3", "model")["train_config"]["world_size"] == 1


def test_distillation_scales_the_same_way(outputs):
    student = checkpoint(outputs, "distill", "student")
    assert student["complete"] and student["train_config"]["world_size"] == 2


@pytest.mark.parametrize(
    ("distributed", "image", "message"),
    [
        ({"nodes": 2, "storage_uri": "s3://b/p"}, "", "compile it with `iagn-pipeline compile"),
        ({"nodes": 2}, "registry/iagn:1", "set distributed.storage_uri"),
        ({"nodes": 0}, "registry/iagn:1", "distributed.nodes must be a whole number of 1"),
    ],
)
def test_several_nodes_without_what_a_trainjob_needs_is_refused(
    distributed, image, message, tmp_path
):
    from components.runtime import run_training
    from iagn.errors import IagnError

    settings = {"train": {"checkpoint_uri": None}, "distributed": distributed}
    with pytest.raises(IagnError, match=re.escape(message)):
        run_training(
            "stage1",
            ["train-stage", "--stage", "1", "--out", "{out}"],
            {"out": str(tmp_path / "model")},
            settings,
            here=lambda: pytest.fail("must not train"),
            image=image,
        )
    assert list(tmp_path.iterdir()) == []
