"""`iagn tracking replay SPOOL...`: send what a step kept while MLflow did not answer."""

from __future__ import annotations

import argparse

from iagn.commands.common import input_path


def cmd_replay(args: argparse.Namespace) -> int:
    import fnmatch

    from iagn import runner
    from iagn.errors import IagnError
    from iagn.tracking import configure
    from iagn.tracking.spool import SPOOL_GLOB, describe, find_spools, replay

    for item in args.spool:  # a file named on the command line is removed once sent
        if item.is_file() and not fnmatch.fnmatch(item.name, SPOOL_GLOB):
            raise IagnError(
                f"{item} is not a spool file (its name is not {SPOOL_GLOB}); pass the spool "
                "file the step named, or the folder that holds it"
            )
    spools = find_spools(args.spool)
    if not spools:
        raise IagnError(f"no spool files ({SPOOL_GLOB}) in {', '.join(map(str, args.spool))}")
    uri = configure(check=False)  # an unreachable server is reported per spool, kept intact
    for path in spools:
        try:
            done = replay(path, handlers={"model": runner.send_model})
        except UnicodeDecodeError:
            raise IagnError(f"{path} is not a spool file (not text); it is kept as it is") from None
        runs = ", ".join(f"{run_id} ({step})" for run_id, step in done["runs"].items())
        print(f"sent to {uri}, run {runs}: {describe(done['sent'])}; {path} removed")
        for message in done["skipped"]:
            print(f"  not sent: {message}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    tracking = commands.add_parser(
        "tracking",
        help="send what steps kept while the MLflow tracking server was away",
        description="A step whose MLflow tracking server (or its artifact store) goes away "
        "keeps training and keeps what it logs in a spool file beside its output "
        "(`<output>.mlflow-spool-<run>.jsonl`). It sends it itself when the server answers "
        "again before the step ends; otherwise it prints the command to send it later.",
    )
    operations = tracking.add_subparsers(dest="operation", required=True, metavar="OPERATION")
    replay = operations.add_parser(
        "replay",
        help="send spool files to the tracking server and remove them",
        description="Send each SPOOL (a folder: every spool file below it) to the tracking "
        "server MLFLOW_TRACKING_URI names, which must be the one the step used: metrics with "
        "their epochs and times, params, tags, artifacts (as the files are now), the "
        "dataset, the model (if its checkpoint is unchanged) and the run's end. A sent spool "
        "is removed; if the server still does not answer, what is left stays in the file "
        "(exit code 2) and the same command sends it later.",
    )
    replay.add_argument("spool", type=input_path("spool"), nargs="+", help="spool file or folder")
    replay.set_defaults(handler=cmd_replay)
