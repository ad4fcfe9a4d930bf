"""Embeddings of arbitrary inputs (feature arrays, caption lists) with a trained model.

Used by ``hrem-ray embed``, the gallery index and the Serve replicas, so that every
consumer produces exactly the embeddings evaluation measured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from hrem_ray.data.batches import pad_tokens
from hrem_ray.data.tokenize import CaptionTokenizer
from hrem_ray.eval.encode import check_batch_size, encode
from hrem_ray.model import HREM

# Rows per finiteness-check read, so a large memory-mapped file is never copied whole.
CHECK_CHUNK_ROWS = 256


def check_features(feats: np.ndarray, img_dim: int, name: str = "features") -> None:
    """Region features must be a real [n >= 1, regions >= 1, img_dim] array and finite."""
    if not isinstance(feats, np.ndarray):
        raise ValueError(f"{name}: expected one array, got {type(feats).__name__}")
    if feats.dtype.kind not in "fiu":
        raise ValueError(f"{name}: expected real numbers, got dtype {feats.dtype}")
    if feats.ndim != 3 or feats.shape[2] != img_dim or feats.shape[1] < 1:
        raise ValueError(f"{name}: expected shape [n, regions, {img_dim}], got {list(feats.shape)}")
    if feats.shape[0] < 1:
        raise ValueError(f"{name}: no images to embed (shape {list(feats.shape)})")
    for start in range(0, feats.shape[0], CHECK_CHUNK_ROWS):
        chunk = np.asarray(feats[start : start + CHECK_CHUNK_ROWS])
        bad = np.flatnonzero(~np.isfinite(chunk).all(axis=(1, 2)))
        if bad.size:
            raise ValueError(f"{name}: row {start + int(bad[0])} contains non-finite values")


def _feature_batches(
    feats: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    for start in range(0, len(feats), batch_size):
        # a copy: rows of a read-only memmap must not back a tensor (torch warns, UB on write)
        chunk = np.array(feats[start : start + batch_size], dtype=np.float32, order="C")
        ids = np.arange(start, start + len(chunk))
        yield ids, torch.from_numpy(chunk), torch.full((len(chunk),), chunk.shape[1])


def embed_features(
    model: HREM,
    feats: np.ndarray,
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> np.ndarray:
    """[n, regions, img_dim] region features -> [n, D] float32 L2-normalised, input order."""
    check_batch_size(batch_size)
    check_features(feats, model.cfg.img_dim)
    model.eval()
    return encode(
        model.embed_images, _feature_batches(feats, batch_size), len(feats),
        device=device, progress=progress, desc="embed images",
    )  # fmt: skip


def embed_captions(
    model: HREM,
    tokenizer: CaptionTokenizer,
    captions: Sequence[str],
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> np.ndarray:
    """Captions -> [n, D] float32 L2-normalised, input order (no augmentation)."""
    check_batch_size(batch_size)
    if len(captions) == 0:
        raise ValueError("no captions to embed")
    for i, caption in enumerate(captions):
        if not caption.strip():
            raise ValueError(f"caption {i + 1} is empty")

    def batches() -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        for start in range(0, len(captions), batch_size):
            chunk = captions[start : start + batch_size]
            tokens, lengths = pad_tokens([tokenizer.encode(c) for c in chunk], tokenizer.pad_id)
            yield np.arange(start, start + len(chunk)), tokens, lengths

    model.eval()
    return encode(
        model.embed_texts, batches(), len(captions),
        device=device, progress=progress, desc="embed captions",
    )  # fmt: skip
