"""The arms of the time-to-accuracy benchmark and the one training loop they all run.

Every arm trains with the training loop's optimizer (bench/common.py `loop_sgd`), its warm-up
+ cosine schedule stepped once per batch, gradient clipping, memory format and precision
(all from the stage-3 config of params.yaml), on the same batches for a given seed. Only
what one batch does differs:
  - ours_split / ours_all: our stage-3 step (iagn/train/stage_step.py) from scratch, with
    `jigsaw_views: split` or `all` (PMG's jigsaw work per image); one optimizer step, as
    iagn/train/loop.py takes it (without its per-epoch checkpoint writes);
  - pmg: the PMG research loop with PMG's heads (bench/pmg_reference.py), four sequential
    forward/backward/optimizer steps per batch;
  - plain_resnet: the same backbone with global average pool and a linear layer,
    cross-entropy (iagn/steps/baseline.py's model and loss).
The clock runs over training only (data loading included); validation pauses it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import loop_sgd
from bench.pmg_reference import PMGNet, reference_step
from iagn.evaluation.heads import accuracy_on
from iagn.models.iagn import IAGN
from iagn.models.student import Student, StudentConfig
from iagn.precision import autocast
from iagn.train.config import StageConfig, model_config, stage_config
from iagn.train.data import PreparedData
from iagn.train.loop import seed_everything, val_loader
from iagn.train.schedule import warmup_cosine
from iagn.train.stage_step import stage_step


class LossCheckError(RuntimeError):
    """An arm's training loss was not finite or did not fall: its timings mean nothing."""


@dataclass
class StepContext:
    config: StageConfig
    jigsaw: tuple[int, ...]
    precision: str
    generator: torch.Generator


# update(model, optimizer, images, labels, context) -> the batch's training loss
Update = Callable[
    [nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor, StepContext], float
]


@dataclass(frozen=True)
class Arm:
    name: str
    build: Callable[[dict, PreparedData], nn.Module]
    groups: Callable[[nn.Module, StageConfig], list[dict]]  # optimizer param groups
    update: Update
    # The prediction the arm's curve follows (`accuracy_on`'s keys), fixed in advance: the
    # one its method serves, never the best one on the validation split it is measured on.
    served: str


def one_step(loss_fn) -> Update:
    """One forward, backward and optimizer step per batch, as iagn/train/loop.py runs it."""

    def update(model, optimizer, images, labels, ctx: StepContext) -> float:
        with autocast(ctx.precision, images.device):
            loss = loss_fn(model, images, labels, ctx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if ctx.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), ctx.config.grad_clip)
        optimizer.step()
        return float(loss.detach())

    return update


def ours(views: str) -> Arm:
    def loss(model, images, labels, ctx):
        config = replace(ctx.config, jigsaw_views=views)
        return stage_step(model, images, labels, config, ctx.jigsaw, ctx.generator)[0]

    return Arm(
        f"ours_{views}",
        lambda params, data: IAGN(model_config(params, data.num_classes, data.class_names)),
        _two_groups,
        one_step(loss),
        # What iagn's chooser (iagn/evaluation/choose.py) serves on the demo data, every seed
        # of bench/results/quality.md.
        served="fused",
    )


def pmg() -> Arm:
    def build(params, data):
        model = params["model"]
        return PMGNet(
            model["backbone"], data.num_classes, model["stage_channels"], model["weights"]
        )

    def update(model, optimizer, images, labels, ctx: StepContext) -> float:
        config = ctx.config
        return reference_step(
            model, optimizer, images, labels, ctx.jigsaw, ctx.precision, config.grad_clip
        )

    # PMG's reported prediction: its heads and concatenated classifier combined.
    return Arm("pmg", build, _two_groups, update, served="combined")


def plain_resnet() -> Arm:
    def build(params, data):
        model = params["model"]
        config = StudentConfig(model["backbone"], data.num_classes, model["weights"])
        return Student(config)

    def groups(model, config):
        return [
            {"params": list(model.features.parameters()), "lr": config.lr_backbone},
            {"params": list(model.classifier.parameters()), "lr": config.lr_head},
        ]

    def loss(model, images, labels, ctx):
        return F.cross_entropy(model(images).float(), labels)

    return Arm("plain_resnet", build, groups, one_step(loss), served="student")


def _two_groups(model, config: StageConfig) -> list[dict]:
    return [
        {"params": model.backbone_parameters(), "lr": config.lr_backbone},
        {"params": model.head_parameters(), "lr": config.lr_head},
    ]


ARMS = {arm.name: arm for arm in (ours("split"), ours("all"), pmg(), plain_resnet())}


