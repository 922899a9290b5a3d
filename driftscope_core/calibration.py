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

The placebo reference (an extension of the method's calibration; issue 13's null). Some words
drift far more than others under any change at all: in the image world, concepts the base never
learnt to draw ("couch") lead every null adaptation's list. A placebo is a random, diffuse
change of the base of a fixed small size (host: a random low-rank patch of every weight, 1% of
its RMS) that no one made on purpose, measured on the same seeds. The placebo's log drift is a
control variate: a word's score is its log drift minus beta times its log drift under the
placebo, beta the slope of the one on the other over the random words (Theil-Sen, kept within
0..1). Where the adaptation moves words as any change moves them (a diffuse null), beta is near
1 and the score is the ratio to the placebo: a word that is merely fragile scores near its
fellows. Where the placebo's drift says little about the adaptation's (a planted edit of a few
words in a tiny model, whose placebo drifts are mostly chance), beta is near 0 and the score is
the plain one, so the placebo adds no noise of its own. The baseline, threshold and z are then
read on that score as above.
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


def word_scores(per_seed: torch.Tensor, reference: torch.Tensor | None = None, beta: float = 0.0) -> torch.Tensor:
    """log of the mean drift over the calibration seeds, (n, k) per-seed drifts -> (n,) scores;
    with the words' (n, k) drifts under the placebo (`reference`), minus beta times their log."""
    scores = log_drift(per_seed.double().mean(dim=-1))  # (n,)
    if reference is not None:
        scores = scores - beta * log_drift(reference.double().mean(dim=-1))  # (n,)
    return scores


def theil_sen(x: torch.Tensor, y: torch.Tensor) -> float:
    """Median of the pairwise slopes (y_j - y_i) / (x_j - x_i) over pairs with x_j > x_i, for
    (M,) x and y; 0 when no two x differ."""
    dx = x.double()[None, :] - x.double()[:, None]  # (M, M)
    pairs = dx > 0
    if not bool(pairs.any()):
        return 0.0
    return float(((y.double()[None, :] - y.double()[:, None])[pairs] / dx[pairs]).median())


def placebo_slope(per_seed: torch.Tensor, reference: torch.Tensor) -> float:
    """beta of the placebo's control variate: the Theil-Sen slope of the random words' log drift
    (M, k) on their log drift under the placebo (M, k), kept within 0..1."""
    return min(1.0, max(0.0, theil_sen(word_scores(reference), word_scores(per_seed))))


def length_slope(scores: torch.Tensor, lengths: torch.Tensor | None) -> float:
    """Slope of the random words' scores (M,) against log token count (M,): the median of the
    pairwise slopes between words of different counts (Theil-Sen), or 0 when fewer than two
    counts have MIN_PER_LENGTH words each."""
    if lengths is None:
        return 0.0
    counts = torch.bincount(lengths.long())
    if int((counts >= MIN_PER_LENGTH).sum()) < 2:
        return 0.0
    return theil_sen(lengths.double().log(), scores)


@dataclass(frozen=True)
class Baseline:
    """Scores of random candidates on the calibration seeds: the yardstick of the calibrated score."""

    size: int
    seeds: int  # how many seeds each score averages
    median: float  # exp of the median random word's score: its mean drift over the seeds (placebo: divided by the placebo's to the beta; of one token, with a length slope)
    log_scale: float  # robust standard deviation (MAD_TO_STD * MAD) of the random words' scores
    p95: float
    maximum: float
    length_slope: float = 0.0  # log drift per log token count (0: the level does not follow the count)
    reference: str = "none"  # "placebo": scores are log drift minus placebo_slope times the log drift under the placebo
    placebo_slope: float = 0.0  # beta of the placebo's control variate (placebo_slope())

    @staticmethod
    def from_drifts(per_seed: torch.Tensor, lengths: torch.Tensor | None = None,
                    reference: torch.Tensor | None = None) -> "Baseline":
        """`per_seed`: (M, k) drifts of M random words on the k calibration seeds; `lengths`:
        (M,) their token counts (see length_slope); `reference`: their (M, k) drifts under the
        placebo, if there is one."""
        beta = 0.0 if reference is None else placebo_slope(per_seed, reference)
        raw = word_scores(per_seed, reference, beta)  # (M,)
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
            reference="none" if reference is None else "placebo",
            placebo_slope=beta,
        )

    def _level(self, length: int) -> torch.Tensor:
        """The baseline's log score for a word of `length` tokens."""
        return log_drift(self.median) + self.length_slope * torch.log(torch.tensor(float(max(length, 1)), dtype=torch.float64))

    def _check(self, reference: torch.Tensor | None) -> None:
        if (reference is not None) != (self.reference == "placebo"):
            raise ValueError("a word is scored against the placebo exactly when the baseline is")

    def z(self, per_seed: torch.Tensor, length: int = 1, reference: torch.Tensor | None = None) -> float:
        """Robust z-score of a word of `length` tokens from its (k,) drifts on the calibration
        seeds (and its (k,) drifts under the placebo, when the baseline has one); 0 at the
        baseline's level, and when neither the word nor the baseline drifts."""
        self._check(reference)
        mine = word_scores(per_seed[None], None if reference is None else reference[None], self.placebo_slope)[0]
        diff = float(mine - self._level(length))
        if diff == 0.0:
            return 0.0
        return diff / max(self.log_scale, MIN_LOG_SCALE)

    def percentile(self, baseline_per_seed: torch.Tensor, per_seed: torch.Tensor, baseline_lengths=None,
                   length: int = 1, baseline_reference: torch.Tensor | None = None,
                   reference: torch.Tensor | None = None) -> float:
        """Share of the random words (M, k) that score at most what this word (k,) scores, in
        percent, each read against the level of its own token count (and its placebo)."""
        self._check(reference)
        scores = word_scores(baseline_per_seed, baseline_reference, self.placebo_slope)  # (M,)
        if self.length_slope != 0.0 and baseline_lengths is not None:
            scores = scores - self.length_slope * baseline_lengths.double().log()
        mine = word_scores(per_seed[None], None if reference is None else reference[None], self.placebo_slope)[0]
        mine = mine - self.length_slope * torch.log(torch.tensor(float(max(length, 1)), dtype=torch.float64))
        return float((scores <= mine).double().mean() * 100.0)


def z_threshold(false_alarms: float, candidates: int) -> float:
    """Score a word must reach so that `candidates` ordinary words give `false_alarms` flagged
    words in expectation: the normal quantile at 1 - false_alarms / candidates."""
    tail = min(0.5, false_alarms / max(candidates, 1))
    return NormalDist().inv_cdf(1.0 - tail)


def spread(per_seed: torch.Tensor) -> float:
    """Standard deviation across seeds of one word's drift (0 for a single seed)."""
    return float(per_seed.std()) if per_seed.numel() > 1 else 0.0
