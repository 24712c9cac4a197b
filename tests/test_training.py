"""Progressive stages, distillation, evaluation, checkpoints and resume on a tiny dataset."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO_ROOT, smoke_params

import iagn.steps.train_stage as train_stage_module
from iagn import device, precision
from iagn.checkpoint import load_checkpoint, save_checkpoint
from iagn.data.images import open_image
from iagn.errors import IagnError
from iagn.params import load_params
from iagn.steps import distill, evaluate, train_stage


def tiny_params(data: Path, epochs: int = 1) -> dict:
    """The smoke configuration on the 4-class x 6-image dataset `data`."""
    params = smoke_params()
    # A third of each class's 3 training images for validation: one each.
    params["data"].update(root=str(data), val_fraction=0.34)
    for stage in (1, 2, 3):
        params[f"stage{stage}"] = {"epochs": epochs}
    return params


@pytest.fixture(scope="module")
def pipeline_outputs(tiny_synth: Path, tmp_path_factory) -> dict:
    """Stage 1 -> 2 -> 3 -> distill, once for the module."""
    out = tmp_path_factory.mktemp("train")
    params = tiny_params(tiny_synth)
    results = {}
    init = None
    for stage in (1, 2, 3):
        results[stage] = train_stage.run(
            stage, None, params, out / f"s{stage}.pt", init, quiet=True
        )
        init = out / f"s{stage}.pt"
    results["student"] = distill.run(init, None, params, out / "student.pt", quiet=True)
    return {"dir": out, "params": params, "results": results}


def test_checkpoint_holds_everything_needed_to_resume_and_serve(pipeline_outputs, tiny_synth):
    checkpoint = load_checkpoint(pipeline_outputs["dir"] / "s3.pt", kind="teacher")
    for key in (
        "model_state",
        "optimizer_state",
        "scheduler_state",
        "rng",
        "train_config",
        "model_config",
        "history",
        "epoch",
        "step",
    ):
        assert key in checkpoint, key
    assert checkpoint["stage"] == 3 and checkpoint["complete"] is True
    assert checkpoint["model_config"]["class_names"][0].startswith("001.")
    assert len(checkpoint["data"]["digest"]) == 64
    history = checkpoint["history"][0]
    for key in (
        "loss",
        "loss_fused",
        "loss_head1",
        "loss_head3",
        "kd_head3",
        "val_acc",
        "val_acc_head1",
        "val_acc_fused",
        "val_acc_combined",
        "images_per_s",
        "lr_head",
    ):
        assert key in history, key


def test_final_checkpoints_carry_the_serving_configuration_chosen_on_val(
    pipeline_outputs, tiny_synth
):
    from iagn.evaluation.predictor import Predictor
    from iagn.evaluation.serving_config import ServingConfig, serving_config_of
    from iagn.models.load import load_model
    from iagn.train.data import prepare_step_data
    from iagn.train.loop import metrics_path

    prepared = prepare_step_data(None, pipeline_outputs["params"])
    val_images = int((prepared.manifest["split"] == "val").sum())
    for name, kinds in (
        ("s3.pt", ("fused", "combined", "weighted", "two_pass")),
        ("student.pt", ("student",)),
    ):
        model, checkpoint = load_model(pipeline_outputs["dir"] / name)
        serving = serving_config_of(checkpoint)
        assert serving.aggregation in kinds
        assert ServingConfig.from_dict(serving.to_dict()) == serving
        assert serving.chosen_on["split"] == "val"
        assert serving.chosen_on["images"] == val_images  # chosen on val, never test
        fitted = checkpoint["calibration"]
        assert fitted["split"] == "val" and fitted["images"] == val_images
        assert serving.temperature == fitted["temperature"]
        assert 0.05 <= fitted["temperature"] <= 20.0
        assert fitted["nll_after"] <= fitted["nll_before"] + 1e-6  # T = 1 was a candidate
        metrics = json.loads(metrics_path(pipeline_outputs["dir"] / name).read_text())
        assert metrics["temperature"] == fitted["temperature"]
        assert metrics["served"] == serving.aggregation
        assert metrics["val_ece_calibrated"] == fitted["ece_after"]
        # The served logits are the chosen prediction divided by T: same classes.
        images = next(iter(prepared.loader("test", False, 4)))["image"]
        served = Predictor(model, serving)(images).logits
        raw = served[serving.aggregation]
        torch.testing.assert_close(served["final"], raw / serving.temperature)
        assert torch.equal(served["final"].argmax(1), raw.argmax(1))


def test_every_consumer_serves_the_checkpoint_configuration(
    pipeline_outputs, tmp_path, monkeypatch
):
    """Change the stored configuration, and evaluation, predict, the MLflow model's slim
    checkpoint and distillation's teacher all follow it."""
    from dataclasses import replace

    from iagn.evaluation.predictor import Predictor
    from iagn.evaluation.serving_config import serving_config_of
    from iagn.inference import ImageClassifier
    from iagn.models.load import load_model
    from iagn.serving import slim_checkpoint
    from iagn.train.data import prepare_step_data

    params = pipeline_outputs["params"]
    checkpoint = load_checkpoint(pipeline_outputs["dir"] / "s3.pt", kind="teacher")
    altered = replace(
        serving_config_of(checkpoint),
        aggregation="fused",
        temperature=2.5,
        box_method="component",
        box_threshold=0.7,
    )
    path = save_checkpoint(tmp_path / "altered.pt", {**checkpoint, "serving": altered.to_dict()})

    metrics = evaluate.run(path, None, params, tmp_path / "eval")
    assert metrics["serving"] == altered.to_dict()
    assert metrics["top1"] == metrics["top1_fused"] and metrics["temperature"] == 2.5

    prepared = prepare_step_data(None, params)
    test = prepared.manifest[prepared.manifest["split"] == "test"]
    file = prepared.root / test["path"].iloc[0]
    classifier = ImageClassifier.from_checkpoint(path)
    assert classifier.predictor.serving == altered
    result = classifier.predict_files([file])[0]
    model, _ = load_model(path)
    image = classifier.transform(open_image(file))[None]
    with torch.no_grad():
        expected = (model(image).fused_logits / 2.5).softmax(1).max()
    assert result["probability"] == pytest.approx(float(expected), abs=1e-5)

    slim = save_checkpoint(tmp_path / "slim.pt", slim_checkpoint(load_checkpoint(path)))
    assert ImageClassifier.from_checkpoint(slim).predictor.serving == altered

    used = []

    class Recording(Predictor):
        def __init__(self, model, serving=None, *args, **kwargs):
            used.append(serving)
            super().__init__(model, serving, *args, **kwargs)

    monkeypatch.setattr(distill, "Predictor", Recording)
    student = distill.run(path, None, params, tmp_path / "student.pt", quiet=True)
    assert used == [altered]
    taught = load_checkpoint(student["checkpoint"])["teacher"]["serving"]
    assert taught == altered.to_dict()


