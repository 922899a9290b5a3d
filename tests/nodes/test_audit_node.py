"""The audit through a real in-process ComfyUI on tiny SD1.x / SD2.x models."""
import pytest
import torch

import comfy.model_management
import folder_paths

from audit_helpers import PLANTED, TEMPLATE, WORDS, assert_same, audit, fingerprint


@pytest.fixture(scope="module")
def sd15(demo_models):
    return demo_models.tiny_sd15(0)


@pytest.fixture(scope="module")
def sd15_planted(demo_models, sd15):
    model, clip, _ = sd15
    return demo_models.planted_edit_in_process(model, clip, PLANTED, WORDS, TEMPLATE)


@pytest.fixture(scope="module")
def sd2(demo_models):
    return demo_models.tiny_sd2(0)


# -- the text path ------------------------------------------------------------------------------
def _patched_clip(clip):
    """A clone with a LoRA-like patch on the text encoder's first MLP."""
    clip = clip.clone()
    key = next(k for k in clip.patcher.model.state_dict() if k.endswith("layers.0.mlp.fc1.weight"))
    w = clip.patcher.model.state_dict()[key]
    clip.add_patches({key: ("diff", (torch.randn(w.shape, generator=torch.Generator().manual_seed(1)) * 0.5,))}, 1.0)
    return clip


@pytest.mark.parametrize("family", ["sd15", "sd2", "sd15_clip_skip", "sd15_patched_clip"])
def test_text_side_is_comfyuis_encode_for_ids_and_for_slot_rows(pack, demo_models, family):
    """The pack's conditioning of a batch of words equals ComfyUI's encode_from_tokens of each
    filled prompt, with the word as token ids and as embedding rows in the token list."""
    host = pack.nodes.host
    core = pack.driftscope_core
    model, clip, _ = demo_models.tiny_sd2(0) if family == "sd2" else demo_models.tiny_sd15(0)
    if family == "sd15_clip_skip":
        clip = clip.clone()
        clip.clip_layer(-2)  # what CLIPSetLastLayer does
    if family == "sd15_patched_clip":  # a LoRA-like patch on the text encoder must be seen
        clip = _patched_clip(clip)
    fam = host.check_pair(model, model, clip, clip)
    words = ("tiger", "aquarium fish", "x")
    with torch.inference_mode():  # as ComfyUI runs nodes
        text = host.ComfyText(clip, fam, "clip")
        tokenize, _, _ = host.tokenizer_functions(clip, fam)
        (name, layout), = text.layouts.items()
        builder = core.prompts.PromptBuilder(core.prompts.tokenize_template(TEMPLATE, tokenize, layout), layout)
        by_ids = text.encode([{name: builder.prompt(tokenize(w))} for w in words])
        table = text.token_embedding(name)  # (V, D)
        by_rows = text.encode([{name: builder.prompt(table[torch.tensor(tokenize(w))])} for w in words])
        for i, word in enumerate(words):
            theirs = clip.encode_from_tokens(clip.tokenize(TEMPLATE.format(word)))[0].float()  # (77, D)
            assert by_ids.context[i].shape == theirs.shape
            assert torch.allclose(by_ids.context[i], theirs, atol=1e-5, rtol=1e-4), (by_ids.context[i] - theirs).abs().max()
            assert torch.allclose(by_rows.context[i], theirs, atol=1e-5, rtol=1e-4)
            assert by_ids.slot_mask[i].nonzero().flatten().tolist() == list(range(5, 5 + len(tokenize(word))))


def test_slot_rows_get_gradients_through_comfyuis_text_encoder(pack, sd15):
    """Paper mode's path: through a gradient-ready clone of ComfyUI's encoder the slot rows get
    the gradient a finite difference predicts, and the input CLIP stays as it was."""
    host, core = pack.nodes.host, pack.driftscope_core
    model, clip, _ = sd15
    clip = _patched_clip(clip)
    fam = host.check_pair(model, model, clip, clip)
    with torch.inference_mode():
        with torch.inference_mode(False), torch.enable_grad():
            text = host.ComfyText(clip, fam, "clip", grad_clip=host.grad_ready_clip(clip))
            tokenize, _, _ = host.tokenizer_functions(clip, fam)
            (name, layout), = text.layouts.items()
            builder = core.prompts.PromptBuilder(core.prompts.tokenize_template(TEMPLATE, tokenize, layout), layout)
            rows = text.token_embedding(name)[torch.tensor(tokenize("tiger"))].clone().requires_grad_(True)  # (1, D)
            context = text.encode([{name: builder.prompt(rows)}]).context  # (1, 77, D)
            probe = torch.randn(context.shape, generator=torch.Generator().manual_seed(3))  # a fixed linear read-out
            loss = (context * probe).sum()
            (grad,) = torch.autograd.grad(loss, rows)
            direction, h = grad / grad.norm(), 1e-2
            with torch.no_grad():
                f = [(text.encode([{name: builder.prompt(rows + s * h * direction)}]).context * probe).sum() for s in (1, -1)]
            host.release(core.models.ModelSide("t", text, None))
    assert torch.isfinite(grad).all() and grad.norm() > 0
    finite_difference = float((f[0] - f[1]) / (2 * h))
    assert finite_difference == pytest.approx(float(grad.norm()), rel=0.02)


