"""Synthetic region features: noisy, ReLU'd sums of the concept codes of a scene's objects,
colours, counts, action, setting, clutter and background."""

from __future__ import annotations

import numpy as np

from hrem_ray.synth.lexicon import (
    COLOURS,
    N_BACKGROUND,
    OFF_BACKGROUND,
    OFF_COLOUR,
    OFF_COUNT,
    OFF_SETTING,
    OFF_VERB,
)
from hrem_ray.synth.scenes import Scene

NOISE_STD = 1.0  # per-value Gaussian noise of every region
STYLE_STD = 0.1  # per-image offset shared by its regions (lighting, camera)
RELU_SHIFT = 0.25  # subtracted before the ReLU, for CNN-like sparsity


def region_plan(scene: Scene, rng: np.random.Generator, regions: int) -> np.ndarray:
    """Per region, two (concept, weight) terms whose weighted code sum is the region's signal.

    Objects get 2-3 regions per instance (so the count shows as how many regions carry the
    object) with their colour mixed in, plus one count region; the action and the setting get a
    few regions; clutter objects one each; background "stuff" fills the rest. Returns
    ``[regions, 4]`` float rows (concept_a, weight_a, concept_b, weight_b) in random order.
    """
    lead = scene.groups[0].noun
    rows: list[tuple[int, float, int, float]] = []
    for g in scene.groups:
        n_regions = int(rng.integers(2, 4, size=g.count).sum())
        rows += [(g.noun, 1.0, OFF_COLOUR + g.colour, 0.6)] * n_regions
        rows.append((OFF_COUNT + g.count - 1, 1.0, g.noun, 0.4))
    rows += [(OFF_VERB + scene.verb, 1.0, lead, 0.4)] * int(rng.integers(2, 5))
    rows += [(OFF_SETTING + scene.setting, 1.0, 0, 0.0)] * int(rng.integers(3, 7))
    for c in scene.clutter:
        rows.append((c, 0.8, OFF_COLOUR + int(rng.integers(len(COLOURS))), 0.5))
    n_background = min(regions // 8, 2)
    keep = regions - n_background
    if len(rows) > keep:
        rows = [rows[i] for i in sorted(rng.choice(len(rows), size=keep, replace=False))]
    background = rng.integers(N_BACKGROUND, size=regions - len(rows))
    rows += [(OFF_BACKGROUND + int(b), 0.8, 0, 0.0) for b in background]
    plan = np.array(rows, dtype=np.float64)
    plan[:, [1, 3]] *= rng.uniform(0.7, 1.3, size=(regions, 1))  # detection strength
    return plan[rng.permutation(regions)]


def render(plans: np.ndarray, codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Region features ``[images, regions, dim]`` float32 from ``[images, regions, 4]`` plans."""
    n, r, _ = plans.shape
    dim = codes.shape[1]
    out = rng.standard_normal((n, r, dim), dtype=np.float32)
    out *= NOISE_STD
    out += STYLE_STD * rng.standard_normal((n, 1, dim), dtype=np.float32) - RELU_SHIFT
    for col in (0, 2):
        weight = plans[:, :, col + 1, None].astype(np.float32)
        out += codes[plans[:, :, col].astype(np.int64)] * weight
    return np.maximum(out, 0.0, out=out)
