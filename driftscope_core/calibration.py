"""Calibration against random words (after re-scoring on shared seeds).

A random sample of the vocabulary is measured on the first re-scoring seeds: its distribution is
the baseline of drift that touches every word, whatever the adaptation. A word's calibrated
score is its robust z-score against that baseline on a log scale, from its drift on the same
seeds: drift is a positive size whose spread across words grows with its level (a change that
doubles every word's drift doubles the spread too), so ratios compare fairly and the tail of
ordinary words stays near a normal tail. Sharing the seeds matters: some noise seeds make every
word drift more, and that common factor cancels only when word and baseline saw the same noise.
A score of 5 means the word drifts exp(5 * log_scale) times as much as the median random word.

A word is flagged when its score passes the threshold at which, on a normal baseline, the whole
vocabulary would produce `false_alarms` flagged words on average (a Bonferroni bound): longer
vocabularies need higher scores, so a null adaptation flags about the same few words however
many candidates an audit screens.
"""
from __future__ import annotations

from dataclasses import dataclass

from statistics import NormalDist

import torch

MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its standard deviation
DRIFT_FLOOR = 1e-12  # drifts below this count as no drift (identical models give exact zeros)
MIN_LOG_SCALE = 0.05  # a baseline of near-identical drifts still needs a 5% change per z unit


def log_drift(drift: torch.Tensor | float) -> torch.Tensor:
    """log of the drift, floored at DRIFT_FLOOR."""
    return torch.as_tensor(drift, dtype=torch.float64).clamp_min(DRIFT_FLOOR).log()


def word_scores(per_seed: torch.Tensor) -> torch.Tensor:
    """log of the mean drift over the calibration seeds: (n, k) per-seed drifts -> (n,) scores."""
    return log_drift(per_seed.double().mean(dim=-1))


@dataclass(frozen=True)
class Baseline:
    """Drift of random candidates on the calibration seeds: the yardstick of the calibrated score."""

    size: int
    seeds: int  # how many seeds each score averages
    median: float  # mean drift over the seeds of the median random word
    log_scale: float  # robust standard deviation (MAD_TO_STD * MAD) of the random words' scores
    p95: float
    maximum: float

    @staticmethod
    def from_drifts(per_seed: torch.Tensor) -> "Baseline":
        """`per_seed`: (M, k) drifts of M random words on the k calibration seeds."""
        scores = word_scores(per_seed)  # (M,)
        mid = scores.median()
        return Baseline(
            size=int(scores.numel()),
            seeds=int(per_seed.shape[-1]),
            median=float(mid.exp()),
            log_scale=float(MAD_TO_STD * (scores - mid).abs().median()),
            p95=float(torch.quantile(scores, 0.95).exp()),
            maximum=float(scores.max().exp()),
        )

    def z(self, per_seed: torch.Tensor) -> float:
        """Robust z-score of a word from its (k,) drifts on the calibration seeds; 0 at the
        median, and when neither the word nor the baseline drifts at all."""
        diff = float(word_scores(per_seed[None])[0] - log_drift(self.median))
        if diff == 0.0:
            return 0.0
        return diff / max(self.log_scale, MIN_LOG_SCALE)

    def percentile(self, baseline_per_seed: torch.Tensor, per_seed: torch.Tensor) -> float:
        """Share of the random words (M, k) that score at most what this word (k,) scores, in percent."""
        return float((word_scores(baseline_per_seed) <= word_scores(per_seed[None])[0]).double().mean() * 100.0)


def z_threshold(false_alarms: float, candidates: int) -> float:
    """Score a word must reach so that `candidates` ordinary words give `false_alarms` flagged
    words in expectation: the normal quantile at 1 - false_alarms / candidates."""
    tail = min(0.5, false_alarms / max(candidates, 1))
    return NormalDist().inv_cdf(1.0 - tail)


def spread(per_seed: torch.Tensor) -> float:
    """Standard deviation across seeds of one word's drift (0 for a single seed)."""
    return float(per_seed.std()) if per_seed.numel() > 1 else 0.0
