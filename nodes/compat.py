"""Everything that differs between the ComfyUI versions the pack supports (0.3.75 to 0.33.x),
in one place. Each difference is a feature check (`hasattr`, a dataclass field), never a version
string, so a release that back-ports or renames a feature keeps working.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from comfy_api.latest import io

import comfy.model_management


# -- node schema --------------------------------------------------------------------------------
_SCHEMA_FIELDS = {f.name for f in dataclasses.fields(io.Schema)}


def schema(**options) -> io.Schema:
    """io.Schema with the options this ComfyUI knows; newer ones (`search_aliases`,
    `has_intermediate_output`: in 0.33, not in 0.3.75) are left out where the Schema has no
    such field."""
    return io.Schema(**{k: v for k, v in options.items() if k in _SCHEMA_FIELDS})


def fixed_seed_control():
    """`control_after_generate` for a seed that stays fixed unless the user changes it, with its
    control widget kept (saved workflows store that widget's value among the others, by position):
    ComfyUI 0.33's ControlAfterGenerate.fixed; older ones only know True (a control that
    randomizes by default; a saved workflow's own value still wins)."""
    control = getattr(io, "ControlAfterGenerate", None)
    return control.fixed if control is not None else True


# -- patchers -----------------------------------------------------------------------------------
def is_dynamic(patcher) -> bool:
    """True for Dynamic VRAM's ModelPatcherDynamic (0.16+, NVIDIA); False before it existed."""
    return bool(getattr(patcher, "is_dynamic", lambda: False)())


def non_dynamic(patcher):
    """A clone that is a classic ModelPatcher (weights resident while loaded), for gradients
    through the weights: Dynamic VRAM streams weights in at each forward pass, a path the pack
    does not train through. ComfyUI's own delegate reloads the model from its file without
    Dynamic VRAM and keeps the patches (a LoRA); a model that was not loaded from a file has no
    such delegate, and its clone stays dynamic (the weight wrappers still run there).
    A classic patcher's clone is returned as it is."""
    if is_dynamic(patcher) and hasattr(patcher, "get_non_dynamic_delegate"):
        try:
            return patcher.get_non_dynamic_delegate()
        except RuntimeError:  # "cached_patcher_init is not initialized": built in memory
            pass
    return patcher.clone()


@contextlib.contextmanager
def differentiable_kernels(enabled: bool):
    """While `enabled`, ComfyUI's models use their plain-torch kernels: newer ComfyUI (0.33) runs
    Flux's rotary embedding through comfy_kitchen's custom op, which has no backward, unless
    `model_management.in_training` is set (its own training node sets it around a training
    step). Absent flag (0.3.75): nothing to do. The flag is restored afterwards."""
    mm = comfy.model_management
    if not enabled or not hasattr(mm, "in_training"):
        yield
        return
    before = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = before


class _AddWithoutOut(torch.overrides.TorchFunctionMode):
    """torch.add(a, b, out=buf) as torch.add(a, b) when a gradient is recorded through it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.add and kwargs.get("out") is not None and torch.is_grad_enabled() and any(
                torch.is_tensor(a) and a.requires_grad for a in args):
            kwargs = {k: v for k, v in kwargs.items() if k != "out"}
        return func(*args, **kwargs)


def differentiable_text_encoder():
    """Newer ComfyUI (0.33) ends each block of its LLM text encoders (Qwen, Llama) with
    `x = torch.add(residual, x, out=block_input)`, which autograd refuses; 0.3.75 adds without
    `out=`. While a gradient is recorded through the text encoder (paper mode), such an add
    returns a new tensor instead of writing into the block's input, which the block only
    returns; nothing else changes."""
    return _AddWithoutOut()


# -- text encoders ------------------------------------------------------------------------------
def clip_layer_index(layer_idx) -> int | None:
    """CLIP.layer_idx as one layer index: None (the encoder's default), an int, or (newer loaders
    and CLIPSetLastLayer on multi-encoder models) a list with one index per encoder, which must
    agree for the single-encoder families the pack supports."""
    if layer_idx is None or isinstance(layer_idx, int):
        return layer_idx
    values = {int(v) for v in layer_idx}
    if len(values) != 1:
        raise ValueError(f"CLIP.layer_idx {list(layer_idx)} gives different layers per text encoder")
    return values.pop()


# -- errors -------------------------------------------------------------------------------------
def is_out_of_memory(err: BaseException) -> bool:
    """ComfyUI's own test for an out-of-memory error where it has one (0.33 also counts CUDA
    accelerator errors that say so), else torch's out-of-memory error."""
    test = getattr(comfy.model_management, "is_oom", None)
    if test is not None:
        return bool(test(err))
    return isinstance(err, torch.OutOfMemoryError)
