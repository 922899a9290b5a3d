"""Probe (issue 11's null): does a per-word placebo reference remove Flux's false alarms?

The default audit flags 7 / 0 / 0 words on the Flux diffuse null (mostly one-T5-piece words such
as "mari", "prescription"), a heavy right tail of drift. This probe measures 400 random
candidates and the words the null's audits reported (results/flux/length-calibration) on each
search seed's calibration seed, as the audit does: drift between base and adapted, and between
base and a placebo (a random diffuse change of the base, 1% of each tensor's RMS, another seed).
Robust z of log drift against the 400 random words, raw and as the ratio to the placebo's drift;
4.06 is the threshold of a 2,000-word audit. The planted case is scored the same way (its
planted words are the ones that must stay high). Not part of the pack.

    OMP_NUM_THREADS=1 python benchmarks/results/flux/placebo_probe.py [--out placebo_probe.json]
"""
import argparse
import dataclasses
import json
import random
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # benchmarks/

import cases as case_lib  # noqa: E402
import environment  # noqa: E402
import ground_truth  # noqa: E402
import run  # noqa: E402

THRESHOLD = 4.06  # calibration.z_threshold(0.05, 2000)


def robust_z(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    m = ref.median()
    return (x - m) / (1.4826 * (ref - m).abs().median())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=HERE / "placebo_probe.json")
    a = ap.parse_args()
    env = environment.load(threads=1)
    core = env.core
    builder = case_lib.CaseBuilder(env, 2000, log=lambda _: None)
    st = run.truth_settings(run.VARIANTS["medium"], "flux")
    seeds = [core.settings.AuditSettings(seed=s).derived_seeds("rescore", 8)[0] for s in run.SEARCH_SEEDS]
    reported = json.loads((HERE / "length-calibration" / "null_diffuse.json").read_text())["cases"][0]["runs"]["screen"]
    out = {"threshold": THRESHOLD, "seeds": seeds, "cases": {}}
    for kind in ("null_diffuse", "planted"):
        case = builder.build(case_lib.CaseSpec("flux", 0, kind))
        rnd = random.Random(1).sample([w for w in case.words if w not in case.targets], 400)
        extra = sorted(({t for r in reported for t in r["tokens"]} | set(case.targets)) - set(rnd))
        words = rnd + [w for w in extra if w in case.words or w in case.targets]
        placebo = case_lib.diffuse_patches(case.base_model, 0.01, 1)[0]
        with torch.inference_mode():
            d = {}
            for side, model in (("adapted", case.adapted_model), ("placebo", placebo)):
                m = ground_truth._Measurer(env, dataclasses.replace(case, adapted_model=model), st, None, print)
                vocab, templates = m.prompts(words)
                sampling = core.meter.SamplingSettings(latent_shape=m.latent_shape, kept_steps=4, cfg=st.cfg,
                                                       objective="attention", group_size=256)
                meter = core.meter.DriftMeter(m.base, m.adapted, vocab, templates, m.schedule, sampling, m.runtime)
                d[side] = meter.score(list(range(len(words))), seeds).double().log()  # (W, 3) one column per audit
        rows = {}
        for j, seed in enumerate(seeds):
            raw, ratio = d["adapted"][:, j], d["adapted"][:, j] - d["placebo"][:, j]
            z = {"raw": robust_z(raw, raw[:400]), "ratio to placebo": robust_z(ratio, ratio[:400])}
            rows[f"search seed {j}"] = {
                k: {"flagged": [words[i] for i in torch.argsort(v, descending=True).tolist() if v[i] > THRESHOLD],
                    "top": [[words[i], round(float(v[i]), 2)] for i in torch.argsort(v, descending=True)[:5].tolist()],
                    "targets": {t: round(float(v[words.index(t)]), 2) for t in case.targets}}
                for k, v in z.items()}
            print(kind, j, json.dumps(rows[f"search seed {j}"]), flush=True)
        out["cases"][kind] = {"words": len(words), "random": 400, "rows": rows}
    a.out.write_text(json.dumps(out, indent=1))
    for kind, c in out["cases"].items():
        for s, r in c["rows"].items():
            print(f"| {kind} | {s} | " + " | ".join(f"{len(r[k]['flagged'])} ({', '.join(r[k]['flagged'][:4])})"
                                                   for k in ("raw", "ratio to placebo")) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
