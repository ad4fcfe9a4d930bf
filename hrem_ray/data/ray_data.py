"""Ray Data ingest: a dataset of light rows (caption id, token ids); features stay on disk.

Pushing 300 KB region-feature rows through the object store is what costs on Ray
(docs/ray.md), so the dataset carries only ids and tokens, tokenised once
in Ray tasks. Each train worker gathers its batch's features from its own memory map of the
``.npy`` (one read per batch, no worker ever holds the file) and re-draws the word and region
augmentation every epoch from a seeded generator.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import ray

from hrem_ray.data.precomp import PrecompSplit, read_captions
from hrem_ray.data.tokenize import CaptionTokenizer

if TYPE_CHECKING:
    from hrem_ray.data.batches import Batch

ROWS_PER_BLOCK = 20_000  # token rows are ~100 bytes: blocks only serve parallel tokenising


@lru_cache(maxsize=4)
def _captions(caps_path: str) -> list[str]:
    """Captions of a split, read once per Ray worker process."""
    return read_captions(caps_path)


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
