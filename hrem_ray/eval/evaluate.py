"""Evaluate a model on a precomp split: encode every image and caption once, then score."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hrem_ray.data.batches import caption_batches, image_batches
from hrem_ray.data.precomp import PrecompSplit
from hrem_ray.data.tokenize import CaptionTokenizer
from hrem_ray.eval.encode import check_batch_size, encode, similarity
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
    """Spec section 8 metrics; with ``fold5`` also the COCO 5-fold 1K average."""
    check_batch_size(batch_size)
    dim = split.features.shape[-1]
    if dim != model.cfg.img_dim:
        raise ValueError(
            f"{split.ims_path}: features have dimension {dim} but the model expects "
            f"img_dim={model.cfg.img_dim}"
        )
    if fold5 and split.n_images % N_FOLDS:
        raise ValueError(
            f"fold5 needs an image count divisible by {N_FOLDS}; "
            f"{split.caps_path} has {split.n_images} images"
        )
    was_training = model.training
    model.eval()
    try:
        imgs = encode(
            model.embed_images, image_batches(split, batch_size), split.n_images,
            device=device, progress=progress, desc="encode images",
        )  # fmt: skip
        caps = encode(
            model.embed_texts, caption_batches(split, tokenizer, batch_size), split.n_captions,
            device=device, progress=progress, desc="encode captions",
        )  # fmt: skip
    finally:
        model.train(was_training)
    sims = similarity(imgs, caps)
    result = evaluate_sims(sims)
    if fold5:
        result["fold5"] = evaluate_fold5(sims)
    return result


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """{"rsum", "i2t_r1", ..., "t2i_meanr"}: the shape Ray and CSV logs want."""
    out = {"rsum": float(result["rsum"])}
    for direction in ("i2t", "t2i"):
        out.update({f"{direction}_{k}": float(v) for k, v in result[direction].items()})
    return out
