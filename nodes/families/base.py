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
    attention = "cross"  # "cross": attn2 layers of a UNet; "joint": one softmax over [text | image] tokens
    vocabulary_encoder: str | None = None  # encoder whose tokenizer builds the word list (None: the first)
    own_tokenizers: tuple[str, ...] = ()  # encoders whose token ids differ from the vocabulary tokenizer's
    clip_words = True  # whether the vocabulary tokenizer is CLIP's BPE (the clip_words list)
    kept_steps_factor = 1  # screen and scan keep this many times the preset's denoising steps

    def matches(self, model) -> bool:
        raise NotImplementedError

    def tokenizer(self, clip, attr: str):
        """The SDTokenizer of the encoder at `attr` (the same attribute name as its model's)."""
        return getattr(clip.tokenizer, attr)

    word_prefix = ""  # text before a candidate word when it is tokenized (" " for byte-level BPE)

    def template_tokens(self, clip, encoder: str) -> tuple[list[int], list[int], int]:
        """Token ids the host puts around every prompt of `encoder` (a chat template), and how
        many leading output rows the family's encoder drops; none by default."""
        return [], [], 0

    def layout_end(self, clip, encoder: str) -> int | None:
        """The token that ends a prompt, where the tokenizer adds none itself (a chat template's)."""
        return None

    def context_parts(self, encoders) -> tuple[tuple[str, int], ...]:
        """Which encoders' token positions the context rows are, from which row
        (conditioning.slot_mask); by default the first encoder's, from row 0."""
        return ((next(iter(encoders)), 0),)

    def context_encoders(self, encoders) -> list[str]:
        """The encoders whose widths add up to the context's width."""
        return list(encoders)

    def clip_context_width(self, clip, encoders) -> int:
        """The context's width from this CLIP: its context encoders' widths side by side."""
        cond = clip.cond_stage_model
        return sum(getattr(cond, encoders[e]).transformer.get_input_embeddings().weight.shape[1]
                   for e in self.context_encoders(encoders))

    def model_context_width(self, model) -> int | None:
        return model.model.model_config.unet_config.get("context_dim")

    def sampling_defaults(self, model) -> dict:
        """The CFG scale and distilled guidance the family is sampled with (None: the preset's CFG,
        no guidance input)."""
        return {"cfg": None, "guidance": None}

    def joint_tokens(self, model, text_tokens: int, latent: torch.Tensor) -> tuple[int, int, int]:
        """Joint attention's layout for a context of `text_tokens` and latents (B, C, [T,] h, w):
        (first image query row, image tokens, sequence length) — by default [text | image
        patches] with nothing padded."""
        patch = model.model.model_config.unet_config.get("patch_size", 2) or 1
        images = (latent.shape[-2] // patch) * (latent.shape[-1] // patch)
        return text_tokens, images, text_tokens + images

    def records(self, transformer_options) -> bool:
        """Joint attention: whether the slot map is read in the block these options describe."""
        return True

    def encoders(self, clip, input_name: str) -> dict[str, str]:
        """Core name -> attribute; raises UnsupportedFamily (naming `input_name`) for a CLIP of
        another family."""
        raise NotImplementedError

    def combine(self, outputs: Mapping[str, tuple]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Context (B, T, D) and extras from each encoder's forward output (z (B, T, D_e),
        pooled (B, P) or None, ...), as the family's own encode_token_weights joins them."""
        raise NotImplementedError

    def model_kwargs(self, context: torch.Tensor, extras: Mapping[str, torch.Tensor], guidance=None) -> dict:
        """Keyword arguments of ComfyUI's BaseModel.extra_conds for this conditioning."""
        return {"cross_attn": context}

    def vocabulary_tokenizer(self, clip):
        """The SDTokenizer that builds the word list; every encoder not in `own_tokenizers` reads
        its ids."""
        raise NotImplementedError
