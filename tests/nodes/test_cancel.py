"""Cancel at every stage, progress from the first second, and the cost check before a long list
(issue 12). In process, through the Audit's own entry point: a cancel is ComfyUI's interrupt
flag, which the node's progress callback (and ComfyUI's own layers) turn into its exception."""
import threading
import time
from dataclasses import replace

import pytest
import torch

import comfy.model_management as mm

from audit_helpers import PLANTED, TEMPLATE, WORDS, assert_same, audit, fingerprint

STOP_WITHIN = 5.0  # seconds from the cancel to the end of the run ("a few seconds" on a CPU)


@pytest.fixture(scope="module")
def tiny(demo_models):
    model, clip, vae = demo_models.tiny_sd15(0)
    return model, clip, vae, demo_models.planted_edit_in_process(model, clip, PLANTED, WORDS, TEMPLATE)


def bpe_words(pack, clip, n):
    """n distinct real words, one CLIP token each (whole-word tokens of the BPE vocabulary)."""
    _, bpe, _ = pack.nodes.host.tokenizer_functions(clip)
    pieces = sorted(bpe.items(), key=lambda item: item[1])
    words = [p[:-4] for p, _ in pieces if p.endswith("</w>") and p[:-4].isascii() and p[:-4].isalpha() and len(p) > 6]
    return words[:n]


class Spy:
    """Wraps the node's progress callback: records every event with its time and, once an event
    matches `when`, raises ComfyUI's interrupt flag after that event was handled (so the run
    must reach its next cancel point on its own)."""

    def __init__(self, pack, monkeypatch, when=None, delay=0.0):
        self.events, self.when, self.delay = [], when, delay
        self.flag_at = self.stopped_at = None
        self.timer = None
        real_factory = pack.nodes.audit.node_progress

        def factory(node_id, label):
            real = real_factory(node_id, label)

            def callback(event):
                self.events.append((time.monotonic(), dict(event)))
                real(event)
                if self.when is not None and self.flag_at is None and self.timer is None and self.when(event):
                    if self.delay:
                        self.timer = threading.Timer(self.delay, self._flag)
                        self.timer.start()
                    else:
                        self._flag()

            return callback

        monkeypatch.setattr(pack.nodes.audit, "node_progress", factory)

    def _flag(self):
        self.flag_at = time.monotonic()
        mm.interrupt_current_processing(True)

    def run(self, fn):
        """fn() under the spy; True if it was cancelled. The flag is always cleared after."""
        self.started_at = time.monotonic()
        try:
            fn()
            return False
        except mm.InterruptProcessingException:
            self.stopped_at = time.monotonic()
            return True
        finally:
            if self.timer is not None:
                self.timer.cancel()
            mm.interrupt_current_processing(False)

    @property
    def stop_seconds(self):
        return self.stopped_at - self.flag_at


def stage_of(event):
    note = event.get("note") or ""
    return f"{event['stage']}:{note.split(':')[0]}" if event["stage"] == "search" else event["stage"]


# -- cancel at every stage (tiny models: each run takes seconds) ---------------------------------
STAGES = [  # (the stage's name as events give it, audit inputs that reach it)
    ("vocabulary", dict(mode="screen", words=2500)),
    ("prepare", dict(mode="screen")),
    ("search:proxy", dict(mode="screen")),
    ("search:shortlist", dict(mode="screen")),
    ("search:finalists", dict(mode="screen")),
    ("search:scan", dict(mode="scan")),
    ("search:optimizer", dict(mode="paper", top_k=2, opt_steps=6, patience=6)),
    ("rescore", dict(mode="scan")),
    ("calibrate", dict(mode="screen")),
]


@pytest.mark.parametrize("stage, inputs", STAGES, ids=[s for s, _ in STAGES])
def test_cancel_stops_the_run_inside_every_stage_and_changes_no_model(pack, tiny, monkeypatch, stage, inputs):
    model, clip, _, adapted = tiny
    inputs = dict(inputs)
    if "words" in inputs:
        inputs["custom_words"] = "\n".join(bpe_words(pack, clip, inputs.pop("words")))
    before = fingerprint(model, clip), fingerprint(adapted, clip)
    spy = Spy(pack, monkeypatch, when=lambda e: stage_of(e) == stage)
    assert spy.run(lambda: audit(pack, model, clip, adapted, **inputs)), f"the run ended without reaching {stage}"
    after_flag = [e for t, e in spy.events if t >= spy.flag_at]
    # it stopped inside the stage: at the stage's next progress event or inside a model call
    # (ComfyUI's layers check the flag), not at a later stage's start
    assert len(after_flag) <= 1 and all(stage_of(e) == stage for e in after_flag), [e.get("note") for e in after_flag]
    assert spy.stop_seconds < STOP_WITHIN
    print(f"{stage}: stopped {spy.stop_seconds * 1000:.0f} ms after the cancel")
    assert_same(before[0], fingerprint(model, clip))
    assert_same(before[1], fingerprint(adapted, clip))


