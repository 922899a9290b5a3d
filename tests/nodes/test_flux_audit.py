"""Flux.1 through the pack: ComfyUI's own CLIP-L + T5 text side, the joint-attention probe
through optimized_attention_override, guidance as users sample Flux, the audit on tiny
in-process Flux models (scripts/demo_models.tiny_flux) and a Flux LoRA through the loader
LoraLoaderModelOnly uses."""
import pytest
import torch

import comfy.model_management
import comfy.samplers
import comfy.sd
import comfy.utils

from audit_helpers import TEMPLATE, WORDS, audit, family_prompts

SIZE = 64  # px: an 8x8 latent, 16 image tokens of 2x2 patches
# Words that are one T5 piece each (as most common words are in the real T5 vocabulary), so the
# planted edit can move every piece of them; "tiger" (three pieces: "▁", "t", "iger", the first
# two shared with the template and other words) is the text-side tests' multi-piece word.
PLANTED = ("bicycle", "castle", "violin")


@pytest.fixture(scope="module")
def flux(demo_models):
    return demo_models.tiny_flux(0, "dev")


@pytest.fixture(scope="module")
def flux_planted(demo_models, flux):
    model, clip, _ = flux
    return demo_models.flux_planted_edit(model, clip, PLANTED, WORDS, TEMPLATE)[0]


def flux_audit(pack, base, clip, adapted, adapted_clip=None, **kw):
    return audit(pack, base, clip, adapted, adapted_clip, **{"width": SIZE, "height": SIZE, "scheduler": "simple", **kw})


def _comfy(clip, text):
    out = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True)
    return out["cond"].float(), out["pooled_output"].float()


def _prompts(pack, clip, family, text, words):
    """The pack's prompts of `words` for CLIP-L and T5 (T5 has its own tokenizer)."""
    return family_prompts(pack, clip, family, text, words)


