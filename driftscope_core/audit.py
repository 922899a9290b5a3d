"""The audit: search, re-score on shared seeds, calibrate, report (method steps 1-7 end to end)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import __version__
from .calibration import Baseline, spread, z_threshold
from .meter import DriftMeter, SamplingSettings
from .models import ModelSide, Runtime
from .prompts import Template
from .report import DriftReport, ReportEntry
from .sampling import Schedule
from .search import SEARCHES, proxy_seeds
from .settings import AuditSettings
from .vocabulary import Vocabulary

Callback = Callable[[dict], None]

# Share of the progress bar each stage gets.
STAGE_WEIGHTS = {"search": 0.7, "rescore": 0.15, "calibrate": 0.15}
# What a host may hold an audit to (nodes/audit.py refuses an audit past it before it starts):
# model evaluations (text-encoder passes + UNet evaluations, forward) of the busier model. The
# whole CLIP vocabulary (clip_words, 32,031 words) in screen mode needs about 67,000 per
# template, so it fits with up to three templates; scanning it in full needs about 1,060,000.
MAX_EVALUATIONS = 250_000


@dataclass(frozen=True)
class PlannedCost:
    """The model evaluations an audit will run, per stage: exact for the UNet in screen and scan
    mode, at most that for text passes (a long list does not fit the text cache) and for paper
    mode (runs may stop early). Counts per model side, in EvaluationCounts' names."""

    by_stage: dict[str, dict[str, dict[str, int]]]  # stage -> side -> {"text_forward", "unet_forward"}

    def of(self, side: str, kind: str) -> int:
        return sum(stage.get(side, {}).get(kind, 0) for stage in self.by_stage.values())

    def forward(self, side: str) -> int:
        """Forward evaluations of one side, text and UNet."""
        return self.of(side, "text_forward") + self.of(side, "unet_forward")

    @property
    def busier_side(self) -> str:
        return max(("base", "adapted"), key=self.forward)

    @property
    def per_model(self) -> int:
        """Forward evaluations of the busier side: what MAX_EVALUATIONS bounds."""
        return self.forward(self.busier_side)

    @property
    def total(self) -> int:
        """Forward evaluations of every side (base, adapted, the placebo's): what progress counts."""
        sides = {side for stage in self.by_stage.values() for side in stage}
        return sum(self.forward(side) for side in sides)


def planned_cost(settings: AuditSettings, words: int, templates: int, shared_text: bool,
                 gradient_checkpointing: bool = False, cache_size: int = SamplingSettings.cache_size) -> PlannedCost:
    """Count, before anything runs, what run_audit will evaluate for `words` candidates and
    `templates` templates (the report's evaluations_by_stage, afterwards, says what it did)."""
    full = settings.kept_steps * (1 if settings.cfg == 1.0 else 2)  # UNet evaluations per latent, guided
    cached = words <= cache_size  # then every word's conditioning is kept after its first encoding
    k = min(settings.top_k, words)  # reported words

    def side(text: int, unet: int, adapted_text: int | None = None, adapted_unet: int | None = None) -> dict:
        """Per-template counts of both sides; by default the adapted side encodes what the base
        encodes unless the text encoder is shared, and runs the same UNet evaluations."""
        a_text = (0 if shared_text else text) if adapted_text is None else adapted_text
        a_unet = unet if adapted_unet is None else adapted_unet
        out = {"base": {"text_forward": text * templates, "unet_forward": unet * templates},
               "adapted": {"text_forward": a_text * templates, "unet_forward": a_unet * templates}}
        if settings.placebo > 0:  # the placebo runs in calibration only (set there)
            out["placebo"] = {"text_forward": 0, "unet_forward": 0}
        return out

    def again(n: int) -> int:  # words of a later stage that were encoded in the search
        return 0 if cached else n

    if settings.mode == "paper":
        steps = settings.max_runs_factor * settings.top_k * settings.opt_steps  # the run budget, at most
        unet = steps * settings.noise_batch * full
        # each step encodes the soft prompt on both sides; checkpointing runs the adapted forward twice
        search = side(steps, unet, adapted_text=steps, adapted_unet=unet * (2 if gradient_checkpointing else 1))
        rescore = side(k, k * settings.rescore_seeds * full)
        null = min(settings.calibration_size, words)
        null_text = null  # words no stage encoded before
    else:
        if settings.mode == "scan":
            search = side(words, words * settings.noise_batch * full)
            rescore = side(again(k), k * settings.rescore_seeds * full)
        elif not proxy_seeds(settings, words):  # screen, every word a finalist
            search = side(words, words * settings.rescore_seeds * full)
            rescore = side(0, 0)
        else:  # screen: the proxy (one step, no guidance) on every word, the shortlist again, finalists in full
            short = min(settings.shortlist, words) if len(proxy_seeds(settings, words)) > settings.screen_seeds else 0
            finalists = max(settings.finalists, settings.top_k)
            search = side(words + again(short + finalists),
                          (words + short) * settings.screen_seeds + finalists * settings.rescore_seeds * full)
            rescore = side(0, 0)  # screen measured its finalists on the re-scoring seeds
        null = min(settings.calibration_size, words - k)
        null_text = again(null)
    if settings.placebo > 0:  # the random and the reported words again, from the base to adapted and placebo
        unet = (null + k) * settings.calibration_seeds * full
        calibrate = side(null_text + again(k), unet)  # the reported words were encoded before
        calibrate["placebo"] = {"text_forward": 0, "unet_forward": unet * templates}  # the base's text, encoded once
    else:
        calibrate = side(null_text, null * settings.calibration_seeds * full)
    prepare = {s: {"text_forward": 1, "unet_forward": 0} for s in ("base", "adapted")}  # the empty prompt
    if settings.placebo > 0:
        prepare["placebo"] = {"text_forward": 0, "unet_forward": 0}  # the base's empty prompt
    return PlannedCost({"prepare": prepare, "search": search, "rescore": rescore, "calibrate": calibrate})


