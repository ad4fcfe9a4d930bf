"""The instance-level relation module of HREM (docs/method.md §4), used in training only.

Images and captions of the (global) batch become 2B nodes of one sequence; a Transformer
lets each node attend to the nodes it is connected to, with the relevance of the pair
as an additive attention bias. Everything here is batched: no Python loop over samples;
the fragment scores go in chunks of captions so that their memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hrem_ray.config import ModelConfig
from hrem_ray.model.encoders import l2norm, length_mask, transformer_encoder


@dataclass
class FragmentScores:
    """SCAN-like cross-attention summaries between every caption j and image i."""

    m_t2i: Tensor  # [Bt, Bi] mean over the caption's words of their best region
    k_t2i: Tensor  # [Bt, Bi, topk] the top per-word maxima
    m_i2t: Tensor  # [Bi, Bt] mean over regions of their best real word
    k_i2t: Tensor  # [Bi, Bt, topk] the top per-region maxima


# Bytes of fragment scores one chunk of captions may hold (docs/global-batch.md).
FRAG_BUDGET_BYTES = 256 * 2**20
_LIVE_COPIES = 2  # the [c, L, Bi, N] scores plus one normalised copy are alive at once


def frag_chunk_size(n_images: int, length: int, regions: int, element_size: int) -> int:
    """Captions per chunk so that a chunk's score tensors stay within FRAG_BUDGET_BYTES."""
    per_caption = _LIVE_COPIES * n_images * length * regions * element_size
    return max(1, FRAG_BUDGET_BYTES // per_caption)


@torch.no_grad()
def fragment_scores(
    regions: Tensor,
    words: Tensor,
    word_lengths: Tensor,
    *,
    topk: int = 10,
    min_words: int = 10,
    slope: float = 0.1,
    chunk: int = 0,
) -> FragmentScores:
    """Fragment-level scores (docs/method.md §4) for every pair, in chunks of captions.

    regions [Bi, N, D] and words [Bt, L, D] are the pre-pool features, detached (no gradient
    flows through these scores). Caption j contributes its first max(len_j, min_words)
    positions (zero vectors past the padded length); image i all N region positions.
    Captions are scored ``chunk`` at a time (0: as many as fit FRAG_BUDGET_BYTES), so peak
    memory is bounded for any batch; every pair's numbers are the same for any chunk.
    """
    h = l2norm(regions)
    width = max(words.shape[1], min_words, topk)
    used = length_mask(word_lengths.clamp(min=min_words), width)  # [Bt, L]
    real = length_mask(word_lengths, width)
    step = chunk or frag_chunk_size(h.shape[0], width, h.shape[1], h.element_size())
    parts = [
        _score_chunk(h, words[s : s + step], used[s : s + step], real[s : s + step],
                     word_lengths[s : s + step], topk, slope)
        for s in range(0, words.shape[0], step)
    ]  # fmt: skip
    m_t2i, k_t2i, m_i2t, k_i2t = (torch.cat(p) for p in zip(*parts, strict=True))
    return FragmentScores(m_t2i, k_t2i, m_i2t.t(), k_i2t.transpose(0, 1))


def _score_chunk(
    h: Tensor, words: Tensor, used: Tensor, real: Tensor, lengths: Tensor, topk: int, slope: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Caption-major scores of a chunk: m_t2i, k_t2i [c, Bi(, topk)], m_i2t, k_i2t likewise.

    Scores are laid out [c, L, Bi, N] (one matmul, no permuted copy); zeroing unused word
    positions before the product makes their scores 0, as LeakyReLU(0) = 0.
    """
    w = l2norm(F.pad(words, (0, 0, 0, used.shape[1] - words.shape[1]))) * used[..., None]
    c, length, dim = w.shape
    n_img, n_reg = h.shape[:2]
    a = (w.reshape(c * length, dim) @ h.reshape(n_img * n_reg, dim).t()).view(
        c, length, n_img, n_reg
    )
    F.leaky_relu(a, slope, inplace=True)

    # text -> image: normalise over words, best region per word
    t2i = l2norm(a, dim=1).amax(dim=3).transpose(1, 2)  # [c, Bi, L]
    m_t2i = (t2i * real[:, None]).sum(2) / lengths[:, None].to(a.dtype)
    k_t2i = t2i.masked_fill(~used[:, None], float("-inf")).topk(topk, dim=2).values

    # image -> text: normalise over regions, best real word per region
    i2t = l2norm(a, dim=3).masked_fill_(~real[:, :, None, None], float("-inf")).amax(dim=1)
    m_i2t = i2t.mean(2)  # [c, Bi]
    if i2t.shape[2] < topk:  # fewer regions than topk: pad the maxima with zeros
        i2t = F.pad(i2t, (0, topk - i2t.shape[2]))
    return m_t2i, k_t2i, m_i2t, i2t.topk(topk, dim=2).values


def topk_connections(scores: Tensor, k: int) -> Tensor:
    """Keep, per row, the entries at least as large as the row's k-th largest value."""
    kth = scores.topk(k, dim=1).values[:, -1:]
    return scores >= kth


def intra_relevance(x: Tensor) -> Tensor:
    """exp(-||x_a - x_b||) between all pairs; differentiable (not detached)."""
    return torch.exp(-torch.cdist(x, x))


def relation_kl(r_i2t: Tensor, r_t2i: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """KL(softmax(R_i2t) || softmax(G)) + KL(softmax(R_t2i) || softmax(G^T)), batch-mean.

    G = exp(-cdist(v, t)) is a detached target built from the embeddings themselves.
    """
    g = torch.exp(-torch.cdist(v, t)).detach()

    def kl(r: Tensor, target: Tensor) -> Tensor:
        log_p = F.log_softmax(r, dim=1)
        return (log_p.exp() * (log_p - F.log_softmax(target, dim=1))).sum() / r.shape[0]

    return kl(r_i2t, g) + kl(r_t2i, g.t())


def _score_mlp(topk: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(topk, topk), nn.ReLU(), nn.Linear(topk, 1))


@dataclass
class RelationOutput:
    v_hat: Tensor  # [Bi, D] relation-enhanced image embeddings, normalised
    t_hat: Tensor  # [Bt, D]
    kl: Tensor  # scalar relation regulariser
    attn_mask: Tensor  # [2B, 2B] float additive mask (-inf where not connected)


class InstanceRelation(nn.Module):
    """Connection graph + relevance -> masked Transformer over [images; captions]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.mlp_t2i = _score_mlp(cfg.frag_topk)
        self.mlp_i2t = _score_mlp(cfg.frag_topk)
        self.mlp_i2t.load_state_dict(self.mlp_t2i.state_dict())  # both start identical
        self.fusion = transformer_encoder(cfg, num_layers=cfg.num_layers_enc)
        # (regions, words, word_lengths, **kw) -> FragmentScores over the whole batch;
        # ``wrap_ddp`` swaps in the version that shards the captions across workers.
        self.score_fragments: Callable[..., FragmentScores] = fragment_scores
        self.grad_checkpoint = False  # recompute the fusion layers in backward (HREM method)

    def attention_mask(
        self, v: Tensor, t: Tensor, frags: FragmentScores
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The [2B, 2B] float mask (rows query, columns key) and the cross relevances."""
        k = max(1, int(v.shape[0] * self.cfg.threshold))
        with torch.no_grad():
            eye = torch.eye(v.shape[0], dtype=torch.bool, device=v.device)
            conn_ii = topk_connections(v @ v.t(), k) | eye
            conn_tt = topk_connections(t @ t.t(), k) | eye
            conn_t2i = topk_connections(frags.m_t2i, k)
            conn_i2t = topk_connections(frags.m_i2t, k)
        r_t2i = self.mlp_t2i(frags.k_t2i).squeeze(-1) + frags.m_t2i
        r_i2t = self.mlp_i2t(frags.k_i2t).squeeze(-1) + frags.m_i2t
        relevance = torch.cat(
            [
                torch.cat([intra_relevance(v), r_i2t], dim=1),
                torch.cat([r_t2i, intra_relevance(t)], dim=1),
            ]
        )
        connected = torch.cat(
            [torch.cat([conn_ii, conn_i2t], dim=1), torch.cat([conn_t2i, conn_tt], dim=1)]
        )
        mask = (self.cfg.mask_weight * relevance).masked_fill(~connected, float("-inf"))
        return mask, r_i2t, r_t2i

    def forward(
        self, v: Tensor, t: Tensor, regions: Tensor, words: Tensor, word_lengths: Tensor
    ) -> RelationOutput:
        frags = self.score_fragments(
            regions.detach(),
            words.detach(),
            word_lengths,
            topk=self.cfg.frag_topk,
            min_words=self.cfg.frag_min_words,
            chunk=self.cfg.frag_chunk,
        )
        mask, r_i2t, r_t2i = self.attention_mask(v, t, frags)
        nodes = torch.cat([v, t])[None]
        if self.grad_checkpoint and torch.is_grad_enabled():
            fused = checkpoint(self.fusion, nodes, mask=mask, use_reentrant=False)[0]
        else:
            fused = self.fusion(nodes, mask=mask)[0]
        v_hat, t_hat = fused.split([v.shape[0], t.shape[0]])
        return RelationOutput(l2norm(v_hat), l2norm(t_hat), relation_kl(r_i2t, r_t2i, v, t), mask)
