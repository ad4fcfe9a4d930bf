"""Embeddings with a trained model: the one place where inputs become vectors.

Evaluation, the gallery index, ``hrem-ray embed`` and the Serve replicas all encode through
these functions, so every consumer produces exactly the embeddings evaluation measured. The
batches come from ``data/batches.py``; ``encode`` places them by id. Evaluation imports this
module, never the other way round.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hrem_ray.checkpoint import Checkpoint, load_checkpoint
from hrem_ray.data.batches import caption_batches, image_batches
from hrem_ray.data.precomp import PrecompSplit
from hrem_ray.data.tokenize import CaptionTokenizer
from hrem_ray.model import HREM
from hrem_ray.progress import Progress

ProgressFn = Callable[[str], None] | None


def check_batch_size(batch_size: int) -> None:
    """A positive integer: checked before minutes of loading, not found as a range() error."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")


def check_features(feats: np.ndarray, img_dim: int, name: str = "features") -> None:
    """Region features must be a real ``[n >= 1, regions >= 1, img_dim]`` array (its values
    are checked for NaN/inf as each batch is read)."""
    if not isinstance(feats, np.ndarray):
        raise ValueError(f"{name}: expected one array, got {type(feats).__name__}")
    if feats.dtype.kind not in "fiu":
        raise ValueError(f"{name}: expected real numbers, got dtype {feats.dtype}")
    if feats.ndim != 3 or feats.shape[2] != img_dim or feats.shape[1] < 1:
        raise ValueError(f"{name}: expected shape [n, regions, {img_dim}], got {list(feats.shape)}")
    if feats.shape[0] < 1:
        raise ValueError(f"{name}: no images to embed (shape {list(feats.shape)})")


def check_captions(captions: Sequence[str]) -> None:
    if len(captions) == 0:
        raise ValueError("no captions to embed")
    for i, caption in enumerate(captions):
        if not caption.strip():
            raise ValueError(f"caption {i + 1} is empty")


def embed_features(
    model: HREM,
    feats: np.ndarray,
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    progress: ProgressFn = None,
) -> np.ndarray:
    """[n, regions, img_dim] region features -> [n, D] float32 L2-normalised, input order."""
    check_batch_size(batch_size)
    check_features(feats, model.cfg.img_dim)
    return _encode_images(model, feats, len(feats), batch_size, device, bf16, progress,
                          "embed images")  # fmt: skip


def embed_captions(
    model: HREM,
    tokenizer: CaptionTokenizer,
    captions: Sequence[str],
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    progress: ProgressFn = None,
) -> np.ndarray:
    """Captions -> [n, D] float32 L2-normalised, input order (no augmentation)."""
    check_batch_size(batch_size)
    check_captions(captions)
    return _encode_captions(model, tokenizer, captions, batch_size, device, bf16, progress,
                            "embed captions")  # fmt: skip


