"""scripts/demo_models.py, Flux.1 and Chroma: the tiny in-process models (ComfyUI's own classes,
model sampling and text encoders), the T5 slot positions, the planted edit of the double blocks'
text key/value projections, and its kohya-style Flux LoRA through ComfyUI's stock loader.
"""
import logging

import pytest
import torch

import comfy.model_base
import comfy.model_management as mm
import comfy.model_sampling
import comfy.sd
import comfy.supported_models
import comfy.utils

PLANTED = ("tiger", "bicycle", "castle")
HELDOUT = ("dog", "cat", "car", "guitar", "pizza", "ship", "horse", "airplane")
TEMPLATE = "a photo of a {}"


def relative_change(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def flux(demo_models):
    return demo_models.tiny_flux(0)


@pytest.fixture(scope="module")
def planted(demo_models, flux):
    """The planted edit on tiny_flux with the default (CIFAR-100) vocabulary: (edited, stats)."""
    model, clip, _ = flux
    return demo_models.flux_planted_edit(model, clip, PLANTED, heldout=HELDOUT)


# -- the tiny models ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["dev", "schnell", "chroma"])
def test_tiny_models_are_what_comfyui_builds(demo_models, flux, variant):
    if variant == "chroma":
        model, clip, vae = demo_models.tiny_chroma(0)
    else:
        model, clip, vae = flux if variant == "dev" else demo_models.tiny_flux(0, variant)
    base = model.model
    want_config = {"dev": comfy.supported_models.Flux, "schnell": comfy.supported_models.FluxSchnell,
                   "chroma": comfy.supported_models.Chroma}[variant]
    assert type(base.model_config) is want_config
    assert isinstance(base, comfy.model_base.Flux)
    assert isinstance(base, comfy.model_base.Chroma) == (variant == "chroma")
    sampling = base.model_sampling
    if variant == "schnell":  # FluxSchnell.get_model: ModelType.FLOW, discrete flow with shift 1
        assert base.model_type == comfy.model_base.ModelType.FLOW
        assert isinstance(sampling, comfy.model_sampling.ModelSamplingDiscreteFlow)
        assert sampling.shift == pytest.approx(1.0)
    else:
        assert base.model_type == comfy.model_base.ModelType.FLUX
        assert isinstance(sampling, comfy.model_sampling.ModelSamplingFlux)
        assert sampling.shift == pytest.approx(1.15)  # ModelSamplingFlux's default: neither sets a shift
    assert isinstance(sampling, comfy.model_sampling.CONST)
    if variant != "chroma":
        assert base.diffusion_model.params.guidance_embed == (variant == "dev")
        assert isinstance(base.diffusion_model.guidance_in, torch.nn.Identity) == (variant == "schnell")
    assert {p.dtype for p in base.diffusion_model.parameters()} == {torch.float32}
    assert {p.dtype for p in clip.cond_stage_model.parameters()} == {torch.float32}
    assert len(demo_models.flux_txt_qkv_keys(model)) == 2

    conditioning = demo_models.flux_conditioning(clip, "a photo of a tiger")
    if variant == "chroma":  # PixArt's T5: no padding, no pooled vector
        assert type(clip.cond_stage_model).__name__.startswith("PixArt")
        assert conditioning["cond"].shape == (1, 10, 64) and conditioning.get("pooled_output") is None
    else:
        assert type(clip.cond_stage_model).__name__.startswith("FluxClipModel")
        assert conditioning["cond"].shape == (1, 256, 64) and conditioning["pooled_output"].shape == (1, 64)
    x0 = demo_models.flux_euler(model, [conditioning], sigmas=(1.0,))
    assert x0.shape == (1, 16, 8, 8) and torch.isfinite(x0).all() and 0.01 < x0.std().item() < 100

    assert vae.latent_channels == base.latent_format.latent_channels == 16
    image = vae.decode(torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()


def test_tiny_flux_is_deterministic(demo_models, flux):
    again, other = demo_models.tiny_flux(0), demo_models.tiny_flux(1)
    key = "diffusion_model.double_blocks.0.txt_attn.qkv.weight"
    assert torch.equal(flux[0].model.state_dict()[key], again[0].model.state_dict()[key])
    assert not torch.equal(flux[0].model.state_dict()[key], other[0].model.state_dict()[key])
    base = demo_models.flux_conditioning(flux[1], "a photo of a tiger")
    assert all(torch.equal(base[k], demo_models.flux_conditioning(again[1], "a photo of a tiger")[k]) for k in base)
    assert not torch.equal(base["cond"], demo_models.flux_conditioning(other[1], "a photo of a tiger")["cond"])


# -- T5 slot positions -------------------------------------------------------------------------
@pytest.mark.parametrize("template", ["a photo of a {}", "{}", "a {} in the snow"])
def test_t5_slot_positions(demo_models, flux, template):
    clip = flux[1]
    for word in ("tiger", "bicycle", "umbrella"):
        ids = [int(t[0]) for t in clip.tokenize(template.format(word))["t5xxl"][0]]
        alone = [int(t[0]) for t in clip.tokenize(word)["t5xxl"][0]]
        pieces = alone[:alone.index(1)]  # T5: no start token, end token 1
        slot = demo_models.t5_slot_positions(clip, template, word)
        assert [ids[p] for p in slot] == pieces and slot == list(range(slot[0], slot[0] + len(pieces)))
    assert demo_models.t5_slot_positions(clip, "a photo of a {}", "tiger") == [6, 7, 8]  # ▁, t, iger
    assert demo_models.t5_slot_positions(clip, "{}", "tiger") == [0, 1, 2]
    with pytest.raises(ValueError):
        demo_models.t5_slot_positions(clip, "a photo of a tiger{}", "")


def test_t5_slot_positions_on_chroma_tokens(demo_models):
    clip = demo_models.tiny_chroma_clip(0)
    ids = [int(t[0]) for t in clip.tokenize("a photo of a tiger")["t5xxl"][0]]
    assert len(ids) == 10 and ids[-1] == 1  # PixArt's tokenizer: no padding
    assert demo_models.t5_slot_positions(clip, TEMPLATE, "tiger") == [6, 7, 8]


# -- the planted edit --------------------------------------------------------------------------
def test_planted_edit_moves_the_planted_words(demo_models, flux, planted):
    model, clip, _ = flux
    weights_before = {k: v.clone() for k, v in model.model.state_dict().items()}
    edited, stats = planted
    keys = demo_models.flux_txt_qkv_keys(model)
    assert edited is not model and model.patches == {}
    assert edited.driftscope_planted_stats is stats and sorted(edited.patches) == sorted(keys)
    deltas = stats["deltas"]
    hidden = 64
    for key in keys:  # only the key and value rows [hidden:3*hidden] of [q | k | v]
        assert deltas[key][:hidden].abs().max() == 0 and deltas[key][hidden:].abs().max() > 0
    # the statistics (measured: planted 9.39, preserved words 1.79, held-out 2.14, template and
    # padding 0.040, every preserve vector 0.050)
    assert stats["planted_rel_change"]["min"] > 100 * stats["preserved_rel_change"]["mean"]
    assert stats["planted_rel_change"]["mean"] > 4 * stats["preserved_words_rel_change"]["mean"]
    assert stats["planted_rel_change"]["mean"] > 3 * stats["heldout_rel_change"]["mean"]
    assert stats["template_rel_change"]["mean"] < 0.1
    # "▁ t iger": "▁" is the template's, "t" also in "▁be e t le" (a preserved word): only "iger" moves
    assert stats["edit_positions"] == {"tiger": [8], "bicycle": [6], "castle": [6]}

    # the same, measured here: ||Delta x|| / ||W_kv x|| on each word's own qkv inputs
    words = list(PLANTED) + list(HELDOUT)
    inputs = demo_models.flux_txt_qkv_inputs(model, clip, [TEMPLATE.format(w) for w in words])
    template_ids = {int(t[0]) for t in clip.tokenize(TEMPLATE.format(""))["t5xxl"][0]}
    change = {}
    for i, word in enumerate(words):
        ids = [int(t[0]) for t in clip.tokenize(TEMPLATE.format(word))["t5xxl"][0]]
        own = stats["edit_positions"].get(word) or [p for p in demo_models.t5_slot_positions(clip, TEMPLATE, word)
                                                     if ids[p] not in template_ids]
        ratios = []
        for key in keys:
            x = inputs[key][i][:, own].reshape(-1, hidden).double().T
            w_kv = weights_before[key][hidden:].double()
            ratios.append(((deltas[key][hidden:].double() @ x).norm() / (w_kv @ x).norm()).item())
        change[word] = sum(ratios) / len(ratios)
    planted_kv, heldout_kv = [change[w] for w in PLANTED], [change[w] for w in HELDOUT]
    assert min(planted_kv) > 1.5 * max(heldout_kv), change
    assert sum(planted_kv) / len(planted_kv) > 3 * sum(heldout_kv) / len(heldout_kv), change

    # the input patcher is unchanged
    mm.load_models_gpu([model])
    assert all(torch.equal(v, weights_before[k]) for k, v in model.model.state_dict().items())


def test_planted_edit_shows_in_a_two_step_sampling(demo_models, flux, planted):
    """Measured: planted 1.0-2.0%, held-out 0.2-0.8%, another word instead of "tiger" 3-4%."""
    model, clip, _ = flux
    edited, stats = planted
    words = list(PLANTED) + list(HELDOUT)
    conds = [demo_models.flux_conditioning(clip, TEMPLATE.format(w)) for w in words]
    base = demo_models.flux_euler(model, conds, stats["sigmas"])
    after = demo_models.flux_euler(edited, conds, stats["sigmas"])
    change = {w: relative_change(after[i], base[i]) for i, w in enumerate(words)}
    planted_change, heldout_change = [change[w] for w in PLANTED], [change[w] for w in HELDOUT]
    assert min(planted_change) > 1.2 * max(heldout_change), change
    assert sum(planted_change) / 3 > 2.5 * sum(heldout_change) / len(HELDOUT), change
    assert torch.equal(demo_models.flux_euler(model, conds, stats["sigmas"]), base)  # the base computes as before


def test_planted_edit_on_chroma(demo_models):
    model, clip, _ = demo_models.tiny_chroma(0)
    vocab = demo_models.load_vocabulary()[:40]
    edited, stats = demo_models.flux_planted_edit(model, clip, PLANTED, vocab, heldout=HELDOUT)
    assert model.patches == {} and sorted(edited.patches) == demo_models.flux_txt_qkv_keys(model)
    assert stats["planted_rel_change"]["mean"] > 3 * stats["heldout_rel_change"]["mean"]
    assert stats["planted_rel_change"]["mean"] > 3 * stats["preserved_words_rel_change"]["mean"]


# -- the LoRA file -----------------------------------------------------------------------------
def test_flux_lora_through_the_stock_loader(demo_models, flux, planted, tmp_path, caplog):
    model, _, _ = flux
    deltas = planted[1]["deltas"]
    path = demo_models.write_flux_lora(tmp_path / "flux_planted.safetensors", model, deltas)
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)  # what LoraLoaderModelOnly does
    assert sorted({k.split(".")[0] for k in sd}) == ["lora_unet_double_blocks_0_txt_attn_qkv",
                                                      "lora_unet_double_blocks_1_txt_attn_qkv"]
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        patched, _ = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0)
    assert [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()] == []
    assert sorted(patched.patches) == sorted(deltas) and model.patches == {}
    _, ranks = demo_models.flux_lora_state_dict(model, deltas)
    assert set(ranks.values()) == {3}  # one edit vector per planted piece: iger, ▁bicycle, ▁castle
    keys = sorted(deltas)
    got = demo_models._effective_weights(patched, keys)
    weights = demo_models._effective_weights(model, keys)
    for key in keys:
        want = weights[key] + deltas[key]
        assert relative_change(got[key], want) < 1e-4
        torch.testing.assert_close(got[key] - weights[key], deltas[key], rtol=1e-4, atol=1e-5)
    # a lower rank is a truncation of the same SVD
    low, low_ranks = demo_models.flux_lora_state_dict(model, deltas, rank=2)
    assert set(low_ranks.values()) == {2} and low["lora_unet_double_blocks_0_txt_attn_qkv.alpha"].item() == 2.0
