"""Batches of (regions, tokens) pairs: reading rows of ``.npy`` files, augmentation, padding.

Every batch reads its features with positional reads of the ``.npy`` file that holds them
(``read_rows``: a precomp split or a shard in the node cache); only light ids move otherwise.
The epoch's order is ``data/plan.py``'s, and ``data/source.py`` puts the two together.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import BinaryIO

import numpy as np
import torch

from hrem_ray.data.augment import region_dropout
from hrem_ray.data.precomp import CAPTIONS_PER_IMAGE, PrecompSplit, check_finite, npy_header
from hrem_ray.data.tokenize import CaptionTokenizer


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


@dataclass(frozen=True)
class NpyRows:
    """Where a C-ordered ``.npy`` file's rows lie: row ``r`` at ``offset + r * row bytes``."""

    path: str
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @classmethod
    def of(cls, features: np.ndarray) -> NpyRows | None:
        """The rows behind a whole ``.npy`` memory map; None for any other array (a view's
        ``offset`` is stale, an in-memory array has no file)."""
        if not (hasattr(os, "preadv") and isinstance(features, np.memmap)
                and isinstance(features.base, mmap.mmap) and features.flags.c_contiguous
                and features.filename is not None):  # fmt: skip
            return None
        return cls(str(features.filename), features.offset, features.shape, features.dtype)

    @classmethod
    def read(cls, f: BinaryIO, path: str) -> NpyRows:
        """The header of the ``.npy`` open as ``f`` (read from its start)."""
        f.seek(0)
        shape, dtype, offset = npy_header(f, path)
        return cls(path, offset, shape, dtype)


def _iov_max() -> int:
    try:
        return max(1, min(1024, os.sysconf("SC_IOV_MAX")))
    except (ValueError, OSError, AttributeError):
        return 16


def _preadv_all(fd: int, buffers: list[memoryview], offset: int, name: str) -> None:
    """Fill ``buffers`` from ``offset`` on; a short read (signals, network file systems) resumes."""
    first = 0
    while first < len(buffers):
        n = os.preadv(fd, buffers[first:], offset)
        if n <= 0:
            raise EOFError(f"{name}: file ends at byte {offset}, inside the rows being read")
        offset += n
        while first < len(buffers) and n >= len(buffers[first]):
            n -= len(buffers[first])
            first += 1
        if n:
            buffers[first] = buffers[first][n:]


def gather_features(split: PrecompSplit, rows: np.ndarray) -> np.ndarray:
    """``split.gather(rows)``: a float32 ``[len(rows), regions, dim]`` copy, read with
    ``read_rows`` when the features are a whole ``.npy`` memory map, and checked finite."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    features = split.features
    source = NpyRows.of(features)
    in_range = not rows.size or (rows.min() >= 0 and rows.max() < features.shape[0])
    if source is None or not in_range:
        out = split.gather(rows)  # including numpy's negative indexing or IndexError
    else:
        with open(source.path, "rb", buffering=0) as f:
            out = read_rows(source, rows, f.fileno())
    check_finite(out, split.ims_path, rows)  # the driver never scans: each batch is checked
    return out


def read_rows(
    source: NpyRows,
    rows: np.ndarray,
    fd: int,
    out: np.ndarray | None = None,
    at: np.ndarray | None = None,
) -> np.ndarray:
    """``features[rows]`` of the ``.npy`` open as ``fd``, read with ``preadv``, as float32: into
    ``out[at]`` when given (the batch), else a new array.

    Copying out of a memory map costs a page fault per 4 KB page not yet mapped. Where the
    pages are not in the page cache (a file larger than RAM, like COCO's 33 GB on a 24 GB
    machine) that measured 1.2-3x slower than reading into the batch with ``preadv`` on a real
    disk, and 10-30x slower over sparse (never written) regions; from the page cache the two
    are within about 30% of each other. Each distinct row is read once, in file order, straight
    into its place in the batch (float16 rows go through a buffer); a run of consecutive rows
    is one call.
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if out is None:
        out, at = np.empty((rows.size, *source.shape[1:]), dtype=np.float32), None
    at = np.arange(rows.size) if at is None else np.asarray(at)
    direct = source.dtype == out.dtype
    dest = out if direct else np.empty((rows.size, *source.shape[1:]), dtype=source.dtype)
    place = at if direct else np.arange(rows.size)
    if rows.size:
        order = np.argsort(rows, kind="stable")
        in_order = rows[order]
        first = np.r_[True, in_order[1:] != in_order[:-1]]
        unique, read_into = in_order[first], place[order[first]]
        runs = np.flatnonzero(np.diff(unique) != 1) + 1
        row_bytes = dest[0].nbytes
        step = _iov_max()
        bounds = np.r_[0, runs, unique.size].tolist()
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            for a in range(lo, hi, step):
                targets = read_into[a : min(a + step, hi)].tolist()
                buffers = [memoryview(dest[i]).cast("B") for i in targets]
                offset = source.offset + int(unique[a]) * row_bytes
                _preadv_all(fd, buffers, offset, source.path)
        if not first.all():  # a repeated row (two captions of one image): copy its first read
            src = order[np.maximum.accumulate(np.where(first, np.arange(rows.size), 0))]
            dest[place[order[~first]]] = dest[place[src[~first]]]
    if not direct:
        out[at] = dest
    return out


