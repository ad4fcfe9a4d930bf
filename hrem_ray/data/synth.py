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

import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap

from hrem_ray.data.precomp import CAPTIONS_PER_IMAGE

SPLIT_NAMES: dict[str, tuple[str, ...]] = {
    "f30k": ("train", "dev", "test"),
    "coco": ("train", "dev", "test", "testall"),
}

# ---------------------------------------------------------------------------------------------
# Lexicon. Every word a caption can contain comes from these tables (see `vocabulary`).
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Noun:
    """An object concept; ``forms`` are synonymous (singular, plural) pairs."""

    kind: str  # "person", "animal" or "thing": decides colours, and who can act
    forms: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Verb:
    """An action concept; ``forms`` are synonymous (base, third person, -ing) triples."""

    forms: tuple[tuple[str, str, str], ...]
    person_only: bool = False


def _noun(kind: str, *pairs: str) -> Noun:
    return Noun(kind, tuple(tuple(p.split("/")) for p in pairs))


def _verb(*triples: str, person_only: bool = False) -> Verb:
    return Verb(tuple(tuple(t.split("/")) for t in triples), person_only)


NOUNS: tuple[Noun, ...] = (
    _noun("person", "man/men", "guy/guys"),
    _noun("person", "woman/women", "lady/ladies"),
    _noun("person", "boy/boys", "young boy/young boys"),
    _noun("person", "girl/girls", "little girl/little girls"),
    _noun("person", "child/children", "kid/kids"),
    _noun("person", "teenager/teenagers", "teen/teens"),
    _noun("person", "player/players", "athlete/athletes"),
    _noun("person", "worker/workers", "workman/workmen"),
    _noun("animal", "dog/dogs", "puppy/puppies"),
    _noun("animal", "cat/cats", "kitten/kittens"),
    _noun("animal", "horse/horses", "pony/ponies"),
    _noun("animal", "bird/birds"),
    _noun("animal", "cow/cows"),
    _noun("animal", "sheep/sheep", "lamb/lambs"),
    _noun("animal", "duck/ducks"),
    _noun("animal", "goat/goats"),
    _noun("animal", "bear/bears"),
    _noun("animal", "elephant/elephants"),
    _noun("animal", "deer/deer"),
    _noun("animal", "monkey/monkeys"),
    _noun("thing", "bicycle/bicycles", "bike/bikes"),
    _noun("thing", "car/cars"),
    _noun("thing", "ball/balls"),
    _noun("thing", "boat/boats"),
    _noun("thing", "bus/buses"),
    _noun("thing", "kite/kites"),
    _noun("thing", "umbrella/umbrellas"),
    _noun("thing", "bench/benches"),
    _noun("thing", "motorcycle/motorcycles", "motorbike/motorbikes"),
    _noun("thing", "truck/trucks"),
    _noun("thing", "frisbee/frisbees"),
    _noun("thing", "skateboard/skateboards"),
    _noun("thing", "surfboard/surfboards"),
    _noun("thing", "train/trains"),
    _noun("thing", "chair/chairs"),
    _noun("thing", "table/tables"),
    _noun("thing", "guitar/guitars"),
    _noun("thing", "backpack/backpacks", "bag/bags"),
    _noun("thing", "tent/tents"),
    _noun("thing", "flag/flags"),
)

COLOURS: tuple[tuple[str, ...], ...] = (
    ("red",),
    ("blue",),
    ("green",),
    ("yellow",),
    ("black",),
    ("white",),
    ("brown",),
    ("orange",),
    ("purple",),
    ("pink",),
    ("gray", "grey"),
    ("golden",),
)
_COLOUR_INDEX = {forms[0]: i for i, forms in enumerate(COLOURS)}
# Colours that read naturally for each kind of object (a person's colour is their clothing).
KIND_COLOURS: dict[str, tuple[int, ...]] = {
    "person": tuple(i for i, c in enumerate(COLOURS) if c[0] not in ("golden", "brown")),
    "animal": tuple(_COLOUR_INDEX[c] for c in ("black", "white", "brown", "gray", "golden")),
    "thing": tuple(range(len(COLOURS))),
}

