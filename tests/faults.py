"""The README's table of bad inputs and faults, rendered from the tests that try them.

A test that feeds a bad input or causes a fault says so with a marker (registered in
pyproject.toml; `--strict-markers` is on):

    @pytest.mark.fault(
        "a checkpoint that holds code (a crafted pickle)",
        sees="exit 2: `... was not loaded: it holds references to posix.system ...`",
        kept="everything: nothing in the file runs, nothing is written",
    )
    def test_cli_entry_points_refuse_a_crafted_pickle(...): ...

`kind` names the bad input or fault, `sees` what the user sees, `kept` what is kept (what
was written before is never lost). The three are plain string literals, so the table is
read from the test files' syntax, without importing or collecting them (`collect`); a
kind may be marked on several tests if all of them give the same `sees` and `kept`, and on
`pytest.param(..., marks=...)` of a parametrized test.

The README holds the rendered table between `<!-- faults:begin -->` and
`<!-- faults:end -->`; tests/test_readme_faults.py fails when it differs and prints the
table to paste. `python -m tests.faults --write` (or `python tests/faults.py --write`)
rewrites that block in place; without `--write` it prints the table.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

TESTS = Path(__file__).resolve().parent
README = TESTS.parent / "README.md"
BEGIN = "<!-- faults:begin -->"
END = "<!-- faults:end -->"
MARKER = ("pytest", "mark", "fault")


@dataclass
class Fault:
    kind: str
    sees: str
    kept: str
    tests: list[str] = field(default_factory=list)  # "test_file.py::test_name"


class MarkerError(ValueError):
    """A fault marker the table cannot be rendered from (said with file and line)."""


def _is_marker(node: ast.AST) -> bool:
    """`pytest.mark.fault(...)`."""
    if not isinstance(node, ast.Call):
        return False
    parts, target = [], node.func
    while isinstance(target, ast.Attribute):
        parts.append(target.attr)
        target = target.value
    if isinstance(target, ast.Name):
        parts.append(target.id)
    return tuple(reversed(parts)) == MARKER


def _literal(node: ast.AST, what: str, where: str) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.strip():
        return " ".join(node.value.split())
    raise MarkerError(f"{where}: the fault marker's {what} must be a non-empty string literal")


def _marker_fault(call: ast.Call, where: str) -> tuple[str, str, str]:
    keywords = {keyword.arg: keyword.value for keyword in call.keywords}
    if len(call.args) != 1 or set(keywords) != {"sees", "kept"}:
        raise MarkerError(
            f"{where}: write the marker as pytest.mark.fault(KIND, sees=..., kept=...)"
        )
    return (
        _literal(call.args[0], "kind", where),
        _literal(keywords["sees"], "`sees`", where),
        _literal(keywords["kept"], "`kept`", where),
    )


def _markers(path: Path) -> list[tuple[str, tuple[str, str, str]]]:
    """(test id, (kind, sees, kept)) for every fault marker in one test file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found, seen = [], set()

    def visit(functions: list[ast.stmt], prefix: str) -> None:
        for node in functions:
            if isinstance(node, ast.ClassDef):
                visit(node.body, f"{prefix}{node.name}::")
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            for decorator in node.decorator_list:
                for call in ast.walk(decorator):
                    if _is_marker(call):
                        seen.add(id(call))
                        where = f"{path.name}:{call.lineno}"
                        found.append(
                            (f"{path.name}::{prefix}{node.name}", _marker_fault(call, where))
                        )

    visit(tree.body, "")
    for call in ast.walk(tree):  # elsewhere (a list of pytest.param): the file is the test
        if _is_marker(call) and id(call) not in seen:
            found.append((path.name, _marker_fault(call, f"{path.name}:{call.lineno}")))
    return found


def collect(tests: Path = TESTS) -> list[Fault]:
    """Every marked fault, in the order of the test files (by name) and their lines."""
    faults: dict[str, Fault] = {}
    for path in sorted(tests.glob("test_*.py")):
        for test, (kind, sees, kept) in _markers(path):
            fault = faults.setdefault(kind, Fault(kind, sees, kept))
            if (fault.sees, fault.kept) != (sees, kept):
                raise MarkerError(
                    f"{test}: fault {kind!r} is marked elsewhere ({', '.join(fault.tests)}) with "
                    "another `sees` or `kept`; give it the same, or name this kind differently"
                )
            if test not in fault.tests:
                fault.tests.append(test)
    return list(faults.values())


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(faults: list[Fault]) -> str:
    """The Markdown table, between the begin and end markers."""
    lines = [
        BEGIN,
        "| # | bad input or fault | what the user sees | what is kept | tested by |",
        "| ---: | --- | --- | --- | --- |",
    ]
    for number, fault in enumerate(faults, start=1):
        tests = "<br>".join(f"`{test}`" for test in fault.tests)
        lines.append(
            f"| {number} | {_cell(fault.kind)} | {_cell(fault.sees)} | {_cell(fault.kept)} "
            f"| {tests} |"
        )
    lines.append(END)
    return "\n".join(lines)


def readme_block(text: str) -> str | None:
    """The README's current block, markers included; None when it has none."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return None
    return text[start : end + len(END)]


def write(readme: Path = README, tests: Path = TESTS) -> bool:
    """Rewrite the README's block from the tests; True when it changed."""
    text = readme.read_text()
    block = readme_block(text)
    if block is None:
        raise MarkerError(f"{readme} has no {BEGIN} ... {END} block to rewrite")
    table = render(collect(tests))
    if block == table:
        return False
    readme.write_text(text.replace(block, table, 1))
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.faults",
        description="Render the README's table of bad inputs and faults from the tests.",
    )
    parser.add_argument("--write", action="store_true", help="rewrite README.md's block")
    args = parser.parse_args(argv)
    if args.write:
        changed = write()
        print(f"{README.name}: the faults table {'rewritten' if changed else 'is up to date'}")
    else:
        print(render(collect()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
