"""SD3 / SD3.5 through the pack: ComfyUI's own CLIP-L + CLIP-G + T5 text side, the context that
holds the prompt twice (CLIP rows 0-76, T5 rows 77-153), MMDiT joint attention received as
(B, L, H*D), and the audit on tiny in-process models (scripts/demo_models.tiny_sd3)."""
import pytest
import torch

import comfy.model_management
import comfy.samplers

from audit_helpers import TEMPLATE, WORDS, audit

SIZE = 64
PLANTED = ("bicycle", "castle", "violin")


@pytest.fixture(scope="module")
def sd3(demo_models):
    return demo_models.tiny_sd3(0)


@pytest.fixture(scope="module")
def sd3_planted(demo_models, sd3):
    model, clip, _ = sd3
    return demo_models.sd3_planted_edit(model, clip, PLANTED, WORDS, TEMPLATE)[0]


def sd3_audit(pack, base, clip, adapted, **kw):
    return audit(pack, base, clip, adapted, None, **{"width": SIZE, "height": SIZE, "scheduler": "simple", **kw})


def _prompts(pack, clip, family, text, words):
    core, host, node = pack.driftscope_core, pack.nodes.host, pack.nodes.audit
    tokenize, _, reserved = host.tokenizer_functions(clip, family)
    vocab = node.family_vocabulary(core.vocabulary.from_words(words, tokenize, reserved_ids=reserved), clip, family)
    tpl, = node.family_templates([TEMPLATE], clip, family, text, vocab)
    builders = {n: core.prompts.PromptBuilder(tpl.for_encoder(n), lay) for n, lay in text.layouts.items()}
    by_ids = [{n: b.prompt(c.ids(n)) for n, b in builders.items()} for c in vocab.candidates]
    by_rows = [{n: b.prompt(text.token_embedding(n)[torch.tensor(c.ids(n))]) for n, b in builders.items()}
               for c in vocab.candidates]
    return by_ids, by_rows


@pytest.mark.parametrize("with_t5", [True, False])
def test_sd3_text_side_is_comfyuis_encode_with_the_slot_twice(pack, demo_models, sd3, with_t5):
    """Context (CLIP-L ⊕ CLIP-G padded to 4096, then T5's 77 rows) and pooled vector equal
    encode_from_tokens, slot as ids and as rows; the slot mask marks the word in both parts (in
    the CLIP part only without T5)."""
    host = pack.nodes.host
    model, clip, _ = sd3 if with_t5 else demo_models.tiny_sd3(0, t5=False)
    family = host.check_pair(model, model, clip, clip)
    assert family.name == "SD3.5" and family.sampling_defaults(model)["cfg"] == 4.5
    with torch.inference_mode():
        text = host.ComfyText(clip, family, "clip")
        assert set(text.layouts) == ({"l", "g", "t5"} if with_t5 else {"l", "g"})
        words = ["tiger", "castle", "aquarium fish"]
        by_ids, by_rows = _prompts(pack, clip, family, text, words)
        ours_ids, ours_rows = text.encode(by_ids), text.encode(by_rows)
        for i, word in enumerate(words):
            ref = clip.encode_from_tokens(clip.tokenize(TEMPLATE.format(word)), return_dict=True)
            for ours in (ours_ids, ours_rows):
                assert ours.context[i:i + 1].shape == ref["cond"].shape == (1, 154 if with_t5 else 77, 4096)
                torch.testing.assert_close(ours.context[i:i + 1], ref["cond"].float(), atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(ours.extras["pooled"][i:i + 1], ref["pooled_output"].float(), atol=1e-5, rtol=1e-4)
            rows = ours_ids.slot_mask[i].nonzero().flatten().tolist()
            assert rows == demo_models.sd3_slot_positions(clip, TEMPLATE, word)
            assert (min(rows) < 77 and max(rows) >= 77) == with_t5


def test_sd3_x0_equals_the_stock_sampler(pack, sd3):
    core, host = pack.driftscope_core, pack.nodes.host
    model, clip, _ = sd3
    family = host.check_pair(model, model, clip, clip)
    with torch.inference_mode():
        runtime = host.runtime_for("fp32", 4, False)
        base, _ = host.model_sides(family, model, clip, model, clip, runtime, need_grad=False)
        by_ids, _ = _prompts(pack, clip, family, base.text, ["castle"])
        cond, uncond = base.encode(by_ids), base.empty_prompt()
        schedule = host.schedule_of(model, "simple", 10)
        noise = core.sampling.make_noise([5], (16, SIZE // 8, SIZE // 8))
        ours, _ = core.objective._guided_x0(base, noise * schedule.initial_scale, schedule.sigmas[0], cond, uncond, 4.5,
                                            False, runtime)
        seen = {}
        guider = comfy.samplers.CFGGuider(model)
        enc = lambda t: clip.encode_from_tokens_scheduled(clip.tokenize(t))  # noqa: E731
        guider.set_conds(enc(TEMPLATE.format("castle")), enc(""))
        guider.set_cfg(4.5)
        guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), schedule.sigmas[:2],
                      callback=lambda step, x0, x, total: seen.setdefault(step, x0.clone()), disable_pbar=True, seed=5)
    torch.testing.assert_close(ours, seen[0].float(), atol=1e-5, rtol=1e-4)


def test_sd3_planted_words_on_top_and_flagged(pack, sd3, sd3_planted):
    model, clip, _ = sd3
    report = sd3_audit(pack, model, clip, sd3_planted, mode="screen")
    assert {e.token for e in report.entries[:3]} == set(PLANTED), report.table()
    assert all(e.significant for e in report.entries[:3])
    assert report.models["family"] == "SD3.5" and report.settings["cfg"] == 4.5
    assert all(e.encoder_token_ids["t5"] for e in report.entries)


def test_sd3_paper_mode_leaves_the_models_as_they_were(pack, sd3, sd3_planted):
    model, clip, _ = sd3

    def fingerprint(m):
        with torch.inference_mode():
            out = clip.encode_from_tokens(clip.tokenize("a photo of a castle"), return_dict=True)
            comfy.model_management.load_models_gpu([m])
            x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
            conds = m.model.extra_conds(cross_attn=out["cond"], pooled_output=out["pooled_output"], device=x.device, noise=x)
            return m.model.apply_model(x, torch.tensor([0.7]), **{k: c.cond for k, c in conds.items()}).clone()

    before = fingerprint(model), fingerprint(sd3_planted)
    report = sd3_audit(pack, model, clip, sd3_planted, mode="paper", top_k=1, opt_steps=2)
    assert report.evaluations["adapted"]["unet_backward"] > 0
    assert all(torch.equal(a, b) for a, b in zip(before, (fingerprint(model), fingerprint(sd3_planted))))
