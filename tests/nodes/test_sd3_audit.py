"""SD3 / SD3.5 through the pack: ComfyUI's own CLIP-L + CLIP-G + T5 text side, the context that
holds the prompt twice (CLIP rows 0-76, T5 rows 77-153), MMDiT joint attention received as
(B, L, H*D), and the audit on tiny in-process models (scripts/demo_models.tiny_sd3)."""
import pytest
import torch

from audit_helpers import (TEMPLATE, WORDS, assert_paper_mode_leaves_models_unchanged, audit, family_prompts,
                           pack_first_x0, stock_first_x0)

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
    return family_prompts(pack, clip, family, text, words)[1:]


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
    noise = core.sampling.make_noise([5], (16, SIZE // 8, SIZE // 8))
    with torch.inference_mode():
        ours, sigmas = pack_first_x0(pack, family, model, clip, "castle", noise, 4.5)
        stock = stock_first_x0(model, clip, TEMPLATE.format("castle"), noise, sigmas, 4.5, seed=5)
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-4)


def test_sd3_planted_words_on_top_and_flagged(pack, sd3, sd3_planted):
    model, clip, _ = sd3
    report = sd3_audit(pack, model, clip, sd3_planted, mode="screen")
    assert {e.token for e in report.entries[:3]} == set(PLANTED), report.table()
    assert all(e.significant for e in report.entries[:3])
    assert report.models["family"] == "SD3.5" and report.settings["cfg"] == 4.5
    assert all(e.encoder_token_ids["t5"] for e in report.entries)


def test_sd3_paper_mode_leaves_the_models_as_they_were(pack, sd3, sd3_planted):
    model, clip, _ = sd3
    assert_paper_mode_leaves_models_unchanged(pack, model, clip, sd3_planted, width=SIZE, height=SIZE, scheduler="simple")
