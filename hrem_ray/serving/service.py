"""Retrieval over a gallery with a trained model (or an ensemble of them): every operation of
the service, once.

``RetrievalService`` holds the operations (search by text, image id or features; embed;
status) as async methods; the HTTP layer (``api.py``) only parses requests and forwards them
by name, and the Ray Serve deployment (``app.py``) is this class plus ``@serve.batch`` on
``embed_query``. Every input is validated here, so a bad request becomes a ``RequestError``
(an HTTP 4xx) and never reaches the model; docs/serving.md lists the limits.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hrem_ray.checkpoint import load_checkpoint, read_record
from hrem_ray.data.precomp import CAPTIONS_PER_IMAGE
from hrem_ray.data.tokenize import CaptionTokenizer
from hrem_ray.devices import check_device
from hrem_ray.embed import (
    embed_captions,
    embed_features,
    ensemble_embedding,
    model_id,
    served_model_id,
)
from hrem_ray.errors import one_line
from hrem_ray.index.faiss_index import import_faiss
from hrem_ray.index.gallery import Gallery, check_k
from hrem_ray.registry import Registered, describe, resolve_checkpoints

log = logging.getLogger(__name__)
MAX_QUERY_CHARS = 1000
# A text request may carry a list of queries instead of one, answered in the same order: one
# request's cost for many. Each query still travels the single-query path (``embed_queries``).
MAX_QUERIES = 64
QUERIES_MESSAGE = f"query must be a string or a list of 1 to {MAX_QUERIES} strings"
MAX_K = 100
MAX_REGIONS = 100
# Region features are post-ReLU detector outputs (tens at most); far larger values overflow
# float32 inside the model. The bound is part of the request schema, so the schema and the
# service refuse the same inputs.
MAX_FEATURE_ABS = 1e6
# Python's str.isspace() characters, spelled for a JSON Schema / Python regex character
# class: a query must hold at least one character outside it.
SPACE_CLASS = (
    "\\t-\\r\\x1c-\\x20\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
)


class RequestError(ValueError):
    """A request the service refuses; ``status`` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass
class Hit:
    id: int
    score: float
    captions: list[str] | None = None
    caption: str | None = None
    image_id: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class Reply:
    """An operation's JSON body (a list for a list of queries), plus the size of the model
    batch each of its text queries was embedded in (for the ``hrem_text_batch_size``
    histogram; empty for operations that embed no text)."""

    body: dict[str, Any] | list[dict[str, Any]]
    batches: list[int] = field(default_factory=list)


@dataclass
class Member:
    """One checkpoint's towers: the served model, or one model of an ensemble."""

    checkpoint: str
    device: str
    bf16: bool = False
    model: Any = field(init=False)
    tokenizer: CaptionTokenizer = field(init=False)
    img_dim: int = field(init=False)
    embed_dim: int = field(init=False)
    model_id: str = field(init=False)

    def __post_init__(self) -> None:
        ck = load_checkpoint(self.checkpoint, device=self.device)
        self.model = ck.model
        self.tokenizer = ck.tokenizer()
        self.img_dim = ck.config.model.img_dim
        self.embed_dim = ck.config.model.embed_size
        self.model_id = model_id(ck.model)

    def embed_texts(self, queries: list[str]) -> np.ndarray:
        return embed_captions(self.model, self.tokenizer, queries, batch_size=len(queries),
                              device=self.device, bf16=self.bf16)  # fmt: skip

    def embed_image(self, features: np.ndarray) -> np.ndarray:
        emb = embed_features(self.model, features[None], batch_size=1, device=self.device,
                             bf16=self.bf16)[0]  # fmt: skip
        # Inputs within MAX_FEATURE_ABS keep the model finite; this guards the L2
        # normalisation against overflow all the same (a zero "unit" vector).
        if not np.isfinite(emb).all() or abs(np.linalg.norm(emb.astype(np.float64)) - 1) > 1e-3:
            raise RequestError("features too large: the model's output is not a unit vector")
        return emb