def test_stage_heads_train_progressively(pipeline_outputs):
    results = pipeline_outputs["results"]
    assert "loss_head1" in results[1]["history"][0]
    assert "loss_head2" not in results[1]["history"][0]
    assert "loss_head2" in results[2]["history"][0] and "loss_head3" not in results[2]["history"][0]
    assert "loss_head3" in results[3]["history"][0]


def test_stage_starts_from_the_previous_checkpoint(pipeline_outputs):
    s1 = load_checkpoint(pipeline_outputs["dir"] / "s1.pt")
    s2 = load_checkpoint(pipeline_outputs["dir"] / "s2.pt")
    # Stage 2 changed the weights it started from (it trained), and head 3 is untouched
    # by losses in stages 1-2, so it only moved through weight decay.
    assert not torch.equal(s1["model_state"]["stem.0.weight"], s2["model_state"]["stem.0.weight"])


def test_evaluate_teacher_and_student(pipeline_outputs, tmp_path):
    params = pipeline_outputs["params"]
    teacher = evaluate.run(pipeline_outputs["dir"] / "s3.pt", None, params, tmp_path / "t")
    student = evaluate.run(pipeline_outputs["dir"] / "student.pt", None, params, tmp_path / "s")
    for key in (
        "top1_head1",
        "top1_head2",
        "top1_head3",
        "top1_fused",
        "top1_combined",
        "top1_two_pass",
        "top5_fused",
        "ece",
        "top1_served",
        "pointing_game",
        "pointing_game_chance",
        "pointing_game_lift",
        "box_accuracy",
        "box_accuracy_chance",
        "box_iou_p50",
        "deletion_attended_10",
        "deletion_random_50",
        "latency_ms",
        "throughput_ips",
        "parameters",
        "checkpoint_mb",
    ):
        assert key in teacher, key
    assert 0.0 <= teacher["pointing_game"] <= 1.0
    # The served prediction leads: top-1 is the stored configuration's prediction.
    assert teacher["top1"] == teacher["top1_served"] == teacher[f"top1_{teacher['served']}"]
    assert teacher["pointing_game_lift"] == pytest.approx(
        teacher["pointing_game"] - teacher["pointing_game_chance"]
    )
    assert 0.0 < teacher["pointing_game_chance"] < 1.0
    assert teacher["images"] == 12 and len(teacher["per_class_accuracy"]) == 4
    teacher_checkpoint = load_checkpoint(pipeline_outputs["dir"] / "s3.pt")
    assert teacher["temperature"] == teacher_checkpoint["calibration"]["temperature"]
    assert 0.0 <= teacher["ece_uncalibrated"] <= 1.0
    assert "top1_student" in student and "top1_head1" not in student
    assert student["parameters"] < teacher["parameters"]
    written = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert written["top1"] == teacher["top1"]
    # Both models were tested on the same images, which are not the whole dataset.
    assert teacher["eval_data_digest"] == student["eval_data_digest"] != teacher["data_digest"]
    on_val = evaluate.run(
        pipeline_outputs["dir"] / "student.pt",
        None,
        {**params, "evaluate": {**params["evaluate"], "split": "val"}},
        tmp_path / "v",
    )
    assert on_val["eval_data_digest"] != student["eval_data_digest"]
    for name in (
        "confusion_matrix.png",
        "reliability.png",
        "attention_gallery.png",
        "localization.png",
        "confused_pairs.png",
    ):
        assert (tmp_path / "t" / name).read_bytes()[:4] == b"\x89PNG"
    # The confused pairs are those of the served prediction's confusion matrix.
    errors = round((1 - teacher["top1"]) * teacher["images"])
    pairs = teacher["confused_pairs"]
    assert len(pairs) <= params["evaluate"].get("confused_pairs", 3)
    assert sum(pair["errors"] for pair in pairs) <= errors
    assert (len(pairs) > 0) == (errors > 0)
    for pair in pairs:
        assert pair["errors"] == pair["first_as_second"] + pair["second_as_first"] > 0
        assert set(pair["classes"]) <= set(teacher["per_class_accuracy"])