def test_the_next_audit_after_a_cancel_gives_the_same_report(pack, tiny, monkeypatch):
    model, clip, _, adapted = tiny
    first = audit(pack, model, clip, adapted, mode="screen", seed=5)
    spy = Spy(pack, monkeypatch, when=lambda e: stage_of(e) == "search:finalists")
    assert spy.run(lambda: audit(pack, model, clip, adapted, mode="screen", seed=5))
    again = audit(pack, model, clip, adapted, mode="screen", seed=5)
    assert [(e.token, e.per_seed, e.calibrated) for e in again.entries] == [(e.token, e.per_seed, e.calibrated) for e in first.entries]


# -- a long list with a CLIP-L-sized text encoder: progress moves, a cancel takes seconds ---------
@pytest.fixture(scope="module")
def clip_l(demo_models):
    """The demo's text encoder (CLIP-L shapes, ~0.2-0.3 s per prompt on a CPU) and tiny UNet."""
    unet, clip = demo_models.demo_unet(), demo_models.demo_clip()
    adapted = unet.clone()
    key = next(k for k in unet.model.state_dict() if k.endswith("attn2.to_k.weight"))
    delta = torch.randn(unet.model.state_dict()[key].shape, generator=torch.Generator().manual_seed(0)) * 0.1
    adapted.add_patches({key: ("diff", (delta,))}, 1.0)
    return unet, clip, adapted


def test_a_long_list_reports_progress_at_once_and_stops_within_seconds(pack, clip_l, monkeypatch):
    """600 words: before the fix, the first 256 were encoded in one call (a minute on a CPU)
    before the first progress event after the vocabulary."""
    unet, clip, adapted = clip_l
    words = bpe_words(pack, clip, 600)
    # the cancel comes 3 s into the proxy's text encoding (600 prompts: 2-3 minutes on a CPU)
    spy = Spy(pack, monkeypatch, when=lambda e: e["stage"] == "search", delay=3.0)
    before = fingerprint(unet, clip), fingerprint(adapted, clip)
    assert spy.run(lambda: audit(pack, unet, clip, adapted, custom_words="\n".join(words), mode="screen", width=64,
                                 height=64, micro_batch=32))
    times = [spy.started_at] + [t for t, _ in spy.events]
    first = times[1] - spy.started_at
    gaps = [b - a for a, b in zip(times, times[1:])]
    encoding = [e["note"] for _, e in spy.events if "proxy: encoding" in (e.get("note") or "")]
    print(f"first progress {first:.2f}s, longest gap {max(gaps):.2f}s, stop {spy.stop_seconds:.2f}s after the "
          f"cancel; {encoding[-1]}")
    assert first < 1.0
    assert spy.stop_seconds < STOP_WITHIN
    assert encoding and all(note.endswith("/600 words") for note in encoding)  # it moved in the 3 s
    assert max(gaps) < 2 * STOP_WITHIN  # progress keeps moving: model calls are short
    assert_same(before[0], fingerprint(unet, clip))
    assert_same(before[1], fingerprint(adapted, clip))


# -- chunking changes no number ------------------------------------------------------------------
def test_text_encoder_chunks_change_no_number(pack, tiny, monkeypatch):
    """The same audit with one prompt per text-encoder call and with whole groups of 256."""
    model, clip, _, adapted = tiny
    real = pack.nodes.host.runtime_for
    reports = []
    for text_batch in (1, 256):
        monkeypatch.setattr(pack.nodes.host, "runtime_for", lambda *a, n=text_batch: replace(real(*a), text_batch=n))
        reports.append(audit(pack, model, clip, adapted, mode="screen", templates="a photo of a {}\na painting of a {}"))
    one, many = ([(e.token, e.per_seed, e.calibrated, e.search_drift) for e in r.entries] for r in reports)
    assert one == many
    assert reports[0].baseline == reports[1].baseline


# -- the cost, counted before the audit starts ---------------------------------------------------
COSTS = [
    ("scan", 31, dict(mode="scan")),
    ("screen, every word a finalist", 20, dict(mode="screen")),
    ("screen", 31, dict(mode="screen")),
    ("screen, 2 templates", 31, dict(mode="screen", templates="a photo of a {}\na painting of a {}")),
    ("screen, longer than the text cache", 1100, dict(mode="screen")),
    ("paper", 31, dict(mode="paper", top_k=2, opt_steps=4, patience=2)),
]


@pytest.mark.parametrize("name, words, inputs", COSTS, ids=[c[0] for c in COSTS])
def test_planned_cost_counts_what_the_audit_runs(pack, tiny, name, words, inputs):
    model, clip, _, adapted = tiny
    core = pack.driftscope_core
    custom = WORDS[:words] if words <= len(WORDS) else bpe_words(pack, clip, words)
    report = audit(pack, model, clip, adapted, custom_words="\n".join(custom), **inputs)
    settings = core.settings.AuditSettings(**report.settings)
    templates = len(report.templates)
    plan = core.audit.planned_cost(settings, report.vocabulary["size"], templates, shared_text=True)
    for stage, sides in report.evaluations_by_stage.items():
        for side, counts in sides.items():
            planned = plan.by_stage[stage][side]
            if settings.mode == "paper":  # a budget: runs stop early
                assert counts["unet_forward"] <= planned["unet_forward"] and counts["text_forward"] <= planned["text_forward"]
            else:
                assert counts["unet_forward"] == planned["unet_forward"], (stage, side)
                assert counts["text_forward"] <= planned["text_forward"], (stage, side)
                if words <= 1024:  # every conditioning fits the cache: the count is exact
                    assert counts["text_forward"] == planned["text_forward"], (stage, side)


