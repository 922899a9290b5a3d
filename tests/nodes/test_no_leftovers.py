"""Nothing of an audit survives on the input models or in ComfyUI's state (issue 12, memory).

After an audit in screen and in paper mode (the one that builds gradients through a clone with
weight wrappers) the input MODEL and CLIP patchers hold the same model options, attention
patches, weight wrappers, object patches, hooks and weight patches as before; their torch
modules gained no forward/backward hooks, no parameter starts requiring grad or (test below)
collects a .grad, no tensor
of an autograd graph is left alive, and the models ComfyUI keeps loaded carry none of the pack's
wrappers or attention replacements. Paper mode's identity weight wrappers stay attached to the
shared torch modules after the run until ComfyUI loads a model again (which wipes them); the
strict test of that is an expected failure until the pack removes them itself (see its reason).
"""
import gc
import warnings

import pytest
import torch

import comfy.model_management

from audit_helpers import PLANTED, TEMPLATE, WORDS, assert_same, audit, fingerprint

MODES = ["screen", "paper"]


@pytest.fixture(scope="module")
def models(demo_models):
    model, clip, _ = demo_models.tiny_sd15(0)
    adapted = demo_models.planted_edit_in_process(model, clip, PLANTED, WORDS, TEMPLATE)
    return model, clip, adapted


def patcher_state(patcher) -> dict:
    """What a run could leave on a ModelPatcher: options (attention patches inside
    transformer_options/patches_replace), wrappers, object patches, hooks, weight patches."""
    return {
        "model_options": repr(patcher.model_options),
        "weight_wrapper_patches": repr(patcher.weight_wrapper_patches),
        "object_patches": sorted(patcher.object_patches),
        "patches": sorted((k, len(v)) for k, v in patcher.patches.items()),
        "patches_uuid": patcher.patches_uuid,
        "hook_patches": repr(getattr(patcher, "hook_patches", None)),
        "wrappers": repr(getattr(patcher, "wrappers", None)),
        "callbacks": repr(getattr(patcher, "callbacks", None)),
    }


def hooks(module: torch.nn.Module) -> int:
    """Forward and backward hooks on every torch module."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in module.modules())


def requiring_grad(module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def weight_functions(module: torch.nn.Module) -> int:
    """Modules whose weight or bias goes through a function at forward time."""
    return sum(1 for m in module.modules() if getattr(m, "weight_function", None) or getattr(m, "bias_function", None))


def graph_tensors() -> int:
    """Live tensors that are part of an autograd graph (or would start one)."""
    gc.collect()
    with warnings.catch_warnings():  # touching torch.distributed's deprecated objects warns
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for o in gc.get_objects()
                   if isinstance(o, torch.Tensor) and (o.requires_grad or o.grad_fn is not None))


def everything(model, clip, adapted) -> dict:
    """The state of both models, measured with the base loaded (a loaded patcher swaps its
    patched weights into the torch modules the two models share)."""
    comfy.model_management.load_models_gpu([model])
    return {"base": patcher_state(model), "adapted": patcher_state(adapted), "clip": patcher_state(clip.patcher),
            "hooks": (hooks(model.model), hooks(clip.cond_stage_model)),
            "grad_enabled": torch.is_grad_enabled(), "inference_mode": torch.is_inference_mode_enabled()}


def pack_leftovers_in_loaded_models(pack) -> list[str]:
    """The pack's identity weight wrapper or its attention replacements on any loaded model."""
    same = pack.nodes.host._same
    found = []
    for loaded in comfy.model_management.current_loaded_models:
        patcher = loaded.model
        if patcher is None:
            continue
        wrappers = [f for fs in getattr(patcher, "weight_wrapper_patches", {}).values() for f in fs]
        if any(f is same for f in wrappers):
            found.append(f"{type(patcher).__name__} with DriftScope's weight wrappers")
        replace = patcher.model_options.get("transformer_options", {}).get("patches_replace", {})
        if any("DriftScope" in getattr(f, "__module__", "") for fs in replace.values() for f in fs.values()):
            found.append(f"{type(patcher).__name__} with DriftScope's attention replacement")
    return found


@pytest.mark.parametrize("mode", MODES)
def test_an_audit_leaves_nothing_on_the_models_or_in_comfyui(pack, models, mode):
    model, clip, adapted = models
    before, tensors_before = everything(model, clip, adapted), graph_tensors()
    grad_before = requiring_grad(model.model) | requiring_grad(clip.cond_stage_model)
    outputs_before = fingerprint(model, clip), fingerprint(adapted, clip)

    report = audit(pack, model, clip, adapted, mode=mode, top_k=2, opt_steps=3)
    assert report.entries

    assert everything(model, clip, adapted) == before
    # no weight starts requiring grad (ComfyUI itself may give a restored weight requires_grad
    # False; whether a weight that requires grad collects a .grad is the test further down)
    assert requiring_grad(model.model) | requiring_grad(clip.cond_stage_model) <= grad_before
    del report
    assert graph_tensors() <= tensors_before, "tensors of an autograd graph survived the audit"
    assert pack_leftovers_in_loaded_models(pack) == []
    # what any sampler does next: load the input model through ComfyUI, then run it
    for patcher in (model, adapted):
        comfy.model_management.load_models_gpu([patcher])
        assert weight_functions(patcher.model) == 0, "a weight wrapper is active on the next load"
    assert_same(outputs_before[0], fingerprint(model, clip))
    assert_same(outputs_before[1], fingerprint(adapted, clip))


@pytest.mark.parametrize("mode", ["screen", "paper"])
def test_no_gradient_lands_on_input_weights_that_require_grad(pack, demo_models, mode):
    model, clip, _ = demo_models.tiny_sd15(1)
    adapted = demo_models.planted_edit_in_process(model, clip, PLANTED, WORDS, TEMPLATE)
    with torch.inference_mode(False):
        for p in model.model.parameters():
            p.requires_grad_(True)
    audit(pack, model, clip, adapted, mode=mode, top_k=1, opt_steps=2)
    with_grad = [n for n, p in model.model.named_parameters() if p.grad is not None]
    assert with_grad == [], f"{len(with_grad)} input weights hold a .grad, e.g. {with_grad[:2]}"


@pytest.mark.parametrize("mode", ["screen", "paper"])
def test_no_weight_wrapper_stays_on_the_input_models_torch_modules(pack, models, mode):
    model, clip, adapted = models
    comfy.model_management.load_models_gpu([model])
    assert weight_functions(model.model) == 0
    audit(pack, model, clip, adapted, mode=mode, top_k=1, opt_steps=2)
    assert weight_functions(model.model) == 0, "modules of the input models still wrap their weights"
