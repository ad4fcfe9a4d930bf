"""Encode a whole split into an id-ordered embedding matrix, and score it (docs/method.md §7)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from hrem_ray.progress import Progress


def check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")


def encode(
    embed_fn: Callable[[Tensor, Tensor], Tensor],
    batches: Iterable[tuple[np.ndarray, Tensor, Tensor]],
    n: int,
    *,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
    desc: str = "encode",
) -> np.ndarray:
    """Embed every ``(ids, x, lengths)`` batch into row ``ids`` of a float32 ``[n, D]`` array.

    Rows are placed by id, so the result is in id order whatever order (or sharding) the
    batches came in; every id in ``[0, n)`` must be seen exactly once, since a gap or duplicate
    would silently shift the ground truth the metrics rely on.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    out: np.ndarray | None = None
    seen = np.zeros(n, dtype=np.int64)
    bar = Progress(desc, n, progress)
    with torch.inference_mode():
        for ids, x, lengths in batches:
            ids = np.asarray(ids, dtype=np.int64).reshape(-1)
            emb = embed_fn(x.to(device), lengths.to(device)).float().cpu().numpy()
            if emb.ndim != 2 or emb.shape[0] != ids.size:
                raise ValueError(f"{desc}: {ids.size} ids but embeddings of shape {emb.shape}")
            if ids.size and (ids.min() < 0 or ids.max() >= n):
                raise ValueError(f"{desc}: ids must lie in [0, {n}), got {ids.min()}..{ids.max()}")
            if out is None:
                out = np.empty((n, emb.shape[1]), dtype=np.float32)
            out[ids] = emb
            np.add.at(seen, ids, 1)
            bar.update(ids.size)
    _check_coverage(seen, desc)
    return out


def _check_coverage(seen: np.ndarray, desc: str) -> None:
    """Fail loudly unless every id was written exactly once."""
    missing, duplicated = np.flatnonzero(seen == 0), np.flatnonzero(seen > 1)
    if missing.size or duplicated.size:
        raise ValueError(
            f"{desc}: {missing.size} ids never encoded (first: {missing[:5].tolist()}), "
            f"{duplicated.size} encoded more than once (first: {duplicated[:5].tolist()})"
        )


def similarity(img_embs: np.ndarray, cap_embs: np.ndarray) -> np.ndarray:
    """Image-caption scores ``[n_images, n_captions]``: dot products of normalised embeddings."""
    img = np.asarray(img_embs, dtype=np.float32)
    cap = np.asarray(cap_embs, dtype=np.float32)
    if img.ndim != 2 or cap.ndim != 2 or img.shape[1] != cap.shape[1]:
        raise ValueError(f"embedding shapes {img.shape} and {cap.shape} are incompatible")
    return img @ cap.T