@pytest.mark.fault(
    "training killed mid-run (after epoch 2 of 3)",
    sees="rerunning the same command resumes from `<out>.partial` and ends with exactly the "
    "weights of an uninterrupted run",
    kept="`--out` (say, yesterday's model) untouched until the last epoch; every finished "
    "epoch in `<out>.partial`",
)
def test_resume_after_a_kill_matches_an_uninterrupted_run(tiny_synth, tmp_path):
    params = tiny_params(tiny_synth, epochs=3)
    params["train"]["attention_crop_fraction"] = 0.5
    train_stage.run(1, None, params, tmp_path / "straight.pt", quiet=True)

    class Killed(Exception):
        pass

    def kill_after_second_epoch(epoch, record):
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        train_stage.run(
            1,
            None,
            params,
            tmp_path / "resumed.pt",
            quiet=True,
            callbacks=[kill_after_second_epoch],
        )
    # Only the partial file exists: nothing downstream can take a half-trained model.
    assert not (tmp_path / "resumed.pt").exists()
    assert load_checkpoint(tmp_path / "resumed.pt.partial")["epoch"] == 2
    train_stage.run(1, None, params, tmp_path / "resumed.pt", quiet=True)
    straight = load_checkpoint(tmp_path / "straight.pt")
    resumed = load_checkpoint(tmp_path / "resumed.pt")
    assert resumed["epoch"] == 3 and resumed["complete"]
    assert not (tmp_path / "resumed.pt.partial").exists()
    for key, value in straight["model_state"].items():
        assert torch.equal(value, resumed["model_state"][key]), key
    assert [h["loss"] for h in straight["history"]] == [h["loss"] for h in resumed["history"]]


