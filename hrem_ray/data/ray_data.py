"""Ray Data ingest, for the two kinds of split (docs/data.md).

A precomp split (local, memory-mapped): pushing 300 KB region-feature rows through the
object store is what costs on Ray (docs/ray.md), so the dataset carries only ids and tokens,
tokenised once in Ray tasks. Each train worker gathers its batch's features from its own
memory map of the ``.npy`` (one read per batch, no worker ever holds the file) and re-draws
the word and region augmentation every epoch from a seeded generator.

A sharded split (``data/shards.py``, local or in object storage): features must cross the
object store, so each worker runs a Ray Data pipeline per epoch over its share of the
shards (``epoch_slices``): read tasks load and check shard slices, pick each image's caption
for the round, augment and pad (``map_batches``), and ``iter_torch_batches`` shuffles them
in a seeded buffer on the worker. No process holds a split.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from functools import lru_cache, partial
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import ray

from hrem_ray import storage
from hrem_ray.data.augment import region_dropout
from hrem_ray.data.precomp import CAPTIONS_PER_IMAGE, PrecompError, PrecompSplit, parse_captions
from hrem_ray.data.shards import Shard, ShardedSplit, ShardError, read_shard
from hrem_ray.data.tokenize import CaptionTokenizer

if TYPE_CHECKING:
    from hrem_ray.data.batches import Batch

ROWS_PER_BLOCK = 20_000  # token rows are ~100 bytes: blocks only serve parallel tokenising
_DATA_ERROR = re.compile(r"hrem_ray\.data\.\w+\.(ShardError|PrecompError): ([^\n]+)")
READ_CPUS = 0.5  # per shard-reading task: leave CPUs beside the train workers (docs/ray.md)


@lru_cache(maxsize=4)
def _captions(caps_path: str) -> list[str]:
    """Captions of a split (a local path or a URI), read once per Ray worker process."""
    return parse_captions(storage.read_bytes(caps_path), caps_path)


@lru_cache(maxsize=4)
def _tokenizer(bert_path: str, max_tokens: int) -> CaptionTokenizer:
    return CaptionTokenizer.from_dir(bert_path, max_tokens=max_tokens)


def _tokenize(batch: dict[str, np.ndarray], caps_path: str, bert_path: str, max_tokens: int):
    captions = _captions(caps_path)
    tokenizer = _tokenizer(bert_path, max_tokens)
    ids = batch["id"].astype(np.int64)
    tokens = [tokenizer.encode(captions[c]) for c in ids.tolist()]
    return pa.table({"caption_id": ids, "tokens": pa.array(tokens, type=pa.list_(pa.int32()))})


def pairs_dataset(split: PrecompSplit, bert_path: str, max_tokens: int) -> ray.data.Dataset:
    """One row per caption: ``caption_id`` and its unaugmented ``tokens``, materialised.

    Materialising is cheap (a few MB even for COCO) and, on small machines, keeps the train
    workers from starving the pipeline of CPUs (a silent deadlock on 2 cores).
    """
    blocks = max(2, min(64, split.n_captions // ROWS_PER_BLOCK))
    ds = ray.data.range(split.n_captions, override_num_blocks=blocks)
    ds = ds.map_batches(
        _tokenize,
        batch_format="numpy",
        fn_kwargs={
            "caps_path": str(split.caps_path),
            "bert_path": str(bert_path),
            "max_tokens": max_tokens,
        },
        num_cpus=0.5,
    )
    return ds.materialize()


def shard_batches(
    shard: ray.data.DataIterator,
    split: PrecompSplit,
    tokenizer: CaptionTokenizer,
    local_batch: int,
    steps: int,
    *,
    seed: int,
    epoch: int,
    rank: int,
    region_keep: float = 0.8,
    word_aug: float = 0.2,
) -> Iterator[Batch]:
    """Exactly ``steps`` augmented batches of this worker's shard for one epoch.

    Every rank must take the same number of steps (the loss all-gathers every step). The shard's
    light rows (about 100 bytes each: 30 MB for half of COCO) are read to its end first, put in
    caption-id order and then drawn in a fresh seeded permutation per (epoch, rank), so every
    batch samples the whole shard, as the reference's shuffling DataLoader does. (A streaming
    local shuffle buffer only mixes rows that arrive close together: with 50,000 rows, the first
    200 batches of every epoch came from the first 36% of a 510k-caption file.)
    """
    from hrem_ray.data.batches import make_batch  # torch: kept out of the tokenising tasks

    table = _read_shard(shard)
    order = np.random.default_rng([seed, epoch, rank]).permutation(table.num_rows)
    rng = np.random.default_rng([seed, epoch, rank, 1])
    for step in range(min(steps, table.num_rows // local_batch)):
        rows = table.take(order[step * local_batch : (step + 1) * local_batch])
        yield make_batch(
            split,
            tokenizer,
            rows["caption_id"].to_numpy(),
            train=True,
            rng=rng,
            region_keep=region_keep,
            word_aug=word_aug,
            tokens=rows["tokens"].to_pylist(),
        )


def _read_shard(shard: ray.data.DataIterator) -> pa.Table:
    """The whole shard as one table in caption-id order (block arrival order varies by run)."""
    blocks = [
        block.select(["caption_id", "tokens"])
        for block in shard.iter_batches(batch_size=None, batch_format="pyarrow")
    ]
    if not blocks:
        return pa.table(
            {"caption_id": pa.array([], pa.int64()), "tokens": pa.array([], pa.list_(pa.int32()))}
        )
    return pa.concat_tables(blocks).combine_chunks().sort_by("caption_id")


def steps_per_epoch(split: PrecompSplit | ShardedSplit, workers: int, local_batch: int) -> int:
    """Steps every rank takes per epoch (the same on all: the loss all-gathers each step).
    A sharded epoch gives each rank ``5 * (n_images // workers)`` pairs (``epoch_slices``)."""
    if isinstance(split, ShardedSplit):
        return CAPTIONS_PER_IMAGE * (split.n_images // workers) // local_batch
    return split.n_captions // workers // local_batch


def epoch_slices(
    split: ShardedSplit, *, seed: int, epoch: int, rank: int, workers: int
) -> list[dict[str, int]]:
    """This rank's share of an epoch, as shard slices ``{shard, lo, hi, round}`` in order.

    An epoch is 5 rounds; each round visits every image once, so every caption is used once
    per epoch and a batch rarely holds two captions of one image, as with the memmap path's
    permutation of captions. In each round the shards come in a fresh order seeded by
    ``(seed, epoch, round)``, and rank ``r`` takes images ``[r*R, (r+1)*R)`` of that sequence,
    ``R = n_images // workers``: every rank the same count, the ranks disjoint.
    """
    per_rank = split.n_images // workers
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    slices = []
    for round_ in range(CAPTIONS_PER_IMAGE):
        order = np.random.default_rng([seed, epoch, round_]).permutation(len(split.shards))
        start = 0
        for k in order.tolist():
            rows = split.shards[k].rows
            a, b = max(lo, start), min(hi, start + rows)
            if a < b:
                slices.append({"shard": k, "lo": a - start, "hi": b - start, "round": round_})
            start += rows
    return slices


def round_captions(image_ids: np.ndarray, round_: int, n_images: int, *, seed: int, epoch: int):
    """The caption of each image in a round: ``(offset_i + round) % 5``, a seeded offset per
    image and epoch, so the 5 rounds use each of an image's captions once."""
    offsets = np.random.default_rng([seed, epoch]).integers(0, CAPTIONS_PER_IMAGE, n_images)
    return image_ids * CAPTIONS_PER_IMAGE + (offsets[image_ids] + round_) % CAPTIONS_PER_IMAGE


def _read_pairs(
    batch: dict[str, np.ndarray],
    split: ShardedSplit,
    bert_path: str,
    max_tokens: int,
    seed: int,
    epoch: int,
    region_keep: float,
    word_aug: float,
) -> dict[str, np.ndarray]:
    """Shard slices -> augmented pairs: features (region dropout, zero-padded to all regions,
    stored dtype), lengths, caption ids and augmented token ids. A slice's augmentation is
    seeded by ``(seed, epoch, shard, round, first row)``: the same wherever it runs."""
    captions = _captions(split.caps_path)
    tokenizer = _tokenizer(bert_path, max_tokens)
    images, lengths, caption_ids, tokens = [], [], [], []
    columns = (batch["shard"], batch["lo"], batch["hi"], batch["round"])
    for k, lo, hi, round_ in zip(*columns, strict=True):
        shard: Shard = split.shards[int(k)]
        feats = read_shard(split, shard)[int(lo) : int(hi)]
        ids = np.arange(shard.first_image + int(lo), shard.first_image + int(hi))
        cids = round_captions(ids, int(round_), split.n_images, seed=seed, epoch=epoch)
        out = np.zeros_like(feats)
        rng = np.random.default_rng([seed, epoch, int(k), int(round_), int(lo)])
        for i, cid in enumerate(cids.tolist()):
            kept = region_dropout(feats.shape[1], rng, region_keep)
            out[i, : kept.size] = feats[i, kept]
            lengths.append(kept.size)
            tokens.append(tokenizer.encode(captions[cid], train=True, rng=rng, word_aug=word_aug))
        images.append(out)
        caption_ids.append(cids)
    token_column = np.empty(len(tokens), dtype=object)
    token_column[:] = [np.asarray(t, dtype=np.int32) for t in tokens]
    return {
        "caption_id": np.concatenate(caption_ids).astype(np.int64),
        "images": np.concatenate(images),
        "image_lengths": np.asarray(lengths, dtype=np.int64),
        "tokens": token_column,
    }


def _collate(batch: dict[str, np.ndarray], pad_id: int) -> Batch:
    """Pairs from the pipeline -> a ``Batch`` padded to its longest image, as the memmap
    path pads (the padding regions are zeros either way)."""
    import torch

    from hrem_ray.data.batches import Batch, pad_tokens

    lengths = torch.from_numpy(np.array(batch["image_lengths"], dtype=np.int64))
    images = np.ascontiguousarray(batch["images"][:, : int(lengths.max())], dtype=np.float32)
    if not images.flags.writeable:  # a tensor must not share read-only memory
        images = images.copy()
    images = torch.from_numpy(images)
    tokens, token_lengths = pad_tokens([t.tolist() for t in batch["tokens"]], pad_id)
    ids = torch.from_numpy(np.array(batch["caption_id"], dtype=np.int64))
    return Batch(images, lengths, tokens, token_lengths, ids // CAPTIONS_PER_IMAGE, ids)


def sharded_batches(
    split: ShardedSplit,
    bert_path: str,
    max_tokens: int,
    local_batch: int,
    *,
    seed: int,
    epoch: int,
    rank: int,
    workers: int,
    region_keep: float = 0.8,
    word_aug: float = 0.2,
    shuffle_buffer: int = 2048,
) -> Iterator[Batch]:
    """Exactly ``steps_per_epoch`` batches of this rank's pairs for one epoch, read through
    a Ray Data pipeline (see the module docstring) and shuffled in a seeded buffer of
    ``shuffle_buffer`` pairs. A damaged shard stops the epoch with its ``ShardError``."""
    from ray.data import DataContext

    DataContext.get_current().execution_options.preserve_order = True  # seeded == repeatable
    slices = epoch_slices(split, seed=seed, epoch=epoch, rank=rank, workers=workers)
    light = replace(split, captions=[])  # tasks read the captions once per process instead
    ds = ray.data.from_items(slices, override_num_blocks=len(slices)).map_batches(
        _read_pairs,
        batch_size=1,
        fn_kwargs={
            "split": light,
            "bert_path": str(bert_path),
            "max_tokens": max_tokens,
            "seed": seed,
            "epoch": epoch,
            "region_keep": region_keep,
            "word_aug": word_aug,
        },  # fmt: skip
        num_cpus=READ_CPUS,
    )
    pad_id = _tokenizer(str(bert_path), max_tokens).pad_id
    batches = ds.iter_torch_batches(
        batch_size=local_batch,
        collate_fn=partial(_collate, pad_id=pad_id),
        local_shuffle_buffer_size=shuffle_buffer,
        local_shuffle_seed=int(np.random.default_rng([seed, epoch, rank]).integers(2**31)),
        drop_last=True,
    )
    try:
        yield from batches
    except Exception as e:  # a read task's error arrives wrapped in Ray's exceptions
        cause = data_error(e)
        if cause is None:
            raise
        raise cause from None


def data_error(e: BaseException) -> PrecompError | None:
    """The data error (``ShardError``, ``PrecompError``) inside Ray's wrapping of ``e`` (a
    read task's error inside a worker's, inside Ray Train's), or None. Across processes Ray
    keeps only the text of a task's exception, so the last such line of it is read back."""
    seen: list[BaseException] = []
    while e is not None and all(e is not s for s in seen):
        if isinstance(e, PrecompError):
            return e
        seen.append(e)
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    found = [m for s in seen for m in _DATA_ERROR.findall(str(s))]
    if not found:
        return None
    kind, message = found[-1]
    return (ShardError if kind == "ShardError" else PrecompError)(message.strip())
