"""Temperature scaling (Guo et al., ICML 2017): calibrated probabilities from one scalar.

The teacher's served prediction may average the logits of several heads and two passes,
and the student learns from targets softened by the KD temperature: on the demo data both
came out under-confident (expected calibration error 0.20, a plain ResNet's 0.05; fitted T
about 0.5, which sharpens). After training, one temperature T is fitted on the validation
split so that softmax(logits / T) of the served prediction minimizes the negative
log-likelihood there. Dividing by T > 0 keeps every argmax, so accuracy does not change;
only the probabilities people read do. T is fitted for the prediction chosen to be served
(iagn/evaluation/choose.py), stored in the checkpoint's serving configuration (its fit
statistics under `calibration`) and applied by `Predictor` wherever the model is used:
evaluation, `iagn predict` / `explain`, MLflow serving and distillation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from iagn.evaluation.metrics import calibration
from iagn.evaluation.serving_config import serving_config_of

# Beyond these a fit says more about a tiny or degenerate validation split than about the model.
TEMPERATURE_BOUNDS = (0.05, 20.0)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T in TEMPERATURE_BOUNDS minimizing the NLL of softmax(logits / T) on `labels`."""
    logits, labels = logits.detach().float(), labels.detach()
    log_t = torch.zeros(1, requires_grad=True)  # optimize log T: T stays positive
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(log_t.detach().exp().clamp(*TEMPERATURE_BOUNDS))


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits.float() / temperature, labels))


def calibrate(logits: torch.Tensor, labels: torch.Tensor, split: str) -> dict[str, Any]:
    """Fit T on the served logits of `split`; what a checkpoint stores under `calibration`."""
    temperature = fit_temperature(logits, labels)
    return {
        "temperature": temperature,
        "split": split,
        "images": len(labels),
        "nll_before": nll(logits, labels),
        "nll_after": nll(logits, labels, temperature),
        "ece_before": calibration(logits, labels)[0],
        "ece_after": calibration(logits / temperature, labels)[0],
    }


def calibration_metrics(fitted: dict[str, Any]) -> dict[str, float]:
    """A `calibrate` result as the final epoch's metrics (metrics file, MLflow)."""
    return {
        "temperature": fitted["temperature"],
        "val_ece": fitted["ece_before"],
        "val_ece_calibrated": fitted["ece_after"],
        "val_nll": fitted["nll_before"],
        "val_nll_calibrated": fitted["nll_after"],
    }


def checkpoint_temperature(checkpoint: dict) -> float:
    """The checkpoint's fitted temperature; 1 (no scaling) for checkpoints without one."""
    return serving_config_of(checkpoint).temperature