VERBS: tuple[Verb, ...] = (
    _verb("run/runs/running", "jog/jogs/jogging"),
    _verb("walk/walks/walking", "stroll/strolls/strolling"),
    _verb("sit/sits/sitting"),
    _verb("stand/stands/standing"),
    _verb("jump/jumps/jumping", "leap/leaps/leaping"),
    _verb("play/plays/playing"),
    _verb("eat/eats/eating"),
    _verb("sleep/sleeps/sleeping", "nap/naps/napping"),
    _verb("swim/swims/swimming"),
    _verb("climb/climbs/climbing"),
    _verb("lie down/lies down/lying down"),
    _verb("rest/rests/resting", "relax/relaxes/relaxing"),
    _verb("wait/waits/waiting"),
    _verb("drink/drinks/drinking"),
    _verb("look around/looks around/looking around"),
    _verb("dance/dances/dancing", person_only=True),
    _verb("read/reads/reading", person_only=True),
    _verb("sing/sings/singing", person_only=True),
    _verb("wave/waves/waving", person_only=True),
    _verb("laugh/laughs/laughing", "smile/smiles/smiling", person_only=True),
)

SETTINGS: tuple[tuple[str, ...], ...] = (
    ("on the beach", "on a sandy beach", "at the beach", "near the sea", "by the shore"),
    ("in a park", "in the park", "at a city park", "on the grass in a park"),
    ("in a kitchen", "in the kitchen", "in a small kitchen"),
    ("on a street", "on the street", "on a busy street", "along the road"),
    ("in a field", "in a grassy field", "on a meadow"),
    ("in the snow", "on a snowy hill", "on the snow"),
    ("by a lake", "near the lake", "at the lake shore"),
    ("by a river", "near the river", "on the riverbank"),
    ("in a forest", "in the woods", "among the trees"),
    ("at a playground", "on the playground"),
    ("in a garden", "in the backyard", "in a flower garden"),
    ("in a living room", "in the living room", "inside a house"),
    ("in a restaurant", "at a cafe", "in a crowded restaurant"),
    ("in a parking lot", "in the parking lot"),
    ("in a stadium", "on a sports field", "in the stadium"),
    ("in the desert", "on the sand dunes", "in a dry desert"),
    ("at a market", "in a crowded market", "at the market"),
    ("on a mountain", "on a rocky hill", "in the mountains"),
    ("in a city square", "in a plaza", "in the town square"),
    ("on a bridge", "on a wooden bridge", "on the old bridge"),
)

# Determiners by count; "a" becomes "an" before a vowel.
COUNT_WORDS: dict[int, tuple[str, ...]] = {
    1: ("a", "a", "one", "the"),
    2: ("two", "a pair of", "a couple of"),
    3: ("three", "a few", "a group of three"),
    4: ("four", "several", "a group of", "many"),
}
COUNT_PROBS = np.array([0.55, 0.25, 0.12, 0.08])
PERSON_COLOUR_PHRASES = ("in", "wearing", "dressed in")
RELATIONS = ("with", "next to", "near", "beside")
PHOTO_PHRASES = ("a photo of", "a picture of", "an image of", "a close up of")
GLUE_WORDS = ("is", "are", "there", "and", "an")

N_BACKGROUND = 8  # region codes of unnamed "stuff" (sky, wall, ...) that no caption mentions
_N_CONCEPTS = (
    len(NOUNS) + len(COLOURS) + len(COUNT_WORDS) + len(VERBS) + len(SETTINGS) + N_BACKGROUND
)
_OFF_COLOUR = len(NOUNS)
_OFF_COUNT = _OFF_COLOUR + len(COLOURS)
_OFF_VERB = _OFF_COUNT + len(COUNT_WORDS)
_OFF_SETTING = _OFF_VERB + len(VERBS)
_OFF_BACKGROUND = _OFF_SETTING + len(SETTINGS)

# Stream keys: the world and each split draw from their own sub-stream of the seed.
_WORLD_KEY = 0
_SPLIT_KEYS = {"train": 1, "dev": 2, "test": 3, "testall": 4}
_SCENE, _CAPTION, _LAYOUT, _NOISE = range(4)

