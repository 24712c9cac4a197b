"""Checkpoints: one file with everything needed to resume, evaluate or serve.

Contents: format tag, kind ("teacher" or "student"), model config and weights, optimizer,
scheduler, fp16 loss scaler, epoch, step, RNG states, the training config, the dataset's
manifest digest and class names, the per-epoch history and whether the run is complete.
Written atomically (temporary file + rename), so a kill during the write leaves the
previous checkpoint.

Loading never runs code from the file. A checkpoint is the zip archive `torch.save` writes,
and its payload holds only `CHECKPOINT_TYPES`: tensors, dicts (state dicts are
OrderedDicts), lists, tuples, str, int, float, bool and None. So the numpy RNG state is
stored as a dict with its key as an int64 tensor (`rng_state`), not as numpy's tuple with
an ndarray. Every load (`load_checkpoint`: train-stage --init, distill --teacher, evaluate,
predict, explain and the MLflow model's `artifacts/model.pt`) checks the file three ways
before handing anything out:

1. Its pickle is read without running it (`pickletools`): every global it names must be in
   `ALLOWED_GLOBALS` (the tensor rebuild function, the storage classes, OrderedDict), and
   it may only use the pickle instructions of `torch.save`'s protocol 2.
2. Only then `torch.load(..., weights_only=True)` unpickles it, which itself refuses any
   other global.
3. The result must consist of `CHECKPOINT_TYPES` only, with the format tag.

A file naming anything else (`os.system`, a class's `__reduce__`, ...) is refused with an
`IagnError` that says so; nothing in it ran. Checkpoints written before this format (their
numpy RNG state holds an ndarray) are refused with the command that converts them,
`iagn checkpoint convert OLD NEW`, which reads them under the same rules plus numpy's
array globals (no weights_only=False anywhere).
"""

from __future__ import annotations

import contextlib
import io
import pickle
import pickletools
import random
import shlex
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iagn.errors import IagnError
from iagn.io import write_bytes_atomic

FORMAT = "iagn-checkpoint/1"

# The only Python types a checkpoint's payload consists of (exact types, no subclasses).
CHECKPOINT_TYPES = (
    dict,
    OrderedDict,
    list,
    tuple,
    str,
    int,
    float,
    bool,
    type(None),
    torch.Tensor,
)
_TYPE_NAMES = "tensors, dicts, lists, tuples, str, int, float, bool and None"

