"""Time the vectorised retrieval metrics against the per-query argsort loop of VSE-family code.

    .venv/bin/python bench/eval_speed.py --images 5000 --repeat 3 [--device cuda]

Builds a seeded random ``[n, 5n]`` float32 similarity matrix (COCO 5K size by default), checks
that both implementations give identical ranks, and prints their times and the speed-up.
``--device cuda`` ranks the matrix as a tensor on the GPU (``metrics.placed``, as evaluation
does for a model there); the time is that of a matrix already on the device, ranks read back.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np

from hrem_ray.devices import check_device
from hrem_ray.eval.metrics import (
    CAPTIONS_PER_IMAGE,
    evaluate_sims,
    i2t_ranks,
    placed,
    recall_summary,
    t2i_ranks,
)

# Scores live on a 2**-16 grid and ground-truth scores on its half-points, so no candidate can
# tie its ground truth: the argsort baseline's position is then well-defined and must match.
GRID = 2.0**16


def make_sims(n_images: int, seed: int) -> np.ndarray:
    """Random scores, ground-truth pairs lifted so that ranks range from 0 to large."""
    rng = np.random.default_rng(seed)
    sims = rng.standard_normal((n_images, CAPTIONS_PER_IMAGE * n_images), dtype=np.float32)
    sims *= GRID
    np.rint(sims, out=sims)
    sims /= GRID
    blocks = sims.reshape(n_images, n_images, CAPTIONS_PER_IMAGE)  # a view: [image, image, 5]
    own = (np.arange(n_images), np.arange(n_images))
    lifted = blocks[own] + 3.0 * rng.random((n_images, CAPTIONS_PER_IMAGE), dtype=np.float32)
    blocks[own] = (np.floor(lifted * GRID) + 0.5) / GRID
    return sims


def baseline_i2t(sims: np.ndarray, queries: int) -> np.ndarray:
    """For each image: argsort its caption scores descending, take its 5 captions' best position."""
    ranks = np.empty(queries, dtype=np.int64)
    for i in range(queries):
        order = np.argsort(sims[i])[::-1]
        ranks[i] = min(
            np.where(order == c)[0][0]
            for c in range(CAPTIONS_PER_IMAGE * i, CAPTIONS_PER_IMAGE * (i + 1))
        )
    return ranks


def baseline_t2i(sims: np.ndarray, queries: int) -> np.ndarray:
    """For each caption: argsort its image scores descending, take its image's position."""
    ranks = np.empty(queries, dtype=np.int64)
    for c in range(queries):
        order = np.argsort(sims[:, c])[::-1]
        ranks[c] = np.where(order == c // CAPTIONS_PER_IMAGE)[0][0]
    return ranks


def time_best(fn: Callable[[], dict], repeat: int) -> tuple[float, dict]:
    """Best wall time over ``repeat`` runs, and the last result."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def time_baseline(sims: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Baseline ranks on the leading ``fraction`` of queries, and per-direction seconds
    extrapolated linearly to all queries."""
    times, ranks = [], []
    for fn, total in ((baseline_i2t, sims.shape[0]), (baseline_t2i, sims.shape[1])):
        queries = max(1, round(fraction * total))
        start = time.perf_counter()
        ranks.append(fn(sims, queries))
        times.append((time.perf_counter() - start) * total / queries)
    return ranks[0], ranks[1], times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="images (captions = 5x)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of ours; best time kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--baseline-fraction",
        type=float,
        default=1.0,
        help="time the baseline on this leading fraction of the queries and extrapolate",
    )
    parser.add_argument("--device", default="cpu", help="where ours ranks: cpu, cuda, cuda:N")
    parser.add_argument("--json", help="also write the figures here (bench/run_all.py)")
    args = parser.parse_args()

    device = check_device(args.device)
    sims = make_sims(args.images, args.seed)
    print(f"sims: {sims.shape[0]} x {sims.shape[1]} float32 ({sims.nbytes / 2**20:.0f} MiB)")
    ranked = placed(sims, device)  # the numpy matrix itself on the CPU
    ours_s, result = time_best(lambda: evaluate_sims(ranked), args.repeat)
    base_i2t, base_t2i, i2t_s, t2i_s = time_baseline(sims, args.baseline_fraction)

    same = np.array_equal(base_i2t, i2t_ranks(ranked)[: len(base_i2t)])
    same = same and np.array_equal(base_t2i, t2i_ranks(ranked)[: len(base_t2i)])
    if len(base_i2t) == sims.shape[0] and len(base_t2i) == sims.shape[1]:
        same = same and recall_summary(base_i2t) == result["i2t"]
        same = same and recall_summary(base_t2i) == result["t2i"]
        note = "all queries, metrics compared too"
    else:
        note = f"{len(base_i2t)} i2t + {len(base_t2i)} t2i queries; times extrapolated linearly"

    print(f"identical ranks: {same} (baseline run on {note})")
    print(f"rsum {result['rsum']:.2f}")
    print(f"{'implementation':<34} {'seconds':>8}")
    print(f"{'evaluate_sims on ' + str(device) + ' (best of ' + str(args.repeat) + ')':<34} "
          f"{ours_s:8.3f}")  # fmt: skip
    print(f"{'per-query argsort loop':<34} {i2t_s + t2i_s:8.3f}")
    print(f"{'  of which i2t / t2i':<34} {i2t_s:8.3f} / {t2i_s:.3f}")
    print(f"{'speed-up':<34} {(i2t_s + t2i_s) / ours_s:7.1f}x")
    if args.json:
        figures = {"images": args.images, "device": str(device), "ours_s": ours_s,
                   "baseline_s": i2t_s + t2i_s, "identical": bool(same)}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(figures, f)
    if not same:
        raise SystemExit("rank mismatch between implementations")


if __name__ == "__main__":
    main()
