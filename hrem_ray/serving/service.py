"""Retrieval over a gallery with a trained model: plain Python, no Ray, no HTTP.

The Ray Serve replicas hold one ``RetrievalService``; tests and benchmarks call it
in-process. Every input is validated here, so a bad request becomes a ``RequestError``
(an HTTP 4xx) and never reaches the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hrem_ray.checkpoint import load_checkpoint
from hrem_ray.data.batches import pad_tokens
from hrem_ray.data.precomp import CAPTIONS_PER_IMAGE
from hrem_ray.data.tokenize import CaptionTokenizer
from hrem_ray.index.gallery import Gallery
from hrem_ray.index.ivf import import_faiss

MAX_QUERY_CHARS = 1000
MAX_K = 100
MAX_REGIONS = 100


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


class RetrievalService:
    """A checkpoint's towers plus a gallery; thread-unsafe by design (one per replica)."""

    def __init__(self, checkpoint: str | Path, gallery: str | Path, device: str = "cpu"):
        torch.set_num_threads(1)
        self.checkpoint_path = str(checkpoint)
        self.gallery_path = str(gallery)
        ck = load_checkpoint(checkpoint, device=device)
        self.model = ck.model
        self.device = device
        self.tokenizer = CaptionTokenizer.from_dir(
            ck.backbone_dir, max_tokens=ck.config.data.max_tokens
        )
        self.gallery = Gallery.open(gallery)
        if self.gallery.manifest.get("ivf"):
            import_faiss().omp_set_num_threads(1)  # one core per replica, as torch above
        dim = ck.config.model.embed_size
        if self.gallery.manifest["dim"] != dim:
            raise ValueError(
                f"gallery {gallery} has {self.gallery.manifest['dim']}-d embeddings but the "
                f"checkpoint {checkpoint} makes {dim}-d ones: rebuild it with hrem-ray index"
            )
        self.img_dim = ck.config.model.img_dim

    # -- validation -------------------------------------------------------------------
    @staticmethod
    def check_query(query: str) -> str:
        if not isinstance(query, str) or not query.strip():
            raise RequestError("query must be a non-empty string")
        if len(query) > MAX_QUERY_CHARS:
            raise RequestError(f"query longer than {MAX_QUERY_CHARS} characters")
        return query

    @staticmethod
    def check_k(k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise RequestError(f"k must be an integer in [1, {MAX_K}]")
        return k

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
        return arr

    def check_image_id(self, image_id: int) -> int:
        if isinstance(image_id, bool) or not isinstance(image_id, int):
            raise RequestError("image_id must be an integer")
        if not 0 <= image_id < self.gallery.n_images:
            raise RequestError(f"unknown image_id {image_id}", status=404)
        return image_id

    # -- model ------------------------------------------------------------------------
    def embed_texts(self, queries: list[str]) -> np.ndarray:
        """[n, D] embeddings of already-validated queries, one forward pass."""
        tokens, lengths = pad_tokens(
            [self.tokenizer.encode(q) for q in queries], self.tokenizer.pad_id
        )
        with torch.inference_mode():
            out = self.model.embed_texts(tokens.to(self.device), lengths.to(self.device))
        return out.float().cpu().numpy()

    def embed_image(self, features: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(features)[None].to(self.device)
        with torch.inference_mode():
            out = self.model.embed_images(x, torch.tensor([len(features)], device=self.device))
        emb = out.float().cpu().numpy()[0]
        # Finite but huge inputs (1e19) overflow inside the model: to inf/NaN, or to a zero
        # vector when the squared norm overflows in the final L2 normalisation.
        if not np.isfinite(emb).all() or abs(np.linalg.norm(emb.astype(np.float64)) - 1) > 1e-3:
            raise RequestError("features too large: the model's output is not a unit vector")
        return emb

    # -- search -----------------------------------------------------------------------
    def images_for(self, text_emb: np.ndarray, k: int) -> list[Hit]:
        ids, scores = self.gallery.search_images(text_emb[None], k)
        return [
            Hit(int(i), float(s), captions=self.gallery.captions_of(int(i)))
            for i, s in zip(ids[0], scores[0], strict=True)
        ]

    def captions_for(self, image_emb: np.ndarray, k: int) -> list[Hit]:
        ids, scores = self.gallery.search_captions(image_emb[None], k)
        return [
            Hit(
                int(i),
                float(s),
                caption=self.gallery.captions[int(i)],
                image_id=int(i) // CAPTIONS_PER_IMAGE,
            )
            for i, s in zip(ids[0], scores[0], strict=True)
        ]

    def gallery_image(self, image_id: int) -> np.ndarray:
        return np.asarray(self.gallery.image_embs[self.check_image_id(image_id)], np.float32)
