"""The project's import graph, read statically with `ast` (nothing is imported or executed).

Every `import` / `from ... import` in every .py file under the project packages is
recorded, wherever it sits: at module level, inside a function (a lazy import), under
`if TYPE_CHECKING:`. Relative imports are resolved against the importing module's package,
and `from pkg import name` points at the module `pkg.name` when that module exists (else at
`pkg`). Used by tests/test_layers.py (layers, cycles) and tests/test_dvc_deps.py (what a
DVC stage's command reaches).
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_PACKAGES = ("iagn", "components", "pipeline")


@dataclass(frozen=True)
class Import:
    """One project import: `importer` (file `path`, `line`) imports module `target`.

    `scope` is the top-level function or class the import sits in (None: module level);
    `bound` is the local name it binds and `symbol` the imported name when it is not a
    module (`from iagn.errors import IagnError` binds `IagnError`, symbol `IagnError`).
    """

    importer: str
    path: Path
    line: int
    target: str
    scope: str | None
    bound: str | None = None
    symbol: str | None = None


@dataclass
class Project:
    root: Path
    modules: dict[str, Path]  # module name -> file, relative to root
    namespaces: set[str]  # package folders without __init__.py (still importable)
    imports: list[Import]
    # Per module: top-level function/class name -> the names its body uses (`x`, `x.y`).
    uses: dict[str, dict[str, set[str]]] = field(default_factory=dict)

    def __repr__(self) -> str:  # short in pytest's tracebacks
        return f"Project({self.root}, {len(self.modules)} modules)"

    def file_of(self, module: str) -> Path | None:
        return self.modules.get(module)


def module_name(relative: Path) -> str:
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def load_project(root: Path, packages: Iterable[str] = PROJECT_PACKAGES) -> Project:
    root = Path(root)
    files: dict[str, Path] = {}
    namespaces: set[str] = set()
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root)
            files[module_name(relative)] = relative
            # Every folder on the way down is importable, with or without __init__.py.
            for depth in range(1, len(relative.parts)):
                namespaces.add(".".join(relative.parts[:depth]))
    namespaces -= set(files)
    project = Project(root, files, namespaces, [])
    roots = tuple(packages)
    for name, relative in files.items():
        tree = ast.parse((root / relative).read_text(), filename=str(relative))
        is_package = relative.name == "__init__.py"
        project.imports.extend(_imports(project, name, relative, is_package, tree, roots))
        project.uses[name] = _uses(tree)
    return project


def _exists(project: Project, module: str) -> bool:
    return module in project.modules or module in project.namespaces


def _imports(project, name, relative, is_package, tree, roots) -> list[Import]:
    found: list[Import] = []
    # The top-level statement each node belongs to: its scope if a function or class.
    scope_of: dict[int, str | None] = {}
    for statement in tree.body:
        scope = (
            statement.name
            if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            else None
        )
        for node in ast.walk(statement):
            scope_of[id(node)] = scope
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        scope = scope_of.get(id(node))
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] not in roots:
                    continue
                # `import a.b.c` binds `a` (the chain a.b.c is used through it); `as x` binds c.
                bound = alias.asname or alias.name
                found.append(Import(name, relative, node.lineno, alias.name, scope, bound))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".") if package else []
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            if base.split(".")[0] not in roots:
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                bound = alias.asname or alias.name
                if alias.name != "*" and _exists(project, candidate):
                    found.append(Import(name, relative, node.lineno, candidate, scope, bound))
                else:
                    symbol = None if alias.name == "*" else alias.name
                    found.append(
                        Import(name, relative, node.lineno, base, scope, bound, symbol=symbol)
                    )
    return found


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return f"{inner}.{node.attr}" if inner else None
    return None


TOP = "<module>"  # the pseudo-scope of a module's top-level code (what runs on import)
ALL = "<all>"  # a whole dispatcher module, every function of it
# `parser.set_defaults(handler=cmd_x)` files cmd_x for argparse, not a call: which handler
# runs depends on the command line, so whoever follows a command names it as an entry.
DISPATCH_KEYWORDS = ("handler",)


def _names(nodes: Iterable[ast.AST]) -> set[str]:
    """Names used bare (`x`) and attribute chains (`x.y`, `x.y.z`) in these subtrees.

    A name that only appears as the head of a chain is not a bare use: `runner.train_stage`
    uses `runner.train_stage`, not all of `runner`.
    """
    names: set[str] = set()
    for root in nodes:
        heads: set[int] = set()
        skipped: set[int] = set()
        for node in ast.walk(root):
            if isinstance(node, ast.Attribute) and (dotted := _dotted(node)):
                names.add(dotted)
                heads.add(id(node.value))
            elif isinstance(node, ast.keyword) and node.arg in DISPATCH_KEYWORDS:
                skipped.add(id(node.value))
        hidden = heads | skipped
        for node in ast.walk(root):
            if isinstance(node, ast.Name) and id(node) not in hidden:
                names.add(node.id)
    return names


def _uses(tree: ast.Module) -> dict[str, set[str]]:
    """Per top-level function or class, and for TOP: the names its code uses."""
    uses: dict[str, set[str]] = {}
    top: list[ast.AST] = []
    for statement in tree.body:
        if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef):
            uses[statement.name] = _names([statement])
            # Decorators and defaults run on import.
            top.extend([*statement.decorator_list, *statement.args.defaults])
            top.extend(d for d in statement.args.kw_defaults if d is not None)
        elif isinstance(statement, ast.ClassDef):
            uses[statement.name] = _names([statement])
            top.extend([*statement.decorator_list, *statement.bases, *statement.keywords])
        else:
            top.append(statement)
    uses[TOP] = _names(top)
    return uses


def parents(module: str) -> list[str]:
    """The packages importing `module` runs first: a.b.c -> [a, a.b]."""
    parts = module.split(".")
    return [".".join(parts[:depth]) for depth in range(1, len(parts))]


@dataclass(frozen=True)
class Node:
    """A whole module (`function` None) or one top-level function/class of a module."""

    module: str
    function: str | None = None

    def __str__(self) -> str:
        return f"{self.module}:{self.function}" if self.function else self.module


def reach(
    project: Project,
    entries: Iterable[Node],
    by_function: Iterable[str] = (),
    accounted: Iterable[str] = (),
) -> dict[Node, tuple[Node | None, str]]:
    """Everything the entry functions can import: node -> (the node it was reached from, how).

    A module counts whole: all its imports, the lazy ones inside functions included (an
    over-approximation that is safe). The modules under a `by_function` prefix (dispatchers
    such as the CLI and the runner, one function per command or step) are followed function
    by function instead: their top-level imports, then only the functions the reached code
    uses (`runner.train_stage(...)`, `_log_model(...)`, an imported `add_device_arguments`),
    with those functions' lazy imports. A dispatcher module used in any other way (passed
    around, `getattr`) counts whole, unless it is in `accounted`: modules whose use as a
    value the caller has covered with entries (the CLI loops over its command modules to
    call each one's register()). Breadth-first, so each node's chain is a shortest one.
    """
    prefixes = tuple(by_function)
    accounted = set(accounted)

    def dispatcher(module: str) -> bool:
        return any(module == p or module.startswith(p + ".") for p in prefixes)

    by_module: dict[str, list[Import]] = {}
    for item in project.imports:
        by_module.setdefault(item.importer, []).append(item)
    found: dict[Node, tuple[Node | None, str]] = {}
    queue: deque[Node] = deque()

    def visit(node: Node, parent: Node | None, how: str) -> None:
        if node not in found:
            found[node] = (parent, how)
            queue.append(node)

    for entry in entries:
        visit(entry, None, "entry")
    while queue:
        node = queue.popleft()
        module = node.module
        for package in parents(module):
            if package in project.modules:
                visit(Node(package), node, "parent package")
        imports = by_module.get(module, [])
        if not dispatcher(module):
            for item in imports:
                # Importing a dispatcher from plain code: no telling which functions it calls.
                whole = ALL if dispatcher(item.target) else None
                visit(Node(item.target, whole), node, f"{item.path.as_posix()}:{item.line}")
            continue
        # A dispatcher module: Node(m) is its top-level code; Node(m, ALL) all of it.
        uses = project.uses.get(module, {})
        if node.function == ALL:
            visit(Node(module), node, "whole module")
            for function in uses:
                if function != TOP:
                    visit(Node(module, function), node, "whole module")
            continue
        scope = node.function
        if scope is None:
            visit(Node(module, TOP), node, "top-level code")
            continue
        visit(Node(module), node, "its module")
        in_scope = [i for i in imports if i.scope == (None if scope == TOP else scope)]
        for item in in_scope:
            visit(Node(item.target), node, f"{item.path.as_posix()}:{item.line}")
        # What the names this code uses are bound to: its own imports, then the module's.
        bindings = {i.bound: i for i in imports if i.scope is None and i.bound}
        bindings.update({i.bound: i for i in in_scope if i.bound})
        # Longest first, so `import a.b.c` wins over `import a.b` for `a.b.c.f`.
        bindings = dict(sorted(bindings.items(), key=lambda kv: -len(kv[0])))
        for name in sorted(uses.get(scope, ())):
            if name in uses and name != TOP:  # a function or class of this module
                visit(Node(module, name), node, f"uses {name}")
                continue
            # The binding the name goes through (`import a.b` binds the chain `a.b`).
            bound = next(
                (b for b in bindings if name == b or name.startswith(b + ".")),
                None,
            )
            if bound is None or not dispatcher(bindings[bound].target):
                continue
            item = bindings[bound]
            rest = name[len(bound) + 1 :]
            target_uses = project.uses.get(item.target, {})
            if item.symbol:  # `from dispatcher import function`
                if not rest and item.symbol in target_uses:
                    visit(Node(item.target, item.symbol), node, f"uses {name}")
            elif rest and "." not in rest and rest in target_uses:
                visit(Node(item.target, rest), node, f"uses {name}")
            elif not rest:
                whole = None if item.target in accounted else ALL
                visit(Node(item.target, whole), node, f"uses the module {name}")
    return found


def chain(found: Mapping[Node, tuple[Node | None, str]], node: Node) -> list[str]:
    """The way `reach` got to `node`, from its entry: ['a:f', 'b (a.py:3)', ...]."""
    steps = []
    current: Node | None = node
    while current is not None:
        parent, how = found[current]
        steps.append(str(current) if parent is None else f"{current} ({how})")
        current = parent
    return steps[::-1]


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One cycle per strongly connected component, as [a, b, ..., a]; self-imports ignored."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0
    nodes = sorted(set(graph) | {t for targets in graph.values() for t in targets})

    # Iterative Tarjan: the package's import chains are deep enough to make recursion fragile.
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child == node:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    cycles = []
    for component in components:
        members = set(component)
        first = component[0]
        # The shortest way back to `first` inside the component: a concrete cycle to show.
        path = shortest_path(
            {n: [t for t in graph.get(n, ()) if t in members] for n in members},
            [t for t in graph.get(first, ()) if t in members],
            lambda n, first=first: n == first,
        )
        cycles.append([first, *path])
    return sorted(cycles)


def shortest_path(graph: Mapping[str, Iterable[str]], starts: Iterable[str], goal) -> list[str]:
    """Breadth-first: the shortest chain from one of `starts` to a node where goal(node)."""
    parent: dict[str, str | None] = {}
    queue: deque[str] = deque()
    for start in starts:
        if start not in parent:
            parent[start] = None
            queue.append(start)
    while queue:
        node = queue.popleft()
        if goal(node):
            chain = [node]
            while parent[chain[-1]] is not None:
                chain.append(parent[chain[-1]])
            return chain[::-1]
        for child in sorted(graph.get(node, ())):
            if child not in parent:
                parent[child] = node
                queue.append(child)
    return []
