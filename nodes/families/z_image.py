"""Z-Image (Turbo): Lumina 2's NextDiT with Z-Image's modulation, on the second-to-last hidden
layer of Qwen3-4B.

Text: ComfyUI's ZImageTokenizer puts the prompt into a chat template ("<|im_start|>user\\n"
prompt "<|im_end|>\\n<|im_start|>assistant\\n") and keeps all of it in the context, nothing
padded; so the slot sits after the template's head. Words are byte-level BPE as Qwen-Image's.

Attention: the transformer first refines caption and image tokens each on their own (refiner
layers), then runs its main layers over [caption | image], each part padded with learned pad
tokens to a multiple of 32 (`pad_tokens_multiple`). The slot map is read in the main layers:
the calls whose sequence is the padded caption plus the padded image, image queries from the
padded caption's end, the image's own tokens only. The refiner calls have other lengths.

Sampling: Z-Image Turbo is distilled for CFG 1 (8 steps); the base model takes real CFG, which
the node's cfg input sets. Lumina 2 itself (Gemma text encoder) loads as the same class and is
not audited yet.
"""
from __future__ import annotations

import math

import comfy.model_base

from .qwen_image import ChatTemplateFamily


class ZImage(ChatTemplateFamily):
    name = "Z-Image"
    encoder_attr = "qwen3_4b"
    loader_type = "lumina2"

    def matches(self, model) -> bool:
        cls = getattr(comfy.model_base, "Lumina2", None)
        config = model.model.model_config.unet_config
        return cls is not None and isinstance(model.model, cls) and bool(config.get("z_image_modulation"))

    def model_context_width(self, model) -> int | None:
        return model.model.model_config.unet_config.get("cap_feat_dim")

    def sampling_defaults(self, model) -> dict:
        return {"cfg": 1.0, "guidance": None}

    def joint_tokens(self, model, text_tokens, latent):
        config = model.model.model_config.unet_config
        pad = config.get("pad_tokens_multiple") or 1
        patch = config.get("patch_size", 2) or 1
        images = (latent.shape[-2] // patch) * (latent.shape[-1] // patch)
        text = math.ceil(text_tokens / pad) * pad
        return text, images, text + math.ceil(images / pad) * pad
