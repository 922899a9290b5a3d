"""Re-scoring on shared seeds and calibration against random words.

Every reported word is measured again on one shared set of seeds, so scores compare across
words (the reference scores each word on its own noise). A random sample of the vocabulary is
measured the same way: its distribution is the baseline of drift that touches every word, and a
word's calibrated score is its robust z-score against it (median and MAD).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAD_TO_STD = 1.4826  # MAD of a normal distribution times this is its standard deviation


@dataclass(frozen=True)
class Baseline:
    """Drift of random candidates: the yardstick of the calibrated score."""

    size: int
    median: float
    scale: float  # robust standard deviation (MAD_TO_STD * MAD)
    p95: float
    maximum: float

    @staticmethod
    def from_drifts(drifts: torch.Tensor) -> "Baseline":
        d = drifts.double()
        med = d.median()
        mad = (d - med).abs().median()
        return Baseline(
            size=int(d.numel()),
            median=float(med),
            scale=float(MAD_TO_STD * mad),
            p95=float(torch.quantile(d, 0.95)),
            maximum=float(d.max()),
        )

    def z(self, drift: float) -> float:
        """Robust z-score; 0 when the drift equals the median, even if every word drifts alike."""
        diff = drift - self.median
        if diff == 0.0:
            return 0.0
        floor = 1e-12 + 1e-6 * abs(self.median)  # identical drifts must not give inf for noise
        return diff / max(self.scale, floor)

    def percentile(self, drifts: torch.Tensor, drift: float) -> float:
        return float((drifts <= drift).double().mean() * 100.0)


def spread(per_seed: torch.Tensor) -> float:
    """Standard deviation across seeds of one word's drift (0 for a single seed)."""
    return float(per_seed.std()) if per_seed.numel() > 1 else 0.0