def words_that_fit(settings: AuditSettings, templates: int, shared_text: bool, gradient_checkpointing: bool,
                   most: int, limit: int = MAX_EVALUATIONS) -> int:
    """The longest list, up to `most` words (0 if none), whose planned cost stays within `limit`
    per model, by bisection (the cost grows with the list)."""
    lo, hi = 0, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if planned_cost(settings, mid, templates, shared_text, gradient_checkpointing).per_model <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


class _Stages:
    """Turns per-stage (done, total) into one overall fraction for a callback(dict), and
    records each stage's evaluations per model side. Every event carries `evaluations`, the
    forward evaluations of both sides so far, and `planned`, how many the audit plans at most."""

    def __init__(self, callback: Callback | None, sides: tuple[ModelSide, ...], planned: int):
        self.callback, self.sides, self.planned = callback, sides, planned
        self.offset = 0.0
        self.evaluations: dict[str, dict] = {}
        self._current: tuple[str, dict] | None = None

    def close(self) -> None:
        if self._current is not None:
            name, before = self._current
            self.evaluations[name] = {
                s.name: {k: v - before[s.name][k] for k, v in s.counts.as_dict().items()} for s in self.sides
            }
            self._current = None

    def stage(self, name: str):
        """Start stage `name` (ending the previous one), report its start and return its
        progress function `report(done, total, note="")`."""
        self.close()
        self._current = (name, {s.name: s.counts.as_dict() for s in self.sides})
        weight, start = STAGE_WEIGHTS[name], self.offset
        self.offset += weight

        def report(done: int, total: int, note: str = "") -> None:
            if self.callback is not None:
                overall = start + weight * (done / max(total, 1))
                spent = sum(s.counts.forward for s in self.sides)
                self.callback({"stage": name, "done": done, "total": total, "overall": overall, "note": note,
                               "evaluations": spent, "planned": self.planned})

        report(0, 1, "starting")
        return report


