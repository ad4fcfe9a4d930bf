"""``hrem-ray index`` as Ray Data batch inference: an actor pool of model replicas encodes a
split's images and captions, and the driver writes the gallery through ``write_gallery``.

Each row of the dataset is one *encode batch* of the single-process build (images or
captions ``start .. stop - 1``, the same ``batch_size`` boundaries as ``embed.embed_split``),
and an actor encodes it as one batch through ``embed.py``. Float results depend on batch
shapes and caption padding, so equal batches make the gallery byte-identical to the
single-process one. Ray Data does not keep order: every output row carries its side and id,
and the driver places rows by id. A block whose actor task raises is retried
(``DataContext.actor_task_retry_on_errors``), not the whole build; a dead actor restarts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hrem_ray import storage
from hrem_ray.checkpoint import read_record
from hrem_ray.data.precomp import split_paths
from hrem_ray.data.source import open_source
from hrem_ray.embed import check_batch_size, embed_captions, embed_features
from hrem_ray.progress import Progress

IMAGES, CAPTIONS = 0, 1  # the ``side`` column
FAIL_ONCE_ENV = "HREM_INDEX_FAIL_ONCE"  # "MARKER:START": fail image batch START's first try
ACTOR_CPUS = 0.5  # a pool of 1-CPU actors deadlocks Ray Data on 2 cores (ray-notes)


def wants_ray(data_path: str | Path, dataset: str, split: str, num_workers: int | None) -> bool:
    """Whether ``hrem-ray index`` encodes on Ray: asked to (``--num-workers``), or the split
    is sharded (a URI, or no precomp file; ``open_source`` reads the same way)."""
    if num_workers is not None:
        if num_workers < 1:  # before Ray starts
            raise ValueError(f"--num-workers must be at least 1, got {num_workers}")
        return True
    return storage.is_remote(data_path) or not split_paths(data_path, dataset, split)[0].exists()


def batch_rows(n_images: int, n_captions: int, batch_size: int) -> list[dict[str, int]]:
    """The single-process build's encode batches, one row each: ``side, start, stop``."""
    rows = []
    for side, n in ((IMAGES, n_images), (CAPTIONS, n_captions)):
        rows += [{"side": side, "start": s, "stop": min(s + batch_size, n)}
                 for s in range(0, n, batch_size)]  # fmt: skip
    return rows


class BatchEncoder:
    """One model replica (a Ray Data actor): encodes the batches it is given, as given."""

    def __init__(
        self, checkpoint: str, data_path: str, dataset: str, split: str, device: str, bf16: bool
    ):
        from hrem_ray.checkpoint import load_checkpoint

        self.ck = load_checkpoint(checkpoint, device=device)
        self.tokenizer = self.ck.tokenizer()
        self.source = open_source(data_path, dataset, split)
        self.encode = {"device": device, "bf16": bf16}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sides, ids, embs = [], [], []
        for side, start, stop in zip(batch["side"], batch["start"], batch["stop"], strict=True):
            _maybe_fail(int(side), int(start))
            rows = np.arange(start, stop, dtype=np.int64)
            if side == IMAGES:
                emb = embed_features(self.ck.model, self.source.gather(rows),
                                     batch_size=len(rows), **self.encode)  # fmt: skip
            else:
                texts = [self.source.captions[i] for i in rows.tolist()]
                emb = embed_captions(self.ck.model, self.tokenizer, texts,
                                     batch_size=len(rows), **self.encode)  # fmt: skip
            sides.append(np.full(len(rows), side, dtype=np.int8))
            ids.append(rows)
            embs.append(emb)
        return {"side": np.concatenate(sides), "id": np.concatenate(ids),
                "emb": np.concatenate(embs)}  # fmt: skip


def _maybe_fail(side: int, start: int) -> None:
    """The fault-injection hook of the retry test: fail once, recorded by a marker file."""
    spec = os.environ.get(FAIL_ONCE_ENV)
    if not spec or side != IMAGES:
        return
    marker, _, at = spec.rpartition(":")
    if int(at) == start and not os.path.exists(marker):
        Path(marker).touch()
        raise RuntimeError(f"injected failure of image batch {start}")


