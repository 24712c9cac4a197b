"""One progressive training step (iagn/train/stage_step.py) on a tiny IAGN, batch of 8,
and what a stage run makes of it.

What the step hands the model (how many jigsaw views leave at each tap), which label and
which distillation target each view is scored against, and that the fused head, the
teacher, gets no gradient from the distillation terms. Then stage 1 -> stage 2 on the tiny
dataset: stage 2 starts from `--init` and leaves head 3 alone; each stage validates with
its own heads.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_training import tiny_params

import iagn.steps.train_stage as train_stage_module
import iagn.train.stage_step as stage_step_module
from iagn.checkpoint import load_checkpoint, save_checkpoint
from iagn.models.iagn import IAGN, ModelConfig
from iagn.steps import train_stage
from iagn.steps.train_stage import build_model
from iagn.train.config import StageConfig, stage_config
from iagn.train.data import prepare_step_data
from iagn.train.loop import finish_run, seed_everything
from iagn.train.stage_step import ActiveHeads, stage_step

BATCH = 8
JIGSAW = (8, 4, 2)
SIZE = 64  # a multiple of every granularity: a jigsaw view holds exactly its image's pixels


class Spy(torch.nn.Module):
    """The model, recording what every call got and returned (stage_step unwraps `.module`,
    as for DDP, for its no-grad attention pass; the training forward goes through here)."""

    def __init__(self, module: IAGN):
        super().__init__()
        self.module = module
        self.calls: list[dict] = []

    def forward(self, x, exits=(0, 0, 0), heads=3):
        output = self.module(x, exits, heads=heads)
        self.calls.append({"inputs": x.detach(), "exits": exits, "heads": heads, "out": output})
        return output


@pytest.fixture(scope="module")
def model() -> IAGN:
    torch.manual_seed(0)
    return IAGN(ModelConfig(num_classes=BATCH, stage_channels=16))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """8 random images with 8 distinct labels (one class per image: a label names its image)."""
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(BATCH, 3, SIZE, SIZE, generator=generator)
    return images, torch.randperm(BATCH, generator=generator)


def config(stage: int, views: str = "split", **overrides) -> StageConfig:
    return StageConfig(stage=stage, jigsaw_views=views, **overrides)


def source_of(views: torch.Tensor, images: torch.Tensor) -> list[int]:
    """Which image each view was cut from: a jigsaw moves patches, so a view has exactly
    its image's pixel values, in another order."""
    keys = images.flatten(1).sort(dim=1).values
    found = []
    for view in views.flatten(1).sort(dim=1).values:
        matches = [i for i, key in enumerate(keys) if torch.equal(key, view)]
        assert len(matches) == 1, "a view matches no image (or several)"
        found.append(matches[0])
    return found


@pytest.mark.parametrize(
    ("stage", "views", "exits"),
    [
        (2, "split", (4, 4, 0)),
        (3, "split", (3, 3, 2)),
        (2, "all", (8, 8, 0)),
        (3, "all", (8, 8, 8)),
    ],
)
def test_jigsaw_views_leave_at_their_granularity_tap(model, stage, views, exits):
    """`split` gives every image one view at one active granularity, `all` one at each; the
    whole images follow the views unchanged, then the attention crops; heads 1..s only."""
    images, labels = batch()
    spy = Spy(model)
    generator = torch.Generator().manual_seed(2)
    loss, logs = stage_step(spy, images, labels, config(stage, views), JIGSAW, generator)
    (call,) = spy.calls
    assert call["exits"] == exits and call["heads"] == stage
    crops = round(BATCH * 0.25)
    assert call["inputs"].shape[0] == sum(exits) + BATCH + crops
    torch.testing.assert_close(call["inputs"][sum(exits) : sum(exits) + BATCH], images)
    out = call["out"]
    assert [len(logits) for logits in out.exit_logits] == list(exits)
    assert len(out.full_stage_logits) == stage
    assert out.fused_logits.shape[0] == BATCH + crops
    # Every view is a real jigsaw (patches moved), and `split` uses each image once.
    start = 0
    for k, count in enumerate(exits):
        part = call["inputs"][start : start + count]
        sources = source_of(part, images)
        assert not any(torch.equal(v, images[i]) for v, i in zip(part, sources, strict=True))
        if views == "all" and count:
            assert sorted(sources) == list(range(BATCH)), k
        start += count
    if views == "split":
        assert sorted(source_of(call["inputs"][: sum(exits)], images)) == list(range(BATCH))
    assert {f"loss_head{k}" for k in range(1, stage + 1)} <= set(logs)
    assert f"loss_head{stage + 1}" not in logs and torch.isfinite(loss)


