"""The audit end to end on plain-torch toy models: planted words come out on top."""
import sys

import pytest
import torch

from driftscope_core.audit import run_audit
from driftscope_core.models import Runtime
from driftscope_core.prompts import tokenize_template
from driftscope_core.sampling import Schedule
from driftscope_core.settings import AuditSettings
from toy_models import LAYOUT, toy_pair, toy_placebo, toy_tokenize, toy_vocab

PLANTED = ("w007", "w023", "w041")
SCHEDULE = Schedule(sigmas=torch.linspace(10.0, 0.0, 11), initial_scale=10.0)


def audit(mode="scan", planted=PLANTED, placebo=0.0, **kw):
    base, adapted = toy_pair(planted)
    settings = AuditSettings(placebo=placebo, mode=mode, width=32, height=32, schedule_steps=10, kept_steps=2, noise_batch=2,
                             rescore_seeds=3, calibration_size=30, calibration_seeds=kw.pop("calibration_seeds", 2),
                             screen_seeds=kw.pop("screen_seeds", 2), top_k=kw.pop("top_k", 5), **kw)
    tpl = [tokenize_template("a photo of a {}", toy_tokenize, LAYOUT)]
    return run_audit(base, adapted, toy_vocab(), tpl, SCHEDULE, settings, Runtime(),
                     placebo=toy_placebo(base, placebo) if placebo else None)


@pytest.mark.parametrize("mode", ["scan", "screen"])
@pytest.mark.parametrize("objective", ["attention", "prediction", "latent"])
def test_scan_and_screen_rank_planted_words_first(objective, mode):
    report = audit(mode=mode, objective=objective, finalists=12)
    assert {e.token for e in report.entries[:3]} == set(PLANTED)
    assert all(e.significant for e in report.entries[:3])


def test_screen_costs_less_than_scan_for_the_same_top_words():
    scan, screen = audit(mode="scan"), audit(mode="screen", finalists=15, shortlist=30)
    assert [e.token for e in scan.entries[:3]] == [e.token for e in screen.entries[:3]]  # the planted words
    unet = lambda r, stage: r.evaluations_by_stage[stage]["adapted"]["unet_forward"]  # noqa: E731
    # 60 words; 2 kept steps with guidance = 4 evaluations per latent; 3 re-scoring seeds
    assert unet(scan, "search") == 60 * 2 * 4  # every word on noise_batch 2
    assert unet(scan, "rescore") == 5 * 3 * 4  # the 5 reported words
    # proxy: 1 step without guidance on screen_seeds 2, the shortlist of 30 on 2 more; the 15
    # finalists in full on the re-scoring seeds, which makes re-scoring free
    assert unet(screen, "search") == 60 * 2 * 1 + 30 * 2 * 1 + 15 * 3 * 4
    assert len(screen.seeds["screen"]) == 4
    assert audit(mode="screen", finalists=15, shortlist=0).seeds["screen"] == screen.seeds["screen"][:2]
    assert audit(mode="screen", finalists=60).seeds["screen"] == []  # every word is a finalist: no proxy
    assert unet(screen, "rescore") == 0
    for r in (scan, screen):  # 30 calibration words on the first 2 re-scoring seeds
        assert unet(r, "calibrate") == 30 * 2 * 4
        assert sum(unet(r, s) for s in ("search", "rescore", "calibrate")) == r.evaluations["adapted"]["unet_forward"]
    assert unet(screen, "search") < unet(scan, "search")  # 360 < 480 on 60 words; the gap grows with the list


def test_paper_mode_finds_planted_words_and_stops_early():
    report = audit(mode="paper", top_k=3, opt_steps=40, patience=5, lr=0.5)
    assert {e.token for e in report.entries} & set(PLANTED)
    ev = report.evaluations["adapted"]
    assert ev["unet_backward"] > 0 and ev["text_backward"] > 0
    # early stop fired: fewer forward passes than the full budget would need
    full_budget = 2 * 3 * 40 * 2 * 2 * 2  # runs * steps * seeds * kept steps * cfg
    assert ev["unet_forward"] < full_budget


def test_least_direction_reports_unchanged_words():
    report = audit(direction="least")
    assert not {e.token for e in report.entries} & set(PLANTED)
    assert report.entries[0].drift <= report.entries[-1].drift


