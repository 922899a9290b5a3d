"""What changed in ComfyUI between 0.3.75 and 0.33 (shared/notes/comfyui-current.md), each
checked on the ComfyUI this run uses: nodes/compat.py is the one place that knows.

Dynamic VRAM's ModelPatcherDynamic is what a current NVIDIA install gives every model; on a
CPU ComfyUI reroutes its construction to the legacy ModelPatcher (`__new__` checks the load
device). The tests build the real class on the CPU anyway, through a subclass that skips only
that reroute, after loading comfy-aimdo's host library (which loads without a GPU); everything
else, loading included, is ComfyUI's own dynamic code.
"""
import importlib

import pytest
import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd

host = pytest.importorskip("DriftScope.nodes.host")
compat = pytest.importorskip("DriftScope.nodes.compat")
families = pytest.importorskip("DriftScope.nodes.families")
prompts = pytest.importorskip("DriftScope.driftscope_core.prompts")

HAS_DYNAMIC = hasattr(comfy.model_patcher, "ModelPatcherDynamic")
PROMPTS = ["a photo of a tiger", "a photo of a bicycle on a bridge"]


@pytest.fixture(scope="module")
def dynamic_patcher_class():
    """ModelPatcherDynamic, constructible with a CPU load device."""
    if not HAS_DYNAMIC:
        pytest.skip("this ComfyUI has no Dynamic VRAM (no ModelPatcherDynamic; 0.33 has it)")
    import comfy_aimdo.control
    import comfy_aimdo.host_buffer

    if not comfy_aimdo.control.init():
        pytest.fail("comfy-aimdo's host library did not load")
    importlib.reload(comfy_aimdo.host_buffer)  # binds its functions to the library just loaded

    class DynamicOnCPU(comfy.model_patcher.ModelPatcherDynamic):
        def __new__(cls, *args, **kwargs):
            return object.__new__(cls)

    yield DynamicOnCPU
    _forget_dynamic_models()


def _forget_dynamic_models():
    """Drop CPU-dynamic patchers from ComfyUI's loaded-model list: unloading one asserts (a CPU
    load device is not a dynamic configuration ComfyUI unloads), and later tests unload all."""
    mm.current_loaded_models[:] = [m for m in mm.current_loaded_models if not compat.is_dynamic(m.model)]


def _clip_lora(clip, strength=1.0):
    """A clone of `clip` with a LoRA-like patch on every text-encoder weight matrix."""
    patched = clip.clone()
    g = torch.Generator().manual_seed(1)
    patches = {}
    for key, w in clip.cond_stage_model.state_dict().items():
        if key.endswith(("q_proj.weight", "v_proj.weight", "fc1.weight")):
            patches[key] = ("diff", (0.05 * torch.randn(w.shape, generator=g),))
    assert len(patched.add_patches(patches, strength)) == len(patches)
    return patched


def _dynamic_clip(demo_models, patcher_class):
    """A tiny SD1.x CLIP whose patcher is a ModelPatcherDynamic from the start, loaded from a
    state dict as the stock loaders do on an NVIDIA GPU with ComfyUI 0.16+ (comfy.sd.CLIP
    builds its patcher from CoreModelPatcher)."""
    import comfy.sd1_clip
    import comfy.supported_models_base

    _, legacy, _ = demo_models.tiny_sd15(seed=3)
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    options = {"dtype": torch.float32, "clip_l_model_config": dict(demo_models.TINY_CLIP_L_CONFIG)}
    saved = comfy.model_patcher.CoreModelPatcher
    comfy.model_patcher.CoreModelPatcher = patcher_class
    try:
        clip = comfy.sd.CLIP(target, state_dict=legacy.get_sd(), model_options=options)
    finally:
        comfy.model_patcher.CoreModelPatcher = saved
    assert clip.patcher.is_dynamic()
    return clip


def _host_encode(clip, text, input_name="adapted_clip"):
    """The pack's text side for `text`: ComfyUI's own encoder called as the audit calls it."""
    family = families.SD()
    side = host.ComfyText(clip, family, input_name)
    tokenize, _, _ = host.tokenizer_functions(clip, family)
    (name, layout), = side.layouts.items()
    tail = (layout.end,) + (layout.pad,) * (layout.max_length - 2 - len(tokenize(text)))
    prompt = prompts.SlotPrompt((layout.start,), tuple(tokenize(text)), tail)
    with torch.no_grad():
        return side.encode([{name: prompt}]).context[0]  # (T, D)


def _comfy_encode(clip, text):
    return clip.encode_from_tokens(clip.tokenize(text))[0].float()  # (T, D)


def test_dynamic_patcher_refuses_the_old_forced_load(demo_models, dynamic_patcher_class):
    """The break itself: a forced patched full load asserts in ModelPatcherDynamic, which is
    what the pack did before (and ComfyUI's own CLIPSave until 0.22)."""
    clip = _clip_lora(_dynamic_clip(demo_models, dynamic_patcher_class))
    try:
        with pytest.raises(AssertionError):
            mm.load_models_gpu([clip.patcher], force_patch_weights=True, force_full_load=True)
    finally:
        _forget_dynamic_models()


