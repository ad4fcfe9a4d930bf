"""HREM on Ray Train (V2 API): the plain training loop of ``train/loop.py`` on every worker.

Per worker: the towers are wrapped in DDP (``wrap_ddp``), each step all-gathers the
encodings so the relation module and the loss see the global batch (``gather_encoded``),
rank 0 evaluates on dev and reports a checkpoint in the project's format every epoch, and a
restarted worker group resumes from the latest one (weights, optimizer, RNG, epoch,
iteration).
"""

from __future__ import annotations

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

from hrem_ray.backbone import default_bert_path
from hrem_ray.checkpoint import copy_checkpoint, load_train_state, load_weights, save_checkpoint
from hrem_ray.config import HREMConfig
from hrem_ray.data.precomp import PrecompSplit, open_split
from hrem_ray.data.ray_data import pairs_dataset, shard_batches
from hrem_ray.data.tokenize import CaptionTokenizer
from hrem_ray.eval.evaluate import evaluate_split, flat_metrics
from hrem_ray.model import build_model
from hrem_ray.train.distributed import gather_encoded, world_size, wrap_ddp
from hrem_ray.train.history import write_history
from hrem_ray.train.loop import (
    EpochReport,
    fit,
    restore_train_state,
    seed_everything,
    train_state_dict,
)
from hrem_ray.train.optim import build_optimizer

METRIC = "rsum"  # dev rsum: checkpoint ranking and model selection


@dataclass
class RayRunOptions:
    """How a run maps onto the cluster (not part of the model's config)."""

    storage_path: str = "runs"
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
    seed_everything(cfg.train.seed)

    data = cfg.data
    train = open_split(data.data_path, data.dataset, data.train_split, check_finite=False)
    tokenizer = CaptionTokenizer.from_dir(cfg.model.bert_path, max_tokens=data.max_tokens)
    model = build_model(cfg.model, pretrained=True).to(device)
    optimizer = build_optimizer(model, cfg.train)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)  # same on all ranks
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            load_weights(d, model)
            state = restore_train_state(load_train_state(d), optimizer, generator)
    wrapped = model
    if workers > 1:
        wrapped = wrap_ddp(model, device_ids=[device.index] if device.type == "cuda" else None)

    local_batch = cfg.train.batch_size // workers
    steps = train.n_captions // workers // local_batch
    shard = ray.train.get_dataset_shard("train")

    def epoch_batches(epoch: int):
        return shard_batches(
            shard, train, tokenizer, local_batch, steps, seed=cfg.train.seed, epoch=epoch,
            rank=rank, region_keep=data.region_keep, word_aug=data.word_aug,
        )  # fmt: skip

    dev = open_split(data.data_path, data.dataset, data.val_split) if rank == 0 else None

    def evaluate(m) -> dict[str, float]:
        metrics = None
        if rank == 0:
            result = evaluate_split(
                m, dev, tokenizer, batch_size=cfg.train.eval_batch_size, device=device
            )
            metrics = flat_metrics(result)
        return _broadcast(metrics)

    def report(r: EpochReport) -> None:
        metrics = {k: v for k, v in r.metrics.items() if isinstance(v, (int, float))}
        metrics.update(epoch=r.epoch, iteration=r.state.iteration)
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            meta = {"epoch": r.epoch, "iteration": r.state.iteration, "metrics": metrics}
            extra = train_state_dict(optimizer, r.state, generator)
            path = save_checkpoint(Path(tmp) / "checkpoint", model, cfg, meta=meta,
                                   train_state=extra)  # fmt: skip
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(path)))

    log = print if rank == 0 else None
    fit(
        wrapped, optimizer, cfg, epoch_batches=epoch_batches, evaluate=evaluate, report=report,
        state=state, device=device, generator=generator,
        gather=gather_encoded if workers > 1 else None, log=log,
    )  # fmt: skip


class RunExistsError(FileExistsError):
    """Ray silently resumes a run whose name and storage path are reused."""


