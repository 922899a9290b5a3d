"""Prompt templates with one open slot, and their token sequences.

Method step 1: a template such as "a photo of a {}" whose slot the soft prompt fills. The slot
is filled in embedding space, so the token sequence around it is fixed and built once.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .text import HIDDEN_CHARS, quoted, visible

SLOT = "{}"
# 77 CLIP tokens hold at most about 2,200 characters of words (the longest BPE piece is 28
# letters); a longer line is refused before it is tokenized, runs of spaces included.
MAX_TEMPLATE_CHARS = 4_000


class TemplateError(ValueError):
    """A template cannot be used."""


@dataclass(frozen=True)
class TokenLayout:
    """Special tokens and length of a CLIP-style text encoder's input."""

    start: int = 49406
    end: int = 49407
    pad: int = 49407  # SD1.x pads with the end token, SD2.x with 0
    max_length: int = 77


@dataclass(frozen=True)
class Template:
    """A parsed template: BPE ids before and after the slot (no start/end tokens)."""

    text: str
    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]

    def fill(self, word: str) -> str:
        return self.text.replace(SLOT, word)


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
    room = layout.max_length - 2 - len(prefix) - len(suffix)
    if room < word_tokens:
        raise TemplateError(
            f"templates: template {quoted(text)} is too long: its {len(prefix) + len(suffix)} tokens leave room "
            f"for {max(room, 0)} of the {word_tokens} token(s) a word needs in the encoder's {layout.max_length}; "
            "shorten it"
        )
    return Template(text, prefix, suffix)


@dataclass
class PromptBuilder:
    """Builds input embeddings of a template with the slot filled by embedding rows.

    Everything but the slot is looked up once: `head` holds start + prefix embeddings and
    `tail` holds suffix + end + padding, long enough for the shortest slot.
    """

    template: Template
    layout: TokenLayout
    token_embedding: torch.Tensor  # (V, D) the text encoder's token-embedding matrix

    def __post_init__(self) -> None:
        lay, tpl = self.layout, self.template
        head_ids = [lay.start, *tpl.prefix_ids]
        tail_ids = [*tpl.suffix_ids, lay.end]
        tail_ids += [lay.pad] * (lay.max_length - len(head_ids) - len(tail_ids) - 1)
        emb = self.token_embedding
        self.head = emb[torch.tensor(head_ids, device=emb.device)]  # (P, D)
        self.tail = emb[torch.tensor(tail_ids, device=emb.device)]  # (max_length - P - 1, D)
        self.slot_start = len(head_ids)

    def room(self) -> int:
        """How many slot tokens fit."""
        return self.layout.max_length - self.slot_start - len(self.template.suffix_ids) - 1

    def embed(self, slot_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings (max_length, D) and slot mask (max_length,) for k slot rows (k, D)."""
        k = slot_rows.shape[0]
        if k > self.room():
            raise TemplateError(f"templates: a word of {k} tokens does not fit into template {quoted(self.template.text)}")
        tail = self.tail[: self.layout.max_length - self.slot_start - k]
        seq = torch.cat([self.head.to(slot_rows.dtype), slot_rows, tail.to(slot_rows.dtype)])  # (T, D)
        mask = torch.zeros(self.layout.max_length, device=seq.device)
        mask[self.slot_start : self.slot_start + k] = 1.0
        return seq, mask

    def embed_ids(self, token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings and slot mask for a word given as BPE ids (exact, no gradient path)."""
        rows = self.token_embedding[torch.tensor(list(token_ids), device=self.token_embedding.device)]  # (k, D)
        return self.embed(rows)

    def token_ids(self, word_ids: Sequence[int]) -> list[int]:
        """The full id sequence a tokenizer would produce for the filled template (for tests)."""
        ids = [self.layout.start, *self.template.prefix_ids, *word_ids, *self.template.suffix_ids, self.layout.end]
        return ids + [self.layout.pad] * (self.layout.max_length - len(ids))
