"""What a model family's adapter tells the host."""
from __future__ import annotations

from typing import Mapping

import torch


class UnsupportedFamily(ValueError):
    """A model or CLIP of a family (or a mix) the pack does not audit; the message names the input."""


class FamilyAdapter:
    """One model family. The host asks it four things: does a MODEL belong to it, which of a
    CLIP's text encoders the family reads (names the report keeps, and the attributes of
    `clip.cond_stage_model` and `clip.tokenizer` they sit under), how their outputs become the
    conditioning (context and extra tensors), and which keyword arguments of ComfyUI's
    `extra_conds` those tensors are."""

    name = "?"
    default_size = 512  # width and height of an audit when the node's width/height is 0 (auto)

    def matches(self, model) -> bool:
        raise NotImplementedError

    def encoders(self, clip, input_name: str) -> dict[str, str]:
        """Core name -> attribute; raises UnsupportedFamily (naming `input_name`) for a CLIP of
        another family."""
        raise NotImplementedError

    def combine(self, outputs: Mapping[str, tuple]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Context (B, T, D) and extras from each encoder's forward output (z (B, T, D_e),
        pooled (B, P) or None, ...), as the family's own encode_token_weights joins them."""
        raise NotImplementedError

    def model_kwargs(self, context: torch.Tensor, extras: Mapping[str, torch.Tensor]) -> dict:
        """Keyword arguments of ComfyUI's BaseModel.extra_conds for this conditioning."""
        return {"cross_attn": context}

    def vocabulary_tokenizer(self, clip):
        """The SDTokenizer whose BPE ids every encoder of the family reads (so candidate words and
        templates are tokenized once)."""
        raise NotImplementedError
