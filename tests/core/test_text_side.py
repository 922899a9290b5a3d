"""Vocabulary, templates and the soft prompt's gradient path (plain torch)."""
import pytest
import torch

from driftscope_core.prompts import PromptBuilder, TemplateError, parse_templates, tokenize_template
from driftscope_core.soft_prompt import SoftPrompt, candidate_embeddings, gumbel_straight_through, slot_rows
from driftscope_core.vocabulary import VocabularyError, build_vocabulary, from_bpe_vocab, from_words
from toy_models import LAYOUT, toy_text, toy_text_encoder, toy_tokenize


def test_bpe_vocabulary_keeps_alphabetic_whole_words_without_stop_words():
    bpe = {"dog</w>": 1, "cat</w>": 2, "the</w>": 3, "ab</w>": 4, "do": 5, "g3t</w>": 6, "zebra</w>": 7}
    vocab = from_bpe_vocab(bpe)
    assert [c.text for c in vocab.candidates] == ["dog", "cat", "zebra"]
    assert vocab[0].token_ids == (1,)


def test_all_filtered_vocabulary_is_a_clear_error():
    with pytest.raises(VocabularyError, match="filtered out"):
        from_bpe_vocab({"the</w>": 1, "a</w>": 2})


def test_multi_token_words_are_kept_whole_and_duplicates_dropped():
    vocab = from_words(["w001", "xx", "W001", "", "w002"], toy_tokenize)
    assert [c.text for c in vocab.candidates] == ["w001", "xx", "w002"]
    assert vocab[1].token_ids == (150, 151)


def test_unknown_words_and_empty_lists_name_the_problem():
    with pytest.raises(VocabularyError, match="'zzz'"):
        from_words(["w001", "zzz"], toy_tokenize)
    with pytest.raises(VocabularyError, match="empty"):
        build_vocabulary("custom", toy_tokenize, {}, custom_words="\n ,\n")
    with pytest.raises(VocabularyError, match="unknown vocabulary"):
        build_vocabulary("nope", toy_tokenize, {})


@pytest.mark.parametrize("bad", ["a photo of a", "{} and {}", "a photo of a{}", ""])
def test_templates_need_exactly_one_free_slot(bad):
    with pytest.raises(TemplateError, match="template"):
        parse_templates(bad)


def test_several_templates_one_per_line():
    assert parse_templates("a photo of a {}\n\n  a painting of {} , dark  \n") == ["a photo of a {}", "a painting of {} , dark"]


def test_prompt_builder_places_the_word_and_the_text_side_masks_the_slot():
    text = toy_text()
    tpl = tokenize_template("a photo of a {} today", toy_tokenize, LAYOUT)
    b = PromptBuilder(tpl, LAYOUT)
    prompt = b.prompt((150, 151))
    ids = prompt.ids()
    assert ids[:7] == [LAYOUT.start, *toy_tokenize("a photo of a"), 150, 151] and len(ids) == LAYOUT.max_length
    assert ids[7:9] == [*toy_tokenize("today"), LAYOUT.end] and set(ids[9:]) == {LAYOUT.pad}
    assert torch.equal(text.input_embeddings(prompt), text.encoder.token_embedding[torch.tensor(ids)])
    cond = text.encode([{"clip": prompt}])
    assert cond.slot_mask[0].tolist() == [1.0 if i in (5, 6) else 0.0 for i in range(LAYOUT.max_length)]


def test_slot_rows_in_place_of_ids_give_the_same_conditioning_and_a_gradient():
    text = toy_text()
    b = PromptBuilder(tokenize_template("a photo of a {}", toy_tokenize, LAYOUT), LAYOUT)
    rows = text.token_embedding("clip")[torch.tensor([150, 151])].clone().requires_grad_(True)  # (2, D)
    by_rows = text.encode([{"clip": b.prompt(rows)}])
    by_ids = text.encode([{"clip": b.prompt((150, 151))}])
    assert torch.allclose(by_rows.context, by_ids.context, atol=1e-6)
    assert torch.equal(by_rows.slot_mask, by_ids.slot_mask)
    by_rows.context.abs().sum().backward()
    assert torch.isfinite(rows.grad).all() and rows.grad.abs().sum() > 0


def test_straight_through_sample_is_one_hot_with_finite_nonzero_gradient():
    logits = torch.zeros(5, requires_grad=True)
    y = gumbel_straight_through(logits, 1.0, torch.Generator().manual_seed(0))
    assert sorted(y.detach().tolist()) == [0, 0, 0, 0, 1]
    (y * torch.arange(5.0)).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_slot_rows_are_exact_in_forward_and_reach_every_candidate_in_backward():
    enc = toy_text_encoder()
    vocab = from_words(["w001", "xx", "w002"], toy_tokenize)
    rows, lengths = candidate_embeddings(vocab, enc.token_embedding)
    one_hot = torch.tensor([0.0, 1.0, 0.0], requires_grad=True)
    out = slot_rows(one_hot, rows, lengths)
    assert torch.equal(out, enc.token_embedding[torch.tensor([150, 151])])
    out.sum().backward()
    assert (one_hot.grad != 0).all()


def test_soft_prompt_is_float32_and_seeded():
    a, b = SoftPrompt(7, seed=3), SoftPrompt(7, seed=3)
    assert a.logits.dtype == torch.float32 and torch.equal(a.logits, b.logits)
