"""The two towers of HREM (docs/method.md §2-3): region features -> v, tokens -> t.

Module and parameter names mirror the authors' released checkpoints
(``fc.fc``, ``fc.mlp.layers``, ``fc.mlp.bns``, ``aggr.layers.0``, ``bert``, ``linear``)
so that importing them is a plain key mapping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BertModel

from hrem_ray.config import ModelConfig


def l2norm(x: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """x / (||x|| + eps): the normalisation of the reference (not F.normalize's max())."""
    return x / (x.norm(dim=dim, keepdim=True) + eps)


def length_mask(lengths: Tensor, size: int) -> Tensor:
    """[B, size] bool, True at the first lengths[b] positions."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def maxk_pool(x: Tensor, lengths: Tensor, k: int) -> Tensor:
    """Per item, the mean of the top-k values of each dimension over its first len positions.

    Items shorter than k average over all their positions.
    """
    valid = length_mask(lengths, x.shape[1])[..., None]
    k = min(k, x.shape[1])
    top = x.masked_fill(~valid, float("-inf")).topk(k, dim=1).values  # [B, k, D]
    kk = lengths.clamp(max=k)
    keep = length_mask(kk, k)[..., None]
    return top.masked_fill(~keep, 0.0).sum(1) / kk[:, None].to(x.dtype)


def masked_mean(x: Tensor, lengths: Tensor) -> Tensor:
    valid = length_mask(lengths, x.shape[1])[..., None].to(x.dtype)
    return (x * valid).sum(1) / lengths[:, None].to(x.dtype)


def transformer_encoder(cfg: ModelConfig, num_layers: int) -> nn.TransformerEncoder:
    """Post-LN encoder layers with the paper's sizes; nested tensors off for exact padding."""
    layer = nn.TransformerEncoderLayer(
        d_model=cfg.embed_size,
        nhead=cfg.num_heads,
        dim_feedforward=cfg.ff_dim,
        dropout=cfg.dropout,
        activation="relu",
        batch_first=True,
    )
    return nn.TransformerEncoder(layer, num_layers=num_layers, enable_nested_tensor=False)


def residual_pool(
    feats: Tensor,
    lengths: Tensor,
    aggr: nn.TransformerEncoder,
    cfg: ModelConfig,
    normalise: bool = True,
) -> Tensor:
    """w * maxk(feats) + (1 - w) * mean(Transformer(feats)), L2-normalised unless the run
    switched it off (``img_norm`` / ``txt_norm``: the authors' no_imgnorm / no_txtnorm)."""
    pad = ~length_mask(lengths, feats.shape[1])
    related = masked_mean(aggr(feats, src_key_padding_mask=pad), lengths)
    pooled = maxk_pool(feats, lengths, cfg.maxk)
    w = cfg.residual_weight
    x = w * pooled + (1.0 - w) * related
    return l2norm(x) if normalise else x


class MLP(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear over every region row (padding included).

    ``bns[1]`` is never used; the reference creates it and its checkpoints carry it.
    """

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d_in, d_hidden), nn.Linear(d_hidden, d_out)])
        self.bns = nn.ModuleList([nn.BatchNorm1d(d_hidden), nn.BatchNorm1d(d_out)])

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        h = F.relu(self.bns[0](self.layers[0](rows)))
        return self.layers[1](h).reshape(*x.shape[:-1], -1)


class FCResidual(nn.Module):
    """H = Linear(V) + MLP(V), Xavier-uniform weights and zero biases."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.mlp = MLP(d_in, d_hidden, d_out)
        for linear in (self.fc, *self.mlp.layers):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) + self.mlp(x)


class ImageEncoder(nn.Module):
    """Region features [B, N, img_dim] -> (v [B, D], normalised by default; H [B, N, D])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.fc = FCResidual(cfg.img_dim, cfg.mlp_hidden, cfg.embed_size)
        self.aggr = transformer_encoder(cfg, num_layers=1)

    def forward(self, images: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        h = self.fc(images)
        return residual_pool(h, lengths, self.aggr, self.cfg, self.cfg.img_norm), h


class TextEncoder(nn.Module):
    """Token ids [B, L] -> (t [B, D], normalised by default; W [B, L, D] pre-pool)."""

    def __init__(self, cfg: ModelConfig, bert: BertModel):
        super().__init__()
        self.cfg = cfg
        self.bert = bert
        self.linear = nn.Linear(bert.config.hidden_size, cfg.embed_size)
        self.aggr = transformer_encoder(cfg, num_layers=1)

    def forward(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.bert(input_ids=tokens, attention_mask=(tokens != 0).long())[0]
        w = self.linear(hidden)
        return residual_pool(w, lengths, self.aggr, self.cfg, self.cfg.txt_norm), w