@pytest.mark.parametrize("views", ["split", "all"])
def test_each_view_is_scored_against_its_own_label_and_teacher(model, monkeypatch, views):
    """Cross-entropy targets and distillation targets of every jigsaw view belong to the
    image the view was cut from (the views are shuffled among granularities)."""
    images, labels = batch()
    targets, kd_pairs = [], []
    real_kd = stage_step_module.kd_loss

    def cross_entropy(logits, target):
        targets.append(target)
        return F.cross_entropy(logits, target)

    def kd_loss(student, teacher, temperature):
        kd_pairs.append((student, teacher))
        return real_kd(student, teacher, temperature)

    monkeypatch.setattr(stage_step_module, "F", SimpleNamespace(cross_entropy=cross_entropy))
    monkeypatch.setattr(stage_step_module, "kd_loss", kd_loss)
    spy = Spy(model)
    generator = torch.Generator().manual_seed(3)
    stage_step(spy, images, labels, config(3, views), JIGSAW, generator)
    (call,) = spy.calls
    out = call["out"]
    fused_whole = out.fused_logits[:BATCH]
    # Fused head first: the whole images' own labels (then the attention crops').
    assert torch.equal(targets[0][:BATCH], labels)
    start = 0
    for k, count in enumerate(call["exits"]):
        sources = source_of(call["inputs"][start : start + count], images)
        assert torch.equal(targets[1 + k], labels[sources]), f"head {k + 1}"
        jig_student, jig_teacher = kd_pairs[2 * k]
        whole_student, whole_teacher = kd_pairs[2 * k + 1]
        assert jig_student is out.exit_logits[k]
        torch.testing.assert_close(jig_teacher, fused_whole[sources], rtol=0, atol=0)
        assert torch.equal(whole_student, out.full_stage_logits[k][:BATCH])
        torch.testing.assert_close(whole_teacher, fused_whole, rtol=0, atol=0)
        start += count
    assert len(targets) == 4 and len(kd_pairs) == 6


def test_distillation_does_not_move_the_teacher(model):
    """The fused head is the teacher: its gradient is the same with and without the
    distillation terms (they reach only the stage heads and the layers under them)."""
    images, labels = batch()
    grads = []
    for alpha in (0.0, 0.5):
        student = copy.deepcopy(model)
        generator = torch.Generator().manual_seed(4)
        loss, _ = stage_step(
            student,
            images,
            labels,
            config(3, kd_alpha=alpha, attention_crop_fraction=0.0),
            JIGSAW,
            generator,
        )
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in student.named_parameters()})
    without, with_kd = grads
    for name in ("fused_head.weight", "fused_head.bias"):
        torch.testing.assert_close(with_kd[name], without[name], rtol=1e-6, atol=1e-9)
    # The test can fail: distillation does change what the stage heads learn.
    for k in range(3):
        assert not torch.allclose(with_kd[f"heads.{k}.weight"], without[f"heads.{k}.weight"])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_active_heads_is_the_model_with_heads_1_to_s(model, stage):
    images, _ = batch()
    model.eval()
    with torch.no_grad():
        view = ActiveHeads(model, stage)(images[:2])
        full = model(images[:2])
    assert len(view.full_stage_logits) == stage
    torch.testing.assert_close(view.fused_logits, full.fused_logits)
    expected = (full.fused_logits + sum(full.full_stage_logits[:stage])) / (1 + stage)
    torch.testing.assert_close(view.combined_logits(), expected)


