"""The benchmark's quick variant as a smoke test: one planted case against its ground truth.

Runs benchmarks/run.py's quick variant in process, the default search mode only (about 2-3
minutes on a 2-core CPU when the truth is not cached yet, well under one when it is), and
asserts the recall floor of issue 3 for the default mode: recall@10 >= 0.9 of the exhaustive
ground truth's top 10 (mean over the three search seeds).
"""
import json

import pytest

import run

RECALL_FLOOR = 0.9


@pytest.fixture(scope="module")
def quick(bench_env, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("bench")
    return run.run_benchmark(bench_env, run.VARIANTS["quick"], modes=["default"], out_dir=out), out


def test_default_mode_recovers_the_truth_top_10_of_a_planted_case(bench_env, quick):
    results, _ = quick
    mode = bench_env.core.settings.AuditSettings().mode
    assert results["default_mode"] == mode and results["modes"] == [mode]
    (case,) = results["cases"]
    assert case["kind"] == "planted" and case["candidates"] >= 150
    summary = case["modes"][mode]
    assert len(summary["per_run"]) == 3
    recall = summary["recall_at_10"]["mean"]
    assert recall >= RECALL_FLOOR, (
        f"{mode} mode recall@10 {recall:.2f} < {RECALL_FLOOR} on {case['name']}; "
        f"truth top 10: {[t['token'] for t in case['truth']['top20'][:10]]}; "
        f"reported: {[r['tokens'][:10] for r in case['runs'][mode]]}")


def test_figures_and_files_are_complete(quick):
    results, out = quick
    (case,) = results["cases"]
    summary = next(iter(case["modes"].values()))
    assert summary["cost"]["unet_forward"] > 0 and summary["cost"]["wall_seconds"] > 0
    assert summary["overlap_at_10"] is not None and summary["spearman_top50"] is not None
    assert case["truth"]["words"] >= case["candidates"]  # every candidate (and every reported word) has a truth
    assert case["truth"]["cost"]["unet_forward"] > 0
    # the top of the truth, where recall is decided, is measured on more seeds than the rest
    truth_settings = run.VARIANTS["quick"].truth
    assert all(t["seeds"] == truth_settings.refine_seeds for t in case["truth"]["top20"])
    assert case["truth"]["seeds_per_word"][str(truth_settings.seeds)] >= case["candidates"] - truth_settings.refine_top - 10
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["cases"][0]["name"] == case["name"]
    table = (out / "results.md").read_text()
    assert case["name"] in table and "R@10" in table


def test_modes_come_from_the_core_at_run_time(bench_env, monkeypatch):
    search = bench_env.core.search
    monkeypatch.setitem(search.SEARCHES, "brand_new", search.SEARCHES["scan"])
    modes = run.resolve_modes(bench_env, None)
    assert modes[0] == bench_env.core.settings.AuditSettings().mode
    assert "brand_new" in modes and set(modes) == set(search.SEARCHES)


def test_parallel_runs_merge_into_one_table(quick):
    results, _ = quick
    other = json.loads(json.dumps(results))
    other["cases"][0]["name"] = "sd15-s9-planted"  # as if another process had run another case
    other["seconds"] = {k: 1.0 for k in other["seconds"]}
    merged = run.merge([results, other])
    assert [c["name"] for c in merged["cases"]] == [results["cases"][0]["name"], "sd15-s9-planted"]
    assert merged["seconds"]["audits"] == pytest.approx(results["seconds"]["audits"] + 1.0)
    assert [t["figures"] for t in merged["targets"]] != [t["figures"] for t in results["targets"]]  # re-checked over both
    assert "merged from 2 runs" in run.markdown(merged)
    with pytest.raises(SystemExit, match="more than one run"):
        run.merge([results, results])
