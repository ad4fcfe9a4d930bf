"""Data-parallel HREM equals single-device training on the global batch.

Two or three gloo workers on loopback each encode their share of a global batch of 8 pairs;
with ``gather_encoded``, ``sync_batchnorm`` and ``wrap_ddp`` (which shards and chunks the
fragment scores) their loss, every gradient, the relation graph and the BatchNorm running
statistics must match one process on all 8, scoring the fragments in one piece.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hrem_ray.config import HREMConfig, ModelConfig
from hrem_ray.data.batches import Batch
from hrem_ray.model import build_model, hrem_loss
from hrem_ray.model.hrem import Encoded
from hrem_ray.model.relation import fragment_scores
from hrem_ray.testing import free_port
from hrem_ray.train.distributed import (
    GlobalBatchNorm1d,
    gather_encoded,
    shard_sizes,
    sharded_fragment_scores,
    sync_batchnorm,
    world_size,
    wrap_ddp,
)
from hrem_ray.train.loop import train_step

# (base loss, warmup): iteration is always 0, so warmup 1 leaves the relation module out.
# The same DDP object runs them in order: relation on, on, off, on again.
CASES = [("vse", 0), ("trip", 0), ("vse", 1), ("vse", 0)]
TOL = dict(rtol=1e-5, atol=1e-6)
# float64 shows the computation is the same; float32 shows what training sees, where
# different batch sizes change the order of float sums (errors ~3e-5 of a gradient's scale).
DTYPES = (torch.float64, torch.float32)
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}  # of max |reference gradient|


def deterministic_model(cfg: ModelConfig, init: dict, dtype: torch.dtype) -> nn.Module:
    """small_cfg turns HREM's own dropout off; the tiny BERT's must go too."""
    model = build_model(cfg, pretrained=False).to(dtype)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.load_state_dict(init)
    return model


def global_batch(img_dim: int) -> Batch:
    """8 pairs, 6 regions each, captions of 3..14 tokens, repeated images within and across
    the workers' shares (``share``)."""
    g = torch.Generator().manual_seed(1)
    image_ids = torch.tensor([0, 1, 1, 2, 2, 3, 0, 4])
    first = {}
    images = torch.randn(8, 6, img_dim, generator=g)
    for row, i in enumerate(image_ids.tolist()):
        images[row] = images[first.setdefault(i, row)]  # same image id, same regions
    token_lengths = torch.tensor([5, 12, 7, 3, 14, 9, 6, 11])
    tokens = torch.zeros(8, 14, dtype=torch.long)
    for row, n in enumerate(token_lengths.tolist()):
        tokens[row, :n] = torch.randint(1000, 5000, (n,), generator=g)
        tokens[row, 0], tokens[row, n - 1] = 101, 102  # [CLS] ... [SEP]
    return Batch(images, torch.full((8,), 6), tokens, token_lengths, image_ids, image_ids * 5)


def rows(batch: Batch, start: int, stop: int, dtype: torch.dtype) -> Batch:
    part = Batch(*(getattr(batch, f)[start:stop] for f in Batch.__dataclass_fields__))
    part.images = part.images.to(dtype)
    return part


def share(batch: Batch, rank: int, world: int, dtype: torch.dtype) -> Batch:
    """Rank ``rank``'s rows of the global batch (4+4 with 2 workers, 3+3+2 with 3)."""
    sizes = shard_sizes(len(batch), world)
    start = sum(sizes[:rank])
    return rows(batch, start, start + sizes[rank], dtype)


def run_case(model: nn.Module, batch: Batch, loss: str, warmup: int, gather) -> dict:
    """One forward/backward of ``hrem_loss`` on (possibly gathered) encodings."""
    core = getattr(model, "module", model)
    core.cfg.loss, core.cfg.warmup = loss, warmup
    model.train()
    model.zero_grad(set_to_none=True)
    enc, ids = gather(model(batch), batch.image_ids)
    out = hrem_loss(core, enc, ids, iteration=0, generator=torch.Generator().manual_seed(7))
    out.total.backward()
    with torch.no_grad():
        mask = core.relation(enc.v, enc.t, enc.regions, enc.words, enc.token_lengths).attn_mask
    bn = core.img_enc.fc.mlp.bns[0]
    named = core.named_parameters()
    return {
        "loss": out.total.detach(),
        "mask": mask,
        "grads": {n: p.grad if p.grad is None else p.grad.clone() for n, p in named},
        "running": (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.item()),
    }


