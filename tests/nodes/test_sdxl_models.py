"""scripts/demo_models.py, SDXL: the tiny in-process SDXL, its planted edit, SDXL LoRA files as
people share them (kohya with both text encoders, LyCORIS LoKr) through ComfyUI's stock loader
functions, and an adapted CLIP that differs from the base's.
"""
import logging

import pytest
import torch

import comfy.lora
import comfy.model_base
import comfy.model_management as mm
import comfy.model_sampling
import comfy.sd
import comfy.supported_models
import comfy.utils

PLANTED = ("tiger", "bicycle", "castle")
SMALL_VOCAB = ["tiger", "bicycle", "castle", "apple", "river", "chair", "cloud", "lamp", "mountain",
               "bread", "forest", "boat", "rabbit", "bridge", "flower", "clock", "tower"]
HELDOUT = ("dog", "cat", "car", "guitar", "pizza", "ship", "horse", "airplane")
TEMPLATE = "a photo of a {}"
CLIP_L_WIDTH = 64  # the tiny clip_l's width: cond[..., :64] is clip_l's, the rest clip_g's


def encode(clip, prompt):
    """ComfyUI's conditioning of a prompt: {"cond": [1, 77, 128], "pooled_output": [1, 64]}."""
    return clip.encode_from_tokens(clip.tokenize(prompt), return_dict=True)


def x0_prediction(patcher, conditioning, size=8, sigma=3.0, seed=0):
    """The model's x0 for fixed noise, with `y` built by the model's own extra_conds (pooled
    output plus size embeddings), as ComfyUI's samplers build it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, size, size, generator=g) * sigma
    extra = patcher.model.extra_conds(pooled_output=conditioning["pooled_output"], cross_attn=conditioning["cond"],
                                      width=8 * size, height=8 * size, device="cpu", noise=x)
    mm.load_models_gpu([patcher])
    with torch.no_grad():
        return patcher.model.apply_model(x, torch.tensor([sigma]), c_crossattn=conditioning["cond"],
                                         y=extra["y"].cond)


def relative_change(a, b):
    return ((a - b).norm() / b.norm()).item()


def slot_kv_change(demo_models, model, clip, deltas, word):
    """Mean over the edited projections of ||Delta c|| / ||W c|| for the word's slot context rows."""
    _, slot, _ = demo_models.slot_layout(clip, TEMPLATE, word)
    rows = demo_models.encode_conditioning(clip, [TEMPLATE.format(word)])[0, slot].double().T  # (dim, n_slot)
    weights = demo_models._effective_weights(model, deltas)
    ratios = [((d.double() @ rows).norm(dim=0) / (weights[k].double() @ rows).norm(dim=0)).mean() for k, d in deltas.items()]
    return torch.stack(ratios).mean().item()


def lora_modules(sd):
    """The module names of a LoRA/LyCORIS state dict (keys without their .lora_up.weight etc.)."""
    return {k.split(".")[0] for k in sd}


def load_through_stock_loader(model, clip, path, caplog):
    """load_torch_file + load_lora_for_models (what LoraLoader calls), with ComfyUI's warnings."""
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        patched_model, patched_clip = comfy.sd.load_lora_for_models(model, clip, sd, 1.0, 1.0)
    not_loaded = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    return sd, patched_model, patched_clip, not_loaded


@pytest.fixture(scope="module")
def sdxl(demo_models):
    return demo_models.tiny_sdxl(0)


