"""HREM on Ray Train (V2 API): the plain training loop of ``train/loop.py`` on every worker.

Per worker: the towers are wrapped in DDP (``wrap_ddp``), each step all-gathers the
encodings so the relation module and the loss see the global batch (``gather_encoded``),
rank 0 evaluates on dev and reports a checkpoint in the project's format every epoch, and a
restarted worker group resumes from the latest one (weights, optimizer, RNG, epoch,
iteration).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from hrem_ray import storage
from hrem_ray.checkpoint import copy_checkpoint, load_train_state
from hrem_ray.config import HREMConfig
from hrem_ray.data.precomp import PrecompSplit
from hrem_ray.data.ray_data import (
    data_error,
    pairs_dataset,
    shard_batches,
    sharded_batches,
    steps_per_epoch,
)
from hrem_ray.data.shards import ShardedSplit, open_training_split, verify_shards
from hrem_ray.ray_runtime import LineRelay
from hrem_ray.train.distributed import gather_encoded, world_size, wrap_ddp
from hrem_ray.train.history import write_history
from hrem_ray.train.loop import EpochReport, fit
from hrem_ray.train.setup import (
    build_trainee,
    check_data,
    check_new_run,
    dev_evaluator,
    epoch_metrics,
    resolve_config,
    run_path,
    save_epoch,
)

METRIC = "rsum"  # dev rsum: checkpoint ranking and model selection


@dataclass
class RayRunOptions:
    """How a run maps onto the cluster (not part of the model's config)."""

    storage_path: str = "runs"  # a local folder, NFS, or a URI (s3://, gs://): docs/storage.md
    name: str = "hrem"
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2
    keep_checkpoints: int = 2
    resume: bool = False


def _broadcast(obj: Any) -> Any:
    """rank 0's ``obj`` on every rank (identical best-epoch bookkeeping everywhere)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train_worker(config: dict[str, Any]) -> None:
    """The per-worker function given to ``TorchTrainer``."""
    cfg = HREMConfig.from_dict(config["hrem"])
    torch.set_num_threads(int(config.get("torch_threads", 1)))
    ctx = ray.train.get_context()
    rank, workers = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume_from:
        trainee = build_trainee(cfg, device, resume_from)
    wrapped = trainee.model
    if workers > 1:
        ids = [device.index] if device.type == "cuda" else None
        wrapped = wrap_ddp(trainee.model, device_ids=ids)

    data = cfg.data
    train = open_training_split(data.data_path, data.dataset, data.train_split)
    local_batch = cfg.train.batch_size // workers
    steps = steps_per_epoch(train, workers, local_batch)
    augment = dict(seed=cfg.train.seed, rank=rank, region_keep=data.region_keep,
                   word_aug=data.word_aug)  # fmt: skip
    if isinstance(train, ShardedSplit):

        def epoch_batches(epoch: int):
            return sharded_batches(
                train, cfg.model.bert_path, data.max_tokens, local_batch, epoch=epoch,
                workers=workers, shuffle_buffer=data.shuffle_buffer, **augment,
            )  # fmt: skip
    else:
        shard = ray.train.get_dataset_shard("train")

        def epoch_batches(epoch: int):
            return shard_batches(
                shard, train, trainee.tokenizer, local_batch, steps, epoch=epoch, **augment
            )

    evaluate_dev = dev_evaluator(trainee, device) if rank == 0 else None

    def evaluate(m) -> dict[str, float]:
        return _broadcast(evaluate_dev(m) if rank == 0 else None)

    def report(r: EpochReport) -> None:
        if rank != 0:
            ray.train.report(epoch_metrics(r), checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = save_epoch(Path(tmp) / "checkpoint", trainee, r)
            ray.train.report(epoch_metrics(r), checkpoint=Checkpoint.from_directory(str(path)))

    fit(
        wrapped, trainee.optimizer, cfg, epoch_batches=epoch_batches, evaluate=evaluate,
        report=report, state=trainee.state, device=device, generator=trainee.generator,
        gather=gather_encoded if workers > 1 else None,
        log=config.get("log") if rank == 0 else None,
    )  # fmt: skip


def build_trainer(
    cfg: HREMConfig,
    options: RayRunOptions,
    *,
    callbacks: list | None = None,
    log: Callable[[str], None] | None = None,
) -> TorchTrainer:
    """A TorchTrainer for ``cfg`` (on a resolved copy): the data is checked first, from
    headers and captions only, so a bad path fails here rather than on a worker. Rank 0's
    progress lines go to ``log`` (e.g. a ``LineRelay``'s ``send``)."""
    cfg = resolve_config(cfg)
    train = check_data(cfg, options.num_workers)
    return TorchTrainer(
        train_worker,
        train_loop_config={"hrem": cfg.to_dict(), "log": log},
        scaling_config=ScalingConfig(
            num_workers=options.num_workers,
            use_gpu=options.use_gpu,
            resources_per_worker={"CPU": options.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=options.name,
            storage_path=storage.absolute(options.storage_path),
            checkpoint_config=CheckpointConfig(
                num_to_keep=options.keep_checkpoints,
                checkpoint_score_attribute=METRIC,
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=options.max_failures),
            callbacks=callbacks,
        ),
        datasets=_datasets(train, cfg),
    )


def _datasets(train: PrecompSplit | ShardedSplit, cfg: HREMConfig) -> dict | None:
    """The light caption rows of a memory-mapped split; a sharded one is read per epoch by
    each worker's own pipeline (``data/ray_data.py``)."""
    if isinstance(train, ShardedSplit):
        return None
    return {"train": pairs_dataset(train, cfg.model.bert_path, cfg.data.max_tokens)}


def check_shards(cfg: HREMConfig, log: Callable[[str], None] | None = None) -> None:
    """Read a sharded train split once and check every shard's checksum, before any worker
    starts (a memory-mapped split is checked batch by batch instead)."""
    data = resolve_config(cfg).data
    train = open_training_split(data.data_path, data.dataset, data.train_split)
    if isinstance(train, ShardedSplit):
        verify_shards(train, log)


def train_ray(
    cfg: HREMConfig, options: RayRunOptions, *, log: Callable[[str], None] = print
) -> str:
    """Fit on Ray Train; returns ``<run>/best``, a copy of the best checkpoint (by dev rsum)
    inside the run's storage, local or a URI, next to the run's metrics files."""
    path = run_path(options.storage_path, options.name)
    check_new_run(path, options.resume)
    check_shards(cfg, log)
    with LineRelay(log) as relay:
        try:
            result = build_trainer(cfg, options, log=relay.send).fit()
        except Exception as e:  # fit() raises a worker's error wrapped in Ray Train's
            cause = data_error(e)
            if cause is None:
                raise
            raise cause from None
    if result.error is not None:
        raise data_error(result.error) or result.error
    best, metrics = max(result.best_checkpoints or [], key=lambda cm: cm[1].get(METRIC, -1e9),
                        default=(None, None))  # fmt: skip
    if best is None:
        raise RuntimeError(f"run {path} finished without a checkpoint")
    log(f"best dev {METRIC} {metrics[METRIC]:.2f} at epoch {int(metrics['epoch']) + 1}")
    latest = storage.fetch_dir(storage.join(path, os.path.basename(result.checkpoint.path)))
    write_history(load_train_state(latest)["state"]["history"], path)
    best_copy = copy_checkpoint(storage.join(path, os.path.basename(best.path)),
                                storage.join(path, "best"))  # fmt: skip
    return str(best_copy)
