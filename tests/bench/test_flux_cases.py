"""The benchmark's Flux cases: tiny Flux.1 dev models judged as Flux by the pack, planted words
that are one T5 piece each, audits and truth at Flux's own pixel size, CFG 1, guidance 3.5 and
the "simple" scheduler, in the medium variant; and the SD families' truth cache keys as before."""
import hashlib
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import cases as case_lib
import ground_truth
import run


@pytest.fixture(scope="module")
def flux_cases(bench_env):
    """The medium variant's Flux cases on a few candidates (one base, built once)."""
    builder = case_lib.CaseBuilder(bench_env, candidates=20, log=lambda _: None)
    specs = [s for s in run.VARIANTS["medium"].specs if s.family == "flux"]
    return {s.kind: builder.build(s) for s in specs}


def test_the_medium_variant_has_a_flux_planted_case_and_a_flux_null():
    names = {s.name for s in run.VARIANTS["medium"].specs if s.family == "flux"}
    assert names == {"flux-s0-planted", "flux-s0-null_diffuse"}


def test_flux_cases_are_flux_dev_models(bench_env, flux_cases):
    import comfy.model_base

    for kind, case in flux_cases.items():
        family = bench_env.host.check_pair(case.base_model, case.adapted_model, case.base_clip, case.adapted_clip)
        assert family.name == "Flux.1" and family.variant(case.base_model) == "dev", kind
        assert family.sampling_defaults(case.base_model) == {"cfg": 1.0, "guidance": 3.5}
        for model in (case.base_model, case.adapted_model):
            assert isinstance(model.model, comfy.model_base.Flux), kind
            assert model.model.latent_format.latent_channels == 16
        assert case.recipe["family"] == "flux" and case.recipe["text_width"] == case_lib.FLUX_TEXT_WIDTH
        assert case.base_model.model.model_config.unet_config["context_in_dim"] == case_lib.FLUX_TEXT_WIDTH
        assert len(case.words) >= 20


def test_flux_planted_words_are_single_t5_pieces_and_moved(bench_env, flux_cases):
    planted = flux_cases["planted"]
    t5 = planted.base_clip.tokenizer.t5xxl.tokenizer
    assert len(planted.targets) == case_lib.PLANTED_COUNT and set(planted.targets) <= set(planted.words)
    assert all(len(t5(w)["input_ids"]) == 2 for w in planted.targets), planted.targets  # piece + end token
    assert all(case_lib.t5_pieces(planted.base_clip, w) == 1 for w in planted.targets)
    assert case_lib.effective_weights_digest(planted.adapted_model) != case_lib.effective_weights_digest(planted.base_model)
    assert planted.info["planted_slot_rel_change"]["mean"] > 1.0  # about 1.15
    assert planted.info["template_rel_change"]["mean"] < 0.05
    null = flux_cases["null_diffuse"]
    assert null.targets == () and null.info["patched_tensors"] > 0


def test_flux_runs_at_its_own_size_cfg_guidance_and_scheduler(bench_env):
    variant = run.VARIANTS["medium"]
    st = run.truth_settings(variant, "flux")
    assert (st.width, st.height, st.cfg, st.guidance, st.scheduler) == (64, 64, 1.0, 3.5, "simple")
    audit = run.audit_settings(bench_env, "screen", 0, "flux")
    assert (audit["width"], audit["cfg"], audit["guidance"]) == (64, 1.0, 3.5)
    assert run.audit_scheduler("flux") == "simple"
    # the other families keep theirs
    assert run.truth_settings(variant, "sd15") == variant.truth
    assert run.audit_scheduler("sd15") == run.audit_scheduler("sdxl") == variant.truth.scheduler == "normal"
    for family in ("sd15", "sd2", "sdxl"):
        a = run.audit_settings(bench_env, "screen", 0, family)
        assert a["cfg"] == 7.5 and "guidance" not in a


# The truth's definition before Flux (commit e595fff): the cache keys of the SD families' truths.
OLD_DEFINITION = {"seeds": 8, "schedule_steps": 20, "width": 32, "height": 32, "cfg": 7.5, "objective": "attention",
                  "scheduler": "normal", "template": "a photo of a {}"}


def _old_key(definition: dict, case) -> str:
    key = json.dumps({"v": 1, "truth": definition, "case": case.fingerprint}, sort_keys=True)
    return f"{case.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"


