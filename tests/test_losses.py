"""Losses of docs/method.md §5 against naive per-pair computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hrem_ray.model import build_model, hrem_loss
from hrem_ray.model.losses import (
    matching_loss,
    negative_weights,
    same_image,
    sample_negatives,
    triplet_from_samples,
    vse_hinge,
)


def random_pairs(b=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(b, d, generator=g), dim=1)
    t = F.normalize(torch.randn(b, d, generator=g), dim=1)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4][:b])
    return v, t, ids


def naive_weights(s, pos, cutoff, dim):
    n_a, n_c = s.shape
    out = torch.zeros(n_a, n_c, dtype=torch.float64)
    for a in range(n_a):
        logw, dist = [], []
        for c in range(n_c):
            d = max(math.sqrt(max(2 - 2 * float(s[a, c]), 0.0)), 0.5)
            with_inf = 1 - d * d / 4
            lw = (2 - dim) * math.log(d) - (dim - 3) / 2 * (
                math.log(with_inf) if with_inf > 0 else -math.inf
            )
            if pos[a, c] or not math.isfinite(lw):
                lw = 0.0
            logw.append(lw)
            dist.append(d)
        top = max(logw)
        w = [
            math.exp(lw - top) if (not pos[a, c] and dist[c] < cutoff) else 0.0
            for c, lw in enumerate(logw)
        ]
        total = sum(w)
        if total > 0:
            out[a] = torch.tensor([x / total for x in w])
    return out


@pytest.mark.parametrize("cutoff", [1.7, 1.9, 0.6])
def test_negative_weights_match_naive(cutoff):
    v, t, ids = random_pairs()
    s = v @ t.t()
    s[1, 5] = 1.0  # a distance that hits the clamp at 0.5
    pos = same_image(ids)
    got = negative_weights(s, pos, cutoff=cutoff, dim=512)
    want = naive_weights(s, pos, cutoff, 512)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    assert not got[pos].any()


def test_sampler_follows_weights_and_skips_empty_rows():
    v, t, ids = random_pairs()
    s = v @ t.t()
    pos = same_image(ids)
    w = negative_weights(s, pos, cutoff=1.7, dim=8)  # low dim: spread-out weights
    w[3] = 0.0  # an anchor with no valid negative
    counts = torch.zeros_like(w)
    g = torch.Generator().manual_seed(1)
    for _ in range(3000):
        a, p, n = sample_negatives(w, pos, g)
        assert not (a == 3).any()
        assert pos[a, p].all() and not pos[a, n].any()
        counts.index_put_((a, n), torch.ones_like(a, dtype=counts.dtype), accumulate=True)
    freq = counts / counts.sum(1, keepdim=True).clamp(min=1)
    rows = [r for r in range(8) if r != 3]
    torch.testing.assert_close(freq[rows], w[rows], atol=0.04, rtol=0)


def test_triplet_from_samples_is_a_plain_sum():
    s = torch.randn(5, 5)
    a, p, n = torch.tensor([0, 1, 4]), torch.tensor([0, 1, 4]), torch.tensor([2, 3, 0])
    want = sum(
        max(0.0, 0.3 + float(s[x, z]) - float(s[x, y])) for x, y, z in zip(a, p, n, strict=True)
    )
    assert triplet_from_samples(s, a, p, n, 0.3).item() == pytest.approx(want, rel=1e-6)


def naive_vse(s, ids, *, max_violation, mask_repeat=True, margin=0.2):
    """VSE++ per pair: negatives are other images' pairs (or, without mask_repeat, every
    off-diagonal pair)."""
    b = s.shape[0]

    def negative(i, j):
        return ids[i] != ids[j] if mask_repeat else i != j

    per_caption = [
        [max(0.0, margin + float(s[i, j] - s[i, i])) for j in range(b) if negative(i, j)]
        for i in range(b)
    ]
    per_image = [
        [max(0.0, margin + float(s[i, j] - s[j, j])) for i in range(b) if negative(i, j)]
        for j in range(b)
    ]
    agg = (lambda xs: max(xs, default=0.0)) if max_violation else sum
    return sum(agg(r) for r in per_caption) + sum(agg(c) for c in per_image)


@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("mask_repeat", [True, False])
def test_vse_hinge_matches_naive(max_violation, mask_repeat):
    v, t, ids = random_pairs()
    s = v @ t.t()
    excluded = same_image(ids) if mask_repeat else torch.eye(8, dtype=torch.bool)
    want = naive_vse(s, ids.tolist(), max_violation=max_violation, mask_repeat=mask_repeat)
    got = vse_hinge(s, excluded, margin=0.2, max_violation=max_violation)
    assert got.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("mask_repeat", [True, False])
def test_vse_sums_negatives_until_the_warmup_epoch(small_cfg, mask_repeat):
    """Epochs before vse_mean_warmup_epochs sum over negatives, later ones take the
    hardest; max_violation off sums forever."""
    small_cfg.vse_mean_warmup_epochs = 2
    small_cfg.mask_repeat = mask_repeat
    v, t, ids = random_pairs(seed=3)
    s, idl = v @ t.t(), ids.tolist()
    total = naive_vse(s, idl, max_violation=False, mask_repeat=mask_repeat)
    hardest = naive_vse(s, idl, max_violation=True, mask_repeat=mask_repeat)
    assert hardest < total
    for epoch, want in [(0, total), (1, total), (2, hardest), (7, hardest)]:
        got = matching_loss(v, t, ids, small_cfg, kind="vse", epoch=epoch)
        assert got.item() == pytest.approx(want, rel=1e-5), epoch
    small_cfg.max_violation = False
    got = matching_loss(v, t, ids, small_cfg, kind="vse", epoch=7)
    assert got.item() == pytest.approx(total, rel=1e-5)


def test_triplet_uses_the_configured_cutoff(small_cfg):
    """A cut-off below every distance leaves no valid negative: the loss is 0."""
    v, t, ids = random_pairs()
    g = torch.Generator().manual_seed(0)
    assert matching_loss(v, t, ids, small_cfg, kind="trip", generator=g) > 0
    small_cfg.cutoff = 0.01
    assert matching_loss(v, t, ids, small_cfg, kind="trip", generator=g) == 0


def test_margin_changes_the_triplet_loss(small_cfg):
    v, t, ids = random_pairs()
    losses = []
    for margin in (0.1, 0.4):
        small_cfg.margin = margin
        g = torch.Generator().manual_seed(0)
        losses.append(matching_loss(v, t, ids, small_cfg, kind="trip", generator=g))
    assert losses[1] > losses[0]


def _encoded(cfg):
    model = build_model(cfg, pretrained=False).train()
    images = torch.randn(6, 8, cfg.img_dim)
    tokens = torch.randint(1000, 3000, (6, 7))
    enc = model.encode(images, torch.full((6,), 8), tokens, torch.full((6,), 7))
    return model, enc, torch.tensor([0, 0, 1, 2, 3, 3])


def test_total_loss_warmup_switch_and_sum(small_cfg):
    small_cfg.base_loss = small_cfg.relation_loss = "vse"  # deterministic: terms recomputable
    small_cfg.warmup = 5
    model, enc, ids = _encoded(small_cfg)

    def vse(v, t):
        return matching_loss(v, t, ids, small_cfg, kind="vse")

    before = hrem_loss(model, enc, ids, iteration=4)
    torch.testing.assert_close(before.total, vse(enc.v, enc.t))
    assert set(before.parts) == {"loss", "base"}

    after = hrem_loss(model, enc, ids, iteration=5)
    rel = model.relation(enc.v, enc.t, enc.regions, enc.words, enc.token_lengths)
    want = (
        vse(enc.v, enc.t)
        + vse(enc.v, rel.t_hat)
        + vse(rel.v_hat, enc.t)
        + vse(rel.v_hat, rel.t_hat)
        + 10.0 * rel.kl
    )
    torch.testing.assert_close(after.total, want)
    assert after.parts["kl"] == pytest.approx(10.0 * rel.kl.item(), rel=1e-5)
    after.total.backward()
    assert model.relation.mlp_t2i[0].weight.grad is not None
    assert model.img_enc.fc.fc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cross_loss", [True, False])
def test_base_and_relation_losses_are_chosen_separately(small_cfg, cross_loss):
    """base 'trip' + relation 'vse': the first term is the sampled triplet loss (same
    generator draws), the relation terms VSE++; cross_loss off drops L(v,t^), L(v^,t)."""
    small_cfg.base_loss, small_cfg.relation_loss = "trip", "vse"
    small_cfg.cross_loss = cross_loss
    model, enc, ids = _encoded(small_cfg)
    out = hrem_loss(model, enc, ids, iteration=0, generator=torch.Generator().manual_seed(5))
    rel = model.relation(enc.v, enc.t, enc.regions, enc.words, enc.token_lengths)
    g = torch.Generator().manual_seed(5)
    base = matching_loss(enc.v, enc.t, ids, small_cfg, kind="trip", generator=g)
    pairs = [(enc.v, rel.t_hat), (rel.v_hat, enc.t)] if cross_loss else []
    pairs.append((rel.v_hat, rel.t_hat))
    s = [(a @ b.t()) for a, b in pairs]
    hinge = sum(naive_vse(x.detach(), ids.tolist(), max_violation=True) for x in s)
    assert out.parts["base"] == pytest.approx(base.item(), rel=1e-5)
    assert out.total.item() == pytest.approx(base.item() + hinge + 10 * rel.kl.item(), rel=1e-5)
    assert ("v_that" in out.parts) is cross_loss
