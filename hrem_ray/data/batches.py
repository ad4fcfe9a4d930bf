"""Batches of (regions, tokens) pairs: training augmentation, padding and iteration orders.

Every batch reads its features with one ``gather_features`` call (positional reads of the
``.npy`` file, same result as ``PrecompSplit.gather``); only light ids move around otherwise.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from hrem_ray.data.precomp import CAPTIONS_PER_IMAGE, PrecompSplit
from hrem_ray.data.tokenize import CaptionTokenizer

_AUGMENT_STREAM = 1  # extra seed word separating the augmentation rng from the order rng


@dataclass
class Batch:
    """A padded batch of image-caption pairs; ``image_ids`` tell which pairs are positives."""

    images: torch.Tensor  # [B, N, dim] float32, zero padded to the longest kept count
    image_lengths: torch.Tensor  # [B] int64
    tokens: torch.Tensor  # [B, L] int64, padded with [PAD] = 0
    token_lengths: torch.Tensor  # [B] int64
    image_ids: torch.Tensor  # [B] int64, caption_id // 5
    caption_ids: torch.Tensor  # [B] int64

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __len__(self) -> int:
        return self.caption_ids.shape[0]


def gather_features(split: PrecompSplit, rows: np.ndarray) -> np.ndarray:
    """``split.gather(rows)`` (a float32 ``[len(rows), regions, dim]`` copy), read with ``preadv``.

    Copying rows out of the memory map costs one page fault per 4 KB page that is not yet
    mapped. Where the pages are not in the page cache (a file larger than RAM, such as COCO's
    33 GB on a 24 GB machine) that was 2.5x slower than positional reads into the batch buffer
    on a real disk, and 25x slower over sparse (never written) regions; from the page cache
    the two are within 30%. Each run of consecutive distinct rows is one read. Arrays that are
    not a whole ``.npy`` memory map (a slice of one, in-memory test data) use ``split.gather``.
    """
    features = split.features
    preadv = getattr(os, "preadv", None)
    if (
        preadv is None
        or not isinstance(features, np.memmap)
        or not isinstance(features.base, mmap.mmap)  # a view: its ``offset`` is the parent's
        or not features.flags.c_contiguous
        or features.filename is None
    ):
        return split.gather(rows)
    rows = np.asarray(rows, dtype=np.int64)
    unique, inverse = np.unique(rows, return_inverse=True)
    if unique.size and (unique[0] < 0 or unique[-1] >= features.shape[0]):
        return split.gather(rows)  # numpy's negative indexing or IndexError, as before
    block = np.empty((unique.size, *features.shape[1:]), dtype=features.dtype)
    row_bytes = block.itemsize * int(np.prod(features.shape[1:], dtype=np.int64))
    bounds = np.flatnonzero(np.diff(unique) != 1) + 1
    starts, stops = np.r_[0, bounds], np.r_[bounds, unique.size]
    with open(features.filename, "rb", buffering=0) as f:
        for start, stop in zip(starts.tolist(), stops.tolist(), strict=True):
            view = memoryview(block[start:stop].reshape(-1)).cast("B")
            offset = features.offset + int(unique[start]) * row_bytes
            while view:  # a short read is legal (signals, network file systems)
                n = preadv(f.fileno(), [view], offset)
                if n <= 0:
                    raise EOFError(f"{features.filename}: file ends before row {unique[stop - 1]}")
                view, offset = view[n:], offset + n
    block = block.astype(np.float32, copy=False)
    if unique.size == rows.size and np.array_equal(unique, rows):
        return block
    return block[inverse.reshape(-1)]


def region_dropout(n_regions: int, rng: np.random.Generator, keep: float = 0.8) -> np.ndarray:
    """Sorted indices of the regions kept, each independently with probability ``keep``.

    If none survives (probability 0.2**36 with the defaults) one random region is kept: the
    reference would pool over an empty set there and produce NaN.
    """
    kept = np.flatnonzero(rng.random(n_regions) < keep)
    if kept.size == 0:
        kept = rng.integers(0, n_regions, size=1)
    return kept


def pad_regions(feats: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``[n_i, dim]`` arrays into a zero-padded ``[B, max n_i, dim]`` and the n_i."""
    lengths = np.array([f.shape[0] for f in feats], dtype=np.int64)
    out = np.zeros((len(feats), lengths.max(), feats[0].shape[1]), dtype=np.float32)
    for i, f in enumerate(feats):
        out[i, : f.shape[0]] = f  # numpy slice copies are ~2x faster than torch's here
    return torch.from_numpy(out), torch.from_numpy(lengths)


