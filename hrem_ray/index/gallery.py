"""A retrieval gallery: a split's images and captions encoded once, searched by top-k.

    GALLERY/
      manifest.json        checkpoint(s) it was built with, dataset, split, sizes, dtype, ivf
      image_embs.npy       [n_images, D] float32 or float16, L2-normalised
      caption_embs.npy     [n_captions, D]
      captions.parquet     caption_id, image_id, text
      image.ivf            optional (``--ivf NLIST``): FAISS IVFFlat over image_embs
      caption.ivf          optional: the same over caption_embs

Embeddings (and IVF inverted lists) are memory-mapped when opened, so replicas on one node
share the page cache instead of each holding a copy. Search is exact unless the gallery was
built with IVF indexes, which trade a measured recall (``manifest["ivf"]``) for speed.
A gallery may live at a URI (``s3://...``): it is written with a completeness marker and
opened from this node's cache (``hrem_ray.storage``, docs/storage.md).

An ensemble gallery (several checkpoints) holds ``embed.ensemble_embedding`` vectors: one dot
product is the mean of the models' cosine similarities. Its manifest lists the models in
order (``models``: checkpoint, weights id, embedding size), so that a query is encoded by the
same models in the same order; a one-model gallery has ``checkpoint`` instead.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hrem_ray import storage
from hrem_ray.checkpoint import read_record
from hrem_ray.data.precomp import CAPTIONS_PER_IMAGE
from hrem_ray.data.source import open_precomp
from hrem_ray.embed import check_batch_size, embed_split_each, ensemble_embedding, model_id
from hrem_ray.errors import one_line
from hrem_ray.index.ivf import (
    DEFAULT_NPROBE,
    RECALL_K,
    IvfIndex,
    check_ivf,
    import_faiss,
    recall_at_k,
    recall_sample,
)

MANIFEST = "manifest.json"
IMAGE_EMBS = "image_embs.npy"
CAPTION_EMBS = "caption_embs.npy"
CAPTIONS = "captions.parquet"
IMAGE_IVF = "image.ivf"
CAPTION_IVF = "caption.ivf"
FORMAT = "hrem-ray-gallery"


class GalleryError(ValueError):
    """A gallery folder that is missing, incomplete or inconsistent."""


def build_gallery(
    checkpoint: str | Path | Sequence[str | Path],
    data_path: str | Path,
    dataset: str,
    split: str,
    out: str | Path,
    *,
    dtype: str = "float32",
    batch_size: int = 128,
    device: str = "cpu",
    ivf: int = 0,
    nprobe: int = DEFAULT_NPROBE,
    progress: Callable[[str], None] | None = None,
) -> Path | str:
    """Encode every image and caption of a precomp split with a checkpoint, or with several
    (an ensemble gallery, ``ensemble_embedding`` of theirs in this order); write ``out`` (a
    folder or a URI).

    ``ivf`` > 0 also trains IVF indexes with that many lists (see ``write_gallery``).
    """
    checkpoints = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    if not checkpoints:
        raise ValueError("no checkpoint to build the gallery with")
    check_batch_size(batch_size)  # before minutes of loading, not as a range() error
    storage.check_access(out)
    data = open_precomp(data_path, dataset, split)
    _check_options(dtype, ivf, nprobe, data.n_images)  # before minutes of encoding
    for path in checkpoints:  # every one, before the first is encoded
        read_record(path)
    image_parts, caption_parts, models = [], [], []
    embedded = embed_split_each(checkpoints, data, batch_size=batch_size, device=device,
                                progress=progress)  # fmt: skip
    for path, (ck, imgs, caps) in zip(checkpoints, embedded, strict=True):
        image_parts.append(imgs)
        caption_parts.append(caps)
        models.append({"checkpoint": storage.absolute(path), "dim": int(imgs.shape[1]),
                       "checkpoint_meta": ck.meta})  # fmt: skip
        if len(checkpoints) > 1:  # what a server checks it is given, in this order
            models[-1]["model_id"] = model_id(ck.model)
        del ck
    if len(models) == 1:
        meta = {"checkpoint": models[0]["checkpoint"],
                "checkpoint_meta": models[0]["checkpoint_meta"]}  # fmt: skip
    else:
        meta = {"models": models}
    meta.update({"dataset": dataset, "split": split})
    return write_gallery(out, ensemble_embedding(image_parts), ensemble_embedding(caption_parts),
                         data.captions, meta, dtype=dtype, ivf=ivf, nprobe=nprobe,
                         progress=progress)  # fmt: skip


def write_gallery(
    out: str | Path,
    image_embs: np.ndarray,
    caption_embs: np.ndarray,
    texts: list[str],
    meta: dict[str, Any],
    *,
    dtype: str = "float32",
    ivf: int = 0,
    nprobe: int = DEFAULT_NPROBE,
    progress: Callable[[str], None] | None = None,
) -> Path | str:
    """Write a gallery folder (or URI) atomically from L2-normalised embeddings (caption i of
    image i//5).

    With ``ivf`` = NLIST > 0, one IVFFlat index per side is trained on the stored (``dtype``)
    vectors (as float32 copies), so that ``nprobe`` = NLIST reproduces exact search; its
    recall@10 against exact search, on up to ``RECALL_QUERIES`` queries per side, goes in the
    manifest and through ``progress``.
    """
    nprobe = _check_options(dtype, ivf, nprobe, len(image_embs))
    imgs, caps = image_embs.astype(dtype), caption_embs.astype(dtype)
    caption_ids = np.arange(len(caps), dtype=np.int64)
    table = pa.table(
        {"caption_id": caption_ids, "image_id": caption_ids // CAPTIONS_PER_IMAGE, "text": texts}
    )
    manifest: dict[str, Any] = {
        "format": FORMAT,
        **meta,
        "n_images": len(imgs),
        "n_captions": len(caps),
        "dim": int(imgs.shape[1]),
        "dtype": dtype,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    indexes: dict[str, IvfIndex] = {}
    if ivf:
        indexes = {IMAGE_IVF: IvfIndex.train(imgs, ivf, nprobe),
                   CAPTION_IVF: IvfIndex.train(caps, ivf, nprobe)}  # fmt: skip
        manifest["ivf"] = {
            "nlist": ivf,
            "nprobe": nprobe,
            # text -> image: captions query the image index, and the other way round
            "recall_at_10_images": ivf_recall(caps, imgs, indexes[IMAGE_IVF]),
            "recall_at_10_captions": ivf_recall(imgs, caps, indexes[CAPTION_IVF]),
        }
        if progress:
            r = manifest["ivf"]
            progress(
                f"IVF nlist={ivf} nprobe={nprobe}: recall@{RECALL_K} vs exact search "
                f"{r['recall_at_10_images']:.3f} text->image, "
                f"{r['recall_at_10_captions']:.3f} image->text"
            )

    def fill(tmp: Path) -> None:
        np.save(tmp / IMAGE_EMBS, imgs)
        np.save(tmp / CAPTION_EMBS, caps)
        pq.write_table(table, tmp / CAPTIONS)
        for name, index in indexes.items():
            index.write(tmp / name)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))

    return storage.write_dir(out, fill)


def _check_options(dtype: str, ivf: int, nprobe: int, n_images: int) -> int:
    """Refuse bad settings (and IVF without faiss) up front; return the nprobe to use."""
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    if ivf == 0:
        return nprobe
    nprobe = check_ivf(ivf, nprobe, n_images)
    import_faiss()
    return nprobe


def ivf_recall(queries: np.ndarray, embs: np.ndarray, ivf: IvfIndex) -> float:
    """recall@10 of ``search`` through ``ivf`` against exact search, on sampled query rows."""
    q = np.asarray(queries[recall_sample(len(queries))], np.float32)
    approx, _ = search(q, embs, ivf, RECALL_K)
    exact, _ = search(q, embs, None, RECALL_K)
    return recall_at_k(approx, exact)


def check_k(k: int, most: int | None = None) -> int:
    """``k`` of a top-k search: a positive integer, at most ``most`` when given."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if most is not None and k > most:
        raise ValueError(f"k must be at most {most}, got {k!r}")
    return int(k)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the k largest scores per row, best first (exact)."""
    k = min(check_k(k), scores.shape[-1])
    part = np.argpartition(-scores, k - 1, axis=-1)[..., :k]
    vals = np.take_along_axis(scores, part, axis=-1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    return np.take_along_axis(part, order, axis=-1), np.take_along_axis(vals, order, axis=-1)


def search(
    queries: np.ndarray, embs: np.ndarray, ivf: IvfIndex | None, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows of ``embs`` per query, best first: through ``ivf`` when given, else exact.

    A query whose probed lists hold fewer than k vectors is answered exactly instead, so
    the IVF path keeps the exact path's contract: min(k, len(embs)) real ids per query.
    """
    if ivf is None:
        return top_k(scores(queries, embs), k)
    k = min(check_k(k), len(embs))
    q = np.asarray(queries, np.float32)
    flat = q.reshape(-1, q.shape[-1])
    ids, vals = ivf.search(flat, k)
    short = (ids < 0).any(axis=1)
    if short.any():
        ids[short], vals[short] = top_k(scores(flat[short], embs), k)
    return ids.reshape(*q.shape[:-1], k), vals.reshape(*q.shape[:-1], k)


@dataclass
class Gallery:
    path: Path
    manifest: dict[str, Any]
    image_embs: np.ndarray  # memory-mapped
    caption_embs: np.ndarray  # memory-mapped
    captions: list[str]
    image_ivf: IvfIndex | None = None  # set when built with --ivf: searched instead of exact
    caption_ivf: IvfIndex | None = None

    @classmethod
    def open(cls, path: str | Path) -> Gallery:
        """Open a gallery folder or URI; ``Gallery.path`` is the local (cached) folder."""
        shown, path = str(path), storage.fetch_dir(path, "gallery")
        _require(path, shown, (MANIFEST, IMAGE_EMBS, CAPTION_EMBS, CAPTIONS))
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (ValueError, OSError) as e:  # UnicodeDecodeError and JSONDecodeError included
            raise GalleryError(f"gallery {shown}: unreadable {MANIFEST} ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise GalleryError(f"{shown} is not an {FORMAT}")
        if "ivf" in manifest:
            _require(path, shown, (IMAGE_IVF, CAPTION_IVF))
        try:  # a truncated or foreign .npy / parquet file fails here, not in a query
            imgs = np.load(path / IMAGE_EMBS, mmap_mode="r", allow_pickle=False)
            caps = np.load(path / CAPTION_EMBS, mmap_mode="r", allow_pickle=False)
            texts = pq.read_table(path / CAPTIONS, columns=["text"])["text"].to_pylist()
        except (ValueError, OSError, KeyError, pa.ArrowException) as e:
            raise GalleryError(f"gallery {shown}: unreadable files ({one_line(e)})") from None
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
                f"gallery {shown}: files disagree with its manifest (images {imgs.shape} "
                f"{imgs.dtype}, captions {caps.shape} {caps.dtype}, {len(texts)} texts; "
                f"manifest {claimed}): rebuild it with hrem-ray index"
            )
        if "models" in manifest and not _valid_models(manifest["models"], imgs.shape[1]):
            raise GalleryError(
                f"gallery {shown}: the models of its manifest do not make its {imgs.shape[1]}-d "
                "embeddings (a list of 2 or more, each with a model_id and a dim adding up to "
                "it): rebuild it with hrem-ray index"
            )
        if "ivf" not in manifest:
            return cls(path, manifest, imgs, caps, texts)
        ivfs = _open_ivf(path, shown, manifest["ivf"], imgs, caps)
        return cls(path, manifest, imgs, caps, texts, *ivfs)

    @property
    def n_images(self) -> int:
        return int(self.image_embs.shape[0])

    @property
    def n_captions(self) -> int:
        return int(self.caption_embs.shape[0])

    @property
    def model_ids(self) -> list[str] | None:
        """The weights ids (``embed.model_id``) of the models of an ensemble gallery, in the
        order its embeddings concatenate them; None for a gallery of one model."""
        models = self.manifest.get("models")
        return None if models is None else [m["model_id"] for m in models]

    def captions_of(self, image_id: int) -> list[str]:
        start = image_id * CAPTIONS_PER_IMAGE
        return self.captions[start : start + CAPTIONS_PER_IMAGE]

    def search_images(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k image ids and scores for each caption embedding (rows of ``queries``)."""
        return search(queries, self.image_embs, self.image_ivf, k)

    def search_captions(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k caption ids and scores for each image embedding."""
        return search(queries, self.caption_embs, self.caption_ivf, k)


def _valid_models(models: Any, dim: int) -> bool:
    """``manifest["models"]`` of an ensemble gallery: 2+ models whose sizes add up to ``dim``."""
    return (
        isinstance(models, list)
        and len(models) >= 2
        and all(
            isinstance(m, dict)
            and isinstance(m.get("model_id"), str)
            and isinstance(m.get("dim"), int)
            and not isinstance(m.get("dim"), bool)
            and m["dim"] >= 1
            for m in models
        )
        and sum(m["dim"] for m in models) == dim
    )


def _require(path: Path, shown: str, names: tuple[str, ...]) -> None:
    for name in names:
        if not (path / name).is_file():
            raise GalleryError(f"gallery {shown} is incomplete: missing {name}")


def _open_ivf(
    path: Path, shown: str, ivf: Any, imgs: np.ndarray, caps: np.ndarray
) -> tuple[IvfIndex, IvfIndex]:
    """The two IVF indexes, checked against the embeddings and ``manifest["ivf"]``."""
    try:  # ValueError: faiss missing or a bad nlist/nprobe; RuntimeError: faiss's own errors
        nprobe = check_ivf(ivf["nlist"], ivf["nprobe"], len(imgs))
        indexes = [IvfIndex.read(path / name, nprobe) for name in (IMAGE_IVF, CAPTION_IVF)]
        found = [(x.index.ntotal, x.index.d, x.index.nlist) for x in indexes]
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise GalleryError(f"gallery {shown}: unusable IVF index ({one_line(e)})") from None
    want = [(len(embs), embs.shape[1], ivf["nlist"]) for embs in (imgs, caps)]
    if found != want:
        raise GalleryError(
            f"gallery {shown}: IVF indexes (size, dim, nlist) {found} disagree with its "
            f"embeddings and manifest {want}: rebuild it with hrem-ray index"
        )
    return indexes[0], indexes[1]


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
