"""Single-process training (``hrem-ray train --local``): the loop without Ray, for debugging
and as the baseline the Ray runs are measured against."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from hrem_ray.backbone import default_bert_path
from hrem_ray.checkpoint import load_train_state, load_weights, save_checkpoint
from hrem_ray.config import HREMConfig
from hrem_ray.data.batches import train_batches
from hrem_ray.data.precomp import open_split
from hrem_ray.data.tokenize import CaptionTokenizer
from hrem_ray.eval.evaluate import evaluate_split, flat_metrics
from hrem_ray.fileio import write_text_atomic
from hrem_ray.model import build_model
from hrem_ray.train.history import write_history
from hrem_ray.train.loop import (
    EpochReport,
    fit,
    restore_train_state,
    seed_everything,
    train_state_dict,
)
from hrem_ray.train.optim import build_optimizer


class RunExistsError(FileExistsError):
    """A run folder that already holds checkpoints, started without --resume."""


def train_local(
    cfg: HREMConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> Path:
    """Train on ``cfg.data``'s train split, select on its dev split; returns the best checkpoint.

    Writes ``run_dir/last`` (with optimizer state, every epoch), ``run_dir/best`` and
    ``run_dir/metrics.jsonl``.
    """
    run_dir = Path(run_dir)
    last = run_dir / "last"
    if last.exists() and not resume:
        raise RunExistsError(f"{run_dir} already holds a run: pass --resume or use a new name")
    if not cfg.model.bert_path:
        cfg.model.bert_path = default_bert_path()
    seed_everything(cfg.train.seed)
    data = cfg.data
    train = open_split(data.data_path, data.dataset, data.train_split, progress=log)
    dev = open_split(data.data_path, data.dataset, data.val_split, progress=log)
    tokenizer = CaptionTokenizer.from_dir(cfg.model.bert_path, max_tokens=data.max_tokens)
    model = build_model(cfg.model, pretrained=True).to(device)
    optimizer = build_optimizer(model, cfg.train)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    state = None
    if resume and last.exists():
        load_weights(last, model)
        state = restore_train_state(load_train_state(last), optimizer, generator)
        log(f"resumed from {last} at epoch {state.epoch + 1}, iteration {state.iteration}")
    log(
        f"training on {train.n_captions} pairs ({train.n_images} images), "
        f"dev {dev.n_images} images; {cfg.train.epochs} epochs of batch {cfg.train.batch_size}"
    )

    def epoch_batches(epoch: int):
        return train_batches(
            train, tokenizer, cfg.train.batch_size, seed=cfg.train.seed, epoch=epoch,
            region_keep=data.region_keep, word_aug=data.word_aug,
        )  # fmt: skip

    def evaluate(m) -> dict[str, float]:
        return flat_metrics(
            evaluate_split(m, dev, tokenizer, batch_size=cfg.train.eval_batch_size, device=device)
        )

    def report(r: EpochReport) -> None:
        meta = {"epoch": r.epoch, "iteration": r.state.iteration, "metrics": r.metrics}
        extra = train_state_dict(optimizer, r.state, generator)
        save_checkpoint(last, model, cfg, meta=meta, train_state=extra)
        if r.is_best:
            save_checkpoint(run_dir / "best", model, cfg, meta=meta)
        # Rewritten from the checkpointed history, so it always agrees with `last`.
        lines = "".join(json.dumps(h) + "\n" for h in r.state.history)
        write_text_atomic(run_dir / "metrics.jsonl", lines)

    state = fit(
        model, optimizer, cfg, epoch_batches=epoch_batches, evaluate=evaluate, report=report,
        state=state, device=device, generator=generator, log=log,
    )  # fmt: skip
    write_history(state.history, run_dir)
    best = run_dir / "best"
    log(f"best dev rsum {state.best_rsum:.2f} at epoch {state.best_epoch + 1}")
    return best
