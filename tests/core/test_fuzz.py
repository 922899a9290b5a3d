"""Bounded property-based tests of the core's parsing and validation (hypothesis).

Derandomized (the same examples on every run, no example database), 200 examples a property,
so the file takes seconds and CI is deterministic.
"""
import csv
import dataclasses
import io
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driftscope_core.prompts import SLOT, Template, TemplateError, parse_templates, tokenize_template
from driftscope_core.report import DriftReport, ReportEntry
from driftscope_core.settings import PRESETS, AuditSettings, settings_from_preset
from driftscope_core.vocabulary import HIDDEN_CHARS, MAX_WORD_CHARS, VocabularyError, build_vocabulary, from_words
from toy_models import LAYOUT, toy_tokenize

FUZZ = settings(max_examples=200, deadline=2_000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Pieces that matter here (characters and short strings), mixed with any character at all.
TRICKY = st.sampled_from(list("{} \n\t\r,#=+-@'\"aZ9.") + ["{}", "\x00", "\x1b", "\x7f", "\x85", "\u202e", "\u200f",
                                                            "\u2028", "\u00a0", "🐯", "👩‍🔬", "w001", "xx", "zzz"])
def pieces(max_size: int):
    return st.lists(st.one_of(TRICKY, st.characters()), max_size=max_size).map("".join)


PIECES = pieces(40)
LONG = st.builds(lambda run, n, tail: run * n + tail, pieces(3).filter(bool), st.integers(0, 3_000), pieces(5))
TEXT = st.one_of(PIECES, LONG)  # LONG reaches past the word and template length limits
# Mostly short words, now and then one that is anything at all.
WORDS = st.builds(lambda short, any_text: short + any_text, st.lists(pieces(6), max_size=30), st.lists(TEXT, max_size=1))
# Text with a slot in it as often as without, one template or several lines.
TEMPLATE = st.one_of(TEXT, st.builds(lambda a, gap, b: f"{a}{gap}{{}}{gap}{b}", pieces(8), st.sampled_from(["", " "]), pieces(8)))
TEMPLATES = st.one_of(TEMPLATE, st.lists(TEMPLATE, max_size=4), st.lists(TEMPLATE, max_size=4).map("\n".join))


def fake_tokenize(text: str) -> list[int]:
    """One id per piece; ids 0-2 stand for special tokens, some pieces tokenize to nothing."""
    return [hash(p) % 500 for p in text.split() if not p.startswith("zzz")]


# -- templates -----------------------------------------------------------------------------------
@FUZZ
@given(TEMPLATES)
def test_parse_templates_returns_one_slot_templates_or_raises_template_error(text):
    try:
        templates = parse_templates(text)
    except TemplateError as error:
        assert str(error).startswith("templates") and len(str(error)) < 1_000
        return
    assert templates and all(t.count(SLOT) == 1 and t == t.strip() for t in templates)
    assert not any(HIDDEN_CHARS.search(t.replace("\t", " ")) for t in templates)


@FUZZ
@given(TEMPLATE)
def test_tokenize_template_returns_a_template_or_raises_template_error(text):
    try:
        tpl = tokenize_template(text, toy_tokenize, LAYOUT, word_tokens=2)
    except TemplateError as error:
        assert str(error).startswith("templates") and len(str(error)) < 1_000
        return
    assert isinstance(tpl, Template) and len(tpl.prefix_ids) + len(tpl.suffix_ids) + 2 + 2 <= LAYOUT.max_length


# -- word lists ----------------------------------------------------------------------------------
@FUZZ
@given(WORDS, st.sampled_from([fake_tokenize, toy_tokenize]))
def test_from_words_returns_unique_candidates_or_raises_vocabulary_error(words, tokenize):
    try:
        vocab = from_words(words, tokenize, reserved_ids={0, 1, 2}, where="custom_words")
    except VocabularyError as error:
        assert str(error).startswith("custom_words:") and len(str(error)) < 2_000
        assert not HIDDEN_CHARS.search(str(error))
        return
    texts = [c.text.lower() for c in vocab.candidates]
    assert len(vocab) >= 1 and len(set(texts)) == len(texts)
    for c in vocab.candidates:
        assert c.text and len(c.text) <= MAX_WORD_CHARS and not HIDDEN_CHARS.search(c.text)
        assert 1 <= len(c.token_ids) <= 8 and not {0, 1, 2} & set(c.token_ids)


@FUZZ
@given(st.one_of(TEXT, WORDS.map(",".join), WORDS.map("\n".join)))
def test_custom_words_build_a_vocabulary_or_raise_vocabulary_error(text):
    try:
        vocab = build_vocabulary("custom", fake_tokenize, {}, custom_words=text)
    except VocabularyError as error:
        assert str(error).startswith("custom_words:") and len(str(error)) < 2_000
        return
    assert all("," not in c.text and "\n" not in c.text for c in vocab.candidates)


# -- settings ------------------------------------------------------------------------------------
FIELDS = {f.name: f for f in dataclasses.fields(AuditSettings)}
WEIRD_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1.0, 1e-300]))


