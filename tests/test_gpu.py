"""Checks that need CUDA (``pytest -m gpu``; skipped without it; bench/gpu_check.sh runs them).

One GPU cannot hold two NCCL ranks, so the gathered, globally normalised and sharded paths of
distributed training are tested on CPU with gloo (tests/test_distributed.py); here is what
one GPU can check: a training step against the CPU in float64, bf16 drift, the step where
the relation module switches on, the CUDA generator and RNG on resume, pinned copies, fused
AdamW and compile; evaluation, embedding and a 1-worker Ray Train run on the GPU.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from hrem_ray.checkpoint import read_record
from hrem_ray.cli import main
from hrem_ray.config import HREMConfig, ModelConfig
from hrem_ray.data.batches import Batch
from hrem_ray.eval.metrics import placed
from hrem_ray.model import build_model, hrem_loss
from hrem_ray.synth import write_synthetic
from hrem_ray.testing import TINY_MODEL, tiny_data_and_checkpoint
from hrem_ray.train.loop import (
    TrainState,
    apply_train_keys,
    restore_train_state,
    sampler_seed,
    to_device,
    train_state_dict,
    train_step,
)
from hrem_ray.train.optim import build_optimizer
from tests.test_train_speed_keys import assert_same, batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda", 0)
BF16_DRIFT = 0.02  # bound on |loss_bf16 - loss_fp32| / loss_fp32 for the small model


def deterministic(cfg: ModelConfig, device, dtype=torch.float32) -> nn.Module:
    """The same weights on every device; dropout off (its masks differ between devices)."""
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model.to(device, dtype)


def loss_and_grads(model: nn.Module, b, warmup: int = 0) -> tuple[torch.Tensor, dict]:
    model.train()
    model.cfg.warmup = warmup
    model.zero_grad(set_to_none=True)
    out = hrem_loss(model, model(b), b.image_ids, 0)
    out.total.backward()
    return out.total.detach(), {
        n: p.grad for n, p in model.named_parameters() if p.grad is not None
    }


def vse_cfg(small_cfg: ModelConfig) -> ModelConfig:
    """The VSE++ loss draws no negatives, so both devices compute the same function."""
    cfg = copy.deepcopy(small_cfg)
    cfg.base_loss = cfg.relation_loss = "vse"
    return cfg


def test_cuda_step_matches_cpu_float64(small_cfg):
    cfg = vse_cfg(small_cfg)
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu_batch = batch(cfg.img_dim)
    ref_loss, ref = loss_and_grads(deterministic(cfg, "cpu", torch.float64), _double(cpu_batch))
    loss, got = loss_and_grads(deterministic(cfg, CUDA), to_device(cpu_batch, CUDA, pin=True))
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-4, atol=1e-5)
    assert got.keys() == ref.keys()
    for name, g in got.items():
        scale = float(ref[name].abs().max())
        err = float((g.double().cpu() - ref[name]).abs().max())
        assert err <= 1e-3 * scale + 1e-6, f"{name}: error {err:.3g} at scale {scale:.3g}"


def _double(b: Batch) -> Batch:
    return dataclasses.replace(b, images=b.images.double())


@pytest.mark.parametrize("warmup", [0, 10**9])  # relation module on / off
def test_bf16_loss_drift_is_bounded(small_cfg, warmup):
    cfg = vse_cfg(small_cfg)
    b = to_device(batch(cfg.img_dim), CUDA, pin=True)
    fp32, _ = loss_and_grads(deterministic(cfg, CUDA), b, warmup)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16, _ = loss_and_grads(deterministic(cfg, CUDA), b, warmup)
    drift = abs(float(bf16) - float(fp32)) / abs(float(fp32))
    print(f"bf16 loss drift {drift:.2e} (warmup {warmup})")
    assert drift < BF16_DRIFT


@pytest.mark.parametrize("bf16", [False, True])
def test_steps_across_the_relation_warm_up(small_cfg, bf16):
    """Two train_steps on CUDA, the second the one where the relation module switches on."""
    hcfg = HREMConfig(model=copy.deepcopy(small_cfg))
    hcfg.model.warmup, hcfg.train.bf16 = 1, bf16
    model = build_model(hcfg.model, pretrained=False).to(CUDA)
    optimizer = build_optimizer(model, hcfg.train)
    gen = torch.Generator(device=CUDA).manual_seed(sampler_seed(0, 0))
    b = to_device(batch(hcfg.model.img_dim), CUDA, pin=True)
    before = train_step(model, b, optimizer, 0, hcfg, generator=gen)
    after = train_step(model, b, optimizer, 1, hcfg, generator=gen)
    assert before is not None and after is not None
    assert "kl" not in before and "kl" in after
    assert all(torch.isfinite(v) for v in after.values())


def test_pinned_copy_equals_the_batch():
    b = batch(24)
    moved = to_device(b, CUDA, pin=True)
    for name in ("images", "tokens", "image_lengths", "token_lengths", "image_ids"):
        got = getattr(moved, name)
        assert got.device.type == "cuda"
        assert torch.equal(got.cpu(), getattr(b, name))


def test_cuda_generator_and_rng_resume(small_cfg):
    """The CUDA RNG of the training device and the CUDA sampler round-trip, and a CPU
    checkpoint restores onto a CUDA run (and back) without 'RNG state is wrong size'."""
    hcfg = HREMConfig(model=small_cfg)
    model = build_model(small_cfg, pretrained=False).to(CUDA)
    optimizer = build_optimizer(model, hcfg.train)
    gen = torch.Generator(device=CUDA).manual_seed(1)
    torch.cuda.manual_seed(5)
    saved = train_state_dict(optimizer, TrainState(epoch=1), gen)
    want = torch.rand(3, device=CUDA)
    restore_train_state(saved, optimizer, gen)
    torch.testing.assert_close(torch.rand(3, device=CUDA), want, rtol=0, atol=0)
    cpu_saved = train_state_dict(optimizer, TrainState(epoch=2), torch.Generator())
    assert restore_train_state(cpu_saved, optimizer, gen).epoch == 2
    assert restore_train_state(saved, optimizer, torch.Generator()).epoch == 1


@pytest.mark.parametrize("keys", [{"fused_adamw": True}, {"compile": True}])
def test_speed_keys_on_cuda_equal_the_plain_step(small_cfg, keys):
    def step(**k):
        hcfg = HREMConfig(model=vse_cfg(small_cfg))
        for key, value in k.items():
            setattr(hcfg.train, key, value)
        model = deterministic(hcfg.model, CUDA)
        apply_train_keys(model, hcfg.train)
        optimizer = build_optimizer(model, hcfg.train)
        grads = {}
        real = optimizer.step

        def capture(*a, **kw):
            grads.update(
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            )
            return real(*a, **kw)

        optimizer.step = capture
        parts = train_step(model, to_device(batch(24), CUDA), optimizer, 0, hcfg)
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        return {"loss": parts["loss"], "grads": grads, "weights": weights}

    assert_same(step(**keys), step(), dict(rtol=1e-4, atol=1e-5))


# -- evaluation, embedding and a Ray Train run on the GPU ------------------------------------


def _eval_json(tmp_path, ckpt, data, name: str, *flags: str) -> dict:
    out = tmp_path / f"{name}.json"
    main(["eval", "--checkpoint", str(ckpt), "--data-path", str(data), "--dataset", "f30k",
          "--split", "test", "--json", str(out), *flags])  # fmt: skip
    return json.loads(out.read_text())


def test_eval_and_embed_on_cuda_equal_the_cpu(tmp_path, tiny_bert):
    """The towers and the ranking run on cuda:0 (``metrics.placed``): the same metrics as the
    CPU's numpy ranking, and embeddings equal to float tolerance; bf16 too."""
    data, ckpt = tiny_data_and_checkpoint(tmp_path, tiny_bert)
    assert isinstance(placed(np.zeros((1, 5), np.float32), CUDA), torch.Tensor)
    for flags in ([], ["--bf16"]):
        cpu = _eval_json(tmp_path, ckpt, data, "cpu", *flags)
        gpu = _eval_json(tmp_path, ckpt, data, "gpu", "--device", "cuda:0", *flags)
        if not flags:  # bf16 kernels differ between devices; float32 ones agree
            assert gpu == cpu
        assert gpu["n_captions"] == cpu["n_captions"]
    captions = tmp_path / "c.txt"
    captions.write_text("a dog runs\ntwo people\n")
    for device in ("cpu", "cuda:0"):
        main(["embed", "--checkpoint", str(ckpt), "--captions", str(captions), "--device",
              device, "--out", str(tmp_path / f"{device}.npy")])  # fmt: skip
    np.testing.assert_allclose(np.load(tmp_path / "cuda:0.npy"), np.load(tmp_path / "cpu.npy"),
                               atol=1e-4)  # fmt: skip


