"""Finding logged models, reading the Model Registry (`iagn models`), and its promotion lock.

The lock (`promotion_lock`)
    MLflow has no compare-and-set on aliases: two `register` steps that each read the
    champion, compare and then move the alias can both decide against the same old champion,
    and the last writer wins even when it is the worse model. So every change to the
    versions and aliases of registered model NAME happens while holding a lock kept in the
    registry itself, the registered model `NAME.promotion-lock`: creating a registered model
    is atomic in MLflow's database (the name is its primary key; a second create fails with
    RESOURCE_ALREADY_EXISTS), for every client on every machine that reaches the same server.
    - acquire: create it, tagged with the holder (pipeline run, host, pid, time) and a random
      token; if it exists, wait with growing, jittered pauses (0.25 s up to 2 s) until it is
      gone, for at most `timeout_s` (then an IagnError names the holder and how to remove it);
    - stale: a lock older than `stale_after_s` (by the holder's `iagn.lock.since`, else the
      server's creation time) belongs to a step that died; it is deleted with a warning on
      stderr naming its holder, and taking it is tried again. Holding it takes seconds, so
      the default of 10 minutes leaves a wide margin, also for clocks that disagree;
    - release: delete it in a `finally`, only when it still carries our token (a lock broken
      as stale and taken by another step stays theirs).
    The lock model shows in the MLflow UI's model list while held. A lock a killed step left
    can be removed by hand: `MlflowClient().delete_registered_model("NAME.promotion-lock")`.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from iagn.errors import IagnError
from iagn.tracking import TAG_PIPELINE_RUN

CHALLENGER = "challenger"
CHAMPION = "champion"
TAG_CHECKPOINT = "iagn.checkpoint_sha256"
TAG_WEIGHTS = "iagn.weights_sha256"
TAG_KIND = "iagn.kind"
# What the version's evaluation ran on: the manifest digest of the data and the split. Two
# versions' numbers compare only when both match.
TAG_EVAL_DIGEST = "iagn.eval_data_digest"
TAG_EVAL_SPLIT = "iagn.eval_split"
# On evaluation runs: `iagn.params.recipe_digest` of the params (seeds left out).
TAG_RECIPE = "iagn.recipe"
# The promotion decision and why ("promoted: ...", "not promoted: ..."); "pending" while a
# registration has created the version but not yet decided (a rerun finishes it).
TAG_PROMOTION = "iagn.promotion"
TAG_EVAL_DEVICE = "iagn.eval_device"  # where latency and throughput were measured
TAG_COMPARED = "iagn.compared_with"  # the champion's version the decision compared with
# Evaluation numbers copied to each version's tags: what `iagn models` shows and what the
# champion comparison reads.
VERSION_METRICS = (
    "top1",
    "top5",
    "top1_fused",
    "top1_combined",
    "top1_two_pass",
    "pointing_game",
    "pointing_game_lift",
    "box_accuracy",
    "box_accuracy_lift",
    "ece",
    "latency_ms",
    "throughput_ips",
    "parameters",
    "checkpoint_mb",
)
TAG_MODEL_URI = "iagn.model_uri"
TAG_MODEL_ID = "iagn.model_id"
TABLE_METRICS = ("top1", "pointing_game", "box_accuracy", "ece", "latency_ms")


@dataclass
class LoggedModel:
    model_uri: str
    run_id: str
    model_id: str | None


def find_logged_model(client, experiment_id: str, checkpoint_sha256: str) -> LoggedModel | None:
    """The newest model logged (by a training step or register) from this exact checkpoint."""
    runs = client.search_runs(
        [experiment_id],
        f"tags.`{TAG_CHECKPOINT}` = '{checkpoint_sha256}'",
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    for run in runs:
        uri = run.data.tags.get(TAG_MODEL_URI)
        if uri:
            return LoggedModel(uri, run.info.run_id, run.data.tags.get(TAG_MODEL_ID))
    return None


def _short(value: str | None) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return value or "-"


def versions_table(client, name: str) -> str:
    """A text table of every version of `name`: aliases, kind, key metrics, pipeline run."""
    versions = sorted(
        client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version)
    )
    # Search results carry no aliases; the registered model maps each alias to its version.
    by_version: dict[str, list[str]] = {}
    for alias, number in client.get_registered_model(name).aliases.items():
        by_version.setdefault(str(number), []).append(alias)
    header = ["version", "aliases", "kind", *TABLE_METRICS, "pipeline run", "created (UTC)"]
    rows = [header]
    for version in versions:
        tags = version.tags or {}
        # Champion first: the alias people look for.
        aliases = sorted(
            by_version.get(str(version.version), []),
            key=lambda a: (a != CHAMPION, a != CHALLENGER, a),
        )
        created = datetime.fromtimestamp(version.creation_timestamp / 1000, tz=UTC)
        rows.append(
            [
                str(version.version),
                ",".join(aliases) or "-",
                tags.get(TAG_KIND, "-"),
                *[_short(tags.get(metric)) for metric in TABLE_METRICS],
                tags.get(TAG_PIPELINE_RUN, "-"),
                created.strftime("%Y-%m-%d %H:%M"),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def weights_sha256(state: Mapping[str, Any]) -> str:
    """A digest of a model's weights alone (names, dtypes, shapes, bytes).

    Two checkpoint files of the same weights differ in their sha256 (history, RNG state, a
    note); this digest does not, so an identical model is recognised as such.
    """
    import hashlib

    import torch

    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # As raw bytes (bf16 has no numpy dtype); 0-d tensors reshaped first for `view`.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --- the promotion lock (see the module docstring) -------------------------------------------

LOCK_SUFFIX = ".promotion-lock"
TAG_LOCK_TOKEN = "iagn.lock.token"
TAG_LOCK_HOLDER = "iagn.lock.holder"
TAG_LOCK_SINCE = "iagn.lock.since"  # unix seconds on the holder's clock
LOCK_TIMEOUT_S = 120.0
LOCK_STALE_AFTER_S = 600.0
_FIRST_PAUSE_S, _LONGEST_PAUSE_S = 0.25, 2.0


def lock_name(name: str) -> str:
    return name + LOCK_SUFFIX


def lock_holder(pipeline_run_id: str | None) -> str:
    """Who holds the lock, for the people who find it: pipeline run, host, pid, time."""
    since = datetime.now(tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    run = pipeline_run_id or "(no pipeline run)"
    return f"pipeline run {run} on {socket.gethostname()} pid {os.getpid()} since {since}"


def _read_lock(client, lock: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(lock)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _lock_age_s(found) -> float:
    tags = found.tags or {}
    try:
        since = float(tags[TAG_LOCK_SINCE])
    except (KeyError, ValueError):
        since = (found.creation_timestamp or 0) / 1000
    return time.time() - since


def _delete_lock(client, lock: str, token: str | None) -> bool:
    """Delete the lock if it (still) carries `token`; False when it is gone or another's."""
    from mlflow.exceptions import MlflowException

    found = _read_lock(client, lock)
    if found is None or (found.tags or {}).get(TAG_LOCK_TOKEN) != token:
        return False
    try:
        client.delete_registered_model(lock)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return False
    return True