# -- the tiny model --------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_tiny_sdxl_is_an_sdxl_model(demo_models, sdxl, prediction):
    model, clip, vae = sdxl if prediction == "eps" else demo_models.tiny_sdxl(0, prediction="v")
    assert isinstance(model.model, comfy.model_base.SDXL)
    assert isinstance(model.model.model_config, comfy.supported_models.SDXL)
    sampling = model.model.model_sampling
    assert isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete)
    want = comfy.model_sampling.EPS if prediction == "eps" else comfy.model_sampling.V_PREDICTION
    assert isinstance(sampling, want)
    assert isinstance(sampling, comfy.model_sampling.V_PREDICTION) == (prediction == "v")
    assert model.model.model_type == {"eps": comfy.model_base.ModelType.EPS,
                                      "v": comfy.model_base.ModelType.V_PREDICTION}[prediction]
    assert {p.dtype for p in model.model.diffusion_model.parameters()} == {torch.float32}
    assert {p.dtype for p in clip.cond_stage_model.parameters()} == {torch.float32}

    conditioning = encode(clip, "a photo of a tiger")
    assert conditioning["cond"].shape == (1, 77, 128) and conditioning["pooled_output"].shape == (1, 64)
    x0 = x0_prediction(model, conditioning)
    assert x0.shape == (1, 4, 8, 8) and torch.isfinite(x0).all() and 0.01 < x0.std().item() < 100
    assert vae.latent_channels == model.model.latent_format.latent_channels == 4
    image = vae.decode(model.model.latent_format.process_out(x0))
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()


def test_tiny_sdxl_layout(demo_models, sdxl):
    model, clip, _ = sdxl
    outer = clip.cond_stage_model
    assert type(outer).__name__ == "SDXLClipModel"
    assert outer.clip_l.layer == outer.clip_g.layer == "hidden" and outer.clip_l.layer_idx == -2
    # cross-attention only at latent/2 and latent/4, as in SDXL (none at full resolution)
    keys = demo_models.cross_attention_kv_keys(model)
    blocks = sorted({k.split(".transformer_blocks")[0].rsplit(".", 1)[0] for k in keys})
    assert blocks == ["diffusion_model.input_blocks.4", "diffusion_model.input_blocks.5",
                      "diffusion_model.input_blocks.7", "diffusion_model.input_blocks.8",
                      "diffusion_model.middle_block"] + [f"diffusion_model.output_blocks.{i}" for i in range(6)]
    assert len(keys) == 22
    tokens = clip.tokenize("a photo of a tiger")
    assert demo_models.token_ids(clip, "a photo of a tiger") == [int(t) for t, _ in tokens["g"][0][:7]]


def test_tiny_sdxl_is_deterministic(demo_models, sdxl):
    again, other = demo_models.tiny_sdxl(0), demo_models.tiny_sdxl(1)
    key = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(sdxl[0].model.state_dict()[key], again[0].model.state_dict()[key])
    assert not torch.equal(sdxl[0].model.state_dict()[key], other[0].model.state_dict()[key])
    base = encode(sdxl[1], "a photo of a tiger")
    assert all(torch.equal(base[k], encode(again[1], "a photo of a tiger")[k]) for k in base)
    assert not torch.equal(base["cond"], encode(other[1], "a photo of a tiger")["cond"])


# -- the planted edit ------------------------------------------------------------------------------
def test_planted_edit_rows_are_the_conditioning(demo_models, sdxl):
    """The edit vectors are rows of encode_from_tokens' cond at the slot and end-of-text positions."""
    _, clip, _ = sdxl
    edit, _, info = demo_models.edit_and_preserve_vectors(clip, PLANTED, SMALL_VOCAB, TEMPLATE, pad_prompts=2)
    rows = torch.cat([encode(clip, TEMPLATE.format(w))["cond"][0, pos] for w, pos in zip(PLANTED, info["edit_positions"])])
    torch.testing.assert_close(edit, rows, rtol=0, atol=0)
    assert edit.shape[1] == 128 and info["edit_kind"] == ["slot", "eos"] * 3


