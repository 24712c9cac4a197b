"""Every command-line failure is a message, never a traceback.

Every subcommand of `iagn` and `iagn-pipeline` is found by walking their argparse parsers, so
a new one is covered as soon as it is registered. Each gets an unknown option and, when it
has required arguments, none; every typed option a value of the wrong type; every path
argument a missing path, a folder where a file is expected (and the other way round), a
path below a file and, for inputs, files of the wrong kind (a text file as checkpoint, a
checkpoint as params.yaml). Each must end with exit code 2, `iagn: error: ...` or
argparse's usage error on stderr, no traceback, and leave what was there untouched.

Path arguments are typed with iagn.commands.common's `input_file` / `input_dir` /
`input_path` / `output_file` / `output_dir` (checked by `check_paths` after parsing, before
the command starts), which is how the cases below know what each one expects; a plain-text
argument must be listed in TEXT_ARGUMENTS (with why it is not a path), so a new path
argument cannot slip through untested. Path cases replace one value in a command line the
subcommand accepts (BASELINES), so a new subcommand with path arguments needs one there.

The commands run in this process (`main(argv)`; seconds for all cases instead of a fresh
interpreter each), with the environment restored after each; an exception that escapes
`main` is what the console script would have printed as a traceback. A few cases run the
real console scripts as well.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import smoke_params
from helpers import BIN, free_port, iagn, run

from iagn import cli as iagn_cli
from iagn.commands.common import PathArgument, device_argument
from pipeline import cli as pipeline_cli

PROGRAMS: dict[str, tuple[Callable[[], argparse.ArgumentParser], Callable]] = {
    "iagn": (iagn_cli.build_parser, iagn_cli.main),
    "iagn-pipeline": (pipeline_cli.build_parser, pipeline_cli.main),
}

# Arguments that take text that is not a path, and why. Every other argument is a flag, a
# number, a choice, a device or a PathArgument; test_every_argument_is_classified fails on
# one that is none of these, so a new path argument gets its type (and its cases here).
TEXT_ARGUMENTS = {
    "--rev": "a git revision",
    "--set": "KEY=VALUE params.yaml overrides",
    "--remote": "a DVC remote name",
    "targets": "DVC files or stage names, as dvc takes them (dvc names a missing one)",
    "--name": "a registered model name",
    "--image": "a container image reference",
    "--accelerator": "a Kubernetes resource name",
    "--secret": "a Kubernetes secret name",
    "--shared-volume": "a Kubernetes PersistentVolumeClaim name (mounted on the cluster)",
    "--data-repo": "the default of a pipeline parameter, read on the cluster, not here",
    "--data-rev": "the default of a pipeline parameter",
    "--tracking-uri": "the default of a pipeline parameter (a URI)",
    "--mlflow-experiment": "the default of a pipeline parameter",
    "--host": "a URL (the KFP API) or an address to listen on (iagn serve)",
    "--model": "iagn serve: an MLflow model URI (models:/iagn@champion) or a folder; MLflow "
    "resolves it (a --model of a checkpoint is a typed path)",
    "--experiment": "a KFP experiment name",
    "--param": "KEY=VALUE pipeline parameters",
    "--token": "a bearer token",
    "--namespace": "a Kubernetes namespace",
    "--run-name": "a KFP run name",
}
# Values tried on a custom argparse type (KEY=VALUE, KEY[=VALUE][:EFFECT], positive numbers):
# the first it refuses is given to the command. A type that refuses none fails the test.
BAD_CUSTOM_VALUES = ("=no-key", "key:Sometimes", "-1", "0", "many")
# Files and folders of the wrong kind for each kind of input (PathArgument.what), by their
# name in the `world` fixture.
WRONG_KINDS = {
    "checkpoint": ("notes.txt", "params.yaml", "picture.png"),
    "params": ("teacher.pt", "list.yaml", "broken.yaml", "picture.png"),
    "image": ("notes.txt", "teacher.pt"),
    "dataset": ("empty", "eval-student"),
    "evaluation": ("empty",),
    "DVC project": ("empty",),
    "project": ("empty",),
    "pipeline": ("notes.txt", "params.yaml", "teacher.pt"),
    "token": ("teacher.pt",),
    "spool": ("notes.txt", "teacher.pt", "empty", "binary.mlflow-spool-run.jsonl"),
}
# A command line each subcommand accepts (its inputs all valid), in which one input at a
# time is replaced by one of the wrong kind. Positional arguments come first, in order.
# `{new}` is a path that does not exist yet.
BASELINES = {
    "iagn data synth": ["--out", "{new}", "--params", "{params.yaml}", "--workers", "1"],
    "iagn data manifest": ["--root", "{dataset}", "--out", "{new}.csv"],
    "iagn data summary": ["--data", "{dataset}"],
    "iagn remote push": ["--project", "{dvc-project}"],
    "iagn remote pull": ["--project", "{dvc-project}"],
    "iagn remote status": ["--project", "{dvc-project}"],
    "iagn fetch-data": ["--repo", "{.}", "--out", "{new}", "--params-out", "{new}.yaml"],
    "iagn validate": [
        *("--data", "{dataset}", "--params", "{params.yaml}", "--out", "{new}", "--quiet")
    ],
    "iagn train-stage": [
        *("--stage", "2", "--init", "{teacher.pt}", "--data", "{dataset}", "--out", "{new}.pt"),
        *("--params", "{params.yaml}", "--device", "cpu", "--quiet"),
    ],
    "iagn distill": [
        *("--teacher", "{teacher.pt}", "--data", "{dataset}", "--out", "{new}.pt"),
        *("--params", "{params.yaml}", "--device", "cpu", "--quiet"),
    ],
    "iagn evaluate": [
        *("--model", "{teacher.pt}", "--data", "{dataset}", "--out", "{new}"),
        *("--params", "{params.yaml}", "--device", "cpu", "--quiet"),
    ],
    "iagn predict": ["{image.jpg}", "--model", "{teacher.pt}", "--device", "cpu"],
    "iagn explain": ["{image.jpg}", "--model", "{teacher.pt}", "--out", "{new}.png"],
    "iagn register": [
        *("--student", "{student.pt}", "--student-eval", "{eval-student}"),
        *("--teacher", "{teacher.pt}", "--teacher-eval", "{eval-teacher}"),
        *("--params", "{params.yaml}", "--out", "{new}"),
    ],
    "iagn models": ["--params", "{params.yaml}"],
    "iagn models card": ["iagn@champion", "--out", "{new}"],
    "iagn checkpoint convert": ["{teacher.pt}", "{new}.pt"],
    "iagn tracking replay": ["{empty}"],
    "iagn trainjob-node": ["--workdir", "{new}"],
    "iagn-pipeline compile": ["-o", "{new}.yaml"],
    "iagn-pipeline submit": ["--host", "{dead-host}", "--package", "{pipeline.yaml}"],
    "iagn-pipeline run-local": [],
    "iagn-pipeline sweep": ["--grid", "stage3.epochs=1,2", "--host", "{dead-host}"],
}


# --- the subcommands and their arguments, from the parsers ---------------------------------


def leaves() -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    def walk(parser, words):
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers or not subparsers[0].required:  # `iagn models` runs on its own too
            yield words, parser
        if not subparsers:
            return
        for name, sub in subparsers[0].choices.items():
            yield from walk(sub, (*words, name))

    for program, (build, _) in PROGRAMS.items():
        yield from walk(build(), (program,))


def arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    skip = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
    return [action for action in parser._actions if not isinstance(action, skip)]


def name(action: argparse.Action) -> str:
    return action.option_strings[-1] if action.option_strings else action.dest


def classify(action: argparse.Action) -> str | None:
    if isinstance(action.type, PathArgument):
        return "path"
    if action.type is device_argument:
        return "device"
    if action.nargs == 0:
        return "flag"
    if action.choices:
        return "choice"
    if action.type in (int, float):
        return "number"
    if callable(action.type) and action.type not in (str, Path):
        return "custom"
    if action.type is None and name(action) in TEXT_ARGUMENTS:
        return "text"
    return None


LEAVES = {" ".join(words): parser for words, parser in leaves()}


def cases(kinds: tuple[str, ...]) -> list:
    """(command, action) for every argument of a kind in `kinds`, with readable ids."""
    found = []
    for command, parser in LEAVES.items():
        for action in arguments(parser):
            if classify(action) in kinds:
                found.append(pytest.param(command, action, id=f"{command} {name(action)}"))
    return found


def path_cases(role: str, shape: str | None = None) -> list:
    return [
        case
        for case in cases(("path",))
        if case.values[1].type.role == role
        and (shape is None or case.values[1].type.shape == shape)
    ]


# --- running a command in this process ------------------------------------------------------


@dataclass
class Outcome:
    code: int
    out: str
    err: str


def run_cli(argv: list, capfd) -> Outcome:
    """`argv` (program first) through the program's main(), as its console script would."""
    _, main = PROGRAMS[argv[0]]
    saved = dict(os.environ)
    try:
        code = main([str(arg) for arg in argv[1:]])
    except SystemExit as stop:  # argparse's usage errors
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    except Exception:  # what the console script would print
        traceback.print_exc()
        code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved)
    out, err = capfd.readouterr()
    return Outcome(code, out, err)