def _dropout_and_pad(
    feats: np.ndarray, rng: np.random.Generator, keep: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``pad_regions([f[region_dropout(...)] for f in feats])`` with one copy instead of two."""
    kept = [region_dropout(f.shape[0], rng, keep) for f in feats]
    lengths = np.array([k.size for k in kept], dtype=np.int64)
    out = np.zeros((len(feats), lengths.max(), feats.shape[2]), dtype=np.float32)
    for i, k in enumerate(kept):
        np.take(feats[i], k, axis=0, out=out[i, : k.size], mode="clip")  # k is in range
    return torch.from_numpy(out), torch.from_numpy(lengths)


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
) -> Batch:
    """Pairs for ``caption_ids`` of a precomp split, tokenised here (``collate``)."""
    caption_ids = np.asarray(caption_ids, dtype=np.int64)
    feats = gather_features(split, split.feature_rows(caption_ids))
    tokens = [tokenizer.encode(split.captions[c]) for c in caption_ids.tolist()]
    return collate(feats, tokens, caption_ids, tokenizer, train=train, rng=rng,
                   region_keep=region_keep, word_aug=word_aug)  # fmt: skip


def collate(
    feats: np.ndarray,
    tokens: Sequence[Sequence[int]],
    caption_ids: np.ndarray,
    tokenizer: CaptionTokenizer,
    *,
    train: bool,
    rng: np.random.Generator | None = None,
    region_keep: float = 0.8,
    word_aug: float = 0.2,
) -> Batch:
    """One batch of every kind of split: ``feats`` (float32, one image per pair) and the
    captions' unaugmented ``tokens``, augmented when ``train`` (region dropout, then word
    augmentation, both drawn from ``rng``) and padded."""
    caption_ids = np.asarray(caption_ids, dtype=np.int64)
    if train and rng is None:
        raise ValueError("collate(train=True) needs a numpy Generator for augmentation")
    if train:
        images, image_lengths = _dropout_and_pad(feats, rng, region_keep)
        token_lists = [tokenizer.augment_ids(list(t), rng, word_aug) for t in tokens]
    else:
        images = torch.from_numpy(feats)
        image_lengths = torch.full((len(feats),), feats.shape[1], dtype=torch.int64)
        token_lists = [list(t) for t in tokens]
    padded, token_lengths = pad_tokens(token_lists, tokenizer.pad_id)
    ids = torch.from_numpy(caption_ids.copy())
    return Batch(images, image_lengths, padded, token_lengths, ids // CAPTIONS_PER_IMAGE, ids)


def image_batches(
    source: PrecompSplit | np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """Every image once, in id order, with all regions: ``(image ids, images, lengths)``.

    ``source`` is a split (its unique images, read with ``gather_features``) or an array of
    ``[n, regions, dim]`` features (e.g. a memory-mapped ``.npy``), read a batch at a time.
    Either way each batch is checked for non-finite values as it is read.
    """
    n = source.n_images if isinstance(source, PrecompSplit) else len(source)
    for start in range(0, n, batch_size):
        ids = np.arange(start, min(start + batch_size, n), dtype=np.int64)
        feats = _image_features(source, ids)
        lengths = torch.full((len(ids),), feats.shape[1], dtype=torch.int64)
        yield ids, torch.from_numpy(feats), lengths


def _image_features(source: PrecompSplit | np.ndarray, ids: np.ndarray) -> np.ndarray:
    if isinstance(source, PrecompSplit):
        return gather_features(source, source.image_rows()[ids])
    # a copy: rows of a read-only memmap must not back a tensor (torch warns, UB on write)
    block = np.array(source[ids[0] : ids[-1] + 1], dtype=np.float32, order="C")
    check_finite(block, getattr(source, "filename", None) or "features", ids)
    return block


def caption_batches(
    captions: Sequence[str], tokenizer: CaptionTokenizer, batch_size: int
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """Every caption once, in id order, unaugmented: ``(caption ids, tokens, lengths)``."""
    for start in range(0, len(captions), batch_size):
        ids = np.arange(start, min(start + batch_size, len(captions)), dtype=np.int64)
        tokens, lengths = pad_tokens(
            [tokenizer.encode(captions[c]) for c in ids.tolist()], tokenizer.pad_id
        )
        yield ids, tokens, lengths
