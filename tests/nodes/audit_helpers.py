"""Shared by the node-tier tests: the planted demo words and the Audit's entry point as ComfyUI's
executor runs it (tests/nodes/conftest.py puts this folder on sys.path)."""
import torch

import comfy.model_management

PLANTED = ("tiger", "bicycle", "castle")
WORDS = ["tiger", "bicycle", "castle", "apple", "river", "chair", "cloud", "horse", "lamp", "mountain", "bread",
         "guitar", "forest", "boat", "candle", "rabbit", "bridge", "flower", "clock", "shoe", "tower", "lemon",
         "train", "violin", "desert", "pencil", "snake", "window", "cookie", "rocket", "aquarium fish"]
TEMPLATE = "a photo of a {}"


def audit(pack, base, clip, adapted, adapted_clip=None, **kw):
    """The node's own entry point, inside inference mode as ComfyUI's executor runs it."""
    args = dict(vocabulary="custom", custom_words="\n".join(WORDS), templates=TEMPLATE, preset="quick", mode="scan",
                scheduler="normal", precision="auto", micro_batch=8, gradient_checkpointing=False, width=32,
                height=32, top_k=5, seed=0, direction="most", objective="attention")
    args.update(kw)
    with torch.inference_mode():
        return pack.nodes.audit.audit_models(base, clip, adapted, adapted_clip or clip, **args)


def fingerprint(model, clip):
    """Outputs that change if anything about the model or the CLIP changed."""
    with torch.inference_mode():
        cond = clip.encode_from_tokens(clip.tokenize("a photo of a tiger"))
        comfy.model_management.load_models_gpu([model])
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 4, 4, generator=g)
        out = model.model.apply_model(x, torch.tensor([2.0]), c_crossattn=cond)
    return cond.clone(), out.clone()


def assert_same(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a, b))