def run_all(model: nn.Module, batch: Batch, init: dict, gather) -> dict:
    """Every case from the same weights, then one real ``train_step`` (SGD) on top."""
    core = getattr(model, "module", model)
    results = []
    for loss, warmup in CASES:
        core.load_state_dict(init)
        results.append(run_case(model, batch, loss, warmup, gather))
    core.load_state_dict(init)
    cfg = HREMConfig(model=core.cfg)
    cfg.model.loss, cfg.model.warmup = "trip", 0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(3)
    parts = train_step(model, batch, optimizer, 0, cfg, generator=gen, gather=gather)
    after = {k: v.detach().clone() for k, v in core.state_dict().items()}
    return {"cases": results, "parts": parts, "after": after}


def check_sharded_scores(rank: int, world: int) -> None:
    """Sharded and chunked fragment scores equal the one-piece ones: 7 pairs (not divisible
    by 2 or 3 workers, nor by chunks of 2 or 3), and every rank gets the whole result."""
    g = torch.Generator().manual_seed(5)
    regions, words = torch.randn(7, 6, 8, generator=g), torch.randn(7, 13, 8, generator=g)
    lengths = torch.randint(2, 14, (7,), generator=g)
    want = fragment_scores(regions, words, lengths)
    for chunk in (0, 1, 2, 3):
        got = sharded_fragment_scores(regions, words, lengths, topk=10, min_words=10, chunk=chunk)
        for name in ("m_t2i", "k_t2i", "m_i2t", "k_i2t"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), **TOL)


def check_uneven_gather(rank: int, world: int) -> None:
    """Ranks with 3 and 2 rows, different N and L: padding, order and gradient sums."""

    def local(r: int) -> Encoded:
        g = torch.Generator().manual_seed(r)
        b, n, seq = (3, 2, 4) if r == 0 else (2, 3, 2)
        return Encoded(
            torch.randn(b, 5, generator=g), torch.randn(b, 5, generator=g),
            torch.randn(b, n, 5, generator=g), torch.randn(b, seq, 5, generator=g),
            torch.randint(1, n + 1, (b,), generator=g),
            torch.randint(1, seq + 1, (b,), generator=g),
        )  # fmt: skip

    mine = local(rank)
    mine.v.requires_grad_(True)
    mine.t.requires_grad_(True)
    ids = torch.arange(len(mine.v)) + 10 * rank
    out, out_ids = gather_encoded(mine, ids)
    encs = [local(r) for r in range(world)]
    assert out_ids.tolist() == [0, 1, 2, 10, 11]
    for name in ("v", "t", "image_lengths", "token_lengths"):
        expect = torch.cat([getattr(e, name) for e in encs])
        torch.testing.assert_close(getattr(out, name), expect, rtol=0, atol=0)
    assert out.regions.shape == (5, 3, 5) and out.words.shape == (5, 4, 5)
    torch.testing.assert_close(out.regions[3:], encs[1].regions, rtol=0, atol=0)
    torch.testing.assert_close(out.regions[:3, :2], encs[0].regions, rtol=0, atol=0)
    torch.testing.assert_close(out.words[:3], encs[0].words, rtol=0, atol=0)
    assert not out.regions[:3, 2:].any() and not out.words[3:, 2:].any()
    coeff = torch.arange(25.0).reshape(5, 5)
    ((out.v * coeff).sum() + (out.t * 2 * coeff).sum()).backward()
    mine_rows = slice(0, 3) if rank == 0 else slice(3, 5)
    torch.testing.assert_close(mine.v.grad, world * coeff[mine_rows])  # summed over ranks
    torch.testing.assert_close(mine.t.grad, world * 2 * coeff[mine_rows])


