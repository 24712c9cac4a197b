"""The end of a training step: choose the served prediction, then finish the run.

The training loop (iagn/train/loop.py) knows nothing of serving: it leaves the last epoch
in `<out>.partial`. Each training step (stage, distill, baseline) then calls this: the
served prediction, its box and its temperature are chosen on the validation split
(iagn/evaluation/choose.py) and `finish_run` writes the finished checkpoint with them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from iagn.evaluation.calibration import calibration_metrics
from iagn.evaluation.choose import choose_serving
from iagn.evaluation.serving_config import ServeSettings
from iagn.train.distributed import Runtime
from iagn.train.loop import finish_run, val_loader


def finish_calibrated(
    model: torch.nn.Module,
    result: dict,
    out: Path,
    runtime: Runtime,
    prepared,
    config,
    serve: ServeSettings,
) -> dict[str, Any]:
    """Choose `model`'s serving configuration (on the main rank), write `out`;
    {"checkpoint", "history", "metrics"}.

    The configuration goes into the checkpoint (`serving`, the temperature fit's statistics
    in `calibration`) and its numbers into the last epoch's record (`metrics`,
    `<stem>.metrics.json`), which the epoch callbacks did not see.
    """
    extra, record = {}, {}
    if runtime.is_main:
        model.eval()
        serving, fitted = choose_serving(model, val_loader(prepared, config), runtime.device, serve)
        extra = {"serving": serving.to_dict(), "calibration": fitted}
        record = {
            **calibration_metrics(fitted),
            "served": serving.aggregation,
            "val_acc_served": serving.chosen_on["top1_served"],
        }
    history = finish_run(out, result, runtime, extra, record)
    return {"checkpoint": out, "history": history, "metrics": history[-1] if history else {}}