def finish_without_serving(model, result, out, runtime, *rest):
    """`finish_calibrated` without the choice of the served prediction: just `finish_run`."""
    history = finish_run(out, result, runtime)
    return {"checkpoint": out, "history": history, "metrics": history[-1]}


@pytest.fixture(scope="module")
def stages_1_and_2(tiny_synth, tmp_path_factory) -> dict:
    """Stage 1, then stage 2 from it (`--init`) with head 3 set to numbers no fresh model
    has: if stage 2 started from anything else, or moved head 3, the head would differ."""
    out = tmp_path_factory.mktemp("stages")
    params = tiny_params(tiny_synth)
    with pytest.MonkeyPatch.context() as patch:
        # What the step does after training (the served prediction's choice, most of a
        # smoke run's time) is not looked at here.
        patch.setattr(train_stage_module, "finish_calibrated", finish_without_serving)
        first = train_stage.run(1, None, params, out / "s1.pt", quiet=True)
        s1 = load_checkpoint(out / "s1.pt")
        generator = torch.Generator().manual_seed(99)
        marked = {
            key: torch.randn(value.shape, generator=generator)
            for key, value in s1["model_state"].items()
            if key.startswith("heads.2.")
        }
        init = save_checkpoint(
            out / "s1_marked.pt", {**s1, "model_state": {**s1["model_state"], **marked}}
        )
        second = train_stage.run(2, None, params, out / "s2.pt", init, quiet=True)
    return {"params": params, "dir": out, "history": {1: first, 2: second}, "marked": marked}


def test_stage_2_from_stage_1_leaves_head_3_bit_identical(stages_1_and_2, tiny_synth):
    s1 = load_checkpoint(stages_1_and_2["dir"] / "s1.pt")["model_state"]
    s2 = load_checkpoint(stages_1_and_2["dir"] / "s2.pt")["model_state"]
    for key, value in stages_1_and_2["marked"].items():
        assert torch.equal(s2[key], value), key  # no loss, no weight decay, no momentum
    # What stage 2 trains did move: head 2 (new), head 1, the blocks and the trunk.
    for key in ("heads.1.weight", "heads.0.weight", "blocks.2.0.weight", "stem.0.weight"):
        assert not torch.equal(s2[key], s1[key]), key
    # Stage 1 left its inactive heads 2 and 3 as they were built.
    seed_everything(stage_config(stages_1_and_2["params"], 1).seed)
    prepared = prepare_step_data(None, stages_1_and_2["params"])
    fresh, _ = build_model(stages_1_and_2["params"], prepared, None, 1)
    for key, value in fresh.state_dict().items():
        if key.startswith(("heads.1.", "heads.2.")):
            assert torch.equal(s1[key], value), key


@pytest.mark.parametrize("stage", [1, 2])
def test_validation_of_stage_s_uses_heads_1_to_s(stages_1_and_2, stage):
    """`val_acc` is the combined prediction of heads 1..s and the fused head; heads not
    trained yet are neither reported nor averaged in."""
    record = stages_1_and_2["history"][stage]["history"][-1]
    reported = {key for key in record if key.startswith("val_acc_head")}
    assert reported == {f"val_acc_head{k}" for k in range(1, stage + 1)}
    checkpoint = load_checkpoint(stages_1_and_2["dir"] / f"s{stage}.pt")
    model = IAGN(ModelConfig.from_dict(checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model_state"])
    model.eval()
    prepared = prepare_step_data(None, stages_1_and_2["params"])
    batches = list(prepared.loader("val", False, 8))
    labels = torch.cat([b["label"] for b in batches])
    with torch.no_grad():
        output = model(torch.cat([b["image"] for b in batches]))
    active = (output.fused_logits + sum(output.full_stage_logits[:stage])) / (1 + stage)
    assert record["val_acc"] == pytest.approx(float((active.argmax(1) == labels).float().mean()))
