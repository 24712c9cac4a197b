"""Checkpoints mirrored to durable storage (`train.checkpoint_uri`), against a real S3 server
(moto on 127.0.0.1): uploads after every epoch and on SIGTERM, a resume on a "fresh pod" (an
empty working directory), and the bad inputs: a half-uploaded object, another
configuration's checkpoint, an unreachable URI.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from helpers import BIN, free_port, run
from test_preemption import (
    BATCHES,
    ENV,
    EPOCHS,
    STOPPED,
    assert_partial_matches,
    assert_same_training,
    one_thread,
    preempt_params,
    sigterm_after_first_epoch,
    start,
    straight,
)
from test_training import tiny_params

import iagn.steps.train_stage as train_stage_module
from iagn.checkpoint import load_checkpoint
from iagn.errors import EXIT_PREEMPTED, IagnError, Preempted
from iagn.io import sha256_file
from iagn.steps import train_stage
from iagn.steps.trial_params import apply_trial
from iagn.train.config import stage_config
from iagn.train.durable import Mirror

__all__ = ["straight"]  # the uninterrupted run (no URI) a resumed one must end equal to

PREFIX = "run"  # train.checkpoint_uri = s3://<bucket>/run; stage 1 lands in run/stage1/


class StopAfterEpoch(Exception):
    """Raised by an epoch callback: the run stops with epoch 1 in `<out>.partial`."""


def stop_after_first_epoch(epoch: int, record: dict) -> None:
    raise StopAfterEpoch


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The S3 server, with its endpoint and credentials in the environment, as on a pod."""
    env = {
        **s3_server.credentials_env(),
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no waiting for an instance-metadata server
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return s3_server


def uri_of(s3_server) -> str:
    return f"s3://{s3_server.bucket}/{PREFIX}"


def with_uri(params: dict, uri: str) -> dict:
    params["train"]["checkpoint_uri"] = uri
    return params


def objects(s3_server) -> dict[str, bytes]:
    client, names = s3_server.client(), s3_server.keys()
    return {
        key: client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read() for key in names
    }


def marker(s3_server, name: str) -> dict:
    return json.loads(objects(s3_server)[f"{PREFIX}/stage1/{name}.json"])


def count_steps(monkeypatch) -> dict:
    real, calls = train_stage_module.stage_step, {"n": 0}

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(train_stage_module, "stage_step", counted)
    return calls


def partial_in_s3(params: dict, out: Path) -> None:
    """Train 2 epochs, stopped after the first: S3 holds that epoch's partial."""
    with pytest.raises(StopAfterEpoch):
        train_stage.run(
            1, None, params, out, device="cpu", quiet=True, callbacks=[stop_after_first_epoch]
        )


def test_each_epoch_and_the_finished_checkpoint_are_uploaded(s3, tiny_synth, tmp_path):
    params = with_uri(tiny_params(tiny_synth, epochs=2), uri_of(s3))
    out = tmp_path / "s1.pt"
    seen = {}

    def after_epoch(epoch: int, record: dict) -> None:
        # After the epoch's save: the marker names an object whose bytes are the partial's.
        seen[epoch] = marker(s3, "partial.pt")
        stored = objects(s3)[f"{PREFIX}/stage1/{seen[epoch]['object']}"]
        assert stored == (tmp_path / "s1.pt.partial").read_bytes()

    train_stage.run(1, None, params, out, device="cpu", quiet=True, callbacks=[after_epoch])
    assert [seen[e]["epoch"] for e in (1, 2)] == [1, 2]
    assert seen[1]["fingerprint"] == seen[2]["fingerprint"]
    assert seen[1]["sha256"] != seen[2]["sha256"]
    finished = marker(s3, "checkpoint.pt")
    assert finished["sha256"] == sha256_file(out) and finished["epoch"] == 2
    assert finished["fingerprint"] == seen[2]["fingerprint"]
    # One object per marker: the replaced epoch's object and the partial are gone.
    assert sorted(s3.keys()) == sorted(
        [f"{PREFIX}/stage1/checkpoint.pt.json", f"{PREFIX}/stage1/{finished['object']}"]
    )
    # Where copies go is not part of what trains: the recorded config has no URI.
    assert "checkpoint_uri" not in load_checkpoint(out)["train_config"]


def test_a_rerun_after_a_finished_run_trains_nothing(s3, tiny_synth, tmp_path, monkeypatch):
    params = with_uri(tiny_params(tiny_synth, epochs=2), uri_of(s3))
    train_stage.run(1, None, params, tmp_path / "pod1" / "s1.pt", device="cpu", quiet=True)
    calls = count_steps(monkeypatch)
    out = tmp_path / "pod2" / "s1.pt"  # a KFP retry after the step had finished training
    train_stage.run(1, None, params, out, device="cpu", quiet=True)
    assert calls["n"] == 0 and load_checkpoint(out)["complete"]


def test_a_failed_upload_is_a_warning_and_training_goes_on(
    s3, tiny_synth, tmp_path, monkeypatch, capsys
):
    real, failures = Mirror.upload, {"left": 1}

    def flaky(self, *args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise IagnError("could not upload (an S3 hiccup)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Mirror, "upload", flaky)
    params = with_uri(tiny_params(tiny_synth, epochs=2), uri_of(s3))
    out = tmp_path / "s1.pt"
    train_stage.run(1, None, params, out, device="cpu", quiet=True)
    assert "warning: could not upload (an S3 hiccup)" in capsys.readouterr().err
    assert marker(s3, "checkpoint.pt")["sha256"] == sha256_file(out)


@pytest.mark.fault(
    "SIGTERM during training with `train.checkpoint_uri` set (a preempted pod, KFP retries on "
    "a fresh one)",
    sees="exit code 143 after `uploaded out/s1.pt.partial to s3://.../stage1/partial.pt`; the "
    "rerun on an empty disk prints `fetched s3://.../stage1/partial.pt (in epoch E, batch B)` "
    "and `resuming ...`",
    kept="the partial in S3 (bytes, then its sha256 marker); the rerun ends bit for bit as an "
    "uninterrupted run",
)
def test_sigterm_uploads_the_partial_and_a_fresh_pod_resumes_from_s3(
    s3, tiny_synth, tmp_path, straight
):
    params = with_uri(preempt_params(tiny_synth), uri_of(s3))
    command = [BIN / "iagn", "train-stage", "--stage", "1", "--params", "params.yaml"]
    command += ["--out", "out/s1.pt", "--device", "cpu"]
    first, fresh = tmp_path / "pod1", tmp_path / "pod2"
    for pod in (first, fresh):
        pod.mkdir()
        (pod / "params.yaml").write_text(yaml.safe_dump(params))
    partial = first / "out" / "s1.pt.partial"
    proc, log = start(command, first)  # the environment (AWS_*) is inherited
    seconds = sigterm_after_first_epoch(proc, partial)
    output = log.read_text()
    assert proc.returncode == EXIT_PREEMPTED, output
    assert seconds < 30, output  # the save and the upload within the default grace period
    epoch, batch, _ = STOPPED.findall(output)[0]
    saved = assert_partial_matches(partial, int(epoch), int(batch))
    if "mid_epoch" in saved:  # else the stop came during validation, after the epoch's upload
        assert f"uploaded out/s1.pt.partial to {uri_of(s3)}/stage1/partial.pt" in output
    uploaded = marker(s3, "partial.pt")
    assert uploaded["sha256"] == sha256_file(partial)

    # A fresh pod: nothing but params.yaml in its working directory.
    rerun = run(command, cwd=fresh, env=ENV)
    assert f"fetched {uri_of(s3)}/stage1/partial.pt" in rerun.stdout
    assert "resuming out/s1.pt.partial" in rerun.stdout
    assert "stage 1 done" in rerun.stdout
    assert_same_training(load_checkpoint(fresh / "out" / "s1.pt"), straight)
    assert marker(s3, "checkpoint.pt")["sha256"] == sha256_file(fresh / "out" / "s1.pt")
    assert not [key for key in objects(s3) if key.startswith(f"{PREFIX}/stage1/partial.pt")]


@pytest.mark.fault(
    "SIGTERM during training with `train.checkpoint_uri` set (a preempted pod, KFP retries on "
    "a fresh one)",
    sees="exit code 143 after `uploaded out/s1.pt.partial to s3://.../stage1/partial.pt`; the "
    "rerun on an empty disk prints `fetched s3://.../stage1/partial.pt (in epoch E, batch B)` "
    "and `resuming ...`",
    kept="the partial in S3 (bytes, then its sha256 marker); the rerun ends bit for bit as an "
    "uninterrupted run",
)
def test_a_mid_epoch_sigterm_save_reaches_s3_and_resumes_bit_identical(
    s3, tiny_synth, tmp_path, monkeypatch, capsys, straight
):
    """In process, so SIGTERM lands at a chosen batch: step 3, the middle of epoch 1."""
    real_step, calls = train_stage_module.stage_step, {"n": 0}

    def step_receiving_sigterm(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_stage_module, "stage_step", step_receiving_sigterm)
    params = with_uri(preempt_params(tiny_synth), uri_of(s3))
    first = tmp_path / "pod1" / "s1.pt"
    with one_thread(), pytest.raises(Preempted) as stopped:
        train_stage.run(1, None, params, first, device="cpu", quiet=True)
    assert stopped.value.code == EXIT_PREEMPTED
    uploaded = marker(s3, "partial.pt")
    assert (uploaded["epoch"], uploaded["batch"]) == (0, 3)
    assert uploaded["sha256"] == sha256_file(tmp_path / "pod1" / "s1.pt.partial")
    assert "uploaded" in capsys.readouterr().err

    fresh = tmp_path / "pod2" / "s1.pt"  # another pod: no local partial
    with one_thread():
        train_stage.run(1, None, params, fresh, device="cpu")
    output = capsys.readouterr().out
    assert f"fetched {uri_of(s3)}/stage1/partial.pt (in epoch 1, batch 3)" in output
    assert "in epoch 1 of 3, after batch 3" in output
    assert calls["n"] == EPOCHS * BATCHES  # no batch computed twice, none skipped
    assert_same_training(load_checkpoint(fresh), straight)


@pytest.mark.fault(
    "a half-uploaded checkpoint at `train.checkpoint_uri` (bytes without their marker, or "
    "bytes that do not match it)",
    sees="`warning: ... does not match its marker ...; not trusted, starting without it` "
    "(or nothing: an object without a marker is never read); the step trains from scratch",
    kept="`--out` and the local partial untouched until the new run writes them",
)
@pytest.mark.parametrize("damage", ["truncated", "no marker"])
def test_a_half_uploaded_object_is_never_resumed_from(
    s3, tiny_synth, tmp_path, capsys, monkeypatch, damage
):
    params = with_uri(tiny_params(tiny_synth, epochs=2), uri_of(s3))
    partial_in_s3(params, tmp_path / "pod1" / "s1.pt")
    named = marker(s3, "partial.pt")
    key = f"{PREFIX}/stage1/{named['object']}"
    client = s3.client()
    if damage == "truncated":  # the marker names an object cut short
        body = objects(s3)[key]
        client.put_object(Bucket=s3.bucket, Key=key, Body=body[: len(body) // 2])
    else:  # bytes up, marker never written
        client.delete_object(Bucket=s3.bucket, Key=f"{PREFIX}/stage1/partial.pt.json")
    capsys.readouterr()
    calls = count_steps(monkeypatch)
    out = tmp_path / "pod2" / "s1.pt"
    train_stage.run(1, None, params, out, device="cpu")
    output = capsys.readouterr()
    assert "resuming" not in output.out and "fetched" not in output.out
    if damage == "truncated":
        assert "does not match its marker" in output.err and "not trusted" in output.err
    finished = load_checkpoint(out)
    # Both epochs trained here, from scratch: every step counted was computed in this run.
    assert finished["complete"] and len(finished["history"]) == 2
    assert finished["step"] == calls["n"]


@pytest.mark.fault(
    "a `train.checkpoint_uri` that holds another configuration's checkpoint",
    sees="exit 2 before training: `checkpoint URI s3://.../stage1 already holds partial.pt "
    "(epoch E) of another configuration ...; it was left untouched and nothing was trained. "
    "Use another train.checkpoint_uri ...`",
    kept="the remote checkpoint, byte for byte; local files",
)
def test_a_uri_holding_another_configurations_partial_is_refused(
    s3, tiny_synth, tmp_path, monkeypatch
):
    params = with_uri(tiny_params(tiny_synth, epochs=2), uri_of(s3))
    partial_in_s3(params, tmp_path / "pod1" / "s1.pt")
    before = objects(s3)
    params["train"]["lr_head"] = params["train"]["lr_head"] / 2  # another configuration
    calls = count_steps(monkeypatch)
    out = tmp_path / "pod2" / "s1.pt"
    started = time.monotonic()
    with pytest.raises(IagnError) as refused:
        train_stage.run(1, None, params, out, device="cpu", quiet=True)
    message = str(refused.value)
    assert f"{uri_of(s3)}/stage1 already holds partial.pt (epoch 1)" in message
    assert "of another configuration" in message and "left untouched" in message
    assert time.monotonic() - started < 60 and calls["n"] == 0  # before any training
    assert objects(s3) == before
    assert not out.parent.exists() or not any(out.parent.iterdir())


@pytest.mark.fault(
    "an unusable `train.checkpoint_uri` (connection refused, missing bucket, no credentials, "
    "read-only credentials)",
    sees="exit 2 within seconds, before training: `checkpoint URI s3://.../stage1: could not "
    "read and write it: cannot connect to the storage server ... / the bucket does not exist "
    "... / no credentials; set AWS_ACCESS_KEY_ID ... / access denied ...`",
    kept="`--out` and `<out>.partial` as they were; nothing written remotely",
)
@pytest.mark.parametrize(
    "case", ["connection refused", "missing bucket", "no credentials", "read-only"]
)
def test_an_unusable_uri_stops_before_training(s3, tiny_synth, tmp_path, monkeypatch, case):
    uri = uri_of(s3)
    if case == "connection refused":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    elif case == "missing bucket":
        uri = f"s3://no-such-bucket-{free_port()}/run"
    elif case == "no credentials":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    else:  # credentials that may read but not write
        monkeypatch.setattr("s3fs.S3FileSystem._pipe_file", _denied)
    out = tmp_path / "s1.pt"
    # What a previous run left locally is kept as it was.
    out.write_bytes(b"previous model")
    (tmp_path / "s1.pt.partial").write_bytes(b"previous partial")
    calls = count_steps(monkeypatch)
    started = time.monotonic()
    with pytest.raises(IagnError) as stopped:
        train_stage.run(
            1, None, with_uri(tiny_params(tiny_synth), uri), out, device="cpu", quiet=True
        )
    seconds = time.monotonic() - started
    message = str(stopped.value)
    expected = {
        "connection refused": "cannot connect to the storage server http://127.0.0.1:",
        "missing bucket": "the bucket does not exist",
        "no credentials": "no credentials; set AWS_ACCESS_KEY_ID",
        "read-only": "access denied",
    }[case]
    assert f"checkpoint URI {uri}" in message and expected in message, message
    assert "Nothing was trained and no checkpoint was changed" in message
    assert calls["n"] == 0 and seconds < 30, seconds
    assert out.read_bytes() == b"previous model"
    assert (tmp_path / "s1.pt.partial").read_bytes() == b"previous partial"
    assert s3.keys() == []


async def _denied(self, path, data, **kwargs):
    raise PermissionError(f"AccessDenied: PutObject on {path}")


@pytest.mark.fault(
    "credentials inside `train.checkpoint_uri` (`s3://KEY:SECRET@...`, a signed query)",
    sees="exit 2: `params.yaml train/stage1.checkpoint_uri holds credentials (s3://bucket/run "
    "...); remove them and give them in the environment instead ...`; the secret is not shown",
    kept="everything: nothing runs, nothing is logged",
)
@pytest.mark.parametrize(
    "uri",
    [
        "s3://AKIAEXAMPLE:s3cr3t-value@bucket/run",
        "s3://bucket/run?X-Amz-Signature=s3cr3t-value",
    ],
)
def test_a_uri_with_credentials_is_refused_without_showing_them(uri):
    params = {"train": {"checkpoint_uri": uri}}
    with pytest.raises(IagnError) as refused:
        stage_config(params, 1)
    assert "holds credentials" in str(refused.value) and "environment" in str(refused.value)
    assert "s3cr3t-value" not in str(refused.value)


def test_no_uri_changes_nothing(tiny_synth):
    assert stage_config(tiny_params(tiny_synth), 1).checkpoint_uri is None
    with pytest.raises(IagnError, match="must be a URL such as s3://"):
        stage_config({"train": {"checkpoint_uri": "bucket/run"}}, 1)


def test_each_sweep_trial_gets_its_own_prefix():
    params = {"train": {"checkpoint_uri": "s3://bucket/run/"}}
    trial = apply_trial(params, {"trial": "t3", "overrides": {"train.lr_head": 0.1}}, "sw1")
    assert trial["train"]["checkpoint_uri"] == "s3://bucket/run/sw1/t3"
    assert params["train"]["checkpoint_uri"] == "s3://bucket/run/"  # the run's own, unchanged
