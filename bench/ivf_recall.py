"""Exact top-k vs the gallery's FAISS IVF index: build time, time per query, recall@10.

    .venv/bin/python bench/ivf_recall.py                          # 200k x 256, nlist 1024
    .venv/bin/python bench/ivf_recall.py --n 1000000 --nlist 4096 --nprobe 8 32 128

Needs ``pip install 'hrem-ray[faiss]'``. The gallery is N seeded clustered unit vectors (real
embeddings cluster; uniform random ones are the worst case for IVF); the queries are noisy
copies of gallery rows (``--query-noise``), like a caption near its image. Both paths go
through the gallery's own ``search`` (exact: float32 matrix product + ``top_k``), one query
per call as the serving replicas send them. recall@10 is |IVF top 10 ∩ exact top 10| / 10,
averaged over the queries.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import numpy as np

from hrem_ray.index.faiss_index import FaissIndex, import_faiss, parse_spec, recall_at_k
from hrem_ray.index.gallery import search


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(
    n: int, dim: int, clusters: int, spread: float, rng: np.random.Generator
) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres (same per-dimension scale as the noise)."""
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    out = np.empty((n, dim), np.float32)
    for i in range(0, n, 65536):  # in chunks: no n x dim float64 temporaries
        m = min(65536, n - i)
        noise = rng.standard_normal((m, dim), dtype=np.float32)
        out[i : i + m] = unit(centres[rng.integers(0, clusters, m)] + spread * noise)
    return out


def per_query(
    fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], queries: np.ndarray
) -> tuple[float, np.ndarray]:
    """Seconds per query and the [n, 10] ids, one query per call."""
    start = time.perf_counter()
    ids = np.stack([fn(q[None])[0][0] for q in queries])
    return (time.perf_counter() - start) / len(queries), ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000, help="gallery vectors")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--nprobe", type=int, nargs="+", default=[4, 16, 64, 256])
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--clusters", type=int,
                   help="default N/10: a query's 10 neighbours then span several clusters, "
                   "as they do in real embeddings, not one tight blob")  # fmt: skip
    p.add_argument("--spread", type=float, default=1.0,
                   help="within-cluster noise, relative to the cluster centre's norm")  # fmt: skip
    p.add_argument("--query-noise", type=float, default=0.5,
                   help="query = a gallery row + noise of this norm, re-normalised")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures here (bench/run_all.py)")
    a = p.parse_args()
    a.clusters = a.clusters or max(1, a.n // 10)
    faiss = import_faiss()
    rng = np.random.default_rng(a.seed)
    embs = clustered(a.n, a.dim, a.clusters, a.spread, rng)
    picks = rng.choice(a.n, a.queries, replace=False)
    noise = unit(rng.standard_normal((a.queries, a.dim), dtype=np.float32))
    queries = unit(embs[picks] + a.query_noise * noise)
    print(f"gallery {a.n} x {a.dim} float32, {a.clusters} clusters, {a.queries} queries one at "
          f"a time, k=10; {os.cpu_count()} CPUs, faiss {faiss.__version__} "
          f"({faiss.omp_get_max_threads()} threads)")  # fmt: skip

    start = time.perf_counter()
    spec = parse_spec(f"IVF{a.nlist},Flat", a.n, a.dim)
    ivf = FaissIndex.train(embs, spec, spec.params(1, None))
    build = time.perf_counter() - start
    print(f"IVF build (train + add), nlist {a.nlist}: {build:.1f} s")

    exact_s, exact = per_query(lambda q: search(q, embs, None, 10), queries)
    print("\n| search | ms / query | speed-up | recall@10 |\n|---|---:|---:|---:|")
    print(f"| exact | {1e3 * exact_s:.2f} | 1.0x | 1.000 |")
    rows = []
    for nprobe in a.nprobe:
        ivf.configured(**spec.params(nprobe, None))
        ivf_s, ids = per_query(lambda q: search(q, embs, ivf, 10), queries)
        rows.append({"nprobe": ivf.params["nprobe"], "ms": 1e3 * ivf_s,
                     "recall": recall_at_k(ids, exact, 10)})  # fmt: skip
        print(f"| IVF nprobe {rows[-1]['nprobe']} | {rows[-1]['ms']:.2f} | "
              f"{exact_s / ivf_s:.1f}x | "
              f"{rows[-1]['recall']:.3f} |")  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"n": a.n, "dim": a.dim, "nlist": a.nlist, "exact_ms": 1e3 * exact_s,
                       "ivf": rows}, f)  # fmt: skip


if __name__ == "__main__":
    main()
