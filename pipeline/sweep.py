"""`iagn-pipeline sweep`: the trials of a hyperparameter sweep, from the command line.

    --grid stage3.epochs=1,2 --grid train.lr_head=0.01,0.02   the cartesian product (4 trials)
    --random 4 --dist 'train.lr_head=loguniform(0.001,0.1)'   4 draws, seeded by --seed

Distributions: `uniform(a,b)`, `loguniform(a,b)` (a, b > 0), `int(a,b)` (both ends
included) and `choice(v1,v2,...)`. Values are read as YAML scalars, so `2` is an int and
`0.5` a float; a list value keeps its brackets (`model.jigsaw=[8,4,2],[4,2,1]`). Every key
must be a params.yaml key (checked here, before anything is compiled or started).

A trial is {"trial": "t00", "overrides": {dotted key: value}}; the pipeline
(pipeline/sweep_dag.py) runs the training and evaluation sub-DAG once per trial.
"""

from __future__ import annotations

import itertools
import math
import random
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from iagn.errors import IagnError

MAX_TRIALS = 64  # more needs --max-trials: a sweep of that size is a decision, not a typo
DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
_DIST = re.compile(r"^\s*(?P<name>[a-z]+)\s*\((?P<args>.*)\)\s*$", re.DOTALL)
# MLflow search filters quote the sweep id; KFP shows it in the run's parameters.
SWEEP_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_STAGE = re.compile(r"^stage\d+$")
FLOAT_DIGITS = 6  # drawn floats are rounded: readable in run names, tables and plots


@dataclass
class Sweep:
    sweep_id: str
    kind: str  # "grid" or "random"
    keys: list[str]
    trials: list[dict[str, Any]] = field(default_factory=list)


