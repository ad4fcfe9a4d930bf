"""The training source: one interface over a split, whatever holds it (docs/data.md).

A split is a precomp folder (one memory-mapped ``.npy``), local shards, or shards in object
storage (``hrem-ray shard``). All three are read the same way: a list of blocks of consecutive
images, each a local ``.npy`` read with positional reads (``batches.read_rows``). A shard in
object storage becomes local through the node cache (``data/cache.py``): downloaded and
checked once per node, then read from disk like the memory map. Every kind has one epoch
plan (``data/plan.py``), one augmentation and one collate (``batches.collate``), so
``train --local`` and a 1-worker Ray run train on the same batches, and a precomp folder and
its shards do too when the cache holds the split.

This is the only module that tells the kinds apart.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from hrem_ray import storage
from hrem_ray.config import parse_size
from hrem_ray.data import plan as plans
from hrem_ray.data.batches import Batch, NpyRows, collate, read_rows
from hrem_ray.data.cache import NodeCache, verified_local
from hrem_ray.data.precomp import (
    CAPTIONS_PER_IMAGE,
    PrecompError,
    PrecompSplit,
    check_finite,
    open_split,
    scan_finite,
    split_paths,
    write_split,
)
from hrem_ray.data.shards import ShardedSplit, ShardError, manifest_key, open_sharded, split_dir
from hrem_ray.data.shards import verify_shards as _verify_shards
from hrem_ray.data.tokenize import CaptionTokenizer

_AUGMENT_STREAM = 1  # seed word separating the augmentation rng from the plan's
FETCHERS = 4  # shards downloaded at once per process (I/O bound: threads suffice)
_OPEN_FILES = 512  # open block files kept per process, at most
_PREFETCH_BATCHES = 2  # batches prepared ahead of the training step

Tokens = Callable[[np.ndarray], Sequence[Sequence[int]]]  # caption ids -> unaugmented ids


@dataclass(frozen=True)
class Block:
    """Images ``first_image .. first_image + images - 1`` in one ``.npy`` file."""

    path: str  # a local path or a URI
    first_image: int
    images: int
    step: int  # file rows per image: 5 in the per-caption layout, else 1
    bytes: int | None = None  # a shard's size and checksum in its manifest
    sha256: str | None = None


class TrainingSource:
    """A split as training reads it: counts, the epoch's batches for a rank, the checks."""

    def __init__(
        self,
        blocks: list[Block],
        captions: list[str],
        *,
        name: str,
        where: str,
        caps_path: str,
        regions: int,
        dim: int,
        cache: NodeCache | None = None,
        precomp: PrecompSplit | None = None,
        sharded: ShardedSplit | None = None,
    ) -> None:
        self.blocks, self.captions, self.name, self.where = blocks, captions, name, where
        self.caps_path, self.regions, self.dim = caps_path, regions, dim
        self._cache, self._precomp, self._sharded = cache, precomp, sharded
        self._starts = np.array([b.first_image for b in blocks], dtype=np.int64)
        self._steps = np.array([b.step for b in blocks], dtype=np.int64)
        self._files: OrderedDict[str, tuple[NpyRows, BinaryIO]] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None

    @property
    def n_images(self) -> int:
        return len(self.captions) // CAPTIONS_PER_IMAGE

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    @property
    def window(self) -> int:
        """Blocks whose captions are shuffled together: all of them unless the node cache
        holds less than the split; then half the budget, so the next window fits beside."""
        if self._cache is None:
            return len(self.blocks)
        largest = max(b.bytes or 0 for b in self.blocks)
        return max(1, min(len(self.blocks), self._cache.limit // max(largest, 1) // 2))

    def describe(self) -> str:
        """One line: what the split is, where it is read from, and how it is shuffled."""
        shuffle = "one permutation of the split"
        if self.window < len(self.blocks):
            shuffle = f"windows of {self.window} shards (cache {_size(self._cache.limit)})"
        return (f"{self.name}: {self.n_images} images, {self.n_captions} captions, "
                f"{self.where}; {shuffle}")  # fmt: skip

    def steps_per_epoch(self, batch_size: int) -> int:
        return plans.steps_per_epoch(self.n_captions, batch_size)

    def plan(self, batch_size: int, *, seed: int, epoch: int) -> np.ndarray:
        """The epoch's global batches of caption ids, ``[steps, batch_size]``."""
        rows = [b.images for b in self.blocks]
        return plans.epoch_plan(rows, self.window, batch_size, seed=seed, epoch=epoch)

    def batches(
        self,
        tokens: Tokens,
        tokenizer: CaptionTokenizer,
        local_batch: int,
        *,
        seed: int,
        epoch: int,
        rank: int = 0,
        workers: int = 1,
        region_keep: float = 0.8,
        word_aug: float = 0.2,
    ) -> Iterator[Batch]:
        """Rank ``rank``'s ``steps_per_epoch`` augmented batches of the epoch, prepared
        ``_PREFETCH_BATCHES`` ahead in a thread while the shards of the next window (or
        epoch) download in the background."""
        mine = plans.rank_slice(self.plan(local_batch * workers, seed=seed, epoch=epoch),
                                rank, workers)  # fmt: skip
        rng = np.random.default_rng([seed, epoch, _AUGMENT_STREAM, rank])
        on_step = self._prefetcher(mine, seed=seed, epoch=epoch)

        def produce() -> Iterator[Batch]:
            for step, ids in enumerate(mine):
                on_step(step)
                feats = self.gather(ids // CAPTIONS_PER_IMAGE)
                yield collate(feats, tokens(ids), ids, tokenizer, train=True, rng=rng,
                              region_keep=region_keep, word_aug=word_aug)  # fmt: skip

        return _ahead(produce(), _PREFETCH_BATCHES)

    def prefetch(self, *, seed: int, epoch: int) -> None:
        """Start downloading the epoch's first window now, in the background: a worker calls
        it on opening its split, so the downloads overlap building the model."""
        self._prefetcher(self.plan(1, seed=seed, epoch=epoch), seed=seed, epoch=epoch)

    def gather(self, image_ids: np.ndarray) -> np.ndarray:
        """Float32 ``[len(image_ids), regions, dim]`` features, checked finite."""
        image_ids = np.asarray(image_ids, dtype=np.int64)
        out = np.empty((image_ids.size, self.regions, self.dim), dtype=np.float32)
        which = np.searchsorted(self._starts, image_ids, side="right") - 1
        rows = (image_ids - self._starts[which]) * self._steps[which]
        for k in np.unique(which).tolist():
            at = np.flatnonzero(which == k)
            source, fd = self._open(self.blocks[k])
            read_rows(source, rows[at], fd, out, at)
        bad = np.flatnonzero(~np.isfinite(out.reshape(len(out), -1)).all(axis=1))
        if bad.size:  # the first bad row, named by its file and its row there
            check_finite(out[bad[:1]], self.blocks[which[bad[0]]].path, rows[bad[:1]])
        return out

    def check(self, progress: Callable[[str], None] | None = None) -> None:
        """The full check (``hrem-ray check-data``): every shard's checksum, or every row of
        a precomp file finite."""
        if self._sharded is not None:
            _verify_shards(self._sharded, progress)
        else:
            scan_finite(self._precomp.features, self._precomp.ims_path, progress)

    def precomp(self) -> PrecompSplit:
        """A memory-mappable split for evaluation: the precomp split itself, or the shards
        written once into this node's cache as a precomp folder (small splits: dev, test)."""
        if self._precomp is not None:
            return self._precomp
        sharded = self._sharded
        root = storage.cache_root() / "splits" / manifest_key(sharded)[:32]
        ims, _ = split_paths(root, sharded.dataset, sharded.split)
        if not ims.exists():
            chunks = ((self.captions[b.first_image * CAPTIONS_PER_IMAGE :
                                     (b.first_image + b.images) * CAPTIONS_PER_IMAGE],
                       self.gather(np.arange(b.first_image, b.first_image + b.images)))
                      for b in self.blocks)  # fmt: skip
            shape = (self.n_images, self.regions, self.dim)
            write_split(root, sharded.dataset, sharded.split, chunks, shape, dtype=sharded.dtype)
        return open_split(root, sharded.dataset, sharded.split)

    def local_path(self, block: Block) -> str:
        """The block as a checked local file: fetched into the node cache, or checked in place."""
        if block.sha256 is None:
            return block.path
        if self._cache is None:
            return str(verified_local(block.path, block.bytes, block.sha256))
        return str(self._cache.local(block.path, block.bytes, block.sha256))

    @property
    def bytes_fetched(self) -> int:
        """Bytes this process downloaded into the node cache."""
        return 0 if self._cache is None else self._cache.bytes_fetched

    def _open(self, block: Block) -> tuple[NpyRows, int]:
        """The block's header and an open file descriptor, kept for the next batches: a file
        evicted from the node cache meanwhile stays readable while open."""
        if block.path in self._files:
            self._files.move_to_end(block.path)
            rows, f = self._files[block.path]
            return rows, f.fileno()
        for attempt in (1, 2, 3):  # another process may evict it between fetch and open
            path = self.local_path(block)
            try:
                f = open(path, "rb", buffering=0)  # noqa: SIM115 - kept open, closed on eviction
                break
            except FileNotFoundError:
                if attempt == 3:
                    raise ShardError(f"{block.path}: evicted from the node cache as it was "
                                     "opened: raise data.cache_limit") from None  # fmt: skip
        try:
            rows = NpyRows.read(f, block.path)
        except PrecompError as e:
            f.close()
            raise ShardError(str(e)) from None
        want = (block.images * block.step, self.regions, self.dim)
        if rows.shape != want:
            f.close()
            raise ShardError(f"{block.path}: holds {list(rows.shape)}, expected {list(want)}")
        self._files[block.path] = (rows, f)
        while len(self._files) > min(2 * self.window + 2, _OPEN_FILES):
            self._files.popitem(last=False)[1][1].close()
        return rows, f.fileno()

    def _prefetcher(self, mine: np.ndarray, *, seed: int, epoch: int) -> Callable[[int], None]:
        """Start fetching the first windows' blocks; the returned callback, called at every
        step, queues the window after the one the step enters (after the last window: the
        next epoch's first), so the cache never waits on a window it could have fetched."""
        if all(b.sha256 is None for b in self.blocks):
            return lambda step: None
        rows = [b.images for b in self.blocks]
        wins = plans.windows(rows, self.window, seed=seed, epoch=epoch)
        following = plans.windows(rows, self.window, seed=seed, epoch=epoch + 1)[0]
        window_of = np.empty(len(self.blocks), dtype=np.int64)
        for w, blocks in enumerate(wins):
            window_of[blocks] = w
        which = np.searchsorted(self._starts, mine // CAPTIONS_PER_IMAGE, side="right") - 1
        entered = window_of[which].max(axis=1) if len(mine) else np.zeros(0, np.int64)
        first_use = list(dict.fromkeys(which.ravel().tolist()))  # blocks in order of use
        order = {b: i for i, b in enumerate(first_use)}

        def queue_window(w: int) -> None:
            blocks = wins[w] if w < len(wins) else following
            for k in sorted(blocks.tolist(), key=lambda k: order.get(k, len(order))):
                self._fetch_pool().submit(self.local_path, self.blocks[k])

        queue_window(0)
        queued = {0}

        def on_step(step: int) -> None:
            w = int(entered[step]) + 1
            if w not in queued:
                queued.add(w)
                queue_window(w)

        return on_step

    def _fetch_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(FETCHERS, thread_name_prefix="hrem-fetch")
        return self._pool


def open_source(
    data_path: str | Path, dataset: str, split: str, cache_limit: str | int = "auto"
) -> TrainingSource:
    """The split under ``data_path``: its precomp files when local and present, else its shards
    (always for a URI). Only headers, sizes and captions are read here; a problem is a
    one-line ``PrecompError``/``ShardError`` naming the file."""
    if not storage.is_remote(data_path):
        ims, caps = split_paths(data_path, dataset, split)
        if ims.exists() or not Path(split_dir(data_path, dataset, split)).is_dir():
            s = open_split(data_path, dataset, split)
            block = Block(
                str(s.ims_path), 0, s.n_images, CAPTIONS_PER_IMAGE if s.per_caption else 1
            )
            return TrainingSource([block], s.captions, name=f"{dataset} {split}",
                                  where=f"precomp {s.ims_path} (memory map)",
                                  caps_path=str(s.caps_path), regions=s.features.shape[1],
                                  dim=s.features.shape[2], precomp=s)  # fmt: skip
    sharded = open_sharded(data_path, dataset, split)
    blocks = [Block(sharded.path(s), s.first_image, s.rows, 1, s.bytes, s.sha256)
              for s in sharded.shards]  # fmt: skip
    cache = None
    where = f"{len(blocks)} shards in {sharded.root}"
    if storage.is_remote(sharded.root):
        cache = NodeCache(manifest_key(sharded)[:32], parse_size(cache_limit))
        where += " (node cache)"
    return TrainingSource(blocks, sharded.captions, name=f"{dataset} {split}", where=where,
                          caps_path=sharded.caps_path, regions=sharded.regions, dim=sharded.dim,
                          cache=cache, sharded=sharded)  # fmt: skip


def open_precomp(data_path: str | Path, dataset: str, split: str) -> PrecompSplit:
    """A split as evaluation reads it: memory-mapped (``TrainingSource.precomp``)."""
    return open_source(data_path, dataset, split).precomp()


def token_lookup(rows: Iterator[dict], n_captions: int) -> Tokens:
    """Caption id -> token ids, from batches of ``{"caption_id", "tokens"}`` rows (the Ray
    Data pipeline's output, read once per worker)."""
    table: list = [None] * n_captions
    for batch in rows:
        for cid, ids in zip(batch["caption_id"].tolist(), batch["tokens"], strict=True):
            table[cid] = ids.tolist()
    missing = [c for c, t in enumerate(table) if t is None]
    if missing:
        raise ShardError(f"the token pipeline gave no tokens for caption {missing[0]}")
    return lambda ids: [table[c] for c in ids.tolist()]


def encoded(captions: Sequence[str], tokenizer: CaptionTokenizer) -> Tokens:
    """Caption id -> token ids, tokenised on demand (single-process training)."""
    return lambda ids: [tokenizer.encode(captions[c]) for c in ids.tolist()]


def _ahead(items: Iterator, depth: int) -> Iterator:
    """``items``, produced by a thread up to ``depth`` ahead of the consumer; an error in the
    thread is raised in the consumer, and closing the consumer stops the thread."""
    slots: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            put((done, e))

    thread = threading.Thread(target=run, name="hrem-batches", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.1f} KB"
