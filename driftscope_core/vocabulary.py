"""Candidate vocabulary: the words the soft prompt may choose for the template's slot.

Method step 2 (adapted): instead of a masked language model's vocabulary, the candidates are
whole-word tokens of the CLIP BPE vocabulary itself, a built-in concept list, or the user's own
words. A candidate may span several BPE tokens ("aquarium fish"); it is kept whole.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Mapping

from .concepts import BUILTIN_LISTS, load_concept_list, load_stopwords
from .text import HIDDEN_CHARS, quoted

WORD_END = "</w>"  # CLIP BPE marks the last piece of a word with this suffix
_ALPHA = re.compile(r"^[a-z]+$")
# Limits on a word list, checked before anything is tokenized. Neither changes a list that an
# audit can use: clip_words, the largest built-in vocabulary, has 32,031 words, and CLIP's
# longest BPE piece is 28 letters, so a word of at most 8 tokens is never 256 characters long.
MAX_WORDS = 50_000  # distinct words
MAX_WORD_CHARS = 256  # characters of one word, after whitespace is collapsed
MESSAGE_EXAMPLES = 10  # words quoted in one error message


def _examples(texts: list[str], total: int) -> str:
    """Up to MESSAGE_EXAMPLES quoted texts, and how many more there are."""
    shown = ", ".join(quoted(t) for t in texts[:MESSAGE_EXAMPLES])
    return shown if total <= MESSAGE_EXAMPLES else f"{shown} and {total - MESSAGE_EXAMPLES:,} more"


class VocabularyError(ValueError):
    """The candidate vocabulary cannot be built from the given input."""


@dataclass(frozen=True)
class Candidate:
    """One word the slot can hold, with the token ids it becomes (one or more) in the
    vocabulary's tokenizer, and in every other text encoder whose tokenizer differs (Flux's T5
    splits one CLIP word into several pieces): (encoder name, ids) pairs."""

    text: str
    token_ids: tuple[int, ...]
    encoder_ids: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def tokens(self) -> int:
        """How many tokens the word is in the encoder that splits it most (calibration.py)."""
        return max([len(self.token_ids), *(len(ids) for _, ids in self.encoder_ids)])

    def ids(self, encoder: str) -> tuple[int, ...]:
        """The word's ids in text encoder `encoder` (the vocabulary tokenizer's where none are set)."""
        for name, ids in self.encoder_ids:
            if name == encoder:
                return ids
        return self.token_ids


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

    def max_tokens_for(self, encoder: str) -> int:
        """The longest word in text encoder `encoder`'s tokens (the room a template must leave)."""
        return max(len(c.ids(encoder)) for c in self.candidates)

    def with_encoder_ids(self, encoder: str, tokenize: Callable[[str], list[int]], reserved_ids: Iterable[int] = (),
                         max_tokens: int = 16, tokenizer_name: str = "") -> "Vocabulary":
        """The same words with their ids in a second tokenizer (a text encoder that does not read
        the vocabulary tokenizer's ids). Candidates are words in every tokenizer the family
        uses: a word that this tokenizer turns into nothing, a reserved (e.g. unknown) token or
        more than `max_tokens` pieces is dropped; none left is an error."""
        reserved = set(reserved_ids)
        kept = []
        for cand in self.candidates:
            ids = tuple(int(t) for t in tokenize(cand.text))
            if ids and not reserved.intersection(ids) and len(ids) <= max_tokens:
                kept.append(replace(cand, encoder_ids=(*cand.encoder_ids, (encoder, ids))))
        if not kept:
            raise VocabularyError(f"vocabulary '{self.name}': none of its words is in the {tokenizer_name or encoder} "
                                  "tokenizer's vocabulary; give words in plain letters")
        return Vocabulary(self.name, tuple(kept))

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


