"""Single-process training (``hrem-ray train --local``): the loop without Ray, for debugging
and as the baseline the Ray runs are measured against: it trains on the same batches as a
1-worker Ray run with the same seed, from any kind of split (``data/source.py``)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from hrem_ray import storage
from hrem_ray.config import HREMConfig
from hrem_ray.data.source import encoded
from hrem_ray.tracking import data_identity
from hrem_ray.train.history import LiveMetrics, write_history
from hrem_ray.train.loop import EpochReport, fit
from hrem_ray.train.setup import (
    build_trainee,
    check_data,
    check_new_run,
    dev_evaluator,
    resolve_config,
    save_epoch,
)


def train_local(
    cfg: HREMConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    device: str = "cpu",
    tracking_uri: str | None = None,
    log: Callable[[str], None] = print,
) -> str:
    """Train on ``cfg.data``'s train split, select on its dev split; returns the best checkpoint.

    Writes ``run_dir/last`` (with optimizer state, every epoch), ``run_dir/best``,
    ``metrics.jsonl`` and the metrics files of ``train/history.py``. A URI ``run_dir`` gets
    the same files, each published there as soon as it is written locally. Live metrics go
    to ``run_dir/tensorboard/`` and, with a ``tracking_uri``, to an MLflow run.
    """
    run_dir = storage.absolute(run_dir)
    check_new_run(run_dir, resume)
    cfg = resolve_config(cfg)
    train = check_data(cfg)
    data = cfg.data
    last = storage.join(run_dir, "last")
    with tempfile.TemporaryDirectory(prefix="hrem-run-") as tmp:
        work = Path(tmp) if storage.is_remote(run_dir) else Path(run_dir)
        resume_from = (
            storage.fetch_dir(last, "checkpoint") if resume and storage.exists(last) else None
        )
        if resume_from is None:  # shards download while the model is built
            train.prefetch(seed=cfg.train.seed, epoch=0)
        trainee = build_trainee(cfg, device, resume_from)
        if trainee.state is not None:
            log(f"resumed from {last} at epoch {trainee.state.epoch + 1}")
        log(f"training on {train.describe()}")
        log(f"{cfg.train.epochs} epochs of {train.steps_per_epoch(cfg.train.batch_size)} "
            f"steps of batch {cfg.train.batch_size}")  # fmt: skip
        tokens = encoded(train.captions, trainee.tokenizer)
        steps = train.steps_per_epoch(cfg.train.batch_size)
        live = LiveMetrics.open(
            run_dir, cfg, {"local": True, "device": device, "resume": resume}, uri=tracking_uri,
            data_id=data_identity(train.blocks, train.caps_path), workers=1, devices=device,
            resume=resume, run_name=Path(run_dir).name,
        )  # fmt: skip

        def epoch_batches(epoch: int):
            return train.batches(
                tokens, trainee.tokenizer, cfg.train.batch_size, seed=cfg.train.seed,
                epoch=epoch, region_keep=data.region_keep, word_aug=data.word_aug,
            )  # fmt: skip

        def publish(name: str) -> None:
            if storage.is_remote(run_dir):
                storage.copy_dir(work / name, storage.join(run_dir, name))

        def report(r: EpochReport) -> None:
            save_epoch(work / "last", trainee, r)
            publish("last")
            if r.is_best:
                save_epoch(work / "best", trainee, r, with_train_state=False)
                publish("best")
            # Rewritten from the checkpointed history, so it always agrees with `last`.
            lines = "".join(json.dumps(h) + "\n" for h in r.state.history)
            storage.write_text(storage.join(run_dir, "metrics.jsonl"), lines)

        try:
            state = fit(
                trainee.model, trainee.optimizer, cfg, epoch_batches=epoch_batches,
                evaluate=dev_evaluator(trainee, device), report=report, state=trainee.state,
                device=device, generator=trainee.generator, log=log, track=live.point,
                steps_per_epoch=steps,
            )  # fmt: skip
        except BaseException:
            live.finish(None, [], "FAILED")
            raise
    files = write_history(state.history, run_dir)
    live.finish(storage.join(run_dir, "best"), files)
    log(f"best dev rsum {state.best_rsum:.2f} at epoch {state.best_epoch + 1}")
    return storage.join(run_dir, "best")
