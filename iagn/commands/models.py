"""`iagn distill`, `iagn evaluate`, `iagn predict`, `iagn explain`."""

from __future__ import annotations

import argparse
import json

from iagn.commands.common import (
    add_data_arguments,
    add_params_argument,
    input_dir,
    input_file,
    is_main_process,
    output_dir,
    output_file,
    run_scaled,
)
from iagn.commands.train import add_device_arguments


def _params(args: argparse.Namespace) -> dict:
    from iagn.params import load_params

    params = load_params(args.params)
    if getattr(args, "format", None):
        params["data"]["format"] = args.format
    return params


def cmd_distill(args: argparse.Namespace) -> int:
    from iagn import runner
    from iagn.train.config import distill_config

    params = _params(args)
    scaled = run_scaled(args, params, (distill_config(params).batch_size, "distill.batch_size"))
    if scaled is not None:
        return scaled
    result = runner.distill(
        args.teacher, args.data, params, args.out, device=args.device, quiet=args.quiet
    )
    accuracy = result["metrics"].get("val_acc", float("nan"))
    if is_main_process():
        print(f"student done: val accuracy {accuracy:.3f}; checkpoint {result['checkpoint']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from iagn import runner

    metrics = runner.evaluate(
        args.model, args.data, _params(args), args.out, device=args.device, quiet=args.quiet
    )
    keys = ("top1", "top5", "ece", "pointing_game", "box_accuracy", "latency_ms", "throughput_ips")
    for key in keys:
        if key in metrics:
            print(f"{key:15s} {metrics[key]:.4g}")
    print(f"metrics and plots written to {args.out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from iagn.inference import ImageClassifier

    classifier = ImageClassifier.from_checkpoint(args.model, device=args.device)
    for path in args.images:
        result = classifier.predict_files([path])[0]
        print(json.dumps({"image": str(path), **result}))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from iagn.inference import ImageClassifier

    classifier = ImageClassifier.from_checkpoint(args.model, device=args.device)
    result = classifier.explain_file(args.image, args.out)
    print(
        f"{result['class_name']} ({result['probability']:.2f}), attention box "
        f"{[round(v) for v in result['box']]}; explanation written to {args.out}"
    )
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    distill = commands.add_parser(
        "distill",
        help="distill the finished teacher into a compact single-head student",
        description="The teacher's two-pass combined prediction teaches a ResNet-18 or "
        "MobileNetV3 student (KD + labels). Resumes automatically from --out.",
    )
    distill.add_argument(
        "--teacher", type=input_file("checkpoint"), required=True, help="stage 3 checkpoint"
    )
    distill.add_argument("--data", type=input_dir("dataset"), default=None, help="dataset folder")
    add_data_arguments(distill)
    distill.add_argument(
        "--out", type=output_file("checkpoint"), required=True, help="student checkpoint to write"
    )
    add_params_argument(distill, required=False)
    add_device_arguments(distill)
    distill.set_defaults(handler=cmd_distill)

    evaluate = commands.add_parser(
        "evaluate",
        help="accuracy, calibration, attention localization, confused pairs, speed, size",
        description="Evaluate a teacher or student checkpoint on the test split; writes "
        "metrics.json, confusion_matrix.png, reliability.png, attention_gallery.png, "
        "localization.png and confused_pairs.png.",
    )
    evaluate.add_argument(
        "--model", type=input_file("checkpoint"), required=True, help="teacher or student"
    )
    evaluate.add_argument("--data", type=input_dir("dataset"), default=None, help="dataset folder")
    add_data_arguments(evaluate)
    evaluate.add_argument(
        "--out", type=output_dir("evaluation"), required=True, help="output folder"
    )
    add_params_argument(evaluate, required=False)
    add_device_arguments(evaluate)
    evaluate.set_defaults(handler=cmd_evaluate)

    predict = commands.add_parser(
        "predict", help="classify images; one JSON line per image (class, top-5, box)"
    )
    predict.add_argument("images", type=input_file("image"), nargs="+", help="image files")
    predict.add_argument(
        "--model", type=input_file("checkpoint"), required=True, help="teacher or student"
    )
    add_device_arguments(predict)
    predict.set_defaults(handler=cmd_predict)

    explain = commands.add_parser(
        "explain", help="write a PNG with the attention heatmap, class, probability and box"
    )
    explain.add_argument("image", type=input_file("image"), help="image file")
    explain.add_argument(
        "--model", type=input_file("checkpoint"), required=True, help="teacher or student"
    )
    explain.add_argument("--out", type=output_file("PNG"), required=True, help="PNG to write")
    add_device_arguments(explain)
    explain.set_defaults(handler=cmd_explain)
