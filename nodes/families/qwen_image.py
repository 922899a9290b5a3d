"""Qwen-Image: a joint-attention transformer (text and image streams, one softmax over
[text | image]) on the last hidden layer of Qwen2.5-VL-7B.

Text: ComfyUI's QwenImageTokenizer puts the prompt into a chat template (a system message,
then "<|im_start|>user\\n" prompt "<|im_end|>\\n<|im_start|>assistant\\n") and tokenizes it as a
whole with Qwen's byte-level BPE; QwenImageTEModel drops every token before the user's text
from the output. So the context is the prompt's own tokens and the template's last five, with
nothing padded (every prompt its own length, as Chroma's), and the slot sits at the positions
it has in the prompt. Byte-level BPE reads a space as part of the next token: a word after a
space is " word" (one token, "Ġtiger"), and the same word at the start of the text or glued to
punctuation is other tokens; candidates are encoded as " word", so a template must put the
slot after a space.

Sampling: real CFG (2.5, ComfyUI's example workflow), latents of one video frame
(B, 16, 1, h, w) that the host makes from the core's (B, 16, h, w).
"""
from __future__ import annotations

import comfy.model_base

from .base import FamilyAdapter, UnsupportedFamily

IM_END = "<|im_end|>"


class ChatTemplateFamily(FamilyAdapter):
    """A family whose one text encoder is a Qwen LLM that ComfyUI feeds a chat template: the
    template's ids around every prompt, its <|im_end|> as the prompt's end token, byte-level BPE
    words read after a space. `drops_head`: the encoder's output starts at the user's text."""

    attention = "joint"
    vocabulary_encoder = "qwen"
    clip_words = False
    word_prefix = " "  # byte-level BPE: a word after a space
    encoder_attr = "?"  # the SD1ClipModel / SD1Tokenizer name of the LLM
    loader_type = "?"  # CLIPLoader's type for this family, for the error message
    drops_head = False

    def encoders(self, clip, input_name: str) -> dict[str, str]:
        cond = clip.cond_stage_model
        attr = self.encoder_attr
        if getattr(cond, "clip", None) != attr or not hasattr(getattr(cond, attr, None), "transformer"):
            raise UnsupportedFamily(f"{input_name}: this CLIP ({type(cond).__name__}) is not {self.name}'s text encoder; "
                                    f"load it with CLIPLoader, type {self.loader_type}.")
        return {"qwen": attr}

    def tokenizer(self, clip, attr: str):
        return getattr(clip.tokenizer, clip.tokenizer.clip)

    def template_tokens(self, clip, encoder: str):
        """The chat template around the prompt as ComfyUI's tokenizer reads the whole text: the
        ids before the prompt (for Qwen-Image the system message too, dropped from the output
        as its text encoder drops it) and after the prompt's <|im_end|>."""
        hf = self.tokenizer(clip, self.encoder_attr).tokenizer
        before, after = clip.tokenizer.llama_template.split("{}")
        if not after.startswith(IM_END):
            raise UnsupportedFamily(f"{self.name}'s chat template {after!r} does not end the prompt with {IM_END}")
        head = list(hf(before)["input_ids"])
        return head, list(hf(after[len(IM_END):])["input_ids"]), len(head) if self.drops_head else 0

    def layout_end(self, clip, encoder: str) -> int:
        return self.tokenizer(clip, self.encoder_attr).tokenizer.convert_tokens_to_ids(IM_END)

    def combine(self, outputs):
        return outputs["qwen"][0], {}  # (B, T, D); an all-ones attention mask is left out, as extra_conds leaves it

    def model_kwargs(self, context, extras, guidance=None):
        return {"cross_attn": context}

    def vocabulary_tokenizer(self, clip):
        return self.tokenizer(clip, self.encoder_attr)


class QwenImage(ChatTemplateFamily):
    name = "Qwen-Image"
    encoder_attr = "qwen25_7b"
    loader_type = "qwen_image"
    drops_head = True  # QwenImageTEModel keeps the output from the user's text on

    def matches(self, model) -> bool:
        cls = getattr(comfy.model_base, "QwenImage", None)
        return cls is not None and isinstance(model.model, cls)

    def model_context_width(self, model) -> int | None:
        return model.model.model_config.unet_config.get("joint_attention_dim")

    def sampling_defaults(self, model) -> dict:
        return {"cfg": 2.5, "guidance": None}
