"""Memory and time per worker of the relation module's fragment scoring, before and after.

    .venv/bin/python bench/relation_scale.py                       # the whole table
    .venv/bin/python bench/relation_scale.py --batches 128 256 --workers 1 2   # quick
    .venv/bin/python bench/relation_scale.py --device cuda --dtype bf16 --batches 1024

Each cell runs in a fresh process (multiprocessing spawn), so its peak RSS is its own. It
simulates one worker's share of a global batch of B pairs (L = 32 tokens, N = 36 regions,
D = 1024; the gathered features are made before measuring):

- ``before``: the whole [B, B, L, N] score tensor at once, the same on every worker
  (``model.frag_chunk`` = B, no sharding);
- ``after``: this worker's B/W captions against all B images in automatic chunks, then the
  gathered [B, B, 2 + 2 topk] result assembled as ``sharded_fragment_scores`` does.

Memory is the rise of peak RSS over the inputs (CPU) or of peak allocated memory (CUDA);
time is the process's CPU time on CPU (torch on 1 thread, so other load on the machine does
not count) and wall time on CUDA.
Before cells estimated above ``--max-before-gb`` are skipped. ``--step`` adds the
relation module's forward and backward at B = 128 (MLPs, fusion Transformer, KL), one piece
against automatic chunks. docs/global-batch.md holds the table.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import resource
import time
from datetime import UTC, datetime

import torch

from hrem_ray.config import ModelConfig
from hrem_ray.model.relation import InstanceRelation, fragment_scores

L, N, D, TOPK = 32, 36, 1024, 10
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _inputs(b: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(b)
    regions = torch.randn(b, N, D, generator=g).to(device, dtype)
    words = torch.randn(b, L, D, generator=g).to(device, dtype)
    lengths = torch.randint(8, L + 1, (b,), generator=g).to(device)
    return regions, words, lengths


def _peak_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _scores(inputs: tuple, workers: int, mode: str) -> None:
    regions, words, lengths = inputs
    b = len(words)
    if mode == "before":
        fragment_scores(regions, words, lengths, chunk=b)
        return
    share = -(-b // workers)  # the largest share: rank 0's
    part = fragment_scores(regions, words[:share], lengths[:share])
    gathered = regions.new_empty(b, b, 2 + 2 * TOPK, dtype=part.m_t2i.dtype)
    gathered[:share, :, 0] = part.m_t2i  # what the all-gather fills in
    gathered[:share, :, 2 : 2 + TOPK] = part.k_t2i


def _step(inputs: tuple, chunk: int) -> None:
    regions, words, lengths = inputs
    b, device, dtype = len(words), words.device, words.dtype
    rel = InstanceRelation(ModelConfig(frag_chunk=chunk, dropout=0.0)).to(device, dtype)
    v, t = (
        torch.nn.functional.normalize(
            torch.randn(b, D, device=device, dtype=dtype), dim=1
        ).requires_grad_(True)
        for _ in range(2)
    )
    out = rel(v, t, regions, words, lengths)
    (out.v_hat.sum() + out.t_hat.sum() + out.kl).backward()


def _cell(job: tuple, queue: mp.Queue) -> None:
    """One measurement in this fresh process; puts (seconds, peak MB over the inputs)."""
    torch.set_num_threads(1)
    kind, b, arg, device, dtype_name = job
    inputs = _inputs(b, device, DTYPES[dtype_name])
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _peak_mb(device)
    # CPU: the process's CPU time (1 thread), robust to other load on a shared machine
    clock = time.perf_counter if device == "cuda" else time.process_time
    start = clock()
    if kind == "step":
        _step(inputs, arg)
    else:
        _scores(inputs, arg, kind)
    if device == "cuda":
        torch.cuda.synchronize()
    queue.put((clock() - start, _peak_mb(device) - base))


def measure(job: tuple) -> tuple[float, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_cell, args=(job, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def before_gb(b: int) -> float:
    """About three [B, B, L, N] fp32 tensors are alive at once in the one-piece computation."""
    return 3 * b * b * L * N * 4 / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--max-before-gb", type=float, default=6.0)
    p.add_argument("--step", action="store_true", help="also the relation step at B = 128")
    args = p.parse_args()
    with open("/proc/cpuinfo") as f:  # Linux; platform.processor() is often empty
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else platform.processor()
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu}, CPU s, 1 thread"
    print(f"# relation fragment scoring per worker, {args.dtype}, L={L} N={N} D={D}")
    print(f"# {where}; {mp.cpu_count()} cores; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print("| B | W | before: s / MB per worker | after: s / MB per worker |")
    print("|---|---|---|---|")
    for b in args.batches:
        before = None
        if before_gb(b) > args.max_before_gb:
            before = f"skipped (est. {before_gb(b):.1f} GB)"
        for w in args.workers:
            if before is None:
                s, mb = measure(("before", b, w, args.device, args.dtype))
                before = f"{s:.2f} s / {mb:.0f} MB"
            s, mb = measure(("after", b, w, args.device, args.dtype))
            print(f"| {b} | {w} | {before} | {s:.2f} s / {mb:.0f} MB |", flush=True)
    if args.step:
        for label, chunk in (("one piece", 128), ("automatic chunks", 0)):
            s, mb = measure(("step", 128, chunk, args.device, args.dtype))
            print(f"# relation forward+backward, B=128, {label}: {s:.2f} s / {mb:.0f} MB")


if __name__ == "__main__":
    main()