def run_dir(options: RayRunOptions) -> str:
    return os.path.join(options.storage_path, options.name)


def check_run_dir(options: RayRunOptions) -> None:
    """Refuse to reuse a run folder without ``--resume`` (Ray would resume it silently)."""
    path = run_dir(options)
    is_local = "://" not in options.storage_path
    if is_local and not options.resume and os.path.isdir(path) and os.listdir(path):
        raise RunExistsError(f"{path} already holds a run: pass --resume or use a new --name")


def prepare_run(cfg: HREMConfig, num_workers: int, *, check_finite: bool = True) -> PrecompSplit:
    """Check the data and the batch split on the driver, before any worker starts, and make
    local paths absolute (workers and trials run in other folders). Returns the train split."""
    if not cfg.model.bert_path:
        cfg.model.bert_path = default_bert_path()
    cfg.model.bert_path = os.path.abspath(cfg.model.bert_path)
    cfg.data.data_path = os.path.abspath(cfg.data.data_path)
    if cfg.train.batch_size % num_workers:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} must be divisible by "
            f"--num-workers={num_workers} (it is the global batch)"
        )
    data = cfg.data
    progress = print if check_finite else None
    train = open_split(data.data_path, data.dataset, data.train_split,
                       check_finite=check_finite, progress=progress)  # fmt: skip
    open_split(data.data_path, data.dataset, data.val_split, check_finite=check_finite)
    if train.n_captions < cfg.train.batch_size:
        raise ValueError(
            f"{train.caps_path}: {train.n_captions} captions, fewer than one batch of "
            f"{cfg.train.batch_size}"
        )
    return train


def build_trainer(
    cfg: HREMConfig,
    options: RayRunOptions,
    *,
    callbacks: list | None = None,
    check_finite: bool = True,
) -> TorchTrainer:
    train = prepare_run(cfg, options.num_workers, check_finite=check_finite)
    data = cfg.data
    storage = options.storage_path
    if "://" not in storage:
        storage = os.path.abspath(storage)
    return TorchTrainer(
        train_worker,
        train_loop_config={"hrem": cfg.to_dict()},
        scaling_config=ScalingConfig(
            num_workers=options.num_workers,
            use_gpu=options.use_gpu,
            resources_per_worker={"CPU": options.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=options.name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=options.keep_checkpoints,
                checkpoint_score_attribute=METRIC,
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=options.max_failures),
            callbacks=callbacks,
        ),
        datasets={"train": pairs_dataset(train, cfg.model.bert_path, data.max_tokens)},
    )


def train_ray(
    cfg: HREMConfig, options: RayRunOptions, *, log: Callable[[str], None] = print
) -> str:
    """Fit on Ray Train; returns the path of the best checkpoint (by dev rsum), copied to
    ``<run>/best`` when the run is on a local or mounted file system."""
    check_run_dir(options)
    result = build_trainer(cfg, options).fit()
    if result.error is not None:
        raise result.error
    best, metrics = max(result.best_checkpoints or [], key=lambda cm: cm[1].get(METRIC, -1e9),
                        default=(None, None))  # fmt: skip
    if best is None:
        raise RuntimeError(f"run {run_dir(options)} finished without a checkpoint")
    log(f"best dev {METRIC} {metrics[METRIC]:.2f} at epoch {int(metrics['epoch']) + 1}")
    _write_history(result.checkpoint.path, run_dir(options))
    if "://" in options.storage_path:
        return best.path
    # a stable name next to Ray's timestamped folders, as train_local and sweeps have
    return str(copy_checkpoint(best.path, os.path.join(run_dir(options), "best")))


def _write_history(checkpoint_path: str, path: str) -> None:
    """The run's metrics files, from the history saved with its latest checkpoint (so a
    resumed or restarted run never lists an epoch twice)."""
    if "://" not in path:
        write_history(load_train_state(checkpoint_path)["state"]["history"], path)
