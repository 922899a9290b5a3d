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


class QwenImage(FamilyAdapter):
    name = "Qwen-Image"
    attention = "joint"
    vocabulary_encoder = "qwen"
    clip_words = False
    word_prefix = " "  # byte-level BPE: a word after a space

    def matches(self, model) -> bool:
        cls = getattr(comfy.model_base, "QwenImage", None)
        return cls is not None and isinstance(model.model, cls)

    def encoders(self, clip, input_name: str) -> dict[str, str]:
        cond = clip.cond_stage_model
        if getattr(cond, "clip", None) != "qwen25_7b" or not hasattr(getattr(cond, "qwen25_7b", None), "transformer"):
            raise UnsupportedFamily(f"{input_name}: this CLIP ({type(cond).__name__}) is not Qwen-Image's Qwen2.5-VL text "
                                    "encoder; load it with CLIPLoader, type qwen_image.")
        return {"qwen": "qwen25_7b"}

    def tokenizer(self, clip, attr: str):
        return getattr(clip.tokenizer, clip.tokenizer.clip)

    def template_tokens(self, clip, encoder: str):
        """The chat template around the prompt, as ComfyUI's tokenizer reads the whole text: the
        system message and the user's header before it (dropped from the output, as
        QwenImageTEModel drops them), "\n<|im_start|>assistant\n" after its <|im_end|>."""
        hf = self.tokenizer(clip, "qwen25_7b").tokenizer
        before, after = clip.tokenizer.llama_template.split("{}")
        if not after.startswith(IM_END):
            raise UnsupportedFamily(f"Qwen-Image's chat template {after!r} does not end the prompt with {IM_END}")
        head = list(hf(before)["input_ids"])
        return head, list(hf(after[len(IM_END):])["input_ids"]), len(head)

    def layout_end(self, clip, encoder: str) -> int:
        return self.tokenizer(clip, "qwen25_7b").tokenizer.convert_tokens_to_ids(IM_END)

    def combine(self, outputs):
        return outputs["qwen"][0], {}  # (B, T, 3584): the user's text and the template's end

    def model_context_width(self, model) -> int | None:
        return model.model.model_config.unet_config.get("joint_attention_dim")

    def sampling_defaults(self, model) -> dict:
        return {"cfg": 2.5, "guidance": None}

    def model_kwargs(self, context, extras, guidance=None):
        return {"cross_attn": context}

    def vocabulary_tokenizer(self, clip):
        return self.tokenizer(clip, "qwen25_7b")
