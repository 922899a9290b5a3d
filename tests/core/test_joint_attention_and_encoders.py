"""What the core learned for the joint-attention families (Flux): text encoders with their own
tokenizers (per-encoder ids, templates and layouts without a start token), slot masks from
several context parts, and the slot map of a joint softmax over [text | image] tokens."""
import pytest
import torch

from driftscope_core.attention import SlotAttentionProbe, joint_slot_map
from driftscope_core.conditioning import slot_mask
from driftscope_core.prompts import PromptBuilder, TokenLayout, tokenize_template_per_encoder
from driftscope_core.soft_prompt import candidate_embeddings
from driftscope_core.vocabulary import VocabularyError, from_words

T5_LAYOUT = TokenLayout(start=None, end=1, pad=0, max_length=12)
CLIP_LAYOUT = TokenLayout(start=100, end=101, pad=101, max_length=8)
CLIP_IDS = {"a": [10], "photo": [11], "of": [12], "tiger": [13], "sea lion": [14, 15], "x": [16]}
T5_PIECES = {"a": [3], "photo": [4], "of": [5], "tiger": [6, 7, 8], "sea": [9], "lion": [20, 21], "x": [2]}  # 2: unknown


def clip_tokenize(text):
    return CLIP_IDS[text] if text in CLIP_IDS else [i for w in text.split() for i in CLIP_IDS[w]]


def t5_tokenize(text):
    return [i for w in text.split() for i in T5_PIECES[w]]


def test_words_get_their_own_ids_in_a_second_tokenizer_and_unknown_ones_are_dropped():
    vocab = from_words(["tiger", "sea lion", "x"], clip_tokenize)
    both = vocab.with_encoder_ids("t5", t5_tokenize, reserved_ids={2})
    assert [c.text for c in both.candidates] == ["tiger", "sea lion"]  # "x" is T5's unknown token
    assert both[0].ids("t5") == (6, 7, 8) and both[0].ids("l") == (13,) == both[0].token_ids
    assert both.max_tokens_for("t5") == 3 and both.max_tokens == 2
    with pytest.raises(VocabularyError, match="T5"):
        from_words(["x"], clip_tokenize).with_encoder_ids("t5", t5_tokenize, {2}, tokenizer_name="T5")


def test_templates_per_encoder_and_a_layout_without_start_token():
    tpl = tokenize_template_per_encoder("a photo of a {}", {"l": (clip_tokenize, CLIP_LAYOUT, 2),
                                                            "t5": (t5_tokenize, T5_LAYOUT, 4)})
    assert tpl.prefix_ids == (10, 11, 12, 10) and tpl.for_encoder("t5").prefix_ids == (3, 4, 5, 3)
    t5 = PromptBuilder(tpl.for_encoder("t5"), T5_LAYOUT).prompt((6, 7, 8))
    assert t5.ids() == [3, 4, 5, 3, 6, 7, 8, 1, 0, 0, 0, 0]  # no start token; end, then padding to the length
    assert list(t5.slot_positions) == [4, 5, 6]
    clip = PromptBuilder(tpl.for_encoder("l"), CLIP_LAYOUT).prompt((13,))
    assert clip.ids() == [100, 10, 11, 12, 10, 13, 101, 101]


def test_slot_mask_from_context_parts_marks_every_place_the_slot_sits():
    tpl = tokenize_template_per_encoder("a {}", {"l": (clip_tokenize, CLIP_LAYOUT, 1), "t5": (t5_tokenize, T5_LAYOUT, 3)})
    prompt = {"l": PromptBuilder(tpl.for_encoder("l"), CLIP_LAYOUT).prompt((13,)),
              "t5": PromptBuilder(tpl.for_encoder("t5"), T5_LAYOUT).prompt((6, 7, 8))}
    flux = slot_mask([prompt], (("t5", 0),), 12)
    assert flux[0].nonzero().flatten().tolist() == [1, 2, 3]
    sd3 = slot_mask([prompt], (("l", 0), ("t5", 8)), 20)  # CLIP part then T5 part: the slot twice
    assert sd3[0].nonzero().flatten().tolist() == [2, 9, 10, 11]


def test_candidate_rows_per_encoder_use_that_encoders_ids():
    vocab = from_words(["tiger", "sea lion"], clip_tokenize).with_encoder_ids("t5", t5_tokenize)
    table = torch.arange(30.0)[:, None].repeat(1, 2)  # row i = (i, i)
    rows, lengths = candidate_embeddings(vocab, table, "t5")
    assert lengths.tolist() == [3, 3] and rows[:, :, 0].tolist() == [[6, 7, 8], [9, 20, 21]]


def _joint(batch=2, heads=3, text=5, image=7, dh=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, text + image, dh, generator=g), torch.randn(batch, heads, text + image, dh, generator=g))


def test_joint_slot_map_is_the_image_rows_of_the_joint_softmax_at_the_slot_columns():
    q, k = _joint()
    mask = torch.zeros(1, 5)
    mask[0, 1:3] = 1.0  # a two-piece word; only the first (conditional) batch row is read
    probs = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)  # (B, H, L, L), dh 4
    want = probs[:1, :, 5:, 1:3].mean(dim=-1).mean(dim=1)  # (1, N): mean over the word's pieces, then heads
    for chunk in (1, 13, 10**9):  # one query row at a time, a few, everything at once
        torch.testing.assert_close(joint_slot_map(q, k, mask, chunk_elements=chunk), want)


def test_probe_records_joint_calls_of_the_highest_resolution_and_keeps_the_gradient():
    q, k = _joint()
    q.requires_grad_(True)
    mask = torch.zeros(2, 5)
    mask[:, 0] = 1.0
    probe = SlotAttentionProbe(mask)
    probe.joint(q, k)
    probe.joint(*_joint(image=3, seed=1))  # fewer image queries: not recorded
    probe.joint(*_joint(seed=2))
    maps = probe.stacked()
    assert maps.shape == (2, 2, 7)
    maps.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
