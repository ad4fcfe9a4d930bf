"""Single-process training (``hrem-ray train --local``): the loop without Ray, for debugging
and as the baseline the Ray runs are measured against."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from hrem_ray.config import HREMConfig
from hrem_ray.data.batches import train_batches
from hrem_ray.fileio import write_text_atomic
from hrem_ray.train.history import write_history
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
    log: Callable[[str], None] = print,
) -> Path:
    """Train on ``cfg.data``'s train split, select on its dev split; returns the best checkpoint.

    Writes ``run_dir/last`` (with optimizer state, every epoch), ``run_dir/best`` and the
    metrics files of ``train/history.py``.
    """
    run_dir = Path(run_dir)
    last = run_dir / "last"
    check_new_run(str(run_dir), resume)
    cfg = resolve_config(cfg)
    train = check_data(cfg)
    data = cfg.data
    trainee = build_trainee(cfg, device, last if resume and last.exists() else None)
    if trainee.state is not None:
        log(f"resumed from {last} at epoch {trainee.state.epoch + 1}")
    log(
        f"training on {train.n_captions} pairs ({train.n_images} images); "
        f"{cfg.train.epochs} epochs of batch {cfg.train.batch_size}"
    )

    def epoch_batches(epoch: int):
        return train_batches(
            train, trainee.tokenizer, cfg.train.batch_size, seed=cfg.train.seed, epoch=epoch,
            region_keep=data.region_keep, word_aug=data.word_aug,
        )  # fmt: skip

    def report(r: EpochReport) -> None:
        save_epoch(last, trainee, r)
        if r.is_best:
            save_epoch(run_dir / "best", trainee, r, with_train_state=False)
        # Rewritten from the checkpointed history, so it always agrees with `last`.
        lines = "".join(json.dumps(h) + "\n" for h in r.state.history)
        write_text_atomic(run_dir / "metrics.jsonl", lines)

    state = fit(
        trainee.model, trainee.optimizer, cfg, epoch_batches=epoch_batches,
        evaluate=dev_evaluator(trainee, device), report=report, state=trainee.state,
        device=device, generator=trainee.generator, log=log,
    )  # fmt: skip
    write_history(state.history, str(run_dir))
    log(f"best dev rsum {state.best_rsum:.2f} at epoch {state.best_epoch + 1}")
    return run_dir / "best"
