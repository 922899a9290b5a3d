"""benchmarks/gpu_check.py's CPU smoke, in process, so the prepared GPU check cannot rot.

One smoke run (about 20-30 s on a 2-core CPU): the same code path as the full-size check (ComfyUI's
checkpoint loader on a generated SD1.5 checkpoint, the planted edit, audit_models for every
configuration), at the smallest SD1.5-detectable size. The second test feeds the check's
bookkeeping a failing and a wrong configuration without running audits.
"""
import json
import math

import pytest

import gpu_check

PLANTED = set(gpu_check.PLANTED)
EXPECTED = {f"dynamic-{d}/screen/{p}" for d in ("off", "on") for p in ("fp32", "bf16", "fp16")} | {
    f"dynamic-{d}/paper/auto/gc-{g}" for d in ("off", "on") for g in ("off", "on")}


@pytest.fixture(scope="module")
def smoke(bench_env, one_thread, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "summary.json"
    rc = gpu_check.main(["--cpu-smoke", "--json", str(out)], env=bench_env)
    return rc, json.loads(out.read_text()), out


def by_name(summary):
    return {c["name"]: c for c in summary["configurations"]}


def test_smoke_passes_and_writes_one_json_line(smoke, capsys):
    rc, summary, out = smoke
    assert rc == 0 and summary["ok"], summary
    assert summary["sizes"] == "cpu-smoke" and summary["errors"] == [] and summary["planted_missed"] == []
    text = out.read_text()
    assert text.count("\n") == 1 and json.loads(text) == summary


def test_every_configuration_ran_or_says_why_not(smoke):
    _, summary, _ = smoke
    rows = by_name(summary)
    assert set(rows) == EXPECTED
    for name, row in rows.items():
        assert row["status"] in ("ran", "skipped"), (name, row)
        if row["status"] == "skipped":
            assert isinstance(row["reason"], str) and len(row["reason"]) > 10, (name, row)
    assert summary["ran"] + summary["skipped"] == len(EXPECTED)
    if summary["environment"]["device"] == "cpu":
        # no CUDA: Dynamic VRAM and the autocast precisions cannot run, and say so
        for name, row in rows.items():
            if name.startswith("dynamic-on/"):
                assert row["status"] == "skipped" and ("CUDA" in row["reason"] or "ModelPatcherDynamic" in row["reason"])
            elif "/bf16" in name or "/fp16" in name:
                assert row["status"] == "skipped" and "CUDA only" in row["reason"]
            else:
                assert row["status"] == "ran", (name, row)


def test_figures_are_finite_and_positive_where_it_ran(smoke):
    _, summary, _ = smoke
    ran = [c for c in summary["configurations"] if c["status"] == "ran"]
    assert len(ran) >= 3  # the fp32 screen reference and paper mode with and without checkpointing
    for row in ran:
        for key in ("wall_s", "evals_per_s", "unet_forward", "text_forward"):
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]) and row[key] > 0, (row["name"], key, row[key])
        assert row["evals_per_s"] == pytest.approx(row["unet_forward"] / row["wall_s"], rel=1e-2)
        assert len(row["top"]) == row["top_k"]
        if summary["environment"]["device"] != "cpu":
            assert row["peak_allocated_bytes"] > 0
    assert summary["models"]["unet_parameters"] > 1e7 and summary["models"]["text_encoder_parameters"] > 1e7


def test_planted_words_are_found_on_top(smoke):
    _, summary, _ = smoke
    rows = by_name(summary)
    # the smoke list puts them last, so a ranking of equal drifts could not put them first
    assert set(gpu_check.SMOKE_WORDS[:3]).isdisjoint(PLANTED)
    ref = rows["dynamic-off/screen/fp32"]
    assert summary["reference"]["name"] == ref["name"]
    assert set(ref["top"][:3]) == PLANTED, ref["top"]
    assert min(ref["drift"][:3]) > 10 * max(ref["drift"][3:]) and ref["planted_separated"], ref["drift"]
    assert ref["same_set"] and ref["same_order"] and ref["overlap"] == 1.0  # the reference against itself
    for gc in ("off", "on"):
        paper = rows[f"dynamic-off/paper/auto/gc-{gc}"]
        assert paper["report_mode"] == "paper" and paper["unet_backward"] > 0
        assert paper["top_k"] == 1 and paper["top"][0] in PLANTED and paper["planted_on_top"], paper["top"]
        assert paper["drift"][0] > 10 * max(ref["drift"][3:])
        assert set(paper["reference_top"]) <= PLANTED  # the reference's best among paper's candidates


