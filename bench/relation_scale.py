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
not count) and wall time on CUDA, of the second run: the first one warms up (kernel loading,
allocator, autotuning). ``--dtype bf16`` runs the fp32 module under bf16 autocast on bf16
features, as training does. A cell that dies (a CUDA OOM) or runs past ``--cell-timeout``
is reported as failed and the table goes on.
Before cells estimated above ``--max-before-gb`` are skipped. ``--step`` adds the
relation module's forward and backward at B = 128 (MLPs, fusion Transformer, KL), one piece
against automatic chunks. docs/global-batch.md holds the table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import queue as queue_lib
import resource
import time
from contextlib import nullcontext
from datetime import datetime, timezone

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
    rel = InstanceRelation(ModelConfig(frag_chunk=chunk, dropout=0.0)).to(device)
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
    bf16 = dtype_name == "bf16"
    autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else nullcontext()

    def run() -> None:
        with autocast:
            if kind == "step":
                _step(inputs, arg)
            else:
                _scores(inputs, arg, kind)
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _peak_mb(device)
    run()  # warm-up; on CPU its peak RSS is the same as the timed run's
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # CPU: the process's CPU time (1 thread), robust to other load on a shared machine
    clock = time.perf_counter if device == "cuda" else time.process_time
    start = clock()
    run()
    queue.put((clock() - start, _peak_mb(device) - base))


def measure(job: tuple, timeout: float) -> tuple[float, float] | str:
    """(seconds, MB) of ``job`` in a fresh process, or why it gave none: a process that
    died (a CUDA OOM) or ran past ``timeout`` seconds must not hang the table."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_cell, args=(job, queue))
    proc.start()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                return queue.get(timeout=1.0)
            except queue_lib.Empty:
                if not proc.is_alive():
                    return f"failed (exit code {proc.exitcode})"
                if time.monotonic() > deadline:
                    return f"timed out after {timeout:.0f} s"
    finally:
        if proc.is_alive():
            proc.terminate()
        proc.join()


def _cell_text(result: tuple[float, float] | str) -> str:
    return result if isinstance(result, str) else f"{result[0]:.2f} s / {result[1]:.0f} MB"


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
    p.add_argument("--cell-timeout", type=float, default=300.0, help="seconds per cell")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    rows: list[dict] = []
    with open("/proc/cpuinfo") as f:  # Linux; platform.processor() is often empty
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else platform.processor()
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu}, CPU s, 1 thread"
    print(f"# relation fragment scoring per worker, {args.dtype}, L={L} N={N} D={D}")
    now = datetime.now(timezone.utc)  # not datetime.UTC: that is Python >= 3.11
    print(f"# {where}; {mp.cpu_count()} cores; {now:%Y-%m-%d %H:%M} UTC")
    print("| B | W | before: s / MB per worker | after: s / MB per worker |")
    print("|---|---|---|---|")
    for b in args.batches:
        before = None
        if before_gb(b) > args.max_before_gb:
            before = f"skipped (est. {before_gb(b):.1f} GB)"
        for w in args.workers:
            if before is None:
                job = ("before", b, w, args.device, args.dtype)
                before = _cell_text(measure(job, args.cell_timeout))
            after = _cell_text(measure(("after", b, w, args.device, args.dtype), args.cell_timeout))
            print(f"| {b} | {w} | {before} | {after} |", flush=True)
            rows.append({"B": b, "W": w, "dtype": args.dtype, "before": before, "after": after})
    if args.step:
        for label, chunk in (("one piece", 128), ("automatic chunks", 0)):
            cell = _cell_text(
                measure(("step", 128, chunk, args.device, args.dtype), args.cell_timeout)
            )
            print(f"# relation forward+backward, B=128, {label}: {cell}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