def run_audit(
    base: ModelSide,
    adapted: ModelSide,
    vocab: Vocabulary,
    templates: list[Template],
    schedule: Schedule,
    settings: AuditSettings,
    runtime: Runtime,
    latent_channels: int = 4,
    models: dict | None = None,
    callback: Callback | None = None,
    placebo: ModelSide | None = None,
) -> DriftReport:
    """Run one audit. `callback(dict)` gets progress and may raise to cancel: at the start of
    every stage ("prepare", "search", "rescore", "calibrate") and after every model call, with
    the stage, a `note` on what runs (e.g. "proxy: encoding 512/20,000 words"), `overall` (0-1),
    and `evaluations` done of the `planned` (planned_cost), every model together. `placebo`:
    the base's text with a randomly changed denoiser, which `settings.placebo` > 0 asks for
    (calibration.py's placebo reference)."""
    settings.validate()
    if (placebo is not None) != (settings.placebo > 0):
        raise ValueError(f"settings.placebo is {settings.placebo}: a placebo model side must be given exactly when "
                         "it is above 0 (the host makes it from the base at that size)")
    sampling = SamplingSettings(
        latent_shape=(latent_channels, settings.height // 8, settings.width // 8),
        kept_steps=settings.kept_steps,
        cfg=settings.cfg,
        objective=settings.objective,
    )
    timings: dict[str, float] = {}
    if callback is not None:  # the empty prompt's encoding comes first
        callback({"stage": "prepare", "note": "encoding the empty prompt"})
    meter = DriftMeter(base, adapted, vocab, templates, schedule, sampling, runtime, placebo)
    cost = planned_cost(settings, len(vocab), len(templates), meter.shared_text, runtime.gradient_checkpointing)
    sides = (base, adapted) if placebo is None else (base, adapted, placebo)
    stages = _Stages(callback, sides, cost.total)

    t = time.perf_counter()
    findings = SEARCHES[settings.mode](meter, settings, stages.stage("search"))
    timings["search"] = time.perf_counter() - t

    t = time.perf_counter()
    reported = [f.index for f in findings]
    rescore_seeds = settings.derived_seeds("rescore", settings.rescore_seeds)
    drifts = _rescore(meter, findings, rescore_seeds, stages.stage("rescore"))  # (n, R)
    timings["rescore"] = time.perf_counter() - t

    t = time.perf_counter()
    null_words = vocab.sample(settings.calibration_size, settings.seed, exclude=reported)
    calibration_seeds = rescore_seeds[: settings.calibration_seeds]  # shared with the reported words
    null_reference = reported_reference = None  # drifts under the placebo
    if placebo is None:
        null_drifts = meter.score(null_words, calibration_seeds, stages.stage("calibrate"))  # (M, k)
    else:
        both = meter.score_against(null_words + reported, calibration_seeds, ("adapted", placebo.name),
                                   stages.stage("calibrate"))  # (2, M + n, k)
        m = len(null_words)
        null_drifts, null_reference, reported_reference = both[0, :m], both[1, :m], both[1, m:]  # (M, k), (M, k), (n, k)
    timings["calibrate"] = time.perf_counter() - t
    stages.close()

    notes = []
    null_lengths = [vocab[i].tokens for i in null_words]
    if null_drifts.shape[0] < 8:
        notes.append(
            f"only {null_drifts.shape[0]} words were left for calibration; the baseline also uses the "
            "reported words, so calibrated scores are weak. Use a larger vocabulary."
        )
        null_drifts = torch.cat([null_drifts, drifts[:, : len(calibration_seeds)]])
        if null_reference is not None:
            null_reference = torch.cat([null_reference, reported_reference])
        null_lengths += [vocab[i].tokens for i in reported]
    lengths = torch.tensor(null_lengths)  # (M,) token counts: the baseline's level follows them where they vary
    baseline = Baseline.from_drifts(null_drifts, lengths, null_reference)
    threshold = z_threshold(settings.false_alarms, len(vocab))
    entries = _entries(vocab, findings, drifts, baseline, (null_drifts, lengths, null_reference), threshold,
                       settings.direction, reported_reference)
    return DriftReport(
        entries=entries,
        settings=settings.as_dict(),
        seeds={"search": settings.derived_seeds("search", settings.noise_batch),
               "screen": proxy_seeds(settings, len(vocab)) if settings.mode == "screen" else [],
               "rescore": rescore_seeds, "calibration": calibration_seeds,  # the first rescore seeds
               "calibration_words": [vocab[i].text for i in null_words]},
        models=models or {},
        vocabulary={"name": vocab.name, "size": len(vocab)},
        templates=[t.text for t in templates],
        baseline={**baseline.__dict__, "z_threshold": threshold},
        timings=timings,
        evaluations={s.name: s.counts.as_dict() for s in sides},
        evaluations_by_stage=stages.evaluations,
        notes=notes + [f"driftscope {__version__}"],
    )


def _rescore(meter: DriftMeter, findings, seeds: list[int], progress) -> torch.Tensor:
    """Drift (n, R) of every finding on the shared re-scoring seeds: measured here, unless the
    search already measured it there (screen mode's finalists)."""
    todo = [f.index for f in findings if f.rescored is None]
    if not todo and progress is not None:
        progress(1, 1)
    fresh = iter(meter.score(todo, seeds, progress))  # rows (R,) of the words not yet measured
    rows = [f.rescored if f.rescored is not None else next(fresh) for f in findings]
    return torch.stack(rows) if rows else torch.zeros(0, len(seeds))


def _entries(vocab, findings, drifts, baseline: Baseline, null, threshold: float, direction: str,
             reference: torch.Tensor | None = None) -> list[ReportEntry]:
    """Rank the reported words by their re-scored drift (n, R) and attach calibrated scores,
    computed on the calibration seeds (the first baseline.seeds of the R), each against the
    baseline's level for the word's token count; `null`: the random words' drifts (M, k),
    token counts (M,) and drifts under the placebo (M, k) or None; `reference`: the reported
    words' drifts under the placebo (n, k) or None."""
    null_drifts, null_lengths, null_reference = null
    means = drifts.mean(dim=1)  # (n,)
    order = torch.argsort(means, descending=(direction == "most"))
    entries = []
    for rank, j in enumerate(order.tolist(), start=1):
        f, m = findings[j], float(means[j])
        tokens = vocab[f.index].tokens
        on_calibration_seeds = drifts[j, : baseline.seeds]  # (k,)
        mine = None if reference is None else reference[j]  # (k,) under the placebo
        z = baseline.z(on_calibration_seeds, tokens, mine)
        flagged = z >= threshold if direction == "most" else z <= -threshold
        entries.append(ReportEntry(
            rank=rank,
            token=vocab[f.index].text,
            token_ids=list(vocab[f.index].token_ids),
            drift=m,
            spread=spread(drifts[j]),
            per_seed=[float(v) for v in drifts[j]],
            calibrated=z,
            percentile=baseline.percentile(null_drifts, on_calibration_seeds, null_lengths, tokens, null_reference, mine),
            placebo_drift=None if mine is None else float(mine.mean()),
            significant=bool(flagged),
            direction=direction,
            search_drift=f.search_drift,
            encoder_token_ids={name: list(ids) for name, ids in vocab[f.index].encoder_ids},
        ))
    return entries
