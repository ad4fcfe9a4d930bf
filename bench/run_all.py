"""Every benchmark at a small size, summarised in one table: figure, ours, baseline, ratio.

    .venv/bin/python bench/run_all.py                 # about 10 minutes on 2 CPUs
    .venv/bin/python bench/run_all.py --markdown bench/results.md

Each benchmark runs in its own process with ``--json`` and the table is built from what it
wrote, so versions and machines can be compared line by line. A benchmark that fails or
runs past its time limit becomes a row saying so, and the others still run. The sizes are
small on purpose (a tiny random BERT for training and serving): the figures compare our
implementation with its baseline on the same machine, not the full-size figures of each
benchmark's docstring.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent


@dataclass
class Row:
    figure: str
    ours: float
    baseline: float
    unit: str
    higher_is_better: bool
    failed: str = ""  # why the benchmark gave no figure

    @property
    def ratio(self) -> float:
        """How many times better ours is (> 1: better)."""
        if self.higher_is_better:
            return self.ours / self.baseline
        return self.baseline / self.ours


def eval_rows(f: dict) -> list[Row]:
    n = f["images"]
    return [Row(f"eval ranks+recall, {n} x {5 * n} sims (vs per-query argsort)",
                f["ours_s"], f["baseline_s"], "s", False)]  # fmt: skip


def train_rows(f: dict) -> list[Row]:
    by = {r["setting"]: r for r in f["rows"]}
    plain = by["plain"]
    rows = [
        Row(f"train samples/s, Ray Train {s} (vs plain loop, {f['bert']} BERT)",
            by[s]["samples_per_s"], plain["samples_per_s"], "/s", True)
        for s in ("ray-1w", "ray-2w") if s in by
    ]  # fmt: skip
    rows += [
        Row(f"train data-wait share, {s} (vs plain loop)",
            100 * by[s]["data_wait_frac"], 100 * plain["data_wait_frac"], "%", False)
        for s in ("ray-1w", "ray-2w") if s in by
    ]  # fmt: skip
    return rows


def serve_rows(f: dict) -> list[Row]:
    r = f["results"]
    base = r["in-process, 1 query/call"]
    rows = [Row("serve p50 latency at concurrency 1, HTTP (vs in-process call)",
                r["on/1"]["p50_ms"], base["p50_ms"], "ms", False)]  # fmt: skip
    rows.append(Row("serve overhead at concurrency 1 (vs Serve's floor: echo app, one hop)",
                    r["on/1"]["p50_ms"] - base["p50_ms"],
                    r["floor/ingress alone"]["p50_ms"], "ms", False))  # fmt: skip
    top = max(int(k.split("/")[1]) for k in r if k.startswith("on/") and k[3:].isdigit())
    rows.append(Row(f"serve QPS at concurrency {top}, batching on (vs off)",
                    r[f"on/{top}"]["qps"], r[f"off/{top}"]["qps"], "/s", True))  # fmt: skip
    return rows


def ivf_rows(f: dict) -> list[Row]:
    return [
        Row(f"gallery search ms/query, IVF nprobe {r['nprobe']} (recall@10 {r['recall']:.2f}; "
            f"vs exact, {f['n']} x {f['dim']})", r["ms"], f["exact_ms"], "ms", False)
        for r in f["ivf"]
    ]  # fmt: skip


def ingest_rows(f: dict) -> list[Row]:
    """Warm pairs/s (epochs 2 on) of the shard sources against the memory map's."""
    warm = {r["source"]: sum(e["pairs_per_s"] for e in r["epochs"][1:]) / len(r["epochs"][1:])
            for r in f["delivery"]}  # fmt: skip
    n = f["args"]["images"]
    return [
        Row(f"ingest pairs/s to one worker, warm {s} (vs memmap, {n} x 36x2048 images)",
            warm[s], warm["memmap"], "/s", True)
        for s in ("local shards", "S3 shards")
    ]  # fmt: skip


def tracking_rows(f: dict) -> list[Row]:
    return [Row(f"train samples/s, MLflow tracking on (vs off, {f['bert']} BERT)",
                f["on"], f["off"], "/s", True)]  # fmt: skip


def gallery_rows(f: dict) -> list[Row]:
    flat = next(r for r in f["rows"] if r["index"] == "Flat")
    return [
        Row(f"gallery query p50 ms, {r['index']} {r['knobs']} (1-recall@10 {r['recall']:.2f}, "
            f"{r['bytes_per_item']:.0f} B/item; vs Flat, {r['items']} x {f['dim']})",
            r["p50_ms"], flat["p50_ms"], "ms", False)
        for r in f["rows"] if r is not flat
    ]  # fmt: skip


