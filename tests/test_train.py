"""The training recipe: parameter groups, lr schedule, clipping, NaN skips, model selection
and exact resume of ``train_local``."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import hrem_ray.train.loop as loop
from hrem_ray.checkpoint import load_checkpoint, load_train_state
from hrem_ray.config import HREMConfig, TrainConfig
from hrem_ray.data.source import encoded, open_source
from hrem_ray.data.tokenize import CaptionTokenizer
from hrem_ray.model import build_model, hrem_loss
from hrem_ray.model.hrem import LossOutput
from hrem_ray.train.local import train_local
from hrem_ray.train.loop import (
    TrainState,
    fit,
    restore_train_state,
    train_epoch,
    train_state_dict,
    train_step,
)
from hrem_ray.train.optim import build_optimizer, lr_factor, param_groups, set_epoch_lr
from hrem_ray.train.setup import RunExistsError


@pytest.fixture
def cfg(small_cfg, synth_root) -> HREMConfig:
    cfg = HREMConfig(model=small_cfg)
    cfg.data.data_path = str(synth_root)
    cfg.train.batch_size = 16
    cfg.train.eval_batch_size = 16
    cfg.train.log_every = 10_000
    return cfg.validate()


@pytest.fixture
def batches(cfg):
    """Three augmented training batches of 16 pairs from the synthetic train split."""
    split = open_source(cfg.data.data_path, cfg.data.dataset, "train")
    tokenizer = CaptionTokenizer.from_dir(cfg.model.bert_path)
    tokens = encoded(split.captions, tokenizer)
    it = iter(split.batches(tokens, tokenizer, cfg.train.batch_size, seed=0, epoch=0))
    return [next(it) for _ in range(3)]


def params_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------- optimiser


def test_param_groups_lrs_and_partition(cfg):
    model = build_model(cfg.model, pretrained=False)
    frozen = next(model.img_enc.parameters())
    frozen.requires_grad_(False)
    tc = TrainConfig(lr=1e-3, bert_lr_factor=0.1, relation_lr_factor=0.5)
    opt = build_optimizer(model, tc)
    assert isinstance(opt, torch.optim.AdamW)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"bert", "relation", "towers"}

    expected = {"bert": 1e-4, "relation": 5e-4, "towers": 1e-3}
    by_id = {}
    for name, p in model.named_parameters():
        if name.startswith("txt_enc.bert."):
            by_id[id(p)] = "bert"
        elif name.startswith("relation."):
            by_id[id(p)] = "relation"
        elif p.requires_grad:
            by_id[id(p)] = "towers"
    for gname, g in groups.items():
        assert g["lr"] == pytest.approx(expected[gname])
        assert g["base_lr"] == pytest.approx(expected[gname])
        assert g["weight_decay"] == 1e-4
        assert g["params"], gname
        assert all(by_id[id(p)] == gname for p in g["params"])
    # every trainable parameter in exactly one group; the frozen one in none
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert id(frozen) not in ids
    # the text tower's projection is not BERT: full lr
    assert any(p is model.txt_enc.linear.weight for p in groups["towers"]["params"])


def test_param_groups_see_through_ddp_prefix(cfg):
    class Wrapper(nn.Module):  # names every parameter "module.<name>", as DDP does
        def __init__(self, m):
            super().__init__()
            self.module = m

    model = build_model(cfg.model, pretrained=False)
    plain = {g["name"]: len(g["params"]) for g in param_groups(model, TrainConfig())}
    wrapped = {g["name"]: len(g["params"]) for g in param_groups(Wrapper(model), TrainConfig())}
    assert wrapped == plain
    assert plain["bert"] == len(list(model.txt_enc.bert.parameters()))
    assert plain["relation"] == len(list(model.relation.parameters()))


# --------------------------------------------------------------------------- schedule


def test_lr_factor_steps_at_0_based_milestones():
    tc = TrainConfig()  # milestones [15, 25], decay 0.1
    for epoch in range(40):
        expected = 1.0 if epoch < 15 else (0.1 if epoch < 25 else 0.01)
        assert lr_factor(epoch, tc) == pytest.approx(expected), epoch
    assert lr_factor(3, TrainConfig(lr_decay_epochs=[], lr_decay=0.1)) == 1.0
    assert lr_factor(4, TrainConfig(lr_decay_epochs=[2, 4], lr_decay=0.5)) == pytest.approx(0.25)


def test_set_epoch_lr_is_absolute_and_survives_state_dict(cfg):
    model = build_model(cfg.model, pretrained=False)
    tc = TrainConfig()
    opt = build_optimizer(model, tc)
    base = {g["name"]: g["lr"] for g in opt.param_groups}
    for epoch, factor in [(20, 0.1), (26, 0.01), (3, 1.0), (15, 0.1), (15, 0.1)]:
        assert set_epoch_lr(opt, epoch, tc) == pytest.approx(factor)
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(base[g["name"]] * factor)
    # a fresh optimizer loaded from a decayed one still knows its base lrs
    fresh = build_optimizer(build_model(cfg.model, pretrained=False), tc)
    fresh.load_state_dict(opt.state_dict())
    set_epoch_lr(fresh, 25, tc)
    for g in fresh.param_groups:
        assert g["lr"] == pytest.approx(base[g["name"]] * 0.01)


# --------------------------------------------------------------------------- train_step


def test_train_step_clips_total_grad_norm(cfg, batches, monkeypatch):
    cfg.train.grad_clip = 2.0
    model = build_model(cfg.model, pretrained=False)
    reference = copy.deepcopy(model)
    batch = batches[0]

    def scaled_loss(*args, **kwargs):
        out = hrem_loss(*args, **kwargs)
        return LossOutput(out.total * 1e4, out.parts)

    # unclipped gradients of the same (scaled) loss, computed independently; the tiny BERT
    # keeps its config's dropout, so both forwards start from the same torch RNG state
    reference.train()
    torch.manual_seed(3)
    ref_loss = scaled_loss(reference, reference(batch), batch.image_ids, 0,
                           torch.Generator().manual_seed(7))  # fmt: skip
    ref_loss.total.backward()
    ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters() if p.grad is not None}
    ref_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in ref_grads.values()))
    assert ref_norm > 100  # the setup really has huge gradients

    monkeypatch.setattr(loop, "hrem_loss", scaled_loss)
    opt = build_optimizer(model, cfg.train)
    seen = {}
    real_step = opt.step

    def capturing_step(*args, **kwargs):
        seen["grads"] = {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }
        return real_step(*args, **kwargs)

    monkeypatch.setattr(opt, "step", capturing_step)
    before = params_copy(model)
    torch.manual_seed(3)
    parts = train_step(model, batch, opt, 0, cfg, generator=torch.Generator().manual_seed(7))

    assert parts is not None
    assert parts["grad_norm"] == pytest.approx(float(ref_norm), rel=1e-4)  # pre-clip norm
    grads = seen["grads"]
    assert grads.keys() == ref_grads.keys()
    clipped_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
    assert float(clipped_norm) == pytest.approx(2.0, rel=1e-4)
    # one global scale over all parameters, not a per-parameter clip
    scale = 2.0 / ref_norm
    for n, g in grads.items():
        torch.testing.assert_close(g.double(), ref_grads[n].double() * scale,
                                   rtol=1e-3, atol=1e-9)  # fmt: skip
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def nan_loss(*args, **kwargs):
    out = hrem_loss(*args, **kwargs)
    return LossOutput(out.total * float("nan"), {**out.parts, "loss": float("nan")})


def test_non_finite_loss_skips_the_step(cfg, batches, monkeypatch):
    model = build_model(cfg.model, pretrained=False)
    opt = build_optimizer(model, cfg.train)
    monkeypatch.setattr(loop, "hrem_loss", nan_loss)
    before = params_copy(model)
    assert train_step(model, batches[0], opt, 0, cfg) is None
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None
    assert not opt.state  # AdamW never stepped


def test_train_epoch_counts_skipped_steps(cfg, batches, monkeypatch):
    model = build_model(cfg.model, pretrained=False)
    opt = build_optimizer(model, cfg.train)
    calls: list[int] = []

    def nan_on_second_call(model_, enc, image_ids, iteration, generator=None, **kw):
        calls.append(iteration)
        fn = nan_loss if len(calls) == 2 else hrem_loss
        return fn(model_, enc, image_ids, iteration, generator, **kw)

    monkeypatch.setattr(loop, "hrem_loss", nan_on_second_call)
    state = TrainState(iteration=5)
    cfg.train.log_every = 1
    lines: list[str] = []
    metrics = train_epoch(model, batches, opt, state, cfg, log=lines.append)
    assert metrics["steps"] == 2
    assert metrics["skipped_steps"] == 1
    assert state.iteration == 7
    assert calls == [5, 6, 6]  # the skipped step did not advance the iteration
    assert math.isfinite(metrics["train_loss"])  # NaN parts are not averaged in
    assert len(lines) == 2  # one progress line per step taken, none for the skipped one


# --------------------------------------------------------------------------- fit


def test_fit_selects_on_dev_rsum(cfg):
    cfg.train.epochs = 3
    cfg.train.lr_decay_epochs = [1]
    model = build_model(cfg.model, pretrained=False)
    opt = build_optimizer(model, cfg.train)
    rsums = iter([10.0, 30.0, 20.0])
    epochs_asked: list[int] = []
    reports = []

    def epoch_batches(epoch):
        epochs_asked.append(epoch)
        return []

    def report(r):
        reports.append((r.epoch, r.is_best, r.metrics["rsum"], r.state.best_epoch,
                        len(r.state.history)))  # fmt: skip

    state = fit(model, opt, cfg, epoch_batches=epoch_batches,
                evaluate=lambda m: {"rsum": next(rsums), "name": "dev"}, report=report,
                log=None)  # fmt: skip
    assert epochs_asked == [0, 1, 2]
    assert reports == [(0, True, 10.0, 0, 1), (1, True, 30.0, 1, 2), (2, False, 20.0, 1, 3)]
    assert state.best_epoch == 1 and state.best_rsum == 30.0
    assert state.epoch == 3
    assert [h["epoch"] for h in state.history] == [0, 1, 2]
    assert [h["rsum"] for h in state.history] == [10.0, 30.0, 20.0]
    assert [h["lr_factor"] for h in state.history] == pytest.approx([1.0, 0.1, 0.1])
    assert all("name" not in h for h in state.history)  # history keeps scalars only


def test_fit_continues_from_state_and_without_evaluate(cfg):
    cfg.train.epochs = 3
    model = build_model(cfg.model, pretrained=False)
    opt = build_optimizer(model, cfg.train)
    reports = []
    state = TrainState(epoch=2, iteration=9, best_rsum=50.0, best_epoch=1,
                       history=[{"epoch": 0}, {"epoch": 1}])  # fmt: skip
    state = fit(model, opt, cfg, epoch_batches=lambda e: [], evaluate=None,
                report=reports.append, state=state, log=None)  # fmt: skip
    assert [r.epoch for r in reports] == [2]
    assert reports[0].is_best is False
    assert state.best_epoch == 1 and state.iteration == 9 and len(state.history) == 3


@pytest.mark.parametrize("flush", [True, False])
def test_fit_flushes_denormals_only_while_it_runs(cfg, flush):
    cfg.train.epochs = 2
    cfg.train.flush_denormal = flush
    model = build_model(cfg.model, pretrained=False)
    seen = []

    def epoch_batches(epoch):
        seen.append(float(torch.tensor(1e-40) * 1.0) == 0.0)  # float32 subnormal flushed?
        return []

    before = loop.flushing_denormals()
    fit(model, build_optimizer(model, cfg.train), cfg, epoch_batches=epoch_batches,
        evaluate=None, report=lambda r: None, log=None)  # fmt: skip
    assert seen == [flush, flush]
    assert loop.flushing_denormals() is before is False  # restored (hypothesis checks it)


def test_zero_bert_lr_factor_freezes_the_backbone(cfg, batches):
    """The frozen-backbone baseline: no BERT parameter gets a gradient or changes, and
    the rest of the model still trains."""
    cfg.train.bert_lr_factor = 0.0
    model = build_model(cfg.model, pretrained=False)
    opt = build_optimizer(model, cfg.train)
    assert [g["name"] for g in opt.param_groups] == ["relation", "towers"]
    before = params_copy(model)
    for batch in batches:
        assert train_step(model, batch, opt, 10**6, cfg, generator=torch.Generator()) is not None
    changed = set()
    for name, p in model.named_parameters():
        is_bert = name.startswith("txt_enc.bert.")
        assert p.requires_grad is not is_bert
        if is_bert:
            assert p.grad is None and torch.equal(p, before[name]), name
        elif not torch.equal(p, before[name]):
            changed.add(name.split(".")[0])
    assert changed == {"img_enc", "txt_enc", "relation"}


# --------------------------------------------------------------------------- train_local resume


def resume_cfg(cfg: HREMConfig, epochs: int) -> HREMConfig:
    """Dropout on (torch RNG matters), the relation module switching on in epoch 1
    (iteration matters) and an lr decay at epoch 1 (schedule matters)."""
    c = HREMConfig.from_dict(copy.deepcopy(cfg.to_dict()))
    c.model.dropout = 0.1
    c.model.warmup = 15  # 200 pairs / batch 16 = 12 steps per epoch
    c.train.lr_decay_epochs = [1]
    c.train.epochs = epochs
    return c.validate()


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_local_resume_equals_straight_run(cfg, tmp_path):
    quiet = lambda *_: None  # noqa: E731
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_local(resume_cfg(cfg, 2), straight, log=quiet)
    train_local(resume_cfg(cfg, 1), resumed, log=quiet)
    assert [m["epoch"] for m in read_metrics(resumed)] == [0]
    train_local(resume_cfg(cfg, 2), resumed, resume=True, log=quiet)

    a = load_checkpoint(straight / "last").model.state_dict()
    b = load_checkpoint(resumed / "last").model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)

    sa, sb = load_train_state(straight / "last"), load_train_state(resumed / "last")
    assert sa["state"]["epoch"] == sb["state"]["epoch"] == 2
    assert sa["state"]["iteration"] == sb["state"]["iteration"] == 24
    torch.testing.assert_close(sa["rng"]["torch"], sb["rng"]["torch"], rtol=0, atol=0)
    assert "sampler" not in sa["rng"]  # re-seeded per epoch: portable across device kinds
    for ga, gb in zip(sa["optimizer"]["param_groups"], sb["optimizer"]["param_groups"],
                      strict=True):  # fmt: skip
        assert ga["lr"] == pytest.approx(gb["lr"]) == pytest.approx(0.1 * ga["base_lr"])

    ma, mb = read_metrics(straight), read_metrics(resumed)
    assert [m["epoch"] for m in ma] == [0, 1]
    assert [m["epoch"] for m in mb] == [0, 1]  # no epoch recorded twice
    for x, y in zip(ma, mb, strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
        assert x["rsum"] == pytest.approx(y["rsum"])
        assert "train_v_that" in x if x["epoch"] == 1 else "train_v_that" not in x

    # a finished run resumed again trains nothing more
    train_local(resume_cfg(cfg, 2), resumed, resume=True, log=quiet)
    assert len(read_metrics(resumed)) == 2

    # the same run folder without resume is refused, and nothing is touched
    with pytest.raises(RunExistsError):
        train_local(resume_cfg(cfg, 2), straight, log=quiet)
    assert read_metrics(straight) == ma


def test_train_epoch_drives_the_vse_warm_up(cfg, batches):
    """VSE++ sums over negatives during ``vse_mean_warmup_epochs`` and takes the hardest
    negative after: the epoch reaches the loss through train_epoch and train_step."""
    cfg.model.base_loss = cfg.model.relation_loss = "vse"
    cfg.model.max_violation, cfg.model.vse_mean_warmup_epochs = True, 1
    cfg.model.warmup = 10**9  # base loss only
    losses = {}
    for epoch in (0, 1):
        torch.manual_seed(0)
        model = build_model(cfg.model, pretrained=False)
        state = TrainState(epoch=epoch)
        m = train_epoch(model, batches[:1], build_optimizer(model, cfg.train), state, cfg, log=None)
        losses[epoch] = m["train_loss"]
    # sum over every negative, then only the hardest per row and column: far smaller
    assert losses[1] < losses[0] / 2


# --------------------------------------------------------------------------- resume across devices


class CudaGenerator:
    """Stands in for the sampler's generator of a run on ``cuda:1`` (train_state_dict and
    restore_train_state read only its device), so the CUDA code path runs on CPU."""

    device = torch.device("cuda", 1)


def fake_cuda_rng(monkeypatch) -> list[tuple]:
    calls: list[tuple] = []

    def get_rng_state(device="cuda"):
        calls.append(("get", torch.device(device)))
        return torch.zeros(16, dtype=torch.uint8)  # a CUDA generator state: 16 bytes

    def set_rng_state(state, device="cuda"):
        calls.append(("set", torch.device(device), state.numel()))

    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    return calls


def test_cuda_rng_state_is_the_training_devices(cfg, monkeypatch):
    """Under ``--device cuda:1`` the CUDA RNG saved and restored is cuda:1's, not the
    current device's (cuda:0)."""
    calls = fake_cuda_rng(monkeypatch)
    model = build_model(cfg.model, pretrained=False)
    opt = build_optimizer(model, cfg.train)
    saved = train_state_dict(opt, TrainState(epoch=3), CudaGenerator())
    assert calls == [("get", torch.device("cuda", 1))]
    assert restore_train_state(saved, opt, CudaGenerator()).epoch == 3
    assert calls[1:] == [("set", torch.device("cuda", 1), 16)]