def embed_split_distributed(
    checkpoint: str | Path,
    data_path: str | Path,
    dataset: str,
    split: str,
    *,
    num_workers: int | None = None,
    num_gpus: float = 0.0,
    batch_size: int = 128,
    bf16: bool = False,
    progress: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Image and caption embeddings of a split (id order) and its captions, encoded by an
    actor pool of ``num_workers`` replicas (default: one per CPU) on the running Ray cluster
    (``bf16``: under bf16 autocast)."""
    import ray

    check_batch_size(batch_size)
    if num_workers is None:
        num_workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
    if num_workers < 1:
        raise ValueError(f"--num-workers must be at least 1, got {num_workers}")
    source = open_source(data_path, dataset, split)
    n_images, n_captions = source.n_images, source.n_captions
    ctx = ray.data.DataContext.get_current()
    ctx.actor_task_retry_on_errors = True  # one failed block is retried, not the build
    ctx.enable_progress_bars = False
    rows = batch_rows(n_images, n_captions, batch_size)
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        BatchEncoder,
        fn_constructor_args=(
            storage.absolute(checkpoint),
            storage.absolute(data_path),
            dataset,
            split,
            "cuda" if num_gpus > 0 else "cpu",
            bf16,
        ),  # fmt: skip
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        num_cpus=ACTOR_CPUS,
        num_gpus=num_gpus,
        max_restarts=2,
        max_task_retries=2,
    )
    out: dict[int, np.ndarray | None] = {IMAGES: None, CAPTIONS: None}
    seen = {IMAGES: np.zeros(n_images, np.int64), CAPTIONS: np.zeros(n_captions, np.int64)}
    bar = Progress("encode images", n_images, progress, unit="images")
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for side in (IMAGES, CAPTIONS):
            at = batch["side"] == side
            if not at.any():
                continue
            ids, emb = batch["id"][at], batch["emb"][at]
            if out[side] is None:
                out[side] = np.empty((len(seen[side]), emb.shape[1]), dtype=np.float32)
            out[side][ids] = emb
            np.add.at(seen[side], ids, 1)
            if side == IMAGES:
                bar.update(len(ids))
    for side, name in ((IMAGES, "images"), (CAPTIONS, "captions")):
        if not (seen[side] == 1).all():
            raise RuntimeError(f"distributed build: {name} not encoded exactly once")
    return out[IMAGES], out[CAPTIONS], list(source.captions)


def build_gallery_distributed(
    checkpoint: str | Path,
    data_path: str | Path,
    dataset: str,
    split: str,
    out: str | Path,
    *,
    num_workers: int | None = None,
    num_gpus: float = 0.0,
    dtype: str = "float32",
    batch_size: int = 128,
    bf16: bool = False,
    progress: Callable[[str], None] | None = None,
    **index_options: Any,
) -> Path | str:
    """``build_gallery`` of one checkpoint, encoded on Ray (``embed_split_distributed``); the
    files and manifest are written by ``write_gallery`` (``index_options``: its ``index``,
    ``nprobe``, ``ef_search``), complete or absent."""
    from hrem_ray.index.gallery import write_gallery

    storage.check_access(out)
    record = read_record(checkpoint)  # a bad checkpoint fails before Ray starts work
    imgs, caps, texts = embed_split_distributed(
        checkpoint, data_path, dataset, split, num_workers=num_workers, num_gpus=num_gpus,
        batch_size=batch_size, bf16=bf16, progress=progress,
    )  # fmt: skip
    meta = {"checkpoint": storage.absolute(checkpoint), "checkpoint_meta": record.get("meta", {}),
            "dataset": dataset, "split": split}  # fmt: skip
    return write_gallery(out, imgs, caps, texts, meta, dtype=dtype, progress=progress,
                         **index_options)  # fmt: skip
