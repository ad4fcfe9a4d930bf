"""The synthetic captions' lexicon: every word a caption can contain, and the concept codes'
index space (each noun, colour, count, verb, setting and background "stuff" is one concept).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np


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
N_CONCEPTS = (
    len(NOUNS) + len(COLOURS) + len(COUNT_WORDS) + len(VERBS) + len(SETTINGS) + N_BACKGROUND
)
OFF_COLOUR = len(NOUNS)
OFF_COUNT = OFF_COLOUR + len(COLOURS)
OFF_VERB = OFF_COUNT + len(COUNT_WORDS)
OFF_SETTING = OFF_VERB + len(VERBS)
OFF_BACKGROUND = OFF_SETTING + len(SETTINGS)

_WORD_RE = re.compile(r"[a-z]+")


def words(text: str) -> list[str]:
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
    return frozenset(w for p in phrases for w in words(p))
