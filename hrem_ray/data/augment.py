"""Region dropout, the image side of training augmentation (docs/deviations.md).

Numpy only, so the Ray Data tasks that augment shard rows (``data/ray_data.py``) start
without importing torch; the word side is ``CaptionTokenizer.augment_ids``.
"""

from __future__ import annotations

import numpy as np


def region_dropout(n_regions: int, rng: np.random.Generator, keep: float = 0.8) -> np.ndarray:
    """Sorted indices of the regions kept, each independently with probability ``keep``.

    If none survives (probability 0.2**36 with the defaults) one random region is kept: the
    reference would pool over an empty set there and produce NaN.
    """
    kept = np.flatnonzero(rng.random(n_regions) < keep)
    if kept.size == 0:
        kept = rng.integers(0, n_regions, size=1)
    return kept