def check_losses(name: str, epoch_losses: list[list[float]]) -> None:
    """Raise LossCheckError unless every loss is finite and the last epoch's mean is below
    the first's (a loop that does not learn would make any speed figure meaningless)."""
    if len(epoch_losses) < 2:
        raise LossCheckError(f"{name}: needs at least 2 epochs to check that the loss falls")
    for epoch, losses in enumerate(epoch_losses, 1):
        bad = [value for value in losses if not math.isfinite(value)]
        if bad or not losses:
            raise LossCheckError(f"{name}: training loss not finite in epoch {epoch}: {bad[:3]}")
    first, last = statistics.fmean(epoch_losses[0]), statistics.fmean(epoch_losses[-1])
    if not last < first:
        raise LossCheckError(
            f"{name}: training loss did not fall (mean {first:.4f} in epoch 1, {last:.4f} in "
            f"epoch {len(epoch_losses)}); its accuracy and timings are not comparable"
        )


def eval_marks(batches: int, per_epoch: int) -> set[int]:
    """Batch numbers (1-based) of an epoch after which to validate; always the last one."""
    per_epoch = max(1, min(per_epoch, batches))
    return {round(batches * (k + 1) / per_epoch) for k in range(per_epoch)}


def train_arm(
    arm: Arm,
    params: dict,
    data: PreparedData,
    seed: int,
    epochs: int,
    evals_per_epoch: int,
    precision: str,
    device: torch.device,
    log: Callable[[str], None],
) -> dict:
    """Train `arm` from scratch; returns its validation curve against training seconds and
    its per-epoch mean losses. Raises LossCheckError if the loss is not finite or not falling."""
    config = replace(stage_config(params, 3), seed=seed, epochs=epochs)
    seed_everything(seed)  # the same weights and jigsaw shuffles on every run of this seed
    model = arm.build(params, data).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = loop_sgd(arm.groups(model, config), config.momentum, config.weight_decay)
    batches = len(data.loader("train", True, config.batch_size, seed, 0))
    scheduler = warmup_cosine(optimizer, round(config.warmup_epochs * batches), epochs * batches)
    ctx = StepContext(
        config, tuple(params["model"]["jigsaw"]), precision, torch.Generator().manual_seed(seed)
    )
    marks = eval_marks(batches, evals_per_epoch)
    validation = val_loader(data, config)

    def validate() -> dict:
        """The served prediction's accuracy, and every prediction's (acc_fused, ...)."""
        accuracies = accuracy_on(model, validation, device, precision)
        every = {k[4:]: v for k, v in accuracies.items() if k.startswith("acc_")}
        return {"val_acc": every[arm.served], "val_acc_by_prediction": every}

    curve = [{"seconds": 0.0, "epoch": 0.0, **validate()}]
    clock, epoch_losses = 0.0, []
    for epoch in range(epochs):
        losses = []
        model.train()
        started = time.perf_counter()
        loader = data.loader("train", True, config.batch_size, seed, epoch)
        for number, batch in enumerate(loader, 1):
            images = batch["image"].to(device)
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            loss = arm.update(model, optimizer, images, batch["label"].to(device), ctx)
            scheduler.step()
            losses.append(loss)
            if not math.isfinite(loss):
                raise LossCheckError(
                    f"{arm.name} seed {seed}: training loss became {loss} in epoch {epoch + 1}"
                )
            if number in marks:
                clock += time.perf_counter() - started
                point = {"seconds": clock, "epoch": epoch + number / batches, **validate()}
                curve.append(point)
                model.train()
                started = time.perf_counter()
        epoch_losses.append(losses)
        log(
            f"{arm.name} seed {seed} epoch {epoch + 1}/{epochs}: loss "
            f"{statistics.fmean(losses):.4f}, val acc {curve[-1]['val_acc']:.3f}, "
            f"train {clock:.1f} s"
        )
    check_losses(f"{arm.name} seed {seed}", epoch_losses)
    return {
        "epochs": epochs,
        "train_seconds": clock,
        "curve": curve,
        "epoch_losses": [statistics.fmean(losses) for losses in epoch_losses],
    }


def seconds_per_batch(
    arm: Arm, params: dict, data: PreparedData, precision: str, device: torch.device, steps: int
) -> float:
    """Median wall time of a training batch of `arm`, loading included, over `steps` batches
    after one untimed one; sizes the plain ResNet's epochs to match our wall budget."""
    config = stage_config(params, 3)
    torch.manual_seed(0)
    model = arm.build(params, data).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = loop_sgd(arm.groups(model, config), config.momentum, config.weight_decay)
    ctx = StepContext(
        config, tuple(params["model"]["jigsaw"]), precision, torch.Generator().manual_seed(0)
    )
    times = []
    started = time.perf_counter()
    for batch in data.loader("train", True, config.batch_size, 0, 0):
        images = batch["image"].to(device)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        arm.update(model, optimizer, images, batch["label"].to(device), ctx)
        times.append(time.perf_counter() - started)
        started = time.perf_counter()
        if len(times) > steps:
            break
    return statistics.median(times[1:] or times)
