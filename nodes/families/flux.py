"""Flux.1 dev and schnell: a joint-attention transformer (MMDiT-style double-stream blocks, then
single-stream blocks) on T5-XXL's context, with CLIP-L giving only the pooled vector `y`.

Text: ComfyUI's FluxClipModel reads the prompt twice, CLIP-L (77 BPE tokens, pooled output) and
T5-XXL (SentencePiece pieces, no start token, end token 1, padded with 0 to at least 256
tokens). The context is T5's output, so the slot's positions are T5's pieces of the word
("tiger" is three: "▁", "t", "iger"); the CLIP-L tokens only reach the model through the
pooled vector.

Guidance as users sample it: dev is guidance-distilled (CFG 1, the distilled `guidance` value
3.5 of ComfyUI's FluxGuidance default), schnell runs at CFG 1 without guidance; both keep one
model evaluation per step.

Attention: the slot map is read in the double-stream blocks, where the text tokens keep their
own key/value projections (the single-stream blocks project text and image with one layer).
"""
from __future__ import annotations

import comfy.model_base

from .base import FamilyAdapter, UnsupportedFamily


class Flux(FamilyAdapter):
    name = "Flux.1"
    attention = "joint"
    default_size = 512  # as SDXL: a quarter of the native 1024 px (README, family table)
    vocabulary_encoder = "l"
    own_tokenizers = ("t5",)  # encoders whose ids differ from the vocabulary tokenizer's

    def matches(self, model) -> bool:
        m = model.model
        subclasses = tuple(getattr(comfy.model_base, n) for n in ("Chroma", "Flux2", "LongCatImage")
                           if hasattr(comfy.model_base, n))
        return isinstance(m, comfy.model_base.Flux) and not isinstance(m, subclasses)

    def variant(self, model) -> str:
        """"dev" (guidance-distilled) or "schnell" (no guidance input), from the model's config."""
        return "dev" if model.model.model_config.unet_config.get("guidance_embed", False) else "schnell"

    def encoders(self, clip, input_name: str) -> dict[str, str]:
        cond = clip.cond_stage_model
        if not all(hasattr(getattr(cond, a, None), "transformer") for a in ("clip_l", "t5xxl")):
            raise UnsupportedFamily(f"{input_name}: this CLIP ({type(cond).__name__}) is not Flux's text encoder pair "
                                    "(CLIP-L + T5-XXL); load it with DualCLIPLoader, type flux.")
        return {"l": "clip_l", "t5": "t5xxl"}

    def context_parts(self, encoders):
        return (("t5", 0),)

    def context_encoders(self, encoders):
        return ["t5"]

    def model_context_width(self, model) -> int | None:
        return model.model.model_config.unet_config.get("context_in_dim")

    def combine(self, outputs):
        return outputs["t5"][0], {"pooled": outputs["l"][1]}  # context (B, 256, 4096), pooled (B, 768)

    def sampling_defaults(self, model) -> dict:
        return {"cfg": 1.0, "guidance": 3.5 if self.variant(model) == "dev" else None}

    def model_kwargs(self, context, extras, guidance=None):
        kwargs = {"cross_attn": context, "pooled_output": extras["pooled"]}
        if guidance is not None:  # else extra_conds' own default (the model ignores it: schnell)
            kwargs["guidance"] = guidance
        return kwargs

    def records(self, transformer_options) -> bool:
        return transformer_options.get("block_type") == "double"

    def vocabulary_tokenizer(self, clip):
        return clip.tokenizer.clip_l


class Chroma(Flux):
    """Chroma: Flux's blocks with the modulations from a small approximator network, on T5-XXL
    alone (no CLIP, no pooled vector); ComfyUI pads nothing, so every prompt's context is as
    long as its T5 tokens (the core then batches words of one length together and runs the
    negative, the bare end token, as its own model call). Sampled with real CFG and guidance 0
    (extra_conds' default): CFG 4 by default here."""

    name = "Chroma"
    vocabulary_encoder = "t5"
    own_tokenizers = ()
    clip_words = False

    def matches(self, model) -> bool:
        radiance = getattr(comfy.model_base, "ChromaRadiance", ())
        chroma = getattr(comfy.model_base, "Chroma", None)
        return chroma is not None and isinstance(model.model, chroma) and not isinstance(model.model, radiance)

    def encoders(self, clip, input_name: str) -> dict[str, str]:
        cond = clip.cond_stage_model
        if getattr(cond, "clip", None) != "t5xxl" or not hasattr(getattr(cond, "t5xxl", None), "transformer"):
            raise UnsupportedFamily(f"{input_name}: this CLIP ({type(cond).__name__}) is not Chroma's T5-XXL text "
                                    "encoder; load it with CLIPLoader, type chroma.")
        return {"t5": "t5xxl"}

    def tokenizer(self, clip, attr: str):
        return getattr(clip.tokenizer, clip.tokenizer.clip)  # SD1Tokenizer names it clip_t5xxl

    def combine(self, outputs):
        return outputs["t5"][0], {}  # context (B, T, 4096), T = the prompt's T5 tokens

    def sampling_defaults(self, model) -> dict:
        return {"cfg": 4.0, "guidance": None}

    def model_kwargs(self, context, extras, guidance=None):
        kwargs = {"cross_attn": context, "pooled_output": None}  # as CLIP's conditioning carries it (0.3.75 reads it)
        if guidance is not None:
            kwargs["guidance"] = guidance
        return kwargs

    def vocabulary_tokenizer(self, clip):
        return self.tokenizer(clip, "t5xxl")