def test_planted_edit_in_process(demo_models, sdxl):
    model, clip, _ = sdxl
    weights_before = {k: v.clone() for k, v in model.model.state_dict().items()}
    compared = PLANTED + HELDOUT
    conds = {w: encode(clip, TEMPLATE.format(w)) for w in compared}
    base = {w: x0_prediction(model, c) for w, c in conds.items()}

    edited = demo_models.planted_edit_in_process(model, clip, PLANTED, SMALL_VOCAB, TEMPLATE)
    deltas, stats = demo_models.planted_edit_deltas(model, clip, PLANTED, SMALL_VOCAB, TEMPLATE)

    assert model.patches == {} and edited is not model
    assert sorted(edited.patches) == demo_models.cross_attention_kv_keys(model) == sorted(deltas)
    assert stats["planted_slot_rel_change"]["min"] > 100 * stats["preserved_rel_change"]["mean"]
    # keys/values of the planted words' slot rows move far more than those of held-out words
    # (measured: planted 1.49-1.56, held-out 0.17-0.56, means 1.52 and 0.36)
    kv = {w: slot_kv_change(demo_models, model, clip, deltas, w) for w in compared}
    planted_kv = [kv[w] for w in PLANTED]
    heldout_kv = [kv[w] for w in HELDOUT]
    assert min(planted_kv) > 2 * max(heldout_kv), kv
    assert sum(planted_kv) / len(planted_kv) > 3 * sum(heldout_kv) / len(heldout_kv), kv
    # and so does the model's prediction (measured: planted 0.073-0.136, held-out 0.007-0.040)
    change = {w: relative_change(x0_prediction(edited, c), base[w]) for w, c in conds.items()}
    assert min(change[w] for w in PLANTED) > 1.5 * max(change[w] for w in HELDOUT), change
    # the input patcher computes exactly what it computed before
    assert torch.equal(x0_prediction(model, conds["tiger"]), base["tiger"])
    mm.load_models_gpu([model])
    assert all(torch.equal(v, weights_before[k]) for k, v in model.model.state_dict().items())


# -- LoRA files through the stock loader -----------------------------------------------------------
@pytest.fixture(scope="module")
def lora_files(demo_models, sdxl, tmp_path_factory):
    return demo_models.write_sdxl_loras(tmp_path_factory.mktemp("loras"), sdxl[0], sdxl[1], seed=0)


def test_kohya_lora_patches_every_key(demo_models, sdxl, lora_files, caplog):
    model, clip, _ = sdxl
    sd, patched, patched_clip, not_loaded = load_through_stock_loader(model, clip, lora_files["kohya"], caplog)
    assert not_loaded == []
    modules = lora_modules(sd)
    prefixes = {name.split("_")[1] for name in modules}
    assert prefixes == {"unet", "te1", "te2"}
    targets = demo_models.kohya_sdxl_targets(model, clip)
    assert modules == set(targets)
    unet_keys = sorted(k for side, k in targets.values() if side == "unet")
    clip_keys = sorted(k for side, k in targets.values() if side == "clip")
    assert len(unet_keys) == 11 * 12 and len(clip_keys) == 2 * 3 * 6
    assert sorted(patched.patches) == unet_keys and sorted(patched_clip.patcher.patches) == clip_keys
    assert {k.split(".")[0] for k in clip_keys} == {"clip_l", "clip_g"}
    assert model.patches == {} and clip.patcher.patches == {}
    # the loaded patch is W + alpha / rank * up @ down for every UNet module
    names = {k: demo_models.kohya_sdxl_unet_name(k) for k in unet_keys}
    got = demo_models._effective_weights(patched, unet_keys)
    weights = demo_models._effective_weights(model, unet_keys)
    for key, name in names.items():
        scale = sd[f"{name}.alpha"] / sd[f"{name}.lora_down.weight"].shape[0]
        want = weights[key] + scale * sd[f"{name}.lora_up.weight"] @ sd[f"{name}.lora_down.weight"]
        torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6)


def test_kohya_lora_changes_both_text_encoders(sdxl, lora_files, caplog):
    model, clip, _ = sdxl
    prompt = "a photo of a tiger"
    before = encode(clip, prompt)
    _, _, patched_clip, _ = load_through_stock_loader(model, clip, lora_files["kohya"], caplog)
    after = encode(patched_clip, prompt)
    for part in (slice(0, CLIP_L_WIDTH), slice(CLIP_L_WIDTH, None)):  # clip_l, clip_g
        assert relative_change(after["cond"][..., part], before["cond"][..., part]) > 0.01
    assert relative_change(after["pooled_output"], before["pooled_output"]) > 0.01
    again = encode(clip, prompt)
    assert all(torch.equal(again[k], before[k]) for k in before)


