"""Synthetic scenes: what an image shows, drawn from a seed's world (concept popularity and the
concept codes that every split shares)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hrem_ray.synth.lexicon import COUNT_PROBS, KIND_COLOURS, N_CONCEPTS, NOUNS, SETTINGS, VERBS

_WORLD_KEY = 0  # the world's sub-stream of the seed; each split has its own (synth/__init__.py)


def stream(seed: int, *key: int) -> np.random.Generator:
    """The generator of one sub-stream of the seed (the world's, or a split's scenes, ...)."""
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


@dataclass(frozen=True)
class World:
    """What every split shares: concept popularity (seed only) and the concept codes."""

    noun_weights: np.ndarray
    verb_weights: np.ndarray
    setting_weights: np.ndarray
    codes: np.ndarray  # [concepts, dim] float32


def make_world(seed: int, dim: int) -> World:
    """The world of a seed; popularity does not depend on ``dim``, so scenes and captions don't."""
    pop = stream(seed, _WORLD_KEY, 0)

    def weights(n: int) -> np.ndarray:
        w = pop.uniform(0.4, 1.6, n)
        return w / w.sum()

    codes = stream(seed, _WORLD_KEY, 1).standard_normal((N_CONCEPTS, dim), dtype=np.float32)
    return World(weights(len(NOUNS)), weights(len(VERBS)), weights(len(SETTINGS)), codes)


@dataclass(frozen=True)
class Group:
    """``count`` objects of one kind and colour."""

    noun: int
    colour: int
    count: int


@dataclass(frozen=True)
class Scene:
    """What an image shows. ``groups[0]`` performs ``verb``; ``clutter`` is never mentioned."""

    groups: tuple[Group, ...]
    verb: int
    setting: int
    clutter: tuple[int, ...]


def _pick(rng: np.random.Generator, weights: np.ndarray, allowed: Sequence[int]) -> int:
    w = weights[list(allowed)]
    return int(allowed[rng.choice(len(allowed), p=w / w.sum())])


def sample_scene(world: World, rng: np.random.Generator) -> Scene:
    """A random scene: an acting person or animal, up to two more objects, an action, a place."""
    agents = [i for i, n in enumerate(NOUNS) if n.kind != "thing"]
    nouns = [_pick(rng, world.noun_weights, agents)]
    n_groups = 1 + int(rng.choice(3, p=[0.45, 0.35, 0.2]))
    while len(nouns) < n_groups:
        nouns.append(
            _pick(rng, world.noun_weights, [i for i in range(len(NOUNS)) if i not in nouns])
        )
    groups = tuple(
        Group(
            noun=n,
            colour=int(rng.choice(KIND_COLOURS[NOUNS[n].kind])),
            count=1 + int(rng.choice(len(COUNT_PROBS), p=COUNT_PROBS)),
        )
        for n in nouns
    )
    person = NOUNS[nouns[0]].kind == "person"
    verbs = [i for i, v in enumerate(VERBS) if person or not v.person_only]
    others = [i for i in range(len(NOUNS)) if i not in nouns]
    clutter = rng.choice(others, size=int(rng.integers(0, 3)), replace=False)
    return Scene(
        groups=groups,
        verb=_pick(rng, world.verb_weights, verbs),
        setting=_pick(rng, world.setting_weights, range(len(SETTINGS))),
        clutter=tuple(int(c) for c in clutter),
    )