def test_same_seed_same_report_and_other_seed_other_noise():
    a, b, c = audit(seed=4), audit(seed=4), audit(seed=5)
    assert [e.per_seed for e in a.entries] == [e.per_seed for e in b.entries]
    assert a.seeds["rescore"] != c.seeds["rescore"]


def test_identical_models_flag_nothing():
    report = audit(planted=())
    assert all(e.drift == 0.0 and not e.significant for e in report.entries)


def test_evaluations_are_counted_per_model():
    report = audit()
    base, adapted = report.evaluations["base"], report.evaluations["adapted"]
    # scan: 60 words x 2 seeds, rescoring: 5 words x 3 seeds, calibration: 30 words x 2 seeds;
    # 2 kept steps, guided (x2)
    expected = (60 * 2 + 5 * 3 + 30 * 2) * 2 * 2
    assert base["unet_forward"] == adapted["unet_forward"] == expected
    assert base["unet_backward"] == 0
    # each word is encoded once (re-scoring reuses the scan's conditionings), plus the empty
    # prompt; the toy pair shares one text encoder, so the adapted side encodes nothing new
    assert base["text_forward"] == 60 + 1 and adapted["text_forward"] == 1


def test_report_round_trips_through_json_and_csv():
    from driftscope_core.report import DriftReport
    report = audit()
    again = DriftReport.from_json(report.to_json())
    assert again.entries == report.entries
    csv_lines = report.to_csv().splitlines()
    assert csv_lines[0].startswith("rank,token") and len(csv_lines) == 1 + len(report.entries)
    assert "w007" in report.table()


def test_core_imports_no_host_module():
    import importlib
    for name in list(sys.modules):
        if name.startswith("driftscope_core"):
            del sys.modules[name]
    before = set(sys.modules)
    importlib.import_module("driftscope_core.audit")
    importlib.import_module("driftscope_core.grid")
    new = set(sys.modules) - before
    assert not [m for m in new if m.split(".")[0] in {"comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server", "execution"}]


@pytest.mark.parametrize("mode", ["scan", "screen"])
def test_the_placebo_reference_keeps_planted_words_flagged_at_its_planned_cost(mode):
    """With a placebo the calibrated score is the drift over the drift under the placebo: the
    planted words stay on top and flagged, each reported word carries its placebo drift, and
    the placebo costs what planned_cost said: the 30 random and 5 reported words on the 2
    calibration seeds, on the base, the adapted and the placebo, text encoded once."""
    from driftscope_core.audit import planned_cost
    report = audit(mode=mode, placebo=0.01, finalists=12)
    assert {e.token for e in report.entries[:3]} == set(PLANTED)
    assert all(e.significant for e in report.entries[:3])
    assert all(e.placebo_drift > 0 for e in report.entries)
    assert report.baseline["reference"] == "placebo"
    calibrate = report.evaluations_by_stage["calibrate"]
    per_side = (30 + 5) * 2 * 4  # words x seeds x (2 kept steps, guided)
    assert {side: c["unet_forward"] for side, c in calibrate.items()} == {"base": per_side, "adapted": per_side,
                                                                           "placebo": per_side}
    assert report.evaluations["placebo"]["text_forward"] == 0
    settings = AuditSettings(**report.settings)
    planned = planned_cost(settings, 60, 1, shared_text=True)
    for side in ("base", "adapted", "placebo"):
        assert planned.of(side, "unet_forward") == report.evaluations[side]["unet_forward"]
    # ranking is the drift's alone: the placebo changes the scores, not the order
    assert [e.token for e in report.entries] == [e.token for e in audit(mode=mode, finalists=12).entries]


def test_the_placebo_is_given_exactly_when_the_settings_ask_for_one():
    base, adapted = toy_pair(PLANTED)
    tpl = [tokenize_template("a photo of a {}", toy_tokenize, LAYOUT)]
    for placebo, side in ((0.01, None), (0.0, toy_placebo(base))):
        settings = AuditSettings(width=32, height=32, schedule_steps=10, kept_steps=2, placebo=placebo)
        with pytest.raises(ValueError, match="placebo"):
            run_audit(base, adapted, toy_vocab(), tpl, SCHEDULE, settings, Runtime(), placebo=side)

