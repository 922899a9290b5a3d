"""Calibration against random words (after re-scoring on shared seeds).

A random sample of the vocabulary is measured on the first re-scoring seeds: its distribution is
the baseline of drift that touches every word, whatever the adaptation. A word's calibrated
score is its robust z-score against that baseline on a log scale, from its drift on the same
seeds: drift is a positive size whose spread across words grows with its level (a change that
doubles every word's drift doubles the spread too), so ratios compare fairly and the tail of
ordinary words stays near a normal tail. Sharing the seeds matters: some noise seeds make every
word drift more, and that common factor cancels only when word and baseline saw the same noise.
A score of 5 means the word drifts exp(5 * log_scale) times as much as the median random word.

Words of several tokens: the slot map averages the word's tokens, so a word of many tokens
(T5 splits most words into pieces) drifts less than a one-token word from the same change; in
Flux's null case one-piece words were 46 of the 47 flagged. When the random words span token
counts (at least MIN_PER_LENGTH words at each of two counts), the baseline's level follows the
count: log drift = level + slope * log(tokens), the slope a Theil-Sen estimate over the random
words, and every score is read against the level for its own count. CLIP's candidates are one
token each almost always, and there the baseline is the one above.

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
MIN_PER_LENGTH = 8  # random words of one token count needed before the level may follow the count


def log_drift(drift: torch.Tensor | float) -> torch.Tensor:
    """log of the drift, floored at DRIFT_FLOOR."""
    return torch.as_tensor(drift, dtype=torch.float64).clamp_min(DRIFT_FLOOR).log()


def word_scores(per_seed: torch.Tensor) -> torch.Tensor:
    """log of the mean drift over the calibration seeds: (n, k) per-seed drifts -> (n,) scores."""
    return log_drift(per_seed.double().mean(dim=-1))


def length_slope(scores: torch.Tensor, lengths: torch.Tensor | None) -> float:
    """Slope of the random words' scores (M,) against log token count (M,): the median of the
    pairwise slopes between words of different counts (Theil-Sen), or 0 when fewer than two
    counts have MIN_PER_LENGTH words each."""
    if lengths is None:
        return 0.0
    counts = torch.bincount(lengths.long())
    if int((counts >= MIN_PER_LENGTH).sum()) < 2:
        return 0.0
    x = lengths.double().log()  # (M,)
    dx = x[None, :] - x[:, None]  # (M, M)
    pairs = dx > 0
    slopes = (scores[None, :] - scores[:, None])[pairs] / dx[pairs]
    return float(slopes.median())


@dataclass(frozen=True)
class Baseline:
    """Drift of random candidates on the calibration seeds: the yardstick of the calibrated score."""

    size: int
    seeds: int  # how many seeds each score averages
    median: float  # mean drift over the seeds of the median random word (of one token, with a length slope)
    log_scale: float  # robust standard deviation (MAD_TO_STD * MAD) of the random words' scores
    p95: float
    maximum: float
    length_slope: float = 0.0  # log drift per log token count (0: the level does not follow the count)

    @staticmethod
    def from_drifts(per_seed: torch.Tensor, lengths: torch.Tensor | None = None) -> "Baseline":
        """`per_seed`: (M, k) drifts of M random words on the k calibration seeds; `lengths`:
        (M,) their token counts (see length_slope)."""
        raw = word_scores(per_seed)  # (M,)
        slope = length_slope(raw, lengths)
        scores = raw if slope == 0.0 else raw - slope * lengths.double().log()  # (M,) at one token's level
        mid = scores.median()
        return Baseline(
            size=int(scores.numel()),
            seeds=int(per_seed.shape[-1]),
            median=float(mid.exp()),
            log_scale=float(MAD_TO_STD * (scores - mid).abs().median()),
            p95=float(torch.quantile(scores, 0.95).exp()),
            maximum=float(scores.max().exp()),
            length_slope=slope,
        )

    def _level(self, length: int) -> torch.Tensor:
        """The baseline's log drift for a word of `length` tokens."""
        return log_drift(self.median) + self.length_slope * torch.log(torch.tensor(float(max(length, 1)), dtype=torch.float64))

    def z(self, per_seed: torch.Tensor, length: int = 1) -> float:
        """Robust z-score of a word of `length` tokens from its (k,) drifts on the calibration
        seeds; 0 at the baseline's level, and when neither the word nor the baseline drifts."""
        diff = float(word_scores(per_seed[None])[0] - self._level(length))
        if diff == 0.0:
            return 0.0
        return diff / max(self.log_scale, MIN_LOG_SCALE)

    def percentile(self, baseline_per_seed: torch.Tensor, per_seed: torch.Tensor, baseline_lengths=None,
                   length: int = 1) -> float:
        """Share of the random words (M, k) that score at most what this word (k,) scores, in
        percent, each read against the level of its own token count."""
        scores = word_scores(baseline_per_seed)
        if self.length_slope != 0.0 and baseline_lengths is not None:
            scores = scores - self.length_slope * baseline_lengths.double().log()
        mine = word_scores(per_seed[None])[0] - self.length_slope * torch.log(torch.tensor(float(max(length, 1)), dtype=torch.float64))
        return float((scores <= mine).double().mean() * 100.0)


def z_threshold(false_alarms: float, candidates: int) -> float:
    """Score a word must reach so that `candidates` ordinary words give `false_alarms` flagged
    words in expectation: the normal quantile at 1 - false_alarms / candidates."""
    tail = min(0.5, false_alarms / max(candidates, 1))
    return NormalDist().inv_cdf(1.0 - tail)


def spread(per_seed: torch.Tensor) -> float:
    """Standard deviation across seeds of one word's drift (0 for a single seed)."""
    return float(per_seed.std()) if per_seed.numel() > 1 else 0.0
