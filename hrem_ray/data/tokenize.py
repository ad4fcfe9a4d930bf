"""BERT WordPiece tokenisation of captions, read straight from ``vocab.txt``.

transformers 5 removed ``basic_tokenizer``/``wordpiece_tokenizer`` and silently ignores
``vocab_file=`` (every token becomes [UNK]), so the reference's per-word augmentation cannot be
built on it. This module re-implements the two BERT stages so ids do not depend on the
transformers version; ``encode(train=False)`` matches ``AutoTokenizer`` for ordinary text.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MAX_WORD_CHARS = 100  # longer words become [UNK], as in BERT
_CACHE_LIMIT = 1 << 18  # word -> pieces entries kept before the cache is reset
_ASCII_PUNCT = "".join(chr(c) for c in range(33, 127) if not chr(c).isalnum())
_ASCII_WORDS = re.compile(f"[{re.escape(_ASCII_PUNCT)}]|[^\\s{re.escape(_ASCII_PUNCT)}]+")
# ASCII control characters vanish and ASCII whitespace becomes a space (fast path of _normalise)
_ASCII_CLEAN = {c: None for c in (*range(32), 127)} | {c: " " for c in (9, 10, 13)}
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _is_punct(ch: str) -> bool:
    """BERT's notion: ASCII non-alphanumeric symbols count too (``$``, ``^``, ``~``...)."""
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def _normalise(text: str, lower_case: bool) -> str:
    """Drop control/format chars, map whitespace to spaces, space out CJK, fold case/accents.

    Lower-casing is per character (no final-sigma rule) to match the Rust tokenizer.
    """
    if text.isascii():
        text = text.translate(_ASCII_CLEAN)
        return text.lower() if lower_case else text
    out = []
    for ch in text:
        if ch == "\ufffd" or (unicodedata.category(ch).startswith("C") and ch not in "\t\n\r"):
            continue
        if ch.isspace():
            out.append(" ")
        elif _is_cjk(ch):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    text = "".join(out)
    if not lower_case:
        return text
    text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    return "".join(c.lower() for c in text)


def _split_punct(text: str) -> list[str]:
    """Whitespace split, then every punctuation character becomes its own word."""
    words: list[str] = []
    for chunk in text.split():
        start = 0
        for i, ch in enumerate(chunk):
            if _is_punct(ch):
                if i > start:
                    words.append(chunk[start:i])
                words.append(ch)
                start = i + 1
        if start < len(chunk):
            words.append(chunk[start:])
    return words


class CaptionTokenizer:
    """Caption -> BERT ids, with the reference's per-word training augmentation."""

    def __init__(self, vocab: dict[str, int], *, lower_case: bool = True, max_tokens: int = 128):
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2 ([CLS] and [SEP]), got {max_tokens}")
        self.vocab = vocab
        self.lower_case = lower_case
        self.max_tokens = max_tokens
        self.vocab_size = len(vocab)
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t not in vocab]
        if missing:
            raise ValueError(f"vocabulary lacks the special token(s) {', '.join(missing)}")
        self.pad_id = vocab["[PAD]"]
        self.unk_id = vocab["[UNK]"]
        self.cls_id = vocab["[CLS]"]
        self.sep_id = vocab["[SEP]"]
        self.mask_id = vocab["[MASK]"]
        # True for "##" pieces: lets augmentation find word boundaries in encoded ids.
        self._continuation = np.zeros(max(vocab.values()) + 1, dtype=bool)
        self._continuation[[i for t, i in vocab.items() if t.startswith("##")]] = True
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def from_dir(cls, path: str | Path, *, max_tokens: int = 128) -> CaptionTokenizer:
        """Read ``vocab.txt`` (one token per line, id = line index) and ``do_lower_case``."""
        path = Path(path)
        vocab_file = path / "vocab.txt"
        if not vocab_file.is_file():
            raise FileNotFoundError(f"{vocab_file}: no vocab.txt in the text backbone folder")
        lines = vocab_file.read_text(encoding="utf-8").split("\n")
        if lines[-1] == "":
            lines.pop()
        vocab = {tok.rstrip("\r"): i for i, tok in enumerate(lines)}
        config_file = path / "tokenizer_config.json"
        lower = True
        if config_file.is_file():
            lower = bool(
                json.loads(config_file.read_text(encoding="utf-8")).get("do_lower_case", True)
            )
        return cls(vocab, lower_case=lower, max_tokens=max_tokens)

    def __getstate__(self) -> dict:
        """Ship without the word cache: it is rebuilt cheaply on the receiving worker."""
        return {**self.__dict__, "_cache": {}}

    def words(self, caption: str) -> list[str]:
        """BERT basic tokenisation (the reference's unit of word augmentation)."""
        text = _normalise(caption, self.lower_case)
        if text.isascii():
            return _ASCII_WORDS.findall(text)
        return _split_punct(text)

    def word_pieces(self, word: str) -> list[int]:
        return list(self._pieces(word))

    def _pieces(self, word: str) -> tuple[int, ...]:
        """Greedy longest-match-first WordPiece, cached because captions reuse few words."""
        pieces = self._cache.get(word)
        if pieces is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            pieces = self._cache[word] = self._wordpiece(word)
        return pieces

    def _wordpiece(self, word: str) -> tuple[int, ...]:
        if len(word) > MAX_WORD_CHARS:
            return (self.unk_id,)
        ids = []
        start = 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            if end == start:
                return (self.unk_id,)
            start = end
        return tuple(ids)

    def encode(
        self,
        caption: str,
        *,
        train: bool = False,
        rng: np.random.Generator | None = None,
        word_aug: float = 0.2,
    ) -> list[int]:
        """[CLS] + pieces + [SEP], at most ``max_tokens`` long (trailing pieces are dropped).

        With ``train`` each word is, with probability ``word_aug``, masked (half of those),
        replaced by random ids (a tenth) or deleted (the rest), whole word at a time.
        """
        ids = [i for w in self.words(caption) for i in self._pieces(w)]
        ids = [self.cls_id, *ids[: self.max_tokens - 2], self.sep_id]
        if train:
            if rng is None:
                raise ValueError("encode(train=True) needs a numpy Generator for augmentation")
            ids = self.augment_ids(ids, rng, word_aug)
        return ids

    def augment_ids(
        self, ids: Sequence[int], rng: np.random.Generator, word_aug: float = 0.2
    ) -> list[int]:
        """Word augmentation of an encoded caption ([CLS] ... [SEP]).

        Works on ids so that pipelines can tokenise once and augment afresh every epoch:
        a word is a piece without the "##" prefix and the "##" pieces that follow it.
        """
        body = list(ids[1:-1])
        words: list[tuple[int, ...]] = []
        for i in body:
            if words and self._continuation[i]:
                words[-1] += (i,)
            else:
                words.append((i,))
        return [ids[0], *self._augment(words, rng, word_aug), ids[-1]]

    def _augment(
        self, words: list[tuple[int, ...]], rng: np.random.Generator, word_aug: float
    ) -> list[int]:
        """One uniform draw per word decides keep / mask / random / delete."""
        ids: list[int] = []
        draws = rng.random(len(words))
        for pieces, u in zip(words, draws, strict=True):
            if u >= word_aug:
                ids.extend(pieces)
                continue
            r = u / word_aug
            if r < 0.5:
                ids.extend([self.mask_id] * len(pieces))
            elif r < 0.6:
                ids.extend(rng.integers(0, self.vocab_size, size=len(pieces)).tolist())
        return ids