@dataclass
class Bench:
    name: str
    argv: list[str]
    rows: Callable[[dict], list[Row]]
    # Seconds before it is stopped: about 3x its time on a quiet 2-core machine (eval 20 s,
    # train 280 s with its plain loop taking 121 s of it, serve 90 s, ingest 100 s, IVF 60 s,
    # gallery_scale 170 s, measured beside another job).
    limit_s: float


BENCHES = [
    Bench("eval_speed", ["eval_speed.py", "--images", "2000", "--repeat", "3"], eval_rows, 120),
    Bench(
        "train_throughput",
        ["train_throughput.py", "--bert", "tiny", "--images", "300", "--epochs", "2"],
        train_rows,
        900,
    ),  # fmt: skip
    Bench(
        "serve_load",
        [
            "serve_load.py",
            "--tiny",
            "--duration",
            "4",
            "--concurrency",
            "1,32",
            "--no-autoscale",
            "--hops",
            "1",
        ],  # fmt: skip
        serve_rows,
        300,
    ),  # fmt: skip
    Bench("ingest", ["ingest.py", "--images", "1000", "--no-train"], ingest_rows, 300),
    Bench(
        "tracking_overhead",
        ["tracking_overhead.py", "--bert", "tiny", "--images", "300"],
        tracking_rows,
        300,
    ),  # fmt: skip
    Bench(
        "ivf_recall",
        ["ivf_recall.py", "--n", "50000", "--nlist", "256", "--nprobe", "8", "32"],
        ivf_rows,
        240,
    ),
    Bench(
        "gallery_scale",
        [
            "gallery_scale.py",
            "--items",
            "20000",
            "--dim",
            "128",
            "--clusters",
            "200",
            "--nlist",
            "128",
            "--pq",
            "16",
            "--queries",
            "200",
            "--latency-budget",
            "2",
        ],
        gallery_rows,
        500,
    ),
]


def run(bench: Bench, work: Path, scale: float) -> list[Row]:
    """The benchmark's rows, or one row saying why there are none (the run goes on)."""
    out = work / f"{bench.name}.json"
    log = work / f"{bench.name}.log"
    cmd = [sys.executable, str(BENCH / bench.argv[0]), *bench.argv[1:], "--json", str(out)]
    limit = bench.limit_s * scale
    print(f"== {bench.name}: {' '.join(bench.argv)} (limit {limit:.0f} s)", flush=True)
    start = time.perf_counter()
    try:
        with log.open("w") as f:
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=limit)
        failed = "" if done.returncode == 0 and out.is_file() else f"exit {done.returncode}"
    except subprocess.TimeoutExpired:
        failed = f"stopped after its {limit:.0f} s limit"
    took = time.perf_counter() - start
    if failed:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        print(f"   {bench.name} failed ({failed}); last lines:", *tail, sep="\n     ", flush=True)
        return [Row(bench.name, math.nan, math.nan, "", True, failed=failed)]
    print(f"   {took:.0f} s", flush=True)
    return bench.rows(json.loads(out.read_text()))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    python = platform.python_version()
    return f"{os.cpu_count()} CPUs ({cpu}), Python {python}, torch {torch.__version__}"


def table(rows: list[Row]) -> str:
    lines = ["| figure | ours | baseline | ratio |", "|---|---:|---:|---:|"]
    for r in rows:
        if r.failed:
            lines.append(f"| {r.figure} | failed: {r.failed} | | |")
            continue
        lines.append(f"| {r.figure} | {r.ours:.3g} {r.unit} | {r.baseline:.3g} {r.unit} "
                     f"| {r.ratio:.2f}x |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated subset of " + ",".join(b.name for b in BENCHES))
    p.add_argument("--markdown", help="also write the table (and the machine) to this file")
    p.add_argument("--limit-scale", type=float, default=1.0,
                   help="multiply every benchmark's time limit (slower machines)")  # fmt: skip
    a = p.parse_args()
    chosen = BENCHES
    if a.only:
        names = set(a.only.split(","))
        unknown = names - {b.name for b in BENCHES}
        if unknown:
            p.error(f"unknown benchmark(s) {sorted(unknown)}")
        chosen = [b for b in BENCHES if b.name in names]
    start = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="hrem-bench-all-") as tmp:
        for bench in chosen:
            rows += run(bench, Path(tmp), a.limit_scale)
    took = time.perf_counter() - start
    text = (f"{table(rows)}\n\nratio: how many times better ours is. Machine: {machine()}; "
            f"load average {os.getloadavg()[0]:.1f}; {took:.0f} s in all.")  # fmt: skip
    print("\n" + text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")
    if any(r.failed for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
