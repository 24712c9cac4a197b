"""Arguments and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path


def progress_bar(total: int | None, description: str, quiet: bool, unit: str = "img"):
    """A tqdm progress bar on stderr, or None when quiet."""
    if quiet:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True, file=sys.stderr)


class PathArgument:
    """An argparse `type` for a path, checked before the command starts (`check_paths`).

    `role` is "input" (must exist, as a `shape` "file", "dir" or "any") or "output" (written
    later: must not be an existing entry of the other shape, and the nearest existing folder
    above it must be a folder, not a file). `what` names the thing in messages ("checkpoint",
    "dataset"). With `url_ok` a value with a URL scheme (or git's user@host:path) passes as
    it is. Parsing itself checks nothing (tools may parse a command line where its files do
    not exist); the CLI's main calls `check_paths` after parsing, so a failed check is
    argparse's usage error (exit code 2) naming the path and what to pass instead. What a
    file holds is for the command to check.
    """

    def __init__(
        self,
        role: str,
        shape: str,
        what: str,
        url_ok: bool = False,
        convert: Callable[[str], object] = Path,
    ):
        shapes = ("file", "dir", "any") if role == "input" else ("file", "dir")
        if role not in ("input", "output") or shape not in shapes:
            raise ValueError(f"PathArgument({role!r}, {shape!r})")
        self.role, self.shape, self.what = role, shape, what
        self.url_ok, self.convert = url_ok, convert
        self.__name__ = f"{role} {what} {dict(dir='folder', any='path').get(shape, 'file')}"

    def __call__(self, text: str):
        return self.convert(text)

    def problem(self, value: object) -> str | None:
        """What is wrong with the path `value`, or None."""
        text = str(value)
        if self.url_ok and ("://" in text or re.match(r"^[\w.-]+@[\w.-]+:", text)):
            return None
        path = Path(text or ".")
        noun = self.what + {"file": " file", "dir": " folder"}.get(self.shape, "")
        if self.role == "input":
            if not path.exists():
                hint = "; pass an existing folder or a git URL" if self.url_ok else ""
                return f"{noun} {text} does not exist{hint}"
            if self.shape == "dir" and not path.is_dir():
                return f"{text} is a file, not a folder; pass the {noun}"
            if self.shape == "file" and path.is_dir():
                return f"{text} is a folder, not a file; pass the {noun}"
            return None
        if path.exists() or path.is_symlink():
            if self.shape == "dir" and not path.is_dir():
                return f"{text} is a file, not a folder; pass a folder for the {self.what}"
            if self.shape == "file" and path.is_dir():
                return f"{text} is a folder; pass the path of the {noun} to write"
            return None
        for parent in path.absolute().parents:  # the nearest existing entry must be a folder
            if parent.exists():
                if not parent.is_dir():
                    return (
                        f"cannot write {text}: {parent} is a file, not a folder; pass a path "
                        "in a folder"
                    )
                return None
        return None


def check_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check every path argument the command line gave (defaults it left are not checked)
    before the command starts; the first problem is the subcommand's usage error (exit 2)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(args, action.dest, None)
            if chosen in action.choices:
                check_paths(action.choices[chosen], args)
            continue
        if not isinstance(action.type, PathArgument):
            continue
        value = getattr(args, action.dest, None)
        if value is None or (value is action.default and not isinstance(value, str)):
            continue
        for item in value if isinstance(value, list) else [value]:
            problem = action.type.problem(item)
            if problem:
                name = action.option_strings[-1] if action.option_strings else action.dest
                parser.error(f"argument {name}: {problem}")


def input_file(what: str, **options) -> PathArgument:
    return PathArgument("input", "file", what, **options)


def input_path(what: str, **options) -> PathArgument:
    """A file or a folder."""
    return PathArgument("input", "any", what, **options)


def input_dir(what: str, **options) -> PathArgument:
    return PathArgument("input", "dir", what, **options)


def output_file(what: str, **options) -> PathArgument:
    return PathArgument("output", "file", what, **options)


def output_dir(what: str, **options) -> PathArgument:
    return PathArgument("output", "dir", what, **options)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """`--format`: the dataset layout (the dataset folder itself is `--data` or `--root`)."""
    from iagn.data.formats import FORMAT_NAMES

    parser.add_argument(
        "--format",
        choices=FORMAT_NAMES,
        default=None,
        help="dataset layout (default: detected from the files)",
    )


DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def device_argument(text: str) -> str:
    """An argparse `type` for `--device`: auto, cpu, cuda or cuda:N, and that GPU exists."""
    if not DEVICE.match(text):
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r}; pass auto (a CUDA GPU when there is one), cpu, cuda or "
            "cuda:N"
        )
    if text.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(text.partition(":")[2] or 0)
        if index >= count:
            have = f"{count} CUDA GPU{'s' if count != 1 else ''}" if count else "no CUDA GPU"
            raise argparse.ArgumentTypeError(
                f"device {text}: this machine has {have}; pass --device cpu or auto"
            )
    return text


def add_params_argument(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--params",
        type=input_file("params"),
        default=Path("params.yaml") if not required else None,
        required=required,
        help="the project's params.yaml (hyperparameters grouped by step)",
    )


def run_scaled(args: argparse.Namespace, params: dict, batch: tuple[int, str]) -> int | None:
    """A training command under torchrun when params.yaml's `distributed:` asks for more than
    one process and no launcher started this one: its exit code. None: run it here.

    `batch`: the step's global batch and its params key, checked here so that a batch the
    processes cannot share is one message, not one per worker and torchrun's traceback."""
    from iagn.train.config import process_batch_size
    from iagn.train.scale import run_under_torchrun, scale_from_params, under_launcher

    scale = scale_from_params(params)
    if scale.world_size == 1 or under_launcher():
        return None
    process_batch_size(batch[0], scale.world_size, batch[1], scale.nodes)
    print(
        f"iagn: {scale.procs_per_node} processes under torchrun (params distributed.procs_per_"
        f"node); max {scale.max_restarts} restarts",
        file=sys.stderr,
        flush=True,
    )
    return run_under_torchrun(scale, args.argv)


def is_main_process() -> bool:
    """False on the non-zero ranks of a torchrun launch: only rank 0 reports."""
    return int(os.environ.get("RANK", "0")) == 0
