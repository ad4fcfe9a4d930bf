"""Synthetic captions: five different sentences about a scene, each leaving out some details."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from hrem_ray.data.precomp import CAPTIONS_PER_IMAGE
from hrem_ray.synth.lexicon import (
    COLOURS,
    COUNT_WORDS,
    NOUNS,
    PERSON_COLOUR_PHRASES,
    PHOTO_PHRASES,
    RELATIONS,
    SETTINGS,
    VERBS,
)
from hrem_ray.synth.scenes import Group, Scene


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _with_article(words: str) -> str:
    """Fix "a" before a vowel ("a orange cat" -> "an orange cat")."""
    return re.sub(r"\ba ([aeiou])", r"an \1", words)


def noun_phrase(group: Group, rng: np.random.Generator, *, colour: bool) -> str:
    """E.g. "two brown dogs", "a woman in red", "the puppy"."""
    noun = NOUNS[group.noun]
    singular, plural = noun.forms[int(rng.integers(len(noun.forms)))]
    head = singular if group.count == 1 else plural
    det = _choice(rng, COUNT_WORDS[group.count])
    if colour:
        colour_word = _choice(rng, COLOURS[group.colour])
        if noun.kind == "person":
            head = f"{head} {_choice(rng, PERSON_COLOUR_PHRASES)} {colour_word}"
        else:
            head = f"{colour_word} {head}"
    return _with_article(f"{det} {head}")


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One sentence about the scene, choosing a template and which details to mention."""
    lead = scene.groups[0]
    plural = lead.count > 1
    subject = noun_phrase(lead, rng, colour=rng.random() < 0.6)
    if len(scene.groups) > 1 and rng.random() < 0.5:
        extras = [noun_phrase(g, rng, colour=rng.random() < 0.5) for g in scene.groups[1:]]
        subject = f"{subject} {_choice(rng, RELATIONS)} {' and '.join(extras)}"
    place = _choice(rng, SETTINGS[scene.setting]) if rng.random() < 0.75 else ""
    act = rng.random() < 0.85 or not place
    base, third, ing = VERBS[scene.verb].forms[int(rng.integers(len(VERBS[scene.verb].forms)))]
    be = "are" if plural else "is"
    pp = f" {place}" if place else ""
    if act:
        templates = [
            f"{subject} {be} {ing}{pp}",
            f"{subject} {ing}{pp}",
            f"{subject} {base if plural else third}{pp}",
            f"there {be} {subject} {ing}{pp}",
            f"{_choice(rng, PHOTO_PHRASES)} {subject} {ing}{pp}",
        ]
        if place:
            templates.append(f"{place}, {subject} {be} {ing}")
    else:
        templates = [
            f"{subject} {place}",
            f"there {be} {subject} {place}",
            f"{_choice(rng, PHOTO_PHRASES)} {subject} {place}",
        ]
    text = _choice(rng, templates)
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    return text + ("." if rng.random() < 0.7 else "")


def captions_for(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Five different captions (retrying duplicates a bounded number of times)."""
    out: list[str] = []
    for _ in range(20 * CAPTIONS_PER_IMAGE):
        text = caption(scene, rng)
        if text not in out:
            out.append(text)
        if len(out) == CAPTIONS_PER_IMAGE:
            return out
    return (out * CAPTIONS_PER_IMAGE)[:CAPTIONS_PER_IMAGE]
