"""Probe (issue 13's null): does a per-word placebo reference remove the nulls' fragile words?

In the image world's full variant, the diffuse nulls flag "couch" (and "sunflower") at the Audit
node's defaults, on every audit seed and under every random perturbation direction tried. This
probe scores each of the 91 concepts by its attention drift under an adaptation divided by its
drift under a placebo: a random diffuse change of the base (1% of each tensor's RMS, another
seed), either of every UNet tensor or of the cross-attention key/value projections only. The
score is the robust z (median, 1.4826 MAD) of log drift, raw or as that ratio, over the 91
concepts; 3.26 is the node's threshold for 91 words. Not part of the pack: a measurement for the
next design step.

    OMP_NUM_THREADS=1 python benchmarks/results/image_world/placebo_probe.py [--out placebo_probe.json]
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

THRESHOLD = 3.26  # calibration.z_threshold(0.05, 91)


def robust_z(x: torch.Tensor) -> torch.Tensor:
    m = x.median()
    return (x - m) / (1.4826 * (x - m).abs().median())


def compare(make_placebos, out_path: Path) -> int:
    """Score the probe's five adaptations raw and as ratios to each placebo that
    `make_placebos(world, drifts)` returns ({name: (91,) drifts}); write and print the table."""
    env = environment.load(threads=1)
    v = iw.VARIANTS["full"]
    world = iw.taught_base(env, v, iw.concept_words(env, v.concepts), True, print)
    words = world.words

    def drifts(model) -> torch.Tensor:  # (91,) attention drift, 4 kept steps, the variant's audit
        return torch.tensor(iw.audit(env, world, model, "attention", 4, v)["drift"], dtype=torch.float64)

    placebos = make_placebos(world, drifts)
    others = [w for w in words if w != "house"]
    adaptations = {
        "null-1% (the benchmark's, seed 7919)": case_lib.diffuse_patches(world.model, 0.01, v.model_seed + 7919)[0],
        "null-1% (seed 2)": case_lib.diffuse_patches(world.model, 0.01, 2)[0],
        "null-3% (seed 7919)": case_lib.diffuse_patches(world.model, 0.03, v.model_seed + 7919)[0],
        "uce-s1 (house)": iw.uce_erase(world, "house", others, dict(strength=1.0, lam=1.0))[0],
        "uce-s3 (house)": iw.uce_erase(world, "house", others, dict(strength=3.0, lam=1.0))[0],
    }
    out = {"threshold": THRESHOLD, "rows": []}
    for name, model in adaptations.items():
        d = drifts(model)
        scores = {"raw": robust_z(d.log())}
        scores.update({f"ratio to placebo ({k})": robust_z(d.log() - p.log()) for k, p in placebos.items()})
        row = {"adaptation": name}
        for k, z in scores.items():
            order = torch.argsort(z, descending=True)
            row[k] = {"top": [[words[i], round(float(z[i]), 2)] for i in order[:4].tolist()],
                      "flagged": [words[i] for i in order.tolist() if z[i] > THRESHOLD]}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    out_path.write_text(json.dumps(out, indent=1))
    print("| adaptation | " + " | ".join(k for k in out["rows"][0] if k != "adaptation") + " |")
    for row in out["rows"]:
        print(f"| {row['adaptation']} | " + " | ".join(
            f"{', '.join(r['flagged']) or 'none'} (top {r['top'][0][0]} {r['top'][0][1]})"
            for k, r in row.items() if k != "adaptation") + " |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=HERE / "placebo_probe.json")
    a = ap.parse_args()

    def placebos(world, drifts) -> dict:
        return {"all tensors": drifts(case_lib.diffuse_patches(world.model, 0.01, 1)[0]),
                "attn2 K/V only": drifts(case_lib.diffuse_patches(
                    world.model, 0.01, 1, only=lambda n: n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")))[0])}

    return compare(placebos, a.out)


if __name__ == "__main__":
    sys.exit(main())
