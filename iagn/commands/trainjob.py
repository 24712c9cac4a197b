"""`iagn trainjob-node`: one node of a TrainJob that iagn created (iagn.trainjob.node).

Not a command to run by hand: Kubeflow Trainer runs it on every node, with what to run in
IAGN_TRAINJOB_SPEC and the node's place in PET_NNODES, PET_NODE_RANK, ... (see
iagn/trainjob/node.py).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from iagn.commands.common import output_dir


def register(commands) -> None:
    parser = commands.add_parser(
        "trainjob-node",
        help="(run by Kubeflow Trainer) one node of a multi-node training step",
        description=(
            "One node of a TrainJob that the pipeline's training task created: downloads the "
            "step's inputs, runs the step under torchrun with its peers, and on node 0 uploads "
            "the outputs. Kubeflow Trainer runs it; it reads IAGN_TRAINJOB_SPEC and PET_*."
        ),
    )
    parser.add_argument(
        "--workdir",
        type=output_dir("working files"),
        default=Path(tempfile.gettempdir()) / "iagn-trainjob",
        help="where this node keeps the inputs and outputs (default: %(default)s)",
    )
    parser.set_defaults(handler=cmd_trainjob_node)


def cmd_trainjob_node(args: argparse.Namespace) -> int:
    from iagn.trainjob.node import run_node

    return run_node(args.workdir)
