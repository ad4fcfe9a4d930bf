"""Evaluate a model on a precomp split: encode every image and caption once, then score."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hrem_ray.data.precomp import PrecompSplit, open_split
from hrem_ray.data.tokenize import CaptionTokenizer
from hrem_ray.embed import embed_split
from hrem_ray.eval.encode import similarity
from hrem_ray.eval.metrics import N_FOLDS, evaluate_fold5, evaluate_sims
from hrem_ray.model import HREM


def evaluate_split(
    model: HREM,
    split: PrecompSplit,
    tokenizer: CaptionTokenizer,
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    fold5: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The protocol of docs/evaluation.md; with ``fold5`` also the COCO 5-fold 1K average."""
    if fold5 and split.n_images % N_FOLDS:
        raise ValueError(
            f"fold5 needs an image count divisible by {N_FOLDS}; "
            f"{split.caps_path} has {split.n_images} images"
        )
    imgs, caps = embed_split(
        model, split, tokenizer, batch_size=batch_size, device=device, progress=progress
    )
    sims = similarity(imgs, caps)
    result = evaluate_sims(sims)
    if fold5:
        result["fold5"] = evaluate_fold5(sims)
    return result


def evaluate_checkpoint(
    checkpoint: str | Path,
    data_path: str | Path,
    dataset: str,
    split: str = "test",
    *,
    batch_size: int = 128,
    device: str = "cpu",
    fold5: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``evaluate_split`` of a saved checkpoint (``hrem-ray eval``); the split is checked
    before the model is loaded."""
    from hrem_ray.checkpoint import load_checkpoint

    data = open_split(data_path, dataset, split)
    ck = load_checkpoint(checkpoint, device=device)
    tokenizer = CaptionTokenizer.from_dir(ck.backbone_dir, max_tokens=ck.config.data.max_tokens)
    return evaluate_split(ck.model, data, tokenizer, batch_size=batch_size, device=device,
                          fold5=fold5, progress=progress)  # fmt: skip


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """{"rsum", "i2t_r1", ..., "t2i_meanr"}: the shape Ray and CSV logs want."""
    out = {"rsum": float(result["rsum"])}
    for direction in ("i2t", "t2i"):
        out.update({f"{direction}_{k}": float(v) for k, v in result[direction].items()})
    return out
