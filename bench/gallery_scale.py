"""Every gallery index type side by side: build time, bytes/item, one-core query p50, recall.

    .venv/bin/python bench/gallery_scale.py --items 100000          # a few minutes on 2 CPUs
    .venv/bin/python bench/gallery_scale.py                          # 1M x 1024: > 1 h
    .venv/bin/python bench/gallery_scale.py --gallery GALLERY        # a trained model's R@K

Needs ``pip install 'hrem-ray[faiss]'``. Indexes are built and searched by the gallery's own
code (``FaissIndex.train`` on its stated training sample, default nprobe/efSearch, and
``gallery.search``, which rescores the index's candidates against the stored embeddings).

Items and queries are draws of one process, the queries held out: L2-normalised points of
a mixture of ``--clusters`` Gaussians whose centres and within-cluster noise share a
decaying spectrum (variance of the i-th latent direction ~ i^-decay, then a random
rotation), because a trained model's embeddings are anisotropic with a low effective
dimension; isotropic noise in 1024-d makes ANN hopeless, a few tight blobs trivial. The
header prints the cosine of a query to its 1st and 10th neighbour and to a random item.

1-recall@10: the share of queries whose exact nearest item is in the index's top 10 (the
recall queries are searched in batches). Query p50: the CPU time of one query per call on
one thread (FAISS and BLAS limited to one), so that other load on a shared machine does not
count, over up to ``--latency-queries`` queries or ``--latency-budget`` seconds; build: wall
and process CPU seconds (2 threads). Bytes per item: the index file (quantisers included)
over N, so small N pays more for the quantisers; GB per 1M items is what the size target
reads. Every non-Flat gallery also keeps its embeddings on disk (memory-mapped) for the
rescoring. HNSW is built on the first ``--hnsw-items`` items only (65 s per 100k x 1024 on
2 cores, more than linear beyond); its rows give the items. Extra rows give the knobs that
trade for recall: more IVF lists probed (``--nprobe``), a longer HNSW candidate list
(``--ef-search``), and ``--refine R``: a PQ index's R best candidates rescored exactly
(the gallery's ``refine`` knob), the best 10 kept.

``--gallery`` instead reads a gallery built by ``hrem-ray index`` from a trained model and
prints caption-to-image R@1/5/10 (the caption's own image in the top K) through each index
type and knob (``--gallery-nlist`` lists) as a fraction of exact search's.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from hrem_ray.data.precomp import CAPTIONS_PER_IMAGE
from hrem_ray.index.faiss_index import FaissIndex, IndexSpec, import_faiss, parse_spec
from hrem_ray.index.gallery import Gallery, search

K = 10
CHUNK = 65536  # rows generated at a time: no N x D temporaries
QUERY_CHUNK = 100  # recall queries searched at a time: a [100, N] score matrix at most
TARGETS = {"gb_per_1m": 0.25, "recall": 0.9, "p50_ms": 5.0}  # GB: index size at 1M items


@dataclass
class Mixture:
    """Clustered unit vectors in ``dim`` dimensions with a decaying spectrum (see module doc)."""

    centres: np.ndarray  # [clusters, dim], scaled by the spectrum
    scale: np.ndarray  # [dim] per-latent-direction standard deviation
    rotation: np.ndarray  # [dim, dim] orthogonal
    spread: float

    @classmethod
    def make(cls, dim: int, clusters: int, spread: float, decay: float,
             rng: np.random.Generator) -> Mixture:  # fmt: skip
        scale = (np.arange(1, dim + 1, dtype=np.float32) ** (-decay / 2)).astype(np.float32)
        centres = rng.standard_normal((clusters, dim), dtype=np.float32) * scale
        rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
        return cls(centres, scale, rotation, spread)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        dim = len(self.scale)
        out = np.empty((n, dim), np.float32)
        for i in range(0, n, CHUNK):
            m = min(CHUNK, n - i)
            noise = rng.standard_normal((m, dim), dtype=np.float32) * (self.spread * self.scale)
            x = (self.centres[rng.integers(0, len(self.centres), m)] + noise) @ self.rotation
            out[i : i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out


def batched(fn: Callable[[np.ndarray], np.ndarray], queries: np.ndarray) -> np.ndarray:
    return np.concatenate([fn(queries[i : i + QUERY_CHUNK])
                           for i in range(0, len(queries), QUERY_CHUNK)])  # fmt: skip


def exact_top(queries: np.ndarray, embs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-K ids and cosines, [q, K] each."""
    both = batched(lambda q: np.stack(search(q, embs, None, K), axis=1), queries)
    return both[:, 0].astype(np.int64), both[:, 1]


