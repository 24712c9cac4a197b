"""The epoch loop shared by stage training and student distillation.

It owns what every training run needs: seeded epochs (so a resumed run repeats exactly the
batches of an uninterrupted one), mixed precision (with loss scaling for fp16),
channels_last, gradient clipping, the warm-up + cosine schedule, per-epoch validation,
atomic checkpoints after every epoch, resume from the last checkpoint, a clear stop on a
NaN loss (on every rank at once), a save-and-stop at the next batch on SIGTERM, progress
bars, and callbacks for experiment tracking. What a step computes is passed in as
`step_fn`.

Files: every epoch goes to `<out>.partial`; the finished model goes to `out` only when the
step calls `finish_run` after the last epoch (with what it adds, such as the calibration).
So `out` (and its history/metrics JSON) is either the previous finished model or the new
one, never a half-trained one, whatever kills the run: DVC keeps it in place
(`persist: true`) and downstream steps never see a partial model. A rerun with the same
identity (kind, stage, configs, data, init/teacher checkpoint) continues from the
partial file; anything else starts fresh.

SIGTERM (Kubernetes' notice before it kills a pod) is not fatal inside the loop: the batch
in progress finishes, every rank agrees to stop after it, `<out>.partial` gets the epoch so
far (the batch reached, each rank's RNG states, step generator and running loss sums) and
`Preempted` exits with EXIT_PREEMPTED (143). The rerun skips the batches already done, never
loading them, and ends bit-identical to an uninterrupted run on CPU (tests/test_preemption.py;
with num_workers > 0 the remaining images get other random augmentations).

With `train.checkpoint_uri` (iagn/train/durable.py) the main rank also uploads each partial
save (epoch ends, the SIGTERM save) and the finished model there, and a run without a local
partial (a fresh pod) first fetches it: checked before any model work.
"""

from __future__ import annotations

import itertools
import math
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from iagn.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from iagn.device import device_name
from iagn.errors import IagnError, Preempted
from iagn.evaluation.heads import accuracy_on
from iagn.io import write_json_atomic
from iagn.precision import autocast, grad_scaler
from iagn.train.config import process_batch_size
from iagn.train.distributed import (
    Runtime,
    all_reduce_mean,
    any_rank,
    barrier,
    broadcast_from_main,
    gather_to_main,
)
from iagn.train.durable import FINISHED, PARTIAL, Mirror, fingerprint
from iagn.train.schedule import warmup_cosine

