"""`iagn fetch-data`: the pipeline's first step, on its own (what the KFP component runs)."""

from __future__ import annotations

import argparse
import json

from iagn.commands.common import input_dir, output_dir, output_file


def cmd_fetch_data(args: argparse.Namespace) -> int:
    from iagn.errors import IagnError
    from iagn.params import parse_value
    from iagn.steps.fetch_data import fetch, resolve_revision

    overrides = {}
    for item in args.set or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise IagnError(f"--set {item!r} must look like section.key=value")
        overrides[key] = parse_value(text)
    revision = resolve_revision(args.repo, args.rev)
    print(f"data revision: {revision}")
    fetched = fetch(args.repo, revision, overrides, args.out, args.params_out)
    print(json.dumps(fetched.metadata, indent=2))
    print(f"dataset in {fetched.dataset}, params in {fetched.params}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    fetch = commands.add_parser(
        "fetch-data",
        help="get the DVC-tracked dataset and params.yaml of a project revision",
        description="Resolve a revision of a project repository (git URL or local path) and "
        "download its dataset (data.root of its params.yaml) through DVC, plus its "
        "params.yaml with overrides applied: the pipeline's fetch-data step. Without --rev, "
        "a local path is taken as the working copy (`dvc pull`, falling back to the files "
        "present). The S3 endpoint and credentials come from AWS_ENDPOINT_URL, "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or the repository's DVC config.",
    )
    fetch.add_argument(
        "--repo",
        type=input_dir("project", url_ok=True, convert=str),
        default="",
        help="git URL or local path of the project (default: .)",
    )
    fetch.add_argument(
        "--rev", default="", help="branch, tag or commit (default: the working copy / HEAD)"
    )
    fetch.add_argument(
        "--out", required=True, type=output_dir("dataset"), help="folder for the dataset"
    )
    fetch.add_argument(
        "--params-out",
        required=True,
        type=output_file("params"),
        help="where to write the run's params.yaml",
    )
    fetch.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a params.yaml key, e.g. --set stage3.epochs=2 (repeatable)",
    )
    fetch.set_defaults(handler=cmd_fetch_data)
