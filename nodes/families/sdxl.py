"""SDXL and its derivatives (Pony, Illustrious, NoobAI; SSD-1B and other distilled UNets load as
the same class): CLIP-L and CLIP-G read at layer -2, context = the two outputs side by side
(768 + 1280 = 2048 wide, same 77 token positions); the pooled vector is CLIP-G's projected EOS
output, which ComfyUI's SDXL.encode_adm joins with the six size embeddings into `y`."""
from __future__ import annotations

import torch

import comfy.model_base

from .base import FamilyAdapter, UnsupportedFamily


class SDXL(FamilyAdapter):
    name = "SDXL"
    # An SDXL audit at 512 px (64x64 latent, cross-attention at 32x32) costs a quarter of 1024 px;
    # see README ("SDXL's audit resolution") for the measurement behind it.
    default_size = 512
    # Screen and scan keep twice the preset's steps (standard: 8 of 50). On the benchmark's
    # planted SDXL case, the first 4 steps rank the 10th planted word ("airplane") behind two
    # ordinary words on every search seed, also with 16 re-scoring seeds. With 8 steps its
    # recall@10 is 0.97 instead of 0.87 on 160 candidates and 0.83 instead of 0.73 on 2,010,
    # at 1.9x and 1.5x the evaluations (benchmarks/README, "SDXL cases").
    kept_steps_factor = 2

    def matches(self, model) -> bool:
        m = model.model
        ip2p = getattr(comfy.model_base, "IP2P", ())
        return isinstance(m, comfy.model_base.SDXL) and not isinstance(m, ip2p)

    def encoders(self, clip, input_name: str) -> dict[str, str]:
        cond = clip.cond_stage_model
        if not all(hasattr(getattr(cond, a, None), "transformer") for a in ("clip_l", "clip_g")):
            raise UnsupportedFamily(f"{input_name}: this CLIP ({type(cond).__name__}) is not an SDXL text encoder "
                                    "(CLIP-L + CLIP-G); connect the CLIP of the same checkpoint as the model.")
        return {"l": "clip_l", "g": "clip_g"}

    def combine(self, outputs):
        z_l, z_g = outputs["l"][0], outputs["g"][0]
        cut = min(z_l.shape[1], z_g.shape[1])
        context = torch.cat([z_l[:, :cut], z_g[:, :cut]], dim=-1)  # (B, 77, 768 + 1280)
        return context, {"pooled": outputs["g"][1]}

    def model_kwargs(self, context, extras, guidance=None):
        return {"cross_attn": context, "pooled_output": extras["pooled"]}

    def vocabulary_tokenizer(self, clip):
        return clip.tokenizer.clip_l  # CLIP-G reads the same BPE ids (its padding differs)