def assert_message(outcome: Outcome, *named: str) -> None:
    """Exit code 2, `<program>: error: ...` or argparse's usage error, no traceback."""
    shown = f"exit code {outcome.code}\n--- stdout\n{outcome.out}\n--- stderr\n{outcome.err}"
    assert "Traceback" not in outcome.err, shown
    assert outcome.code == 2, shown
    assert re.search(r"^iagn(-pipeline)?( [\w-]+)*: error: \S", outcome.err, re.MULTILINE), shown
    for text in named:
        assert text in outcome.err, f"{text!r} is not named\n{shown}"


def assert_nothing_written(world: Path) -> None:
    """No file where the command would have written (an empty folder may be left)."""
    written = [p for new in world.glob("new-output*") for p in [new, *new.rglob("*")]]
    assert not [p for p in written if p.is_file()], f"a failed command wrote {written}"
    for new in world.glob("new-output*"):
        shutil.rmtree(new)


def refuses(check: Callable[[str], object], value: str) -> bool:
    try:
        check(value)
    except (argparse.ArgumentTypeError, TypeError, ValueError):
        return True
    return False


def snapshot(path: Path) -> dict[str, bytes] | bytes:
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


# --- the world the commands run in ----------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A project folder with the smoke params, a dataset, one trained checkpoint and files of
    every wrong kind. The student checkpoint is the teacher's relabelled: the cases only load
    it to check it, never run it."""
    from iagn.checkpoint import load_checkpoint, save_checkpoint
    from iagn.data.synth import SynthConfig, generate
    from iagn.steps import train_stage

    root = tmp_path_factory.mktemp("cli-errors")
    params = smoke_params()
    params["data"]["root"] = str(root / "dataset")
    params["register"]["register_teacher"] = True
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    dataset = generate(root / "dataset", SynthConfig(**params["data"]["synth"]))
    train_stage.run(1, None, params, root / "teacher.pt", quiet=True)
    student = load_checkpoint(root / "teacher.pt")
    student["kind"] = "student"
    save_checkpoint(root / "student.pt", student)
    digest = student["data"]["digest"]
    for kind in ("teacher", "student"):
        (root / f"eval-{kind}").mkdir()
        metrics = {"kind": kind, "data_digest": digest, "top1": 1.0}
        (root / f"eval-{kind}" / "metrics.json").write_text(json.dumps(metrics))
    shutil.copy(next((dataset / "images").rglob("*.jpg")), root / "image.jpg")
    (root / "notes.txt").write_text("not what the command reads\n")
    (root / "list.yaml").write_text("- a list\n- not a mapping\n")
    (root / "broken.yaml").write_text("data: [unclosed\n")
    from PIL import Image

    Image.new("RGB", (8, 8), "white").save(root / "picture.png")
    (root / "empty").mkdir()
    (root / "binary.mlflow-spool-run.jsonl").write_bytes(bytes(range(256)))
    (root / "dvc-project").mkdir()
    run([BIN / "dvc", "init", "--no-scm", "--quiet"], cwd=root / "dvc-project")
    (root / "dvc-project" / "data.txt").write_text("tracked\n")
    run([BIN / "dvc", "add", "--quiet", "data.txt"], cwd=root / "dvc-project")
    pipeline_cli.main(["compile", "-o", str(root / "pipeline.yaml")])
    return root


@pytest.fixture
def in_world(world: Path, monkeypatch, capfd) -> Path:
    monkeypatch.chdir(world)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{world / 'mlflow.db'}")
    monkeypatch.delenv("IAGN_PIPELINE_RUN", raising=False)
    capfd.readouterr()  # what the fixtures printed
    return world


def fill(template: list[str], world: Path, new: Path) -> list[str]:
    values = {"new": str(new), "dead-host": f"http://127.0.0.1:{free_port()}"}

    def one(item: str) -> str:
        def field(match: re.Match) -> str:
            key = match.group(1)
            return values[key] if key in values else str(world / key)

        return re.sub(r"\{([^}]+)\}", field, item)

    return [one(item) for item in template]


def replaced(command: str, action: argparse.Action, value: str, world: Path, new: Path):
    """The command's baseline with `action`'s value replaced by `value`."""
    argv = fill(BASELINES[command], world, new)
    if action.option_strings:
        for index, item in enumerate(argv):
            if item in action.option_strings:
                argv[index + 1] = value
                break
        else:
            argv += [action.option_strings[-1], value]
    else:
        parser = LEAVES[command]
        positionals = [a for a in arguments(parser) if not a.option_strings]
        argv[positionals.index(action)] = value
    return [*command.split(), *argv]


def with_value(command: str, action: argparse.Action, value: Path, world: Path) -> list[str]:
    """The command's baseline with `action`'s value replaced: paths are checked after the
    whole command line is parsed, so the rest of it must be valid."""
    assert command in BASELINES, f"add a command line that {command} accepts to BASELINES"
    return replaced(command, action, str(value), world, world / "new-output")


def bare(command: str, action: argparse.Action, value: str, world: Path) -> list[str]:
    """The command and this one argument: argparse checks types as it parses, before it
    looks for required arguments. A positional argument after others follows their
    baseline values."""
    if action.option_strings:
        return [*command.split(), action.option_strings[-1], value]
    positionals = [a for a in arguments(LEAVES[command]) if not a.option_strings]
    before = fill(BASELINES[command], world, world / "new-output")[: positionals.index(action)]
    return [*command.split(), *before, value]


# --- the cases ------------------------------------------------------------------------------


def test_every_argument_is_classified():
    unclassified = [
        f"{command} {name(action)} (type {getattr(action.type, '__name__', action.type)})"
        for command, parser in LEAVES.items()
        for action in arguments(parser)
        if classify(action) is None
    ]
    assert not unclassified, (
        "arguments that are not a flag, number, choice, device or typed path: give a path "
        "argument a type from iagn.commands.common (input_file, input_dir, output_file, "
        "output_dir), or list a text argument in TEXT_ARGUMENTS with why it is not a path:\n"
        + "\n".join(unclassified)
    )
    assert {"iagn train-stage", "iagn checkpoint convert", "iagn-pipeline run-local"} <= set(LEAVES)


@pytest.mark.fault(
    "an unknown option, or a required argument left out",
    sees="exit 2: the command's usage and `error: unrecognized arguments: --...` (or `the "
    "following arguments are required`)",
    kept="everything: the command does not start",
)
@pytest.mark.parametrize("command", list(LEAVES))
def test_unknown_option_and_missing_arguments(command: str, in_world: Path, capfd):
    outcome = run_cli([*command.split(), "--no-such-option", "x"], capfd)
    assert_message(outcome, "usage:")
    required = [a for a in arguments(LEAVES[command]) if a.required and a.nargs not in ("*", "?")]
    if required:
        assert_message(run_cli(command.split(), capfd), "usage:", "required")


def test_predict_and_explain_take_no_params(in_world: Path, capfd):
    """The README once said they take --params; the checkpoint holds what they need."""
    for command in ("predict", "explain"):
        argv = fill(["iagn", command, *BASELINES[f"iagn {command}"]], in_world, in_world / "x")
        outcome = run_cli([*argv, "--params", "params.yaml"], capfd)
        assert_message(outcome, "unrecognized arguments: --params")


@pytest.mark.fault(
    "a value of the wrong type (a word for a number, an unknown choice, KEY=VALUE without a "
    "key, a device that is not there)",
    sees="exit 2: usage and `error: argument --stage: invalid choice: ...` (`device cuda:7: "
    "this machine has no CUDA GPU; pass --device cpu or auto`)",
    kept="everything: the command does not start",
)
@pytest.mark.parametrize(("command", "action"), cases(("number", "choice", "custom", "device")))
def test_a_value_of_the_wrong_type(command: str, action, in_world: Path, capfd):
    kind = classify(action)
    if kind == "device":
        values = ["tpu:0", "cuda:7"]
    elif kind == "custom":
        values = [value for value in BAD_CUSTOM_VALUES if refuses(action.type, value)][:1]
        assert values, f"{action.type} refuses none of {BAD_CUSTOM_VALUES}: add one it refuses"
    else:
        values = ["no-such-choice" if kind == "choice" else "many"]
    for value in values:
        assert_message(
            run_cli(bare(command, action, value, in_world), capfd), "usage:", name(action)
        )


@pytest.mark.fault(
    "a path that does not exist (dataset, checkpoint, params.yaml, image, evaluation folder, "
    "project, pipeline file, token file)",
    sees="exit 2: `error: argument --model: checkpoint file build/x.pt does not exist`",
    kept="everything: the command does not start",
)
@pytest.mark.parametrize(("command", "action"), path_cases("input"))
def test_a_missing_input(command: str, action, in_world: Path, capfd):
    missing = in_world / "no-such-dir" / f"missing-{action.dest}"
    outcome = run_cli(with_value(command, action, missing, in_world), capfd)
    assert_message(outcome, str(missing), "does not exist")


@pytest.mark.fault(
    "a folder where a file is expected, or a file where a folder is expected (inputs and outputs)",
    sees="exit 2: `error: argument --out: build/eval is a folder; pass the path of the "
    "checkpoint file to write` (or `... is a file, not a folder`)",
    kept="the file or folder given, byte for byte",
)
@pytest.mark.parametrize(
    ("command", "action"),
    [*path_cases("input", "file"), *path_cases("input", "dir"), *path_cases("output")],
)
def test_a_file_for_a_folder_and_back(command: str, action, in_world: Path, capfd):
    given = in_world / ("notes.txt" if action.type.shape == "dir" else "eval-teacher")
    before = snapshot(given)
    outcome = run_cli(with_value(command, action, given, in_world), capfd)
    assert_message(outcome, str(given))
    assert snapshot(given) == before


@pytest.mark.fault(
    "an output path below a file (`--out notes.txt/model.pt`)",
    sees="exit 2: `error: argument --out: cannot write notes.txt/model.pt: notes.txt is a "
    "file, not a folder`",
    kept="the file, byte for byte",
)
@pytest.mark.parametrize(("command", "action"), path_cases("output"))
def test_an_output_below_a_file(command: str, action, in_world: Path, capfd):
    before = snapshot(in_world / "notes.txt")
    below = in_world / "notes.txt" / "out"
    outcome = run_cli(with_value(command, action, below, in_world), capfd)
    assert_message(outcome, str(below), "is a file")
    assert snapshot(in_world / "notes.txt") == before


def wrong_kind_cases() -> list:
    found = []
    for case in path_cases("input"):
        command, action = case.values
        for wrong in WRONG_KINDS.get(action.type.what, ("(none listed)",)):
            found.append(
                pytest.param(command, action, wrong, id=f"{command} {name(action)} {wrong}")
            )
    return found


@pytest.mark.fault(
    "a file or folder of the wrong kind: a text file, a params.yaml or an image as "
    "checkpoint, a checkpoint or a YAML list as params.yaml, an empty folder as dataset or "
    "DVC project, a params.yaml as compiled pipeline",
    sees="exit 2: `iagn: error: params file teacher.pt is not a text file (a checkpoint, an "
    "image?); pass the project's params.yaml` (each names the file and what to pass)",
    kept="the given file; the command's outputs (the previous ones, if any)",
)
@pytest.mark.parametrize(("command", "action", "wrong"), wrong_kind_cases())
def test_a_file_of_the_wrong_kind(command: str, action, wrong: str, in_world: Path, capfd):
    assert action.type.what in WRONG_KINDS, (
        f"no files of the wrong kind for a {action.type.what!r} input: add some to WRONG_KINDS"
    )
    given = in_world / wrong
    before = snapshot(given)
    outcome = run_cli(with_value(command, action, given, in_world), capfd)
    assert_message(outcome, wrong)
    assert snapshot(given) == before
    assert_nothing_written(in_world)


# Values of the right type that the command must refuse: (command line, text named).
BAD_VALUES = [
    (["iagn", "data", "synth", "--out", "{new}", "--classes", "1"], "classes"),
    (["iagn", "data", "synth", "--out", "{new}", "--size", "-3"], "size"),
    (["iagn", "fetch-data", "--out", "{new}", "--params-out", "p.yaml", "--set", "x"], "--set"),
    (
        [*("iagn", "fetch-data", "--out", "{new}", "--params-out", "{new}.yaml"), "--set", "a.b=1"],
        "section 'a'",
    ),
    (
        [*("iagn", "fetch-data", "--rev", "no-such-branch", "--out", "{new}"), "--params-out", "p"],
        "no-such-branch",
    ),
    (["iagn", "models", "--name", "no-such-model"], "no-such-model"),
    (["iagn", "remote", "status", "--project", "{dvc-project}", "-r", "nowhere"], "nowhere"),
    (["iagn-pipeline", "compile", "-o", "{new}.yaml", "--gpus", "-1"], "--gpus"),
    (
        ["iagn-pipeline", "compile", "-o", "{new}.yaml", "--tracking-uri", "http://u:pw@host"],
        "credentials",
    ),
    (["iagn-pipeline", "submit", "--host", "{dead-host}", "--param", "nokey"], "nokey"),
    (["iagn-pipeline", "submit", "--host", "{dead-host}", "--param", "stage9.epochs=1"], "stage9"),
    (["iagn-pipeline", "submit", "--host", "{dead-host}"], "127.0.0.1"),
]


@pytest.mark.fault(
    "a value the command cannot use: 1 class, a negative size, an override of a params "
    "section that does not exist, a revision or remote that is not there, a registered "
    "model that does not exist, credentials in a tracking URI, an unreachable KFP host",
    sees="exit 2: one line naming the value and what to pass, e.g. `iagn: error: params "
    "override 'a.b': params.yaml has no section 'a'; sections: data, distill, ...`",
    kept="everything: nothing is written",
)
@pytest.mark.parametrize(
    ("argv", "named"), [pytest.param(*case, id=" ".join(case[0][:4])) for case in BAD_VALUES]
)
def test_a_value_the_command_cannot_use(argv, named: str, in_world: Path, capfd):
    outcome = run_cli(fill(argv, in_world, in_world / "new-output"), capfd)
    assert_message(outcome, named)
    assert_nothing_written(in_world)


@pytest.mark.fault(
    "`iagn data synth --out` naming a folder that holds something else (`--out .`, `--out data`)",
    sees="exit 2: `--out data is a folder that holds something else than a synthetic "
    "dataset, and --out is replaced as a whole; pass a new or empty folder`",
    kept="the folder and everything in it",
)
def test_synth_never_replaces_a_folder_of_something_else(in_world: Path, capfd):
    before = snapshot(in_world / "eval-teacher")
    outcome = run_cli(["iagn", "data", "synth", "--out", in_world / "eval-teacher"], capfd)
    assert_message(outcome, "eval-teacher", "something else")
    assert snapshot(in_world / "eval-teacher") == before
    # An earlier synthetic dataset is replaced, as documented.
    again = ["iagn", "data", "synth", "--params", "params.yaml", "--out", "dataset"]
    assert run_cli([*again, "--workers", "1", "--quiet"], capfd).code == 0


# --- the console scripts themselves ---------------------------------------------------------


@pytest.mark.fault(
    "`iagn fetch-data --repo` naming a local folder that does not exist",
    sees="exit 2: `error: argument --repo: project folder ... does not exist; pass an "
    "existing folder or a git URL` (the KFP step: `the project repository ... does not exist`)",
    kept="everything: nothing is fetched or written",
)
def test_fetch_data_from_a_missing_folder(tmp_path: Path):
    result = iagn(
        *("fetch-data", "--repo", tmp_path / "gone", "--out", "data", "--params-out", "p.yaml"),
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{tmp_path / 'gone'} does not exist" in result.stderr
    assert sorted(tmp_path.iterdir()) == []
    # The library call the KFP component makes says the same.
    from iagn.errors import IagnError
    from iagn.steps.fetch_data import fetch, resolve_revision

    for call in (
        lambda: resolve_revision(str(tmp_path / "gone"), ""),
        lambda: resolve_revision(str(tmp_path / "gone"), "main"),
        lambda: fetch(str(tmp_path / "gone"), "a" * 40, None, tmp_path / "d", tmp_path / "p"),
    ):
        with pytest.raises(IagnError, match="does not exist"):
            call()


def test_models_outside_a_project_lists_the_default_name(tmp_path: Path):
    """No params.yaml here: `iagn models` looks for register.model_name's default, iagn."""
    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    (tmp_path / "elsewhere").mkdir()
    result = iagn(
        "models", cwd=tmp_path / "elsewhere", env={"MLFLOW_TRACKING_URI": store}, check=False
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "no registered model named 'iagn'" in result.stderr
    assert "params" not in result.stderr


def test_the_console_scripts_print_the_same_errors(tmp_path: Path):
    (tmp_path / "folder.yaml").mkdir()
    pipeline_result = run(
        [BIN / "iagn-pipeline", "compile", "-o", "folder.yaml"], cwd=tmp_path, check=False
    )
    assert pipeline_result.returncode == 2, pipeline_result.stderr
    assert "folder.yaml is a folder" in pipeline_result.stderr
    assert "Traceback" not in pipeline_result.stderr