@dataclass
class Model:
    """The checkpoint(s) and the gallery, swapped as a unit: a query embedded by these models
    searches their gallery. Several checkpoints are an ensemble: a query's embedding is
    ``ensemble_embedding`` of theirs, in the order the gallery was built with. On a GPU the
    towers run there, and an exact gallery is searched there when it fits (``search_on``)."""

    checkpoints: tuple[str, ...]
    gallery_ref: str
    device: str
    registered: tuple[Registered, ...] = ()  # the registry versions the checkpoints came from
    bf16: bool = False  # the towers under bf16 autocast
    members: list[Member] = field(init=False)
    gallery: Gallery = field(init=False)
    img_dim: int = field(init=False)
    model_id: str = field(init=False)
    gallery_id: str = field(init=False)

    def __post_init__(self) -> None:
        self.checkpoints = checkpoint_list(self.checkpoints)
        self.gallery = Gallery.open(self.gallery_ref)
        check_models(self.gallery, self.gallery_ref, self.checkpoints)  # before loading any
        self.members = [Member(c, self.device, self.bf16) for c in self.checkpoints]
        ids = [m.model_id for m in self.members]
        check_models(self.gallery, self.gallery_ref, self.checkpoints, ids)
        if self.gallery.image_index is not None:
            import_faiss().omp_set_num_threads(1)  # one core per replica, as torch
        elif torch.device(self.device).type != "cpu":  # the CPU keeps the shared memory map
            log.info("exact gallery searched on %s", self.gallery.search_on(self.device))
        dim = sum(m.embed_dim for m in self.members)
        if self.gallery.manifest["dim"] != dim:
            raise ValueError(
                f"gallery {self.gallery_ref} has {self.gallery.manifest['dim']}-d embeddings "
                f"but the checkpoint {', '.join(self.checkpoints)} makes {dim}-d ones: rebuild "
                "it with hrem-ray index"
            )
        img_dims = sorted({m.img_dim for m in self.members})
        if len(img_dims) != 1:  # not the models of any gallery
            raise ValueError(f"the checkpoints take features of different sizes {img_dims}")
        self.img_dim = img_dims[0]
        self.model_id = served_model_id(ids)
        self.gallery_id = _digest(json.dumps(self.gallery.manifest, sort_keys=True).encode())

    def embed_texts(self, queries: list[str]) -> np.ndarray:
        """[n, D] embeddings of already-validated queries, one forward pass per model."""
        return ensemble_embedding([m.embed_texts(queries) for m in self.members])

    def embed_image(self, features: np.ndarray) -> np.ndarray:
        """The [D] embedding of one image's validated [regions, img_dim] features."""
        return ensemble_embedding([m.embed_image(features) for m in self.members])


def checkpoint_list(checkpoint: str | Path | Sequence[str | Path]) -> tuple[str, ...]:
    """One checkpoint or several (an ensemble) as a tuple of strings."""
    if isinstance(checkpoint, (str, Path)):
        return (str(checkpoint),)
    checkpoints = tuple(str(c) for c in checkpoint)
    if not checkpoints:
        raise ValueError("no checkpoint to serve")
    return checkpoints


def check_models(
    gallery: Gallery, shown: str, checkpoints: Sequence[str], ids: Sequence[str] | None = None
) -> None:
    """The checkpoints must be the models ``gallery`` was built with: as many, and for an
    ensemble gallery the same weights (their ``ids``, when given) in the same order."""
    want = gallery.model_ids
    if want is None:
        if len(checkpoints) != 1:
            raise ValueError(
                f"gallery {shown} was built with one checkpoint, not {len(checkpoints)}: build "
                "an ensemble gallery with hrem-ray index and the same --checkpoint flags"
            )
        return
    built = [str(m.get("checkpoint", "?")) for m in gallery.manifest["models"]]
    if len(checkpoints) != len(want):
        raise ValueError(
            f"gallery {shown} was built with {len(want)} checkpoints ({', '.join(built)}), "
            f"not {len(checkpoints)}"
        )
    if ids is None or list(ids) == want:
        return
    if sorted(ids) == sorted(want):
        order = ", ".join(checkpoints[list(ids).index(i)] for i in want)
        raise ValueError(
            f"gallery {shown} was built with these checkpoints in another order: give them "
            f"as {order}"
        )
    i = next(i for i, (a, b) in enumerate(zip(ids, want, strict=True)) if a != b)
    raise ValueError(
        f"checkpoint {i + 1} ({checkpoints[i]}, weights id {ids[i]}) is not model {i + 1} of "
        f"gallery {shown} ({built[i]}, weights id {want[i]}): give the checkpoints it was "
        "built with, in its order, or rebuild it with hrem-ray index"
    )


