"""Imports point down only, and there are no import cycles (lazy imports included).

LAYERS below is the one place the allowed order is written. A module may import modules of
its own layer or of a layer below it, never above; the modules of an `isolated` layer (the
steps) may not import one another either. The import graph (tests/import_graph.py) counts
every import, including those inside functions, so a lazy import cannot hide an upward
import or a cycle.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
from import_graph import Import, find_cycles, load_project

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Layer:
    name: str
    prefixes: tuple[str, ...]
    isolated: bool = False  # True: its modules may not import each other


# Bottom to top. A prefix covers that module and everything under it (`iagn.tracking` covers
# the module or the package and its submodules), except the bare `iagn`, which is only the
# package's __init__ (its submodules have layers of their own).
# fmt: off
LAYERS = (
    Layer("foundation", ("iagn", "iagn.errors", "iagn.io", "iagn.redact", "iagn.params",
                         "iagn.device", "iagn.precision")),
    Layer("building blocks", ("iagn.checkpoint", "iagn.provenance", "iagn.dvc_remote",
                              "iagn.tracking",
                              "iagn.data", "iagn.models", "iagn.validation")),
    Layer("evaluation", ("iagn.evaluation",)),
    Layer("training", ("iagn.train", "iagn.trainjob")),  # trainjob: steps on several nodes
    Layer("serving", ("iagn.registry", "iagn.inference", "iagn.serving", "iagn.pyfunc_entry")),
    Layer("steps", ("iagn.steps",), isolated=True),
    Layer("model card", ("iagn.card",)),
    Layer("runner", ("iagn.runner",)),
    Layer("command line", ("iagn.commands", "iagn.cli")),
    Layer("KFP components", ("components",)),
    Layer("KFP pipeline", ("pipeline",)),
)
# fmt: on
INIT_ONLY = {"iagn"}

HOW_TO_FIX = (
    "move the imported code down to the importer's layer or below, or pass it in as an "
    "argument (a value or a callback) from the layer above"
)


def layer_of(module: str, layers: Iterable[Layer] = LAYERS) -> tuple[int, Layer, str] | None:
    """(1-based layer number, layer, matching prefix) by the longest matching prefix."""
    best = None
    for number, layer in enumerate(layers, start=1):
        for prefix in layer.prefixes:
            covers = module == prefix or (
                prefix not in INIT_ONLY and module.startswith(prefix + ".")
            )
            if covers and (best is None or len(prefix) > len(best[2])):
                best = (number, layer, prefix)
    return best


def _where(item: Import) -> str:
    lazy = f", inside {item.scope}" if item.scope else ""
    return f"{item.path.as_posix()}:{item.line}{lazy}"


def layer_problems(
    imports: Iterable[Import], modules: Iterable[str], layers: tuple[Layer, ...] = LAYERS
) -> list[str]:
    """Modules missing from the table, upward imports, and imports between isolated peers."""
    problems = []
    for module in sorted(modules):
        if layer_of(module, layers) is None:
            problems.append(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")
    for item in imports:
        source, target = layer_of(item.importer, layers), layer_of(item.target, layers)
        if source is None or target is None or item.importer == item.target:
            continue  # a module with no layer is reported above (or by the import's module)
        source_text = f"layer {source[0]} ({source[1].name})"
        target_text = f"layer {target[0]} ({target[1].name})"
        if target[0] > source[0]:
            problems.append(
                f"{_where(item)}: {item.importer} [{source_text}] imports {item.target} "
                f"[{target_text}], a higher layer; imports point down only: {HOW_TO_FIX}"
            )
        elif (
            target[0] == source[0]
            and source[1].isolated
            and target[2] == source[2]
            and item.target != source[2]  # the package's __init__ is not a peer
            and item.importer != source[2]
        ):
            problems.append(
                f"{_where(item)}: {item.importer} [{source_text}] imports {item.target} "
                f"[{target_text}]: modules of the {source[1].name} layer never import each "
                f"other: move what both need down into a lower layer, or pass it in as an "
                f"argument (the runner composes steps)"
            )
    return problems


def cycle_problems(imports: Iterable[Import]) -> list[str]:
    """Every import cycle, each edge with the file and line that makes it."""
    imports = list(imports)
    graph: dict[str, set[str]] = {}
    first: dict[tuple[str, str], Import] = {}
    for item in imports:
        if item.importer == item.target:
            continue
        graph.setdefault(item.importer, set()).add(item.target)
        key = (item.importer, item.target)
        if key not in first or item.line < first[key].line:
            first[key] = item
    problems = []
    for cycle in find_cycles(graph):
        steps = " -> ".join(f"{b} ({_where(first[a, b])})" for a, b in itertools.pairwise(cycle))
        problems.append(
            f"import cycle: {cycle[0]} -> {steps}; lazy imports count too: break it: {HOW_TO_FIX}"
        )
    return problems


@pytest.fixture(scope="module")
def project():
    return load_project(REPO_ROOT)


def test_layer_table_is_consistent():
    seen: dict[str, str] = {}
    for layer in LAYERS:
        for prefix in layer.prefixes:
            assert prefix not in seen, f"{prefix} is in layers {seen[prefix]} and {layer.name}"
            seen[prefix] = layer.name


def test_every_module_has_a_layer(project):
    missing = [p for p in layer_problems([], project.modules) if "is in no layer" in p]
    assert not missing, "\n".join(missing)


def test_imports_point_down_only(project):
    problems = [p for p in layer_problems(project.imports, []) if "is in no layer" not in p]
    assert not problems, f"{len(problems)} import(s) break the layering:\n" + "\n".join(problems)


def test_no_import_cycles(project):
    problems = cycle_problems(project.imports)
    assert not problems, "\n".join(problems)


def _fake(importer: str, line: int, target: str, scope: str | None = None) -> Import:
    path = Path(*importer.split(".")).with_suffix(".py")
    return Import(importer, path, line, target, scope)


def test_the_checker_reports_upward_imports_peers_and_cycles():
    """The checks above can fail: a made-up graph with each kind of problem."""
    imports = [
        _fake("iagn.io", 3, "iagn.errors"),  # down: fine
        _fake("iagn.io", 7, "iagn.runner", scope="load"),  # up, lazily
        _fake("iagn.steps.evaluate", 5, "iagn.steps.train_stage"),  # steps import a step
        _fake("iagn.steps.evaluate", 6, "iagn.steps"),  # the package __init__: fine
        _fake("iagn.train.loop", 9, "iagn.evaluation.calibration"),  # a cycle, lazy on one side
        _fake("iagn.evaluation.calibration", 4, "iagn.train.loop", scope="fit"),
        _fake("iagn.evaluation.metrics", 2, "iagn.evaluation.plots"),  # same layer: fine
    ]
    problems = layer_problems(imports, ["iagn.io", "iagn.nowhere_yet"])
    assert problems[0].startswith("iagn.nowhere_yet is in no layer")
    upward = [p for p in problems if "a higher layer" in p]
    assert len(upward) == 2, problems
    assert upward[0].startswith("iagn/io.py:7, inside load: iagn.io [layer 1 (foundation)]")
    assert "imports iagn.runner [layer 8 (runner)]" in upward[0]
    assert "move the imported code down" in upward[0] and "pass it in" in upward[0]
    # The loop (layer 4) importing the calibration (layer 3) points down; the calibration's
    # lazy import of the loop points up.
    assert upward[1].startswith("iagn/evaluation/calibration.py:4, inside fit:")
    peers = [p for p in problems if "never import each other" in p]
    assert len(peers) == 1 and "iagn/steps/evaluate.py:5" in peers[0], problems

    cycles = cycle_problems(imports)
    assert cycles == [
        "import cycle: iagn.evaluation.calibration -> iagn.train.loop "
        "(iagn/evaluation/calibration.py:4, inside fit) -> iagn.evaluation.calibration "
        f"(iagn/train/loop.py:9); lazy imports count too: break it: {HOW_TO_FIX}"
    ]
    assert not cycle_problems(imports[:4])
