"""One adapter per model family: the only place that knows a family's text encoders and how
their outputs become the model's conditioning. The host (nodes/host.py) does the rest the same
way for every family. A family is recognised by ComfyUI's model class, subclasses first.

Adding a family: a module here with an adapter (see base.FamilyAdapter), its entry in ADAPTERS
before any adapter of a parent class, tests in tests/nodes/ (conditioning equals ComfyUI's
encode_from_tokens, a planted edit found on top) and a line in README's family table.
"""
from __future__ import annotations

from .base import FamilyAdapter, UnsupportedFamily
from .flux import Chroma, Flux
from .qwen_image import QwenImage
from .sd import SD
from .sd3 import SD3
from .sdxl import SDXL
from .z_image import ZImage

ADAPTERS: tuple[FamilyAdapter, ...] = (SDXL(), Chroma(), Flux(), QwenImage(), ZImage(), SD3(), SD())  # subclasses before their parents
UNSUPPORTED = {  # ComfyUI model class -> what the README's family table says about it
    "ChromaRadiance": "Chroma Radiance", "LongCatImage": "LongCat-Image", "Flux2": "Flux.2",
    "Lumina2": "Lumina 2 (Gemma text encoder)", "WAN21": "Wan 2.x", "HiDream": "HiDream", "SDXLRefiner": "the SDXL refiner",
}


def supported_names() -> str:
    return ", ".join(a.name for a in ADAPTERS)


def adapter_for(model, input_name: str) -> FamilyAdapter:
    """The adapter of `model`'s family, or an UnsupportedFamily error naming the input, the
    family and the supported ones."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    cls = type(model.model).__name__
    config = type(model.model.model_config).__name__
    known = UNSUPPORTED.get(cls, f"'{cls}' ({config})")
    raise UnsupportedFamily(f"{input_name}: model family {known} is not supported yet. DriftScope audits "
                            f"{supported_names()} checkpoints; see the README's family table.")
