"""The benchmark's SDXL cases: built from tiny SDXL models, judged as SDXL by the pack, at SDXL's
own pixel size, and in the medium variant."""
import pytest
import torch

import cases as case_lib
import run


@pytest.fixture(scope="module")
def sdxl_cases(bench_env):
    """The medium variant's SDXL cases on a few candidates (one base, built once)."""
    builder = case_lib.CaseBuilder(bench_env, candidates=40, log=lambda _: None)
    specs = [s for s in run.VARIANTS["medium"].specs if s.family == "sdxl"]
    return {s.kind: builder.build(s) for s in specs}


def test_the_medium_variant_has_an_sdxl_planted_case_and_an_sdxl_null():
    kinds = {s.kind for s in run.VARIANTS["medium"].specs if s.family == "sdxl"}
    assert "planted" in kinds and kinds & set(case_lib.NULL_KINDS)


def test_sdxl_cases_are_sdxl_models_with_the_benchmarks_context_width(bench_env, sdxl_cases):
    import comfy.model_base

    for kind, case in sdxl_cases.items():
        family = bench_env.host.check_pair(case.base_model, case.adapted_model, case.base_clip, case.adapted_clip)
        assert family.name == "SDXL", kind
        for model in (case.base_model, case.adapted_model):
            assert isinstance(model.model, comfy.model_base.SDXL), kind
            assert model.model.model_config.unet_config["context_dim"] == case_lib.TEXT_WIDTH
        cond = case.base_clip.encode_from_tokens(case.base_clip.tokenize("a photo of a cat"), return_pooled=True,
                                                 return_dict=True)
        assert cond["cond"].shape[-1] == case_lib.TEXT_WIDTH  # cat(clip_l, clip_g)
        assert cond["pooled_output"].shape[-1] == case_lib.SDXL_ENCODER_WIDTH
        assert case.recipe["family"] == "sdxl" and len(case.words) >= 40


def test_sdxl_planted_case_moves_its_words_and_the_null_has_no_target(sdxl_cases):
    planted = sdxl_cases["planted"]
    assert len(planted.targets) == case_lib.PLANTED_COUNT and set(planted.targets) <= set(planted.words)
    assert planted.info["planted_slot_rel_change"]["mean"] > 1.0  # as SD1.5's at width 256 (1.33)
    assert planted.info["preserved_rel_change"]["mean"] < 0.05
    null = [c for k, c in sdxl_cases.items() if k in case_lib.NULL_KINDS]
    assert null and all(c.targets == () for c in null)


def test_sdxl_runs_at_its_own_pixel_size_and_other_families_keep_theirs(bench_env):
    variant = run.VARIANTS["medium"]
    assert run.truth_settings(variant, "sdxl").width == run.truth_settings(variant, "sdxl").height == 64
    assert run.truth_settings(variant, "sd15") == variant.truth
    assert run.audit_settings(bench_env, "screen", 0, "sdxl")["width"] == 64
    assert run.audit_settings(bench_env, "screen", 0, "sd15")["width"] == run.audit_settings(bench_env, "screen", 0)["width"] == 32


def test_sdxl_models_at_width_64_are_demo_models_tiny_sdxl(bench_env):
    ours, theirs = case_lib.sdxl_models(bench_env.demo_models, 0, 64), bench_env.demo_models.tiny_sdxl(0)
    for a, b in ((ours[0].model.diffusion_model, theirs[0].model.diffusion_model),
                 (ours[1].cond_stage_model, theirs[1].cond_stage_model)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sdxl_lora_trained_is_refused_with_its_reason(bench_env):
    builder = case_lib.CaseBuilder(bench_env, candidates=10, log=lambda _: None)
    with pytest.raises(ValueError, match="no lora_trained case"):
        builder.build(case_lib.CaseSpec("sdxl", 0, "lora_trained"))


def test_a_reduced_variant_is_named_so():
    reduced = run.with_candidates(run.VARIANTS["medium"], 300)
    assert reduced.name == "medium-c300" and reduced.candidates == 300 and "REDUCED" in reduced.note
    assert run.variant_order("medium-c300") == [s.name for s in run.VARIANTS["medium"].specs]
    refined = run.with_candidates(run.VARIANTS["medium"], 150, refine_top=20)
    assert refined.name == "medium-c150-r20" and refined.truth.refine_top == 20
    assert run.variant_order(refined.name) == run.variant_order("medium")


def test_an_explored_setting_is_named_so_and_reaches_every_audit(bench_env, monkeypatch):
    monkeypatch.setattr(run, "SETTING_OVERRIDES", {})
    explored = run.with_settings(run.with_candidates(run.VARIANTS["medium"], 150, refine_top=20), bench_env,
                                 ["rescore_seeds=16"])
    assert explored.name == "medium-c150-r20-rescore_seeds16" and "EXPLORED" in explored.note
    assert run.variant_order(explored.name) == run.variant_order("medium")
    for mode in ("default", "scan"):
        assert run.audit_settings(bench_env, mode, 0, "sdxl")["rescore_seeds"] == 16
    with pytest.raises(SystemExit, match="field of AuditSettings"):
        run.with_settings(run.VARIANTS["medium"], bench_env, ["rescore_sedes=16"])
