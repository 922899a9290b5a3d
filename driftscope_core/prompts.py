"""Prompt templates with one open slot, and their token sequences.

Method step 1: a template such as "a photo of a {}" whose slot the soft prompt fills. The slot
is filled in embedding space, so the token sequence around it is fixed and built once.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from .text import HIDDEN_CHARS, quoted, visible

SLOT = "{}"
# 77 CLIP tokens hold at most about 2,200 characters of words (the longest BPE piece is 28
# letters); a longer line is refused before it is tokenized, runs of spaces included.
MAX_TEMPLATE_CHARS = 4_000


UNPADDED_ROOM = 512  # tokens of one prompt to an encoder that is not padded (T5 reads any length)


class TemplateError(ValueError):
    """A template cannot be used."""


@dataclass(frozen=True)
class TokenLayout:
    """Special tokens and length of a text encoder's input: CLIP's start ... end pad..., or a
    T5's ... end pad... (start None)."""

    start: int | None = 49406
    end: int = 49407
    pad: int = 49407  # SD1.x pads with the end token, SD2.x with 0, T5 with 0
    max_length: int | None = 77  # the padded length (Flux's T5: 256); None: not padded (Chroma's T5)

    @property
    def padded(self) -> bool:
        return self.max_length is not None

    @property
    def room(self) -> int:
        """Tokens a prompt may hold: the padded length, or practically any for unpadded encoders."""
        return UNPADDED_ROOM if self.max_length is None else self.max_length

    @property
    def specials(self) -> int:
        """Start and end tokens a prompt carries."""
        return 1 + (self.start is not None)


@dataclass(frozen=True)
class Template:
    """A parsed template: token ids before and after the slot (no start/end tokens) in the
    vocabulary's tokenizer, and (encoder, prefix, suffix) for every text encoder whose
    tokenizer differs (Flux's T5)."""

    text: str
    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    encoder_ids: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()

    def fill(self, word: str) -> str:
        return self.text.replace(SLOT, word)

    def for_encoder(self, encoder: str) -> "Template":
        """The template as text encoder `encoder` reads it."""
        for name, prefix, suffix in self.encoder_ids:
            if name == encoder:
                return Template(self.text, prefix, suffix)
        return self


def check_template(text: str, where: str = "templates") -> None:
    """Raise TemplateError (beginning with `where`, the input to fix) unless `text` is a usable
    template: at most MAX_TEMPLATE_CHARS characters, no control or invisible formatting
    character but tabs, exactly one slot, not glued to a letter or digit. Needs no tokenizer."""
    if len(text) > MAX_TEMPLATE_CHARS:
        raise TemplateError(
            f"{where}: template {quoted(text)} is longer than {MAX_TEMPLATE_CHARS:,} characters, "
            "more than the text encoder takes; shorten it"
        )
    hidden = HIDDEN_CHARS.search(text.replace("\t", " "))
    if hidden:
        raise TemplateError(
            f"{where}: template {quoted(text)} contains the control or invisible formatting character "
            f"{visible(hidden.group())}; remove it"
        )
    n = text.count(SLOT)
    if n != 1:
        raise TemplateError(
            f'{where}: template {quoted(text)} has {n} slots; each template needs exactly one "{{}}" '
            'where the word goes, e.g. "a photo of a {}"'
        )
    if re.search(r"[A-Za-z0-9]\{\}|\{\}[A-Za-z0-9]", text):
        raise TemplateError(
            f'{where}: template {quoted(text)}: the slot "{{}}" is glued to a letter or digit; put a space or '
            "punctuation on both sides so the word is tokenized on its own"
        )


def parse_templates(text: str | Sequence[str]) -> list[str]:
    """Split user text into templates (one per line, blank lines skipped) and check each one
    (check_template); an error names the `templates` input and the line."""
    lines = text.splitlines() if isinstance(text, str) else list(text)
    templates = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            check_template(line.strip(), f"templates, line {number}")
            templates.append(line.strip())
    if not templates:
        raise TemplateError('templates: give at least one template such as "a photo of a {}"')
    return templates