def test_ray_train_one_gpu_worker_trains_and_evaluates(tmp_path, tiny_bert):
    """``hrem-ray train --use-gpu`` with one worker (NCCL, one rank): dev evaluation ranks
    on the worker's GPU each epoch, and the best checkpoint evaluates on cuda as on the CPU."""
    import ray

    from hrem_ray.ray_runtime import init_ray

    data = tmp_path / "data"
    write_synthetic(data, train_images=40, dev_images=10, test_images=10, regions=6, dim=24,
                    progress=None)  # fmt: skip
    if ray.is_initialized():
        ray.shutdown()
    init_ray(num_cpus=2)
    try:
        main(["train", "--data-path", str(data), "--dataset", "f30k", "--bert-path", tiny_bert,
              "--epochs", "2", "--batch-size", "16", "--num-workers", "1", "--use-gpu",
              "--storage-path", str(tmp_path / "runs"), "--name", "gpu", "--no-tracking",
              *TINY_MODEL, "--set", "model.warmup=3"])  # fmt: skip
    finally:
        ray.shutdown()
    best = tmp_path / "runs" / "gpu" / "best"  # train_ray's copy of the best checkpoint
    metrics = read_record(best)["meta"]["metrics"]
    assert np.isfinite(metrics["rsum"]) and metrics["epoch"] in (0, 1)
    cpu = _eval_json(tmp_path, best, data, "cpu")
    assert _eval_json(tmp_path, best, data, "gpu", "--device", "cuda") == cpu
