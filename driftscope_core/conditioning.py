"""What the text side hands the denoiser, and how a prompt with an open slot reaches a text
encoder.

Method step 1 fills the template's slot; a model family may read the filled prompt with more
than one text encoder (SDXL: CLIP-L and CLIP-G) and condition on more than one tensor (SDXL:
the context and a pooled vector). The core never knows which family it runs: a prompt is one
`SlotPrompt` per text encoder, and the host's text side (`TextSide`) turns a batch of them into a
`Conditioning`, which says where the slot word sits in the model's own context.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

import torch

from .prompts import SlotPrompt, TokenLayout


Prompt = Mapping[str, SlotPrompt]  # text-encoder name -> its input


@dataclass
class Conditioning:
    """A batch of B prompts as the denoiser takes them: the context (B, T, D), extra per-prompt
    tensors by name (e.g. "pooled": (B, P)), and the slot word's positions in the context as a
    mask (B, T) (all zeros for a prompt without a slot; a family that puts the prompt into its
    context twice marks both places)."""

    context: torch.Tensor  # (B, T, D)
    slot_mask: torch.Tensor  # (B, T)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (B, ...)

    def __len__(self) -> int:
        return self.context.shape[0]

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Conditioning":
        return Conditioning(fn(self.context), fn(self.slot_mask), {k: fn(v) for k, v in self.extras.items()})

    def rows(self, sl: slice) -> "Conditioning":
        return self._map(lambda t: t[sl])

    def expand(self, n: int) -> "Conditioning":
        """A batch of one prompt, seen n times (no copy)."""
        return self._map(lambda t: t.expand(n, *t.shape[1:]))

    def repeat_interleave(self, n: int) -> "Conditioning":
        """Each prompt n times in a row (word-major, seed-minor)."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    def float(self) -> "Conditioning":
        return self._map(lambda t: t.float())

    def detached_leaf(self) -> "Conditioning":
        """A copy whose float tensors are fresh leaves that require grad (the slot mask not)."""
        def leaf(t):
            return t.detach().requires_grad_(True)
        return Conditioning(leaf(self.context), self.slot_mask, {k: leaf(v) for k, v in self.extras.items()})

    def differentiable(self) -> list[torch.Tensor]:
        """The tensors a gradient flows through: context, then extras in name order."""
        return [self.context, *(self.extras[k] for k in sorted(self.extras))]

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        first = parts[0]
        return Conditioning(
            torch.cat([p.context for p in parts]),
            torch.cat([p.slot_mask for p in parts]),
            {k: torch.cat([p.extras[k] for p in parts]) for k in first.extras},
        )


def needs_grad(prompts: Sequence[Prompt]) -> bool:
    """True when a gradient is recorded and some prompt's slot is rows that require grad (the
    soft prompt of method step 2)."""
    return torch.is_grad_enabled() and any(
        torch.is_tensor(p.slot) and p.slot.requires_grad for prompt in prompts for p in prompt.values())


ContextParts = Sequence[tuple[str, int]]  # (text-encoder name, first context row its tokens fill)


def slot_mask(prompts: Sequence[Prompt], parts: str | ContextParts, length: int, device=None) -> torch.Tensor:
    """Slot mask (B, length): where the slot word's tokens sit in the model's context. `parts`
    says which encoders' token positions the context rows are, from which row: SD1.x and SDXL
    ("l", 0) (SDXL's CLIP-G outputs sit beside CLIP-L's in width, same rows), Flux ("t5", 0)
    (CLIP-L gives only the pooled vector), SD3 ("l", 0) and ("t5", 77) (the slot twice). A
    single name means that encoder from row 0."""
    parts = [(parts, 0)] if isinstance(parts, str) else parts
    mask = torch.zeros(len(prompts), length, device=device)  # (B, T)
    for row, prompt in enumerate(prompts):
        for encoder, offset in parts:
            span = prompt[encoder].slot_positions
            mask[row, offset + span.start : offset + span.stop] = 1.0
    return mask


def shortest_layout(text: "TextSide") -> TokenLayout:
    """The layout of the text side's shortest encoder: a template that leaves room for a word
    there leaves room in every encoder."""
    return min(text.layouts.values(), key=lambda lay: lay.room)


class TextSide(Protocol):
    """One model side's text encoders as the core needs them (a host implements it with its own
    encoders; text_encoder.ClipText is the plain-torch one the core's tests use)."""

    layouts: Mapping[str, TokenLayout]  # text-encoder name -> its special tokens and length

    def token_embedding(self, encoder: str) -> torch.Tensor:
        """The encoder's token embeddings, float32, indexable by token ids (`rows[ids]` (..., D)):
        the soft prompt's candidate rows. A (V, D) tensor will do; a host may compute rows on
        lookup instead (an LLM's table is gigabytes)."""
        ...

    def encode(self, prompts: Sequence[Prompt]) -> Conditioning:
        """Conditioning of a batch of prompts, one model call per text encoder; differentiable in
        the slot rows when they require grad."""
        ...
