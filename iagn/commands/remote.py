"""`iagn remote push|pull|status`: DVC's remote transfers with errors that name the setting."""

from __future__ import annotations

import argparse
from pathlib import Path

from iagn.commands.common import input_dir


def cmd_remote(args: argparse.Namespace) -> int:
    from iagn.dvc_remote import configured_remote, transfer
    from iagn.errors import IagnError

    folder = args.project.absolute()
    if not any((above / ".dvc").is_dir() for above in (folder, *folder.parents)):
        raise IagnError(
            f"{args.project} is not in a DVC project (no .dvc folder in it or above it); run "
            "the command in the project's folder or pass it with --project (`dvc init` makes "
            "a new one)"
        )
    remote = configured_remote(args.project, args.remote)
    shown = remote.describe() if remote else f"DVC remote {args.remote or '(default)'}"
    if not args.quiet:
        print(f"dvc {args.operation}: {shown}")
    output = transfer(args.operation, args.project, args.targets, args.remote, args.jobs)
    if output.strip() and (not args.quiet or args.operation == "status"):
        print(output.rstrip())
    return 0


OPERATIONS = {
    "push": "upload the data and pipeline outs the project tracks",
    "pull": "download them (after git clone, or to another machine)",
    "status": "compare the local cache with the remote",
}


def register(commands: argparse._SubParsersAction) -> None:
    remote = commands.add_parser(
        "remote",
        help="push/pull data and pipeline outs to the DVC remote (S3, MinIO, a folder)",
        description="Run `dvc push`, `dvc pull` or `dvc status --cloud` against the project's "
        "DVC remote. A failure (no remote, wrong credentials, unreachable endpoint, missing "
        "bucket) is reported with the setting that fixes it. Endpoint and credentials come "
        "from .dvc/config, .dvc/config.local (git-ignored) or AWS_* variables.",
    )
    operations = remote.add_subparsers(dest="operation", required=True, metavar="OPERATION")
    for operation, summary in OPERATIONS.items():
        parser = operations.add_parser(operation, help=summary, description=summary)
        parser.add_argument(
            "targets", nargs="*", help="DVC files or stages (default: everything tracked)"
        )
        parser.add_argument(
            "-r", "--remote", default=None, help="remote name (default: core.remote)"
        )
        parser.add_argument("-j", "--jobs", type=int, default=None, help="parallel transfers")
        parser.add_argument(
            "--project",
            type=input_dir("DVC project"),
            default=Path("."),
            help="the DVC project folder (default: .)",
        )
        parser.add_argument("--quiet", action="store_true", help="print nothing on success")
        parser.set_defaults(handler=cmd_remote)
