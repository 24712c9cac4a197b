"""Each dvc.yaml stage depends on all the project code its command runs, so none goes stale.

For every command of a stage: the console script (pyproject's [project.scripts]) gives the
CLI's entry function; argparse itself, fed the command's arguments, names the handler of
the subcommand. From there the import graph (tests/import_graph.py) is followed: the CLI,
its command modules and the runner function by function (they dispatch: `iagn train-stage`
reaches `runner.train_stage`, not the other steps), every other module whole, lazy imports
included. Every module reached must lie in a dep of the stage; every code dep must exist
and hold something the command reaches.
"""

from __future__ import annotations

import importlib
import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml
from import_graph import PROJECT_PACKAGES, Node, Project, chain, load_project, reach

REPO_ROOT = Path(__file__).resolve().parent.parent
# Followed function by function: the CLI parses and dispatches, the runner has one function
# per step; a stage runs only its own.
DISPATCHERS = ("iagn.cli", "iagn.commands", "iagn.runner")


def console_scripts(root: Path = REPO_ROOT) -> dict[str, str]:
    return tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]


def interpolate(text: str, params: dict) -> str:
    """DVC's `${a.b}` from params.yaml."""

    def value(match: re.Match) -> str:
        node = params
        for key in match.group(1).split("."):
            node = node[key]
        return str(node)

    return re.sub(r"\$\{\s*([\w.-]+)\s*\}", value, text)


def entries(command: str, scripts: dict[str, str]) -> tuple[list[Node], list[str]]:
    """Where a command line starts: the CLI's main, the register() of each command module
    (main calls them all to build its parser) and the handler argparse picks for these
    arguments; and the command modules, which these entries account for."""
    argv = shlex.split(command)
    assert argv[0] in scripts, (
        f"`{command}` does not run one of the project's console scripts {sorted(scripts)}; "
        "tests/test_dvc_deps.py cannot follow it"
    )
    module_name, _, function = scripts[argv[0]].partition(":")
    cli = importlib.import_module(module_name)
    commands = [m.__name__ for m in cli.COMMAND_MODULES]
    handler = cli.build_parser().parse_args(argv[1:]).handler
    found = [Node(module_name, function), *(Node(m, "register") for m in commands)]
    found.append(Node(handler.__module__, handler.__qualname__.split(".")[0]))
    return found, commands


def covered(path: PurePosixPath, deps: list[PurePosixPath]) -> bool:
    """A dep file covers itself, a dep folder everything under it."""
    return any(path == dep or dep in path.parents for dep in deps)


def stage_problems(
    name: str, stage: dict, project: Project, params: dict, scripts: dict[str, str]
) -> list[str]:
    commands = stage["cmd"] if isinstance(stage["cmd"], list) else [stage["cmd"]]
    deps = [PurePosixPath(interpolate(str(d), params)).as_posix() for d in stage.get("deps", [])]
    deps = [PurePosixPath(d.rstrip("/")) for d in deps]
    problems = []
    reached: dict[Path, list[str]] = {}
    for command in commands:
        command = interpolate(" ".join(command.split()), params)
        starts, command_modules = entries(command, scripts)
        found = reach(project, starts, DISPATCHERS, accounted=command_modules)
        for node in found:  # breadth-first order: the first chain to a file is a shortest
            path = project.file_of(node.module)
            if path is not None and path not in reached:
                reached[path] = chain(found, node)
    for path, steps in sorted(reached.items()):
        if not covered(PurePosixPath(path.as_posix()), deps):
            how = "\n      -> ".join(steps)
            problems.append(
                f"stage {name}: {path.as_posix()} is not covered by the stage's deps; its "
                f"command reaches it through\n      {how}\n"
                f"  -> add it (or its folder) to the stage's deps in dvc.yaml"
            )
    for dep in deps:
        if dep.parts[0] not in PROJECT_PACKAGES:
            continue  # data, params and other stages' outs: not code
        if not (project.root / dep).exists():
            problems.append(
                f"stage {name}: dep {dep} does not exist -> remove it from the stage's deps "
                "in dvc.yaml, or name where that code lives now"
            )
        elif not any(covered(PurePosixPath(p.as_posix()), [dep]) for p in reached):
            problems.append(
                f"stage {name}: dep {dep} holds no code the stage's command runs -> remove it "
                "from the stage's deps in dvc.yaml (it reruns the stage for nothing)"
            )
    return problems


@pytest.fixture(scope="module")
def project() -> Project:
    return load_project(REPO_ROOT)


def _pipeline() -> tuple[dict, dict]:
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    return stages, params


STAGES, PARAMS = _pipeline()


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_cover_the_code_its_command_runs(name, project):
    problems = stage_problems(name, STAGES[name], project, PARAMS, console_scripts())
    assert not problems, "\n".join(problems)


def test_the_checker_reports_a_missing_dep_with_its_import_chain(project):
    """A made-up stage runs `iagn train-stage` but lists only the step (and two wrong deps)."""
    stage = {
        "cmd": "iagn train-stage --stage 1 --data ${data.root} --out build/x.pt",
        "deps": ["${data.root}", "iagn/steps/train_stage.py", "iagn/validation", "iagn/gone.py"],
    }
    problems = stage_problems("made-up", stage, project, PARAMS, console_scripts())
    text = "\n".join(problems)
    # The step's own imports (the training loop) and the runner calling the step are missing.
    loop = next(p for p in problems if "iagn/train/loop.py is not covered" in p)
    assert "iagn.runner:train_stage" in loop and "iagn.steps.train_stage (" in loop
    assert "add it (or its folder) to the stage's deps in dvc.yaml" in loop
    assert "stage made-up: iagn/runner.py is not covered" in text
    assert "stage made-up: dep iagn/gone.py does not exist" in text
    # Dispatch is followed per function: training reaches neither the validate step nor the
    # validation package, so that dep holds nothing the stage runs.
    assert "iagn/steps/validate.py" not in text
    assert "stage made-up: dep iagn/validation holds no code the stage's command runs" in text
