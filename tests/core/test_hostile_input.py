"""Hostile text in word lists, templates and settings: a clear error that names the input and
quotes it shortened, or normal handling, in bounded time, and the tokenizer never sees what
is refused."""
import re
import time

import pytest

from driftscope_core.prompts import MAX_TEMPLATE_CHARS, TemplateError, parse_templates, tokenize_template
from driftscope_core.settings import AuditSettings, settings_from_preset
from driftscope_core.vocabulary import MAX_WORD_CHARS, MAX_WORDS, VocabularyError, build_vocabulary, from_words
from toy_models import LAYOUT, toy_tokenize

RAW_HIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


class CountingTokenizer:
    """A fake tokenizer: one id per whitespace-separated piece; records the text it was given."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, text: str) -> list[int]:
        self.calls.append(text)
        return [hash(piece) % 1000 for piece in text.split()]


def custom(text: str, tokenize=None):
    return build_vocabulary("custom", tokenize or CountingTokenizer(), {}, custom_words=text)


def error_of(kind, fn, *args, **kw) -> str:
    with pytest.raises(kind) as info:
        fn(*args, **kw)
    return str(info.value)


def assert_short_clean_message(message: str, names: str, limit: int = 1_000):
    assert message.startswith(names), message
    assert len(message) <= limit, len(message)
    assert not RAW_HIDDEN.search(message), message


# -- word lists ----------------------------------------------------------------------------------
def test_a_20000_line_list_is_read_in_bounded_time():
    tok = CountingTokenizer()
    start = time.perf_counter()
    vocab = custom("\n".join(f"word{i}" for i in range(20_000)), tok)
    seconds = time.perf_counter() - start
    assert len(vocab) == 20_000 and len(tok.calls) == 20_000
    assert seconds < 5.0, seconds  # about 0.05 s on the project's CPU


def test_a_list_past_the_limit_is_refused_before_tokenizing():
    tok = CountingTokenizer()
    start = time.perf_counter()
    message = error_of(VocabularyError, custom, "\n".join(f"word{i}" for i in range(1_000_000)), tok)
    seconds = time.perf_counter() - start
    assert_short_clean_message(message, "custom_words:")
    assert f"{MAX_WORDS:,}" in message and tok.calls == []
    assert seconds < 5.0, seconds  # reading stops at the limit


def test_duplicates_and_blank_lines_do_not_count_toward_the_limit():
    words = "\n".join(["tiger", "Tiger", "", " , ", "#note"] * 40_000 + ["lion"])
    assert [c.text for c in custom(words).candidates] == ["tiger", "lion"]


def test_a_10000_character_word_is_refused_before_tokenizing_with_a_short_message():
    tok = CountingTokenizer()
    message = error_of(VocabularyError, custom, "tiger\n" + "a" * 10_000, tok)
    assert_short_clean_message(message, "custom_words:", limit=300)
    assert "10,000 characters" in message and "'" + "a" * 60 + "…'" in message
    assert tok.calls == []


def test_the_word_length_limit_keeps_every_word_of_usable_length():
    longest = " ".join(["abcdefg"] * 32)  # 255 characters
    assert len(longest) <= MAX_WORD_CHARS
    vocab = from_words([longest], CountingTokenizer(), max_tokens=32)
    assert vocab[0].text == longest


def test_many_bad_words_give_a_message_of_bounded_length():
    words = "\n".join(f"word{i}\x00" for i in range(5_000))
    message = error_of(VocabularyError, custom, words)
    assert_short_clean_message(message, "custom_words:")
    assert "5,000 word(s)" in message and "and 4,990 more" in message


@pytest.mark.parametrize("word, shown", [
    ("ti\x00ger", "ti\\x00ger"),
    ("\x1b[31mred", "\\x1b[31mred"),
    ("abc\u202edef", "abc\\u202edef"),
    ("li\x7fon", "li\\x7fon"),
    ("zero\u200fwidth", "zero\\u200fwidth"),
])
def test_control_and_bidi_characters_in_words_are_an_error_that_shows_them(word, shown):
    tok = CountingTokenizer()
    message = error_of(VocabularyError, custom, f"tiger\n{word}", tok)
    assert_short_clean_message(message, "custom_words:")
    assert shown in message and tok.calls == []


def test_whitespace_controls_only_separate_words():
    vocab = custom("big\tcat\n snow\x0bleopard \r\nlion")
    assert [c.text for c in vocab.candidates] == ["big cat", "snow leopard", "lion"]


def test_emoji_and_non_latin_words_are_candidates():
    vocab = custom("🐯\n👩‍🔬\nтигр\n虎\nנמר")
    assert [c.text for c in vocab.candidates] == ["🐯", "👩‍🔬", "тигр", "虎", "נמר"]


def test_unknown_and_over_long_words_are_quoted_shortened():
    unknown = "zzz " * 50  # the toy tokenizer knows no "zzz": 200 characters, no tokens
    message = error_of(VocabularyError, custom, f"w001\n{unknown}", toy_tokenize)
    assert_short_clean_message(message, "custom_words:", limit=300)
    assert "not in the tokenizer's vocabulary" in message and "199 characters" in message
    message = error_of(VocabularyError, custom, "w001\n" + "w002 " * 40, toy_tokenize)
    assert_short_clean_message(message, "custom_words:", limit=300)
    assert "longer than 8 tokens" in message


def test_an_unknown_vocabulary_name_is_quoted_shortened():
    message = error_of(VocabularyError, build_vocabulary, "x" * 10_000 + "\x1b", CountingTokenizer(), {})
    assert "unknown vocabulary" in message and len(message) < 300 and not RAW_HIDDEN.search(message)


def test_built_in_list_errors_name_the_list():
    message = error_of(VocabularyError, from_words, ["tiger", "zzz"], toy_tokenize, name="cifar10")
    assert message.startswith("vocabulary 'cifar10':")


# -- templates -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, what", [
    ("a photo of a cat", "exactly one"),
    ("{} next to {}", "exactly one"),
    ("a photo of a{}", "glued"),
    ("a photo\x00 of a {}", "\\x00"),
    ("\x1b[2Ja photo of a {}", "\\x1b"),
    ("a photo of a {} \u202eevil", "\\u202e"),
])
def test_bad_templates_name_the_input_and_the_line(text, what):
    message = error_of(TemplateError, parse_templates, f"a photo of a {{}}\n\n{text}")
    assert_short_clean_message(message, "templates, line 3:", limit=400)
    assert what in message


def test_empty_templates_name_the_input():
    assert error_of(TemplateError, parse_templates, " \n\t\n").startswith("templates:")


def test_a_10000_character_template_is_refused_before_tokenizing():
    tok = CountingTokenizer()
    text = "a " * 5_000 + "{}"
    message = error_of(TemplateError, lambda: [tokenize_template(t, tok, LAYOUT) for t in parse_templates(text)])
    assert_short_clean_message(message, "templates, line 1:", limit=300)
    assert "10,002 characters" in message and f"{MAX_TEMPLATE_CHARS:,}" in message and tok.calls == []
    assert error_of(TemplateError, tokenize_template, text, tok, LAYOUT).startswith("templates:") and tok.calls == []


def test_a_template_with_more_tokens_than_the_encoder_takes():
    text = "w001 " * 14 + "{}"  # the toy encoder takes 16 tokens: start, end and 14 here
    message = error_of(TemplateError, tokenize_template, text, toy_tokenize, LAYOUT)
    assert_short_clean_message(message, "templates:", limit=400)
    assert "too long" in message and "16" in message


def test_a_template_must_leave_room_for_the_longest_word():
    text = "w001 " * 11 + "{}"  # leaves 3 of the 16 tokens
    assert tokenize_template(text, toy_tokenize, LAYOUT, word_tokens=3).prefix_ids == (1,) * 11
    message = error_of(TemplateError, tokenize_template, text, toy_tokenize, LAYOUT, word_tokens=4)
    assert "too long" in message and "room for 3 of the 4" in message


def test_two_slots_given_straight_to_the_tokenizer_are_a_template_error():
    assert "exactly one" in error_of(TemplateError, tokenize_template, "{} and {}", toy_tokenize, LAYOUT)


def test_emoji_tabs_and_non_latin_templates_are_fine():
    assert parse_templates("🐯 a photo of a {} 🐯\na\tphoto of\ta {}\nфото {}") == [
        "🐯 a photo of a {} 🐯", "a\tphoto of\ta {}", "фото {}"]


def test_many_templates_are_parsed_in_bounded_time():
    start = time.perf_counter()
    assert len(parse_templates("\n".join(f"photo {i} of a {{}}" for i in range(20_000)))) == 20_000
    assert time.perf_counter() - start < 5.0


# -- settings ------------------------------------------------------------------------------------
def test_settings_messages_name_the_field_and_quote_shortened():
    message = error_of(ValueError, settings_from_preset, "p" * 10_000)
    assert "unknown preset" in message and "10,000 characters" in message and len(message) < 300
    message = error_of(ValueError, settings_from_preset, "quick", **{"bad\x1bname": 1})
    assert "bad\\x1bname" in message and not RAW_HIDDEN.search(message)
    message = error_of(ValueError, AuditSettings(top_k=0, rescore_seeds=8).validate)
    assert message == "top_k (0) must be at least 1"
    message = error_of(ValueError, AuditSettings(mode="\u202e" + "m" * 500).validate)
    assert message.startswith("mode '\\u202e") and len(message) < 300
