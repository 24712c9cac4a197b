"""The preloaded interpreter of run-local (pipeline/warm.py): tasks stay apart.

A zygote preloads tests/warm_probe.py (an environment variable read at import, a
module-level list); tasks (tests/warm_task.py) reach it through the client exactly as
kfp.local starts a task: `sh -ec '_KFP_RUNTIME=true <python> -m ...'`. What one task sets
(a variable, a global) the next does not see, and a task whose environment or working
directory differs from the zygote's imports everything afresh, seeing its own values.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.warm import Zygote, supported

TESTS = Path(__file__).resolve().parent
pytestmark = pytest.mark.skipif(not supported(), reason="the zygote needs Linux")


@contextlib.contextmanager
def serving(monkeypatch) -> Iterator[Zygote]:
    """A zygote preloading warm_probe; started inside the test, as pytest changes the
    environment (PYTEST_CURRENT_TEST) between a fixture's setup and the test."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # warm_probe, warm_task
    monkeypatch.setenv("IAGN_PROBE", "zygote")
    monkeypatch.delenv("IAGN_PROBE_LEFT_BY", raising=False)
    zygote = Zygote(preload=("warm_probe",))
    try:
        assert zygote.client() is not None, "the zygote did not start"
        yield zygote
    finally:
        zygote.stop()


def task(zygote: Zygote, name: str, *args: str, env: str = "", cwd=None):
    """kfp.local's command line for a task, through the zygote's client; `env`: variables
    the shell sets for this task only. The rest of the environment is inherited, as
    kfp.local does (the process's, which can hold more than os.environ shows)."""
    client = zygote.client()
    command = f'{env} _KFP_RUNTIME=true "{client}" -m warm_task {name} {" ".join(args)}'
    return subprocess.run(
        ["sh", "-ec", command],
        cwd=cwd or os.getcwd(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def seen(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_what_a_task_sets_the_next_does_not_see(monkeypatch):
    with serving(monkeypatch) as zygote:
        first = seen(task(zygote, "a"))
        second = seen(task(zygote, "b"))
        failed = task(zygote, "c", "3")
    assert first["preloaded"] and second["preloaded"], "a task did not run in the zygote"
    assert first["at_import"] == first["env"] == "zygote"
    assert first["tasks_before"] == [] and first["left_by"] is None
    assert second["pid"] != first["pid"]
    assert second["tasks_before"] == [], "a module global of task a reached task b"
    assert second["left_by"] is None, "an environment variable of task a reached task b"
    assert second["at_import"] == second["env"] == "zygote"
    assert failed.returncode == 3 and json.loads(failed.stdout)["preloaded"]


def test_a_task_that_sees_other_values_imports_afresh(monkeypatch, tmp_path):
    with serving(monkeypatch) as zygote:
        own = task(zygote, "a", env="IAGN_PROBE='task a'")
        moved = task(zygote, "b", cwd=tmp_path)
        same = task(zygote, "c")  # the zygote keeps serving tasks that match it
    values = seen(own)
    assert not values["preloaded"], "the zygote served a task whose environment differs"
    assert values["at_import"] == values["env"] == "task a"
    assert "differs from the preloaded interpreter in IAGN_PROBE;" in own.stderr
    assert not seen(moved)["preloaded"]
    assert "in the working directory;" in moved.stderr
    assert seen(same)["preloaded"]
