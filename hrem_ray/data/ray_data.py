"""Ray Data ingest: the captions, tokenised once in Ray tasks (docs/data.md).

Pushing 300 KB region-feature rows through the object store is what costs on Ray: the
measured copies are in docs/benchmarks.md. So the dataset carries only caption ids and token
ids, and every Ray Train worker reads it whole, once per run; each worker then reads its
batches' features from its node's local copy of the split (``data/source.py``), a memory map
or the node cache of a sharded split, and draws the augmentation from the epoch's seed.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import pyarrow as pa
import ray

from hrem_ray import storage
from hrem_ray.data.precomp import PrecompError, parse_captions
from hrem_ray.data.shards import ShardError
from hrem_ray.data.tokenize import CaptionTokenizer

ROWS_PER_BLOCK = 20_000  # token rows are ~100 bytes: blocks only serve parallel tokenising
_DATA_ERROR = re.compile(r"hrem_ray\.data\.\w+\.(ShardError|PrecompError): ([^\n]+)")
TOKENIZE_CPUS = 0.5  # per tokenising task: leave CPUs beside the train workers (docs/ray.md)


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


def pairs_dataset(
    caps_path: str, n_captions: int, bert_path: str, max_tokens: int
) -> ray.data.Dataset:
    """One row per caption of ``caps_path`` (a local path or a URI): ``caption_id`` and its
    unaugmented ``tokens``, materialised.

    Materialising is cheap (a few MB even for COCO) and, on small machines, keeps the train
    workers from starving the pipeline of CPUs (a silent deadlock on 2 cores).
    """
    blocks = max(2, min(64, n_captions // ROWS_PER_BLOCK))
    ds = ray.data.range(n_captions, override_num_blocks=blocks)
    ds = ds.map_batches(
        _tokenize,
        batch_format="numpy",
        fn_kwargs={
            "caps_path": str(caps_path),
            "bert_path": str(bert_path),
            "max_tokens": max_tokens,
        },
        num_cpus=TOKENIZE_CPUS,
    )
    return ds.materialize()


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