def new_sweep_id() -> str:
    return f"sweep-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def check_sweep_id(sweep_id: str) -> str:
    if not SWEEP_ID.match(sweep_id):
        raise IagnError(
            f"--sweep-id {sweep_id!r} must be 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return sweep_id


def split_values(text: str) -> list[str]:
    """`1,2,[8,4],x` -> ["1", "2", "[8,4]", "x"]: commas inside brackets or quotes stay."""
    parts, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += char
    parts.append(current.strip())
    return parts


def _scalar(text: str, where: str) -> Any:
    from iagn.params import parse_value

    if text == "":
        raise IagnError(f"{where}: an empty value (two commas in a row, or one at the end?)")
    return parse_value(text)


def _key_and_text(item: str, flag: str, example: str) -> tuple[str, str]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise IagnError(f"{flag} {item!r} must be KEY=..., e.g. {flag} {example}")
    if "." not in key:
        raise IagnError(
            f"{flag} {key}: sweep keys are dotted params.yaml keys, e.g. {flag} {example}"
        )
    return key, text.strip()


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """`KEY=V1,V2` strings -> {key: values}, in the order given."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, text = _key_and_text(item, "--grid", "stage3.epochs=1,2")
        if key in grid:
            raise IagnError(f"--grid {key} is given twice; list all its values in one --grid")
        if not text:
            raise IagnError(f"--grid {key} has no values; give them as {key}=V1,V2")
        values = [_scalar(value, f"--grid {key}") for value in split_values(text)]
        grid[key] = values
    return grid


def _number(text: str, where: str) -> float:
    value = _scalar(text, where)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise IagnError(f"{where}: {text!r} is not a number")
    return value


@dataclass(frozen=True)
class Distribution:
    name: str
    args: tuple[Any, ...]

    def draw(self, rng: random.Random) -> Any:
        if self.name == "choice":
            return rng.choice(self.args)
        low, high = self.args
        if self.name == "int":
            return rng.randint(low, high)
        if self.name == "uniform":
            value = rng.uniform(low, high)
        else:  # loguniform
            value = math.exp(rng.uniform(math.log(low), math.log(high)))
        return float(f"{value:.{FLOAT_DIGITS}g}")


def parse_distribution(key: str, text: str) -> Distribution:
    where = f"--dist {key}"
    found = _DIST.match(text)
    if not found or found["name"] not in DISTRIBUTIONS:
        raise IagnError(
            f"{where}={text!r}: not a distribution; use uniform(a,b), loguniform(a,b), "
            "int(a,b) or choice(v1,v2,...)"
        )
    name, args = found["name"], split_values(found["args"])
    if name == "choice":
        values = tuple(_scalar(arg, where) for arg in args)
        if not values:
            raise IagnError(f"{where}: choice() needs at least one value")
        return Distribution(name, values)
    if len(args) != 2:
        raise IagnError(f"{where}: {name}(a,b) takes two numbers, got {len(args)}")
    low, high = (_number(arg, where) for arg in args)
    if name == "int" and not (isinstance(low, int) and isinstance(high, int)):
        raise IagnError(f"{where}: int(a,b) takes two integers, got {text!r}")
    if low > high:
        raise IagnError(f"{where}: {name}({low},{high}) needs a <= b")
    if name == "loguniform" and low <= 0:
        raise IagnError(f"{where}: loguniform(a,b) needs 0 < a <= b, got a = {low}")
    return Distribution(name, (low, high))


def parse_random(items: Sequence[str]) -> dict[str, Distribution]:
    dists: dict[str, Distribution] = {}
    for item in items:
        key, text = _key_and_text(item, "--dist", "'train.lr_head=loguniform(0.001,0.1)'")
        if key in dists:
            raise IagnError(f"--dist {key} is given twice")
        dists[key] = parse_distribution(key, text)
    return dists


def _trial_ids(count: int) -> list[str]:
    width = max(2, len(str(count - 1)))
    return [f"t{i:0{width}d}" for i in range(count)]


def _check_count(count: int, max_trials: int | None, what: str) -> None:
    limit = MAX_TRIALS if max_trials is None else max_trials
    if max_trials is not None and max_trials < 1:
        raise IagnError("--max-trials must be 1 or more")
    if count > limit:
        hint = (
            f"pass --max-trials {count} to run them all"
            if max_trials is None
            else f"raise --max-trials to {count}"
        )
        raise IagnError(f"{what} makes {count} trials, more than {limit}; {hint}, or sweep less")


def grid_trials(grid: Mapping[str, list[Any]], max_trials: int | None = None) -> list[dict]:
    sizes = " x ".join(str(len(values)) for values in grid.values())
    count = math.prod(len(values) for values in grid.values())
    _check_count(count, max_trials, f"the grid ({sizes})")
    combos = itertools.product(*grid.values())
    return [
        {"trial": trial, "overrides": dict(zip(grid, combo, strict=True))}
        for trial, combo in zip(_trial_ids(count), combos, strict=True)
    ]


def random_trials(
    count: int, dists: Mapping[str, Distribution], seed: int, max_trials: int | None = None
) -> list[dict]:
    if count < 1:
        raise IagnError(f"--random {count}: the number of trials must be 1 or more")
    _check_count(count, max_trials, f"--random {count}")
    rng = random.Random(seed)  # the same command draws the same trials
    return [
        {"trial": trial, "overrides": {key: dist.draw(rng) for key, dist in dists.items()}}
        for trial in _trial_ids(count)
    ]


def check_keys(keys: Sequence[str], params: Mapping[str, Any]) -> None:
    """Every swept key names a value of params.yaml (a stageN key may be any `train` key).

    Stricter than the overrides of one run: a misspelt key would run every trial alike.
    """
    for key in keys:
        parts = key.split(".")
        node: Any = params
        for depth, part in enumerate(parts):
            if isinstance(node, Mapping) and part in node:
                node = node[part]
                continue
            if depth == 1 and _STAGE.match(parts[0]) and part in params.get("train", {}):
                break  # a stage section may override any train key
            where = ".".join(parts[:depth]) or "params.yaml"
            known = ", ".join(sorted(node)) if isinstance(node, Mapping) else "(a value)"
            raise IagnError(f"sweep key {key!r}: {where} has no {part!r}; it has: {known}")
        else:
            if isinstance(node, Mapping) and node:
                raise IagnError(f"sweep key {key!r} is a section of params.yaml, not a value")


def build_sweep(
    grid: Sequence[str] = (),
    random_count: int | None = None,
    dists: Sequence[str] = (),
    seed: int = 0,
    max_trials: int | None = None,
    sweep_id: str | None = None,
    params: Mapping[str, Any] | None = None,
) -> Sweep:
    """The sweep the command line describes; `params` (params.yaml) checks the keys."""
    if grid and (random_count is not None or dists):
        raise IagnError("--grid and --random/--dist are two kinds of sweep: give one")
    if random_count is None and dists:
        raise IagnError("--dist needs --random N (how many trials to draw)")
    if random_count is not None and not dists:
        raise IagnError("--random N needs at least one --dist KEY=DIST to draw")
    if not grid and random_count is None:
        raise IagnError(
            "an empty sweep: give --grid KEY=V1,V2 (repeatable) or --random N --dist KEY=DIST"
        )
    if random_count is None:
        values = parse_grid(grid)
        keys, kind = list(values), "grid"
        if params is not None:
            check_keys(keys, params)
        trials = grid_trials(values, max_trials)
    else:
        drawn = parse_random(dists)
        keys, kind = list(drawn), "random"
        if params is not None:
            check_keys(keys, params)
        trials = random_trials(random_count, drawn, seed, max_trials)
    return Sweep(check_sweep_id(sweep_id) if sweep_id else new_sweep_id(), kind, keys, trials)


def trials_table(sweep: Sweep) -> str:
    """The trials as a plain-text table, one row each, for the console."""
    from components.pages import cell

    header = ["trial", *sweep.keys]
    rows = [[t["trial"], *(cell(t["overrides"][key]) for key in sweep.keys)] for t in sweep.trials]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        ("  " + "  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True))).rstrip()
        for row in [header, *rows]
    )
