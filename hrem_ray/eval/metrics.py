"""Image-text retrieval metrics (docs/method.md §7), vectorised and memory-bounded.

A rank is the number of candidates scoring strictly higher than the ground truth. Both
directions are counted in one pass over cache-sized row chunks: no per-query loop or sort, and
temporaries of about ``CHUNK_ELEMENTS`` bytes whatever the matrix size. With distinct scores
this equals the usual "0-based position in the descending argsort". Ties with the ground truth
are resolved in its favour (optimistic); with float scores they are measure-zero.

A matrix given as a torch tensor is ranked on the tensor's device with the same counts (a GPU
ranks COCO's 5K x 25K while the model that made it waits there); a numpy one on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch

from hrem_ray.data.precomp import CAPTIONS_PER_IMAGE

RECALL_KS = (1, 5, 10)
N_FOLDS = 5
# Cells per row chunk: small enough that a chunk is still in cache for its second comparison.
CHUNK_ELEMENTS = 1 << 18
# Cells per row chunk of a tensor: its boolean comparisons take 64 MiB of device memory.
DEVICE_CHUNK_ELEMENTS = 1 << 26

Sims = np.ndarray | torch.Tensor


def similarity(
    img_embs: np.ndarray, cap_embs: np.ndarray, device: torch.device | str = "cpu"
) -> Sims:
    """Image-caption scores ``[n_images, n_captions]``: dot products of normalised embeddings,
    made where they are to be ranked (``placed``)."""
    img = np.asarray(img_embs, dtype=np.float32)
    cap = np.asarray(cap_embs, dtype=np.float32)
    if img.ndim != 2 or cap.ndim != 2 or img.shape[1] != cap.shape[1]:
        raise ValueError(f"embedding shapes {img.shape} and {cap.shape} are incompatible")
    if torch.device(device).type == "cpu":
        return img @ cap.T
    return placed(img, device) @ placed(cap, device).T


def placed(sims: np.ndarray, device: torch.device | str) -> Sims:
    """A float32 matrix where it is ranked: numpy for the CPU (the cache-chunked path), a
    tensor on any other device."""
    sims = np.asarray(sims, dtype=np.float32)
    if torch.device(device).type == "cpu":
        return sims
    return torch.from_numpy(np.array(sims)).to(device)  # a copy: a memory map is read-only


def _check_sims(sims: Sims) -> Sims:
    """Validate a real ``[n, 5n]`` matrix (finiteness is checked chunk by chunk in ``_ranks``)."""
    if not isinstance(sims, torch.Tensor):
        sims = np.asarray(sims)
    if sims.ndim != 2:
        raise ValueError(f"sims must be 2-D [n_images, n_captions], got shape {sims.shape}")
    n_images, n_captions = sims.shape
    if n_images == 0:
        raise ValueError("sims has no images")
    if n_captions != CAPTIONS_PER_IMAGE * n_images:
        raise ValueError(
            f"sims has {n_captions} captions for {n_images} images; expected "
            f"{CAPTIONS_PER_IMAGE} * {n_images} = {CAPTIONS_PER_IMAGE * n_images}"
        )
    if not _is_real(sims):
        raise ValueError(f"sims must be real-valued, got dtype {sims.dtype}")
    return sims


def _is_real(sims: Sims) -> bool:
    if isinstance(sims, torch.Tensor):
        return not (sims.dtype == torch.bool or sims.is_complex())
    return np.issubdtype(sims.dtype, np.number) and not np.issubdtype(
        sims.dtype, np.complexfloating
    )


def i2t_ranks(sims: Sims) -> np.ndarray:
    """Rank of each image query: captions scoring strictly above its best own caption.

    The best-placed of an image's 5 captions is its highest-scoring one, so the minimum position
    over the 5 equals the count of captions beating their maximum.
    """
    return _ranks(_check_sims(sims))[0]


def t2i_ranks(sims: Sims) -> np.ndarray:
    """Rank of each caption query: images scoring strictly above the caption's own image."""
    return _ranks(_check_sims(sims))[1]


