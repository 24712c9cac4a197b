"""The registry's promotion lock against a real MLflow server: registrations at once, stale
and busy locks, a registration that died between creating its version and deciding.

Each test registers candidates of its own registered model (no pipeline needed): the
versions point at runs of their own, their numbers are what `iagn evaluate` would write.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid

import pytest
from mlflow_server import mlflow_server

from iagn import registry
from iagn.errors import IagnError
from iagn.steps import register as step

__all__ = ["mlflow_server"]  # the fixture used below

DATA = "d" * 64  # the evaluation data's manifest digest, the same for every candidate


@pytest.fixture
def model_name() -> str:
    return f"race-{uuid.uuid4().hex[:8]}"


def candidate(client, top1: float, pointing_game: float = 0.5) -> step.Candidate:
    """A model evaluated on DATA's test split, logged by a run of its own."""
    experiment = client.get_experiment_by_name("registry-concurrency")
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment("registry-concurrency")
    )
    run = client.create_run(experiment_id)
    client.set_terminated(run.info.run_id)
    return step.Candidate(
        kind="student",
        model_uri=f"runs:/{run.info.run_id}/model",
        run_id=run.info.run_id,
        model_id=None,
        checkpoint_sha256=uuid.uuid4().hex,
        weights_sha256=uuid.uuid4().hex,
        metrics={
            "top1": top1,
            "pointing_game": pointing_game,
            "data_digest": DATA,
            "split": "test",
        },
    )


def config(name: str, **lock: float) -> step.RegisterConfig:
    return step.RegisterConfig(model_name=name, **lock)


def aliases(client, name: str) -> dict[str, str]:
    return {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}


def lock_exists(client, name: str) -> bool:
    return bool(client.search_registered_models(f"name = '{registry.lock_name(name)}'"))


def slow_champion_reads(monkeypatch, delays: dict[str, float]) -> None:
    """Reading the champion takes `delays[pipeline run]` seconds longer: the window between
    reading it and moving the alias, where two unlocked registrations overtake each other."""
    read = step.champion_version

    def slowly(client, name):
        found = read(client, name)
        time.sleep(delays.get(threading.current_thread().name, 0.0))
        return found

    monkeypatch.setattr(step, "champion_version", slowly)


def register_at_once(server, name: str, entries: list[tuple[str, step.Candidate]]) -> dict:
    """Register each (pipeline run, candidate) from its own thread, released together."""
    barrier = threading.Barrier(len(entries))
    outcomes: dict[str, step.Outcome] = {}
    errors: list[BaseException] = []

    def work(run_id: str, entry: step.Candidate) -> None:
        client = server.client()  # a client per thread, as each pipeline run has its own
        try:
            barrier.wait(timeout=30)
            outcomes[run_id] = step.register(client, entry, config(name), run_id)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=e, name=e[0]) for e in entries]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    return outcomes


@pytest.mark.fault(
    "two registrations of the same model at once, or a registration that died before deciding",
    sees="both are registered, once each, and the better one ends champion (the other's "
    "reason: `... does not beat the champion's ...`); rerunning one that died finishes it",
    kept="the better champion; each model registered once",
)
@pytest.mark.parametrize("better_first", [True, False])
def test_two_registrations_at_once_end_with_the_better_champion(
    mlflow_server, model_name, monkeypatch, better_first
):
    client = mlflow_server.client()
    versions_so_far = 0
    champion_top1 = 0.5
    for round_ in range(3):  # three races: each would show a lost update without the lock
        better = candidate(client, champion_top1 + 0.02)
        worse = candidate(client, champion_top1 + 0.01)
        # The run whose alias write lands last without a lock is the worse one, or the better.
        late, early = ("worse", "better") if better_first else ("better", "worse")
        slow_champion_reads(monkeypatch, {f"{late}-{round_}": 0.6, f"{early}-{round_}": 0.05})
        outcomes = register_at_once(
            mlflow_server, model_name, [(f"better-{round_}", better), (f"worse-{round_}", worse)]
        )
        versions_so_far += 2
        found = client.search_model_versions(f"name = '{model_name}'")
        assert len(found) == versions_so_far  # both registered, each once
        winner, loser = outcomes[f"better-{round_}"], outcomes[f"worse-{round_}"]
        assert winner.champion and aliases(client, model_name)["champion"] == winner.version
        if loser.champion:  # it took the lock first: champion until the better one came
            assert int(loser.version) < int(winner.version)
            assert winner.compared_with == loser.version
        else:
            assert "does not beat the champion's" in loser.reason
            assert loser.compared_with == winner.version
        # The newest version is the challenger; every decision is recorded, none pending.
        assert aliases(client, model_name)["challenger"] == str(max(int(v.version) for v in found))
        for outcome in outcomes.values():
            tags = client.get_model_version(model_name, outcome.version).tags
            assert tags[registry.TAG_PROMOTION].startswith(("promoted: ", "not promoted: "))
        assert not lock_exists(client, model_name)
        champion_top1 += 0.02