StepFn = Callable[[torch.nn.Module, dict, torch.Generator], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class LoopSpec:
    """What the loop needs from a step: a model, its param groups and hyperparameters."""

    model: torch.nn.Module
    param_groups: list[dict]
    epochs: int
    momentum: float
    weight_decay: float
    warmup_epochs: float
    grad_clip: float
    precision: str
    channels_last: bool
    seed: int
    step_fn: StepFn
    validate_fn: Callable[[torch.nn.Module], dict[str, float]]
    make_loader: Callable[[int], Any]  # epoch -> training DataLoader
    payload: Callable[[], dict]  # what the checkpoint adds: kind, configs, data identity
    description: str = "train"
    ddp_find_unused: bool = False  # True when some parameters get no loss (early stages)
    # This step's prefix under train.checkpoint_uri: checkpoints are mirrored there too
    checkpoint_uri: str | None = None
    # After each epoch, with (epoch, record); a callback that raises stops the run cleanly.
    callbacks: list[Callable[[int, dict], None]] = field(default_factory=list)


def standard_spec(
    config,
    prepared,
    runtime: Runtime,
    precision: str,
    validate_view: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    **fields,
) -> LoopSpec:
    """A LoopSpec whose optimizer settings, training loader and validation come from a
    stage or distill config (`epochs`, `batch_size`, `momentum`, `weight_decay`,
    `warmup_epochs`, `grad_clip`, `channels_last`, `seed`, `num_workers`) and `prepared`
    data; `fields` supply the rest (model, param groups, step, payload, ...).

    `validate_view(model)`: what validation calls instead of the model itself (a stage
    validates with the heads it has trained only, iagn/train/stage_step.py `ActiveHeads`).

    `config.batch_size` is the global batch: under W processes each rank's loader takes
    batch_size / W of every global batch (a size that does not split is an IagnError here,
    before any model work), and the checkpoint's train_config records `world_size` and
    `process_batch_size` (neither is part of the resume identity, `resume_identity`)."""
    key = "train.batch_size" if hasattr(config, "stage") else "distill.batch_size"
    per_process = process_batch_size(
        config.batch_size, runtime.world_size, key, nodes=runtime.nodes
    )
    step_payload = fields.pop("payload")

    def payload() -> dict:
        recorded = step_payload()
        layout = {"world_size": runtime.world_size, "process_batch_size": per_process}
        return {**recorded, "train_config": {**recorded["train_config"], **layout}}

    def validate(trained: torch.nn.Module) -> dict[str, float]:
        loader = val_loader(prepared, config, runtime.world_size)
        shown = validate_view(trained) if validate_view else trained
        return accuracy_on(shown, loader, runtime.device, precision, prefix="val_")

    def train_loader(epoch: int):
        return prepared.loader(
            "train",
            train=True,
            batch_size=config.batch_size,
            seed=config.seed,
            epoch=epoch,
            num_workers=config.num_workers,
            rank=runtime.rank,
            world_size=runtime.world_size,
        )

    return LoopSpec(
        epochs=config.epochs,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        warmup_epochs=config.warmup_epochs,
        grad_clip=config.grad_clip,
        precision=precision,
        channels_last=config.channels_last,
        seed=config.seed,
        validate_fn=validate,
        make_loader=train_loader,
        payload=payload,
        **fields,
    )


def val_loader(prepared, config, world_size: int = 1):
    """The validation split in evaluation order, at twice a process's training batch (no
    gradients, so the same memory): every rank validates the whole split."""
    return prepared.loader("val", train=False, batch_size=config.batch_size // world_size * 2)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs from one integer below 2**64."""
    random.seed(seed)
    # NumPy's legacy seed takes 32 bits; a larger seed goes in whole, as two 32-bit words.
    np.random.seed(seed if seed < 2**32 else [seed & 0xFFFFFFFF, seed >> 32])
    torch.manual_seed(seed)


# Bit widths of the epoch and the rank inside an epoch seed (`epoch_seed`).
EPOCH_BITS, RANK_BITS = 20, 16


def epoch_seed(seed: int, epoch: int, rank: int, stream: int) -> int:
    """The seed of one rank's epoch: `stream` 0 seeds the global RNGs (augmentation, data
    workers), 1 the step's generator (jigsaw, attention crops).

    (seed, epoch, rank, stream) are packed into disjoint bits, so two ranks, two epochs or
    the two streams never share a seed (the earlier `seed * 1000 + epoch + 7 * rank` gave
    rank 1 the seed of rank 0's epoch 8, which then repeated rank 1's first epoch)."""
    if not (0 <= epoch < 2**EPOCH_BITS and 0 <= rank < 2**RANK_BITS and stream in (0, 1)):
        raise ValueError(f"epoch {epoch}, rank {rank} or stream {stream} out of range")
    packed = (((seed << EPOCH_BITS | epoch) << RANK_BITS | rank) << 1) | stream
    return packed % 2**64  # torch's seed range; the low 37 bits keep (epoch, rank, stream)


def _progress(total: int, description: str, quiet: bool):
    if quiet:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="batch", leave=False, dynamic_ncols=True)


def history_path(checkpoint: Path) -> Path:
    """Per-epoch metrics beside a checkpoint (JSON list; DVC plots read it)."""
    return checkpoint.with_name(checkpoint.stem + ".history.json")


def metrics_path(checkpoint: Path) -> Path:
    """The last epoch's metrics beside a checkpoint (JSON; DVC metrics read it)."""
    return checkpoint.with_name(checkpoint.stem + ".metrics.json")


def partial_path(checkpoint: Path) -> Path:
    """Where an unfinished run keeps its last epoch (resumed from, never used downstream)."""
    return checkpoint.with_name(checkpoint.name + ".partial")


def run_loop(spec: LoopSpec, out: Path, runtime: Runtime, quiet: bool = False) -> dict[str, Any]:
    """Train for spec.epochs, resuming from `<out>.partial` if it holds an unfinished run of
    this spec.

    Writes `<out>.partial` after every epoch, the last one included, and returns
    {"history", "steps", "state"}: `state` is the last epoch's checkpoint, which the step
    hands to `finish_run` with what it adds after training (the calibration).

    SIGTERM (what Kubernetes sends before killing a pod) stops the run at the next batch
    boundary, on every rank at the same batch: `<out>.partial` then holds the epoch in
    progress up to that batch, and `Preempted` (exit code EXIT_PREEMPTED) is raised; the same
    command resumes at the next batch.
    """
    partial = partial_path(out)
    # Before any model work: an unusable URI or another run's checkpoint stops here.
    mirror = _prepare_mirror(spec, partial, runtime)
    device = runtime.device
    model = spec.model.to(device)
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        spec.param_groups, momentum=spec.momentum, weight_decay=spec.weight_decay, nesterov=True
    )
    steps_per_epoch = max(1, len(spec.make_loader(0)))
    scheduler = warmup_cosine(
        optimizer,
        warmup_steps=round(spec.warmup_epochs * steps_per_epoch),
        total_steps=spec.epochs * steps_per_epoch,
    )
    scaler = grad_scaler(spec.precision, device)
    start_epoch, step, history = 0, 0, []
    resumed = _shared_resume_state(partial, spec, runtime)
    mid_epoch = None  # the per-rank state of an epoch stopped part-way (SIGTERM)
    saved: tuple[int, int] | None = None  # (epochs, batches) that `partial` holds
    if resumed is not None:
        model.load_state_dict(resumed["model_state"])
        optimizer.load_state_dict(resumed["optimizer_state"])
        scheduler.load_state_dict(resumed["scheduler_state"])
        if resumed.get("scaler_state"):
            scaler.load_state_dict(resumed["scaler_state"])
        start_epoch, step, history = resumed["epoch"], resumed["step"], resumed["history"]
        set_rng_state(resumed["rng"])
        mid_epoch = resumed.get("mid_epoch")
        saved = (start_epoch, mid_epoch["batch"] if mid_epoch else 0)
        if runtime.is_main and not quiet:
            where = f"after epoch {start_epoch} of {spec.epochs}"
            if mid_epoch:
                where = (
                    f"in epoch {start_epoch + 1} of {spec.epochs}, after batch {mid_epoch['batch']}"
                )
            print(f"resuming {partial} {where}")

    wrapped = model
    # BatchNorm stays per process (no SyncBatchNorm): each rank normalizes its own
    # batch_size / W images (with their jigsaw and attention views). Measured on CPU (tests/
    # test_multinode.py): W = 2 on the global batch trains as close to one process as the
    # per-rank random draws (crops, flips, jigsaw) allow anyway; for one step of 4 images,
    # other draws move the gradient by 131-141% of its norm, BatchNorm over two halves by
    # 158%, so syncing BatchNorm alone would not bring the runs closer. It would cost one
    # all-reduce per BatchNorm layer per forward (53 in ResNet-50; latency-bound across
    # nodes), and PyTorch runs SyncBatchNorm on GPUs only. At the paper's batches (16+ per
    # GPU) per-process statistics are the usual large-batch practice (Goyal et al. 2017).
    if runtime.distributed:
        ids = [device.index] if device.type == "cuda" else None
        wrapped = DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=spec.ddp_find_unused
        )

    def state(epoch: int) -> dict:
        return {
            **spec.payload(),
            "model_state": model.state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "scheduler_state": scheduler.state_dict(),
            "scaler_state": scaler.state_dict(),  # empty unless fp16
            "epoch": epoch,
            "step": step,
            "rng": rng_state(),
            "history": history,
            "complete": False,
            # What trained it (the model card shows it): one process's device, times the world.
            "trained_on": {"device": device_name(device), "processes": runtime.world_size},
        }

    with _StopOnSigterm() as stop:
        for epoch in range(start_epoch, spec.epochs):
            # Reseed per epoch: the epoch depends only on (seed, epoch, rank) and the weights.
            seed_everything(epoch_seed(spec.seed, epoch, runtime.rank, 0))
            generator = torch.Generator().manual_seed(epoch_seed(spec.seed, epoch, runtime.rank, 1))
            loader = spec.make_loader(epoch)
            batches = len(loader)
            done, seen, sums, earlier_seconds = 0, 0, {}, 0.0
            if mid_epoch is not None:
                mine = mid_epoch["ranks"][runtime.rank]
                done, seen, sums = mid_epoch["batch"], mine["seen"], dict(mine["sums"])
                earlier_seconds = mid_epoch["seconds"]
                loader = _skip_batches(loader, done)
            # Created before the RNG is restored: creating it draws from the RNG as it did
            # at this point of the uninterrupted epoch.
            batch_iter = iter(loader)
            if mid_epoch is not None:
                set_rng_state(mine["rng"])
                generator.set_state(mine["generator"])
                mid_epoch = None
            wrapped.train()
            started = time.perf_counter()
            bar = _progress(
                batches,
                f"{spec.description} epoch {epoch + 1}/{spec.epochs}",
                quiet or not runtime.is_main,
            )
            if bar is not None and done:
                bar.update(done)
            stopping = False
            for batch in batch_iter:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                if spec.channels_last:
                    batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
                with autocast(spec.precision, device):
                    loss, logs = spec.step_fn(wrapped, batch, generator)
                value = float(loss.detach())
                # One collective per batch decides both, so all ranks raise or stop together.
                diverged, stopping = any_rank([not math.isfinite(value), stop.requested], runtime)
                if diverged:
                    if bar is not None:
                        bar.close()
                    raise _diverged(value, epoch, step, out, partial, saved)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if spec.grad_clip > 0:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                    torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
                scaler.step(optimizer)  # fp16: skipped when a gradient overflowed
                scaler.update()
                with warnings.catch_warnings():
                    # The schedule follows the batch count even when fp16 skipped the
                    # optimizer step (so a resumed run lines up); PyTorch's order warning is
                    # noise then.
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
                    scheduler.step()
                step += 1
                done += 1
                count = batch["image"].shape[0]
                seen += count
                for key, value in logs.items():
                    sums[key] = sums.get(key, 0.0) + value * count
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{logs['loss']:.3f}")
                if stopping:
                    break
            if bar is not None:
                bar.close()
            elapsed = earlier_seconds + time.perf_counter() - started
            # A SIGTERM during the epoch's last batch stops before validation, which can be
            # long enough to outlast a grace period.
            if stopping or any_rank([stop.requested], runtime)[0]:
                mine = {
                    "rng": rng_state(),
                    "generator": generator.get_state(),
                    "sums": sums,
                    "seen": seen,
                }
                ranks = gather_to_main(mine, runtime)
                if runtime.is_main:
                    mid = {"batch": done, "seconds": elapsed, "ranks": ranks}
                    save_checkpoint(partial, {**state(epoch), "mid_epoch": mid})
                    if mirror and mirror.mirror(partial, PARTIAL, epoch, done):
                        print(f"uploaded {partial} to {mirror.shown}/{PARTIAL}", file=sys.stderr)
                barrier(runtime)
                raise _preempted(epoch + 1, done, partial, runtime)
            record = {k: all_reduce_mean(v / max(1, seen), runtime) for k, v in sums.items()}
            record["images_per_s"] = (
                all_reduce_mean(seen / max(elapsed, 1e-9), runtime) * runtime.world_size
            )
            record["lr_head"] = optimizer.param_groups[-1]["lr"]
            record["lr_backbone"] = optimizer.param_groups[0]["lr"]
            record["epoch_seconds"] = elapsed
            model.eval()
            record.update(spec.validate_fn(model))
            record["epoch"] = epoch + 1
            history.append(record)
            if runtime.is_main:
                save_checkpoint(partial, state(epoch + 1))
                if mirror:
                    mirror.mirror(partial, PARTIAL, epoch + 1)
            saved = (epoch + 1, 0)
            barrier(runtime)
            if runtime.is_main and not quiet:
                shown = {k: record[k] for k in ("loss", "val_acc", "images_per_s") if k in record}
                print(
                    f"{spec.description} epoch {epoch + 1}/{spec.epochs}: "
                    + ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
                )
            for callback in spec.callbacks:
                callback(epoch + 1, record)
            # A SIGTERM during validation: the finished epoch is saved, stop here.
            if any_rank([stop.requested], runtime)[0]:
                raise _preempted(epoch + 1, batches, partial, runtime)
    return {"history": history, "steps": step, "state": state(spec.epochs), "mirror": mirror}


