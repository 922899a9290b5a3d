"""Calibrated scores: robust z of log drift against random words on shared seeds, flagged past
a threshold that keeps the expected number of ordinary words flagged per audit fixed."""
import pytest
import torch

from driftscope_core.calibration import Baseline, z_threshold


def lognormal(n, k=1, median=1e-3, sigma=0.4, seed=0):
    """(n, k) drifts: n ordinary words on k seeds."""
    g = torch.Generator().manual_seed(seed)
    return median * torch.exp(sigma * torch.randn(n, k, generator=g, dtype=torch.float64))


def one(d):
    return torch.tensor([d], dtype=torch.float64)


def test_scores_do_not_depend_on_the_drift_unit():
    drifts = lognormal(64)
    a, b = Baseline.from_drifts(drifts), Baseline.from_drifts(drifts * 1000.0)
    for d in (2e-3, 5e-3, 2e-2):
        assert a.z(one(d)) == pytest.approx(b.z(one(d * 1000.0)), rel=1e-9)


def test_score_is_the_number_of_log_deviations_from_the_median():
    base = Baseline.from_drifts(lognormal(4000, median=1e-3, sigma=0.4))
    assert base.log_scale == pytest.approx(0.4, rel=0.06)
    assert base.z(one(1e-3 * float(torch.exp(torch.tensor(0.4 * 5))))) == pytest.approx(5.0, rel=0.08)
    assert base.z(one(base.median)) == 0.0


def test_a_noise_seed_that_lifts_every_word_cancels_out():
    # every word drifts 3x more on the second seed; a word 2x the median stays 2x the median
    words = lognormal(200, k=1, seed=3)
    base_1, base_2 = Baseline.from_drifts(words), Baseline.from_drifts(words * 3.0)
    assert base_1.z(one(2 * base_1.median)) == pytest.approx(base_2.z(one(2 * base_2.median)))


def test_identical_models_score_zero_and_a_lone_drift_scores_high():
    zero = Baseline.from_drifts(torch.zeros(32, 2))
    assert zero.z(torch.zeros(2)) == 0.0
    assert zero.z(torch.full((2,), 1e-4)) > 100


@pytest.mark.parametrize("candidates", [60, 2_000])
def test_threshold_keeps_false_alarms_per_audit_fixed(candidates):
    # ordinary words only: about false_alarms of every `candidates` words are flagged
    base = Baseline.from_drifts(lognormal(64, seed=1))
    words = lognormal(40_000, seed=2)
    thr = z_threshold(0.05, candidates)
    flagged = sum(base.z(w) >= thr for w in words)
    assert flagged / len(words) * candidates <= 0.2


def test_longer_vocabularies_need_higher_scores():
    assert z_threshold(0.05, 60) == pytest.approx(3.14, abs=0.01)
    assert z_threshold(0.05, 10_000) == pytest.approx(4.42, abs=0.01)
    assert z_threshold(0.05, 60) < z_threshold(0.05, 2_000) < z_threshold(0.05, 50_000)


def test_the_baseline_level_follows_the_token_count_where_random_words_span_counts():
    """Words of more tokens drift less (their map averages more tokens): a random sample of one-,
    two- and three-token words whose log drift falls by 1.0 per log token count gives a slope
    near -1, and a one-token word at its own level is not flagged just for having one token;
    a sample of one-token words (CLIP's usual case) keeps the plain baseline."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([1, 2, 3] * 30)  # (90,)
    level = -7.0 - 1.0 * lengths.double().log()
    drifts = (level + 0.2 * torch.randn(90, generator=g, dtype=torch.float64)).exp()[:, None]  # (90, 1)
    base = Baseline.from_drifts(drifts, lengths)
    assert -1.15 < base.length_slope < -0.85
    one_token_word = torch.tensor([float(torch.tensor(-7.0).exp())])
    assert abs(base.z(one_token_word, 1)) < 1.0
    # the same random words read without their counts put the one-token word well above their median
    assert Baseline.from_drifts(drifts).z(one_token_word) > base.z(one_token_word, 1) + 1.0
    single = Baseline.from_drifts(drifts[:30], torch.ones(30, dtype=torch.long))
    assert single.length_slope == 0.0


def test_a_fragile_word_is_not_flagged_against_the_placebo_and_a_targeted_one_is():
    """Random words whose drift under the adaptation follows their drift under the placebo (a
    diffuse null: each word moves as much as it moves under any change): beta comes out near 1,
    a word that moves 100x the median under both (the null's "couch") is flagged on raw drift
    but not against the placebo, and a word the adaptation moved 100x while the placebo moved it
    as any other word stays flagged."""
    g = torch.Generator().manual_seed(4)
    common = lognormal(200, sigma=1.0, seed=5)  # (200, 1) how much each random word moves under any change
    adapted = common * torch.exp(0.2 * torch.randn(200, 1, generator=g, dtype=torch.float64))
    placebo = common * torch.exp(0.2 * torch.randn(200, 1, generator=g, dtype=torch.float64))
    raw, against = Baseline.from_drifts(adapted), Baseline.from_drifts(adapted, reference=placebo)
    assert against.reference == "placebo" and raw.reference == "none"
    assert 0.85 < against.placebo_slope <= 1.0
    thr = z_threshold(0.05, 200)
    fragile = one(100 * raw.median)
    assert raw.z(fragile) >= thr
    assert abs(against.z(fragile, reference=fragile)) < 1.0
    assert against.z(fragile, reference=one(raw.median)) >= thr
    with pytest.raises(ValueError):
        against.z(fragile)  # a placebo baseline needs the word's placebo drift too


def test_a_placebo_that_says_nothing_about_the_adaptation_changes_little():
    """Placebo drifts independent of the adaptation's (mostly chance, as in a tiny model): beta
    near 0, and a targeted word scores about what it scores without the placebo."""
    adapted, placebo = lognormal(200, seed=6), lognormal(200, seed=7)
    raw, against = Baseline.from_drifts(adapted), Baseline.from_drifts(adapted, reference=placebo)
    assert against.placebo_slope < 0.25
    word = one(float(torch.exp(torch.tensor(2.0))) * raw.median)
    assert against.z(word, reference=one(3 * raw.median)) == pytest.approx(raw.z(word), abs=0.8)
