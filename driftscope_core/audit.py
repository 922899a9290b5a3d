"""The audit: search, re-score on shared seeds, calibrate, report (method steps 1-7 end to end)."""
from __future__ import annotations

import time
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


class _Stages:
    """Turns per-stage (done, total) into one overall fraction for a callback(dict), and
    records each stage's evaluations per model side."""

    def __init__(self, callback: Callback | None, sides: tuple[ModelSide, ...]):
        self.callback, self.sides = callback, sides
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
        """Start stage `name` (ending the previous one) and return its progress function."""
        self.close()
        self._current = (name, {s.name: s.counts.as_dict() for s in self.sides})
        weight, start = STAGE_WEIGHTS[name], self.offset
        self.offset += weight

        def report(done: int, total: int) -> None:
            if self.callback is not None:
                overall = start + weight * (done / max(total, 1))
                self.callback({"stage": name, "done": done, "total": total, "overall": overall})

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
) -> DriftReport:
    """Run one audit. `callback(dict)` gets progress and may raise to cancel."""
    settings.validate()
    sampling = SamplingSettings(
        latent_shape=(latent_channels, settings.height // 8, settings.width // 8),
        kept_steps=settings.kept_steps,
        cfg=settings.cfg,
        objective=settings.objective,
    )
    stages = _Stages(callback, (base, adapted))
    timings: dict[str, float] = {}
    meter = DriftMeter(base, adapted, vocab, templates, schedule, sampling, runtime)

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
    null_drifts = meter.score(null_words, calibration_seeds, stages.stage("calibrate"))  # (M, k)
    timings["calibrate"] = time.perf_counter() - t
    stages.close()

    notes = []
    if null_drifts.shape[0] < 8:
        notes.append(
            f"only {null_drifts.shape[0]} words were left for calibration; the baseline also uses the "
            "reported words, so calibrated scores are weak. Use a larger vocabulary."
        )
        null_drifts = torch.cat([null_drifts, drifts[:, : len(calibration_seeds)]])
    baseline = Baseline.from_drifts(null_drifts)
    threshold = z_threshold(settings.false_alarms, len(vocab))
    entries = _entries(vocab, findings, drifts, baseline, null_drifts, threshold, settings.direction)
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
        evaluations={base.name: base.counts.as_dict(), adapted.name: adapted.counts.as_dict()},
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


def _entries(vocab, findings, drifts, baseline: Baseline, null_drifts, threshold: float, direction: str) -> list[ReportEntry]:
    """Rank the reported words by their re-scored drift (n, R) and attach calibrated scores,
    computed on the calibration seeds (the first baseline.seeds of the R)."""
    means = drifts.mean(dim=1)  # (n,)
    order = torch.argsort(means, descending=(direction == "most"))
    entries = []
    for rank, j in enumerate(order.tolist(), start=1):
        f, m = findings[j], float(means[j])
        on_calibration_seeds = drifts[j, : baseline.seeds]  # (k,)
        z = baseline.z(on_calibration_seeds)
        flagged = z >= threshold if direction == "most" else z <= -threshold
        entries.append(ReportEntry(
            rank=rank,
            token=vocab[f.index].text,
            token_ids=list(vocab[f.index].token_ids),
            drift=m,
            spread=spread(drifts[j]),
            per_seed=[float(v) for v in drifts[j]],
            calibrated=z,
            percentile=baseline.percentile(null_drifts, on_calibration_seeds),
            significant=bool(flagged),
            direction=direction,
            search_drift=f.search_drift,
        ))
    return entries
