"""The end of a training step: fit the served prediction's temperature, then finish the run.

The training loop (iagn/train/loop.py) knows nothing of calibration: it leaves the last
epoch in `<out>.partial`. Each training step (stage, distill, baseline) then calls this:
T is fitted on the validation split for the model's served prediction
(iagn/evaluation/calibration.py) and `finish_run` writes the finished checkpoint with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from iagn.evaluation.calibration import calibrate_model, calibration_metrics
from iagn.train.distributed import Runtime
from iagn.train.loop import finish_run, val_loader


def finish_calibrated(
    model: torch.nn.Module,
    result: dict,
    out: Path,
    runtime: Runtime,
    prepared,
    config,
    precision: str,
) -> dict[str, Any]:
    """Calibrate `model` (on the main rank), write `out`; {"checkpoint", "history", "metrics"}.

    The calibration goes into the checkpoint (`calibration`) and its numbers into the last
    epoch's record (`metrics`, `<stem>.metrics.json`), which the epoch callbacks did not see.
    """
    extra, record = {}, {}
    if runtime.is_main:
        model.eval()
        fitted = calibrate_model(model, val_loader(prepared, config), runtime.device, precision)
        extra, record = {"calibration": fitted}, calibration_metrics(fitted)
    history = finish_run(out, result, runtime, extra, record)
    return {"checkpoint": out, "history": history, "metrics": history[-1] if history else {}}
