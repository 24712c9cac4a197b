"""Distillation loss: KL divergence between temperature-softened predictions."""

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
