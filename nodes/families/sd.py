"""SD1.x and SD2.x: one CLIP text encoder (CLIP-L, or OpenCLIP-H for SD2.x), context = its output."""
from __future__ import annotations

import comfy.model_base

from .base import FamilyAdapter, UnsupportedFamily


class SD(FamilyAdapter):
    name = "SD1.x/SD2.x"
    default_size = 512  # the paper's resolution for SD1.x

    def matches(self, model) -> bool:
        # SD1.x and SD2.x load as BaseModel itself; every other family is a subclass of it
        return type(model.model) is comfy.model_base.BaseModel

    def encoders(self, clip, input_name: str) -> dict[str, str]:
        cond = clip.cond_stage_model
        attr = getattr(cond, "clip", None)
        if not isinstance(attr, str) or not hasattr(getattr(cond, attr, None), "transformer"):
            raise UnsupportedFamily(f"{input_name}: this CLIP ({type(cond).__name__}) is not an SD1.x/SD2.x text "
                                    "encoder; connect the CLIP of the same checkpoint as the model.")
        return {getattr(cond, "clip_name", attr): attr}

    def combine(self, outputs):
        (z, *_), = outputs.values()
        return z, {}

    def vocabulary_tokenizer(self, clip):
        tok = clip.tokenizer
        return getattr(tok, tok.clip)
