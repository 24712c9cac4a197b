"""`iagn data ...`: create, read and summarize datasets."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from iagn.commands.common import (
    add_data_arguments,
    input_dir,
    input_file,
    output_dir,
    output_file,
    progress_bar,
)
from iagn.errors import IagnError

SYNTH_OPTIONS = ("classes", "images_per_class", "size", "seed", "train_fraction")


def cmd_data_synth(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from iagn.data.synth import SynthConfig, generate

    settings = {}
    if args.params is not None:
        from iagn.params import load_params, section

        settings = section(load_params(args.params), "data", "synth")
        known = {f.name for f in fields(SynthConfig)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise IagnError(
                f"params.yaml data.synth has unknown keys {unknown}; known: {sorted(known)}"
            )
    _check_replaceable(args.out)
    # Flags given on the command line win over params.yaml.
    settings.update({k: getattr(args, k) for k in SYNTH_OPTIONS if getattr(args, k) is not None})
    config = SynthConfig(**settings)
    config.check()
    bar = progress_bar(config.classes * config.images_per_class, "synth", args.quiet)
    try:
        out = generate(args.out, config, workers=args.workers, progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    print(
        f"wrote {config.classes * config.images_per_class} images of {config.classes} classes "
        f"({config.size}px, seed {config.seed}) to {out} in CUB-200-2011 layout"
    )
    return 0


def _check_replaceable(out: Path) -> None:
    """`--out` is replaced: only an empty folder or an earlier synthetic dataset may be."""
    from iagn.data.synth import PART_BOXES_FILE

    if not out.is_dir() or not any(out.iterdir()):
        return
    if not ((out / "images.txt").is_file() and (out / PART_BOXES_FILE).is_file()):
        raise IagnError(
            f"--out {out} is a folder that holds something else than a synthetic dataset, and "
            "--out is replaced as a whole; pass a new or empty folder (or remove this one "
            "yourself if it may go)"
        )


def cmd_data_manifest(args: argparse.Namespace) -> int:
    from iagn.data.formats import load_manifest, resolve
    from iagn.data.manifest import summarize, write_manifest

    name, root = resolve(args.root, args.format)
    options = {"level": args.level} if name == "aircraft" else {}
    manifest = load_manifest(root, name, **options)
    out = write_manifest(manifest, args.out)
    print(f"{name} dataset at {root}\n{summarize(manifest)}\nmanifest written to {out}")
    return 0


def cmd_data_summary(args: argparse.Namespace) -> int:
    from iagn.data.formats import load_manifest, resolve
    from iagn.data.manifest import manifest_digest, summarize

    name, root = resolve(args.data, args.format)
    manifest = load_manifest(root, name)
    print(f"format       {name}\nroot         {root}\n{summarize(manifest)}")
    print(f"digest       {manifest_digest(manifest)[:16]}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="create, read and summarize datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    synth = data_commands.add_parser(
        "synth",
        help="write the deterministic synthetic fine-grained dataset (CUB-200-2011 layout)",
        description="Write a synthetic fine-grained dataset whose classes differ only in the "
        "pattern of a small part, with the part's box in part_boxes.txt.",
    )
    synth.add_argument(
        "--out",
        required=True,
        type=output_dir("dataset"),
        help="output folder (replaced when it holds a synthetic dataset; any other folder "
        "that is not empty is refused)",
    )
    synth.add_argument(
        "--params",
        type=input_file("params"),
        default=None,
        help="take defaults from the data.synth section of this params.yaml",
    )
    synth.add_argument("--classes", type=int, help="number of classes (default 10)")
    synth.add_argument("--images-per-class", type=int, help="images per class (default 120)")
    synth.add_argument("--size", type=int, help="image height in pixels (default 64)")
    synth.add_argument("--seed", type=int, help="random seed (default 0)")
    synth.add_argument(
        "--train-fraction",
        type=float,
        help="fraction of each class in the train split, as in CUB (default 0.5)",
    )
    synth.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes that render images (default: all cores); output does not depend on it",
    )
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(handler=cmd_data_synth)

    manifest = data_commands.add_parser(
        "manifest",
        help="build the manifest table (CSV) of a dataset",
        description="Read a dataset in its official layout and write one manifest row per "
        "image: id, path, label, class name, split, boxes, size, content hash.",
    )
    add_data_arguments(manifest)
    manifest.add_argument("--root", required=True, type=input_dir("dataset"), help="dataset folder")
    manifest.add_argument(
        "--out", required=True, type=output_file("manifest"), help="manifest CSV to write"
    )
    manifest.add_argument(
        "--level",
        choices=("variant", "family", "manufacturer"),
        default="variant",
        help="FGVC-Aircraft label level (default variant)",
    )
    manifest.set_defaults(handler=cmd_data_manifest)

    summary = data_commands.add_parser("summary", help="print a summary of a dataset")
    summary.add_argument("--data", required=True, type=input_dir("dataset"), help="dataset folder")
    add_data_arguments(summary)
    summary.set_defaults(handler=cmd_data_summary)
