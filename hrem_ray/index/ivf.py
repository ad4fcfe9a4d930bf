"""Optional FAISS IVF indexes for galleries too big for exact search (about 1M items and up).

``faiss`` is an optional dependency (``pip install 'hrem-ray[faiss]'``) and is imported only
here, only when an IVF index is built or opened, so exact-only galleries never need it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_NPROBE = 16  # lists searched per query unless `hrem-ray index --nprobe` says otherwise
RECALL_K = 10
RECALL_QUERIES = 1000  # queries sampled (seeded) to measure recall@10 at build time


def import_faiss() -> Any:
    """The ``faiss`` module, or a one-line ValueError saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise ValueError(
            "IVF indexes need faiss, which is not installed: pip install 'hrem-ray[faiss]'"
        ) from None
    return faiss


def check_ivf(nlist: int, nprobe: int, n_vectors: int) -> int:
    """Validate the IVF settings before minutes of encoding; return nprobe capped at nlist.

    k-means needs at least one training point per list, so ``nlist`` above the number of
    vectors is refused rather than silently lowered (the lists would be near-empty anyway).
    """
    for name, value in (("--ivf (nlist; 0 = exact search only)", nlist), ("--nprobe", nprobe)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if nlist > n_vectors:
        raise ValueError(
            f"--ivf {nlist} needs at least {nlist} vectors to train on, the split has "
            f"{n_vectors} images: use --ivf <= {n_vectors} (or 0 for exact search only)"
        )
    return min(nprobe, nlist)


@dataclass
class IvfIndex:
    """A trained ``faiss.IndexIVFFlat`` (inner product) and the nprobe to search it with."""

    index: Any
    nprobe: int

    @classmethod
    def train(cls, embs: np.ndarray, nlist: int, nprobe: int) -> IvfIndex:
        """k-means over L2-normalised rows (float32): one list per centroid, ids = row order."""
        faiss = import_faiss()
        x = np.ascontiguousarray(embs, dtype=np.float32)
        index = faiss.IndexIVFFlat(
            faiss.IndexFlatIP(x.shape[1]), x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT
        )
        index.train(x)
        index.add(x)
        return cls(index, nprobe)

    @classmethod
    def read(cls, path: Path, nprobe: int) -> IvfIndex:
        """Open with ``IO_FLAG_MMAP``: for an IVFFlat the inverted lists (the vectors) are
        memory-mapped read-only, so replicas on one node share their pages like the ``.npy``
        embeddings; only the small coarse quantizer is read into memory."""
        faiss = import_faiss()
        return cls(faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY),
                   nprobe)  # fmt: skip

    def write(self, path: Path) -> None:
        import_faiss().write_index(self.index, str(path))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """[n, k] ids and scores, best first; id -1 where the probed lists held < k vectors."""
        self.index.nprobe = self.nprobe
        vals, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return ids, vals


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over rows of |approx top-k ∩ exact top-k| / k."""
    k = exact.shape[1]
    hits = [len(np.intersect1d(a, e)) for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits)) / k


def recall_sample(n: int) -> np.ndarray:
    """The rows used as build-time recall queries: all, or a seeded sample of RECALL_QUERIES."""
    if n <= RECALL_QUERIES:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, RECALL_QUERIES, replace=False))