# -- finding planted drift ---------------------------------------------------------------------
def test_scan_puts_planted_words_on_top(pack, sd15, sd15_planted):
    model, clip, _ = sd15
    report = audit(pack, model, clip, sd15_planted)
    assert {e.token for e in report.entries[:3]} == set(PLANTED)
    assert all(e.significant for e in report.entries[:3])
    assert report.evaluations["adapted"]["unet_forward"] > 0


def test_sd2_v_prediction_audit_finds_planted_words(pack, demo_models, sd2):
    model, clip, _ = sd2
    # the tiny SD2 text encoder needs a stronger edit for the planted words to move clearly
    adapted = demo_models.planted_edit_in_process(model, clip, PLANTED, WORDS, TEMPLATE, strength=2.0)
    report = audit(pack, model, clip, adapted)
    assert {e.token for e in report.entries[:3]} == set(PLANTED)


def test_gradients_reach_the_soft_prompt_through_comfyui(pack, sd15, sd15_planted):
    model, clip, _ = sd15
    core, host = pack.driftscope_core, pack.nodes.host
    with torch.inference_mode():  # as ComfyUI runs nodes
        with torch.inference_mode(False), torch.enable_grad():
            runtime = host.runtime_for("auto", 4, False)
            fam = host.check_pair(model, sd15_planted, clip, clip)
            base, adapted = host.model_sides(fam, model, clip, sd15_planted, clip, runtime, need_grad=True)
            tokenize, bpe, reserved = host.tokenizer_functions(clip, fam)
            vocab = core.vocabulary.from_words(WORDS, tokenize)
            layout = next(iter(base.text.layouts.values()))
            tpl = [core.prompts.tokenize_template(TEMPLATE, tokenize, layout)]
            sampling = core.meter.SamplingSettings(latent_shape=(4, 4, 4), kept_steps=2)
            meter = core.meter.DriftMeter(base, adapted, vocab, tpl, host.schedule_of(model, "normal", 10), sampling, runtime)
            logits = torch.zeros(len(vocab), requires_grad=True)
            one_hot = core.soft_prompt.gumbel_straight_through(logits, 1.0, torch.Generator().manual_seed(0))
            drift = meter.soft_backward(one_hot, [1, 2], sign=-1.0)
    assert torch.isfinite(drift).all() and (drift > 0).all()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert adapted.counts.unet_backward == 2 * 2 * 2  # seeds x steps x guided


def test_paper_mode_runs_and_counts_backward_passes(pack, sd15, sd15_planted):
    model, clip, _ = sd15
    report = audit(pack, model, clip, sd15_planted, mode="paper", top_k=2, opt_steps=4, patience=2)
    assert 1 <= len(report.entries) <= 2
    assert report.evaluations["adapted"]["unet_backward"] > 0
    assert report.evaluations["base"]["unet_backward"] == 0


# -- the input models come out as they went in ---------------------------------------------------
@pytest.mark.parametrize("mode", ["scan", "paper"])
def test_input_models_unchanged_after_a_run(pack, sd15, sd15_planted, mode):
    model, clip, _ = sd15
    before = fingerprint(model, clip), fingerprint(sd15_planted, clip)
    audit(pack, model, clip, sd15_planted, mode=mode, top_k=1, opt_steps=2)
    after = fingerprint(model, clip), fingerprint(sd15_planted, clip)
    assert_same(before[0], after[0])
    assert_same(before[1], after[1])


def test_input_models_unchanged_after_cancel(pack, sd15, sd15_planted):
    model, clip, _ = sd15
    before = fingerprint(model, clip), fingerprint(sd15_planted, clip)
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            audit(pack, model, clip, sd15_planted, mode="paper")
    finally:
        comfy.model_management.interrupt_current_processing(False)
    after = fingerprint(model, clip), fingerprint(sd15_planted, clip)
    assert_same(before[0], after[0])
    assert_same(before[1], after[1])


def test_same_seed_same_report(pack, sd15, sd15_planted):
    model, clip, _ = sd15
    a, b = (audit(pack, model, clip, sd15_planted, seed=3) for _ in range(2))
    assert [(e.token, e.per_seed) for e in a.entries] == [(e.token, e.per_seed) for e in b.entries]


