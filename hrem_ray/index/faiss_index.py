"""FAISS indexes for galleries too big for exact search (about 1M items and up).

A gallery's index is named by a FAISS factory string (``hrem-ray index --index SPEC``):

- ``Flat``: exact search over the stored embeddings (numpy, no FAISS file); with
  ``--dtype float16`` the stored embeddings take half the bytes;
- ``IVF<nlist>,Flat``: k-means lists holding the float32 vectors (``--ivf N`` is short for it);
- ``IVF<nlist>,PQ<m>[x<bits>]``: lists of product-quantised codes, m bytes an item at 8 bits,
  whose ``refine`` best candidates per query are rescored exactly (``gallery.search``);
- ``OPQ<m>,IVF<nlist>,PQ<m>[x<bits>]``: the same after a learned rotation (OPQ);
- ``HNSW<M>``: a graph of M neighbours per item over the float32 vectors, no training.

Every index uses the inner product (embeddings are L2-normalised). Quantisers are trained on
a seeded sample of ``train_size`` rows. ``faiss`` is an optional dependency
(``pip install 'hrem-ray[faiss]'``), imported only when a FAISS index is built or opened.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FLAT = "Flat"
DEFAULT_NPROBE = 16  # IVF lists searched per query unless --nprobe says otherwise
DEFAULT_EF_SEARCH = 64  # HNSW candidate list per query unless --ef-search says otherwise
# PQ candidates per query rescored exactly against the stored embeddings unless --refine says
# otherwise: PQ codes alone rank poorly (docs/serving.md, "Choosing an index")
DEFAULT_REFINE = 100
REFINE = "refine"  # the one search knob applied here, not by FAISS
RECALL_KS = (1, 5, 10)
RECALL_QUERIES = 1000  # queries sampled (seeded) to measure recall at build time
TRAIN_PER_CENTROID = 39  # FAISS's own minimum for k-means without a warning
MIN_TRAIN = 10_000
OPQ_CENTROIDS = 256
MAX_TRAIN = 262_144  # the training sample's cap: 39 x 4096 lists fits under it

_SPEC = re.compile(
    r"^(?:(?P<opq>OPQ(?P<opq_m>\d+)),)?IVF(?P<nlist>\d+),"
    r"(?:Flat|PQ(?P<pq_m>\d+)(?:x(?P<bits>\d+))?)$"
    r"|^HNSW(?P<hnsw>\d+)$"
)
SPEC_HELP = "Flat, IVF<nlist>,Flat, IVF<nlist>,PQ<m>[x<bits>], OPQ<m>,IVF<nlist>,PQ<m> or HNSW<M>"


def import_faiss() -> Any:
    """The ``faiss`` module, or a one-line ValueError saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise ValueError(
            "FAISS indexes need faiss, which is not installed: pip install 'hrem-ray[faiss]'"
        ) from None
    return faiss


@dataclass(frozen=True)
class IndexSpec:
    """A validated factory string and what it needs: lists, PQ centroids, search knobs."""

    spec: str
    nlist: int = 0  # IVF lists, 0 for HNSW and Flat
    pq_centroids: int = 0  # 2**bits per PQ sub-quantiser, 0 without PQ
    hnsw: int = 0  # neighbours per item, 0 without HNSW

    @property
    def is_flat(self) -> bool:
        return self.spec == FLAT

    def params(
        self, nprobe: int | None, ef_search: int | None, refine: int | None = None
    ) -> dict[str, int]:
        """The search knobs this index takes (``nprobe`` capped at nlist; ``refine``, the
        candidates rescored per query, for PQ), with defaults; a knob given for an index that
        does not take it is an error."""
        if nprobe is not None and not self.nlist:
            raise ValueError(f"--nprobe applies to IVF indexes, not {self.spec}")
        if ef_search is not None and not self.hnsw:
            raise ValueError(f"--ef-search applies to HNSW indexes, not {self.spec}")
        if refine is not None and not self.pq_centroids:
            raise ValueError(f"--refine applies to PQ indexes, not {self.spec}")
        if self.nlist:
            knobs = {"nprobe": min(_positive("--nprobe", _or(nprobe, DEFAULT_NPROBE)), self.nlist)}
            if self.pq_centroids:
                knobs[REFINE] = _positive("--refine", _or(refine, DEFAULT_REFINE))
            return knobs
        if self.hnsw:
            return {"efSearch": _positive("--ef-search", _or(ef_search, DEFAULT_EF_SEARCH))}
        return {}

    def train_size(self, n: int) -> int:
        """Rows the quantisers train on: 39 per centroid of the largest k-means, at least
        MIN_TRAIN, at most MAX_TRAIN and the gallery; 0 for HNSW and Flat (no training)."""
        centroids = max(self.nlist, self.pq_centroids)
        if not centroids:
            return 0
        return min(n, max(TRAIN_PER_CENTROID * centroids, MIN_TRAIN), MAX_TRAIN)