def test_flux_text_side_is_comfyuis_encode(pack, demo_models, flux):
    """Context (T5's output, 256 tokens) and pooled vector (CLIP-L's) of a batch of words equal
    ComfyUI's encode_from_tokens of each filled prompt, the slot given as ids and as rows; the
    slot mask marks the word's T5 pieces; the negative is the encoded empty prompt."""
    host = pack.nodes.host
    model, clip, _ = flux
    family = host.check_pair(model, model, clip, clip)
    assert family.name == "Flux.1" and family.variant(model) == "dev"
    words = ["tiger", "aquarium fish", "castle"]
    with torch.inference_mode():
        text = host.ComfyText(clip, family, "clip")
        assert list(text.layouts) == ["l", "t5"]
        assert text.layouts["t5"].start is None and text.layouts["t5"].max_length == 256
        vocab, by_ids, by_rows = _prompts(pack, clip, family, text, words)
        assert vocab[0].ids("t5") != vocab[0].ids("l")  # T5 splits the word into its own pieces
        ours_ids, ours_rows = text.encode(by_ids), text.encode(by_rows)
        for i, word in enumerate(words):
            cond, pooled = _comfy(clip, TEMPLATE.format(word))
            assert [int(t) for t, _ in clip.tokenize(TEMPLATE.format(word))["t5xxl"][0]] == by_ids[i]["t5"].ids()
            for ours in (ours_ids, ours_rows):
                assert ours.context[i:i + 1].shape == cond.shape == (1, 256, 64)
                torch.testing.assert_close(ours.context[i:i + 1], cond, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(ours.extras["pooled"][i:i + 1], pooled, atol=1e-5, rtol=1e-4)
            slot = demo_models.t5_slot_positions(clip, TEMPLATE, word)
            assert ours_ids.slot_mask[i].nonzero().flatten().tolist() == slot
        uncond = pack.driftscope_core.models.ModelSide("base", text, None).empty_prompt()
        cond, pooled = _comfy(clip, "")
        torch.testing.assert_close(uncond.context, cond, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(uncond.extras["pooled"], pooled, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_flux_x0_equals_the_stock_sampler_for_one_step(pack, demo_models, variant):
    """The pack's x0 at the family's defaults (CFG 1; dev's distilled guidance 3.5 as FluxGuidance
    sets it, schnell none) equals the x0 ComfyUI's own sampler (CFGGuider, euler) computes at its
    first step from the same noise."""
    core, host = pack.driftscope_core, pack.nodes.host
    model, clip, _ = demo_models.tiny_flux(0, variant)
    family = host.check_pair(model, model, clip, clip)
    defaults = family.sampling_defaults(model)
    assert defaults == {"cfg": 1.0, "guidance": 3.5 if variant == "dev" else None}
    with torch.inference_mode():
        runtime = host.runtime_for("fp32", 4, False)
        base, _ = host.model_sides(family, model, clip, model, clip, runtime, need_grad=False, guidance=defaults["guidance"])
        _, by_ids, _ = _prompts(pack, clip, family, base.text, ["tiger"])
        cond, uncond = base.encode(by_ids), base.empty_prompt()
        schedule = host.schedule_of(model, "simple", 10)
        noise = core.sampling.make_noise([7], (16, SIZE // 8, SIZE // 8))  # (1, 16, 8, 8)
        x = noise * schedule.initial_scale
        ours, _ = core.objective._guided_x0(base, x, schedule.sigmas[0], cond, uncond, 1.0, False, runtime)

        seen = {}
        guider = comfy.samplers.CFGGuider(model)
        positive, negative = (_comfy(clip, t) for t in (TEMPLATE.format("tiger"), ""))
        extra = {"pooled_output": positive[1]}
        if variant == "dev":
            extra["guidance"] = 3.5
        guider.set_conds([[positive[0], extra]], [[negative[0], {"pooled_output": negative[1]}]])
        guider.set_cfg(1.0)
        guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), schedule.sigmas[:2],
                      callback=lambda step, x0, x, total: seen.setdefault(step, x0.clone()), disable_pbar=True, seed=7)
    torch.testing.assert_close(ours, seen[0].float(), atol=1e-5, rtol=1e-4)


def test_joint_probe_reproduces_the_hosts_attention(pack, flux):
    """The probabilities the probe computes from the q, k that ComfyUI's attention receives
    reproduce the host's attention output (probs @ v), and joint_slot_map, chunked, is their
    slot slice; the model's output with the probe installed is bit-identical to without."""
    core, host = pack.driftscope_core, pack.nodes.host
    model, clip, _ = flux
    family = host.check_pair(model, model, clip, clip)
    with torch.inference_mode():
        runtime = host.runtime_for("fp32", 4, False)
        base, _ = host.model_sides(family, model, clip, model, clip, runtime, need_grad=False, guidance=3.5)
        _, by_ids, _ = _prompts(pack, clip, family, base.text, ["tiger", "castle"])
        cond = base.encode(by_ids)  # 2 prompts
        x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
        sigma = torch.full((2,), 0.8)
        inputs = base.denoiser.model_inputs(x, cond)
        t, n = cond.context.shape[1], 16
        checks = []

        def check(func, q, k, v, heads, *args, **kwargs):
            out = func(q, k, v, heads, *args, **kwargs)  # (B, L, H*dh)
            probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)  # (B, H, L, L)
            mine = (probs @ v.float()).transpose(1, 2).reshape(out.shape)
            weights = cond.slot_mask / cond.slot_mask.sum(1, keepdim=True)  # (B, T)
            wanted = torch.einsum("bhnt,bt->bn", probs[:, :, t:, :t], weights) / heads  # (B, N)
            got = core.attention.joint_slot_map(q, k, cond.slot_mask, chunk_elements=3 * (t + n))
            checks.append(((mine - out.float()).abs().max().item(), (got - wanted).abs().max().item(),
                           kwargs["transformer_options"].get("block_type")))
            return out

        comfy.model_management.load_models_gpu([model])
        plain = model.model.apply_model(x, sigma, **inputs)
        model.model.apply_model(x, sigma, transformer_options={"optimized_attention_override": check}, **inputs)
        probe = core.attention.SlotAttentionProbe(cond.slot_mask)
        probed = base.denoiser(x, sigma, cond, probe)
    assert {c[2] for c in checks} == {"double", "single"}
    assert max(c[0] for c in checks) < 1e-5 and max(c[1] for c in checks) < 1e-6
    assert torch.equal(plain, probed)
    maps = probe.stacked()  # (2, L, N): the double-stream blocks only
    assert maps.shape == (2, model.model.model_config.unet_config["depth"], n)


def test_flux_planted_words_are_found_on_top_and_flagged(pack, flux, flux_planted):
    model, clip, _ = flux
    for mode in ("scan", "screen"):
        report = flux_audit(pack, model, clip, flux_planted, mode=mode)
        assert {e.token for e in report.entries[:3]} == set(PLANTED), (mode, report.table())
        assert all(e.significant for e in report.entries[:3])
        assert report.models["family"] == "Flux.1"
        assert report.settings["cfg"] == 1.0 and report.settings["guidance"] == 3.5
        assert all(e.encoder_token_ids["t5"] for e in report.entries)  # the report keeps T5's ids
    same = flux_audit(pack, model, clip, flux_planted, mode="screen")
    assert [(e.token, e.drift) for e in same.entries] == [(e.token, e.drift) for e in report.entries]
    # one guided evaluation per step at CFG 1: a scan's UNet evaluations are words x seeds x steps
    scan = flux_audit(pack, model, clip, flux_planted, mode="scan", objective="prediction")
    assert {e.token for e in scan.entries[:3]} == set(PLANTED), scan.table()


def test_flux_schnell_audit_and_the_nodes_cfg_and_guidance(pack, demo_models):
    model, clip, _ = demo_models.tiny_flux(0, "schnell")
    adapted, _ = demo_models.flux_planted_edit(model, clip, PLANTED, WORDS, TEMPLATE)
    report = flux_audit(pack, model, clip, adapted)
    assert report.settings["cfg"] == 1.0 and report.settings["guidance"] is None
    assert {e.token for e in report.entries[:3]} == set(PLANTED), report.table()
    changed = flux_audit(pack, model, clip, adapted, cfg=3.0, top_k=3)
    assert changed.settings["cfg"] == 3.0


def test_flux_paper_mode_gradients(pack, flux, flux_planted):
    """The soft prompt's gradient through ComfyUI's T5 and CLIP-L (saved tensors cloned for the
    in-place residual adds) and the Flux transformer: finite and non-zero."""
    core, host = pack.driftscope_core, pack.nodes.host
    model, clip, _ = flux
    adapted_clip = clip.clone()
    adapted_clip.add_patches({k: ("diff", (torch.full_like(w, 1e-3),)) for k, w in
                              clip.cond_stage_model.state_dict().items() if k.endswith("o.weight")}, 1.0)
    with torch.inference_mode():
        with torch.inference_mode(False), torch.enable_grad():
            runtime = host.runtime_for("auto", 4, False)
            family = host.check_pair(model, flux_planted, clip, adapted_clip)
            base, adapted = host.model_sides(family, model, clip, flux_planted, adapted_clip, runtime, need_grad=True,
                                             guidance=3.5)
            try:
                assert base.text is not adapted.text
                vocab, _, _ = _prompts(pack, clip, family, base.text, WORDS)
                tpl = pack.nodes.audit.family_templates([TEMPLATE], clip, family, base.text, vocab)
                sampling = core.meter.SamplingSettings(latent_shape=(16, 8, 8), kept_steps=2, cfg=1.0)
                meter = core.meter.DriftMeter(base, adapted, vocab, tpl, host.schedule_of(model, "simple", 10), sampling, runtime)
                logits = torch.zeros(len(vocab), requires_grad=True)
                one_hot = core.soft_prompt.gumbel_straight_through(logits, 1.0, torch.Generator().manual_seed(0))
                drift = meter.soft_backward(one_hot, [1, 2], sign=-1.0)
            finally:
                host.release(base, adapted)
    assert torch.isfinite(drift).all() and (drift > 0).all()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert adapted.counts.text_backward == 1 and adapted.counts.unet_backward == 2 * 2  # 2 seeds x 2 steps, CFG 1
    assert not getattr(comfy.model_management, "in_training", False)  # the kernels flag is back as it was


def _fingerprint(model, clip):
    with torch.inference_mode():
        cond, pooled = _comfy(clip, "a photo of a tiger")
        comfy.model_management.load_models_gpu([model])
        x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
        conds = model.model.extra_conds(cross_attn=cond, pooled_output=pooled, guidance=3.5, device=x.device, noise=x)
        out = model.model.apply_model(x, torch.tensor([0.7]), **{k: c.cond for k, c in conds.items()})
    return cond.clone(), pooled.clone(), out.clone()


@pytest.mark.parametrize("ending", ["finished", "failed", "cancelled"])
def test_flux_input_models_unchanged_after_every_run(pack, flux, flux_planted, ending):
    model, clip, _ = flux
    before = _fingerprint(model, clip), _fingerprint(flux_planted, clip)
    if ending == "finished":
        flux_audit(pack, model, clip, flux_planted, mode="paper", top_k=1, opt_steps=2)
    elif ending == "failed":
        with pytest.raises(ValueError, match="templates"):
            flux_audit(pack, model, clip, flux_planted, mode="paper", templates="no slot here")
    else:
        comfy.model_management.interrupt_current_processing(True)
        try:
            with pytest.raises(comfy.model_management.InterruptProcessingException):
                flux_audit(pack, model, clip, flux_planted, mode="paper")
        finally:
            comfy.model_management.interrupt_current_processing(False)
    after = _fingerprint(model, clip), _fingerprint(flux_planted, clip)
    for a, b in zip(before, after):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_flux_lora_through_the_model_only_loader_is_audited(pack, demo_models, flux, tmp_path):
    """The planted edit as a kohya Flux LoRA file, loaded as LoraLoaderModelOnly loads it (CLIP
    untouched), audited against its base: the planted words on top, one shared text side."""
    model, clip, _ = flux
    deltas, _ = demo_models.flux_planted_edit_deltas(model, clip, PLANTED, WORDS, TEMPLATE)
    path = demo_models.write_flux_lora(tmp_path / "planted_flux_lora.safetensors", model, deltas)
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    adapted, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)
    assert adapted.patches
    report = flux_audit(pack, model, clip, adapted)
    assert {e.token for e in report.entries[:3]} == set(PLANTED), report.table()
    assert report.evaluations["adapted"]["text_forward"] == 1  # its empty prompt: the words are encoded once


def test_flux_with_a_clip_of_another_family_is_refused(pack, demo_models, flux):
    model, _, _ = flux
    _, sd_clip, _ = demo_models.tiny_sd15(0)
    with pytest.raises(ValueError, match=r"base_clip: .*not Flux's text encoder pair.*DualCLIPLoader"):
        pack.nodes.host.check_pair(model, model, sd_clip, sd_clip)
