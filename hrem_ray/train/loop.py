"""The HREM training loop as plain functions.

Nothing here knows about Ray: ``fit`` takes a function that yields an epoch's batches,
an evaluation function and a reporting callback. The single-process ``hrem-ray train``
and the Ray Train worker both wrap it; a distributed run passes ``gather`` so the loss
sees the global batch.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from hrem_ray.config import HREMConfig, TrainConfig
from hrem_ray.data.batches import Batch
from hrem_ray.model import Encoded, hrem_loss
from hrem_ray.train.distributed import world_size
from hrem_ray.train.optim import set_epoch_lr

# (local encodings, local image ids) -> (global encodings, global image ids)
Gather = Callable[[Encoded, Tensor], tuple[Encoded, Tensor]]
# (global step, metrics) -> None: where live metric points go (rank 0 only)
Track = Callable[[int, dict[str, float]], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sampler_seed(seed: int, epoch: int) -> int:
    """The negative sampler's seed for ``epoch``: ``fit`` re-seeds the generator with it at
    every epoch start, so a run resumed from an epoch's checkpoint continues the same stream
    on any device without carrying the generator's state, which does not transfer between
    device kinds (a CPU generator's state is 5,056 bytes, a CUDA one's 16). Every rank draws
    the same negatives of the global batch."""
    return int(np.random.SeedSequence([seed, epoch, 0x5A3]).generate_state(1)[0])


def agreed_finite(loss: Tensor) -> bool:
    """Whether the loss is finite on every rank: one MAX all-reduce of a flag, so that all
    ranks skip a step together. A rank skipping alone (its relation dropout can give it a
    NaN the others do not see) would leave the others waiting in DDP's gradient all-reduce
    until NCCL's watchdog ends the job. The one host sync of a step."""
    bad = (~torch.isfinite(loss.detach())).to(torch.int32).reshape(1)
    if world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad)


def to_device(batch: Batch, device: torch.device | str, *, pin: bool = False) -> Batch:
    """``batch`` on ``device``. On CUDA with ``pin``, copied from page-locked host memory
    without blocking, so the training thread queues the step's kernels while it transfers
    (a pageable copy blocks the thread until it is done)."""
    device = torch.device(device)
    if device.type != "cuda" or not pin:
        return batch.to(device)
    moved = {}
    for f in fields(batch):
        t = getattr(batch, f.name)
        if t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()
        moved[f.name] = t.to(device, non_blocking=True)
    return Batch(**moved)


def apply_train_keys(model: nn.Module, cfg: TrainConfig) -> None:
    """Turn on the model-side speed keys (``grad_checkpoint``, ``compile``) of ``cfg`` on the
    bare HREM module, in place; ``model`` may be a DDP wrapper. Both leave the numbers
    unchanged to float tolerance (tests/test_train_speed_keys.py)."""
    core = getattr(model, "module", model)
    if cfg.grad_checkpoint:
        core.enable_grad_checkpoint()
    if cfg.compile:
        core.compile_towers()


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA matmuls and cuDNN inside the block (about 1e-3 relative error, so off
    unless asked for), the previous settings restored after it."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@dataclass
class TrainState:
    """Progress that a resumed run must restore, besides weights and optimizer."""

    epoch: int = 0  # next epoch to run (0-based)
    iteration: int = 0  # optimizer steps taken (skipped NaN steps not counted)
    best_rsum: float = -math.inf
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(**d)


@dataclass
class EpochReport:
    epoch: int
    metrics: dict[str, Any]  # train loss parts, throughput, dev metrics ("rsum", ...)
    is_best: bool
    state: TrainState


def train_step(
    model: nn.Module,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    iteration: int,
    cfg: HREMConfig,
    *,
    generator: torch.Generator | None = None,
    gather: Gather | None = None,
    epoch: int | None = None,
) -> dict[str, Tensor] | None:
    """One optimisation step; returns the loss parts and the pre-clip gradient norm as
    detached 0-dim tensors (read them only to log: each read is a host sync), or None when a
    non-finite loss on any rank skipped the step on every rank.

    ``model`` may be a DDP wrapper; the loss always runs on the bare HREM module. ``epoch``
    drives the VSE++ warm-up (None: past it).
    """
    core = getattr(model, "module", model)
    model.train()
    device_type = batch.images.device.type
    bf16 = cfg.train.bf16 and device_type == "cuda"
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        enc = model(batch)
        image_ids = batch.image_ids
        if gather is not None:
            enc, image_ids = gather(enc, image_ids)
        out = hrem_loss(core, enc, image_ids, iteration, generator, epoch=epoch)
    optimizer.zero_grad(set_to_none=True)
    if not agreed_finite(out.total):
        return None
    out.total.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
    optimizer.step()
    return {**out.parts, "grad_norm": grad_norm.detach()}


