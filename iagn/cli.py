"""The `iagn` command line: one subcommand per step.

Each subcommand lives in `iagn/commands/<name>.py`, parses its arguments and calls a
library function; no step logic lives in the CLI. User errors (`IagnError`) are printed
as one readable message, without a traceback.

Exit codes: 0 success, 1 a crash (a bug: traceback), 2 a user error (`IagnError`), 130
Ctrl-C, 143 (`EXIT_PREEMPTED`) training stopped by SIGTERM after saving its progress:
rerunning the same command resumes it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from iagn import __version__
from iagn.commands import (
    checkpoint,
    data,
    fetch,
    models,
    registry,
    remote,
    serve,
    tracking,
    train,
    trainjob,
    validate,
)
from iagn.commands.common import check_paths
from iagn.errors import IagnError, Preempted

# Order is the order of `iagn --help`: the pipeline's steps from data to registry.
COMMAND_MODULES = (
    data,
    remote,
    fetch,
    validate,
    train,
    models,
    registry,
    serve,
    checkpoint,
    tracking,
    trainjob,  # `iagn trainjob-node`: run by Kubeflow Trainer on each node
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iagn",
        description="IAGN: train, explain, compress and ship fine-grained image classifiers.",
    )
    parser.add_argument("--version", action="version", version=f"iagn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # a scaled step reruns it
    check_paths(parser, args)
    try:
        return args.handler(args)
    except Preempted as stopped:  # the training loop has said where it stopped
        return int(stopped.code)
    except IagnError as error:
        print(f"iagn: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("iagn: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