def check_served(checkpoint: str | Path | Sequence[str | Path], gallery: str | Path) -> None:
    """What a replica would refuse, checked once at start-up: the checkpoints exist, the
    gallery opens, and they belong together (for an ensemble gallery its models in its
    order, their weights loaded here once to compare ids)."""
    checkpoints = checkpoint_list(checkpoint)
    for path in checkpoints:
        read_record(path)
    opened = Gallery.open(gallery)
    check_models(opened, str(gallery), checkpoints)
    if opened.model_ids is not None:
        ids = [model_id(load_checkpoint(c).model) for c in checkpoints]
        check_models(opened, str(gallery), checkpoints, ids)


def _without_locations(message: str) -> str:
    """``message`` with its URIs and absolute paths replaced: ``/readyz`` is open and shows
    no storage locations (the log has the full message)."""
    return re.sub(r"[a-z0-9+]+://\S+|(?<![\w.])/[^\s:,()]+", "<location>", message)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


class RetrievalService:
    """Towers (one checkpoint's, or an ensemble's) plus a gallery; one per replica (not
    thread-safe). ``device``: where the towers (and an exact gallery that fits) run; ``bf16``:
    the towers under bf16 autocast (``hrem-ray serve --bf16``)."""

    def __init__(
        self,
        checkpoint: str | Path | Sequence[str | Path],
        gallery: str | Path,
        device: str = "cpu",
        bf16: bool = False,
    ):
        torch.set_num_threads(1)
        self.device, self.bf16 = str(check_device(device)), bf16
        checkpoints, registered = resolve_checkpoints(checkpoint_list(checkpoint))
        self.current = Model(checkpoints, str(gallery), self.device, registered, bf16)
        self.swap_refused: dict[str, Any] | None = None

    def swap(self, checkpoint: str | Path | Sequence[str | Path], gallery: str | Path) -> None:
        """Load new checkpoint(s) and gallery, then swap them in with one assignment, so that
        requests in flight finish on the old pair. The request schema was built for the
        current shapes, so a swap must keep them. A ``models:/`` reference is resolved anew,
        so the same reference after its alias moved swaps in the version it now names."""
        checkpoints, registered = resolve_checkpoints(checkpoint_list(checkpoint))
        if (checkpoints, str(gallery)) == (self.current.checkpoints, self.current.gallery_ref):
            return
        new = Model(checkpoints, str(gallery), self.device, registered, self.bf16)
        old = self.current
        if (new.img_dim, new.gallery.manifest["dim"]) != (
            old.img_dim,
            old.gallery.manifest["dim"],
        ):
            raise ValueError(
                f"{', '.join(checkpoints)} takes {new.img_dim}-d features and makes "
                f"{new.gallery.manifest['dim']}-d embeddings, the running one "
                f"{old.img_dim}-d and {old.gallery.manifest['dim']}-d: deploy it as a new "
                "application instead of swapping it in"
            )
        self.current = new

    def try_swap(self, checkpoint: str | Path | Sequence[str | Path], gallery: str | Path) -> bool:
        """``swap``, except that a swap that fails (files that cannot be fetched, a corrupt or
        mismatched checkpoint) never stops the service: the current model keeps answering, and
        the reason is logged and shown by ``status`` until a later swap succeeds
        (docs/serving.md#swapping-the-model)."""
        try:
            self.swap(checkpoint, gallery)
        except Exception as e:  # any failure to load leaves the running model in place
            reason = one_line(e)
            log.warning("swap refused, still serving model %s: %s", self.current.model_id, reason)
            self.swap_refused = {"reason": _without_locations(reason), "at": time.time()}
            return False
        self.swap_refused = None
        return True

    def set_search_params(self, params: dict[str, int]) -> dict[str, int]:
        """The search knobs (``nprobe``, ``efSearch``, ``refine``) to search with: ``params``
        over the gallery's own, set on the loaded index (nothing reloads); returns those in
        force. Knobs the index does not take are logged and ignored, as a refused swap: never
        a stop."""
        gallery = self.current.gallery
        try:
            return gallery.set_search_params(**{**gallery.index_info["params"], **params})
        except ValueError as e:
            log.warning("search parameters %s refused: %s", params, one_line(e))
            return gallery.search_params

    @property
    def img_dim(self) -> int:
        return self.current.img_dim

    @property
    def gallery(self) -> Gallery:
        return self.current.gallery

    # -- the operations (one HTTP route each, api.py) ------------------------------------
    async def search_text(self, query: str | list[str], k: int = 10) -> Reply:
        """Images for a query, or for each of a list of queries (a list of answers)."""
        self.check_k(k)
        queries = self.check_queries(query)
        embedded = await self.embed_queries(queries)
        answers = [
            {"query": q, "results": [h.to_json() for h in images_for(model, emb, k)]}
            for q, (emb, _, model) in zip(queries, embedded, strict=True)
        ]
        return _reply(query, answers, embedded)

    async def search_image(
        self, image_id: int | None = None, features: Any = None, k: int = 10
    ) -> Reply:
        """Captions for a gallery image or for raw region features (exactly one of them)."""
        self.check_k(k)
        if (image_id is None) == (features is None):
            raise RequestError("give exactly one of image_id and features")
        model = self.current
        if image_id is not None:
            emb = self.gallery_image(image_id)
        else:
            emb = model.embed_image(self.check_features(features))
        return Reply({"results": [h.to_json() for h in captions_for(model, emb, k)]})

    async def embed_text(self, query: str | list[str]) -> Reply:
        """A query's embedding, or a list of them for a list of queries."""
        embedded = await self.embed_queries(self.check_queries(query))
        return _reply(query, [{"embedding": emb.tolist()} for emb, _, _ in embedded], embedded)

    async def embed_image(self, features: Any) -> Reply:
        emb = self.current.embed_image(self.check_features(features))
        return Reply({"embedding": emb.tolist()})

    async def status(self) -> Reply:
        """Readiness without filesystem paths or URIs: ids, sizes and shapes only. ``models``
        lists the served models in order (one, or an ensemble's); ``model_id`` is the one
        model's weights id, or for an ensemble a hash of its models' ids in order."""
        m = self.current
        return Reply(
            {
                "status": "ready",
                "model_id": m.model_id,
                "gallery_id": m.gallery_id,
                "n_images": m.gallery.n_images,
                "n_captions": m.gallery.n_captions,
                "img_dim": m.img_dim,
                "embed_dim": int(m.gallery.manifest["dim"]),
                "models": [{"model_id": x.model_id, "embed_dim": x.embed_dim} for x in m.members],
                "index": {**m.gallery.index_info, "params": m.gallery.search_params},
                "registry": [describe(r) for r in m.registered],
                "swap_refused": self.swap_refused,
            }
        )

    async def embed_query(self, query: str) -> tuple[np.ndarray, int, Model]:
        """One query's embedding, the batch size it ran in and the model that made it. The
        Ray deployment overrides this with a ``@serve.batch`` version."""
        model = self.current
        return model.embed_texts([query])[0], 1, model

    async def embed_queries(self, queries: list[str]) -> list[tuple[np.ndarray, int, Model]]:
        """``embed_query`` of each query, in order and concurrently: a list travels the
        single-query path, so each answer is the single query's, and under Ray Serve its
        queries are items of ``@serve.batch`` (model batches of up to ``max_batch_size``,
        shared with other requests' queries), never one forward pass each."""
        return list(await asyncio.gather(*map(self.embed_query, queries)))

    # -- the pieces (also used by tests and benchmarks) ---------------------------------
    def embed_texts(self, queries: list[str]) -> np.ndarray:
        return self.current.embed_texts(queries)

    def images_for(self, text_emb: np.ndarray, k: int) -> list[Hit]:
        return images_for(self.current, text_emb, k)

    def captions_for(self, image_emb: np.ndarray, k: int) -> list[Hit]:
        return captions_for(self.current, image_emb, k)

    def gallery_image(self, image_id: int) -> np.ndarray:
        return np.asarray(self.gallery.image_embs[self.check_image_id(image_id)], np.float32)

    # -- validation -------------------------------------------------------------------
    @staticmethod
    def check_query(query: str) -> str:
        if not isinstance(query, str) or not query.strip():
            raise RequestError("query must be a non-empty string")
        if len(query) > MAX_QUERY_CHARS:
            raise RequestError(f"query longer than {MAX_QUERY_CHARS} characters")
        return query

    @classmethod
    def check_queries(cls, query: str | list[str]) -> list[str]:
        """One query, or a list of 1 to ``MAX_QUERIES``, as a list of valid queries."""
        if isinstance(query, str):
            return [cls.check_query(query)]
        if not isinstance(query, list) or not 1 <= len(query) <= MAX_QUERIES:
            raise RequestError(QUERIES_MESSAGE)
        return [cls.check_query(q) for q in query]

    @staticmethod
    def check_k(k: int) -> int:
        try:
            return check_k(k, MAX_K)
        except ValueError as e:
            raise RequestError(str(e)) from None

    def check_features(self, features: Any) -> np.ndarray:
        try:
            with np.errstate(over="ignore"):  # 1e39 becomes inf, refused below
                arr = np.asarray(features, dtype=np.float32)
        except (TypeError, ValueError):
            raise RequestError(
                f"features must be a list of regions, each a list of {self.img_dim} numbers "
                "(rows of equal length)"
            ) from None
        if arr.ndim != 2 or arr.shape[1] != self.img_dim or not 1 <= arr.shape[0] <= MAX_REGIONS:
            raise RequestError(
                f"features must have shape [n, {self.img_dim}] with 1 <= n <= {MAX_REGIONS}, "
                f"got {list(arr.shape)}"
            )
        if not np.isfinite(arr).all():
            raise RequestError("features contain non-finite numbers")
        if np.abs(arr).max() > MAX_FEATURE_ABS:
            raise RequestError(f"features too large: |value| must be at most {MAX_FEATURE_ABS:g}")
        return arr

    def check_image_id(self, image_id: int) -> int:
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise RequestError("image_id must be an integer")
        if not 0 <= image_id < self.gallery.n_images:
            raise RequestError(f"unknown image_id {image_id}", status=404)
        return image_id


def _reply(
    query: str | list[str], answers: list[dict[str, Any]], embedded: list[tuple[Any, int, Any]]
) -> Reply:
    """A single query's answer as it always was; a list's answers as a list, in its order."""
    body = answers[0] if isinstance(query, str) else answers
    return Reply(body, [batch for _, batch, _ in embedded])


def images_for(model: Model, text_emb: np.ndarray, k: int) -> list[Hit]:
    ids, scores = model.gallery.search_images(text_emb[None], k)
    return [
        Hit(int(i), float(s), captions=model.gallery.captions_of(int(i)))
        for i, s in zip(ids[0], scores[0], strict=True)
    ]


def captions_for(model: Model, image_emb: np.ndarray, k: int) -> list[Hit]:
    ids, scores = model.gallery.search_captions(image_emb[None], k)
    return [
        Hit(
            int(i),
            float(s),
            caption=model.gallery.captions[int(i)],
            image_id=int(i) // CAPTIONS_PER_IMAGE,
        )
        for i, s in zip(ids[0], scores[0], strict=True)
    ]