def tokenize_template(text: str, tokenize: Callable[[str], list[int]], layout: TokenLayout,
                      word_tokens: int = 1) -> Template:
    """Tokenize the text on both sides of the slot. CLIP's BPE splits at whitespace and
    punctuation first, so the pieces tokenize the same as the whole prompt would. The template
    must leave room for a word of `word_tokens` tokens (pass the vocabulary's max_tokens)."""
    check_template(text)
    before, after = text.split(SLOT)
    prefix = tuple(tokenize(before)) if before.strip() else ()
    suffix = tuple(tokenize(after)) if after.strip() else ()
    room = layout.room - layout.specials - len(prefix) - len(suffix)
    if room < word_tokens:
        raise TemplateError(
            f"templates: template {quoted(text)} is too long: its {len(prefix) + len(suffix)} tokens leave room "
            f"for {max(room, 0)} of the {word_tokens} token(s) a word needs in the encoder's {layout.room}; "
            "shorten it"
        )
    return Template(text, prefix, suffix)


def tokenize_template_per_encoder(text: str, encoders: Mapping[str, tuple[Callable[[str], list[int]], TokenLayout, int]]
                                  ) -> Template:
    """Method step 1 for a family whose text encoders use different tokenizers: the template
    tokenized by each (encoder -> (tokenize, layout, the longest word's tokens there)); the
    first encoder's ids are the template's own."""
    parts = {name: tokenize_template(text, tok, layout, word_tokens) for name, (tok, layout, word_tokens) in encoders.items()}
    first = next(iter(parts.values()))
    return Template(text, first.prefix_ids, first.suffix_ids,
                    tuple((name, t.prefix_ids, t.suffix_ids) for name, t in parts.items()))


@dataclass(frozen=True)
class SlotPrompt:
    """One prompt as one text encoder's input: token ids around the slot, and the slot itself,
    either the word's token ids (exact, no gradient) or its embedding rows (the soft prompt's
    input, method step 2). `head` starts with the start token (if any); `tail` ends with padding, so
    len(head) + slot length + len(tail) is the encoder's length."""

    head: tuple[int, ...]
    slot: tuple[int, ...] | torch.Tensor  # k token ids, or rows (k, D) of the encoder's token embedding
    tail: tuple[int, ...]

    @property
    def slot_length(self) -> int:
        return len(self.slot) if isinstance(self.slot, tuple) else int(self.slot.shape[0])

    @property
    def slot_positions(self) -> range:
        """The slot's token positions in this encoder's sequence."""
        return range(len(self.head), len(self.head) + self.slot_length)

    def ids(self) -> list[int]:
        """The full id sequence (slot given as ids only): what the encoder's tokenizer gives."""
        if not isinstance(self.slot, tuple):
            raise TypeError("this prompt's slot holds embedding rows, not token ids")
        return [*self.head, *self.slot, *self.tail]



@dataclass(frozen=True)
class PromptBuilder:
    """Builds one text encoder's input for a template with the slot filled: start + prefix ids
    before the slot, suffix + end + padding after it, to the encoder's length."""

    template: Template
    layout: TokenLayout

    @property
    def head(self) -> tuple[int, ...]:
        start = () if self.layout.start is None else (self.layout.start,)
        return (*start, *self.template.prefix_ids)

    def room(self) -> int:
        """How many slot tokens fit."""
        return self.layout.room - len(self.head) - len(self.template.suffix_ids) - 1

    def prompt(self, slot: Sequence[int] | torch.Tensor) -> SlotPrompt:
        """The prompt with `slot` (k token ids, or k embedding rows (k, D)) in the slot."""
        slot = tuple(int(i) for i in slot) if not torch.is_tensor(slot) else slot
        k = len(slot) if isinstance(slot, tuple) else int(slot.shape[0])
        if k > self.room():
            raise TemplateError(f"templates: a word of {k} tokens does not fit into template {quoted(self.template.text)}")
        tail = (*self.template.suffix_ids, self.layout.end)
        if self.layout.padded:
            tail += (self.layout.pad,) * (self.layout.max_length - len(self.head) - k - len(tail))
        return SlotPrompt(self.head, slot, tail)

    def token_ids(self, word_ids: Sequence[int]) -> list[int]:
        """The full id sequence a tokenizer would produce for the filled template (for tests)."""
        return self.prompt(word_ids).ids()