def pad_tokens(token_lists: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists with ``pad_id`` into ``[B, max len]``; also return the lengths."""
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.int64)
    out = torch.full((len(token_lists), int(lengths.max())), pad_id, dtype=torch.int64)
    for i, ids in enumerate(token_lists):
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return out, lengths


def make_batch(
    split: PrecompSplit,
    tokenizer: CaptionTokenizer,
    caption_ids: np.ndarray,
    *,
    train: bool,
    rng: np.random.Generator | None = None,
    region_keep: float = 0.8,
    word_aug: float = 0.2,
    tokens: Sequence[Sequence[int]] | None = None,
) -> Batch:
    """Pairs for ``caption_ids``: raw features and tokens, or augmented ones when ``train``.

    ``tokens``, when given, are the captions already encoded (unaugmented), as a Ray Data
    pipeline delivers them; otherwise the captions are tokenised here.
    """
    caption_ids = np.asarray(caption_ids, dtype=np.int64)
    if train and rng is None:
        raise ValueError("make_batch(train=True) needs a numpy Generator for augmentation")
    feats = gather_features(split, split.feature_rows(caption_ids))
    if train:
        images, image_lengths = pad_regions(
            [f[region_dropout(f.shape[0], rng, region_keep)] for f in feats]
        )
    else:
        images = torch.from_numpy(feats)
        image_lengths = torch.full((len(feats),), feats.shape[1], dtype=torch.int64)
    if tokens is None:
        token_lists = [
            tokenizer.encode(split.captions[c], train=train, rng=rng, word_aug=word_aug)
            for c in caption_ids.tolist()
        ]
    elif train:
        token_lists = [tokenizer.augment_ids(t, rng, word_aug) for t in tokens]
    else:
        token_lists = [list(t) for t in tokens]
    tokens, token_lengths = pad_tokens(token_lists, tokenizer.pad_id)
    ids = torch.from_numpy(caption_ids.copy())
    return Batch(images, image_lengths, tokens, token_lengths, ids // CAPTIONS_PER_IMAGE, ids)


def epoch_order(n_captions: int, *, seed: int, epoch: int) -> np.ndarray:
    """A permutation of the captions that depends only on ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(n_captions)


def train_batches(
    split: PrecompSplit,
    tokenizer: CaptionTokenizer,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    region_keep: float = 0.8,
    word_aug: float = 0.2,
    drop_last: bool = True,
) -> Iterator[Batch]:
    """One epoch of augmented batches, every caption at most once, reproducible per epoch."""
    order = epoch_order(split.n_captions, seed=seed, epoch=epoch)
    rng = np.random.default_rng([seed, epoch, _AUGMENT_STREAM])
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        yield make_batch(
            split,
            tokenizer,
            order[start : start + batch_size],
            train=True,
            rng=rng,
            region_keep=region_keep,
            word_aug=word_aug,
        )


def image_batches(
    split: PrecompSplit, batch_size: int
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """Every unique image once, in id order, with all regions: ``(image ids, images, lengths)``."""
    rows = split.image_rows()
    for start in range(0, split.n_images, batch_size):
        ids = np.arange(start, min(start + batch_size, split.n_images), dtype=np.int64)
        feats = gather_features(split, rows[ids])
        lengths = torch.full((len(ids),), feats.shape[1], dtype=torch.int64)
        yield ids, torch.from_numpy(feats), lengths


def caption_batches(
    split: PrecompSplit, tokenizer: CaptionTokenizer, batch_size: int
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """Every caption once, in id order, unaugmented: ``(caption ids, tokens, lengths)``."""
    for start in range(0, split.n_captions, batch_size):
        ids = np.arange(start, min(start + batch_size, split.n_captions), dtype=np.int64)
        tokens, lengths = pad_tokens(
            [tokenizer.encode(split.captions[c]) for c in ids.tolist()], tokenizer.pad_id
        )
        yield ids, tokens, lengths