@pytest.mark.parametrize("patcher", ["legacy", "dynamic"])
def test_text_side_is_comfyuis_encode_with_the_lora(demo_models, request, patcher):
    """The pack's text side is ComfyUI's own encode of the same prompt, LoRA included, under the
    legacy patcher and under Dynamic VRAM's, and leaves the stored weights as they were.

    Under the legacy patcher the LoRA's effect is checked against an independent reference (a
    second copy of the same weights with the same patches). Under the dynamic one the reference
    is ComfyUI's encode_from_tokens of the very same CLIP: on a CPU the dynamic patcher applies no
    patches in the forward pass (ComfyUI itself reroutes text encoders off it on a CPU), so the
    LoRA's effect there can only be seen on an NVIDIA GPU (benchmarks/gpu_check.py)."""
    _, reference, _ = demo_models.tiny_sd15(seed=3)
    if patcher == "dynamic":
        clip = _dynamic_clip(demo_models, request.getfixturevalue("dynamic_patcher_class"))
    else:
        _, clip, _ = demo_models.tiny_sd15(seed=3)
    adapted, reference_adapted = _clip_lora(clip), _clip_lora(reference)
    before = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}
    for text in PROMPTS:
        ours = _host_encode(adapted, text)
        assert torch.equal(ours, _comfy_encode(adapted, text))
        if patcher == "legacy":
            theirs, plain = _comfy_encode(reference_adapted, text), _comfy_encode(reference, text)
            assert (theirs - plain).abs().max() > 1e-2, "the LoRA must change the encoding"
            assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (ours - theirs).abs().max()
    assert torch.allclose(_host_encode(clip, PROMPTS[0]), _comfy_encode(reference, PROMPTS[0]), atol=1e-4, rtol=1e-4)
    _forget_dynamic_models()
    mm.unload_all_models()
    after = clip.cond_stage_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the stored weights changed"


@pytest.mark.parametrize("layer_idx", [-2, [-2]])
def test_clip_layer_idx_as_int_or_list(demo_models, layer_idx):
    """CLIPSetLastLayer gives an int; newer loaders may give a list of one index per encoder."""
    _, clip, _ = demo_models.tiny_sd15(seed=3)
    two_layers = clip.clone()
    two_layers.clip_layer(-2)  # the reference: ComfyUI's own encode at the penultimate layer
    clip = clip.clone()
    clip.layer_idx = layer_idx
    ours = _host_encode(clip, PROMPTS[0])
    assert torch.allclose(ours, _comfy_encode(two_layers, PROMPTS[0]), atol=1e-4, rtol=1e-4)


def test_clip_layer_idx_list_with_different_layers_is_a_clear_error(demo_models):
    _, clip, _ = demo_models.tiny_sd15(seed=3)
    clip = clip.clone()
    clip.layer_idx = [-1, -2]
    with pytest.raises(host.InputError, match="base_clip.*CLIP Set Last Layer"):
        _host_encode(clip, PROMPTS[0], "base_clip")


def test_schema_keeps_only_options_this_comfyui_knows():
    from comfy_api.latest import io

    s = compat.schema(node_id="DriftScopeProbe", display_name="x", category="x", inputs=[], outputs=[],
                      search_aliases=["probe"], has_intermediate_output=True, not_an_option=1)
    assert s.node_id == "DriftScopeProbe"
    for name in ("search_aliases", "has_intermediate_output"):
        assert hasattr(s, name) == hasattr(io.Schema(node_id="y"), name)


def test_gradient_clone_of_a_dynamic_model_is_classic_and_keeps_the_lora(demo_models, dynamic_patcher_class):
    """Paper mode's gradient path on a checkpoint that Dynamic VRAM loaded: grad_ready_clone
    takes ComfyUI's non-dynamic delegate (reloaded from the file), keeps the LoRA's patches, and
    gradients reach the conditioning through it."""
    from pathlib import Path

    import comfy.utils

    files = demo_models.ensure_demo_models(Path(__file__).resolve().parents[2] / ".demo" / "comfy" / "models", log=None)
    saved = comfy.model_patcher.CoreModelPatcher
    comfy.model_patcher.CoreModelPatcher = dynamic_patcher_class
    try:
        model = comfy.sd.load_checkpoint_guess_config(str(files["base"]), output_vae=False, output_clip=False)[0]
    finally:
        comfy.model_patcher.CoreModelPatcher = saved
    assert model.is_dynamic()
    lora = comfy.utils.load_torch_file(str(files["lora"]), safe_load=True)
    adapted, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    try:
        clone = host.grad_ready_clone(adapted)
        assert not clone.is_dynamic()
        assert clone.patches.keys() == adapted.patches.keys() and len(clone.patches) > 0
        with torch.inference_mode(False), torch.enable_grad():
            context = torch.randn(1, 77, 768, requires_grad=True)
            x = torch.randn(1, 4, 8, 8)
            mm.load_models_gpu([clone])
            x0 = clone.model.apply_model(x, torch.tensor([5.0]), c_crossattn=context)
            x0.square().mean().backward()
        assert context.grad is not None and torch.isfinite(context.grad).all() and context.grad.abs().sum() > 0
    finally:
        _forget_dynamic_models()
        mm.unload_all_models()
