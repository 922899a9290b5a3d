"""benchmarks/metrics.py: the figures, on hand-made rankings (no models)."""
import pytest

import metrics

TRUTH = [f"w{i}" for i in range(60)]  # most drifted first


def test_recall_counts_the_truth_top_k_inside_the_report_top_k():
    assert metrics.recall_at(TRUTH[:10], TRUTH, 10) == 1.0
    assert metrics.recall_at(TRUTH[5:15], TRUTH, 10) == 0.5
    # a truth top-10 word reported at rank 11 does not count for recall@10
    assert metrics.recall_at(["x"] + TRUTH[:9] + ["w9"], TRUTH, 10) == 0.9


def test_spearman_top_rewards_order_and_coverage():
    assert 0.8 < metrics.spearman_top(TRUTH[:20], TRUTH, 50) < 1.0  # right order, 30 words unlisted (tied)
    assert metrics.spearman_top(TRUTH[:50], TRUTH, 50) == pytest.approx(1.0)
    assert metrics.spearman_top(list(reversed(TRUTH[:50])), TRUTH, 50) == pytest.approx(-1.0)
    assert metrics.spearman_top(["a", "b"], TRUTH, 50) == 0.0  # lists none of the truth's top 50
    assert metrics.spearman_top(TRUTH[:20], TRUTH, 50) > metrics.spearman_top(list(reversed(TRUTH[:20])), TRUTH, 50)


def test_spearman_handles_ties_and_constants():
    assert metrics.spearman([1, 2, 3], [1, 1, 1]) is None
    assert metrics.spearman([1, 2, 3, 4], [1, 2, 2, 4]) == pytest.approx(0.9486833)


def test_overlap_is_the_mean_over_pairs():
    a, b, c = TRUTH[:10], TRUTH[:10], TRUTH[5:15]
    assert metrics.overlap_at([a, b, c], 10) == pytest.approx((1.0 + 0.5 + 0.5) / 3)
    assert metrics.overlap_at([a], 10) is None


def test_rate_per_ten_thousand():
    assert metrics.per_ten_thousand(1, 2000) == 5.0