def step_with_relation_dropout(
    cfg: ModelConfig, init: dict, batch: Batch, rank: int, world: int
) -> dict:
    """One train_step where each rank draws its own relation dropout masks; returns weights.

    The relation gradients then differ per rank and only ``wrap_ddp``'s averaging hook
    keeps the replicas identical.
    """
    model = deterministic_model(cfg, init, torch.float32)
    for module in model.relation.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.5
        if isinstance(module, nn.MultiheadAttention):
            module.dropout = 0.5
    ddp = wrap_ddp(model)
    torch.manual_seed(rank)
    train_cfg = HREMConfig(model=model.cfg)
    train_cfg.model.loss, train_cfg.model.warmup = "vse", 0
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    local = share(batch, rank, world, torch.float32)
    assert train_step(ddp, local, optimizer, 0, train_cfg, gather=gather_encoded) is not None
    return model.state_dict()


def worker(rank: int, world: int, port: int, tmp: Path, cfg: ModelConfig) -> None:
    try:
        init_gloo(rank, world, port, seconds=60)
        if world == 2:
            check_uneven_gather(rank, world)
        check_sharded_scores(rank, world)
        init = torch.load(tmp / "init.pt", weights_only=True)
        batch = torch.load(tmp / "batch.pt", weights_only=False)
        results = {}
        for dtype in DTYPES:
            model = deterministic_model(cfg, init, dtype)
            if rank == 1:
                torch.nn.init.normal_(model.relation.mlp_t2i[0].weight)  # rank 0's must win
            ddp = wrap_ddp(model)
            assert model.relation.score_fragments is sharded_fragment_scores
            weight = model.relation.mlp_t2i[0].weight
            assert torch.equal(weight, init["relation.mlp_t2i.0.weight"].to(dtype))
            local = share(batch, rank, world, dtype)
            results[dtype] = run_all(ddp, local, init, gather_encoded)
        results["dropout"] = step_with_relation_dropout(cfg, init, batch, rank, world)
        torch.save(results, tmp / f"rank{rank}.pt")
    except BaseException:
        (tmp / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def assert_matches(got: dict, ref: dict, rank: int, dtype: torch.dtype) -> float:
    """Every check; returns the largest gradient error relative to its tensor's scale."""
    worst = 0.0
    for i, (g, r) in enumerate(zip(got["cases"], ref["cases"], strict=True)):
        where = f"rank {rank}, {dtype}, case {CASES[i]}"
        torch.testing.assert_close(g["loss"], r["loss"], **TOL, msg=lambda m, w=where: f"{w}: {m}")
        assert g["mask"].shape == (16, 16), where  # the graph spans all 8 pairs
        torch.testing.assert_close(g["mask"], r["mask"], **TOL)
        for a, b in zip(g["running"], r["running"], strict=True):
            torch.testing.assert_close(a, b, **TOL)
        assert g["grads"].keys() == r["grads"].keys()
        for name, gg in g["grads"].items():
            rg = r["grads"][name]
            assert (gg is None) == (rg is None), f"{where}: {name} has a gradient on one side"
            if gg is None:
                continue
            scale = float(rg.abs().max())
            err = float((gg - rg).abs().max())
            msg = f"{where} {name}: error {err:.3g}, gradient scale {scale:.3g}"
            assert err <= GRAD_TOL[dtype] * scale + TOL["atol"], msg
            if scale > 1e-5:  # gradients that are mathematically 0 are only float noise
                worst = max(worst, err / scale)
    assert got["parts"] is not None
    assert float(got["parts"]["loss"]) == pytest.approx(float(ref["parts"]["loss"]), rel=1e-5)
    for name, value in got["after"].items():
        torch.testing.assert_close(value, ref["after"][name], **TOL)
    return worst


# the workers score fragments in chunks that do not divide their shares (4 or 3 captions)
@pytest.mark.timeout(240)
@pytest.mark.parametrize("world, frag_chunk", [(2, 3), (3, 2)])
def test_workers_equal_one_device_on_global_batch(small_cfg, tmp_path, world, frag_chunk):
    torch.manual_seed(0)
    init = build_model(small_cfg, pretrained=False).state_dict()
    batch = global_batch(small_cfg.img_dim)
    torch.save(init, tmp_path / "init.pt")
    torch.save(batch, tmp_path / "batch.pt")

    ctx = mp.get_context("spawn")
    port = free_port()
    worker_cfg = dataclasses.replace(small_cfg, frag_chunk=frag_chunk)
    args = [(r, world, port, tmp_path, worker_cfg) for r in range(world)]
    procs = [ctx.Process(target=worker, args=a) for a in args]
    for p in procs:
        p.start()
    try:
        ref = {  # meanwhile, the reference: one process, the whole batch
            dtype: run_all(
                deterministic_model(small_cfg, init, dtype),
                rows(batch, 0, len(batch), dtype),
                init,
                lambda enc, ids: (enc, ids),
            )
            for dtype in DTYPES
        }
        for p in procs:
            p.join(timeout=200)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    for r, p in enumerate(procs):
        err = tmp_path / f"rank{r}.err"
        detail = err.read_text() if err.exists() else "(no traceback written)"
        assert p.exitcode == 0, f"worker {r} exited with {p.exitcode}:\n{detail}"

    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for dtype in DTYPES:
        worst = max(assert_matches(got[r][dtype], ref[dtype], r, dtype) for r in range(world))
        print(f"{dtype}: largest gradient error / gradient scale {worst:.2e}")
        for other in got[1:]:
            for name, value in got[0][dtype]["after"].items():  # replicas stay bit-identical
                assert torch.equal(value, other[dtype]["after"][name]), name
    for other in got[1:]:
        for name, value in got[0]["dropout"].items():  # also with per-rank relation dropout
            assert torch.equal(value, other["dropout"][name]), f"replicas differ in {name}"


def test_single_process_gather_is_identity():
    assert world_size() == 1
    enc = Encoded(*(torch.randn(2, 3) for _ in range(4)), torch.ones(2), torch.ones(2))
    ids = torch.arange(2)
    out, out_ids = gather_encoded(enc, ids)
    assert out is enc and out_ids is ids


def test_sync_batchnorm_keeps_hrem_state_dict_keys(small_cfg):
    model = build_model(small_cfg, pretrained=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sync_batchnorm(model)
    assert isinstance(model.img_enc.fc.mlp.bns[0], GlobalBatchNorm1d)
    after = model.state_dict()
    assert list(after) == list(before)
    assert "img_enc.fc.mlp.bns.0.running_mean" in after
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_global_batchnorm_is_batchnorm_on_one_process():
    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=0.1))
    nn.init.normal_(holder[1].weight)
    nn.init.normal_(holder[1].bias)
    ref = nn.BatchNorm1d(6)
    ref.load_state_dict(holder[1].state_dict())
    keys = list(holder.state_dict())
    weight = holder[1].weight
    sync_batchnorm(holder)
    bn = holder[1]
    assert isinstance(bn, GlobalBatchNorm1d) and bn.weight is weight
    assert list(holder.state_dict()) == keys  # "1.weight", "1.running_mean", ...
    for train in (True, True, False):
        bn.train(train)
        ref.train(train)
        x = (torch.randn(10, 6) * 3 + 1).requires_grad_(True)
        x_ref = x.detach().clone().requires_grad_(True)
        y, y_ref = bn(x), ref(x_ref)
        assert torch.equal(y, y_ref)
        y.pow(2).sum().backward()
        y_ref.pow(2).sum().backward()
        assert torch.equal(x.grad, x_ref.grad)
        for k, v in ref.state_dict().items():
            assert torch.equal(bn.state_dict()[k], v), k


