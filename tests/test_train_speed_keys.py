"""The training speed keys (``train.grad_checkpoint``, ``fused_adamw``, ``compile``, ``tf32``)
against the plain path on CPU: the same loss, gradients and weights after one AdamW step,
to float tolerance (docs/training.md)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hrem_ray.train.loop as loop
from hrem_ray.config import HREMConfig, ModelConfig
from hrem_ray.data.batches import Batch
from hrem_ray.model import build_model
from hrem_ray.train.loop import apply_train_keys, tf32_matmuls, train_step
from hrem_ray.train.optim import build_optimizer

TOL = dict(rtol=1e-5, atol=1e-6)


def batch(img_dim: int) -> Batch:
    """8 pairs with repeated images, ragged regions and captions."""
    g = torch.Generator().manual_seed(0)
    image_ids = torch.tensor([0, 1, 1, 2, 3, 3, 4, 5])
    token_lengths = torch.tensor([5, 12, 7, 3, 14, 9, 6, 11])
    tokens = torch.zeros(8, 14, dtype=torch.long)
    for row, n in enumerate(token_lengths.tolist()):
        tokens[row, :n] = torch.randint(1000, 5000, (n,), generator=g)
        tokens[row, 0], tokens[row, n - 1] = 101, 102
    images = torch.randn(8, 6, img_dim, generator=g)
    lengths = torch.tensor([6, 4, 4, 5, 6, 6, 3, 6])
    return Batch(images, lengths, tokens, token_lengths, image_ids, image_ids * 5)


def step(model_cfg: ModelConfig, dropout: bool, **keys) -> dict:
    """One train_step from fixed weights with the relation module on; what it computed."""
    cfg = HREMConfig(model=copy.deepcopy(model_cfg))
    cfg.model.dropout = 0.1 if dropout else 0.0
    for key, value in keys.items():
        setattr(cfg.train, key, value)
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False)
    if not dropout:
        for module in model.modules():  # the tiny BERT's own dropout too
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    apply_train_keys(model, cfg.train)
    optimizer = build_optimizer(model, cfg.train)
    grads = {}
    real_step = optimizer.step

    def capture(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return real_step(*args, **kwargs)

    optimizer.step = capture
    torch.manual_seed(1)  # the same dropout masks on both paths
    parts = train_step(model, batch(cfg.model.img_dim), optimizer, 0, cfg,
                       generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert parts is not None
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"loss": parts["loss"], "grads": grads, "weights": weights}


def assert_same(got: dict, ref: dict, tol: dict = TOL) -> None:
    """Loss, gradients and weights after the step. AdamW's first step is about lr * sign(g),
    so where a gradient is float noise around a mathematically zero value (the bias before
    BatchNorm, attention's key bias) its sign, and that weight, is arbitrary: those weights
    are left out."""
    torch.testing.assert_close(got["loss"], ref["loss"], **tol)
    assert got["grads"].keys() == ref["grads"].keys()
    for name, g in got["grads"].items():
        rg = ref["grads"][name]
        torch.testing.assert_close(g, rg, **tol, msg=lambda m, n=name: f"{n}: {m}")
        real = rg.abs() > 1e-6
        w, rw = got["weights"][name][real], ref["weights"][name][real]
        torch.testing.assert_close(w, rw, **tol, msg=lambda m, n=name: f"{n}: {m}")
    assert got["weights"].keys() == ref["weights"].keys()


def saved_bytes(model_cfg: ModelConfig, grad_checkpoint: bool) -> int:
    """Bytes of activations autograd keeps for backward in one training forward + loss."""
    cfg = HREMConfig(model=copy.deepcopy(model_cfg))
    cfg.train.grad_checkpoint = grad_checkpoint
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained=False)
    apply_train_keys(model, cfg.train)
    model.train()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        b = batch(cfg.model.img_dim)
        loop.hrem_loss(model, model(b), b.image_ids, 0, torch.Generator().manual_seed(2))
    return total


@pytest.mark.parametrize("dropout", [False, True])
def test_grad_checkpoint_is_exact(small_cfg, dropout):
    """Recomputation replays the dropout masks, so even with dropout nothing changes."""
    assert_same(step(small_cfg, dropout, grad_checkpoint=True), step(small_cfg, dropout))


def test_grad_checkpoint_keeps_fewer_activations(small_cfg):
    plain, checkpointed = saved_bytes(small_cfg, False), saved_bytes(small_cfg, True)
    assert checkpointed < 0.8 * plain, (checkpointed, plain)


def test_fused_adamw_is_the_same_update(small_cfg):
    fused = step(small_cfg, True, fused_adamw=True)
    plain = step(small_cfg, True)
    for name, g in fused["grads"].items():  # the same forward and backward, bit for bit
        assert torch.equal(g, plain["grads"][name]), name
    assert_same(fused, plain)


def test_compile_is_exact_without_dropout(small_cfg):
    """``torch.compile`` draws dropout masks from its own generator, so the comparison runs
    with dropout off; the compiled kernels then give the eager numbers to float tolerance."""
    try:
        compiled = step(small_cfg, False, compile=True)
    except Exception as e:  # no C++ toolchain or inductor support on this machine
        if "inductor" not in type(e).__module__ and "dynamo" not in type(e).__module__:
            raise
        pytest.skip(f"torch.compile unavailable here: {type(e).__name__}: {e}"[:300])
    assert_same(compiled, step(small_cfg, False), dict(rtol=1e-4, atol=1e-5))


@pytest.mark.parametrize("enabled", [True, False])
def test_tf32_is_set_inside_fit_only(enabled):
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with tf32_matmuls(enabled):
        assert torch.backends.cuda.matmul.allow_tf32 is enabled
        assert torch.backends.cudnn.allow_tf32 is enabled
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_speed_keys_default_off_where_they_change_numbers():
    train = HREMConfig().train
    assert (train.compile, train.grad_checkpoint, train.tf32, train.fused_adamw) == (False,) * 4
    assert train.pin_memory  # changes no number: only how batches reach the GPU
