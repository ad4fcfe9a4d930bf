"""Optimiser and learning-rate schedule of the HREM recipe (docs/method.md §6)."""

from __future__ import annotations

import torch
from torch import nn

from hrem_ray.config import TrainConfig


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Three groups: BERT at lr x bert_lr_factor, the relation module at lr x
    relation_lr_factor, everything else at lr; weight decay on all of them.

    Each group keeps its ``base_lr`` so the step schedule can be re-applied on resume.
    """
    groups: dict[str, list[nn.Parameter]] = {"bert": [], "relation": [], "towers": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = name.removeprefix("module.")
        if name.startswith("txt_enc.bert."):
            groups["bert"].append(p)
        elif name.startswith("relation."):
            groups["relation"].append(p)
        else:
            groups["towers"].append(p)
    factors = {"bert": cfg.bert_lr_factor, "relation": cfg.relation_lr_factor, "towers": 1.0}
    return [
        {"name": k, "params": ps, "lr": cfg.lr * factors[k], "base_lr": cfg.lr * factors[k]}
        for k, ps in groups.items()
        if ps
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``param_groups``. ``bert_lr_factor=0`` freezes the backbone (the
    frozen-backbone baseline): its parameters stop requiring gradients, so backward skips
    BERT instead of computing gradients nothing uses. Call it before wrapping in DDP.

    ``fused_adamw`` takes torch's fused kernel (one launch for all parameters instead of a
    few per tensor on CUDA; CPU has one too): the same update up to float rounding."""
    if cfg.bert_lr_factor == 0:
        for name, p in model.named_parameters():
            if name.removeprefix("module.").startswith("txt_enc.bert."):
                p.requires_grad_(False)
    return torch.optim.AdamW(
        param_groups(model, cfg),
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        fused=cfg.fused_adamw or None,
    )


def lr_factor(epoch: int, cfg: TrainConfig) -> float:
    """lr_decay applied once per milestone reached; ``epoch`` is 0-based."""
    return cfg.lr_decay ** sum(epoch >= m for m in cfg.lr_decay_epochs)


def set_epoch_lr(optimizer: torch.optim.Optimizer, epoch: int, cfg: TrainConfig) -> float:
    """Set every group's lr for ``epoch``; returns the factor applied."""
    factor = lr_factor(epoch, cfg)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return factor
