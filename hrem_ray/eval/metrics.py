"""Image-text retrieval metrics (docs/method.md §7), vectorised and memory-bounded.

A rank is the number of candidates scoring strictly higher than the ground truth. Both
directions are counted in one pass over cache-sized row chunks: no per-query loop or sort, and
temporaries of about ``CHUNK_ELEMENTS`` bytes whatever the matrix size. With distinct scores
this equals the usual "0-based position in the descending argsort". Ties with the ground truth
are resolved in its favour (optimistic); with float scores they are measure-zero.
"""

from __future__ import annotations

import numpy as np

from hrem_ray.data.precomp import CAPTIONS_PER_IMAGE

RECALL_KS = (1, 5, 10)
N_FOLDS = 5
# Cells per row chunk: small enough that a chunk is still in cache for its second comparison.
CHUNK_ELEMENTS = 1 << 18


def similarity(img_embs: np.ndarray, cap_embs: np.ndarray) -> np.ndarray:
    """Image-caption scores ``[n_images, n_captions]``: dot products of normalised embeddings."""
    img = np.asarray(img_embs, dtype=np.float32)
    cap = np.asarray(cap_embs, dtype=np.float32)
    if img.ndim != 2 or cap.ndim != 2 or img.shape[1] != cap.shape[1]:
        raise ValueError(f"embedding shapes {img.shape} and {cap.shape} are incompatible")
    return img @ cap.T


def _check_sims(sims: np.ndarray) -> np.ndarray:
    """Validate a real ``[n, 5n]`` matrix (finiteness is checked chunk by chunk in ``_ranks``)."""
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
    if not np.issubdtype(sims.dtype, np.number) or np.issubdtype(sims.dtype, np.complexfloating):
        raise ValueError(f"sims must be real-valued, got dtype {sims.dtype}")
    return sims


def i2t_ranks(sims: np.ndarray) -> np.ndarray:
    """Rank of each image query: captions scoring strictly above its best own caption.

    The best-placed of an image's 5 captions is its highest-scoring one, so the minimum position
    over the 5 equals the count of captions beating their maximum.
    """
    return _ranks(_check_sims(sims))[0]


def t2i_ranks(sims: np.ndarray) -> np.ndarray:
    """Rank of each caption query: images scoring strictly above the caption's own image."""
    return _ranks(_check_sims(sims))[1]


def _ranks(sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(i2t, t2i)`` ranks from one read of the matrix, each chunk reused while cache-hot."""
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


def evaluate_sims(sims: np.ndarray) -> dict:
    """Both directions' metrics and rsum (the six recalls summed) for one ``[n, 5n]`` matrix."""
    return _evaluate(_check_sims(sims))


def _evaluate(sims: np.ndarray) -> dict:
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


def evaluate_fold5(sims: np.ndarray) -> dict:
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
