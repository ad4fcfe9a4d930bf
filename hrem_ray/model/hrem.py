"""HREM: two towers for retrieval plus the instance-level relation module for training.

``encode`` runs the towers on a (local) batch; ``hrem_loss`` runs on encodings that may
have been all-gathered from every worker, so the relation graph and the negatives span
the global batch (docs/global-batch.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import BertModel

from hrem_ray.config import ModelConfig
from hrem_ray.model.encoders import ImageEncoder, TextEncoder
from hrem_ray.model.losses import matching_loss
from hrem_ray.model.relation import InstanceRelation


@dataclass
class Encoded:
    """Tower outputs of one batch of (image, caption) pairs."""

    v: Tensor  # [B, D] image embeddings, normalised
    t: Tensor  # [B, D] caption embeddings, normalised
    regions: Tensor  # [B, N, D] pre-pool image features H
    words: Tensor  # [B, L, D] pre-pool word features W
    image_lengths: Tensor  # [B]
    token_lengths: Tensor  # [B]


@dataclass
class LossOutput:
    total: Tensor
    # Detached 0-dim tensors, for logging: read them (a host sync each) only when logging.
    parts: dict[str, Tensor]


class HREM(nn.Module):
    def __init__(self, cfg: ModelConfig, bert: BertModel):
        super().__init__()
        self.cfg = cfg
        self.img_enc = ImageEncoder(cfg)
        self.txt_enc = TextEncoder(cfg, bert)
        self.relation = InstanceRelation(cfg)

    def enable_grad_checkpoint(self) -> None:
        """Recompute BERT's layers and the fusion Transformer in backward instead of keeping
        their activations: memory for a larger global batch, which the relation graph gains
        from (docs/method.md §4). Dropout masks are replayed, so the result is unchanged."""
        bert, kwargs = self.txt_enc.bert, {"use_reentrant": False}
        if hasattr(bert, "activation_checkpointing_enable"):  # transformers >= 5.x
            bert.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            bert.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.relation.grad_checkpoint = True

    def compile_towers(self) -> None:
        """``torch.compile`` both towers in place (state_dict keys unchanged); the relation
        module stays eager: its graph depends on the data (top-k thresholds)."""
        self.img_enc.compile()
        self.txt_enc.compile()

    def embed_images(self, images: Tensor, lengths: Tensor) -> Tensor:
        return self.img_enc(images, lengths)[0]

    def embed_texts(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        return self.txt_enc(tokens, lengths)[0]

    def encode(
        self, images: Tensor, image_lengths: Tensor, tokens: Tensor, token_lengths: Tensor
    ) -> Encoded:
        v, regions = self.img_enc(images, image_lengths)
        t, words = self.txt_enc(tokens, token_lengths)
        return Encoded(v, t, regions, words, image_lengths, token_lengths)

    def forward(self, batch) -> Encoded:
        """Encode a ``hrem_ray.data.batches.Batch``."""
        return self.encode(batch.images, batch.image_lengths, batch.tokens, batch.token_lengths)


def relation_active(cfg: ModelConfig, iteration: int) -> bool:
    """The relation module joins the loss once ``warmup`` iterations have run."""
    return iteration >= cfg.warmup


def hrem_loss(
    model: HREM,
    enc: Encoded,
    image_ids: Tensor,
    iteration: int,
    generator: torch.Generator | None = None,
    *,
    epoch: int | None = None,
) -> LossOutput:
    """L(v,t) + [after warmup] L(v,t^) + L(v^,t) + L(v^,t^) + kl_weight * KL, HREM's
    objective (docs/deviations.md for our differences). ``base_loss`` and ``relation_loss``
    pick the loss of the first and the other terms; without ``cross_loss`` the two cross
    terms are left out. ``epoch`` drives the VSE++ warm-up (None: past it)."""
    cfg = model.cfg

    def loss(kind: str, v: Tensor, t: Tensor) -> Tensor:
        return matching_loss(v, t, image_ids, cfg, kind=kind, epoch=epoch, generator=generator)

    base = loss(cfg.base_loss, enc.v, enc.t)
    if not relation_active(cfg, iteration):
        return LossOutput(base, {"loss": base.detach(), "base": base.detach()})
    rel = model.relation(enc.v, enc.t, enc.regions, enc.words, enc.token_lengths)
    kind = cfg.relation_loss
    cross = (
        {"v_that": loss(kind, enc.v, rel.t_hat), "vhat_t": loss(kind, rel.v_hat, enc.t)}
        if cfg.cross_loss
        else {}
    )
    terms = {
        "base": base,
        **cross,
        "vhat_that": loss(kind, rel.v_hat, rel.t_hat),
        "kl": cfg.kl_weight * rel.kl,
    }
    total = sum(terms.values())
    parts = {"loss": total.detach(), **{k: v.detach() for k, v in terms.items()}}
    return LossOutput(total, parts)


def build_model(cfg: ModelConfig, *, pretrained: bool = True) -> HREM:
    """HREM with its BERT from ``cfg.bert_path`` (pretrained weights, or random from config)."""
    from hrem_ray.backbone import build_bert

    cfg.validate()
    return HREM(cfg, build_bert(cfg.bert_path, pretrained=pretrained))
