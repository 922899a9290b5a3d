"""Reports that open in a spreadsheet or a terminal: no formulas, no raw control characters.

OWASP's CSV-injection rule: a text cell that begins with =, +, -, @, a tab or a carriage return
gets a leading single quote, so a spreadsheet shows it as text. The JSON keeps the exact text.
"""
import csv
import dataclasses
import io
import json
import re

import pytest
import torch

from driftscope_core.audit import run_audit
from driftscope_core.models import Runtime
from driftscope_core.prompts import tokenize_template
from driftscope_core.report import DriftReport, ReportEntry, csv_text
from driftscope_core.sampling import Schedule
from driftscope_core.settings import AuditSettings
from driftscope_core.vocabulary import build_vocabulary
from toy_models import LAYOUT, WORDS, toy_pair, toy_tokenize

FORMULAS = {  # token -> its CSV cell
    '=HYPERLINK("http://x")': '\'=HYPERLINK("http://x")',
    "+SUM(1": "'+SUM(1",
    "@cmd": "'@cmd",
    "-2+3": "'-2+3",
    "=1+1": "'=1+1",
    "\tcmd": "'\\x09cmd",  # quoted, and the tab itself escaped
    "\r=1": "'\\x0d=1",
    " =1+1": "' =1+1",  # a formula behind a space
    "\x00=1": "'\\x00=1",
}
HARMLESS = ["tiger", "aquarium fish", "<img src=x onerror=alert(1)>", "🐯", "👩‍🔬", "tiger-lily", "a+b", "it's"]
HIDDEN = {  # token -> its escaped form in the CSV and the table
    "ti\x00ger": "ti\\x00ger",
    "\x1b[2Jtiger": "\\x1b[2Jtiger",
    "abc\u202edef": "abc\\u202edef",
    "li\x7fon\x85": "li\\x7fon\\x85",
    "two\nlines": "two\\x0alines",
}
SCHEDULE = Schedule(sigmas=torch.linspace(10.0, 0.0, 11), initial_scale=10.0)
RAW_HIDDEN = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def entry(token: str, rank: int = 1, **kw) -> ReportEntry:
    values = dict(rank=rank, token=token, token_ids=[5, 6], drift=0.25, spread=0.01, per_seed=[0.25],
                  calibrated=1.5, percentile=90.0, significant=False, direction="most", search_drift=0.2)
    return ReportEntry(**{**values, **kw})


def report_of(tokens, templates=("a photo of a {}",), **kw) -> DriftReport:
    return DriftReport(
        entries=[entry(t, rank=i, **kw) for i, t in enumerate(tokens, start=1)],
        settings={"direction": "most", "objective": "attention", "mode": "screen"},
        seeds={}, models={}, vocabulary={"name": "custom", "size": len(tokens)}, templates=list(templates),
        baseline={"size": 32, "median": 0.1, "log_scale": 0.3, "z_threshold": 3.29}, timings={}, evaluations={},
    )


def csv_rows(report: DriftReport) -> list[dict]:
    return list(csv.DictReader(io.StringIO(report.to_csv())))


@pytest.mark.parametrize("token, cell", FORMULAS.items())
def test_formula_tokens_are_quoted_in_the_csv_and_exact_in_the_json(token, cell):
    report = report_of([token])
    assert csv_rows(report)[0]["token"] == cell
    assert DriftReport.from_json(report.to_json()).entries[0].token == token


def test_no_csv_text_cell_starts_a_formula():
    report = report_of([*FORMULAS, *HARMLESS, *HIDDEN])
    for row in csv_rows(report):
        for column in ("token", "token_ids", "direction"):
            assert not row[column].lstrip().startswith(("=", "+", "-", "@", "\t", "\r")), row[column]


@pytest.mark.parametrize("token", HARMLESS)
def test_ordinary_text_markup_and_emoji_are_written_as_they_are(token):
    report = report_of([token])
    assert csv_rows(report)[0]["token"] == token
    assert token[:20] in report.table()  # the table shows 20 characters
    assert DriftReport.from_json(report.to_json()).entries[0].token == token


def test_the_packs_negative_numbers_stay_numbers():
    report = report_of(["tiger"], drift=-1.5, calibrated=-2.25, search_drift=-0.5, spread=0.0)
    row = csv_rows(report)[0]
    assert (row["drift"], row["calibrated"], row["search_drift"]) == ("-1.5", "-2.25", "-0.5")
    assert (row["rank"], row["token_ids"], row["significant"], row["direction"]) == ("1", "5 6", "False", "most")


@pytest.mark.parametrize("token, shown", HIDDEN.items())
def test_control_and_bidi_characters_are_escaped_in_csv_and_table(token, shown):
    report = report_of([token])
    text = report.to_csv()
    assert not RAW_HIDDEN.search(text) and text.count("\n") == 2  # header and one row, each one line
    assert csv_rows(report)[0]["token"] == shown
    table = report.table()
    assert not RAW_HIDDEN.search(table) and len(table.splitlines()) == 4
    assert shown[:20] in table
    assert DriftReport.from_json(report.to_json()).entries[0].token == token


def test_json_is_ascii_and_keeps_templates_and_tokens_exactly():
    tokens, templates = [*FORMULAS, *HIDDEN, "🐯"], ["=cmd {}", "\u202ea photo of a {}"]
    text = report_of(tokens, templates).to_json()
    assert text.isascii() and not RAW_HIDDEN.search(text.replace("\n", " "))
    again = DriftReport.from_json(text)
    assert [e.token for e in again.entries] == tokens and again.templates == templates
    assert json.loads(text)["entries"][0]["token"] == '=HYPERLINK("http://x")'


def test_csv_text_rule_in_isolation():
    assert csv_text("") == "" and csv_text("'=1") == "'=1"  # an existing quote is not doubled
    assert csv_text("-") == "'-" and csv_text("a=1") == "a=1"


def test_custom_formula_words_through_a_whole_audit():
    """The words a user types reach the CSV only as text."""
    words = ["=HYPERLINK(\"http://x\")", "+SUM(1", "@cmd", "-2+3", "<img src=x onerror=alert(1)>", "🐯"]
    vocab = build_vocabulary("custom", toy_tokenize, {}, custom_words="\n".join(WORDS[:10] + words))
    base, adapted = toy_pair(planted=("w001",), n_words=10)
    settings = AuditSettings(mode="scan", width=32, height=32, schedule_steps=10, kept_steps=2, noise_batch=1,
                             rescore_seeds=1, calibration_size=8, calibration_seeds=1, top_k=len(vocab))
    tpl = [tokenize_template("a photo of a {}", toy_tokenize, LAYOUT)]
    report = run_audit(base, adapted, vocab, tpl, SCHEDULE, settings, Runtime())
    cells = {row["token"] for row in csv_rows(report)}
    assert {"'=HYPERLINK(\"http://x\")", "'+SUM(1", "'@cmd", "'-2+3", "<img src=x onerror=alert(1)>", "🐯"} <= cells
    assert {e.token for e in DriftReport.from_json(report.to_json()).entries} >= set(words)
    assert all(float(row["drift"]) >= 0 for row in csv_rows(report))


def test_a_report_entry_edit_keeps_the_rule():
    """A report built or edited elsewhere goes through the same rule."""
    report = report_of(["tiger"])
    report.entries[0] = dataclasses.replace(report.entries[0], token="=evil()", direction="-most")
    row = csv_rows(report)[0]
    assert (row["token"], row["direction"]) == ("'=evil()", "'-most")