def _distinct_words(words: Iterable[str], where: str) -> list[str]:
    """The list's words with whitespace collapsed, blank lines, `#` comments and duplicates
    (ignoring case) dropped. Checks what needs no tokenizer: at most MAX_WORDS words (reading
    stops there), each at most MAX_WORD_CHARS long and free of hidden characters."""
    seen: set[str] = set()
    out: list[str] = []
    too_long, hidden = [], []  # the first MESSAGE_EXAMPLES words of each kind, for the message
    n_long = n_hidden = 0
    for raw in words:
        word = " ".join(raw.split())
        if not word or word.startswith("#") or word.lower() in seen:
            continue
        seen.add(word.lower())
        if len(seen) > MAX_WORDS:
            raise VocabularyError(
                f"{where}: more than {MAX_WORDS:,} distinct words; an audit takes at most {MAX_WORDS:,} "
                "(clip_words, every whole-word CLIP token, has about 32,000). Shorten the list."
            )
        if len(word) > MAX_WORD_CHARS:
            n_long += 1
            if len(too_long) < MESSAGE_EXAMPLES:
                too_long.append(word)
        elif HIDDEN_CHARS.search(word):
            n_hidden += 1
            if len(hidden) < MESSAGE_EXAMPLES:
                hidden.append(word)
        else:
            out.append(word)
    if n_long:
        raise VocabularyError(
            f"{where}: {n_long:,} word(s) longer than {MAX_WORD_CHARS} characters: {_examples(too_long, n_long)}. "
            "Shorten them: a candidate is a word or a short phrase."
        )
    if n_hidden:
        raise VocabularyError(
            f"{where}: {n_hidden:,} word(s) contain control characters or invisible formatting characters "
            f"(shown escaped): {_examples(hidden, n_hidden)}. Remove those characters."
        )
    return out


def from_words(
    words: Iterable[str],
    tokenize: Callable[[str], list[int]],
    *,
    name: str = "custom",
    max_tokens: int = 8,
    reserved_ids: Iterable[int] = (),
    where: str | None = None,
) -> Vocabulary:
    """A user's or a built-in word list. `tokenize` maps text to BPE ids without start/end tokens.

    Words of several BPE tokens are kept as multi-token candidates. Duplicates and blank lines
    are dropped; a word that tokenizes to nothing, to a reserved (start/end/unknown) token or to
    too many tokens is an error that names it. Before anything is tokenized, the list is held to
    MAX_WORDS words of at most MAX_WORD_CHARS characters without control or bidirectional
    formatting characters (_distinct_words). Errors begin with `where`, the input to fix
    (default: the vocabulary's name), and quote words shortened.
    """
    where = where or f"vocabulary '{name}'"
    reserved = set(reserved_ids)
    out: list[Candidate] = []
    bad_empty, bad_long = [], []
    for word in _distinct_words(words, where):
        ids = tuple(int(t) for t in tokenize(word))
        if not ids or reserved.intersection(ids):
            bad_empty.append(word)
        elif len(ids) > max_tokens:
            bad_long.append(word)
        else:
            out.append(Candidate(word, ids))
    if bad_empty:
        raise VocabularyError(
            f"{where}: {len(bad_empty)} word(s) are not in the tokenizer's vocabulary "
            f"(they tokenize to nothing or to special tokens): {_examples(bad_empty, len(bad_empty))}. "
            "Remove them or spell them with plain letters."
        )
    if bad_long:
        raise VocabularyError(
            f"{where}: {len(bad_long)} word(s) longer than {max_tokens} tokens: "
            f"{_examples(bad_long, len(bad_long))}. Shorten them."
        )
    if not out:
        raise VocabularyError(f"{where}: the word list is empty: give at least one word, one per line")
    return Vocabulary(name, tuple(out))


def build_vocabulary(
    source: str,
    tokenize: Callable[[str], list[int]],
    bpe_vocab: Mapping[str, int],
    custom_words: str = "",
    reserved_ids: Iterable[int] = (),
) -> Vocabulary:
    """Resolve a vocabulary name ("clip_words", a built-in list, or "custom") to candidates.
    `custom_words` is split at newlines and commas; its errors name `custom_words`."""
    if source == "clip_words":
        return from_bpe_vocab(bpe_vocab)
    if source in BUILTIN_LISTS:
        return from_words(load_concept_list(source), tokenize, name=source, reserved_ids=reserved_ids)
    if source == "custom":
        pieces = (m.group() for m in re.finditer(r"[^\n,]+", custom_words))  # lazily: reading may stop early
        return from_words(pieces, tokenize, name="custom", reserved_ids=reserved_ids, where="custom_words")
    raise VocabularyError(
        f"unknown vocabulary {quoted(source)}; choose clip_words, custom or one of {', '.join(BUILTIN_LISTS)}"
    )
