# python benchmarks/results/flux/eval_time.py OUT.json   (from the repository root)
# As it ran for results/flux/NOTE.md (only the output path is an argument now).
"""One model evaluation's time per family, at the benchmark's settings, measured at one moment:
DriftMeter.score of 64 words on 2 seeds (4 kept steps, micro-batch 64, the family's CFG, guidance,
scheduler and pixel size), once to encode the words, then timed on 2 other seeds (text cached):
seconds / UNet evaluations (both models; a guided step counts two)."""
import sys, json, time
sys.path.insert(0, "benchmarks")
import torch
import environment
env = environment.load(threads=1)
import cases as case_lib, run, ground_truth
core = env.core
res = {}
b = case_lib.CaseBuilder(env, 64, log=lambda _: None)
for family in ("sd15", "sdxl", "flux"):
    case = b.build(case_lib.CaseSpec(family, 0, "null_diffuse"))
    st = run.truth_settings(run.VARIANTS["medium"], family)
    with torch.inference_mode():
        m = ground_truth._Measurer(env, case, st, None, lambda _: None)
        words = case.words[:64]
        vocab, templates = m.prompts(words)
        sampling = core.meter.SamplingSettings(latent_shape=m.latent_shape, kept_steps=4, cfg=st.cfg, objective="attention", group_size=128)
        meter = core.meter.DriftMeter(m.base, m.adapted, vocab, templates, m.schedule, sampling, m.runtime)
        meter.score(list(range(64)), [1, 2])
        rows = []
        for rep in range(3):
            before = m._counts()
            t = time.perf_counter()
            meter.score(list(range(64)), [10 + 2 * rep, 11 + 2 * rep])
            dt = time.perf_counter() - t
            after = m._counts()
            rows.append((dt, after[0] - before[0], after[1] - before[1]))
    best = min(rows)
    res[family] = {"px": st.width, "cfg": st.cfg, "evaluations": best[1], "text_passes": best[2], "seconds": [r[0] for r in rows],
                   "ms_per_evaluation_best": 1000 * best[0] / best[1]}
    print(family, res[family], flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