def parse_spec(spec: str, n: int, dim: int) -> IndexSpec:
    """Validate ``spec`` for ``n`` vectors of ``dim`` before any encoding (one-line errors)."""
    if spec == FLAT:
        return IndexSpec(FLAT)
    m = _SPEC.match(spec) if isinstance(spec, str) else None
    if m is None:
        raise ValueError(f"--index must be one of {SPEC_HELP}, got {spec!r}")
    if m["hnsw"]:
        return IndexSpec(spec, hnsw=_positive("HNSW M", int(m["hnsw"])))
    nlist = _positive("IVF nlist", int(m["nlist"]))
    if nlist > n:
        raise ValueError(
            f"--index {spec} needs at least {nlist} vectors to train on, the gallery has {n} "
            f"images: use IVF<nlist> with nlist <= {n}"
        )
    if not m["pq_m"]:
        return IndexSpec(spec, nlist=nlist)
    pq_m, bits = int(m["pq_m"]), int(m["bits"] or 8)
    if pq_m < 1 or dim % pq_m:
        raise ValueError(f"--index {spec}: PQ{pq_m} must divide the embedding size {dim}")
    if m["opq"] and int(m["opq_m"]) != pq_m:
        raise ValueError(f"--index {spec}: OPQ{m['opq_m']} must match PQ{pq_m}")
    # OPQ trains its rotation with 8-bit codes, whatever the final PQ's bits
    centroids = max(2**bits, OPQ_CENTROIDS) if m["opq"] else 2**bits
    if not 1 <= bits <= 16 or n < centroids:
        raise ValueError(
            f"--index {spec}: PQ with {bits} bits needs 1..16 bits and at least {centroids} "
            f"vectors, the gallery has {n}"
        )
    return IndexSpec(spec, nlist=nlist, pq_centroids=centroids)


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass
class FaissIndex:
    """A FAISS index (inner product, ids = row order) and the search knobs it runs with."""

    index: Any
    params: dict[str, int] = field(default_factory=dict)

    @classmethod
    def train(
        cls, embs: np.ndarray, spec: IndexSpec, params: dict[str, int], seed: int = 0
    ) -> FaissIndex:
        """Train on a seeded sample of ``spec.train_size`` rows, then add every row."""
        faiss = import_faiss()
        x = np.ascontiguousarray(embs, dtype=np.float32)
        index = faiss.index_factory(x.shape[1], spec.spec, faiss.METRIC_INNER_PRODUCT)
        size = spec.train_size(len(x))
        if size:
            rows = np.sort(np.random.default_rng(seed).choice(len(x), size, replace=False))
            index.train(x[rows])
        index.add(x)
        return cls(index, params).configured()

    @classmethod
    def read(cls, path: Path, params: dict[str, int]) -> FaissIndex:
        """Open with ``IO_FLAG_MMAP``: an IVF index's inverted lists are memory-mapped
        read-only, so replicas on one node share their pages like the ``.npy`` embeddings."""
        faiss = import_faiss()
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY
        return cls(faiss.read_index(str(path), flags), params).configured()

    def configured(self, **params: int) -> FaissIndex:
        """Apply (new) search knobs in place, e.g. ``nprobe`` or ``efSearch``; returns self."""
        self.params = {**self.params, **params}
        space = import_faiss().ParameterSpace()
        for name, value in self.params.items():
            if name != REFINE:
                space.set_index_parameter(self.index, name, int(value))
        return self

    def candidates(self, k: int) -> int:
        """How many candidates to fetch for a top-``k`` search: ``refine`` (PQ) or ``k``."""
        return max(k, self.params.get(REFINE, 0))

    def write(self, path: Path) -> None:
        import_faiss().write_index(self.index, str(path))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """[n, k] ids and scores, best first; id -1 where the index found fewer than k."""
        vals, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return ids, vals


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean over rows of |approx top-k ∩ exact top-k| / k."""
    hits = [len(np.intersect1d(a[:k], e[:k])) for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits)) / k


def recall_sample(n: int) -> np.ndarray:
    """The rows used as build-time recall queries: all, or a seeded sample of RECALL_QUERIES."""
    if n <= RECALL_QUERIES:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, RECALL_QUERIES, replace=False))