def embed_split(
    model: HREM,
    split: PrecompSplit,
    tokenizer: CaptionTokenizer,
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    progress: ProgressFn = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every unique image and every caption of a split, each encoded once, in id order."""
    check_batch_size(batch_size)
    dim = split.features.shape[-1]
    if dim != model.cfg.img_dim:
        raise ValueError(
            f"{split.ims_path}: features have dimension {dim} but the model expects "
            f"img_dim={model.cfg.img_dim}"
        )
    imgs = _encode_images(model, split, split.n_images, batch_size, device, bf16, progress,
                          "encode images")  # fmt: skip
    caps = _encode_captions(model, tokenizer, split.captions, batch_size, device, bf16,
                            progress, "encode captions")  # fmt: skip
    return imgs, caps


def embed_split_each(
    checkpoints: Sequence[str | Path],
    split: PrecompSplit,
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    progress: ProgressFn = None,
) -> Iterator[tuple[Checkpoint, np.ndarray, np.ndarray]]:
    """``embed_split`` of ``split`` by each checkpoint of an ensemble, in order: yields the
    loaded checkpoint and its image and caption embeddings. One model is loaded at a time
    (the next once the caller asks for it), so an ensemble costs one model's memory."""
    check_batch_size(batch_size)
    for path in checkpoints:
        ck = load_checkpoint(path, device=device)
        imgs, caps = embed_split(ck.model, split, ck.tokenizer(), batch_size=batch_size,
                                 device=device, bf16=bf16, progress=progress)  # fmt: skip
        yield ck, imgs, caps
        del ck


def ensemble_embedding(parts: Sequence[np.ndarray]) -> np.ndarray:
    """The embeddings of an ensemble of m models from each model's own: the L2-normalised
    ``[..., D_i]`` embeddings the functions above return, each scaled by 1/sqrt(m) and
    concatenated into ``[..., sum D_i]`` float32, in the given model order.

    The dot product of two such vectors is the mean of the m models' cosine similarities, the
    score ``hrem-ray eval`` averages over several checkpoints; so a gallery of them answers
    ensemble queries with the same exact or IVF search as one model's, and each vector is
    again of unit length. One model (m = 1): its embeddings unchanged.
    """
    if not parts:
        raise ValueError("no embeddings to combine")
    arrays = [np.asarray(p, dtype=np.float32) for p in parts]
    if len({a.shape[:-1] for a in arrays}) != 1:
        raise ValueError(f"embeddings of different counts: {[list(a.shape) for a in arrays]}")
    if len(arrays) == 1:
        return arrays[0]
    scale = np.float32(1 / math.sqrt(len(arrays)))
    return np.concatenate([a * scale for a in arrays], axis=-1)


def model_id(model: torch.nn.Module) -> str:
    """A content id of a model's weights: the same checkpoint copied anywhere has the same id
    (a gallery records its models' ids, the service reports them)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def served_model_id(ids: Sequence[str]) -> str:
    """The id a service reports for models of these ids: the one model's, or for an ensemble
    a hash of its models' ids in order (the registry records the same)."""
    return ids[0] if len(ids) == 1 else hashlib.sha256(" ".join(ids).encode()).hexdigest()[:16]


def _encode_images(model, source, n, batch_size, device, bf16, progress, desc) -> np.ndarray:
    with _eval_mode(model):
        return encode(model.embed_images, image_batches(source, batch_size), n,
                      device=device, bf16=bf16, progress=progress, desc=desc)  # fmt: skip


def _encode_captions(model, tokenizer, captions, batch_size, device, bf16, progress, desc):
    with _eval_mode(model):
        return encode(model.embed_texts, caption_batches(captions, tokenizer, batch_size),
                      len(captions), device=device, bf16=bf16, progress=progress,
                      desc=desc)  # fmt: skip


def encode(
    embed_fn: Callable[[Tensor, Tensor], Tensor],
    batches: Iterable[tuple[np.ndarray, Tensor, Tensor]],
    n: int,
    *,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    progress: ProgressFn = None,
    desc: str = "encode",
) -> np.ndarray:
    """Embed every ``(ids, x, lengths)`` batch into row ``ids`` of a float32 ``[n, D]`` array.

    Rows are placed by id, so the result is in id order whatever order (or sharding) the
    batches came in; every id in ``[0, n)`` must be seen exactly once, since a gap or duplicate
    would silently shift the ground truth the metrics rely on. ``bf16``: under bf16 autocast
    (on any device, CPU included), as training's ``train.bf16``; the weights stay float32 and
    the embeddings come back float32.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    out: np.ndarray | None = None
    seen = np.zeros(n, dtype=np.int64)
    bar = Progress(desc, n, progress)
    autocast = torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16)
    with torch.inference_mode(), autocast:
        for ids, x, lengths in batches:
            ids = np.asarray(ids, dtype=np.int64).reshape(-1)
            emb = embed_fn(x.to(device), lengths.to(device)).float().cpu().numpy()
            if emb.ndim != 2 or emb.shape[0] != ids.size:
                raise ValueError(f"{desc}: {ids.size} ids but embeddings of shape {emb.shape}")
            if ids.size and (ids.min() < 0 or ids.max() >= n):
                raise ValueError(f"{desc}: ids must lie in [0, {n}), got {ids.min()}..{ids.max()}")
            if out is None:
                out = np.empty((n, emb.shape[1]), dtype=np.float32)
            out[ids] = emb
            np.add.at(seen, ids, 1)
            bar.update(ids.size)
    _check_coverage(seen, desc)
    return out


def _check_coverage(seen: np.ndarray, desc: str) -> None:
    """Fail loudly unless every id was written exactly once."""
    missing, duplicated = np.flatnonzero(seen == 0), np.flatnonzero(seen > 1)
    if missing.size or duplicated.size:
        raise ValueError(
            f"{desc}: {missing.size} ids never encoded (first: {missing[:5].tolist()}), "
            f"{duplicated.size} encoded more than once (first: {duplicated[:5].tolist()})"
        )


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the duration (no dropout, batch-independent embeddings), then back."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
