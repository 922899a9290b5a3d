"""SD3 and SD3.5 (Medium, Large, Large Turbo): MMDiT joint attention on a context that holds the
prompt twice.

Text: ComfyUI's SD3ClipModel reads the prompt with CLIP-L and CLIP-G (both at layer -2, 77
tokens, side by side in width and zero-padded to 4096) and with T5-XXL (77 tokens, 4096 wide),
and stacks the two along the sequence: context rows 0-76 are the CLIP part, 77-153 the T5 part,
so the slot word sits in the context twice (its CLIP token(s) and its T5 pieces) and the map is
read over both. The pooled vector `y` is CLIP-L's (unprojected) and CLIP-G's pooled outputs side
by side. Any of the three encoders may be missing (TripleCLIPLoader without T5, or CLIP-G
alone); ComfyUI then fills zeros, and so does this adapter.

Attention: every joint block's one softmax over [context | image], received as (B, L, H*D);
SD3.5 Medium's extra image-only attention has another length and is left out.
"""
from __future__ import annotations

import torch

import comfy.model_base

from .base import FamilyAdapter, UnsupportedFamily

CLIP_TOKENS = 77  # the CLIP part's rows
CONTEXT_WIDTH = 4096
POOLED_WIDTHS = {"l": 768, "g": 1280}  # zeros for a missing encoder, as ComfyUI fills them


class SD3(FamilyAdapter):
    name = "SD3.5"
    attention = "joint"
    vocabulary_encoder = "l"
    own_tokenizers = ("t5",)

    def matches(self, model) -> bool:
        cls = getattr(comfy.model_base, "SD3", None)
        return cls is not None and isinstance(model.model, cls)

    def encoders(self, clip, input_name: str) -> dict[str, str]:
        cond = clip.cond_stage_model
        attrs = {"l": "clip_l", "g": "clip_g", "t5": "t5xxl"}
        if not all(hasattr(cond, a) for a in attrs.values()) or not hasattr(clip.tokenizer, "clip_l"):
            raise UnsupportedFamily(f"{input_name}: this CLIP ({type(cond).__name__}) is not SD3's text encoders "
                                    "(CLIP-L, CLIP-G, T5-XXL); load them with TripleCLIPLoader or the checkpoint's CLIP.")
        present = {name: attr for name, attr in attrs.items() if getattr(cond, attr) is not None}
        if not {"l", "g"} & set(present):
            raise UnsupportedFamily(f"{input_name}: this SD3 text encoder has no CLIP-L or CLIP-G; DriftScope builds its "
                                    "word list with CLIP's tokenizer, so load at least one of them.")
        return present

    def context_parts(self, encoders):
        clip_part = [("l" if "l" in encoders else "g", 0)]
        return tuple(clip_part + ([("t5", CLIP_TOKENS)] if "t5" in encoders else []))

    def clip_context_width(self, clip, encoders) -> int:
        return CONTEXT_WIDTH  # ComfyUI pads the CLIP part to T5's width

    def model_context_width(self, model) -> int | None:
        embedder = model.model.model_config.unet_config.get("context_embedder_config") or {}
        return (embedder.get("params") or {}).get("in_features")

    def combine(self, outputs):
        """As SD3ClipModel.encode_token_weights: CLIP-L ⊕ CLIP-G (cut to one length), padded to
        4096 wide, then T5's rows below; pooled = L's ⊕ G's."""
        some = next(iter(outputs.values()))[0]
        batch, device = some.shape[0], some.device
        pooled, parts = [], []
        for name in ("l", "g"):
            if name in outputs:
                z, p = outputs[name][0], outputs[name][1]
                parts.append(z)
                pooled.append(p.float())
            else:
                parts.append(None)
                pooled.append(torch.zeros(batch, POOLED_WIDTHS[name], device=device))
        z_l, z_g = parts
        if z_l is not None and z_g is not None:
            cut = min(z_l.shape[1], z_g.shape[1])
            lg = torch.cat([z_l[:, :cut], z_g[:, :cut]], dim=-1)  # (B, 77, 768 + 1280)
        elif z_l is not None:
            lg = z_l
        else:
            lg = torch.nn.functional.pad(z_g, (POOLED_WIDTHS["l"], 0))
        lg = torch.nn.functional.pad(lg, (0, CONTEXT_WIDTH - lg.shape[-1]))  # (B, 77, 4096)
        context = torch.cat([lg, outputs["t5"][0]], dim=-2) if "t5" in outputs else lg  # (B, 154, 4096)
        return context, {"pooled": torch.cat(pooled, dim=-1)}

    def sampling_defaults(self, model) -> dict:
        return {"cfg": 4.5, "guidance": None}

    def model_kwargs(self, context, extras, guidance=None):
        return {"cross_attn": context, "pooled_output": extras["pooled"]}

    def vocabulary_tokenizer(self, clip):
        return clip.tokenizer.clip_l
