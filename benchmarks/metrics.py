"""How right an audit is against the ground truth, and how stable across search seeds.

Plain Python on ranked lists of words (most drifted first); no torch, no ComfyUI.
"""
from __future__ import annotations

from itertools import combinations
from typing import Sequence


def recall_at(reported: Sequence[str], truth_ranking: Sequence[str], k: int) -> float:
    """Share of the truth's top k among the report's top k."""
    return len(set(reported[:k]) & set(truth_ranking[:k])) / k


def _average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of `values` (ascending), ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation with average ranks for ties; None if either side is constant."""
    rx, ry = _average_ranks(x), _average_ranks(y)
    n = len(rx)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return None
    return cov / (vx * vy) ** 0.5


def spearman_top(reported: Sequence[str], truth_ranking: Sequence[str], n: int = 50) -> float | None:
    """Rank correlation on the truth's top n: each of those words' truth rank against its rank in
    the report, words the report does not list sharing the rank after its last entry. A report
    that lists the truth's top words in the truth's order scores high; one that misses them or
    orders them differently scores low (0 when it lists none of them)."""
    top = list(truth_ranking[:n])
    position = {w: i + 1 for i, w in enumerate(reported)}
    unlisted = len(reported) + 1
    method = [position.get(w, unlisted) for w in top]
    rho = spearman(list(range(1, len(top) + 1)), method)
    return 0.0 if rho is None else rho


def overlap_at(rankings: Sequence[Sequence[str]], k: int = 10) -> float | None:
    """Mean pairwise overlap |A_k & B_k| / k of the top k across runs (None for fewer than 2 runs)."""
    pairs = list(combinations(rankings, 2))
    if not pairs:
        return None
    return sum(len(set(a[:k]) & set(b[:k])) / k for a, b in pairs) / len(pairs)


def per_ten_thousand(count: int, candidates: int) -> float:
    return count / candidates * 1e4


def mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
