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


def _truth(per_seed):
    import ground_truth

    return ground_truth.Truth("hand-made", per_seed, {"seeds": 8}, {})


def test_seed_agreement_is_high_for_separated_words_and_low_for_a_continuum():
    import random

    import run

    rng = random.Random(0)
    # 40 refined words (32 seeds) and 100 others (8 seeds); noise std 1
    separated = {f"w{i}": [100.0 - 2 * i + rng.gauss(0, 1) for _ in range(32)] for i in range(40)}
    separated.update({f"o{i}": [rng.gauss(0, 1) for _ in range(8)] for i in range(100)})
    continuum = {f"w{i}": [10.0 - 0.01 * i + rng.gauss(0, 1) for _ in range(32)] for i in range(40)}
    continuum.update({f"o{i}": [rng.gauss(0, 1) for _ in range(8)] for i in range(100)})
    sep = run.seed_agreement(_truth(separated), list(separated))
    cont = run.seed_agreement(_truth(continuum), list(continuum))
    assert sorted(sep) == ["12", "4", "8"]  # 24 refinement seeds: 6, 3 and 2 groups
    assert all(v == 1.0 for v in sep.values())
    assert all(v < 0.6 for v in cont.values())
    assert cont["12"] >= cont["4"] - 0.1  # more seeds per word agree at least about as well


def test_seed_groups_skip_the_seeds_that_chose_the_refined_words():
    import run

    # the first 8 seeds favour w30..w39, every later seed w0..w9: the groups must see only the latter
    per_seed = {f"w{i}": [float(i >= 30)] * 8 + [float(i < 10)] * 24 for i in range(40)}
    truth = _truth(per_seed)
    groups = truth.seed_group_rankings(list(per_seed), 4, skip=8)
    assert len(groups) == 6
    assert all(set(g[:10]) == {f"w{i}" for i in range(10)} for g in groups)
    assert run.seed_agreement(truth, list(per_seed)) == {"4": 1.0, "8": 1.0, "12": 1.0}


def _results(date, commit, modes, case_names=("sd15-s0-null_identical",)):
    def case(name):
        return {"name": name, "kind": "null_identical", "recipe": {"kind": "null_identical"}, "candidates": 150,
                "truth": {"cache_file": "x.pt"}, "errors": {},
                "modes": {m: {"significant": {"per_10k": 0.0}, "overlap_at_10": 1.0, "ran_at": commit} for m in modes},
                "runs": {m: [{"wall_seconds": 10.0}] for m in modes}, "settings_used": {m: {} for m in modes}}
    return {"variant": "quick", "date": date, "machine": {"git_commit": commit}, "modes": list(modes),
            "default_mode": "screen", "mode_settings": {m: {} for m in modes}, "only_kinds": {},
            "cases": [case(n) for n in case_names],
            "seconds": {"cases": 5.0, "truth_this_run": 7.0, "audits": 10.0 * len(modes), "total": 99.0}}


def test_merge_replaces_one_mode_of_an_earlier_run():
    import run

    old = _results("2026-01-01 00:00 UTC", "aaa", ["screen", "scan", "paper"])
    new = _results("2026-02-01 00:00 UTC", "bbb", ["screen", "scan"])
    merged = run.merge([run.only_modes(old, ["paper"]), new])
    case = merged["cases"][0]
    assert list(case["modes"]) == ["screen", "scan", "paper"]  # the earlier run's order
    assert {m: case["modes"][m]["ran_at"] for m in case["modes"]} == {"screen": "bbb", "scan": "bbb", "paper": "aaa"}
    assert merged["seconds"]["audits"] == 30.0  # the kept paper audit (10 s) and the new run's 20 s
    assert [(r["commit"], r["modes"]) for r in merged["merged"]] == [("aaa", ["paper"]), ("bbb", ["screen", "scan"])]
    assert "(paper only)" in run._resumed(merged)


def test_merge_refuses_a_mode_measured_twice_or_a_case_built_differently():
    import run

    old = _results("2026-01-01 00:00 UTC", "aaa", ["screen", "paper"])
    new = _results("2026-02-01 00:00 UTC", "bbb", ["screen"])
    with pytest.raises(SystemExit, match="screen of case sd15-s0-null_identical"):
        run.merge([old, new])
    other = run.only_modes(old, ["paper"])
    other["cases"][0]["truth"] = {"cache_file": "another-truth.pt"}
    with pytest.raises(SystemExit, match="built differently"):
        run.merge([other, new])


def test_targets_take_a_mean_of_tenths_at_its_value():
    import run

    overlap = metrics.mean([0.6, 0.7, 0.8])
    assert overlap < 0.7  # 0.6999999999999998: a plain >= would miss a target met exactly
    results = _results("2026-01-01 00:00 UTC", "aaa", ["screen"])
    results["cases"][0].update(kind="planted")
    results["cases"][0]["modes"]["screen"].update(recall_at_10={"mean": metrics.mean([1.0, 0.9, 0.8])}, overlap_at_10=overlap)
    met = {t["target"]: t["met"] for t in run.targets_check(results)}
    assert met == {"recall@10 >= 0.9 on every planted case": True,
                   "top-10 overlap across search seeds >= 0.7 (non-null cases)": True}
    results["cases"][0]["modes"]["screen"]["overlap_at_10"] = metrics.mean([0.6, 0.7, 0.7])
    assert not [t for t in run.targets_check(results) if "overlap" in t["target"]][0]["met"]