def test_sd_truth_cache_keys_are_unchanged():
    variant = run.VARIANTS["medium"]
    case = SimpleNamespace(name="sd15-s0-planted", fingerprint="0" * 64)
    for family, size in (("sd15", 32), ("sd2", 32), ("sdxl", 64)):
        st = run.truth_settings(variant, family)
        old = dict(OLD_DEFINITION, width=size, height=size)
        assert st.definition() == old, family
        assert ground_truth.cache_path(case, st).name == _old_key(old, case), family
    assert ground_truth.TruthSettings().definition() == OLD_DEFINITION
    flux = run.truth_settings(variant, "flux").definition()
    assert flux["guidance"] == 3.5 and flux["cfg"] == 1.0 and flux["scheduler"] == "simple"


def test_sd15_truth_prompts_are_the_ones_before_flux(bench_env):
    """The truth builds its vocabulary and templates as the Audit node does (family_vocabulary,
    family_templates); for SD1.5 these are the ids and template it built before."""
    model, clip, _ = bench_env.demo_models.tiny_sd15(0)
    case = SimpleNamespace(name="sd15", base_model=model, adapted_model=model, base_clip=clip, adapted_clip=clip)
    st = run.truth_settings(run.VARIANTS["quick"], "sd15")
    with torch.inference_mode():
        m = ground_truth._Measurer(bench_env, case, st, None, lambda _: None)
        words = ["castle", "aquarium fish", "tiger"]
        vocab, templates = m.prompts(words)
        old_vocab = bench_env.core.vocabulary.from_words(words, m.tokenize, name="truth")
        layout = bench_env.core.conditioning.shortest_layout(m.base.text)
        old_template = bench_env.core.prompts.tokenize_template(st.template, m.tokenize, layout)
    assert vocab == old_vocab and templates == [old_template]


def test_flux_truth_refuses_other_sampling_than_the_packs(bench_env, flux_cases):
    case = flux_cases["null_diffuse"]
    st = run.truth_settings(run.VARIANTS["medium"], "flux")
    with torch.inference_mode():
        for wrong in (replace(st, cfg=7.5), replace(st, guidance=None)):
            with pytest.raises(ValueError, match="the pack"):
                ground_truth._Measurer(bench_env, case, wrong, None, lambda _: None)


def test_a_tiny_flux_truth_measures_with_cfg_1_and_guidance_3_5(bench_env, flux_cases, tmp_path, one_thread):
    case = flux_cases["planted"]
    st = replace(run.truth_settings(run.VARIANTS["medium"], "flux"), seeds=1, schedule_steps=4, refine_top=2,
                 refine_seeds=2)
    with torch.inference_mode():
        m = ground_truth._Measurer(bench_env, case, st, None, lambda _: None)
        assert [side.denoiser.guidance for side in (m.base, m.adapted)] == [3.5, 3.5]
        vocab, templates = m.prompts(["castle", "aquarium fish"])
        assert vocab[1].ids("t5") != vocab[1].ids("l") and templates[0].for_encoder("t5").prefix_ids != templates[0].prefix_ids
    words = [case.targets[0], *[w for w in case.words if w not in case.targets][:2]]
    truth = ground_truth.measure(bench_env, case, words, st, tmp_path, log=lambda _: None)
    assert truth.settings["cfg"] == 1.0 and truth.settings["guidance"] == 3.5 and truth.settings["scheduler"] == "simple"
    assert all(truth.seed_count(w) in (1, 2) for w in words) and all(truth.mean(w) > 0 for w in words)
    # CFG 1: one model pass per step and latent (no unconditional branch), both models
    passes = sum(truth.seed_count(w) for w in words) * st.schedule_steps * 2
    assert truth.cost["unet_forward"] == passes
    again = ground_truth.measure(bench_env, case, words, st, tmp_path, log=lambda _: None)  # read from the cache
    assert again.per_seed == truth.per_seed and again.path.name.startswith("flux-s0-planted-")


def test_flux_lora_trained_is_refused_with_its_reason(bench_env):
    builder = case_lib.CaseBuilder(bench_env, candidates=10, log=lambda _: None)
    with pytest.raises(ValueError, match="no lora_trained case"):
        builder.build(case_lib.CaseSpec("flux", 0, "lora_trained"))