def test_train_state_resumes_on_another_device_kind(cfg, monkeypatch):
    """Saved on CPU, restored on the CUDA path, and saved on CUDA (with an old-style
    ``sampler`` state of 16 bytes), restored on CPU: neither raises (a CPU generator wants
    5,056 bytes, a CUDA one 16); the sampler's state is not carried, fit re-seeds it."""
    calls = fake_cuda_rng(monkeypatch)
    model = build_model(cfg.model, pretrained=False)
    opt = build_optimizer(model, cfg.train)
    cpu_gen = torch.Generator().manual_seed(0)
    on_cpu = train_state_dict(opt, TrainState(epoch=1), cpu_gen)
    assert set(on_cpu["rng"]) == {"torch"}
    assert restore_train_state(on_cpu, opt, CudaGenerator()).epoch == 1
    assert calls == []  # no CUDA state to restore, and none invented

    on_cuda = train_state_dict(opt, TrainState(epoch=2), CudaGenerator())
    on_cuda["rng"]["sampler"] = torch.zeros(16, dtype=torch.uint8)  # what older CUDA runs wrote
    with pytest.raises(RuntimeError, match="size"):
        cpu_gen.set_state(on_cuda["rng"]["sampler"])  # what restoring used to do
    assert restore_train_state(on_cuda, opt, cpu_gen).epoch == 2
    assert calls == [("get", torch.device("cuda", 1))]  # a CPU run leaves CUDA's RNG alone


def test_fit_reseeds_the_sampler_from_seed_and_epoch(cfg):
    """Whatever state the generator comes in with, the epoch draws the same negatives."""
    cfg.train.epochs = 1
    draws = []
    for warm in (0, 5):
        gen = torch.Generator().manual_seed(123)
        torch.rand(warm, generator=gen)  # a generator in another state (e.g. a resumed run)
        torch.manual_seed(0)
        model = build_model(cfg.model, pretrained=False)
        seen = []

        def batches(epoch):
            return []

        def record(r, gen=gen, seen=seen):
            seen.append(torch.rand(4, generator=gen))

        fit(model, build_optimizer(model, cfg.train), cfg, epoch_batches=batches,
            evaluate=None, report=record, generator=gen, log=None)  # fmt: skip
        draws.append(seen[0])
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)