def test_a_list_too_large_to_audit_is_refused_before_it_starts_with_its_cost(pack, tiny, monkeypatch):
    model, clip, _, adapted = tiny
    spy = Spy(pack, monkeypatch)
    t = time.monotonic()
    with pytest.raises(ValueError) as err:
        audit(pack, model, clip, adapted, vocabulary="clip_words", mode="scan", preset="standard")
    message = str(err.value)
    assert time.monotonic() - t < 5
    assert message.startswith("vocabulary 'clip_words': 32,031 words")
    assert "more than the 250,000 an audit takes" in message and "1,0" in message  # about a million
    assert "mode screen (about 66," in message and "a GPU" in message
    assert not [e for _, e in spy.events if e["stage"] in ("prepare", "search")]  # nothing ran

    words = "\n".join(bpe_words(pack, clip, 20000))
    with pytest.raises(ValueError, match=r"^custom_words: 20,000 words .* a shorter list \(at most [0-9,]+ words fit scan"):
        audit(pack, model, clip, adapted, custom_words=words, mode="scan", preset="standard")


def test_the_whole_clip_vocabulary_fits_screen_mode_and_the_plan_is_shown(pack, tiny, monkeypatch):
    host, audit_node, core = pack.nodes.host, pack.nodes.audit, pack.driftscope_core
    runtime = core.models.Runtime()
    for preset in ("quick", "standard", "paper"):
        settings = core.settings.settings_from_preset(preset, mode="screen" if preset != "paper" else "paper")
        for templates in (1, 3):
            plan = audit_node.check_cost(settings, 32031, templates, True, runtime, "clip_words")
            assert "model evaluations per model" in plan
    with pytest.raises(host.InputError, match="fewer templates"):
        audit_node.check_cost(core.settings.settings_from_preset("standard"), 32031, 4, True, runtime, "clip_words")

    model, clip, _, adapted = tiny
    spy = Spy(pack, monkeypatch)
    report = audit(pack, model, clip, adapted, mode="screen")
    settings = core.settings.AuditSettings(**report.settings)
    planned = core.audit.planned_cost(settings, len(WORDS), 1, shared_text=True)
    plans = [e["note"] for _, e in spy.events if e["stage"] == "plan"]
    assert plans == [f"31 words x 1 template, screen mode: at most {planned.per_model:,} model evaluations per model "
                     f"({planned.of('base', 'text_forward'):,} text-encoder passes, "
                     f"{planned.of('base', 'unet_forward'):,} UNet evaluations)"]
    running = [e for _, e in spy.events if e["stage"] in ("search", "rescore", "calibrate")]
    assert all(e["planned"] == planned.total for e in running)
    assert set(report.evaluations) == {"base", "adapted", "placebo"}  # the presets' placebo reference
    assert running[-1]["evaluations"] == sum(report.evaluations[s][k] for s in report.evaluations
                                             for k in ("text_forward", "unet_forward"))


# -- the Evidence Grid ---------------------------------------------------------------------------
def test_evidence_grid_stops_between_images_and_inside_sampling(pack, tiny, monkeypatch):
    model, clip, vae, adapted = tiny
    report = audit(pack, model, clip, adapted, top_k=3)
    evidence = pack.nodes.evidence
    real = evidence.sample_image
    made = []

    def after_the_first(*args, **kw):  # the cancel comes while the first image is being finished
        made.append(real(*args, **kw))
        mm.interrupt_current_processing(True)
        return made[-1]

    def grid(steps=3):
        with torch.inference_mode():
            evidence.evidence_images(report, model, clip, adapted, clip, vae, top_n=3, seed=0, steps=steps, cfg=5.0,
                                     sampler_name="euler", scheduler="normal", width=0, height=0)

    before = fingerprint(model, clip), fingerprint(adapted, clip)
    monkeypatch.setattr(evidence, "sample_image", after_the_first)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            grid()
    finally:
        mm.interrupt_current_processing(False)
    assert len(made) == 1
    monkeypatch.setattr(evidence, "sample_image", real)

    timer = threading.Timer(0.3, mm.interrupt_current_processing, (True,))
    t = time.monotonic()
    timer.start()
    try:
        with pytest.raises(mm.InterruptProcessingException):
            grid(steps=10000)  # minutes if nothing stopped it
    finally:
        timer.cancel()
        mm.interrupt_current_processing(False)
    assert time.monotonic() - t < 0.3 + STOP_WITHIN
    assert_same(before[0], fingerprint(model, clip))
    assert_same(before[1], fingerprint(adapted, clip))
