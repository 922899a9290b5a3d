"""SDXL through the pack: ComfyUI's own SDXL text encoders and conditioning, the audit on tiny
in-process SDXL models (scripts/demo_models.tiny_sdxl), LoRA files through the stock loader."""
import pytest
import torch

import comfy.model_management
import comfy.samplers
import comfy.sd
import comfy.utils

from audit_helpers import PLANTED, TEMPLATE, WORDS, audit

SIZE = 64  # px: an 8x8 latent, cross-attention at 4x4 and 2x2


@pytest.fixture(scope="module")
def sdxl(demo_models):
    return demo_models.tiny_sdxl(0)


@pytest.fixture(scope="module")
def sdxl_planted(demo_models, sdxl):
    model, clip, _ = sdxl
    return demo_models.planted_edit_in_process(model, clip, PLANTED, WORDS, TEMPLATE)


def sdxl_audit(pack, base, clip, adapted, adapted_clip=None, **kw):
    return audit(pack, base, clip, adapted, adapted_clip, **{"width": SIZE, "height": SIZE, **kw})


def _prompts(pack, clip, family, text, words):
    """The pack's prompts of `words` in template `TEMPLATE` for every SDXL text encoder."""
    core, host = pack.driftscope_core, pack.nodes.host
    tokenize, _, _ = host.tokenizer_functions(clip, family)
    builders = {name: core.prompts.PromptBuilder(core.prompts.tokenize_template(TEMPLATE, tokenize, lay), lay)
                for name, lay in text.layouts.items()}
    by_ids = [{n: b.prompt(tokenize(w)) for n, b in builders.items()} for w in words]
    by_rows = [{n: b.prompt(text.token_embedding(n)[torch.tensor(tokenize(w))]) for n, b in builders.items()} for w in words]
    return by_ids, by_rows


def _comfy(clip, text):
    """ComfyUI's own conditioning of `text` (CLIPTextEncode's output)."""
    out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
    return out["cond"].float(), out["pooled_output"].float()