def test_without_the_lock_the_worse_model_can_end_champion(mlflow_server, model_name, monkeypatch):
    """Why the lock: both read "no champion", the better moves the alias first, the worse
    overwrites it. (The same race with the lock is the test above.)"""
    client = mlflow_server.client()
    monkeypatch.setattr(step, "promotion_lock", lambda *a, **k: contextlib.nullcontext())
    slow_champion_reads(monkeypatch, {"better": 0.05, "worse": 1.0})
    better, worse = candidate(client, 0.9), candidate(client, 0.6)
    outcomes = register_at_once(mlflow_server, model_name, [("better", better), ("worse", worse)])
    assert outcomes["better"].champion and outcomes["worse"].champion
    assert aliases(client, model_name)["champion"] == outcomes["worse"].version


@pytest.mark.fault(
    "a registry lock left behind by a registration that died",
    sees="a warning on stderr, `breaking the stale registry lock 'NAME.promotion-lock' held by "
    "pipeline run ... (N s old, more than register.lock_stale_after_s ...)`, then the "
    "registration goes on",
    kept="every version and alias; only the dead lock is deleted",
)
def test_a_stale_lock_is_broken_with_a_message(mlflow_server, model_name, capsys):
    client = mlflow_server.client()
    client.create_registered_model(
        registry.lock_name(model_name),
        tags={
            registry.TAG_LOCK_TOKEN: "dead",
            registry.TAG_LOCK_HOLDER: "pipeline run crashed-run on ghost pid 1",
            registry.TAG_LOCK_SINCE: repr(time.time() - 3600),
        },
    )
    outcome = step.register(
        client, candidate(client, 0.7), config(model_name, lock_stale_after_s=600), "after-crash"
    )
    assert outcome.champion and outcome.version == "1"
    err = capsys.readouterr().err
    assert "breaking the stale registry lock" in err and "crashed-run on ghost pid 1" in err
    assert not lock_exists(client, model_name)


@pytest.mark.fault(
    "another registration of the same model holding the registry lock beyond "
    "register.lock_timeout_s",
    sees="exit 2 after the wait: `the MLflow registry lock 'NAME.promotion-lock' is held by "
    "pipeline run ... on HOST pid ...; waited ... -> run iagn register again when that step is "
    "done; if it died, delete the lock: ...`",
    kept="the registry as it was: no version created, no alias moved, the holder's lock",
)
def test_a_busy_lock_is_waited_for_then_named(mlflow_server, model_name):
    client = mlflow_server.client()
    step.register(client, candidate(client, 0.7), config(model_name), "first")
    holder = "pipeline run still-running on elsewhere pid 42"
    with registry.promotion_lock(client, model_name, holder):
        started = time.monotonic()
        with pytest.raises(IagnError) as error:
            step.register(client, candidate(client, 0.8), config(model_name, lock_timeout_s=2), "x")
        assert time.monotonic() - started >= 2
        message = str(error.value)
        assert f"registry lock '{model_name}.promotion-lock' is held by {holder}" in message
        assert "delete_registered_model" in message and "register.lock_timeout_s" in message
    assert len(client.search_model_versions(f"name = '{model_name}'")) == 1  # nothing added
    assert not lock_exists(client, model_name)  # the holder released it
    # Released: the next registration goes through.
    assert step.register(client, candidate(client, 0.8), config(model_name), "x").champion


def test_the_lock_is_released_when_registering_fails(mlflow_server, model_name, monkeypatch):
    client = mlflow_server.client()

    def refuse(*args, **kwargs):
        raise RuntimeError("the registry refused the version")

    monkeypatch.setattr(client, "create_model_version", refuse)
    with pytest.raises(RuntimeError, match="refused"):
        step.register(client, candidate(client, 0.7), config(model_name), "failing")
    assert not lock_exists(client, model_name)


@pytest.mark.fault(
    "two registrations of the same model at once, or a registration that died before deciding",
    sees="both are registered, once each, and the better one ends champion (the other's "
    "reason: `... does not beat the champion's ...`); rerunning one that died finishes it",
    kept="the better champion; each model registered once",
)
def test_a_registration_that_died_before_deciding_is_finished_by_the_rerun(
    mlflow_server, model_name, monkeypatch
):
    client = mlflow_server.client()
    step.register(client, candidate(client, 0.6), config(model_name), "old")
    entry = candidate(client, 0.7)

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # killed after creating the version, before the aliases

    with monkeypatch.context() as patch:
        patch.setattr(step, "_decide_and_record", die)
        with pytest.raises(KeyboardInterrupt):
            step.register(client, entry, config(model_name), "killed")
    version = client.get_model_version(model_name, "2")
    assert version.tags[registry.TAG_PROMOTION] == step.PENDING
    assert aliases(client, model_name)["champion"] == "1"
    assert not lock_exists(client, model_name)

    outcome = step.register(client, entry, config(model_name), "killed")
    assert not outcome.already_registered and outcome.version == "2" and outcome.champion
    assert outcome.reason == "top1 0.7 beats the champion's 0.6"
    assert aliases(client, model_name) == {"champion": "2", "challenger": "2"}
    tags = client.get_model_version(model_name, "2").tags
    assert tags[registry.TAG_PROMOTION] == "promoted: top1 0.7 beats the champion's 0.6"
    # Once decided, a rerun changes nothing.
    again = step.register(client, entry, config(model_name), "killed")
    assert again.already_registered and "aliases unchanged" in again.reason
    assert len(client.search_model_versions(f"name = '{model_name}'")) == 2
