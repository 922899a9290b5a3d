"""Qwen-Image through the pack: ComfyUI's own Qwen2.5-VL text side with its chat template (the
system part dropped from the output as ComfyUI drops it), byte-level BPE words, one-frame video
latents, real CFG, and the audit on tiny in-process models (scripts/demo_models.tiny_qwen_image)."""
import pytest
import torch

from audit_helpers import (TEMPLATE, WORDS, assert_paper_mode_leaves_models_unchanged, audit, family_prompts,
                           pack_first_x0, stock_first_x0)

SIZE = 64
PLANTED = ("bicycle", "castle", "violin")


@pytest.fixture(scope="module")
def qwen(demo_models):
    return demo_models.tiny_qwen_image(0)


@pytest.fixture(scope="module")
def qwen_planted(demo_models, qwen):
    model, clip, _ = qwen
    return demo_models.qwen_planted_edit(model, clip, PLANTED, WORDS, TEMPLATE)[0]


def qwen_audit(pack, base, clip, adapted, **kw):
    return audit(pack, base, clip, adapted, None, **{"width": SIZE, "height": SIZE, "scheduler": "simple", **kw})


def _prompts(pack, clip, family, text, words):
    return family_prompts(pack, clip, family, text, words)


def test_qwen_text_side_is_comfyuis_encode_with_the_chat_template(pack, demo_models, qwen):
    """The chat template around each prompt is the one ComfyUI's tokenizer writes, and the context
    (what QwenImageTEModel keeps: the user's text on) equals encode_from_tokens, slot as ids and as
    rows; the slot mask marks the word's tokens (" word" in byte-level BPE)."""
    host = pack.nodes.host
    model, clip, _ = qwen
    family = host.check_pair(model, model, clip, clip)
    assert family.name == "Qwen-Image" and family.sampling_defaults(model)["cfg"] == 2.5
    with torch.inference_mode():
        text = host.ComfyText(clip, family, "clip")
        head, tail, cut = text.templates["qwen"]
        _, by_ids, by_rows = _prompts(pack, clip, family, text, ["castle", "aquarium fish"])
        for i, word in enumerate(["castle", "aquarium fish"]):
            comfy_ids = [int(t) for t, *_ in clip.tokenize(TEMPLATE.format(word))["qwen25_7b"][0]]
            assert [*head, *by_ids[i]["qwen"].ids(), *tail] == comfy_ids
            ref = clip.encode_from_tokens(clip.tokenize(TEMPLATE.format(word)), return_dict=True)["cond"].float()
            for prompts in (by_ids, by_rows):
                ours = text.encode([prompts[i]])
                torch.testing.assert_close(ours.context, ref, atol=1e-5, rtol=1e-4)
                assert ours.slot_mask[0].nonzero().flatten().tolist() == demo_models.qwen_slot_positions(clip, TEMPLATE, word)
        uncond = pack.driftscope_core.models.ModelSide("base", text, None).empty_prompt()
        ref = clip.encode_from_tokens(clip.tokenize(""), return_dict=True)["cond"].float()
        torch.testing.assert_close(uncond.context, ref, atol=1e-5, rtol=1e-4)


def test_qwen_x0_equals_the_stock_sampler(pack, qwen):
    """On one-frame video latents (B, 16, 1, h, w), at Qwen-Image's CFG 2.5 (positive and negative
    of different lengths), the pack's x0 equals CFGGuider + euler's first step."""
    core, host = pack.driftscope_core, pack.nodes.host
    model, clip, _ = qwen
    family = host.check_pair(model, model, clip, clip)
    noise = core.sampling.make_noise([5], (16, SIZE // 8, SIZE // 8))  # (1, 16, 8, 8)
    with torch.inference_mode():
        ours, sigmas = pack_first_x0(pack, family, model, clip, "castle", noise, 2.5)
        stock = stock_first_x0(model, clip, TEMPLATE.format("castle"), noise.unsqueeze(2), sigmas, 2.5, seed=5)
    torch.testing.assert_close(ours, stock.squeeze(2), atol=1e-5, rtol=1e-4)  # (1, 16, 1, 8, 8) -> (1, 16, 8, 8)


def test_qwen_planted_words_on_top_and_flagged(pack, qwen, qwen_planted):
    model, clip, _ = qwen
    report = qwen_audit(pack, model, clip, qwen_planted, mode="screen")
    assert {e.token for e in report.entries[:3]} == set(PLANTED), report.table()
    assert all(e.significant for e in report.entries[:3])
    assert report.models["family"] == "Qwen-Image" and report.settings["cfg"] == 2.5
    again = qwen_audit(pack, model, clip, qwen_planted, mode="screen")
    assert [(e.token, e.drift) for e in again.entries] == [(e.token, e.drift) for e in report.entries]


def test_qwen_paper_mode_leaves_the_models_as_they_were(pack, qwen, qwen_planted):
    model, clip, _ = qwen
    assert_paper_mode_leaves_models_unchanged(pack, model, clip, qwen_planted, latent_shape=(1, 16, 1, 8, 8),
                                              width=SIZE, height=SIZE, scheduler="simple")


@pytest.mark.parametrize("template", ["{} in the snow", "a photo of a({})"])
def test_qwen_template_with_the_slot_not_after_a_space_is_refused(pack, qwen, template):
    model, clip, _ = qwen
    with pytest.raises(ValueError, match=r"templates: .*put the slot after a space"):
        qwen_audit(pack, model, clip, model, templates=template)


def test_qwen_text_gradient_matches_finite_differences(pack, qwen):
    """Paper mode's gradient through ComfyUI's Qwen2.5-VL (whose blocks add in place with out=
    on 0.33: compat.differentiable_text_encoder) agrees with a central finite difference."""
    host = pack.nodes.host
    model, clip, _ = qwen
    family = host.check_pair(model, model, clip, clip)
    with torch.inference_mode():
        with torch.inference_mode(False), torch.enable_grad():
            text = host.ComfyText(clip, family, "clip", grad_clip=host.grad_ready_clip(clip))
            _, by_ids, _ = _prompts(pack, clip, family, text, ["castle"])
            row = text.token_embedding("qwen")[by_ids[0]["qwen"].slot[0]].clone()[None]  # (1, 64)
            weights = torch.randn(1, 10, 64, generator=torch.Generator().manual_seed(0))  # "a photo of a castle" + the template end

            def loss(r):
                p = {"qwen": pack.driftscope_core.prompts.SlotPrompt(by_ids[0]["qwen"].head, r, by_ids[0]["qwen"].tail)}
                return (text.encode([p]).context * weights).sum()

            leaf = row.clone().requires_grad_(True)
            loss(leaf).backward()
            h = 1e-3
            e = torch.zeros_like(row)
            e[0, 3] = h
            with torch.no_grad():
                fd = (loss(row + e) - loss(row - e)) / (2 * h)
    assert abs(leaf.grad[0, 3].item() - fd.item()) <= 0.02 * abs(fd.item()) + 1e-4
