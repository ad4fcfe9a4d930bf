"""Samples/s and peak memory of one HREM training step of bert-base shape, per speed setting.

    python bench/gpu_train_step.py --json step.json                 # on a CUDA machine
    python bench/gpu_train_step.py --device cpu --tiny --steps 1    # a CPU smoke run

Random weights and random inputs (no download): BERT-base shape (12 layers, hidden 768,
vocabulary 30,522), 36 regions of 2048 features, captions of 32 tokens, D = 1024, the
relation module on (past ``warmup``). Each setting runs the real ``train_step`` (AdamW, clip,
bf16 autocast as training does) ``--warmup`` times untimed, then ``--steps`` timed steps:

- ``fp32``, ``bf16``, ``bf16+compile`` at ``--batch`` (128, the f30k recipe);
- ``bf16+grad_checkpoint`` and plain ``bf16`` at the largest batch that fits, doubling from
  ``--batch`` up to ``--max-batch`` (the gain checkpointing buys, docs/training.md).

Peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
from transformers import BertConfig, BertModel

from hrem_ray.config import HREMConfig, ModelConfig
from hrem_ray.data.batches import Batch
from hrem_ray.model.hrem import HREM
from hrem_ray.train.loop import apply_train_keys, to_device, train_step
from hrem_ray.train.optim import build_optimizer

REGIONS, TOKENS = 36, 32


def build(tiny: bool, device: str, keys: dict) -> tuple[HREM, HREMConfig]:
    if tiny:
        model_cfg = ModelConfig(img_dim=24, embed_size=32, mlp_hidden=16, ff_dim=32, num_heads=4)
        bert = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64)  # fmt: skip
    else:
        model_cfg, bert = ModelConfig(), BertConfig()  # the paper's sizes, bert-base
    model_cfg.warmup = 0  # relation module on: a step past the warm-up
    cfg = HREMConfig(model=model_cfg)
    for key, value in keys.items():
        setattr(cfg.train, key, value)
    torch.manual_seed(0)
    model = HREM(model_cfg, BertModel(bert, add_pooling_layer=False)).to(device)
    apply_train_keys(model, cfg.train)
    return model, cfg


def batch(b: int, img_dim: int, vocab: int) -> Batch:
    g = torch.Generator().manual_seed(b)
    tokens = torch.randint(1000, vocab, (b, TOKENS), generator=g)
    lengths = torch.randint(8, TOKENS + 1, (b,), generator=g)
    tokens[torch.arange(TOKENS)[None] >= lengths[:, None]] = 0
    ids = torch.arange(b)
    images = torch.randn(b, REGIONS, img_dim, generator=g)
    return Batch(images, torch.full((b,), REGIONS), tokens, lengths, ids, ids * 5)


def measure(args: argparse.Namespace, b: int, keys: dict) -> dict:
    """One setting at batch ``b``: samples/s and peak MB, or the error that stopped it."""
    cuda = args.device.startswith("cuda")
    gc.collect()  # the previous setting's model and optimizer
    if cuda:
        torch.cuda.empty_cache()
    try:
        model, cfg = build(args.tiny, args.device, keys)
        optimizer = build_optimizer(model, cfg.train)
        host = batch(b, cfg.model.img_dim, model.txt_enc.bert.config.vocab_size)
        gen = torch.Generator(device=args.device).manual_seed(0)

        def run(n: int) -> None:
            for i in range(n):
                data = to_device(host, args.device, pin=cfg.train.pin_memory)
                train_step(model, data, optimizer, i, cfg, generator=gen)

        run(args.warmup)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        run(args.steps)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        return {"batch": b, "samples_per_s": b * args.steps / seconds, "peak_mb": peak}
    except torch.OutOfMemoryError:
        return {"batch": b, "error": "out of memory"}


def largest(args: argparse.Namespace, keys: dict) -> dict:
    """The largest batch (doubling from --batch) whose step fits, with its figures."""
    best, b = {"batch": 0, "error": f"batch {args.batch} does not fit"}, args.batch
    while b <= args.max_batch:
        r = measure(args, b, keys)
        if "error" in r:
            break
        best, b = r, b * 2
    return best


SETTINGS = {
    "fp32": {},
    "bf16": {"bf16": True},
    "bf16+compile": {"bf16": True, "compile": True},
}
LARGEST = {"bf16": {"bf16": True}, "bf16+grad_checkpoint": {"bf16": True, "grad_checkpoint": True}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--max-batch", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (compile happens here)")
    p.add_argument("--tiny", action="store_true", help="toy sizes, for a smoke run")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the exact path (train.tf32 off)
    rows = []
    for name, keys in SETTINGS.items():
        rows.append({"setting": name, **measure(args, args.batch, keys)})
        print(json.dumps(rows[-1]), flush=True)
    for name, keys in LARGEST.items():
        rows.append({"setting": f"{name}, largest batch", **largest(args, keys)})
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "tiny": args.tiny, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
