"""Temperature scaling: the fit, and that it reaches checkpoints, evaluation and prediction."""

from __future__ import annotations

import torch

from iagn.evaluation.calibration import (
    TEMPERATURE_BOUNDS,
    calibrate,
    checkpoint_temperature,
    fit_temperature,
    nll,
)
from iagn.evaluation.metrics import calibration


def sampled(logits_scale: float, n: int = 4000, classes: int = 5, seed: int = 0):
    """Labels drawn from softmax(z); the model reports z * logits_scale (>1: over-confident)."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=generator) * 2
    labels = torch.multinomial(z.softmax(1), 1, generator=generator).squeeze(1)
    return z * logits_scale, labels


def test_over_confident_logits_get_a_temperature_above_one_and_lose_calibration_error():
    logits, labels = sampled(3.0)
    temperature = fit_temperature(logits, labels)
    assert 2.4 < temperature < 3.6  # the true factor is 3
    assert nll(logits, labels, temperature) < nll(logits, labels)
    assert calibration(logits / temperature, labels)[0] < calibration(logits, labels)[0] / 2


def test_calibrated_logits_keep_a_temperature_near_one_and_under_confident_get_below_one():
    assert abs(fit_temperature(*sampled(1.0)) - 1.0) < 0.15
    assert fit_temperature(*sampled(0.3)) < 0.45


def test_degenerate_validation_sets_stay_within_bounds():
    low, high = TEMPERATURE_BOUNDS
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    all_right = fit_temperature(logits, torch.tensor([0, 1]))  # NLL falls as T -> 0
    all_wrong = fit_temperature(logits, torch.tensor([1, 0]))  # NLL falls as T -> infinity
    assert low <= all_right < 1.0 < all_wrong <= high


def test_calibrate_reports_before_and_after():
    logits, labels = sampled(3.0, n=500)
    fitted = calibrate(logits, labels, "val")
    assert fitted["split"] == "val" and fitted["images"] == 500
    assert fitted["nll_after"] < fitted["nll_before"]
    assert fitted["ece_after"] < fitted["ece_before"]
    assert checkpoint_temperature({"calibration": fitted}) == fitted["temperature"]
    assert checkpoint_temperature({}) == 1.0  # checkpoints from before calibration
