"""`iagn remote push|pull|status`: DVC's remote transfers with errors that name the setting."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_remote(args: argparse.Namespace) -> int:
    from iagn.dvc_remote import configured_remote, transfer

    remote = configured_remote(args.project, args.remote)
    shown = remote.describe() if remote else f"DVC remote {args.remote or '(default)'}"
    if not args.quiet:
        print(f"dvc {args.operation}: {shown}")
    output = transfer(args.operation, args.project, args.targets, args.remote, args.jobs)
    if output.strip() and (not args.quiet or args.operation == "status"):
        print(output.rstrip())
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    remote = commands.add_parser(
        "remote",
        help="push/pull data and pipeline outs to the DVC remote (S3, MinIO, a folder)",
        description="Run `dvc push`, `dvc pull` or `dvc status --cloud` against the project's "
        "DVC remote. A failure (no remote, wrong credentials, unreachable endpoint, missing "
        "bucket) is reported with the setting that fixes it. Endpoint and credentials come "
        "from .dvc/config, .dvc/config.local (git-ignored) or AWS_* variables.",
    )
    remote.add_argument(
        "operation",
        choices=("push", "pull", "status"),
        help="push: upload what the project tracks; pull: download it; status: compare",
    )
    remote.add_argument(
        "targets", nargs="*", help="DVC files or stages (default: everything tracked)"
    )
    remote.add_argument("-r", "--remote", default=None, help="remote name (default: core.remote)")
    remote.add_argument("-j", "--jobs", type=int, default=None, help="parallel transfers")
    remote.add_argument(
        "--project", type=Path, default=Path("."), help="the DVC project folder (default: .)"
    )
    remote.add_argument("--quiet", action="store_true", help="print nothing on success")
    remote.set_defaults(handler=cmd_remote)
