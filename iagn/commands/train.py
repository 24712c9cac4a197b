"""`iagn train-stage`: train one progressive IAGN stage."""

from __future__ import annotations

import argparse

from iagn.commands.common import (
    add_data_arguments,
    add_params_argument,
    device_argument,
    input_dir,
    input_file,
    is_main_process,
    output_file,
    run_scaled,
)


def cmd_train_stage(args: argparse.Namespace) -> int:
    from iagn import runner
    from iagn.params import load_params
    from iagn.train.config import stage_config

    params = load_params(args.params)
    if args.format:
        params["data"]["format"] = args.format
    section = f"stage{args.stage}"  # a stage may override the train section's batch
    if "batch_size" not in (params.get(section) or {}):
        section = "train"
    batch = (stage_config(params, args.stage).batch_size, f"{section}.batch_size")
    scaled = run_scaled(args, params, batch)
    if scaled is not None:
        return scaled
    result = runner.train_stage(
        stage=args.stage,
        data=args.data,
        params=params,
        out=args.out,
        init=args.init,
        device=args.device,
        quiet=args.quiet,
    )
    metrics = result["metrics"]
    if not is_main_process():
        return 0
    print(
        f"stage {args.stage} done: val accuracy {metrics.get('val_acc', float('nan')):.3f} "
        f"(fused {metrics.get('val_acc_fused', float('nan')):.3f}); "
        f"checkpoint {result['checkpoint']}"
    )
    return 0


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        type=device_argument,
        default="auto",
        help="auto (CUDA when available), cpu, cuda, cuda:1, ...",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train-stage",
        help="train one progressive stage of the IAGN teacher",
        description="Stage s trains heads 1..s on jigsaw views (granularities from "
        "model.jigsaw) plus the fused head on whole images and attention crops, with "
        "stage-wise distillation. Resumes automatically from --out if a run was interrupted.",
    )
    parser.add_argument("--stage", type=int, required=True, choices=(1, 2, 3))
    parser.add_argument(
        "--data",
        type=input_dir("dataset"),
        default=None,
        help="dataset folder (default: params data.root)",
    )
    add_data_arguments(parser)
    parser.add_argument(
        "--init", type=input_file("checkpoint"), help="checkpoint of the previous stage"
    )
    parser.add_argument(
        "--out", type=output_file("checkpoint"), required=True, help="checkpoint to write"
    )
    add_params_argument(parser, required=False)
    add_device_arguments(parser)
    parser.set_defaults(handler=cmd_train_stage)