def value_for(name: str):
    """Any value of the field's type: ints from very negative to huge, any float, any text."""
    kind = type(getattr(AuditSettings(), name))
    if kind is str:
        return st.one_of(TEXT, st.sampled_from(["screen", "scan", "paper", "most", "least", "attention"]))
    if kind is float:
        return WEIRD_FLOATS
    return st.one_of(st.integers(-3, 600), st.integers(-(2**64), 2**64))


ONE_FIELD = st.sampled_from(sorted(FIELDS)).flatmap(lambda name: st.tuples(st.just(name), value_for(name)))


@FUZZ
@given(ONE_FIELD)
def test_validate_returns_or_raises_value_error_naming_the_changed_field(change):
    name, value = change
    try:
        result = AuditSettings(**{name: value}).validate()
    except ValueError as error:
        message = str(error)
        assert name in message, message
        assert len(message) < 1_000 and not HIDDEN_CHARS.search(message)
        return
    assert getattr(result, name) == value or (isinstance(value, float) and math.isnan(value))


@FUZZ
@given(st.one_of(st.sampled_from(sorted(PRESETS)), TEXT),
       st.dictionaries(st.one_of(st.sampled_from(sorted(FIELDS)), TEXT), st.integers(-2, 100), max_size=4))
def test_settings_from_preset_returns_settings_or_raises_value_error(preset, overrides):
    try:
        result = settings_from_preset(preset, **overrides)
    except ValueError as error:
        message = str(error)
        assert len(message) < 2_000 and not HIDDEN_CHARS.search(message)
        if preset not in PRESETS:
            assert "unknown preset" in message
        elif set(overrides) - set(FIELDS):
            assert "unknown settings" in message
        else:
            assert any(name in message for name in overrides), message
        return
    assert isinstance(result, AuditSettings) and preset in PRESETS


# -- the CSV -------------------------------------------------------------------------------------
def report_of(tokens: list[str], numbers: list[float]) -> DriftReport:
    entries = [ReportEntry(rank=i, token=t, token_ids=[i], drift=x, spread=abs(x), per_seed=[x], calibrated=-x,
                           percentile=50.0, significant=x > 0, direction="most", search_drift=x)
               for i, (t, x) in enumerate(zip(tokens, numbers), start=1)]
    return DriftReport(entries=entries, settings={"direction": "most"}, seeds={}, models={},
                       vocabulary={"name": "custom", "size": len(entries)}, templates=list(tokens), baseline={},
                       timings={}, evaluations={})


@FUZZ
@given(st.lists(PIECES, min_size=1, max_size=8), st.floats(-1e6, 1e6))
def test_no_csv_text_cell_starts_a_formula_and_none_holds_a_raw_control_character(tokens, number):
    report = report_of(tokens, [number] * len(tokens))
    text = report.to_csv()
    assert not HIDDEN_CHARS.search(text.replace("\n", ""))
    assert text.count("\n") == 1 + len(tokens)  # one line per row
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == len(tokens)
    for row in rows:
        cell = row["token"]
        assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell
        assert not cell.lstrip().startswith(("=", "+", "-", "@")), cell
        assert float(row["drift"]) == number and float(row["calibrated"]) == -number  # numbers stay numbers
    again = DriftReport.from_json(report.to_json())
    assert [e.token for e in again.entries] == tokens and again.templates == tokens
