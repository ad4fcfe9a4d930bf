"""Learnable synthetic data in the exact precomp format (docs/data.md).

No Flickr30K or COCO ships with the project, so training, evaluation, the Ray pipelines and the
demos run on this generator's output. An image is a *scene* (1-3 object groups, each with a colour
and a count, an action of the first group and a setting) drawn from a vocabulary of real English
words. Its captions are five different sentences describing the scene, each leaving out some
details. Its regions are noisy, ReLU'd encodings of the scene's concepts through a random code
table that is fixed by the seed and shared by every split, so what is learnt on train transfers to
dev and test. Captions that omit details, unmentioned clutter objects and noise keep the task from
being trivially solvable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from hrem_ray.data.precomp import CAPTIONS_PER_IMAGE, split_paths, write_split
from hrem_ray.synth.captions import captions_for
from hrem_ray.synth.features import region_plan, render
from hrem_ray.synth.scenes import Scene, World, make_world, sample_scene, stream

SPLIT_NAMES: dict[str, tuple[str, ...]] = {
    "f30k": ("train", "dev", "test"),
    "coco": ("train", "dev", "test", "testall"),
}  # keyed by options.DATASETS, the synth command's choices
# Stream keys: each split draws from its own sub-streams of the seed.
_SPLIT_KEYS = {"train": 1, "dev": 2, "test": 3, "testall": 4}
_SCENE, _CAPTION, _LAYOUT, _NOISE = range(4)


@dataclass(frozen=True)
class Chunk:
    """Consecutive images of a split: their scenes, captions (5 per image) and features."""

    scenes: list[Scene]
    captions: list[str]
    features: np.ndarray


def iter_split(
    world: World, seed: int, split: str, n_images: int, regions: int, chunk: int
) -> Iterator[Chunk]:
    """Generate a split in chunks of images. Scenes, captions, layouts and noise each use their
    own sub-stream of (seed, split), so the captions do not depend on ``regions`` or ``dim``."""
    key = _SPLIT_KEYS[split]
    scene_rng, caption_rng, layout_rng, noise_rng = (
        stream(seed, key, s) for s in (_SCENE, _CAPTION, _LAYOUT, _NOISE)
    )
    for start in range(0, n_images, chunk):
        scenes = [sample_scene(world, scene_rng) for _ in range(min(chunk, n_images - start))]
        captions = [c for s in scenes for c in captions_for(s, caption_rng)]
        plans = np.stack([region_plan(s, layout_rng, regions) for s in scenes])
        yield Chunk(scenes, captions, render(plans, world.codes, noise_rng))


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

CHUNK_BYTES = 32 << 20  # feature bytes generated at a time; bounds memory for any split size


def _check(dataset: str, counts: dict[str, int], regions: int, dim: int, seed: int) -> None:
    if dataset not in SPLIT_NAMES:
        raise ValueError(f"dataset must be one of {sorted(SPLIT_NAMES)}, got {dataset!r}")
    for name, value in counts.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if regions < 1:
        raise ValueError(f"regions must be >= 1, got {regions}")
    if dim < 8:
        raise ValueError(f"dim must be >= 8, got {dim}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def write_synthetic(
    out: str | Path,
    *,
    dataset: str = "f30k",
    train_images: int = 1000,
    dev_images: int = 100,
    test_images: int = 100,
    regions: int = 36,
    dim: int = 2048,
    seed: int = 0,
    progress: Callable[[str], None] | None = print,
) -> Path:
    """Write ``<out>/<dataset>_precomp`` with every split of ``SPLIT_NAMES[dataset]``.

    For coco, ``testall`` has ``test_images`` images and ``test`` is its first fifth (at least
    one image), as in the public COCO copies. Same arguments give byte-identical files.
    """
    counts = {"train_images": train_images, "dev_images": dev_images, "test_images": test_images}
    _check(dataset, counts, regions, dim, seed)
    folder = Path(out) / f"{dataset}_precomp"
    folder.mkdir(parents=True, exist_ok=True)
    world = make_world(seed, dim)
    chunk = max(1, CHUNK_BYTES // (regions * dim * 4))
    sizes = {"train": train_images, "dev": dev_images, "test": test_images}
    if dataset == "coco":
        sizes = {"train": train_images, "dev": dev_images, "testall": test_images}
    for split, n in sizes.items():
        chunks = (
            (c.captions, c.features) for c in iter_split(world, seed, split, n, regions, chunk)
        )
        write_split(out, dataset, split, chunks, (n, regions, dim), progress=progress)
    if dataset == "coco":
        _write_first_fold(out, max(1, test_images // 5), chunk, progress)
    return folder


def _write_first_fold(
    out: str | Path, n: int, chunk: int, progress: Callable[[str], None] | None
) -> None:
    """COCO's ``test`` split: the first ``n`` images of ``testall`` and their captions."""
    ims, caps = split_paths(out, "coco", "testall")
    source = np.load(ims, mmap_mode="r")
    with open(caps, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in islice(f, n * CAPTIONS_PER_IMAGE)]

    def batches() -> Iterator[tuple[list[str], np.ndarray]]:
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            caps = lines[start * CAPTIONS_PER_IMAGE : stop * CAPTIONS_PER_IMAGE]
            yield caps, np.asarray(source[start:stop])

    write_split(out, "coco", "test", batches(), (n, *source.shape[1:]), progress=progress)