# Everything `torch.save` of such a payload names in its pickle: tensors are rebuilt from a
# typed storage, state dicts are OrderedDicts. Nothing else is ever looked up.
_STORAGES = (
    "Double",
    "Float",
    "Half",
    "BFloat16",
    "Long",
    "Int",
    "Short",
    "Char",
    "Byte",
    "Bool",
    "ComplexFloat",
    "ComplexDouble",
)
ALLOWED_GLOBALS = frozenset(
    {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2"}
    | {f"torch.{name}Storage" for name in _STORAGES}
)
# What checkpoints written before this format add: numpy's RNG key as an ndarray (its bytes
# through `_codecs.encode`). Allowed only by `convert_checkpoint`.
OLD_FORMAT_GLOBALS = frozenset(
    {
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.dtypes.UInt32DType",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "_codecs.encode",
    }
)
# The instructions torch.save's pickle (protocol 2) uses; the weights-only unpickler
# understands no others, so a file with any other one is not a checkpoint.
_OPCODES = frozenset(
    {
        "PROTO",
        "STOP",
        "GLOBAL",
        "REDUCE",
        "BUILD",
        "NEWOBJ",
        "MARK",
        "TUPLE",
        "TUPLE1",
        "TUPLE2",
        "TUPLE3",
        "EMPTY_TUPLE",
        "EMPTY_LIST",
        "EMPTY_DICT",
        "EMPTY_SET",
        "APPEND",
        "APPENDS",
        "SETITEM",
        "SETITEMS",
        "NONE",
        "NEWTRUE",
        "NEWFALSE",
        "BININT",
        "BININT1",
        "BININT2",
        "LONG1",
        "BINFLOAT",
        "BINUNICODE",
        "SHORT_BINSTRING",
        "BINPERSID",
        "BINPUT",
        "LONG_BINPUT",
        "BINGET",
        "LONG_BINGET",
    }
)


def convert_command(path: str | Path, target: str | Path | None = None) -> str:
    """The shell command that converts an old-format checkpoint (in place by default)."""
    quoted = shlex.quote(str(path))
    return f"iagn checkpoint convert {quoted} {shlex.quote(str(target)) if target else quoted}"


def rng_state() -> dict[str, Any]:
    """The RNG states (Python, numpy, torch, CUDA) in checkpoint types only."""
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state(state: Any) -> dict[str, Any]:
    """numpy's legacy RNG state tuple as a dict with the 624-word key as an int64 tensor."""
    if isinstance(state, dict):
        return state
    name, key, pos, has_gauss, cached_gaussian = state
    return {
        "bit_generator": str(name),
        "key": torch.from_numpy(np.asarray(key, dtype=np.int64).copy()),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = _numpy_state(state["numpy"])
    np.random.set_state(
        (
            numpy_state["bit_generator"],
            numpy_state["key"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(value: Any, where: str) -> Any:
    """`value` in CHECKPOINT_TYPES: numpy scalars become Python numbers; containers are
    rebuilt only where something inside changed (a state dict keeps its `_metadata`).
    Anything else is a bug in the caller: TypeError naming the entry."""
    kind = type(value)
    if kind in (str, int, float, bool, type(None), torch.Tensor):
        return value
    if isinstance(value, torch.Tensor):  # nn.Parameter and other subclasses: plain tensor
        return value.detach().as_subclass(torch.Tensor)
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    if kind in (dict, OrderedDict):
        items = {}
        changed = False
        for key, item in value.items():
            if type(key) not in (str, int):
                raise TypeError(
                    f"checkpoint entry {where} has a key of type {type(key).__name__}; "
                    "checkpoint dicts are keyed by str or int"
                )
            items[key] = _plain(item, f"{where}[{key!r}]")
            changed = changed or items[key] is not item
        if not changed:
            return value
        rebuilt = kind(items)
        if hasattr(value, "_metadata"):
            rebuilt._metadata = value._metadata
        return rebuilt
    if kind in (list, tuple):
        items = [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
        if all(new is old for new, old in zip(items, value, strict=True)):
            return value
        return kind(items)
    raise TypeError(
        f"checkpoint entry {where} is a {kind.__module__}.{kind.__qualname__}; a checkpoint "
        f"holds only {_TYPE_NAMES} (loading never unpickles anything else): convert it "
        "before saving"
    )


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Serialize to memory first, then write atomically: no half-written checkpoint.

    The payload must consist of CHECKPOINT_TYPES (numpy scalars and an RNG state from
    numpy's own `get_state()` are converted); anything else raises TypeError here rather
    than writing a file that would not load."""
    payload = dict(payload)
    if isinstance(payload.get("rng"), dict) and "numpy" in payload["rng"]:
        payload["rng"] = {**payload["rng"], "numpy": _numpy_state(payload["rng"]["numpy"])}
    buffer = io.BytesIO()
    torch.save(_plain({"format": FORMAT, **payload}, "checkpoint"), buffer)
    return write_bytes_atomic(path, buffer.getvalue())


def _names(names: set[str]) -> str:
    """Globals named by a file, safe to print (escaped, shortened, at most 5)."""
    shown = [ascii(name[:80])[1:-1] for name in sorted(names)[:5]]
    return ", ".join(shown) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _refused(path: Path, what: str) -> IagnError:
    return IagnError(
        f"{path} was not loaded: it holds {what}, which an iagn checkpoint never holds; a "
        "file like this can run code when unpickled. Nothing in it ran. Do not use it: re-run "
        "the step that wrote it, or fetch it again from a store you trust, and check who can "
        "write to the store it came from"
    )


def _corrupt(path: Path, reason: str) -> IagnError:
    return IagnError(
        f"checkpoint {path} is corrupt or not a torch file ({reason}); it was not loaded. "
        "Re-run the step that wrote it"
    )


def _pickles(path: Path) -> list[bytes]:
    """The pickles inside the zip archive at `path` (torch.save writes one, data.pkl)."""
    with open(path, "rb") as file:
        head = file.read(2)
    if head[:1] == b"\x80":
        raise IagnError(
            f"{path} is a bare pickle, not the zip archive torch.save writes; it was not "
            "loaded (iagn never unpickles such files: a pickle can run code). Pass a "
            "checkpoint written by `iagn train-stage` or `iagn distill`"
        )
    if not zipfile.is_zipfile(path):
        raise _corrupt(path, "not a zip archive, truncated or damaged")
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(".pkl")]
            if not any(n.rsplit("/", 1)[-1] == "data.pkl" for n in names):
                raise _corrupt(path, "the archive has no data.pkl")
            if any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in names):
                raise IagnError(
                    f"{path} is a TorchScript archive, not an iagn checkpoint; it was not "
                    "loaded. Pass a checkpoint written by `iagn train-stage` or `iagn distill`"
                )
            return [archive.read(name) for name in names]
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise _corrupt(path, f"{type(exc).__name__}: {exc}") from None


def _globals_named(path: Path, pickled: bytes) -> set[str]:
    """The globals a pickle names, read without unpickling; refuses unknown instructions."""
    found: set[str] = set()
    try:
        for opcode, arg, _ in pickletools.genops(pickled):
            if opcode.name not in _OPCODES:
                raise _refused(path, f"the pickle instruction {opcode.name}")
            if opcode.name == "GLOBAL":
                found.add(str(arg).replace(" ", ".", 1))
    except (ValueError, EOFError) as exc:
        raise _corrupt(path, f"unreadable pickle: {exc}") from None
    return found


def _check_types(path: Path, loaded: Any) -> None:
    """Every object in `loaded` is one of CHECKPOINT_TYPES (iterative: no recursion limit)."""
    pending, seen = [loaded], set()
    while pending:
        value = pending.pop()
        if type(value) not in CHECKPOINT_TYPES:
            raise _refused(path, f"a {type(value).__module__}.{type(value).__qualname__}")
        if isinstance(value, dict | list | tuple):
            if id(value) in seen:
                continue
            seen.add(id(value))
            if isinstance(value, dict):
                pending.extend(value.keys())
                pending.extend(value.values())
            else:
                pending.extend(value)


def _old_format_globals() -> list:
    """numpy's array globals, for reading old-format checkpoints in `convert_checkpoint`."""
    import numpy.dtypes

    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
    reconstruct = core.multiarray._reconstruct
    return [reconstruct, np.ndarray, np.dtype, numpy.dtypes.UInt32DType]


def _safe_load(path: Path, old_format: bool = False) -> Any:
    """The object in the torch file at `path`, under the rules of the module docstring."""
    named: set[str] = set()
    for pickled in _pickles(path):
        named |= _globals_named(path, pickled)
    unknown = named - ALLOWED_GLOBALS
    if old_format:
        unknown -= OLD_FORMAT_GLOBALS
    elif unknown and unknown <= OLD_FORMAT_GLOBALS:
        raise IagnError(
            f"{path} is an iagn checkpoint in the old format (its numpy RNG state is a numpy "
            "array, which loading no longer accepts); it was not loaded. Convert it once: "
            f"`{convert_command(path)}` (the conversion runs no code from the file either), "
            "or re-run the step that wrote it"
        )
    if unknown:
        raise _refused(path, f"references to {_names(unknown)}")
    allowed = _old_format_globals() if old_format else []
    scope = torch.serialization.safe_globals(allowed) if allowed else contextlib.nullcontext()
    try:
        with warnings.catch_warnings(), scope:
            warnings.simplefilter("ignore")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # the weights-only unpickler refused something
        lines = [line.strip() for line in str(exc).splitlines()]
        reason = next((line for line in lines if "Unsupported" in line), "an unknown object")
        what = f"what torch's weights-only loader refuses ({reason[:200]!a})"
        raise _refused(path, what) from None
    except Exception as exc:  # truncated data, foreign formats
        raise _corrupt(path, f"{type(exc).__name__}: {exc}") from None
    if old_format:
        loaded = _plain_old(path, loaded)
    _check_types(path, loaded)
    return loaded


def _plain_old(path: Path, loaded: Any) -> Any:
    """An old-format checkpoint's payload in checkpoint types: the numpy RNG key as a tensor."""
    if isinstance(loaded, dict) and isinstance(loaded.get("rng"), dict):
        rng = loaded["rng"]
        if isinstance(rng.get("numpy"), tuple):
            loaded = {**loaded, "rng": {**rng, "numpy": _numpy_state(rng["numpy"])}}
    try:
        return _plain(loaded, "checkpoint")
    except TypeError:
        raise _refused(path, "numpy arrays outside the RNG state") from None


def _checked(path: Path, checkpoint: Any, kind: str | None) -> dict[str, Any]:
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise IagnError(
            f"{path} is not an iagn checkpoint (expected format {FORMAT}); "
            "pass a file written by iagn train-stage or iagn distill"
        )
    if kind is not None and checkpoint.get("kind") != kind:
        raise IagnError(
            f"checkpoint {path} holds a {checkpoint.get('kind')} model, expected a {kind}"
        )
    return checkpoint


def load_checkpoint(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """The checkpoint at `path`, loaded without running any code from it (see above)."""
    path = Path(path)
    if not path.is_file():
        raise IagnError(
            f"checkpoint {path} does not exist; pass the file an earlier step wrote "
            "(e.g. the --out of `iagn train-stage`)"
        )
    return _checked(path, _safe_load(path), kind)


def convert_checkpoint(source: str | Path, target: str | Path) -> Path:
    """Rewrite an old-format checkpoint (numpy RNG state) in the current format.

    Reads it like `load_checkpoint` does, allowing in addition only numpy's array globals
    (an ndarray is data; numpy rebuilds it without running code from the file), converts
    the RNG state and writes `target` atomically (it may be `source`)."""
    source = Path(source)
    if not source.is_file():
        raise IagnError(f"checkpoint {source} does not exist; pass the file to convert")
    checkpoint = _checked(source, _safe_load(source, old_format=True), None)
    written = save_checkpoint(target, checkpoint)
    load_checkpoint(written)  # the converted file loads under the normal rules
    return written


def check_compatible(
    checkpoint: dict[str, Any], backbone: str, num_classes: int, path: Path
) -> None:
    """A clear error when a checkpoint cannot initialize the requested model."""
    config = checkpoint["model_config"]
    if config["backbone"] != backbone:
        raise IagnError(
            f"checkpoint {path} was trained with backbone {config['backbone']}, but params.yaml "
            f"asks for {backbone}; use the same model.backbone or start without --init"
        )
    if config["num_classes"] != num_classes:
        raise IagnError(
            f"checkpoint {path} has {config['num_classes']} classes, but the dataset has "
            f"{num_classes}; point --data at the dataset it was trained on, or start without "
            "--init"
        )