def _prepare_mirror(spec: LoopSpec, partial: Path, runtime: Runtime) -> Mirror | None:
    """The step's Mirror (None without a URI), checked and the remote partial fetched by the
    main rank; every rank raises together if that failed."""
    if not spec.checkpoint_uri:
        return None
    mirror = Mirror(spec.checkpoint_uri, fingerprint(resume_identity(spec.payload())))
    error = None
    if runtime.is_main:
        try:
            mirror.prepare(partial)
        except IagnError as exc:
            error = exc
    if any_rank([error is not None], runtime)[0]:
        raise error or IagnError(f"rank 0 could not use {mirror.shown}; see its error")
    barrier(runtime)  # the fetched partial is in place before any rank reads it
    return mirror


class _StopOnSigterm:
    """While active, SIGTERM only sets `requested`; the loop stops at the next batch boundary.

    Installed only from the main thread (Python delivers signals there, and signal.signal
    refuses other threads); the previous handler comes back on exit, so SIGTERM outside the
    loop (calibration, tracking) ends the process as before.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._installed = False

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> _StopOnSigterm:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            # None: the previous handler was not set from Python; the default is closest.
            signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)


def _skip_batches(loader, done: int):
    """`loader` without its first `done` batches, which are never loaded.

    The remaining batches are the same as in a full pass (same order, same images): the
    batch sampler draws from the loader's generator (or DistributedSampler's own seed),
    never from the global RNG, and a new DataLoader on it draws those in the same order.
    """
    if done == 0:
        return loader
    if not isinstance(loader, DataLoader):
        return itertools.islice(loader, done, None)
    return DataLoader(
        loader.dataset,
        batch_sampler=_SkipBatches(loader.batch_sampler, done),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
    )


class _SkipBatches:
    """A batch sampler without its first `skip` batches (their indices are drawn, unused)."""

    def __init__(self, batch_sampler, skip: int):
        self.batch_sampler, self.skip = batch_sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.batch_sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)


def _preempted(epoch: int, batch: int, partial: Path, runtime: Runtime) -> Preempted:
    """The stop on SIGTERM, announced once (rank 0) whatever catches it later."""
    message = (
        f"stopped by SIGTERM after epoch {epoch} batch {batch}; saved {partial}; "
        "rerun the same command to resume"
    )
    if runtime.is_main:
        print(message, file=sys.stderr, flush=True)
    return Preempted(message)


def _diverged(
    value: float, epoch: int, step: int, out: Path, partial: Path, saved: tuple[int, int] | None
) -> IagnError:
    if saved is None:
        kept = "no epoch finished, so nothing was saved"
    elif saved[1] == 0:
        kept = f"the last good epoch ({saved[0]}) is in {partial}"
    else:
        kept = f"the last good state (epoch {saved[0] + 1}, batch {saved[1]}) is in {partial}"
    what = f"{value}" if not math.isfinite(value) else "non-finite on another rank"
    return IagnError(
        f"loss became {what} at epoch {epoch + 1}, step {step + 1}; stopped. {out} is left as "
        f"it was; {kept}. Lower the learning rates (lr_head, lr_backbone) or use precision "
        "fp32."
    )


def finish_run(
    out: Path, result: dict, runtime: Runtime, extra: dict | None = None, record: dict | None = None
) -> list[dict]:
    """Write the finished model, then drop `<out>.partial`; returns the history.

    `out` gets the last epoch's state (`result` of `run_loop`) plus `extra`, what the step
    computed after training (the calibration); `record` joins the last epoch's metrics in
    `<stem>.history.json` and `<stem>.metrics.json`. Until this runs, `out` is still the
    previous finished model, and a rerun resumes from the partial file without training.
    """
    history = [dict(r) for r in result["history"]]
    if history and record:
        history[-1].update(record)
    if runtime.is_main:
        save_checkpoint(
            out, {**result["state"], **(extra or {}), "history": history, "complete": True}
        )
        if history:
            write_json_atomic(history_path(out), history)
            write_json_atomic(metrics_path(out), history[-1])
        partial_path(out).unlink(missing_ok=True)
        mirror = result.get("mirror")
        # The partial is dropped remotely only once the finished checkpoint is up.
        if mirror and mirror.mirror(out, FINISHED, result["state"]["epoch"]):
            mirror.drop_partial()
    barrier(runtime)
    return history


# What must match for a partial run to be continued rather than restarted.
RESUME_IDENTITY = ("kind", "stage", "model_config", "train_config", "data", "init", "teacher")
# train_config keys that say how the run was spread over processes, not what it trains
# (the global batch, train.batch_size, is in the identity).
LAYOUT_KEYS = ("world_size", "process_batch_size")


def resume_identity(payload: dict) -> dict:
    """What a partial checkpoint is matched against: RESUME_IDENTITY of `payload`, with
    train_config's LAYOUT_KEYS left out.

    The number of processes may change between epochs: an epoch's batches are the same
    global batches whatever the number of processes (iagn/train/data.py
    `ShardedGlobalBatches`), so a run saved at an epoch boundary by W processes continues
    on W' processes with the same global batch. A partial saved mid-epoch (SIGTERM) is
    different: it holds each of its W ranks' position and random state, which do not map
    onto another number of ranks, so `_resume_state` refuses it under W' != W with a clear
    error (rerun with W processes to finish that epoch, or delete the partial) rather than
    restarting the epoch from weights that already took part of it."""
    identity = {key: payload.get(key) for key in RESUME_IDENTITY}
    if isinstance(identity["train_config"], dict):
        config = identity["train_config"]
        identity["train_config"] = {k: v for k, v in config.items() if k not in LAYOUT_KEYS}
    return identity


def _shared_resume_state(partial: Path, spec: LoopSpec, runtime: Runtime) -> dict | None:
    """`_resume_state` as rank 0 sees it, on every rank: only rank 0 writes the partial, so
    on several nodes without a shared disk only rank 0 has it; every rank resumes from the
    same state (or raises the same error)."""
    answer: Any = None
    if runtime.is_main:
        try:
            answer = _resume_state(partial, spec, runtime.world_size)
        except IagnError as exc:
            answer = ("error", str(exc))
    answer = broadcast_from_main(answer, runtime)
    if isinstance(answer, tuple):
        raise IagnError(answer[1])
    return answer


def _resume_state(partial: Path, spec: LoopSpec, world_size: int = 1) -> dict | None:
    """The unfinished run at `partial` if it has this spec's identity (`resume_identity`),
    else None; an IagnError for a mid-epoch partial of another number of processes."""
    if not partial.is_file():
        return None
    try:
        previous = load_checkpoint(partial)
    except IagnError:
        return None  # a corrupt leftover is replaced, never trusted
    if resume_identity(previous) != resume_identity(spec.payload()):
        return None
    mid = previous.get("mid_epoch")
    if mid and len(mid["ranks"]) != world_size:
        saved_by = len(mid["ranks"])
        raise IagnError(
            f"{partial} holds epoch {previous['epoch'] + 1} stopped after batch {mid['batch']} "
            f"by {saved_by} process(es); this run has {world_size}. A run stopped mid-epoch "
            f"resumes only on as many processes (each one's place in the data and random "
            f"state were saved): rerun with {saved_by} process(es) (params.yaml "
            f"distributed: nodes x procs_per_node) to finish that epoch, then change it (a "
            f"partial saved at an epoch's end resumes on any number of processes); or delete "
            f"{partial} to start over. Nothing was trained or changed"
        )
    return previous