def test_sharded_scores_on_one_process_are_the_plain_ones():
    g = torch.Generator().manual_seed(2)
    regions, words = torch.randn(3, 4, 6, generator=g), torch.randn(5, 7, 6, generator=g)
    lengths = torch.tensor([7, 2, 5, 3, 6])
    got = sharded_fragment_scores(regions, words, lengths, topk=3, min_words=4, chunk=2)
    want = fragment_scores(regions, words, lengths, topk=3, min_words=4)
    assert got.k_i2t.shape == (3, 5, 3)
    for name in ("m_t2i", "k_t2i", "m_i2t", "k_i2t"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), **TOL)


def init_gloo(rank: int, world: int, port: int, seconds: int = 30) -> None:
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=seconds),
    )


def run_ranks(target, world: int, tmp: Path, *args, timeout: float = 120) -> list[dict]:
    """Run ``target(rank, world, port, tmp, *args)`` on ``world`` spawned gloo ranks; each
    saves ``tmp/rank{r}.pt``, which is returned. A rank that hangs is killed after
    ``timeout`` seconds and fails the test."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(target, r, world, port, tmp, *args))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=timeout)
    finally:
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    assert not hung, f"ranks {hung} still running after {timeout} s (out of step?)"
    for r, p in enumerate(procs):
        err = tmp / f"rank{r}.err"
        detail = err.read_text() if err.exists() else "(no traceback written)"
        assert p.exitcode == 0, f"worker {r} exited with {p.exitcode}:\n{detail}"
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _rank_main(target, rank: int, world: int, port: int, tmp: Path, *args) -> None:
    try:
        init_gloo(rank, world, port)
        torch.save(target(rank, world, *args), tmp / f"rank{rank}.pt")
    except BaseException:
        (tmp / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def nan_on_one_rank(rank: int, world: int, cfg: ModelConfig) -> dict:
    """Three DDP steps; rank 1 alone sees a NaN loss at the second."""
    import hrem_ray.train.loop as loop
    from hrem_ray.model.hrem import LossOutput

    calls: list[int] = []

    def flaky(core, enc, ids, iteration, generator=None, **kw):
        out = hrem_loss(core, enc, ids, iteration, generator, **kw)
        calls.append(iteration)
        if rank == 1 and len(calls) == 2:
            return LossOutput(out.total * float("nan"), out.parts)
        return out

    loop.hrem_loss = flaky
    torch.manual_seed(0)  # the same initial weights on every rank
    model = build_model(cfg, pretrained=False)
    ddp = wrap_ddp(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    train_cfg = HREMConfig(model=model.cfg)
    local = share(global_batch(cfg.img_dim), rank, world, torch.float32)
    skipped = []
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        parts = train_step(ddp, local, optimizer, step, train_cfg, generator=gen,
                           gather=gather_encoded)  # fmt: skip
        skipped.append(parts is None)
    return {"skipped": skipped, "calls": calls, "weights": model.state_dict()}


@pytest.mark.timeout(180)
def test_non_finite_loss_on_one_rank_skips_the_step_on_all(small_cfg, tmp_path):
    """Without the agreed flag rank 0 would enter DDP's gradient all-reduce alone at the
    second step and the ranks would fall out of step (a hang under NCCL)."""
    got = run_ranks(nan_on_one_rank, 2, tmp_path, small_cfg)
    assert [g["skipped"] for g in got] == [[False, True, False]] * 2
    assert got[0]["calls"] == got[1]["calls"] == [0, 1, 2]
    for name, value in got[0]["weights"].items():  # still in step: identical replicas
        assert torch.equal(value, got[1]["weights"][name]), name


BN_ROWS = 3500  # per rank; bf16 holds 8 significant bits, so it would count 3,504


def bf16_batchnorm(rank: int, world: int) -> dict:
    g = torch.Generator().manual_seed(rank)
    x = (torch.randn(BN_ROWS, 4, generator=g) * 2 + 3).bfloat16()  # what a bf16 Linear gives
    bn = GlobalBatchNorm1d(4, momentum=1.0)  # running stats = this batch's statistics
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bn(x)
    return {"x": x, "y": y, "mean": bn.running_mean, "var": bn.running_var}


@pytest.mark.timeout(180)
def test_global_batchnorm_statistics_under_bf16_autocast(tmp_path):
    got = run_ranks(bf16_batchnorm, 2, tmp_path)
    x = torch.cat([g["x"] for g in got]).double()
    mean, var = x.mean(0), x.var(0)  # the running variance is the unbiased one
    for g in got:
        torch.testing.assert_close(g["mean"].double(), mean, rtol=1e-6, atol=0)
        torch.testing.assert_close(g["var"].double(), var, rtol=1e-5, atol=0)
        assert g["y"].dtype == torch.bfloat16
    y = (x - mean) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(torch.cat([g["y"] for g in got]).double(), y, rtol=1e-2, atol=1e-2)
