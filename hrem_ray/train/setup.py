"""What both training drivers (``train/local.py`` and ``train/ray_train.py``) set up the
same way: the resolved config, the data checks, the model with its optimizer and sampler
state (fresh or resumed), dev evaluation and the per-epoch checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hrem_ray import storage
from hrem_ray.backbone import default_bert_path
from hrem_ray.checkpoint import load_train_state, load_weights, save_checkpoint
from hrem_ray.config import HREMConfig
from hrem_ray.data.source import TrainingSource, open_precomp, open_source
from hrem_ray.data.tokenize import CaptionTokenizer
from hrem_ray.eval.evaluate import evaluate_split, flat_metrics
from hrem_ray.model import HREM, build_model
from hrem_ray.train.loop import EpochReport, TrainState, restore_train_state, seed_everything
from hrem_ray.train.loop import train_state_dict as _train_state_dict
from hrem_ray.train.optim import build_optimizer


class RunExistsError(FileExistsError):
    """A run (or sweep) folder that already holds one, started without --resume: Ray Train
    would silently resume it, and a local run would overwrite it."""


def check_new_run(path: str, resume: bool, what: str = "run") -> None:
    """Refuse to reuse a non-empty run folder (local or in object storage) without resume;
    an unreachable object store or a missing bucket fails here, before any work."""
    storage.check_access(path)
    if not resume and storage.is_dir(path) and storage.list_dir(path):
        raise RunExistsError(f"{path} already holds a {what}: pass --resume or use a new --name")


def resolve_config(cfg: HREMConfig) -> HREMConfig:
    """A copy of ``cfg`` with the defaults filled in once: the offline backbone when none is
    named, and local paths made absolute (workers and trials run in other folders)."""
    cfg = HREMConfig.from_dict(cfg.to_dict())
    cfg.model.bert_path = storage.absolute(cfg.model.bert_path or default_bert_path())
    cfg.data.data_path = storage.absolute(cfg.data.data_path)
    return cfg


def check_data(cfg: HREMConfig, num_workers: int = 1) -> TrainingSource:
    """Check the batch split and the train and dev splits (headers, shard sizes, captions:
    no feature is read) before any worker starts; returns the train split's source."""
    if cfg.train.batch_size % num_workers:
        raise ValueError(
            f"train.batch_size={cfg.train.batch_size} must be divisible by "
            f"--num-workers={num_workers} (it is the global batch)"
        )
    data = cfg.data
    train = open_source(data.data_path, data.dataset, data.train_split, data.cache_limit)
    open_source(data.data_path, data.dataset, data.val_split, data.cache_limit)
    if train.n_captions < cfg.train.batch_size:
        raise ValueError(
            f"{train.caps_path}: {train.n_captions} captions, fewer than one batch of "
            f"{cfg.train.batch_size}"
        )
    return train


@dataclass
class Trainee:
    """A model ready to train: optimizer, the sampler's generator and the progress so far."""

    cfg: HREMConfig
    model: HREM
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    tokenizer: CaptionTokenizer
    state: TrainState | None  # None: a fresh run

    def train_state_dict(self, state: TrainState) -> dict:
        return _train_state_dict(self.optimizer, state, self.generator)


def build_trainee(
    cfg: HREMConfig, device: torch.device | str, resume_from: str | Path | None = None
) -> Trainee:
    """Seed, build the model and optimizer, and restore them from ``resume_from`` (a
    checkpoint folder with its train state) when given. The same on every rank."""
    seed_everything(cfg.train.seed)
    tokenizer = CaptionTokenizer.from_dir(cfg.model.bert_path, max_tokens=cfg.data.max_tokens)
    model = build_model(cfg.model, pretrained=True).to(device)
    optimizer = build_optimizer(model, cfg.train)
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    state = None
    if resume_from is not None:
        load_weights(resume_from, model)
        state = restore_train_state(load_train_state(resume_from), optimizer, generator)
    return Trainee(cfg, model, optimizer, generator, tokenizer, state)


def dev_evaluator(
    trainee: Trainee, device: torch.device | str
) -> Callable[[nn.Module], dict[str, float]]:
    """Dev-split evaluation for model selection (the authors selected on test)."""
    cfg = trainee.cfg
    dev = open_precomp(cfg.data.data_path, cfg.data.dataset, cfg.data.val_split)

    def evaluate(model: nn.Module) -> dict[str, float]:
        result = evaluate_split(model, dev, trainee.tokenizer,
                                batch_size=cfg.train.eval_batch_size, device=device)  # fmt: skip
        return flat_metrics(result)

    return evaluate


def epoch_metrics(r: EpochReport) -> dict[str, float]:
    """The scalar metrics of an epoch, with its epoch and iteration (what Ray reports)."""
    metrics = {k: v for k, v in r.metrics.items() if isinstance(v, (int, float))}
    metrics.update(epoch=r.epoch, iteration=r.state.iteration)
    return metrics


def save_epoch(
    path: str | Path, trainee: Trainee, r: EpochReport, *, with_train_state: bool = True
) -> Path:
    """The epoch's checkpoint; with its train state it is one a run can resume from."""
    meta = {"epoch": r.epoch, "iteration": r.state.iteration, "metrics": epoch_metrics(r)}
    extra = trainee.train_state_dict(r.state) if with_train_state else None
    return save_checkpoint(path, trainee.model, trainee.cfg, meta=meta, train_state=extra)


def init_checkpoint(cfg: HREMConfig, out: str | Path, *, pretrained: bool = True) -> Path:
    """A freshly initialised model (seeded by ``train.seed``) saved as a checkpoint: the
    "no training" baseline, and a quick way to try eval, index and serve."""
    cfg = resolve_config(cfg)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, pretrained=pretrained)
    meta = {"initialised": True, "bert_pretrained": pretrained}
    return save_checkpoint(out, model, cfg, meta=meta)


def run_path(storage_path: str, name: str) -> str:
    """``<storage_path>/<name>``, a local folder (made absolute) or a URI."""
    return storage.join(storage.absolute(storage_path), name)