def test_gradient_checkpointing_recomputes_and_changes_nothing(smoke):
    _, summary, _ = smoke
    rows = by_name(summary)
    off, on = rows["dynamic-off/paper/auto/gc-off"], rows["dynamic-off/paper/auto/gc-on"]
    assert on["same_as_without_checkpointing"] and on["top"] == off["top"]
    assert on["unet_backward"] == off["unet_backward"]
    assert on["unet_forward"] > off["unet_forward"]  # recomputed forwards are counted


def test_failures_and_wrong_answers_fail_the_check(bench_env, one_thread, monkeypatch, tmp_path, capsys):
    """A configuration that raises is an error (the others still run); one whose top words are not
    the planted ones misses; either makes the exit status 1."""
    def fake(env, sizes, cfg, models, device):
        if cfg.mode == "paper" and cfg.checkpointing:
            raise RuntimeError("out of memory, say")
        top = ["apple", "river", "chair", "cloud", "horse"] if cfg.mode == "paper" else ["tiger", "castle", "bicycle", "apple", "river"]
        top = top[: sizes.paper_top_k if cfg.mode == "paper" else sizes.screen_top_k]
        n = min(len(top), 3)
        found = len(set(top[:n]) & PLANTED)
        return {"status": "ran", "wall_s": 1.0, "unet_forward": 10, "unet_backward": 0, "text_forward": 1,
                "evals_per_s": 10.0, "top_k": len(top), "top": top, "drift": [1.0] * len(top), "planted_found": found,
                "planted_on_top": found == n, "planted_ok": found == n if cfg.mode == "screen" else found >= 1}

    monkeypatch.setattr(gpu_check, "run_config", fake)
    rc = gpu_check.main(["--cpu-smoke", "--dynamic", "off", "--json", str(tmp_path / "s.json")], env=bench_env)
    summary = json.loads((tmp_path / "s.json").read_text())
    rows = by_name(summary)
    assert rc == 1 and not summary["ok"]
    assert summary["errors"] == ["dynamic-off/paper/auto/gc-on"]
    assert "out of memory" in rows["dynamic-off/paper/auto/gc-on"]["reason"]
    assert summary["planted_missed"] == ["dynamic-off/paper/auto/gc-off"]
    assert rows["dynamic-off/paper/auto/gc-off"]["same_set"] is False
    assert set(rows) == {n for n in EXPECTED if n.startswith("dynamic-off/")}
    assert "NOT OK" in capsys.readouterr().out


def test_without_the_edit_the_check_fails(bench_env, one_thread, monkeypatch, tmp_path):
    """Base and "adapted" identical: every drift is equal, the list's order decides the ranking,
    and the check must not call that a found edit (screen fp32 only, a few seconds)."""
    monkeypatch.setattr(bench_env.demo_models, "clone_with_deltas", lambda model, deltas: model.clone())
    monkeypatch.setattr(gpu_check, "configurations", lambda groups, precision: [gpu_check.Config(False, "screen", "fp32", False)])
    rc = gpu_check.main(["--cpu-smoke", "--dynamic", "off", "--json", str(tmp_path / "s.json")], env=bench_env)
    summary = json.loads((tmp_path / "s.json").read_text())
    (row,) = summary["configurations"]
    assert rc == 1 and not summary["ok"] and summary["planted_missed"] == [row["name"]]
    assert row["status"] == "ran" and not row["planted_ok"] and not row["planted_separated"]
