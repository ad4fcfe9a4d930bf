"""A retrieval gallery: a split's images and captions encoded once, searched by exact top-k.

    GALLERY/
      manifest.json        checkpoint it was built with, dataset, split, sizes, dtype
      image_embs.npy       [n_images, D] float32 or float16, L2-normalised
      caption_embs.npy     [n_captions, D]
      captions.parquet     caption_id, image_id, text

Embeddings are memory-mapped when opened, so replicas on one node share the page cache
instead of each holding a copy.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hrem_ray.checkpoint import load_checkpoint
from hrem_ray.data.batches import caption_batches, image_batches
from hrem_ray.data.precomp import CAPTIONS_PER_IMAGE, open_split
from hrem_ray.data.tokenize import CaptionTokenizer
from hrem_ray.eval.encode import check_batch_size, encode
from hrem_ray.fileio import write_dir_atomic

MANIFEST = "manifest.json"
IMAGE_EMBS = "image_embs.npy"
CAPTION_EMBS = "caption_embs.npy"
CAPTIONS = "captions.parquet"
FORMAT = "hrem-ray-gallery"


class GalleryError(ValueError):
    """A gallery folder that is missing, incomplete or inconsistent."""


def build_gallery(
    checkpoint: str | Path,
    data_path: str | Path,
    dataset: str,
    split: str,
    out: str | Path,
    *,
    dtype: str = "float32",
    batch_size: int = 128,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Encode every image and caption of a precomp split with a checkpoint; write ``out``."""
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    check_batch_size(batch_size)  # before minutes of loading, not as a range() error
    data = open_split(data_path, dataset, split, progress=progress)
    ck = load_checkpoint(checkpoint, device=device)
    tokenizer = CaptionTokenizer.from_dir(ck.backbone_dir, max_tokens=ck.config.data.max_tokens)
    kw = dict(device=device, progress=progress)
    imgs = encode(ck.model.embed_images, image_batches(data, batch_size), data.n_images,
                  desc="gallery images", **kw)  # fmt: skip
    caps = encode(ck.model.embed_texts, caption_batches(data, tokenizer, batch_size),
                  data.n_captions, desc="gallery captions", **kw)  # fmt: skip
    caption_ids = np.arange(data.n_captions, dtype=np.int64)
    table = pa.table(
        {
            "caption_id": caption_ids,
            "image_id": caption_ids // CAPTIONS_PER_IMAGE,
            "text": data.captions,
        }
    )
    manifest = {
        "format": FORMAT,
        "checkpoint": str(Path(checkpoint).resolve()),
        "checkpoint_meta": ck.meta,
        "dataset": dataset,
        "split": split,
        "n_images": data.n_images,
        "n_captions": data.n_captions,
        "dim": int(imgs.shape[1]),
        "dtype": dtype,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }

    def fill(tmp: Path) -> None:
        np.save(tmp / IMAGE_EMBS, imgs.astype(dtype))
        np.save(tmp / CAPTION_EMBS, caps.astype(dtype))
        pq.write_table(table, tmp / CAPTIONS)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))

    return write_dir_atomic(out, fill)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the k largest scores per row, best first (exact)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = min(int(k), scores.shape[-1])
    part = np.argpartition(-scores, k - 1, axis=-1)[..., :k]
    vals = np.take_along_axis(scores, part, axis=-1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    return np.take_along_axis(part, order, axis=-1), np.take_along_axis(vals, order, axis=-1)


@dataclass
class Gallery:
    path: Path
    manifest: dict[str, Any]
    image_embs: np.ndarray  # memory-mapped
    caption_embs: np.ndarray  # memory-mapped
    captions: list[str]

    @classmethod
    def open(cls, path: str | Path) -> Gallery:
        path = Path(path)
        for name in (MANIFEST, IMAGE_EMBS, CAPTION_EMBS, CAPTIONS):
            if not (path / name).is_file():
                raise GalleryError(f"gallery {path} is incomplete: missing {name}")
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (ValueError, OSError) as e:  # UnicodeDecodeError and JSONDecodeError included
            raise GalleryError(f"gallery {path}: unreadable {MANIFEST} ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise GalleryError(f"{path} is not an {FORMAT}")
        try:  # a truncated or foreign .npy / parquet file fails here, not in a query
            imgs = np.load(path / IMAGE_EMBS, mmap_mode="r", allow_pickle=False)
            caps = np.load(path / CAPTION_EMBS, mmap_mode="r", allow_pickle=False)
            texts = pq.read_table(path / CAPTIONS, columns=["text"])["text"].to_pylist()
        except (ValueError, OSError, KeyError, pa.ArrowException) as e:
            raise GalleryError(f"gallery {path}: unreadable files ({_one_line(e)})") from None
        expected = {
            "n_images": imgs.shape[0] if imgs.ndim == 2 else None,
            "n_captions": caps.shape[0] if caps.ndim == 2 else None,
            "dim": imgs.shape[1] if imgs.ndim == 2 else None,
            "dtype": str(imgs.dtype),
        }
        if (
            imgs.ndim != 2
            or caps.ndim != 2
            or any(manifest.get(key) != value for key, value in expected.items())
            or caps.shape[1:] != imgs.shape[1:]
            or caps.dtype != imgs.dtype
            or len(texts) != len(caps)
            or len(caps) != CAPTIONS_PER_IMAGE * len(imgs)
        ):
            claimed = {key: manifest.get(key) for key in expected}
            raise GalleryError(
                f"gallery {path}: files disagree with its manifest (images {imgs.shape} "
                f"{imgs.dtype}, captions {caps.shape} {caps.dtype}, {len(texts)} texts; "
                f"manifest {claimed}): rebuild it with hrem-ray index"
            )
        return cls(path, manifest, imgs, caps, texts)

    @property
    def n_images(self) -> int:
        return int(self.image_embs.shape[0])

    @property
    def n_captions(self) -> int:
        return int(self.caption_embs.shape[0])

    def captions_of(self, image_id: int) -> list[str]:
        start = image_id * CAPTIONS_PER_IMAGE
        return self.captions[start : start + CAPTIONS_PER_IMAGE]

    def search_images(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k image ids and scores for each caption embedding (rows of ``queries``)."""
        return top_k(scores(queries, self.image_embs), k)

    def search_captions(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k caption ids and scores for each image embedding."""
        return top_k(scores(queries, self.caption_embs), k)


SCORE_CHUNK = 1 << 16  # gallery rows converted to float32 at a time (float16 galleries)


def scores(queries: np.ndarray, embs: np.ndarray) -> np.ndarray:
    """queries @ embs.T in float32, reading a float16 gallery a chunk at a time."""
    q = np.asarray(queries, dtype=np.float32)
    if embs.dtype == np.float32:
        return q @ embs.T
    return np.concatenate(
        [q @ np.asarray(embs[i : i + SCORE_CHUNK], np.float32).T
         for i in range(0, len(embs), SCORE_CHUNK)],
        axis=1,
    )  # fmt: skip


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
