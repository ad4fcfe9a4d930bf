"""The epoch plan: which captions form each global batch, for every kind of split (docs/data.md).

Pure numpy and seeded by ``(seed, epoch)`` alone, so every rank computes the same plan and
takes its own slice of each global batch: every caption at most once an epoch (all but the
``n_captions % batch_size`` remainder exactly once), the same step count on every rank, disjoint
ranks, and the same global batches whatever the number of workers.

A split is a list of blocks of consecutive images (the precomp ``.npy`` is one block, a sharded
split one block per shard). When every block can be read at once, the plan is one permutation
of all captions, the memory map's shuffle. When a node's cache holds only part of the split
(``data.cache_limit``), the blocks are visited in a seeded order, ``window`` blocks at a time,
and the captions of each window are permuted together (the block shuffle of
mosaicml/streaming): the cache then needs two windows, the one being read and the next.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hrem_ray.data.precomp import CAPTIONS_PER_IMAGE


def steps_per_epoch(n_captions: int, batch_size: int) -> int:
    """Global batches an epoch: the remainder is dropped, so every rank steps alike."""
    return n_captions // batch_size


def windows(block_rows: Sequence[int], window: int, *, seed: int, epoch: int) -> list[np.ndarray]:
    """The epoch's windows: arrays of block indices, ``window`` blocks each (one window, in
    block order, when it covers the split)."""
    n = len(block_rows)
    if window >= n:
        return [np.arange(n)]
    order = np.random.default_rng([seed, epoch, 1]).permutation(n)
    return [order[i : i + window] for i in range(0, n, window)]


def epoch_plan(
    block_rows: Sequence[int], window: int, batch_size: int, *, seed: int, epoch: int
) -> np.ndarray:
    """``[steps, batch_size]`` caption ids: row ``s`` is global batch ``s``.

    With one window this is ``default_rng([seed, epoch]).permutation(n_captions)``, whichever
    kind the split is, so a precomp folder and its shards train on the same batches.
    """
    rng = np.random.default_rng([seed, epoch])
    starts = np.cumsum([0, *block_rows])
    n_captions = int(starts[-1]) * CAPTIONS_PER_IMAGE
    parts = []
    for blocks in windows(block_rows, window, seed=seed, epoch=epoch):
        if len(blocks) == len(block_rows):
            parts.append(rng.permutation(n_captions))
            break
        images = np.concatenate([np.arange(starts[b], starts[b + 1]) for b in blocks])
        captions = (images[:, None] * CAPTIONS_PER_IMAGE + np.arange(CAPTIONS_PER_IMAGE)).ravel()
        parts.append(rng.permutation(captions))
    order = np.concatenate(parts)
    steps = steps_per_epoch(n_captions, batch_size)
    return order[: steps * batch_size].reshape(steps, batch_size)


def rank_slice(plan: np.ndarray, rank: int, workers: int) -> np.ndarray:
    """Rank ``rank``'s ``[steps, batch_size / workers]`` share of the plan's global batches."""
    local = plan.shape[1] // workers
    return plan[:, rank * local : (rank + 1) * local]
