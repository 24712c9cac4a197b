"""`iagn checkpoint convert OLD NEW`: rewrite a checkpoint from before the code-free format."""

from __future__ import annotations

import argparse

from iagn.commands.common import input_file, output_file


def cmd_convert(args: argparse.Namespace) -> int:
    from iagn.checkpoint import convert_checkpoint

    target = args.new or args.old
    written = convert_checkpoint(args.old, target)
    print(f"converted {args.old} -> {written}; it loads without running any code from the file")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    checkpoint = commands.add_parser(
        "checkpoint",
        help="convert checkpoints written before the code-free format",
        description="Checkpoints hold only tensors and plain values, and loading one never "
        "runs code from the file. `convert` rewrites a checkpoint from before this format "
        "(its numpy RNG state is a numpy array); it reads the old file under the same rules, "
        "allowing only numpy arrays in addition, so it runs no code from it either.",
    )
    operations = checkpoint.add_subparsers(dest="operation", required=True, metavar="OPERATION")
    convert = operations.add_parser(
        "convert",
        help="rewrite an old-format checkpoint in the current format",
        description="Rewrite OLD in the current checkpoint format as NEW (default: OLD "
        "itself, replaced atomically). A file holding anything but a checkpoint's data is "
        "refused.",
    )
    convert.add_argument("old", type=input_file("checkpoint"), help="checkpoint to convert")
    convert.add_argument(
        "new", type=output_file("checkpoint"), nargs="?", help="file to write (default: OLD)"
    )
    convert.set_defaults(handler=cmd_convert)
