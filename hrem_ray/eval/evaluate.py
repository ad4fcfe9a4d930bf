"""Evaluate a model, or an ensemble of models and saved similarity matrices, on a precomp
split: encode every image and caption once, then score. The matrix is made and ranked on the
model's device (``metrics.placed``): on a GPU, COCO's 5K x 25K never waits on the host."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hrem_ray.data.precomp import PrecompSplit
from hrem_ray.data.source import open_precomp
from hrem_ray.data.tokenize import CaptionTokenizer
from hrem_ray.devices import check_device
from hrem_ray.embed import embed_split, embed_split_each
from hrem_ray.eval.metrics import (
    N_FOLDS,
    Sims,
    evaluate_fold5,
    evaluate_sims,
    placed,
    similarity,
)
from hrem_ray.fileio import save_npy_atomic
from hrem_ray.model import HREM


def _check_fold5(split: PrecompSplit) -> None:
    if split.n_images % N_FOLDS:
        raise ValueError(
            f"fold5 needs an image count divisible by {N_FOLDS}; "
            f"{split.caps_path} has {split.n_images} images"
        )


def score(sims: Sims, *, fold5: bool = False) -> dict[str, Any]:
    """The protocol of docs/method.md §7 on one similarity matrix; with ``fold5`` also
    the COCO 5-fold 1K average."""
    result = evaluate_sims(sims)
    if fold5:
        result["fold5"] = evaluate_fold5(sims)
    return result


def evaluate_split(
    model: HREM,
    split: PrecompSplit,
    tokenizer: CaptionTokenizer,
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    fold5: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``score`` of ``model`` on ``split``, ranked on ``device``."""
    if fold5:
        _check_fold5(split)
    imgs, caps = embed_split(model, split, tokenizer, batch_size=batch_size, device=device,
                             bf16=bf16, progress=progress)  # fmt: skip
    return score(similarity(imgs, caps, device), fold5=fold5)


def save_sims(path: str | Path, sims: np.ndarray) -> Path:
    """Write a similarity matrix as .npy, atomically (a reader never sees half a file)."""
    return save_npy_atomic(path, sims)


def load_sims(path: str | Path, split: PrecompSplit) -> np.ndarray:
    """A saved matrix, memory-mapped, checked to be ``split``'s [images, captions]."""
    try:
        sims = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a saved similarity matrix ({e})") from None
    want = (split.n_images, split.n_captions)
    if sims.shape != want:
        raise ValueError(
            f"{path}: shape {sims.shape}, but {split.caps_path} needs {want} (images, captions)"
        )
    return sims


def evaluate_ensemble(
    checkpoints: Sequence[str | Path],
    data_path: str | Path,
    dataset: str,
    split: str = "test",
    *,
    sims_files: Sequence[str | Path] = (),
    save_to: str | Path | None = None,
    batch_size: int = 128,
    device: str = "cpu",
    bf16: bool = False,
    fold5: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``score`` of the mean similarity matrix of the checkpoints and saved matrices
    (``hrem-ray eval``; one of them: that model alone). Averaging the members' scores is
    the ensemble of the VSE literature (e.g. VSE-infinity, Chen et al. CVPR 2021).
    The device, saved matrices and the split are checked before any model is loaded; the
    mean matrix is summed and ranked on ``device``."""
    if not checkpoints and not sims_files:
        raise ValueError("nothing to evaluate: give --checkpoint or --sims")
    device = check_device(device)
    data = open_precomp(data_path, dataset, split)
    if fold5:
        _check_fold5(data)
    saved = [load_sims(f, data) for f in sims_files]
    total = placed(np.zeros((data.n_images, data.n_captions), dtype=np.float32), device)
    for sims in saved:
        total += placed(sims, device)
    for _, imgs, caps in embed_split_each(checkpoints, data, batch_size=batch_size,
                                          device=device, bf16=bf16, progress=progress):  # fmt: skip
        total += similarity(imgs, caps, device)
    total /= len(saved) + len(checkpoints)
    if save_to is not None:
        save_sims(save_to, total.cpu().numpy() if isinstance(total, torch.Tensor) else total)
    return score(total, fold5=fold5)


def evaluate_checkpoint(
    checkpoint: str | Path,
    data_path: str | Path,
    dataset: str,
    split: str = "test",
    **kwargs: Any,
) -> dict[str, Any]:
    """``evaluate_ensemble`` of one saved checkpoint."""
    return evaluate_ensemble([checkpoint], data_path, dataset, split, **kwargs)


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """{"rsum", "i2t_r1", ..., "t2i_meanr"}: the shape Ray and CSV logs want."""
    out = {"rsum": float(result["rsum"])}
    for direction in ("i2t", "t2i"):
        out.update({f"{direction}_{k}": float(v) for k, v in result[direction].items()})
    return out