def train_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    cfg: HREMConfig,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    gather: Gather | None = None,
    log: Callable[[str], None] | None = print,
    track: Track | None = None,
    steps_per_epoch: int | None = None,
) -> dict[str, float]:
    """Run one epoch, advancing ``state.iteration``; returns mean loss parts and timings.

    Every ``log_every`` steps (:func:`log_interval`) a progress line goes to ``log`` and the
    window's mean loss parts, learning rate, samples/s and data-wait share go to ``track``
    at the global step :func:`global_step`. The parts are summed on the device and read
    only then and at the end."""
    sums: dict[str, Tensor] = {}
    window: dict[str, Tensor] = {}
    steps = skipped = samples = 0
    wait = first = 0.0
    every = log_interval(cfg.train, steps_per_epoch)
    start = tick = time.perf_counter()
    mark = (start, 0.0, 0, 0)  # the window's start: time, data wait, samples, steps
    for batch in batches:
        wait += time.perf_counter() - tick
        first = first or wait  # a pipeline's start-up: reading a shard split starts one per epoch
        parts = train_step(
            model, to_device(batch, device, pin=cfg.train.pin_memory), optimizer,
            state.iteration, cfg,
            generator=generator, gather=gather, epoch=state.epoch,
        )  # fmt: skip
        if parts is None:
            skipped += 1
        else:
            steps += 1
            state.iteration += 1
            for k, v in parts.items():
                sums[k] = sums[k] + v.double() if k in sums else v.double()
                window[k] = window[k] + v.double() if k in window else v.double()
        samples += len(batch)
        if parts is not None and steps % every == 0 and (log or track):
            now = time.perf_counter()
            if log:
                log(
                    f"epoch {state.epoch + 1} step {steps} iter {state.iteration} "
                    f"loss {float(sums['loss']) / steps:.4f} "
                    f"({samples / (now - start):.1f} samples/s)"
                )
            if track:
                seconds, n = now - mark[0], steps - mark[3]
                point = {f"train/{k}": float(v) / n for k, v in window.items()}
                point.update({"train/lr": optimizer.param_groups[0]["lr"],
                              "train/samples_per_s": (samples - mark[2]) / seconds,
                              "train/data_wait_frac": (wait - mark[1]) / seconds})  # fmt: skip
                track(global_step(state.epoch, steps + skipped, steps_per_epoch, state), point)
            window, mark = {}, (now, wait, samples, steps)
        tick = time.perf_counter()
    seconds = time.perf_counter() - start
    means = torch.stack(list(sums.values())).div(max(steps, 1)).tolist() if sums else []
    metrics = {f"train_{k}": v for k, v in zip(sums, means, strict=True)}
    metrics.update(
        steps=steps,
        skipped_steps=skipped,
        samples_per_s=samples / seconds if seconds > 0 else 0.0,
        data_wait_frac=wait / seconds if seconds > 0 else 0.0,
        first_batch_s=first,
        epoch_seconds=seconds,
    )
    return metrics


