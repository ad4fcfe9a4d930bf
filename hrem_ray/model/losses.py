"""Matching losses of HREM (docs/method.md §5). All of them are sums, not means.

``S`` is an [anchors, candidates] similarity matrix of normalised embeddings and
``positives`` marks pairs showing the same image (the diagonal included).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hrem_ray.config import ModelConfig


def same_image(image_ids: Tensor) -> Tensor:
    """P[a, b] = image_ids[a] == image_ids[b]."""
    return image_ids[:, None] == image_ids[None, :]


@torch.no_grad()
def negative_weights(s: Tensor, positives: Tensor, *, cutoff: float, dim: int) -> Tensor:
    """Distance-weighted sampling probabilities (Wu et al. 2017), one row per anchor.

    Inverse of the density of distances between random points on the unit sphere in
    ``dim`` dimensions, so negatives are drawn uniformly over distance rather than
    mostly far away. Rows with no valid negative are all zero.
    """
    d = torch.sqrt((2.0 - 2.0 * s).clamp(min=0.0)).clamp(min=0.5)
    logw = (2.0 - dim) * torch.log(d) - ((dim - 3) / 2.0) * torch.log(1.0 - 0.25 * d * d)
    logw = logw.masked_fill(positives | ~torch.isfinite(logw), 0.0)
    w = torch.exp(logw - logw.amax(dim=1, keepdim=True))
    w = w * (~positives & (d < cutoff))
    total = w.sum(dim=1, keepdim=True)
    return torch.where(total > 0, w / total.clamp(min=1e-30), torch.zeros_like(w))


def sample_negatives(
    weights: Tensor, positives: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """One negative per positive pair (a, p) whose anchor row has any valid negative.

    Returns (anchor, positive, negative) index tensors of equal length.
    """
    usable = positives & (weights.sum(dim=1, keepdim=True) > 0)
    anchor, pos = usable.nonzero(as_tuple=True)
    if anchor.numel() == 0:
        empty = anchor.new_empty(0)
        return empty, empty, empty
    neg = torch.multinomial(weights[anchor], 1, generator=generator).squeeze(1)
    return anchor, pos, neg


def triplet_from_samples(
    s: Tensor, anchor: Tensor, pos: Tensor, neg: Tensor, margin: float
) -> Tensor:
    """sum over sampled triplets of relu(margin + S[a, n] - S[a, p])."""
    return (margin + s[anchor, neg] - s[anchor, pos]).clamp(min=0).sum()


def triplet_dw(
    s: Tensor,
    positives: Tensor,
    *,
    margin: float,
    cutoff: float,
    dim: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Triplet loss with distance-weighted negative sampling, anchors along rows."""
    weights = negative_weights(s, positives, cutoff=cutoff, dim=dim)
    anchor, pos, neg = sample_negatives(weights, positives, generator)
    return triplet_from_samples(s, anchor, pos, neg, margin)


def vse_hinge(s: Tensor, excluded: Tensor, *, margin: float, max_violation: bool) -> Tensor:
    """VSE++ hinge in both directions around the diagonal; ``excluded`` pairs (the
    same-image pairs, or only the diagonal) are never negatives."""
    diag = s.diagonal()
    cost_caption = (margin + s - diag[:, None]).clamp(min=0).masked_fill(excluded, 0.0)
    cost_image = (margin + s - diag[None, :]).clamp(min=0).masked_fill(excluded, 0.0)
    if max_violation:
        return cost_caption.amax(dim=1).sum() + cost_image.amax(dim=0).sum()
    return cost_caption.sum() + cost_image.sum()


def hardest_negative(cfg: ModelConfig, epoch: int | None) -> bool:
    """VSE++ takes the hardest negative once ``vse_mean_warmup_epochs`` epochs are done:
    from a random start the hardest negative alone can collapse the embedding, the sum
    gives every pair a gradient first (the authors' schedule, after VSE-infinity's).
    ``epoch`` None means past the warm-up."""
    return cfg.max_violation and (epoch is None or epoch >= cfg.vse_mean_warmup_epochs)


def matching_loss(
    v: Tensor,
    t: Tensor,
    image_ids: Tensor,
    cfg: ModelConfig,
    *,
    kind: str,
    epoch: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """L(v, t) of loss ``kind`` ('trip' or 'vse') over image->text and text->image."""
    s = v @ t.t()
    positives = same_image(image_ids)
    if kind == "vse":
        eye = torch.eye(*s.shape, dtype=torch.bool, device=s.device)
        excluded = positives if cfg.mask_repeat else eye
        hardest = hardest_negative(cfg, epoch)
        return vse_hinge(s, excluded, margin=cfg.margin, max_violation=hardest)
    kw = dict(margin=cfg.margin, cutoff=cfg.resolve_cutoff(), dim=cfg.dw_dim, generator=generator)
    return triplet_dw(s, positives, **kw) + triplet_dw(s.t(), positives.t(), **kw)
