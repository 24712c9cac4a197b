"""Distillation losses: KL divergence between temperature-softened predictions, and
attention transfer between maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Hinton's KD term, T^2 * KL(softmax(teacher / T) || softmax(student / T)).

    The teacher side is detached: the stage heads learn from the fused head, the fused head
    does not bend towards them. The T^2 factor keeps gradient scale independent of T.
    """
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    teacher = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    student = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(student, teacher, reduction="batchmean") * temperature**2


def attention_transfer_loss(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017) between two maps of a batch.

    student_map [B, h, w] (e.g. each position's share of a logit), teacher_map [B, H, W] (a
    [0, 1] attention, detached): the finer map is average-pooled to the coarser grid (per
    side), each map is flattened and L2-normalized, and the loss is the squared distance
    between them summed over positions, averaged over the batch: 0 when the maps are
    proportional, at most 4.
    """
    if student_map.shape[0] == 0:
        return student_map.sum() * 0.0
    teacher = teacher_map.detach().float()
    student = student_map.float()
    grid = tuple(min(a, b) for a, b in zip(student.shape[-2:], teacher.shape[-2:], strict=True))
    student = F.adaptive_avg_pool2d(student.unsqueeze(1), grid).flatten(1)
    teacher = F.adaptive_avg_pool2d(teacher.unsqueeze(1), grid).flatten(1)
    difference = F.normalize(student, dim=1) - F.normalize(teacher, dim=1)
    return difference.pow(2).sum(dim=1).mean()
