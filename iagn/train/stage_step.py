"""One progressive multi-granularity training step, batched.

For stage s (heads 1..s active), one step on a batch of images x with labels y:

1. Jigsaw views. With `jigsaw_views: all` (default) every image gets a view at every
   active granularity n_k (8, 4, 2 for heads 1, 2, 3; PMG's schedule); with `split` the
   batch is divided among the active granularities, so every image contributes one jigsaw
   view at one granularity (less compute per step, but on the demo data the teacher
   learned far less: seed 0, stage-3 val top-1 of the fused head 0.700 against 0.917 with
   `all`, for 213 s of training against 238 s on one shared CPU thread).
2. Attention crops (a fraction of the batch): a no-grad pass gives the fused head's
   activation map for the true class; the box around its active region, grown by a random
   margin, is cut out and resized to the input size (WS-DAN-style zoom). Optionally the
   peak region is erased instead (attention drop) as a second view.
3. One forward over the concatenated batch [jigsaw views by granularity, whole images,
   attention views]: jigsaw views leave the trunk at their own tap (no deeper layers, no
   other heads), the rest run everything.
4. Loss: cross-entropy of each active stage head on its jigsaw views, plus the fused head
   on whole images and attention views, plus stage-wise knowledge distillation: every
   active stage head (on its jigsaw views and on the whole images) matches the fused head's
   softened prediction of the same image (KL at temperature T, weight alpha, teacher
   detached). One backward and one optimizer step.

The PMG research loop instead runs s + 1 sequential forward/backward/optimizer steps per
batch, each through the whole network and all heads.

BatchNorm running statistics (used by validation, serving and step 2's no-grad pass) come
from these mixed batches; they stay as trained. Recomputing them on whole training images
after a stage, weights unchanged, did not raise accuracy on the demo data: after stage 3,
seeds 0-2, mean val top-1 (combined) 0.711 as trained, 0.714 recomputed on shuffled
centre crops, 0.703 on augmented crops, 0.700-0.703 for the stage blocks only (per seed
-0.03 to +0.04; val has 120 images); test 0.742 against 0.744-0.752. The layers above
learned under the mixed normalization. (From unshuffled, class-sorted batches: val 0.561.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from iagn.models.attention import attention_drop, boxes_from_maps, crop_and_resize, expand_boxes
from iagn.models.iagn import IAGN
from iagn.models.jigsaw import jigsaw
from iagn.train.config import StageConfig
from iagn.train.losses import kd_loss


class ActiveHeads(torch.nn.Module):
    """`model` as stage `stage` trains it: a plain call applies stage heads 1..stage only,
    so the combined prediction (validation's `val_acc`) leaves out heads not trained yet.
    The fused head always counts: it reads the three stage blocks, which every stage trains.
    """

    def __init__(self, model: IAGN, stage: int):
        super().__init__()
        self.model, self.stage = model, stage

    def forward(self, x: torch.Tensor):
        return self.model(x, heads=self.stage)


def _split_indices(batch: int, parts: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(batch, generator=generator)
    return list(order.tensor_split(parts))


@torch.no_grad()
def attention_views(
    model: IAGN,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: StageConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """Attention-guided crops (and drops, if enabled) of `images`, from a no-grad pass."""
    was_training = model.training
    model.eval()
    output = model(images)
    model.train(was_training)
    cam = model.class_activation_map(output, labels)
    size = tuple(images.shape[-2:])
    boxes = boxes_from_maps(cam, size, config.attention_threshold)
    boxes = expand_boxes(boxes, size, config.attention_crop_margin, generator)
    views = [crop_and_resize(images, boxes)]
    if config.attention_drop:
        views.append(attention_drop(images, cam, config.drop_threshold))
    return torch.cat(views)


def stage_step(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: StageConfig,
    jigsaw_sizes: tuple[int, ...],
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Compute the stage loss for one batch. `model` may be wrapped in DDP."""
    raw: IAGN = getattr(model, "module", model)
    batch = images.shape[0]
    active = list(range(config.stage))
    if config.jigsaw_views == "split":
        groups = _split_indices(batch, len(active), generator)
    else:
        groups = [torch.arange(batch)] * len(active)
    views, view_labels, exits = [], [], [0, 0, 0]
    for stage, index in zip(active, groups, strict=True):
        index = index.to(images.device)
        views.append(jigsaw(images[index], jigsaw_sizes[stage], generator))
        view_labels.append(index)
        exits[stage] = len(index)

    extra = torch.empty(0, *images.shape[1:], dtype=images.dtype, device=images.device)
    extra_labels = labels[:0]
    crop_count = round(batch * config.attention_crop_fraction)
    if crop_count:
        chosen = torch.randperm(batch, generator=generator)[:crop_count].to(images.device)
        extra = attention_views(raw, images[chosen], labels[chosen], config, generator)
        extra_labels = labels[chosen].repeat(extra.shape[0] // crop_count)

    inputs = torch.cat([*views, images, extra])
    if images.is_contiguous(memory_format=torch.channels_last):
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    output = model(inputs, tuple(exits), heads=config.stage)

    full_labels = torch.cat([labels, extra_labels])
    fused_loss = F.cross_entropy(output.fused_logits.float(), full_labels)
    teacher = output.fused_logits[:batch]
    logs = {"loss_fused": float(fused_loss.detach())}
    total = fused_loss
    for stage, index in zip(active, view_labels, strict=True):
        jig_logits = output.exit_logits[stage]
        whole_logits = output.full_stage_logits[stage][:batch]
        ce = F.cross_entropy(jig_logits.float(), labels[index])
        kd = kd_loss(jig_logits, teacher[index], config.kd_temperature)
        kd = kd + kd_loss(whole_logits, teacher, config.kd_temperature)
        total = total + ce + config.kd_alpha * kd
        logs[f"loss_head{stage + 1}"] = float(ce.detach())
        logs[f"kd_head{stage + 1}"] = float(kd.detach())
    with torch.no_grad():
        logs["train_acc_fused"] = float(
            (output.fused_logits[:batch].argmax(1) == labels).float().mean()
        )
    logs["loss"] = float(total.detach())
    return total, logs
