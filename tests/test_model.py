"""Every formula of the towers and the relation module against a naive computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hrem_ray.model import build_model
from hrem_ray.model.encoders import maxk_pool, residual_pool
from hrem_ray.model.relation import (
    FRAG_BUDGET_BYTES,
    InstanceRelation,
    frag_chunk_size,
    fragment_scores,
    intra_relevance,
    relation_kl,
    topk_connections,
)

torch.manual_seed(0)


def naive_l2(x: torch.Tensor) -> torch.Tensor:
    return x / (math.sqrt(float((x * x).sum().detach())) + 1e-8)


def test_maxk_pool_matches_per_item_sort():
    x = torch.randn(5, 7, 3)
    lengths = torch.tensor([7, 1, 2, 4, 3])
    got = maxk_pool(x, lengths, k=2)
    for b, n in enumerate(lengths.tolist()):
        for d in range(3):
            vals = sorted(x[b, :n, d].tolist(), reverse=True)[:2]
            assert got[b, d].item() == pytest.approx(sum(vals) / len(vals), abs=1e-6)


def test_image_tower_formula(small_cfg):
    """H = fc(V) + MLP(V) with batch-norm over every row; v = normalised residual mix."""
    model = build_model(small_cfg, pretrained=False).train()
    enc = model.img_enc
    v_in = torch.randn(3, 5, small_cfg.img_dim)
    lengths = torch.tensor([5, 2, 4])
    v, h = enc(v_in, lengths)

    rows = v_in.reshape(-1, small_cfg.img_dim)
    z = rows @ enc.fc.mlp.layers[0].weight.t() + enc.fc.mlp.layers[0].bias
    bn = enc.fc.mlp.bns[0]
    z = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + bn.eps) * bn.weight + bn.bias
    mlp = torch.relu(z) @ enc.fc.mlp.layers[1].weight.t() + enc.fc.mlp.layers[1].bias
    fc = rows @ enc.fc.fc.weight.t() + enc.fc.fc.bias
    torch.testing.assert_close(h, (fc + mlp).reshape(3, 5, -1), rtol=1e-5, atol=1e-5)

    for b, n in enumerate(lengths.tolist()):  # each item alone, no padding at all
        hb = h[b : b + 1, :n]
        related = enc.aggr(hb)[0].mean(0)
        top2 = hb[0].topk(min(2, n), dim=0).values.mean(0)
        expect = naive_l2(0.8 * top2 + 0.2 * related)
        torch.testing.assert_close(v[b], expect, rtol=1e-5, atol=1e-5)


def test_text_tower_formula(small_cfg):
    model = build_model(small_cfg, pretrained=False).eval()
    tokens = torch.tensor([[101, 1037, 3899, 102, 0, 0], [101, 2048, 2111, 2652, 2006, 102]])
    lengths = torch.tensor([4, 6])
    t, w = model.txt_enc(tokens, lengths)
    hidden = model.txt_enc.bert(input_ids=tokens, attention_mask=(tokens != 0).long())[0]
    torch.testing.assert_close(w, model.txt_enc.linear(hidden))
    alone = model.txt_enc(tokens[:1, :4], lengths[:1])[0]
    torch.testing.assert_close(t[:1], alone, rtol=1e-5, atol=1e-5)
    assert torch.allclose(t.norm(dim=1), torch.ones(2), atol=1e-5)


def test_embeddings_are_batch_independent_in_eval(small_cfg):
    model = build_model(small_cfg, pretrained=False).eval()
    images = torch.randn(4, 6, small_cfg.img_dim)
    lengths = torch.tensor([6, 6, 6, 6])
    with torch.no_grad():
        together = model.embed_images(images, lengths)
        alone = torch.cat([model.embed_images(images[i : i + 1], lengths[:1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_residual_pool_ignores_padding(small_cfg):
    model = build_model(small_cfg, pretrained=False).eval()
    x = torch.randn(2, 4, small_cfg.embed_size)
    padded = torch.cat([x, 100 * torch.randn(2, 3, small_cfg.embed_size)], dim=1)
    lengths = torch.tensor([4, 3])
    a = residual_pool(x, lengths, model.img_enc.aggr, small_cfg)
    b = residual_pool(padded, lengths, model.img_enc.aggr, small_cfg)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def naive_fragments(regions, words, word_lengths, topk=10, min_words=10):
    """Spec 5, one (caption, image) pair at a time, in plain loops."""
    n_t, n_i = words.shape[0], regions.shape[0]
    m_t2i = torch.zeros(n_t, n_i)
    k_t2i = torch.zeros(n_t, n_i, topk)
    m_i2t = torch.zeros(n_i, n_t)
    k_i2t = torch.zeros(n_i, n_t, topk)
    for j in range(n_t):
        n_w = int(word_lengths[j])
        used = max(n_w, min_words)
        cap = torch.zeros(used, words.shape[2])
        avail = min(used, words.shape[1])
        cap[:avail] = words[j, :avail]
        cap = torch.stack([naive_l2(c) if c.abs().sum() > 0 else c for c in cap])
        for i in range(n_i):
            img = torch.stack([naive_l2(r) for r in regions[i]])
            a = F.leaky_relu(cap @ img.t(), 0.1)  # [words, regions]
            a_w = a / (a.norm(dim=0, keepdim=True) + 1e-8)  # over words
            per_word = a_w.max(dim=1).values
            m_t2i[j, i] = per_word[:n_w].mean()
            k_t2i[j, i] = per_word.topk(topk).values
            a_r = a / (a.norm(dim=1, keepdim=True) + 1e-8)  # over regions
            per_region = a_r[:n_w].max(dim=0).values
            m_i2t[i, j] = per_region.mean()
            k_i2t[i, j] = per_region.topk(topk).values
    return m_t2i, k_t2i, m_i2t, k_i2t


# chunk 0 is automatic (one chunk here); 2 and 3 do not divide the 5 captions
@pytest.mark.parametrize("chunk", [0, 1, 2, 3])
@pytest.mark.parametrize("max_len", [14, 6])  # 6: batch shorter than min_words
def test_fragment_scores_match_naive_loop(max_len, chunk):
    g = torch.Generator().manual_seed(max_len)
    regions = torch.randn(4, 12, 8, generator=g)
    words = torch.randn(5, max_len, 8, generator=g)
    word_lengths = torch.randint(2, max_len + 1, (5,), generator=g)
    got = fragment_scores(regions, words, word_lengths, chunk=chunk)
    want = naive_fragments(regions, words, word_lengths)
    for a, b in zip([got.m_t2i, got.k_t2i, got.m_i2t, got.k_i2t], want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not got.m_t2i.requires_grad  # the scores feed the relation module no gradient


def test_automatic_chunk_fits_the_budget():
    per_caption = 2 * 1024 * 32 * 36 * 4  # scores + one normalised copy, fp32
    chunk = frag_chunk_size(1024, 32, 36, 4)
    assert chunk * per_caption <= FRAG_BUDGET_BYTES < (chunk + 1) * per_caption
    assert frag_chunk_size(10**6, 128, 36, 4) == 1  # never less than one caption


def test_topk_connections_match_sorting():
    s = torch.randn(6, 9)
    got = topk_connections(s, 3)
    for r in range(6):
        kth = sorted(s[r].tolist(), reverse=True)[2]
        assert got[r].tolist() == [x >= kth for x in s[r].tolist()]


def test_intra_relevance_and_kl_match_naive():
    v = F.normalize(torch.randn(4, 6), dim=1)
    t = F.normalize(torch.randn(4, 6), dim=1)
    r = intra_relevance(v)
    for a in range(4):
        for b in range(4):
            assert r[a, b].item() == pytest.approx(math.exp(-(v[a] - v[b]).norm().item()), 1e-5)
    r_i2t, r_t2i = torch.randn(4, 4), torch.randn(4, 4)

    def kl(p_logits, q_logits):
        total = 0.0
        for row in range(p_logits.shape[0]):
            p = torch.softmax(p_logits[row], 0)
            q = torch.softmax(q_logits[row], 0)
            total += sum(
                pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist(), strict=True)
            )
        return total / p_logits.shape[0]

    g = torch.tensor([[math.exp(-(v[i] - t[j]).norm().item()) for j in range(4)] for i in range(4)])
    want = kl(r_i2t, g) + kl(r_t2i, g.t())
    assert relation_kl(r_i2t, r_t2i, v, t).item() == pytest.approx(want, rel=1e-5)


def test_relation_mask_and_fusion(small_cfg):
    small_cfg.mask_weight = 1.5
    rel = InstanceRelation(small_cfg).eval()
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            rel.mlp_t2i.state_dict().values(), rel.mlp_i2t.state_dict().values(), strict=True
        )
    )
    b, d = 6, small_cfg.embed_size
    v, t = F.normalize(torch.randn(b, d), dim=1), F.normalize(torch.randn(b, d), dim=1)
    regions, words = torch.randn(b, 12, d), torch.randn(b, 11, d)
    lengths = torch.randint(3, 12, (b,))
    frags = fragment_scores(regions, words, lengths)
    mask, r_i2t, r_t2i = rel.attention_mask(v, t, frags)
    k = int(b * 0.5)

    def conn(s, diag):
        c = torch.stack([s[r] >= s[r].sort(descending=True).values[k - 1] for r in range(b)])
        return c | torch.eye(b, dtype=torch.bool) if diag else c

    connected = torch.cat(
        [
            torch.cat([conn(v @ v.t(), True), conn(frags.m_i2t, False)], 1),
            torch.cat([conn(frags.m_t2i, False), conn(t @ t.t(), True)], 1),
        ]
    )
    assert torch.equal(torch.isfinite(mask), connected)
    mlp_t2i = rel.mlp_t2i(frags.k_t2i).squeeze(-1) + frags.m_t2i
    torch.testing.assert_close(r_t2i, mlp_t2i)
    relevance = torch.cat(
        [
            torch.cat([intra_relevance(v), r_i2t], 1),
            torch.cat([r_t2i, intra_relevance(t)], 1),
        ]
    )
    torch.testing.assert_close(mask[connected], 1.5 * relevance[connected])

    # fusion: a node's output only depends on the nodes it is connected to
    out = rel(v, t, regions, words, lengths)
    assert torch.allclose(out.v_hat.norm(dim=1), torch.ones(b), atol=1e-5)
    query = 0
    unconnected = (~connected[query]).nonzero().flatten()
    assert len(unconnected) > 0
    node = int(unconnected[0])
    x = torch.cat([v, t]).clone()
    x[node] += 5.0
    fused_a = rel.fusion(torch.cat([v, t])[None], mask=mask)[0, query]
    fused_b = rel.fusion(x[None], mask=mask)[0, query]
    torch.testing.assert_close(fused_a, fused_b)


def test_relevance_mask_is_differentiable(small_cfg):
    rel = InstanceRelation(small_cfg)
    b, d = 4, small_cfg.embed_size
    v = F.normalize(torch.randn(b, d), dim=1).requires_grad_()
    t = F.normalize(torch.randn(b, d), dim=1).requires_grad_()
    out = rel(v, t, torch.randn(b, 10, d), torch.randn(b, 10, d), torch.tensor([10, 4, 6, 3]))
    grad_v, grad_t = torch.autograd.grad(out.v_hat.sum() + out.t_hat.sum(), [v, t])
    assert torch.isfinite(grad_v).all() and grad_v.abs().sum() > 0
    assert torch.isfinite(grad_t).all()