_WORD_RE = re.compile(r"[a-z]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased words of a caption (punctuation dropped), as the vocabulary tests see them."""
    return _WORD_RE.findall(text.lower())


def vocabulary() -> frozenset[str]:
    """Every word a generated caption can contain."""
    phrases: list[str] = [w for n in NOUNS for pair in n.forms for w in pair]
    phrases += [w for c in COLOURS for w in c]
    phrases += [w for v in VERBS for triple in v.forms for w in triple]
    phrases += [w for s in SETTINGS for w in s]
    phrases += [w for ws in COUNT_WORDS.values() for w in ws]
    phrases += [*PERSON_COLOUR_PHRASES, *RELATIONS, *PHOTO_PHRASES, *GLUE_WORDS]
    return frozenset(w for p in phrases for w in tokenize(p))


# ---------------------------------------------------------------------------------------------
# World and scenes
# ---------------------------------------------------------------------------------------------


def _rng(seed: int, *key: int) -> np.random.Generator:
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
    pop = _rng(seed, _WORLD_KEY, 0)

    def weights(n: int) -> np.ndarray:
        w = pop.uniform(0.4, 1.6, n)
        return w / w.sum()

    codes = _rng(seed, _WORLD_KEY, 1).standard_normal((_N_CONCEPTS, dim), dtype=np.float32)
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


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Region features
# ---------------------------------------------------------------------------------------------

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
        rows += [(g.noun, 1.0, _OFF_COLOUR + g.colour, 0.6)] * n_regions
        rows.append((_OFF_COUNT + g.count - 1, 1.0, g.noun, 0.4))
    rows += [(_OFF_VERB + scene.verb, 1.0, lead, 0.4)] * int(rng.integers(2, 5))
    rows += [(_OFF_SETTING + scene.setting, 1.0, 0, 0.0)] * int(rng.integers(3, 7))
    for c in scene.clutter:
        rows.append((c, 0.8, _OFF_COLOUR + int(rng.integers(len(COLOURS))), 0.5))
    n_background = min(regions // 8, 2)
    keep = regions - n_background
    if len(rows) > keep:
        rows = [rows[i] for i in sorted(rng.choice(len(rows), size=keep, replace=False))]
    background = rng.integers(N_BACKGROUND, size=regions - len(rows))
    rows += [(_OFF_BACKGROUND + int(b), 0.8, 0, 0.0) for b in background]
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
        _rng(seed, key, s) for s in (_SCENE, _CAPTION, _LAYOUT, _NOISE)
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


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


class _AtomicFiles:
    """Temp files in the target folder, moved into place only when the whole split is done."""

    def __init__(self, *targets: Path) -> None:
        self.targets = targets
        self.temps = [_temp_path(t) for t in targets]

    def __enter__(self) -> list[Path]:
        return self.temps

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            for temp, target in zip(self.temps, self.targets, strict=True):
                os.replace(temp, target)
        else:
            for temp in self.temps:
                temp.unlink(missing_ok=True)


def _write_rows(path: Path, start: int, rows: np.ndarray) -> None:
    """Write rows through a mapping that is dropped right away, so a split of any size never
    keeps more than one chunk of pages in this process (the kernel writes them back)."""
    ims = open_memmap(path, mode="r+")
    ims[start : start + len(rows)] = rows
    ims.flush()
    del ims


def _write_split(
    folder: Path,
    split: str,
    batches: Iterator[tuple[list[str], np.ndarray]],
    shape: tuple[int, int, int],
    progress: Callable[[str], None] | None,
) -> None:
    """Stream (captions, features) batches into ``{split}_caps.txt`` and ``{split}_ims.npy``."""
    n = shape[0]
    if progress:
        progress(f"{folder.name}/{split}: {n} images, {n * CAPTIONS_PER_IMAGE} captions")
    targets = (folder / f"{split}_ims.npy", folder / f"{split}_caps.txt")
    with _AtomicFiles(*targets) as (ims_tmp, caps_tmp):
        open_memmap(ims_tmp, mode="w+", dtype=np.float32, shape=shape)  # header, full size
        done, reported = 0, 0
        with open(caps_tmp, "w", encoding="utf-8", newline="\n") as caps:
            for captions, feats in batches:
                _write_rows(ims_tmp, done, feats)
                caps.writelines(c + "\n" for c in captions)
                done += len(feats)
                if progress and done < n and done * 10 // n > reported:
                    reported = done * 10 // n
                    progress(f"{folder.name}/{split}: {done}/{n} images")


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
        batches = (
            (c.captions, c.features) for c in iter_split(world, seed, split, n, regions, chunk)
        )
        _write_split(folder, split, batches, (n, regions, dim), progress)
    if dataset == "coco":
        _write_first_fold(folder, max(1, test_images // 5), chunk, progress)
    return folder


def _write_first_fold(
    folder: Path, n: int, chunk: int, progress: Callable[[str], None] | None
) -> None:
    """COCO's ``test`` split: the first ``n`` images of ``testall`` and their captions."""
    source = np.load(folder / "testall_ims.npy", mmap_mode="r")
    with open(folder / "testall_caps.txt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in islice(f, n * CAPTIONS_PER_IMAGE)]

    def batches() -> Iterator[tuple[list[str], np.ndarray]]:
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            caps = lines[start * CAPTIONS_PER_IMAGE : stop * CAPTIONS_PER_IMAGE]
            yield caps, np.asarray(source[start:stop])

    _write_split(folder, "test", batches(), (n, *source.shape[1:]), progress)