@pytest.mark.fault(
    "an --init checkpoint of another backbone or class count",
    sees="exit 2: `checkpoint s1.pt was trained with backbone resnet18, but params.yaml asks "
    "for resnet34; use the same model.backbone or start without --init` (`has 9 classes, but "
    "the dataset has 4`)",
    kept="everything: no output is written",
)
def test_incompatible_init_checkpoints_are_explained(pipeline_outputs, tiny_synth, tmp_path):
    params = copy.deepcopy(pipeline_outputs["params"])
    s1 = pipeline_outputs["dir"] / "s1.pt"
    params["model"]["backbone"] = "resnet34"
    with pytest.raises(IagnError, match=r"trained with backbone resnet18.*resnet34"):
        train_stage.run(2, None, params, tmp_path / "x.pt", s1, quiet=True)
    checkpoint = load_checkpoint(s1)
    checkpoint["model_config"]["num_classes"] = 9
    save_checkpoint(tmp_path / "nine.pt", checkpoint)
    with pytest.raises(IagnError, match="has 9 classes, but the dataset has 4"):
        train_stage.run(
            2, None, pipeline_outputs["params"], tmp_path / "x.pt", tmp_path / "nine.pt", quiet=True
        )
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.fault(
    "a truncated or corrupt checkpoint, or a student where a teacher is expected",
    sees="exit 2: `checkpoint ... is corrupt or not a torch file (...); it was not loaded. "
    "Re-run the step that wrote it` / `... holds a student model, expected a teacher`",
    kept="everything: no output is written",
)
def test_missing_and_corrupt_checkpoints(pipeline_outputs, tmp_path):
    params = pipeline_outputs["params"]
    with pytest.raises(IagnError, match="does not exist"):
        evaluate.run(tmp_path / "none.pt", None, params, tmp_path / "e")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((pipeline_outputs["dir"] / "s3.pt").read_bytes()[:5000])
    with pytest.raises(IagnError, match="corrupt or not a torch file"):
        distill.run(truncated, None, params, tmp_path / "student.pt", quiet=True)
    with pytest.raises(IagnError, match="holds a student model, expected a teacher"):
        distill.run(pipeline_outputs["dir"] / "student.pt", None, params, tmp_path / "s.pt")


@pytest.mark.fault(
    "a NaN loss",
    sees="exit 2: `... loss became nan at epoch 2 ...; the last good epoch (1) is kept ...`",
    kept="the previous `--out` and its .history.json / .metrics.json byte for byte; the last "
    "good epoch in `<out>.partial`",
)
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_synth, tmp_path, monkeypatch):
    params = tiny_params(tiny_synth, epochs=3)
    # A finished model from an earlier run with other settings: the failed run must leave it
    # and its metrics files exactly as they were.
    earlier = copy.deepcopy(params)
    earlier["stage1"] = {"epochs": 1}
    train_stage.run(1, None, earlier, tmp_path / "s1.pt", quiet=True)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("s1.*")}
    assert set(before) == {"s1.pt", "s1.history.json", "s1.metrics.json"}
    real_step = train_stage_module.stage_step
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, logs = real_step(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 3 else loss), logs  # epoch 1 has 2 steps

    monkeypatch.setattr(train_stage_module, "stage_step", poisoned)
    with pytest.raises(IagnError, match=r"loss became nan at epoch 2.*last good epoch \(1\)"):
        train_stage.run(1, None, params, tmp_path / "s1.pt", quiet=True)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("s1.*") if p.suffix != ".partial"} == (
        before
    )
    kept = load_checkpoint(tmp_path / "s1.pt.partial")
    assert kept["epoch"] == 1 and not kept["complete"]
    assert all(
        torch.isfinite(v).all() for v in kept["model_state"].values() if v.is_floating_point()
    )


