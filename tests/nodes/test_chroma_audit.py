"""Chroma through the pack: ComfyUI's own T5 with nothing padded (every prompt's context as long
as its tokens), real CFG with the empty prompt as its own model call, and the audit on tiny
in-process Chroma models (scripts/demo_models.tiny_chroma)."""
import pytest
import torch

from audit_helpers import (TEMPLATE, WORDS, assert_paper_mode_leaves_models_unchanged, audit, family_prompts,
                           pack_first_x0, stock_first_x0)

SIZE = 64
PLANTED = ("bicycle", "castle", "violin")  # one T5 piece each (see test_flux_audit.py)


@pytest.fixture(scope="module")
def chroma(demo_models):
    return demo_models.tiny_chroma(0)


@pytest.fixture(scope="module")
def chroma_planted(demo_models, chroma):
    model, clip, _ = chroma
    return demo_models.flux_planted_edit(model, clip, PLANTED, WORDS, TEMPLATE)[0]


def chroma_audit(pack, base, clip, adapted, **kw):
    return audit(pack, base, clip, adapted, None, **{"width": SIZE, "height": SIZE, "scheduler": "simple", **kw})


def _prompts(pack, clip, family, text, words):
    vocab, by_ids, _ = family_prompts(pack, clip, family, text, words)
    return vocab, by_ids


def test_chroma_text_side_is_comfyuis_encode_at_every_length(pack, chroma):
    """Each word's context equals encode_from_tokens of its filled prompt, as long as its T5
    tokens (no padding); the empty prompt is the bare end token."""
    core, host = pack.driftscope_core, pack.nodes.host
    model, clip, _ = chroma
    family = host.check_pair(model, model, clip, clip)
    assert family.name == "Chroma" and family.sampling_defaults(model) == {"cfg": 4.0, "guidance": None}
    with torch.inference_mode():
        text = host.ComfyText(clip, family, "clip")
        assert list(text.layouts) == ["t5"] and not text.layouts["t5"].padded
        vocab, prompts = _prompts(pack, clip, family, text, ["tiger", "castle", "aquarium fish"])
        lengths = set()
        for cand, prompt in zip(vocab.candidates, prompts):
            ours = text.encode([prompt])
            ref = clip.encode_from_tokens(clip.tokenize(TEMPLATE.format(cand.text)), return_dict=True)
            assert [int(t) for t, _ in clip.tokenize(TEMPLATE.format(cand.text))["t5xxl"][0]] == prompt["t5"].ids()
            assert ref["pooled_output"] is None and ours.extras == {}
            torch.testing.assert_close(ours.context, ref["cond"].float(), atol=1e-5, rtol=1e-4)
            lengths.add(ours.context.shape[1])
        assert len(lengths) == 3  # three words, three context lengths
        uncond = core.models.ModelSide("base", text, None).empty_prompt()
        torch.testing.assert_close(uncond.context, clip.encode_from_tokens(clip.tokenize(""), return_dict=True)["cond"].float())
        assert uncond.context.shape[1] == 1


def test_chroma_x0_equals_the_stock_sampler_with_real_cfg(pack, chroma):
    """At CFG 4 the conditional and unconditional contexts differ in length; the pack runs them
    as two calls and its x0 equals CFGGuider + euler's first step from the same noise."""
    core, host = pack.driftscope_core, pack.nodes.host
    model, clip, _ = chroma
    family = host.check_pair(model, model, clip, clip)
    noise = core.sampling.make_noise([3], (16, SIZE // 8, SIZE // 8))
    with torch.inference_mode():
        ours, sigmas = pack_first_x0(pack, family, model, clip, "castle", noise, 4.0)
        stock = stock_first_x0(model, clip, TEMPLATE.format("castle"), noise, sigmas, 4.0, seed=3)
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-4)


def test_chroma_planted_words_on_top_among_words_of_every_length(pack, chroma, chroma_planted):
    model, clip, _ = chroma
    report = chroma_audit(pack, model, clip, chroma_planted, mode="screen")
    assert {e.token for e in report.entries[:3]} == set(PLANTED), report.table()
    assert all(e.significant for e in report.entries[:3])
    assert report.models["family"] == "Chroma" and report.settings["cfg"] == 4.0
    # WORDS holds words of one, two ("aquarium fish") and three ("tiger") T5 pieces
    scan = chroma_audit(pack, model, clip, chroma_planted, mode="scan", top_k=31)
    assert {e.token for e in scan.entries[:3]} == set(PLANTED)
    assert {"tiger", "aquarium fish"} <= {e.token for e in scan.entries}


def test_chroma_paper_mode_leaves_the_models_as_they_were(pack, chroma, chroma_planted):
    model, clip, _ = chroma
    assert_paper_mode_leaves_models_unchanged(pack, model, clip, chroma_planted, width=SIZE, height=SIZE,
                                              scheduler="simple")


def test_chroma_refuses_clip_words_with_the_reason(pack, chroma):
    model, clip, _ = chroma
    with pytest.raises(ValueError, match=r"vocabulary: clip_words .* Chroma reads T5 only"):
        chroma_audit(pack, model, clip, model, vocabulary="clip_words")
