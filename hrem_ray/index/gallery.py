"""A retrieval gallery: a split's images and captions encoded once, searched by top-k.

    GALLERY/
      manifest.json        checkpoint(s) it was built with, dataset, split, sizes, dtype, index
      image_embs.npy       [n_images, D] float32 or float16, L2-normalised
      caption_embs.npy     [n_captions, D]
      captions.parquet     caption_id, image_id, text
      image.faiss          optional (``--index SPEC`` other than Flat): FAISS index of image_embs
      caption.faiss        optional: the same kind of index of caption_embs

Embeddings (and IVF inverted lists) are memory-mapped when opened, so replicas on one node
share the page cache instead of each holding a copy. Search is exact (``Flat``) unless the
gallery was built with FAISS indexes (``hrem_ray.index.faiss_index``), which trade a recall
measured at build time, text queries against the image index and image queries against the
caption index (``manifest["index"]["recall"]``), for memory and speed.
A replica with a GPU holds an exact gallery there when it fits (``Gallery.search_on``); FAISS
indexes stay on faiss-cpu.
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
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from hrem_ray import storage
from hrem_ray.checkpoint import read_record
from hrem_ray.data.precomp import CAPTIONS_PER_IMAGE
from hrem_ray.data.source import open_precomp
from hrem_ray.devices import check_device
from hrem_ray.embed import check_batch_size, embed_split_each, ensemble_embedding, model_id
from hrem_ray.errors import one_line
from hrem_ray.index.faiss_index import (
    FLAT,
    RECALL_KS,
    REFINE,
    FaissIndex,
    IndexSpec,
    import_faiss,
    parse_spec,
    recall_at_k,
    recall_sample,
)

MANIFEST = "manifest.json"
IMAGE_EMBS = "image_embs.npy"
CAPTION_EMBS = "caption_embs.npy"
CAPTIONS = "captions.parquet"
IMAGE_INDEX = "image.faiss"
CAPTION_INDEX = "caption.faiss"
FORMAT = "hrem-ray-gallery"
# The share of a GPU's free memory that an exact gallery may take there: the rest is for the
# towers' activations and the other replicas that share the card (serve --num-gpus 0.5).
GPU_GALLERY_SHARE = 0.5
log = logging.getLogger(__name__)


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
    bf16: bool = False,
    index: str = FLAT,
    nprobe: int | None = None,
    ef_search: int | None = None,
    refine: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path | str:
    """Encode every image and caption of a precomp split with a checkpoint, or with several
    (an ensemble gallery, ``ensemble_embedding`` of theirs in this order); write ``out`` (a
    folder or a URI).

    ``index`` other than Flat also trains FAISS indexes (see ``write_gallery``). ``device``
    and ``bf16``: where and how the towers encode.
    """
    checkpoints = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    if not checkpoints:
        raise ValueError("no checkpoint to build the gallery with")
    device = check_device(device)
    check_batch_size(batch_size)  # before minutes of loading, not as a range() error
    storage.check_access(out)
    data = open_precomp(data_path, dataset, split)
    check_index_options(dtype, index, nprobe, ef_search, data.n_images, refine=refine)
    for path in checkpoints:  # every one, before the first is encoded
        read_record(path)
    image_parts, caption_parts, models = [], [], []
    embedded = embed_split_each(checkpoints, data, batch_size=batch_size, device=device,
                                bf16=bf16, progress=progress)  # fmt: skip
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
                         data.captions, meta, dtype=dtype, index=index, nprobe=nprobe,
                         ef_search=ef_search, refine=refine, progress=progress)  # fmt: skip


def write_gallery(
    out: str | Path,
    image_embs: np.ndarray,
    caption_embs: np.ndarray,
    texts: list[str],
    meta: dict[str, Any],
    *,
    dtype: str = "float32",
    index: str = FLAT,
    nprobe: int | None = None,
    ef_search: int | None = None,
    refine: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path | str:
    """Write a gallery folder (or URI) atomically from L2-normalised embeddings (caption i of
    image i//5): the one assembly step of every gallery build.

    ``index`` is a FAISS factory string (``faiss_index.SPEC_HELP``); other than Flat, one
    index per side is trained on the stored (``dtype``) vectors (as float32 copies), and its
    cross-modal recall@1/5/10 against exact search (captions query the image index, images
    the caption index, up to ``RECALL_QUERIES`` each) goes in ``manifest["index"]`` with the
    bytes per item and the training sample's size, and through ``progress``.
    """
    spec, params = check_index_options(dtype, index, nprobe, ef_search, len(image_embs),
                                       int(image_embs.shape[1]), refine=refine)  # fmt: skip
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
    info: dict[str, Any] = {"spec": spec.spec, "params": params,
                            "train_sample": {"images": 0, "captions": 0},
                            "bytes_per_item": int(imgs.shape[1] * imgs.itemsize)}  # fmt: skip
    manifest["index"] = info
    indexes: dict[str, FaissIndex] = {}
    if not spec.is_flat:
        if progress:
            progress(f"training {spec.spec} on {spec.train_size(len(imgs))} images and "
                     f"{spec.train_size(len(caps))} captions")  # fmt: skip
        indexes = {IMAGE_INDEX: FaissIndex.train(imgs, spec, params),
                   CAPTION_INDEX: FaissIndex.train(caps, spec, params)}  # fmt: skip
        info["train_sample"] = {"images": spec.train_size(len(imgs)),
                                "captions": spec.train_size(len(caps))}  # fmt: skip
        info["recall"] = {  # cross-modal: text queries the image index, and the other way round
            "text_to_image": index_recall(caps, imgs, indexes[IMAGE_INDEX]),
            "image_to_text": index_recall(imgs, caps, indexes[CAPTION_INDEX]),
        }

    def fill(tmp: Path) -> None:
        np.save(tmp / IMAGE_EMBS, imgs)
        np.save(tmp / CAPTION_EMBS, caps)
        pq.write_table(table, tmp / CAPTIONS)
        size = 0
        for name, faiss_index in indexes.items():
            faiss_index.write(tmp / name)
            size += (tmp / name).stat().st_size
        if indexes:  # both files over all items, quantisers included
            info["bytes_per_item"] = round(size / (len(imgs) + len(caps)), 1)
            if progress:
                r = info["recall"]
                progress(
                    f"index {spec.spec} {params}: {info['bytes_per_item']} bytes/item; "
                    "recall@1/5/10 vs exact search "
                    + ", ".join(
                        f"{'/'.join(f'{v:.3f}' for v in r[side].values())} {side}" for side in r
                    )  # fmt: skip
                )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))

    return storage.write_dir(out, fill)


def check_index_options(
    dtype: str,
    index: str,
    nprobe: int | None,
    ef_search: int | None,
    n_images: int,
    dim: int | None = None,
    *,
    refine: int | None = None,
) -> tuple[IndexSpec, dict[str, int]]:
    """Refuse bad settings (and FAISS without faiss) before any encoding; return the parsed
    spec and its search knobs. ``dim`` None (not known before encoding) skips the PQ check
    against the embedding size, which ``write_gallery`` then makes."""
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
    spec = parse_spec(index, n_images, dim if dim is not None else 0)
    params = spec.params(nprobe, ef_search, refine)
    if not spec.is_flat:
        import_faiss()
    return spec, params


def index_recall(queries: np.ndarray, embs: np.ndarray, index: FaissIndex) -> dict[str, float]:
    """recall@1/5/10 of ``search`` through ``index`` against exact search, on sampled query
    rows: |approx top-k ∩ exact top-k| / k."""
    q = np.asarray(queries[recall_sample(len(queries))], np.float32)
    k = max(RECALL_KS)
    approx, _ = search(q, embs, index, k)
    exact, _ = search(q, embs, None, k)
    return {str(r): recall_at_k(approx, exact, r) for r in RECALL_KS}


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
    queries: np.ndarray, embs: np.ndarray, index: FaissIndex | None, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows of ``embs`` per query, best first: through ``index`` when given, else exact.

    A query for which the index finds fewer than k vectors (too few in the probed IVF lists)
    is answered exactly instead, so every index keeps the exact path's contract:
    min(k, len(embs)) real ids per query. The index's candidates (``index.candidates(k)``:
    k, or a PQ index's ``refine``) are rescored exactly against the stored embeddings (one
    row read each), so scores are true cosines and the order theirs, whatever the index's
    codes lose (PQ); the best k are kept.
    """
    if index is None:
        return top_k(scores(queries, embs), k)
    k = min(check_k(k), len(embs))
    q = np.asarray(queries, np.float32)
    flat = q.reshape(-1, q.shape[-1])
    cand, _ = index.search(flat, min(index.candidates(k), len(embs)))
    found = (cand >= 0).sum(axis=1) >= k
    ids = np.zeros((len(flat), k), np.int64)
    vals = np.zeros((len(flat), k), np.float32)
    if found.any():
        best, best_vals = rescore(flat[found], embs, cand[found])
        ids[found], vals[found] = best[:, :k], best_vals[:, :k]
    short = ~found
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
    image_index: FaissIndex | None = None  # set when built with a FAISS --index: searched
    caption_index: FaissIndex | None = None  # instead of exact search
    # (images, captions) float32 on a device, searched there instead (``search_on``)
    device_embs: tuple[torch.Tensor, torch.Tensor] | None = None

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
        if "ivf" in manifest:  # galleries of hrem-ray before --index
            raise GalleryError(f"gallery {shown} has an old-style IVF index: rebuild it with "
                               "hrem-ray index --index IVF<nlist>,Flat")  # fmt: skip
        info = manifest.get("index", {"spec": FLAT})
        spec = info.get("spec") if isinstance(info, dict) else None
        if spec != FLAT:
            _require(path, shown, (IMAGE_INDEX, CAPTION_INDEX))
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
        if spec == FLAT:
            return cls(path, manifest, imgs, caps, texts)
        indexes = _open_indexes(path, shown, info, imgs, caps)
        return cls(path, manifest, imgs, caps, texts, *indexes)

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

    @property
    def index_info(self) -> dict[str, Any]:
        """``manifest["index"]``: spec, search knobs, bytes per item, training sample and the
        recall measured at build time (galleries built before ``--index`` are Flat)."""
        dim, itemsize = int(self.image_embs.shape[1]), self.image_embs.dtype.itemsize
        flat = {"spec": FLAT, "params": {}, "train_sample": {"images": 0, "captions": 0},
                "bytes_per_item": dim * itemsize}  # fmt: skip
        return self.manifest.get("index", flat)

    @property
    def search_params(self) -> dict[str, int]:
        """The FAISS knobs searches run with now (``{}`` for exact search)."""
        return dict(self.image_index.params) if self.image_index is not None else {}

    def set_search_params(self, **params: int) -> dict[str, int]:
        """Change the search knobs (``nprobe``, ``efSearch``, ``refine``) of both indexes in
        place, for this process; a knob the index does not take is an error. Returns the knobs
        now."""
        spec = parse_spec(self.index_info["spec"], self.n_images, int(self.image_embs.shape[1]))
        known = spec.params(None, None)
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(f"index {spec.spec} takes the search parameters {sorted(known)}, "
                             f"not {unknown}")  # fmt: skip
        now = spec.params(params.get("nprobe"), params.get("efSearch"), params.get(REFINE))
        now = {name: now[name] for name in params}
        for index in (self.image_index, self.caption_index):
            if index is not None:
                index.configured(**now)
        return self.search_params

    def search_on(self, device: torch.device | str) -> torch.device:
        """Copy an exact gallery's embeddings to ``device`` as float32 and search them there
        from now on, if they fit in ``GPU_GALLERY_SHARE`` of a GPU's free memory; returns the
        device that searches. A FAISS index stays on faiss-cpu (the CPU). A GPU replica calls
        it; on the CPU it is the same search in torch (which tests compare)."""
        device = torch.device(device)
        nbytes = 4 * int(self.image_embs.shape[1]) * (self.n_images + self.n_captions)
        if self.image_index is not None or not _fits(device, nbytes):
            return torch.device("cpu")
        self.device_embs = (_to_device(self.image_embs, device),
                            _to_device(self.caption_embs, device))  # fmt: skip
        return device

    def search_images(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k image ids and scores for each caption embedding (rows of ``queries``)."""
        if self.device_embs is not None:
            return device_search(queries, self.device_embs[0], k)
        return search(queries, self.image_embs, self.image_index, k)

    def search_captions(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k caption ids and scores for each image embedding."""
        if self.device_embs is not None:
            return device_search(queries, self.device_embs[1], k)
        return search(queries, self.caption_embs, self.caption_index, k)


def _fits(device: torch.device, nbytes: int) -> bool:
    """Whether ``nbytes`` take at most ``GPU_GALLERY_SHARE`` of ``device``'s free memory (the
    CPU: always; a larger gallery stays memory-mapped)."""
    if device.type != "cuda":
        return True
    free = torch.cuda.mem_get_info(device)[0]
    if nbytes <= GPU_GALLERY_SHARE * free:
        return True
    log.warning("gallery of %.0f MiB exceeds %.0f%% of %s's %.0f MiB free: searched on the CPU",
                nbytes / 2**20, 100 * GPU_GALLERY_SHARE, device, free / 2**20)  # fmt: skip
    return False


def _to_device(embs: np.ndarray, device: torch.device) -> torch.Tensor:
    """A float32 copy of (memory-mapped) ``embs`` on ``device``, ``SCORE_CHUNK`` rows at a
    time, so a float16 gallery is never a whole float32 copy on the host."""
    out = torch.empty(embs.shape, dtype=torch.float32, device=device)
    for i in range(0, len(embs), SCORE_CHUNK):
        out[i : i + SCORE_CHUNK] = torch.from_numpy(np.array(embs[i : i + SCORE_CHUNK]))
    return out


def device_search(queries: np.ndarray, embs: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``search``'s exact top-k against ``embs`` on their device: ids and float32 scores,
    best first, min(k, len(embs)) per query."""
    k = min(check_k(k), len(embs))
    q = np.asarray(queries, np.float32)
    flat = torch.from_numpy(np.array(q.reshape(-1, q.shape[-1]))).to(embs.device)
    vals, ids = torch.topk(flat @ embs.T, k, dim=-1)
    shape = (*q.shape[:-1], k)
    return ids.cpu().numpy().reshape(shape), vals.cpu().numpy().reshape(shape)


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


def _open_indexes(
    path: Path, shown: str, info: dict[str, Any], imgs: np.ndarray, caps: np.ndarray
) -> tuple[FaissIndex, FaissIndex]:
    """The two FAISS indexes, checked against the embeddings and ``manifest["index"]``."""
    try:  # ValueError: faiss missing or bad settings; RuntimeError: faiss's own errors
        spec = parse_spec(info["spec"], len(imgs), imgs.shape[1])
        params, saved = spec.params(None, None), info["params"]
        # a PQ gallery built before --refine saved none: the default applies
        if not set(params) - {REFINE} <= set(saved) <= set(params):
            raise ValueError(f"search parameters {sorted(saved)}, want {sorted(params)}")
        params = spec.params(saved.get("nprobe"), saved.get("efSearch"), saved.get(REFINE))
        indexes = [FaissIndex.read(path / name, params) for name in (IMAGE_INDEX, CAPTION_INDEX)]
        found = [(x.index.ntotal, x.index.d, _nlist(x.index)) for x in indexes]
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise GalleryError(f"gallery {shown}: unusable FAISS index ({one_line(e)})") from None
    want = [(len(embs), embs.shape[1], spec.nlist) for embs in (imgs, caps)]
    if found != want:
        raise GalleryError(
            f"gallery {shown}: FAISS indexes (size, dim, nlist) {found} disagree with its "
            f"embeddings and manifest {want}: rebuild it with hrem-ray index"
        )
    return indexes[0], indexes[1]


def _nlist(index: Any) -> int:
    """The IVF lists of an index (behind OPQ too), 0 for one without."""
    faiss = import_faiss()
    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:  # not an IVF index
        return 0


def rescore(
    queries: np.ndarray, embs: np.ndarray, ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """[n, c] candidate ``ids`` per query, ordered by their exact scores, and those scores;
    the index's -1 (no candidate) sorts last, at -inf."""
    real = ids >= 0
    rows = np.asarray(embs[np.where(real, ids, 0).ravel()], np.float32).reshape(*ids.shape, -1)
    vals = np.where(real, np.einsum("nd,nkd->nk", queries, rows), -np.inf)
    order = np.argsort(-vals, axis=-1, kind="stable")
    return np.take_along_axis(ids, order, -1), np.take_along_axis(vals, order, -1)


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
