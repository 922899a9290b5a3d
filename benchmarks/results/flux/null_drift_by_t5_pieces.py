# python benchmarks/results/flux/null_drift_by_t5_pieces.py OUT.json   (from the repository root)
# As it ran for results/flux/NOTE.md (only the output path is an argument now).
import sys, json, random, time
sys.path.insert(0, "benchmarks")
import torch
import environment
env = environment.load(threads=1)
import cases as case_lib, run, ground_truth
core = env.core
b = case_lib.CaseBuilder(env, 2000, log=lambda _: None)
case = b.build(case_lib.CaseSpec("flux", 0, "null_diffuse"))
st = run.truth_settings(run.VARIANTS["medium"], "flux")
words = random.Random(1).sample(case.words, 400)
seeds = [core.settings.AuditSettings(seed=s).derived_seeds("rescore", 8)[0] for s in (0, 2)]
with torch.inference_mode():
    m = ground_truth._Measurer(env, case, st, None, print)
    vocab, templates = m.prompts(words)
    sampling = core.meter.SamplingSettings(latent_shape=m.latent_shape, kept_steps=4, cfg=st.cfg, objective="attention", group_size=256)
    meter = core.meter.DriftMeter(m.base, m.adapted, vocab, templates, m.schedule, sampling, m.runtime)
    d = meter.score(list(range(len(words))), seeds).double()
pieces = [case_lib.t5_pieces(case.base_clip, w) for w in words]
logd = d.log().mean(1)
mid = logd.median()
out = {}
for k in sorted(set(pieces)):
    idx = [i for i, p in enumerate(pieces) if p == k]
    if len(idx) >= 5:
        v = logd[idx]
        out[k] = {"n": len(idx), "median_drift_ratio_to_all": float((v.median() - mid).exp()),
                  "share_in_top_20": sum(1 for i in logd.argsort(descending=True)[:20].tolist() if pieces[i] == k)}
print(json.dumps(out, indent=1))
json.dump(out, open(sys.argv[1], "w"), indent=1)