@pytest.mark.fault(
    "a crop too small for the jigsaw granularity",
    sees="exit 2: `crop size 24 px is too small for a 8x8 jigsaw ...`",
    kept="everything: training does not start",
)
def test_too_small_images_for_the_jigsaw(tiny_synth, tmp_path):
    params = tiny_params(tiny_synth)
    params["data"].update(resize=24, crop=24)
    with pytest.raises(IagnError, match="crop size 24 px is too small for a 8x8 jigsaw"):
        train_stage.run(1, None, params, tmp_path / "s1.pt", quiet=True)


@pytest.mark.fault(
    "a params.yaml key or value that is wrong (an unknown key or expectation, a level "
    "`fatal`, a count `ten`, a non-positive max_pixels)",
    sees="exit 2: the key and what is allowed, e.g. `params.yaml validate.expectations has "
    "unknown names ['no_such_check']`, `train has unknown keys ['learning_rate']`",
    kept="everything: the step does not start",
)
def test_unknown_params_keys_are_named(tiny_synth, tmp_path):
    params = tiny_params(tiny_synth)
    params["train"]["learning_rate"] = 0.1
    with pytest.raises(IagnError, match=r"unknown keys \['learning_rate'\]"):
        train_stage.run(1, None, params, tmp_path / "s1.pt", quiet=True)


def test_auto_precision_follows_the_cpu_flags(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert precision.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert precision.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    assert precision.resolve_precision("auto", cpu) == "bf16"
    assert precision.resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(IagnError, match="fp16 needs a CUDA GPU"):
        precision.resolve_precision("fp16", cpu)
    with pytest.raises(IagnError, match="unknown precision"):
        precision.resolve_precision("int8", cpu)


def test_bf16_training_step_runs(tiny_synth, tmp_path):
    params = tiny_params(tiny_synth)
    params["train"]["precision"] = "bf16"
    result = train_stage.run(1, None, params, tmp_path / "s1.pt", quiet=True)
    assert torch.isfinite(torch.tensor(result["metrics"]["loss"]))


def test_fp16_training_scales_the_loss(tiny_synth, tmp_path, monkeypatch):
    """fp16 (a CUDA-only choice, forced onto the CPU here) trains through a GradScaler whose
    state is checkpointed; fp32 keeps no scaler state."""
    monkeypatch.setattr(train_stage_module, "resolve_precision", lambda name, device: "fp16")
    result = train_stage.run(1, None, tiny_params(tiny_synth), tmp_path / "s1.pt", quiet=True)
    assert torch.isfinite(torch.tensor(result["metrics"]["loss"]))
    checkpoint = load_checkpoint(tmp_path / "s1.pt")
    scaler = checkpoint["scaler_state"]
    # The scale starts at 2**16 and halves on every overflowing step: a power of two, > 0.
    assert scaler["scale"] > 0 and math.log2(scaler["scale"]).is_integer()
    weights = torch.cat([v.flatten().float() for v in checkpoint["model_state"].values()])
    assert torch.isfinite(weights).all()
    monkeypatch.undo()
    train_stage.run(1, None, tiny_params(tiny_synth), tmp_path / "fp32.pt", quiet=True)
    assert load_checkpoint(tmp_path / "fp32.pt")["scaler_state"] == {}


def write_params(params: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(params))
    return path


def test_paper_scale_config_is_complete_and_matches_the_recipe():
    from iagn.train.config import data_config, distill_config, model_config, stage_config

    params = load_params(REPO_ROOT / "configs" / "cub.yaml")
    data = data_config(params)
    assert (data.resize, data.crop, data.format) == (550, 448, "cub")
    model = model_config(params, 200, [])
    assert (model.backbone, model.weights) == ("resnet50", "imagenet")
    for stage in (1, 2, 3):
        config = stage_config(params, stage)
        assert config.batch_size == 16 and config.momentum == 0.9
        assert (config.lr_head, config.lr_backbone, config.weight_decay) == (0.002, 0.0002, 5e-4)
    assert distill_config(params).student == "resnet18"
    assert set(params) >= set(load_params(REPO_ROOT / "params.yaml"))
    from iagn.train.scale import scale_from_params

    # One process per GPU: 16 images a step stay the global batch on 1 to 16 GPUs.
    assert scale_from_params(params, gpus=4).procs_per_node == 4
    assert scale_from_params(params, gpus=0).world_size == 1
