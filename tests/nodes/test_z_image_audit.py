"""Z-Image through the pack: ComfyUI's own Qwen3 text side with its chat template kept in the
context, the main layers' joint attention over padded [caption | image] tokens (the refiner
passes left out), and the audit on tiny in-process models (scripts/demo_models.tiny_z_image)."""
import pytest
import torch

import comfy.model_management

from audit_helpers import (TEMPLATE, WORDS, assert_paper_mode_leaves_models_unchanged, audit, family_prompts,
                           pack_first_x0, stock_first_x0)

SIZE = 64
PLANTED = ("bicycle", "castle", "violin")


@pytest.fixture(scope="module")
def zimage(demo_models):
    return demo_models.tiny_z_image(0)


@pytest.fixture(scope="module")
def zimage_planted(demo_models, zimage):
    model, clip, _ = zimage
    return demo_models.z_image_planted_edit(model, clip, PLANTED, WORDS, TEMPLATE)[0]


def z_audit(pack, base, clip, adapted, **kw):
    return audit(pack, base, clip, adapted, None, **{"width": SIZE, "height": SIZE, "scheduler": "simple", **kw})


def _prompts(pack, clip, family, text, words):
    return family_prompts(pack, clip, family, text, words)[1:]


def test_z_image_text_side_is_comfyuis_encode_with_the_template_kept(pack, demo_models, zimage):
    host = pack.nodes.host
    model, clip, _ = zimage
    family = host.check_pair(model, model, clip, clip)
    assert family.name == "Z-Image" and family.sampling_defaults(model)["cfg"] == 1.0
    with torch.inference_mode():
        text = host.ComfyText(clip, family, "clip")
        head, tail, cut = text.templates["qwen"]
        assert cut == 0 and head  # the template's head stays in the context
        by_ids, by_rows = _prompts(pack, clip, family, text, ["castle", "aquarium fish"])
        for i, word in enumerate(["castle", "aquarium fish"]):
            comfy_ids = [int(t) for t, *_ in clip.tokenize(TEMPLATE.format(word))["qwen3_4b"][0]]
            assert [*head, *by_ids[i]["qwen"].ids(), *tail] == comfy_ids
            ref = clip.encode_from_tokens(clip.tokenize(TEMPLATE.format(word)), return_dict=True)["cond"].float()
            for prompts in (by_ids, by_rows):
                ours = text.encode([prompts[i]])
                torch.testing.assert_close(ours.context, ref, atol=1e-5, rtol=1e-4)
                assert ours.slot_mask[0].nonzero().flatten().tolist() == demo_models.z_image_slot_positions(clip, TEMPLATE, word)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_z_image_x0_equals_the_stock_sampler(pack, zimage, cfg):
    """At Z-Image Turbo's CFG 1 and at a real CFG (negative of another length) the pack's x0
    equals CFGGuider + euler's first step."""
    core, host = pack.driftscope_core, pack.nodes.host
    model, clip, _ = zimage
    family = host.check_pair(model, model, clip, clip)
    noise = core.sampling.make_noise([5], (16, SIZE // 8, SIZE // 8))
    with torch.inference_mode():
        ours, sigmas = pack_first_x0(pack, family, model, clip, "castle", noise, cfg)
        stock = stock_first_x0(model, clip, TEMPLATE.format("castle"), noise, sigmas, cfg, seed=5)
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-4)


def test_z_image_probe_reads_the_main_layers_image_rows(pack, zimage):
    """The probe records the two main layers (not the caption and image refiners), with the
    image queries after the caption padded to 32 tokens: its maps equal the slot slice of the
    softmax computed from the q, k ComfyUI's attention receives there."""
    core, host = pack.driftscope_core, pack.nodes.host
    model, clip, _ = zimage
    family = host.check_pair(model, model, clip, clip)
    with torch.inference_mode():
        runtime = host.runtime_for("fp32", 4, False)
        base, _ = host.model_sides(family, model, clip, model, clip, runtime, need_grad=False)
        by_ids, _ = _prompts(pack, clip, family, base.text, ["castle"])
        cond = base.encode(by_ids)
        x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(1))
        wanted = []

        def reference(func, q, k, v, heads, *args, **kwargs):
            if q.shape[2] == 64:  # 13 caption tokens padded to 32, 16 image tokens padded to 32
                probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
                w = cond.slot_mask / cond.slot_mask.sum(1, keepdim=True)
                wanted.append(torch.einsum("bhnt,bt->bn", probs[:, :, 32:48, : w.shape[1]], w) / heads)
            return func(q, k, v, heads, *args, **kwargs)

        comfy.model_management.load_models_gpu([model])
        inputs = base.denoiser.model_inputs(x, cond)
        model.model.apply_model(x, torch.tensor([0.8]), transformer_options={"optimized_attention_override": reference},
                                **inputs)
        probe = core.attention.SlotAttentionProbe(cond.slot_mask)
        base.denoiser(x, torch.tensor([0.8]), cond, probe)
    assert cond.context.shape[1] == 13 and len(wanted) == 2
    torch.testing.assert_close(probe.stacked(), torch.stack(wanted, dim=1), atol=1e-6, rtol=1e-5)


def test_z_image_planted_words_on_top(pack, zimage, zimage_planted):
    model, clip, _ = zimage
    report = z_audit(pack, model, clip, zimage_planted, mode="screen")
    assert {e.token for e in report.entries[:3]} == set(PLANTED), report.table()
    assert sum(e.significant for e in report.entries[:3]) >= 2
    assert report.models["family"] == "Z-Image" and report.settings["cfg"] == 1.0


def test_z_image_paper_mode_leaves_the_models_as_they_were(pack, zimage, zimage_planted):
    model, clip, _ = zimage
    assert_paper_mode_leaves_models_unchanged(pack, model, clip, zimage_planted, width=SIZE, height=SIZE,
                                              scheduler="simple")