def _acquire(client, lock: str, holder: str, timeout_s: float, stale_after_s: float) -> str:
    from mlflow.exceptions import MlflowException

    token = uuid.uuid4().hex
    deadline = time.monotonic() + timeout_s
    pause = _FIRST_PAUSE_S
    while True:
        try:
            client.create_registered_model(
                lock,
                tags={
                    TAG_LOCK_TOKEN: token,
                    TAG_LOCK_HOLDER: holder,
                    TAG_LOCK_SINCE: repr(time.time()),
                },
                description=f"iagn promotion lock, held by {holder}; deleted when done",
            )
            return token
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        found = _read_lock(client, lock)
        if found is None:  # released between our create and this read: try again at once
            continue
        tags = found.tags or {}
        if tags.get(TAG_LOCK_TOKEN) == token:  # our create went through; its reply was lost
            return token
        age = _lock_age_s(found)
        if age > stale_after_s:
            print(
                f"iagn: warning: breaking the stale registry lock {lock!r} held by "
                f"{tags.get(TAG_LOCK_HOLDER, 'an unknown holder')} ({age:.0f} s old, more than "
                f"register.lock_stale_after_s {stale_after_s:g} s): that step is taken to have "
                "died",
                file=sys.stderr,
            )
            _delete_lock(client, lock, tags.get(TAG_LOCK_TOKEN))
            continue
        if time.monotonic() >= deadline:
            raise IagnError(
                f"the MLflow registry lock {lock!r} is held by "
                f"{tags.get(TAG_LOCK_HOLDER, 'an unknown holder')} ({age:.0f} s old); waited "
                f"{timeout_s:g} s for it (register.lock_timeout_s)\n"
                "  -> run `iagn register` again when that step is done; if it died, delete the "
                f'lock: python -c "import mlflow; mlflow.MlflowClient().delete_registered_model'
                f"('{lock}')\" (it is also broken automatically after "
                f"register.lock_stale_after_s = {stale_after_s:g} s)"
            )
        time.sleep(min(pause * random.uniform(0.5, 1.5), max(deadline - time.monotonic(), 0)))
        pause = min(pause * 2, _LONGEST_PAUSE_S)


@contextlib.contextmanager
def promotion_lock(
    client,
    name: str,
    holder: str,
    timeout_s: float = LOCK_TIMEOUT_S,
    stale_after_s: float = LOCK_STALE_AFTER_S,
) -> Iterator[str]:
    """Hold the registry lock of registered model `name` (see the module docstring)."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    lock = lock_name(name)
    token = _acquire(client, lock, holder, timeout_s, stale_after_s)
    try:
        yield token
    finally:
        # A failed release must not hide the error that ended the body: it is reported, and
        # the lock left behind is broken as stale later (or deleted by hand).
        try:
            released = _delete_lock(client, lock, token)
        except (MlflowException, RequestException) as exc:
            print(
                f"iagn: warning: could not release the registry lock {lock!r} "
                f"({type(exc).__name__}); other registrations wait for it until it is "
                f'{stale_after_s:g} s old, or delete it: python -c "import mlflow; '
                f"mlflow.MlflowClient().delete_registered_model('{lock}')\"",
                file=sys.stderr,
            )
        else:
            if not released:
                print(
                    f"iagn: warning: the registry lock {lock!r} was no longer ours when "
                    "released (another step broke it as stale): raise "
                    "register.lock_stale_after_s above the time a registration takes",
                    file=sys.stderr,
                )