def test_identical_models_flag_nothing(pack, sd15):
    model, clip, _ = sd15
    report = audit(pack, model, clip, model)
    assert not any(e.significant for e in report.entries)
    assert all(e.drift == 0.0 for e in report.entries)


# -- bad input: a clear error naming the input, nothing changed ----------------------------------
@pytest.mark.parametrize("kw, message", [
    (dict(templates="a photo of a cat"), "exactly one"),
    (dict(templates="{} next to {}"), "exactly one"),
    (dict(custom_words=" \n , "), "empty"),
    (dict(custom_words="tiger\n<|endoftext|>"), "not in the tokenizer's vocabulary"),
    (dict(width=36), "multiples of 8"),
    (dict(preset="quick", kept_steps=0), "at least 1"),
    (dict(mode="paper", opt_steps=0), "at least 1"),
])
def test_bad_input_is_a_clear_error_and_changes_nothing(pack, sd15, sd15_planted, kw, message):
    model, clip, _ = sd15
    before = fingerprint(model, clip)
    with pytest.raises(ValueError, match=message):
        audit(pack, model, clip, sd15_planted, **kw)
    assert_same(before, fingerprint(model, clip))


def test_different_architectures_are_refused(pack, sd15, sd2):
    with pytest.raises(ValueError, match="different architectures"):
        audit(pack, sd15[0], sd15[1], sd2[0], sd2[1])


def test_unsupported_family_is_named(pack, demo_models, sd15):
    import comfy.supported_models
    model, clip, _ = sd15
    other = model.clone()
    other.model = type(model.model).__new__(type(model.model))
    other.model.__dict__.update(model.model.__dict__)
    other.model.model_config = comfy.supported_models.SDXL(dict(comfy.supported_models.SDXL.unet_config, context_dim=64))
    with pytest.raises(ValueError, match="SDXL"):
        audit(pack, model, clip, other)


def test_nan_drift_names_the_setting_to_change(pack, sd15):
    model, clip, _ = sd15
    broken = model.clone()
    key = next(k for k in broken.model.state_dict() if k.endswith("attn2.to_k.weight"))
    w = broken.model.state_dict()[key]
    broken.add_patches({key: ("diff", (torch.full(w.shape, float("nan")),))}, 1.0)
    with pytest.raises(RuntimeError, match="precision"):
        audit(pack, model, clip, broken)


# -- the report and the evidence ---------------------------------------------------------------
def test_save_report_writes_json_and_csv_to_the_output_folder(pack, sd15, sd15_planted, tmp_path):
    model, clip, _ = sd15
    report = audit(pack, model, clip, sd15_planted, top_k=3)
    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    try:
        paths = pack.nodes.save_report.save_report(report, "driftscope/test")
    finally:
        folder_paths.set_output_directory(old)
    json_path, csv_path = map(__import__("pathlib").Path, paths)
    assert json_path.parent == tmp_path / "driftscope" and json_path.suffix == ".json"
    again = pack.driftscope_core.report.DriftReport.from_json(json_path.read_text())
    assert [e.token for e in again.entries] == [e.token for e in report.entries]
    assert csv_path.read_text().count("\n") == 1 + len(report.entries)


def test_evidence_grid_renders_pairs_of_the_top_words(pack, sd15, sd15_planted):
    model, clip, vae = sd15
    report = audit(pack, model, clip, sd15_planted, top_k=3)
    with torch.inference_mode():
        grid, pairs = pack.nodes.evidence.evidence_images(
            report, model, clip, sd15_planted, clip, vae, top_n=2, seed=0, steps=3, cfg=5.0,
            sampler_name="euler", scheduler="normal", width=0, height=0)
    assert pairs.shape == (4, 32, 32, 3) and grid.shape[0] == 1 and grid.shape[-1] == 3
    assert torch.isfinite(grid).all() and 0 <= float(grid.min()) and float(grid.max()) <= 1
    assert not torch.equal(pairs[0], pairs[1])  # a planted word's image changed


def test_text_encoder_is_shared_only_when_it_computes_the_same(pack, sd15):
    _, clip, _ = sd15
    same_text_encoder = pack.nodes.host.same_text_encoder
    assert same_text_encoder(clip, clip.clone())  # e.g. LoraLoader with a UNet-only LoRA
    patched = clip.clone()
    key = next(k for k in patched.patcher.model.state_dict() if k.endswith("layers.0.mlp.fc1.weight"))
    patched.add_patches({key: ("diff", (torch.ones_like(patched.patcher.model.state_dict()[key]),))}, 1.0)
    assert not same_text_encoder(clip, patched)
    skipped = clip.clone()
    skipped.clip_layer(-2)
    assert not same_text_encoder(clip, skipped)