@pytest.mark.parametrize("variant", ["plain", "adapted_clip", "clip_skip_-1"])
def test_sdxl_text_side_is_comfyuis_encode_with_the_pooled_vector(pack, demo_models, sdxl, variant):
    """Context (CLIP-L and CLIP-G side by side) and pooled vector of a batch of words equal
    ComfyUI's encode_from_tokens of each filled prompt, with the slot as ids and as rows."""
    host = pack.nodes.host
    model, clip, _ = sdxl
    if variant == "adapted_clip":
        clip = demo_models.sdxl_adapted_clip(clip)
    if variant == "clip_skip_-1":
        clip = clip.clone()
        clip.clip_layer(-1)  # CLIPSetLastLayer at -1: both encoders read their last layer
    family = host.check_pair(model, model, clip, clip)
    assert family.name == "SDXL"
    words = ("tiger", "aquarium fish", "x")
    with torch.inference_mode():
        text = host.ComfyText(clip, family, "clip")
        assert list(text.layouts) == ["l", "g"] and text.layouts["l"].pad != text.layouts["g"].pad
        by_ids, by_rows = _prompts(pack, clip, family, text, words)
        ours_ids, ours_rows = text.encode(by_ids), text.encode(by_rows)
        empty = host.ComfyText(clip, family, "clip")
        uncond = pack.driftscope_core.models.ModelSide("base", empty, None).empty_prompt()
        for i, word in enumerate(words):
            cond, pooled = _comfy(clip, TEMPLATE.format(word))
            for ours in (ours_ids, ours_rows):
                assert ours.context[i:i + 1].shape == cond.shape == (1, 77, 128)
                torch.testing.assert_close(ours.context[i:i + 1], cond, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(ours.extras["pooled"][i:i + 1], pooled, atol=1e-5, rtol=1e-4)
        cond, pooled = _comfy(clip, "")  # the negative: the encoded empty prompt, pooled included
        torch.testing.assert_close(uncond.context, cond, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(uncond.extras["pooled"], pooled, atol=1e-5, rtol=1e-4)
        assert pooled.abs().sum() > 0


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_sdxl_x0_equals_the_stock_sampler_for_one_step(pack, demo_models, prediction):
    """The pack's guided x0 on an SDXL model (y built from the pooled vector and the size
    embeddings) equals the denoised x0 that ComfyUI's own sampler (CFGGuider, euler) computes at
    its first step from the same noise, for eps- and v-prediction checkpoints."""
    core, host = pack.driftscope_core, pack.nodes.host
    model, clip, _ = demo_models.tiny_sdxl(0, prediction=prediction)
    cfg, steps = 5.0, 10
    with torch.inference_mode():
        family = host.check_pair(model, model, clip, clip)
        runtime = host.runtime_for("fp32", 4, False)
        base, _ = host.model_sides(family, model, clip, model, clip, runtime, need_grad=False)
        by_ids, _ = _prompts(pack, clip, family, base.text, ["tiger"])
        cond, uncond = base.encode(by_ids), base.empty_prompt()
        schedule = host.schedule_of(model, "normal", steps)
        noise = core.sampling.make_noise([7], (4, SIZE // 8, SIZE // 8))  # (1, 4, 8, 8)
        x = noise * schedule.initial_scale
        ours, _ = core.objective._guided_x0(base, x, schedule.sigmas[0], cond, uncond, cfg, False, runtime)

        seen = {}
        guider = comfy.samplers.CFGGuider(model)
        positive, negative = (_comfy(clip, t) for t in (TEMPLATE.format("tiger"), ""))
        guider.set_conds([[positive[0], {"pooled_output": positive[1]}]], [[negative[0], {"pooled_output": negative[1]}]])
        guider.set_cfg(cfg)
        guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), schedule.sigmas[:2],
                      callback=lambda step, x0, x, total: seen.setdefault(step, x0.clone()), disable_pbar=True, seed=7)
    assert model.model.model_type.name == {"eps": "EPS", "v": "V_PREDICTION"}[prediction]
    torch.testing.assert_close(ours, seen[0].float(), atol=1e-4, rtol=1e-4)


# -- finding planted drift ---------------------------------------------------------------------
def test_sdxl_scan_and_screen_put_planted_words_on_top(pack, sdxl, sdxl_planted):
    model, clip, _ = sdxl
    for mode in ("scan", "screen"):
        report = sdxl_audit(pack, model, clip, sdxl_planted, mode=mode)
        assert {e.token for e in report.entries[:3]} == set(PLANTED), (mode, report.table())
        assert all(e.significant for e in report.entries[:3])
        assert report.models["family"] == "SDXL"
    same = sdxl_audit(pack, model, clip, sdxl_planted, mode="screen")
    assert [(e.token, e.drift) for e in same.entries] == [(e.token, e.drift) for e in report.entries]


def test_sdxl_screen_and_scan_keep_twice_the_presets_steps(pack, sdxl, sdxl_planted):
    """SDXL's default modes keep 2x the preset's denoising steps (the benchmark's planted case);
    a kept_steps the caller chooses stays, and paper mode keeps the paper's."""
    model, clip, _ = sdxl
    family = pack.nodes.families.SDXL()
    small = dict(mode="screen", finalists=5, calibration_size=8)  # the steps' cost, not the search's, is tested
    doubled = sdxl_audit(pack, model, clip, sdxl_planted, **small)
    chosen = sdxl_audit(pack, model, clip, sdxl_planted, kept_steps=3, **small)
    quick = pack.driftscope_core.settings.PRESETS["quick"]["kept_steps"]
    assert doubled.settings["kept_steps"] == 2 * quick and chosen.settings["kept_steps"] == quick
    unet = lambda r: r.evaluations["adapted"]["unet_forward"]
    assert unet(doubled) > 1.5 * unet(chosen)  # the finalists and the calibration really ran the steps
    assert {e.token for e in doubled.entries[:3]} == set(PLANTED)
    settings = pack.driftscope_core.settings.settings_from_preset("paper")
    assert pack.nodes.audit._family_steps(family, settings, chosen=False).kept_steps == settings.kept_steps
    settings = pack.driftscope_core.settings.settings_from_preset("quick", schedule_steps=5)
    assert pack.nodes.audit._family_steps(family, settings, chosen=False).kept_steps == 5  # at most the schedule


def test_sdxl_v_prediction_audit_finds_planted_words(pack, demo_models):
    model, clip, _ = demo_models.tiny_sdxl(0, prediction="v")
    adapted = demo_models.planted_edit_in_process(model, clip, PLANTED, WORDS, TEMPLATE)
    report = sdxl_audit(pack, model, clip, adapted)
    assert report.models["base"]["prediction"] == "V_PREDICTION"
    assert {e.token for e in report.entries[:3]} == set(PLANTED), report.table()


def test_sdxl_paper_mode_gradients_through_both_text_encoders(pack, demo_models, sdxl, sdxl_planted):
    """The soft prompt's gradient on SDXL, with an adapted CLIP so that it runs through ComfyUI's
    CLIP-L and CLIP-G (context and pooled vector) as well as the UNet: finite and non-zero."""
    core, host = pack.driftscope_core, pack.nodes.host
    model, clip, _ = sdxl
    adapted_clip = demo_models.sdxl_adapted_clip(clip)
    with torch.inference_mode():
        with torch.inference_mode(False), torch.enable_grad():
            runtime = host.runtime_for("auto", 4, False)
            family = host.check_pair(model, sdxl_planted, clip, adapted_clip)
            base, adapted = host.model_sides(family, model, clip, sdxl_planted, adapted_clip, runtime, need_grad=True)
            try:
                assert base.text is not adapted.text
                tokenize, _, _ = host.tokenizer_functions(clip, family)
                vocab = core.vocabulary.from_words(WORDS, tokenize)
                tpl = [core.prompts.tokenize_template(TEMPLATE, tokenize, base.text.layouts["l"])]
                sampling = core.meter.SamplingSettings(latent_shape=(4, 8, 8), kept_steps=2)
                meter = core.meter.DriftMeter(base, adapted, vocab, tpl, host.schedule_of(model, "normal", 10), sampling, runtime)
                logits = torch.zeros(len(vocab), requires_grad=True)
                one_hot = core.soft_prompt.gumbel_straight_through(logits, 1.0, torch.Generator().manual_seed(0))
                drift = meter.soft_backward(one_hot, [1, 2], sign=-1.0)
            finally:
                host.release(base, adapted)
    assert torch.isfinite(drift).all() and (drift > 0).all()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert adapted.counts.text_backward == 1 and adapted.counts.unet_backward == 2 * 2 * 2


# -- the input models come out as they went in ---------------------------------------------------
def _fingerprint(model, clip):
    """Outputs that change if anything about the SDXL model or its CLIP changed."""
    with torch.inference_mode():
        cond, pooled = _comfy(clip, "a photo of a tiger")
        comfy.model_management.load_models_gpu([model])
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        conds = model.model.extra_conds(cross_attn=cond, pooled_output=pooled, width=SIZE, height=SIZE, device=x.device, noise=x)
        out = model.model.apply_model(x, torch.tensor([2.0]), **{k: c.cond for k, c in conds.items()})
    return cond.clone(), pooled.clone(), out.clone()


@pytest.mark.parametrize("ending", ["finished", "failed", "cancelled"])
def test_sdxl_input_models_unchanged_after_every_run(pack, demo_models, sdxl, sdxl_planted, ending):
    model, clip, _ = sdxl
    adapted_clip = demo_models.sdxl_adapted_clip(clip)
    before = _fingerprint(model, clip), _fingerprint(sdxl_planted, adapted_clip)
    if ending == "finished":
        sdxl_audit(pack, model, clip, sdxl_planted, adapted_clip, mode="paper", top_k=1, opt_steps=2)
    elif ending == "failed":
        with pytest.raises(ValueError, match="templates"):
            sdxl_audit(pack, model, clip, sdxl_planted, adapted_clip, mode="paper", templates="no slot here")
    else:
        comfy.model_management.interrupt_current_processing(True)
        try:
            with pytest.raises(comfy.model_management.InterruptProcessingException):
                sdxl_audit(pack, model, clip, sdxl_planted, adapted_clip, mode="paper")
        finally:
            comfy.model_management.interrupt_current_processing(False)
    after = _fingerprint(model, clip), _fingerprint(sdxl_planted, adapted_clip)
    for a, b in zip(before, after):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


# -- LoRAs as people share them ------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_files(demo_models, sdxl, tmp_path_factory):
    return demo_models.write_sdxl_loras(tmp_path_factory.mktemp("sdxl-loras"), sdxl[0], sdxl[1], seed=0, strength=0.5)


@pytest.mark.parametrize("kind", ["kohya", "lokr"])
def test_sdxl_lora_files_through_the_stock_loader_are_audited(pack, sdxl, lora_files, kind):
    """A kohya SDXL LoRA (UNet and both text encoders) and a LyCORIS LoKr file, loaded as the
    LoraLoader node loads them, audited against their base; the text side is the adapted CLIP's
    own where the file patches it."""
    model, clip, _ = sdxl
    lora = comfy.utils.load_torch_file(str(lora_files[kind]), safe_load=True)
    adapted, adapted_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    assert adapted.patches
    assert bool(adapted_clip.patcher.patches) == (kind == "kohya")
    report = sdxl_audit(pack, model, clip, adapted, adapted_clip, top_k=5)
    assert len(report.entries) == 5 and all(e.drift > 0 for e in report.entries)
    assert report.models["adapted"]["weight_patches"] == len(adapted.patches)
    assert report.models["adapted"]["clip_weight_patches"] == len(adapted_clip.patcher.patches)
    text_passes = report.evaluations["adapted"]["text_forward"]  # 1: its empty prompt, encoded at the start
    assert (text_passes > 1) == (kind == "kohya"), "a UNet-only file shares the base's text encoder"


def test_unsupported_family_is_named_with_the_supported_ones(pack, demo_models):
    """A Lumina 2 model (tiny, built with ComfyUI's own Lumina2 config class: Z-Image's transformer
    class without Z-Image's modulation, read by a Gemma text encoder) is refused with an error
    that names its family and the supported ones."""
    import comfy.supported_models
    cfg = {k: v for k, v in demo_models.TINY_Z_IMAGE_CONFIG.items() if k not in ("z_image_modulation", "pad_tokens_multiple")}
    config = comfy.supported_models.Lumina2(cfg)
    config.set_inference_dtype(torch.float32, None)
    lumina = config.get_model({})
    demo_models.init_parameters_(lumina.diffusion_model, torch.Generator().manual_seed(0), scalars={"weight": 1.0, "pad_token": 0.0})
    lumina = demo_models._model_patcher(lumina)
    _, clip, _ = demo_models.tiny_sd15(0)
    with pytest.raises(ValueError, match=r"base_model: model family Lumina 2 \(Gemma text encoder\) is not supported yet"
                                         r".*SDXL, Chroma, Flux.1, Qwen-Image, Z-Image, SD3.5, SD1.x/SD2.x"):
        pack.nodes.host.check_pair(lumina, lumina, clip, clip)
