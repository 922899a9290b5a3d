"""The placebo reference at the Audit node's defaults, in the image world (issue 13's null).

For the two diffuse nulls and the two UCE erasures of "house" of the full variant, the Audit
node's own entry point with its defaults (screen, standard preset, top 10, calibrated on the
other concepts; the variant's 20-step schedule), once with the presets' placebo (0.01) and once
without (placebo 0: the method's plain calibration). Records each run's flagged words, its top
words with their z, the threshold and the placebo's beta.

    OMP_NUM_THREADS=1 python benchmarks/results/image_world/placebo_node_defaults.py [--out placebo_node_defaults.json]
"""
import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # benchmarks/

import cases as case_lib  # noqa: E402
import environment  # noqa: E402
import image_world as iw  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=HERE / "placebo_node_defaults.json")
    a = ap.parse_args()
    env = environment.load(threads=1)
    v = iw.VARIANTS["full"]
    world = iw.taught_base(env, v, iw.concept_words(env, v.concepts), True, print)
    others = [w for w in world.words if w != "house"]
    adaptations = {
        "null-1%": case_lib.diffuse_patches(world.model, 0.01, v.model_seed + 7919)[0],
        "null-3%": case_lib.diffuse_patches(world.model, 0.03, v.model_seed + 7919)[0],
        "uce-s1 (house)": iw.uce_erase(world, "house", others, dict(strength=1.0, lam=1.0))[0],
        "uce-s3 (house)": iw.uce_erase(world, "house", others, dict(strength=3.0, lam=1.0))[0],
    }
    out = {"rows": []}
    for name, model in adaptations.items():
        for placebo in (0.0, 0.01):
            with torch.inference_mode():
                report = iw._run_node(env, world, model, v, mode="preset", schedule_steps=v.audit["schedule_steps"],
                                      cfg=v.cfg, placebo=placebo)
            row = {"adaptation": name, "placebo": placebo,
                   "flagged": [e.token for e in report.entries if e.significant],
                   "top": [[e.token, round(e.calibrated, 2)] for e in report.entries[:5]],
                   "z_threshold": round(report.baseline["z_threshold"], 2),
                   "beta": round(report.baseline.get("placebo_slope", 0.0), 3),
                   "unet_forward": sum(c["unet_forward"] for c in report.evaluations.values())}
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    a.out.write_text(json.dumps(out, indent=1))
    print("| adaptation | placebo | flagged | first reported word, z | beta | UNet evaluations |")
    for r in out["rows"]:
        print(f"| {r['adaptation']} | {r['placebo']} | {', '.join(r['flagged']) or 'none'} | "
              f"{r['top'][0][0]} {r['top'][0][1]} | {r['beta']} | {r['unet_forward']:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