def log_interval(cfg: TrainConfig, steps_per_epoch: int | None) -> int:
    """Steps between live points: ``train.log_every``, or with 0 about 20 an epoch."""
    if cfg.log_every:
        return cfg.log_every
    return max(1, (steps_per_epoch or 1000) // 20)


def global_step(epoch: int, batch: int, steps_per_epoch: int | None, state: TrainState) -> int:
    """The x of a live point: from the epoch and the batch within it (skipped steps count),
    so a restarted or resumed run that redoes an epoch lands on the same steps again; the
    optimizer's iteration when the epoch's length is not known."""
    return state.iteration if steps_per_epoch is None else epoch * steps_per_epoch + batch


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: HREMConfig,
    *,
    epoch_batches: Callable[[int], Iterable[Batch]],
    evaluate: Callable[[nn.Module], dict[str, Any]] | None,
    report: Callable[[EpochReport], None],
    state: TrainState | None = None,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    gather: Gather | None = None,
    log: Callable[[str], None] | None = print,
    track: Track | None = None,
    steps_per_epoch: int | None = None,
) -> TrainState:
    """Train from ``state.epoch`` to ``cfg.train.epochs``, evaluating and reporting each epoch.

    Model selection is on the dev ``rsum`` that ``evaluate`` returns (the authors selected
    on the test split). ``report`` is where checkpoints get written. ``track`` gets the live
    points of ``train_epoch`` and each epoch's dev metrics, at the epoch's last global step.
    """
    state = state or TrainState()
    apply_train_keys(model, cfg.train)
    with flush_denormals(cfg.train.flush_denormal), tf32_matmuls(cfg.train.tf32):
        while state.epoch < cfg.train.epochs:
            epoch = state.epoch
            factor = set_epoch_lr(optimizer, epoch, cfg.train)
            if generator is not None:
                generator.manual_seed(sampler_seed(cfg.train.seed, epoch))
            metrics = train_epoch(
                model, epoch_batches(epoch), optimizer, state, cfg,
                device=device, generator=generator, gather=gather, log=log, track=track,
                steps_per_epoch=steps_per_epoch,
            )  # fmt: skip
            metrics["lr_factor"] = factor
            dev = evaluate(getattr(model, "module", model)) if evaluate is not None else {}
            metrics.update(dev)
            is_best = "rsum" in metrics and metrics["rsum"] > state.best_rsum
            if is_best:
                state.best_rsum, state.best_epoch = float(metrics["rsum"]), epoch
            state.epoch = epoch + 1
            state.history.append({"epoch": epoch, **_scalars(metrics)})
            if log:
                log(_epoch_line(epoch, cfg.train.epochs, metrics, is_best))
            if track:
                batches = metrics["steps"] + metrics["skipped_steps"]
                point = {f"dev/{k}": v for k, v in _scalars(dev).items()} | {"epoch": epoch}
                track(global_step(epoch, batches, steps_per_epoch, state), point)
            report(EpochReport(epoch, metrics, is_best, state))
    return state


def flushing_denormals() -> bool:
    """Whether this thread flushes subnormal floats to zero (torch has no getter)."""
    return float(torch.tensor(1e-40, dtype=torch.float32) * 1.0) == 0.0


@contextlib.contextmanager
def flush_denormals(enabled: bool) -> Iterator[None]:
    """Flush subnormals (or not) inside the block and restore the previous setting after it:
    the setting is the calling thread's CPU state, which other code (e.g. hypothesis) checks."""
    before = flushing_denormals()
    torch.set_flush_denormal(enabled)  # a no-op where unsupported
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _epoch_line(epoch: int, epochs: int, m: dict[str, Any], is_best: bool) -> str:
    line = f"epoch {epoch + 1}/{epochs}: loss {m.get('train_loss', float('nan')):.4f}"
    line += f", {m['samples_per_s']:.1f} samples/s, {m['epoch_seconds']:.1f}s"
    if "rsum" in m:
        line += f", dev rsum {m['rsum']:.2f}" + (" (best)" if is_best else "")
    if epoch + 1 < epochs:  # from this epoch's training time (evaluation not counted)
        line += f", ETA {(epochs - epoch - 1) * m['epoch_seconds']:.0f}s"
    return line


def rng_state(device: torch.device | str) -> dict[str, Tensor]:
    """The global RNG states a resume needs: torch's CPU one, and the CUDA one of the training
    device itself (``torch.cuda.get_rng_state()`` alone reads the *current* device, which is
    not the training one under ``--device cuda:1``)."""
    rng = {"torch": torch.get_rng_state()}
    device = torch.device(device)
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def set_rng_state(rng: dict[str, Tensor], device: torch.device | str) -> None:
    """Restore :func:`rng_state`; a CUDA state only onto a CUDA training device."""
    torch.set_rng_state(rng["torch"])
    device = torch.device(device)
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def train_state_dict(
    optimizer: torch.optim.Optimizer, state: TrainState, generator: torch.Generator | None
) -> dict[str, Any]:
    """Everything besides the weights that resuming needs; tensors and plain containers only,
    so it loads with ``torch.load(weights_only=True)``. ``generator`` (the sampler's, on the
    training device) names the device; its state is not saved (:func:`sampler_seed`)."""
    device = generator.device if generator is not None else torch.device("cpu")
    return {"optimizer": optimizer.state_dict(), "state": state.to_dict(), "rng": rng_state(device)}


def restore_train_state(
    saved: dict[str, Any], optimizer: torch.optim.Optimizer, generator: torch.Generator | None
) -> TrainState:
    """Load what :func:`train_state_dict` saved, on any device kind. A ``sampler`` state in
    older checkpoints is ignored: ``fit`` re-seeds the sampler at every epoch start."""
    optimizer.load_state_dict(saved["optimizer"])
    set_rng_state(saved["rng"], generator.device if generator is not None else "cpu")
    return TrainState.from_dict(saved["state"])