def test_lokr_patches_cross_attention(demo_models, sdxl, lora_files, caplog):
    model, clip, _ = sdxl
    sd, patched, patched_clip, not_loaded = load_through_stock_loader(model, clip, lora_files["lokr"], caplog)
    assert not_loaded == []
    assert {k.rsplit(".", 1)[1] for k in sd} == {"lokr_w1", "lokr_w2", "alpha"}
    keys = demo_models.cross_attention_keys(model)
    assert len(keys) == 11 * 4 and all(".attn2." in k for k in keys)
    assert sorted(patched.patches) == keys and patched_clip.patcher.patches == {}
    got = demo_models._effective_weights(patched, keys)
    weights = demo_models._effective_weights(model, keys)
    for key in keys:
        name = demo_models.kohya_sdxl_unet_name(key)
        want = weights[key] + torch.kron(sd[f"{name}.lokr_w1"], sd[f"{name}.lokr_w2"])
        torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6)
        assert relative_change(got[key], weights[key]) == pytest.approx(0.1, rel=1e-3)


def test_lokr_from_deltas(demo_models, sdxl):
    """Given deltas, the LoKr factors are their nearest Kronecker product: exact for a Kronecker delta."""
    model = sdxl[0]
    key = demo_models.cross_attention_kv_keys(model)[0]
    g = torch.Generator().manual_seed(3)
    w = demo_models._effective_weights(model, [key])[key]
    a, b = torch.randn(4, 4, generator=g), torch.randn(w.shape[0] // 4, w.shape[1] // 4, generator=g)
    sd = demo_models.lokr_state_dict(model, {key: torch.kron(a, b)})
    name = demo_models.kohya_sdxl_unet_name(key)
    torch.testing.assert_close(torch.kron(sd[f"{name}.lokr_w1"], sd[f"{name}.lokr_w2"]), torch.kron(a, b),
                               rtol=1e-4, atol=1e-5)


# -- an adapted CLIP -------------------------------------------------------------------------------
def test_adapted_clip_differs_from_base(demo_models, sdxl):
    _, clip, _ = sdxl
    prompt = "a photo of a tiger"
    before = encode(clip, prompt)
    adapted = demo_models.sdxl_adapted_clip(clip, seed=1, scale=0.05)
    assert adapted is not clip and clip.patcher.patches == {}
    keys = sorted(adapted.patcher.patches)
    assert len(keys) == 36 and {k.split(".")[0] for k in keys} == {"clip_l", "clip_g"}
    after = encode(adapted, prompt)
    for part in (slice(0, CLIP_L_WIDTH), slice(CLIP_L_WIDTH, None)):
        assert relative_change(after["cond"][..., part], before["cond"][..., part]) > 0.005
    assert relative_change(after["pooled_output"], before["pooled_output"]) > 0.005
    same = encode(demo_models.sdxl_adapted_clip(clip, seed=1, scale=0.05), prompt)
    assert torch.equal(same["cond"], after["cond"])
    assert all(torch.equal(encode(clip, prompt)[k], before[k]) for k in before)


def test_unmapped_key_would_be_caught(demo_models, sdxl, lora_files, tmp_path, caplog):
    """The 'no key left unloaded' check sees ComfyUI's warning: a key no model has is reported."""
    model, clip, _ = sdxl
    sd = comfy.utils.load_torch_file(str(lora_files["kohya"]), safe_load=True)
    sd["lora_unet_no_such_block.lora_up.weight"] = torch.zeros(4, 4)
    path = tmp_path / "with_stray_key.safetensors"
    comfy.utils.save_torch_file(sd, str(path))
    not_loaded = load_through_stock_loader(model, clip, path, caplog)[3]
    assert not_loaded == ["lora key not loaded: lora_unet_no_such_block.lora_up.weight"]