def _ranks(sims: Sims) -> tuple[np.ndarray, np.ndarray]:
    """``(i2t, t2i)`` ranks from one read of the matrix, each chunk reused while cache-hot."""
    if isinstance(sims, torch.Tensor):
        return _device_ranks(sims)
    n_images, n_captions = sims.shape
    captions = np.arange(n_captions)
    caption_truth = sims[captions // CAPTIONS_PER_IMAGE, captions]
    offsets = np.arange(CAPTIONS_PER_IMAGE)
    rows = max(1, CHUNK_ELEMENTS // n_captions)
    beaten = np.empty((rows, n_captions), dtype=bool)
    i2t = np.empty(n_images, dtype=np.int64)
    t2i = np.zeros(n_captions, dtype=np.int64)
    for start in range(0, n_images, rows):
        chunk = sims[start : start + rows]
        images = np.arange(start, start + len(chunk))
        if not (np.isfinite(chunk.min()) and np.isfinite(chunk.max())):
            raise ValueError("sims contains NaN or infinite values")
        own = chunk[images[:, None] - start, CAPTIONS_PER_IMAGE * images[:, None] + offsets]
        mask = np.greater(chunk, own.max(axis=1)[:, None], out=beaten[: len(chunk)])
        i2t[images] = _count_true(mask, axis=1)
        mask = np.greater(chunk, caption_truth, out=beaten[: len(chunk)])
        t2i += _count_true(mask, axis=0)
    return i2t, t2i


def _device_ranks(sims: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``_ranks`` on the tensor's device: the same strict comparisons, counted in row chunks
    of ``DEVICE_CHUNK_ELEMENTS``; the ranks come back to the host, two syncs in all."""
    n_images, n_captions = sims.shape
    if not bool(torch.isfinite(sims).all()):
        raise ValueError("sims contains NaN or infinite values")
    captions = torch.arange(n_captions, device=sims.device)
    caption_truth = sims[captions // CAPTIONS_PER_IMAGE, captions]
    # [image, image, 5]: the diagonal holds each image's own captions
    own_best = sims.reshape(n_images, n_images, CAPTIONS_PER_IMAGE).diagonal().amax(dim=0)
    i2t = torch.empty(n_images, dtype=torch.int64, device=sims.device)
    t2i = torch.zeros(n_captions, dtype=torch.int64, device=sims.device)
    rows = max(1, DEVICE_CHUNK_ELEMENTS // n_captions)
    for start in range(0, n_images, rows):
        chunk, images = sims[start : start + rows], slice(start, start + rows)
        i2t[images] = (chunk > own_best[images, None]).sum(1)
        t2i += (chunk > caption_truth).sum(0)
    return i2t.cpu().numpy(), t2i.cpu().numpy()


def _count_true(mask: np.ndarray, axis: int) -> np.ndarray:
    """Count ``True`` along ``axis``, summing in the narrowest type that cannot overflow (fast)."""
    counter = np.min_scalar_type(mask.shape[axis])
    return np.add.reduce(mask.view(np.uint8), axis=axis, dtype=counter)


def recall_summary(ranks: np.ndarray) -> dict[str, float]:
    """R@1/5/10 (percent), medr = floor(median) + 1 and meanr = mean + 1, from 0-based ranks."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-D array, got shape {ranks.shape}")
    summary = {f"r{k}": float(100.0 * np.mean(ranks < k)) for k in RECALL_KS}
    summary["medr"] = float(np.floor(np.median(ranks)) + 1)
    summary["meanr"] = float(np.mean(ranks) + 1)
    return summary


def evaluate_sims(sims: Sims) -> dict:
    """Both directions' metrics and rsum (the six recalls summed) for one ``[n, 5n]`` matrix."""
    return _evaluate(_check_sims(sims))


def _evaluate(sims: Sims) -> dict:
    i2t, t2i = (recall_summary(ranks) for ranks in _ranks(sims))
    return {
        "i2t": i2t,
        "t2i": t2i,
        "rsum": _rsum(i2t, t2i),
        "n_images": int(sims.shape[0]),
        "n_captions": int(sims.shape[1]),
    }


def _rsum(i2t: dict[str, float], t2i: dict[str, float]) -> float:
    return float(sum(d[f"r{k}"] for d in (i2t, t2i) for k in RECALL_KS))


def evaluate_fold5(sims: Sims) -> dict:
    """COCO 1K protocol: every metric (rsum too) averaged over 5 consecutive image folds.

    Fold k holds images ``[k*f, (k+1)*f)`` and only their own ``5*f`` captions; scores outside
    the folds play no part (and are not checked).
    """
    sims = _check_sims(sims)
    n_images = sims.shape[0]
    if n_images % N_FOLDS:
        raise ValueError(
            f"fold5 needs an image count divisible by {N_FOLDS}, got {n_images} images"
        )
    size = n_images // N_FOLDS
    cap = CAPTIONS_PER_IMAGE * size
    folds = [
        _evaluate(sims[k * size : (k + 1) * size, k * cap : (k + 1) * cap]) for k in range(N_FOLDS)
    ]
    return {
        "i2t": _mean_metrics([f["i2t"] for f in folds]),
        "t2i": _mean_metrics([f["t2i"] for f in folds]),
        "rsum": float(np.mean([f["rsum"] for f in folds])),
        "n_images": size,
        "n_captions": cap,
    }


def _mean_metrics(summaries: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([s[key] for s in summaries])) for key in summaries[0]}


def format_table(result: dict) -> str:
    """Render an ``evaluate_sims``/``evaluate_fold5`` result as a fixed-width text table."""
    header = f"{'':<5} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'medr':>7} {'meanr':>8}"
    lines = [f"{result['n_images']} images, {result['n_captions']} captions", header]
    for direction in ("i2t", "t2i"):
        m = result[direction]
        lines.append(
            f"{direction:<5} {m['r1']:6.1f} {m['r5']:6.1f} {m['r10']:6.1f} "
            f"{m['medr']:7.1f} {m['meanr']:8.1f}"
        )
    lines.append(f"rsum  {result['rsum']:.1f}")
    return "\n".join(lines)
