"""Candidate vocabulary: the words the soft prompt may choose for the template's slot.

Method step 2 (adapted): instead of a masked language model's vocabulary, the candidates are
whole-word tokens of the CLIP BPE vocabulary itself, a built-in concept list, or the user's own
words. A candidate may span several BPE tokens ("aquarium fish"); it is kept whole.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

from .concepts import BUILTIN_LISTS, load_concept_list, load_stopwords

WORD_END = "</w>"  # CLIP BPE marks the last piece of a word with this suffix
_ALPHA = re.compile(r"^[a-z]+$")


# -- user text: what may not be shown raw, and how messages quote it ------------------------------
# Control characters (C0, DEL, C1), line and paragraph separators, and the bidirectional
# formatting characters (U+202E RIGHT-TO-LEFT OVERRIDE and its kin, which reorder what a
# terminal or a cell shows while staying invisible). Emoji and other printable text are fine.
HIDDEN_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
QUOTE_LIMIT = 60  # characters of user text quoted in an error message


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: str) -> str:
    """`text` with every hidden character (HIDDEN_CHARS) written as an escape such as \\x00,
    \\x1b or \\u202e; everything else unchanged. For tables, CSV cells and messages."""
    return HIDDEN_CHARS.sub(_escape, text)


def quoted(text: str, limit: int = QUOTE_LIMIT) -> str:
    """User text for an error message: in quotes, hidden characters escaped, and past `limit`
    characters cut with an ellipsis and the full length noted, so a message stays short."""
    text = str(text)
    head = visible(text[:limit])
    if len(text) <= limit and len(head) <= limit:
        return f"'{head}'"
    return f"'{head[:limit]}…' ({len(text):,} characters)"


class VocabularyError(ValueError):
    """The candidate vocabulary cannot be built from the given input."""


@dataclass(frozen=True)
class Candidate:
    """One word the slot can hold, with the BPE token ids it becomes (one or more)."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Vocabulary:
    """An ordered, duplicate-free list of candidates; its index is the soft prompt's axis."""

    name: str
    candidates: tuple[Candidate, ...]

    def __len__(self) -> int:
        return len(self.candidates)

    def __getitem__(self, i: int) -> Candidate:
        return self.candidates[i]

    @property
    def max_tokens(self) -> int:
        return max(len(c.token_ids) for c in self.candidates)

    def index_of(self, text: str) -> int:
        for i, c in enumerate(self.candidates):
            if c.text == text:
                return i
        raise KeyError(text)

    def sample(self, n: int, seed: int, exclude: Iterable[int] = ()) -> list[int]:
        """A seeded random sample of candidate indices (for calibration), sorted."""
        excluded = set(exclude)
        pool = [i for i in range(len(self)) if i not in excluded]
        rng = random.Random(seed)
        return sorted(rng.sample(pool, min(n, len(pool))))


def from_bpe_vocab(
    bpe_vocab: Mapping[str, int],
    *,
    min_length: int = 3,
    max_length: int = 15,
    stopwords: frozenset[str] | None = None,
    name: str = "clip_words",
) -> Vocabulary:
    """Whole-word tokens of a CLIP BPE vocabulary: alphabetic, of sensible length, no stop words."""
    stop = load_stopwords() if stopwords is None else stopwords
    chosen = []
    for piece, token_id in bpe_vocab.items():
        if not piece.endswith(WORD_END):
            continue
        word = piece[: -len(WORD_END)]
        if _ALPHA.match(word) and min_length <= len(word) <= max_length and word not in stop:
            chosen.append(Candidate(word, (int(token_id),)))
    chosen.sort(key=lambda c: c.token_ids[0])
    if not chosen:
        raise VocabularyError(
            f"vocabulary '{name}': every BPE token was filtered out "
            f"(min_length={min_length}, max_length={max_length}); relax the length filter"
        )
    return Vocabulary(name, tuple(chosen))


def from_words(
    words: Sequence[str],
    tokenize: Callable[[str], list[int]],
    *,
    name: str = "custom",
    max_tokens: int = 8,
    reserved_ids: Iterable[int] = (),
) -> Vocabulary:
    """A user's or a built-in word list. `tokenize` maps text to BPE ids without start/end tokens.

    Words of several BPE tokens are kept as multi-token candidates. Duplicates and blank lines
    are dropped; a word that tokenizes to nothing, to a reserved (start/end/unknown) token or to
    too many tokens is an error that names it.
    """
    reserved = set(reserved_ids)
    seen: set[str] = set()
    out: list[Candidate] = []
    bad_empty, bad_long = [], []
    for raw in words:
        word = " ".join(raw.strip().split())
        if not word or word.startswith("#") or word.lower() in seen:
            continue
        seen.add(word.lower())
        ids = tuple(int(t) for t in tokenize(word))
        if not ids or reserved.intersection(ids):
            bad_empty.append(word)
        elif len(ids) > max_tokens:
            bad_long.append(word)
        else:
            out.append(Candidate(word, ids))
    if bad_empty:
        raise VocabularyError(
            f"vocabulary '{name}': {len(bad_empty)} word(s) are not in the tokenizer's vocabulary "
            f"(they tokenize to nothing or to special tokens): {', '.join(repr(w) for w in bad_empty[:10])}. "
            "Remove them or spell them with plain letters."
        )
    if bad_long:
        raise VocabularyError(
            f"vocabulary '{name}': word(s) longer than {max_tokens} tokens: "
            f"{', '.join(repr(w) for w in bad_long[:10])}. Shorten them."
        )
    if not out:
        raise VocabularyError(f"vocabulary '{name}' is empty: give at least one word, one per line")
    return Vocabulary(name, tuple(out))


def build_vocabulary(
    source: str,
    tokenize: Callable[[str], list[int]],
    bpe_vocab: Mapping[str, int],
    custom_words: str = "",
    reserved_ids: Iterable[int] = (),
) -> Vocabulary:
    """Resolve a vocabulary name ("clip_words", a built-in list, or "custom") to candidates."""
    if source == "clip_words":
        return from_bpe_vocab(bpe_vocab)
    if source in BUILTIN_LISTS:
        return from_words(load_concept_list(source), tokenize, name=source, reserved_ids=reserved_ids)
    if source == "custom":
        lines = re.split(r"[\n,]", custom_words)
        return from_words(lines, tokenize, name="custom", reserved_ids=reserved_ids)
    raise VocabularyError(
        f"unknown vocabulary '{source}'; choose clip_words, custom or one of {', '.join(BUILTIN_LISTS)}"
    )
