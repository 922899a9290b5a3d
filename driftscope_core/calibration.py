"""Calibration against random words (after re-scoring on shared seeds).

A random sample of the vocabulary is measured on shared seeds: its distribution is the baseline
of drift that touches every word, whatever the adaptation. A word's calibrated score is its
robust z-score against that baseline on a log scale: drift is a positive size whose spread
across words grows with its level (a change that doubles every word's drift doubles the spread
too), so ratios compare fairly and the tail of ordinary words stays near a normal tail. A score
of 5 means the word drifts exp(5 * log_scale) times as much as the median random word.

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


@dataclass(frozen=True)
class Baseline:
    """Drift of random candidates: the yardstick of the calibrated score."""

    size: int
    median: float  # median drift of the random words
    log_scale: float  # robust standard deviation (MAD_TO_STD * MAD) of their log drift
    p95: float
    maximum: float

    @staticmethod
    def from_drifts(drifts: torch.Tensor) -> "Baseline":
        d = drifts.double()
        logs = log_drift(d)
        mad = (logs - logs.median()).abs().median()
        return Baseline(
            size=int(d.numel()),
            median=float(d.median()),
            log_scale=float(MAD_TO_STD * mad),
            p95=float(torch.quantile(d, 0.95)),
            maximum=float(d.max()),
        )

    def z(self, drift: float) -> float:
        """Robust z-score of log drift; 0 when the drift equals the median, and when neither
        the word nor the baseline drifts at all."""
        diff = float(log_drift(drift) - log_drift(self.median))
        if diff == 0.0:
            return 0.0
        return diff / max(self.log_scale, MIN_LOG_SCALE)

    def percentile(self, drifts: torch.Tensor, drift: float) -> float:
        return float((drifts <= drift).double().mean() * 100.0)


def z_threshold(false_alarms: float, candidates: int) -> float:
    """Score a word must reach so that `candidates` ordinary words give `false_alarms` flagged
    words in expectation: the normal quantile at 1 - false_alarms / candidates."""
    tail = min(0.5, false_alarms / max(candidates, 1))
    return NormalDist().inv_cdf(1.0 - tail)


def spread(per_seed: torch.Tensor) -> float:
    """Standard deviation across seeds of one word's drift (0 for a single seed)."""
    return float(per_seed.std()) if per_seed.numel() > 1 else 0.0