def one_recall(ids: np.ndarray, nearest: np.ndarray) -> float:
    """Share of rows whose exact nearest item is among ``ids`` (any order)."""
    return float(np.mean((ids == nearest[:, None]).any(axis=1)))


def p50_ms(fn: Callable[[np.ndarray], object], queries: np.ndarray, budget_s: float) -> float:
    """Median CPU ms of one query per call on one thread (so the machine's other load does not
    count), stopping after ``budget_s`` of wall time (3 queries at least)."""
    faiss = import_faiss()
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    times: list[float] = []
    try:
        with threadpool_limits(1):
            end = time.perf_counter() + budget_s
            for q in queries:
                start = time.thread_time()
                fn(q[None])
                times.append(time.thread_time() - start)
                if len(times) >= 3 and time.perf_counter() > end:
                    break
    finally:
        faiss.omp_set_num_threads(threads)
    return 1e3 * float(np.median(times))


def index_bytes(index: FaissIndex) -> int:
    """Size of the index file ``write_gallery`` would write, quantisers included."""
    with tempfile.TemporaryDirectory(prefix="gallery-scale-") as tmp:
        path = Path(tmp) / "index.faiss"
        index.write(path)
        return path.stat().st_size


def knob_settings(spec: IndexSpec, a: argparse.Namespace) -> list[tuple[str, dict]]:
    """(label, search params) of each row of one index; a PQ index's plain nprobe rows rank
    by its codes alone (refine = K)."""
    if spec.nlist:
        pq = K if spec.pq_centroids else None
        rows = [(f"nprobe {n}", spec.params(n, None, pq)) for n in a.nprobe]
        if spec.pq_centroids:
            top = spec.params(max(a.nprobe), None, K)["nprobe"]  # capped at nlist
            rows += [(f"nprobe {top}, refine {r}", spec.params(top, None, r)) for r in a.refine]
        return rows
    if spec.hnsw:
        return [(f"efSearch {e}", spec.params(None, e)) for e in a.ef_search]
    return [("exact", {})]


def measure(name: str, embs: np.ndarray, queries: np.ndarray, nearest: np.ndarray,
            a: argparse.Namespace) -> list[dict]:  # fmt: skip
    """One row per knob setting of index type ``name`` (``Flat/float16``: float16 storage)."""
    spec_str, _, dtype = name.partition("/")
    spec = parse_spec(spec_str, len(embs), embs.shape[1])
    start, cpu = time.perf_counter(), time.process_time()
    store = embs.astype(dtype) if dtype else embs
    index = None if spec.is_flat else FaissIndex.train(embs, spec, spec.params(None, None))
    build = {"build_s": time.perf_counter() - start, "build_cpu_s": time.process_time() - cpu}
    size = store.shape[1] * store.itemsize if index is None else index_bytes(index) / len(embs)
    rows = []
    for label, params in knob_settings(spec, a):
        if index is not None:
            index.configured(**params)

        def query(q: np.ndarray) -> np.ndarray:
            return search(q, store, index, K)[0]

        rows.append({"index": name, "items": len(embs), "knobs": label, **build,
                     "bytes_per_item": size, "gb_per_1m": size / 1e3,
                     "p50_ms": p50_ms(query, queries[: a.latency_queries], a.latency_budget),
                     "recall": one_recall(batched(query, queries), nearest)})  # fmt: skip
        print(row_line(rows[-1]), flush=True)
    return rows


def row_line(r: dict) -> str:
    met = {"size": r["gb_per_1m"] <= TARGETS["gb_per_1m"],
           "recall": r["recall"] >= TARGETS["recall"],
           "p50": r["p50_ms"] < TARGETS["p50_ms"]}  # fmt: skip
    meets = "all" if all(met.values()) else ", ".join(t for t, ok in met.items() if ok) or "none"
    return (f"| {r['index']} | {r['items']:,} | {r['knobs']} | {r['build_s']:.1f} | "
            f"{r['build_cpu_s']:.1f} | "
            f"{r['bytes_per_item']:,.0f} | {r['gb_per_1m']:.3f} | {r['p50_ms']:.2f} | "
            f"{r['recall']:.3f} | {meets} |")  # fmt: skip


