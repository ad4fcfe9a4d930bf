"""HREM on Ray Train (V2 API): the plain training loop of ``train/loop.py`` on every worker.

Per worker: the towers are wrapped in DDP (``wrap_ddp``), each step all-gathers the
encodings so the relation module and the loss see the global batch (``gather_encoded``),
rank 0 evaluates on dev and reports a checkpoint in the project's format every epoch, and a
restarted worker group resumes from the latest one (weights, optimizer, RNG, epoch,
iteration).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer

from hrem_ray import storage
from hrem_ray.checkpoint import copy_checkpoint, load_train_state
from hrem_ray.config import HREMConfig
from hrem_ray.data.ray_data import data_error, pairs_dataset
from hrem_ray.data.source import open_source, token_lookup
from hrem_ray.options import RayRunOptions
from hrem_ray.ray_runtime import LineRelay
from hrem_ray.tracking import data_identity, run_uri
from hrem_ray.train.distributed import gather_encoded, world_size, wrap_ddp
from hrem_ray.train.history import LiveMetrics, write_history
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


def _broadcast(obj: Any) -> Any:
    """rank 0's ``obj`` on every rank (identical best-epoch bookkeeping everywhere)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def fetched(run: str, checkpoint: Checkpoint) -> Path:
    """A local folder with ``checkpoint``, one Ray persisted under the run ``run``, fetched
    through ``storage``'s retries: Ray's own ``as_directory()`` does not retry a transient
    fault, so one reset connection while a restarted worker group restores would end the run
    (docs/cluster.md, "Reliability")."""
    return storage.fetch_dir(storage.join(run, os.path.basename(checkpoint.path)), "checkpoint")


def train_worker(config: dict[str, Any]) -> None:
    """The per-worker function given to ``TorchTrainer``."""
    cfg = HREMConfig.from_dict(config["hrem"])
    torch.set_num_threads(int(config.get("torch_threads", 1)))
    ctx = ray.train.get_context()
    rank, workers = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    checkpoint = ray.train.get_checkpoint()
    data = cfg.data
    train = open_source(data.data_path, data.dataset, data.train_split, data.cache_limit)
    if checkpoint is None:  # shards download while the model is built (a resumed run: later)
        train.prefetch(seed=cfg.train.seed, epoch=0)
    resume_from = fetched(config["run"], checkpoint) if checkpoint else None
    trainee = build_trainee(cfg, device, resume_from)
    wrapped = trainee.model
    if workers > 1:
        ids = [device.index] if device.type == "cuda" else None
        wrapped = wrap_ddp(trainee.model, device_ids=ids)

    rows = ray.train.get_dataset_shard("train").iter_batches(batch_format="numpy")
    tokens = token_lookup(rows, train.n_captions)  # every caption's, once per run

    def epoch_batches(epoch: int):
        return train.batches(
            tokens, trainee.tokenizer, cfg.train.batch_size // workers, seed=cfg.train.seed,
            epoch=epoch, rank=rank, workers=workers, region_keep=data.region_keep,
            word_aug=data.word_aug,
        )  # fmt: skip

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

    send = config.get("log") if rank == 0 else None
    live = config.get("live") and send  # rank 0's points travel to the driver with its lines

    fit(
        wrapped, trainee.optimizer, cfg, epoch_batches=epoch_batches, evaluate=evaluate,
        report=report, state=trainee.state, device=device, generator=trainee.generator,
        gather=gather_encoded if workers > 1 else None, log=send,
        track=(lambda step, point: send((step, point))) if live else None,
        steps_per_epoch=train.steps_per_epoch(cfg.train.batch_size),
    )  # fmt: skip


def build_trainer(
    cfg: HREMConfig,
    options: RayRunOptions,
    *,
    callbacks: list | None = None,
    log: Callable[[Any], None] | None = None,
    live: bool = False,
) -> TorchTrainer:
    """A TorchTrainer for ``cfg`` (on a resolved copy): the data is checked first, from
    headers and captions only, so a bad path fails here rather than on a worker. Rank 0's
    progress lines go to ``log`` (e.g. a ``LineRelay``'s ``send``), and with ``live`` its
    live metric points too, as ``(step, metrics)`` tuples."""
    cfg = resolve_config(cfg)
    train = check_data(cfg, options.num_workers)
    if log:
        log(f"training on {train.describe()}")
    storage_path, storage_filesystem = storage.ray_storage(options.storage_path)
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "hrem": cfg.to_dict(),
            "log": log,
            "live": live,
            "run": run_path(options.storage_path, options.name),
        },  # fmt: skip
        scaling_config=ScalingConfig(
            num_workers=options.num_workers,
            use_gpu=options.use_gpu,
            resources_per_worker={"CPU": options.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=options.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(
                num_to_keep=options.keep_checkpoints,
                checkpoint_score_attribute=METRIC,
                checkpoint_score_order="max",
            ),
            failure_config=FailureConfig(max_failures=options.max_failures),
            callbacks=callbacks,
        ),
        # Every worker reads all the captions' token rows (a few MB): the epoch plan, not
        # Ray Data's split, decides which pairs a rank trains on (data/plan.py).
        datasets={
            "train": pairs_dataset(
                train.caps_path, train.n_captions, cfg.model.bert_path, cfg.data.max_tokens
            )
        },  # fmt: skip
        dataset_config=DataConfig(datasets_to_split=[]),
    )


def train_ray(
    cfg: HREMConfig, options: RayRunOptions, *, log: Callable[[str], None] = print
) -> str:
    """Fit on Ray Train; returns ``<run>/best``, a copy of the best checkpoint (by dev rsum)
    inside the run's storage, local or a URI, next to the run's metrics files. The driver
    writes rank 0's live metrics (``LiveMetrics``): the tracking store need only be
    reachable from here."""
    path = run_path(options.storage_path, options.name)
    check_new_run(path, options.resume)
    resolved = resolve_config(cfg)
    train = check_data(resolved, options.num_workers)
    live = LiveMetrics.open(
        path, resolved, dataclasses.asdict(options), uri=run_uri(options),
        data_id=data_identity(train.blocks, train.caps_path), workers=options.num_workers,
        devices="gpu" if options.use_gpu else "cpu", resume=options.resume, run_name=options.name,
    )  # fmt: skip

    def relayed(item: str | tuple[int, dict[str, float]]) -> None:
        if isinstance(item, tuple):
            live.point(*item)
        else:
            log(item)

    try:
        with LineRelay(relayed) as relay:
            try:
                result = build_trainer(cfg, options, log=relay.send, live=True).fit()
            except Exception as e:  # fit() raises a worker's error wrapped in Ray Train's
                cause = data_error(e)
                if cause is None:
                    raise
                raise cause from None
        if result.error is not None:
            raise data_error(result.error) or result.error
        best, metrics = max(result.best_checkpoints or [],
                            key=lambda cm: cm[1].get(METRIC, -1e9),
                            default=(None, None))  # fmt: skip
        if best is None:
            raise RuntimeError(f"run {path} finished without a checkpoint")
    except BaseException:
        live.finish(None, [], "FAILED")
        raise
    log(f"best dev {METRIC} {metrics[METRIC]:.2f} at epoch {int(metrics['epoch']) + 1}")
    latest = fetched(path, result.checkpoint)
    files = write_history(load_train_state(latest)["state"]["history"], path)
    best_copy = copy_checkpoint(storage.join(path, os.path.basename(best.path)),
                                storage.join(path, "best"))  # fmt: skip
    live.finish(str(best_copy), files)
    return str(best_copy)
