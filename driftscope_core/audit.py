"""The audit: search, re-score on shared seeds, calibrate, report (method steps 1-7 end to end)."""
from __future__ import annotations

import time
from typing import Callable

import torch

from . import __version__
from .calibration import Baseline, spread
from .meter import DriftMeter, SamplingSettings
from .models import ModelSide, Runtime
from .prompts import Template
from .report import DriftReport, ReportEntry
from .sampling import Schedule
from .search import SEARCHES
from .settings import AuditSettings
from .vocabulary import Vocabulary

Callback = Callable[[dict], None]

# Share of the progress bar each stage gets.
STAGE_WEIGHTS = {"search": 0.7, "rescore": 0.3}


class _Stages:
    """Turns per-stage (done, total) into one overall fraction for a callback(dict)."""

    def __init__(self, callback: Callback | None):
        self.callback = callback
        self.offset = 0.0

    def stage(self, name: str):
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
    stages = _Stages(callback)
    timings: dict[str, float] = {}
    meter = DriftMeter(base, adapted, vocab, templates, schedule, sampling, runtime)

    t = time.perf_counter()
    findings = SEARCHES[settings.mode](meter, settings, stages.stage("search"))
    timings["search"] = time.perf_counter() - t

    t = time.perf_counter()
    reported = [f.index for f in findings]
    null_words = vocab.sample(settings.calibration_size, settings.seed, exclude=reported)
    rescore_seeds = settings.derived_seeds("rescore", settings.rescore_seeds)
    drifts = meter.score(reported + null_words, rescore_seeds, stages.stage("rescore"))  # (n, R)
    timings["rescore"] = time.perf_counter() - t

    notes = []
    null_means = drifts[len(reported):].mean(dim=1)
    if null_means.numel() < 8:
        notes.append(
            f"only {null_means.numel()} words were left for calibration; the baseline also uses the "
            "reported words, so calibrated scores are weak. Use a larger vocabulary."
        )
        null_means = drifts.mean(dim=1)
    baseline = Baseline.from_drifts(null_means)
    entries = _entries(vocab, findings, drifts[: len(reported)], baseline, null_means, settings)
    return DriftReport(
        entries=entries,
        settings=settings.as_dict(),
        seeds={"search": settings.derived_seeds("search", settings.noise_batch),
               "screen": settings.derived_seeds("screen", settings.screen_seeds) if settings.mode == "screen" else [],
               "rescore": rescore_seeds, "calibration_words": [vocab[i].text for i in null_words]},
        models=models or {},
        vocabulary={"name": vocab.name, "size": len(vocab)},
        templates=[t.text for t in templates],
        baseline=baseline.__dict__,
        timings=timings,
        evaluations={base.name: base.counts.as_dict(), adapted.name: adapted.counts.as_dict()},
        notes=notes + [f"driftscope {__version__}"],
    )


def _entries(vocab, findings, drifts, baseline: Baseline, null_means, settings: AuditSettings) -> list[ReportEntry]:
    """Rank the reported words by their re-scored drift and attach calibrated scores."""
    means = drifts.mean(dim=1)  # (n,)
    order = torch.argsort(means, descending=(settings.direction == "most"))
    entries = []
    for rank, j in enumerate(order.tolist(), start=1):
        f, m = findings[j], float(means[j])
        z = baseline.z(m)
        flagged = z >= settings.z_threshold if settings.direction == "most" else z <= -settings.z_threshold
        entries.append(ReportEntry(
            rank=rank,
            token=vocab[f.index].text,
            token_ids=list(vocab[f.index].token_ids),
            drift=m,
            spread=spread(drifts[j]),
            per_seed=[float(v) for v in drifts[j]],
            calibrated=z,
            percentile=baseline.percentile(null_means, m),
            significant=bool(flagged),
            direction=settings.direction,
            search_drift=f.search_drift,
        ))
    return entries