def synthetic(a: argparse.Namespace) -> dict:
    faiss = import_faiss()
    rng = np.random.default_rng(a.seed)
    mixture = Mixture.make(a.dim, a.clusters, a.spread, a.decay, rng)
    start = time.perf_counter()
    embs, queries = mixture.sample(a.items, rng), mixture.sample(a.queries, rng)
    gen_s = time.perf_counter() - start
    nearest, cos = exact_top(queries, embs)
    random_cos = float(np.mean(np.sum(queries * embs[rng.integers(0, a.items, a.queries)], 1)))
    print(f"gallery {a.items:,} x {a.dim} float32 ({gen_s:.0f} s to draw), {a.clusters} clusters,"
          f" spread {a.spread}, decay {a.decay}; {a.queries} held-out queries, mean cosine to "
          f"neighbour 1 {cos[:, 0].mean():.3f}, neighbour 10 {cos[:, -1].mean():.3f}, a random "
          f"item {random_cos:.3f}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}, faiss {faiss.__version__}")  # fmt: skip
    print(
        f"targets: index <= {TARGETS['gb_per_1m']} GB at 1M items, 1-recall@{K} >= "
        f"{TARGETS['recall']}, p50 < {TARGETS['p50_ms']} ms on one core\n"
    )
    print(
        "| index | items | knobs | build s | build CPU s | bytes/item | GB per 1M | p50 ms "
        "| 1-recall@10 | meets |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---|")
    rows = []
    for name in a.index or specs(a.nlist, a.pq):
        if name.startswith("HNSW") and a.hnsw_items < a.items:
            part = embs[: a.hnsw_items]
            rows += measure(name, part, queries, exact_top(queries, part)[0], a)
        else:
            rows += measure(name, embs, queries, nearest, a)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    return {"items": a.items, "dim": a.dim, "rows": rows}


def specs(nlist: int, pq: int) -> list[str]:
    return ["Flat", "Flat/float16", f"IVF{nlist},Flat", f"IVF{nlist},PQ{pq}",
            f"OPQ{pq},IVF{nlist},PQ{pq}", "HNSW32"]  # fmt: skip


def trained(a: argparse.Namespace) -> dict:
    """Caption-to-image R@1/5/10 through each index type and knob as a fraction of exact
    search's, on a built gallery (nlist ``--gallery-nlist``: galleries here are small)."""
    g = Gallery.open(a.gallery)
    imgs, caps = np.asarray(g.image_embs, np.float32), np.asarray(g.caption_embs, np.float32)
    truth = np.arange(len(caps)) // CAPTIONS_PER_IMAGE

    def recall(index: FaissIndex | None) -> np.ndarray:
        top = batched(lambda q: search(q, imgs, index, K)[0], caps)
        return np.array([np.mean((top[:, :r] == truth[:, None]).any(1)) for r in (1, 5, K)])

    exact = recall(None)
    print(
        f"gallery {a.gallery}: {len(imgs)} images, {len(caps)} captions, {imgs.shape[1]}-d; "
        f"exact caption-to-image R@1/5/10 {'/'.join(f'{v:.3f}' for v in exact)}\n"
    )
    print("| index | knobs | R@1 | R@5 | R@10 (fractions of exact) |\n|---|---|---:|---:|---:|")
    rows = []
    for name in specs(a.gallery_nlist, a.pq)[2:]:
        spec = parse_spec(name, len(imgs), imgs.shape[1])
        index = FaissIndex.train(imgs, spec, spec.params(None, None))
        for label, params in knob_settings(spec, a):
            got = recall(index.configured(**params)) / exact
            rows.append({"index": name, "knobs": label, "fraction_of_exact": got.tolist()})
            print(f"| {name} | {label} | " + " | ".join(f"{v:.3f}" for v in got) + " |")
    return {"gallery": str(a.gallery), "ks": [1, 5, K], "exact": exact.tolist(), "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--queries", type=int, default=1000, help="held-out recall queries")
    p.add_argument("--clusters", type=int, default=4000)
    p.add_argument("--spread", type=float, default=1.0,
                   help="within-cluster noise, relative to the centres' scale")  # fmt: skip
    p.add_argument("--decay", type=float, default=1.0,
                   help="variance of the i-th latent direction ~ i^-decay")  # fmt: skip
    p.add_argument("--nlist", type=int, default=4096)
    p.add_argument("--pq", type=int, default=64, help="PQ bytes per item (and OPQ size)")
    p.add_argument("--index", nargs="+", help="these index types, in this order (default: all; "
                   "Flat/float16 is Flat with float16 storage)")  # fmt: skip
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 64])
    p.add_argument("--ef-search", type=int, nargs="+", default=[64, 256])
    p.add_argument("--refine", type=int, nargs="*", default=[100])
    p.add_argument("--hnsw-items", type=int, default=200_000,
                   help="HNSW is built on this many items at most")  # fmt: skip
    p.add_argument("--latency-queries", type=int, default=200)
    p.add_argument("--latency-budget", type=float, default=20.0, help="seconds per row")
    p.add_argument("--gallery", help="a trained model's gallery: its R@K per index type")
    p.add_argument("--gallery-nlist", type=int, default=256, help="IVF lists there")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures here (bench/run_all.py)")
    a = p.parse_args()
    figures = trained(a) if a.gallery else synthetic(a)
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
