"""Probe (placebo design): which random change makes a placebo whose drift tells fragile words?

placebo_probe.py showed that scoring each concept by its drift over its drift under a full-rank
random change of every UNet tensor removes the diffuse nulls' false alarms ("couch") and keeps
the UCE target ("house"). The pack's placebo must not hold a copy of the model, so it is a
random low-rank change (a LoRA of random factors, each product scaled to 1% of its weight's
RMS). This probe compares ranks 4, 16 and 64, linear weights only or convolutions too, and
other placebo seeds, with the score of placebo_probe.py (robust z of the log ratio over the 91
concepts, the variant's scan audit). Not part of the pack. (Run in two halves on 2026-12-01;
their JSON rows are merged here, the raw column identical in both.)

    OMP_NUM_THREADS=1 python benchmarks/results/image_world/placebo_rank_probe.py [--out placebo_rank_probe.json]
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


def lowrank_patches(model, relative, seed, rank=4, convs=False):
    """A clone with a seeded rank-`rank` "diff" patch on every 2-d (and 4-d) UNet weight, RMS `relative` x its own."""
    import comfy.model_management
    comfy.model_management.unload_all_models()
    g = torch.Generator().manual_seed(seed)
    patches = {}
    for name, p in sorted(model.model.diffusion_model.named_parameters()):
        if not name.endswith(".weight") or p.ndim < 2 or (p.ndim > 2 and not convs):
            continue
        rms = float(p.detach().float().pow(2).mean().sqrt())
        if rms == 0.0:
            continue
        out, inn = p.shape[0], p[0].numel()
        u = torch.randn(out, rank, generator=g); d = torch.randn(rank, inn, generator=g)
        diff = (u @ d).reshape(p.shape)
        diff = diff * (relative * rms / float(diff.pow(2).mean().sqrt()))
        patches[f"diffusion_model.{name}"] = ("diff", (diff,))
    m = model.clone(); m.add_patches(patches, 1.0)
    return m

THRESHOLD = 3.26  # calibration.z_threshold(0.05, 91)


def robust_z(x: torch.Tensor) -> torch.Tensor:
    m = x.median()
    return (x - m) / (1.4826 * (x - m).abs().median())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=HERE / "placebo_rank_probe.json")
    a = ap.parse_args()
    env = environment.load(threads=1)
    v = iw.VARIANTS["full"]
    world = iw.taught_base(env, v, iw.concept_words(env, v.concepts), True, print)
    words = world.words

    def drifts(model) -> torch.Tensor:  # (91,) attention drift, 4 kept steps, the variant's audit
        return torch.tensor(iw.audit(env, world, model, "attention", 4, v)["drift"], dtype=torch.float64)

    placebos = {"all tensors": drifts(case_lib.diffuse_patches(world.model, 0.01, 1)[0]),
                "linear r4": drifts(lowrank_patches(world.model, 0.01, 1, 4)),
                "linear r4 seed 3": drifts(lowrank_patches(world.model, 0.01, 3, 4)),
                "linear+conv r4": drifts(lowrank_patches(world.model, 0.01, 1, 4, True)),
                "linear r16": drifts(lowrank_patches(world.model, 0.01, 1, 16)),
                "linear r16 seed 3": drifts(lowrank_patches(world.model, 0.01, 3, 16)),
                "linear r16 seed 5": drifts(lowrank_patches(world.model, 0.01, 5, 16)),
                "linear+conv r16": drifts(lowrank_patches(world.model, 0.01, 1, 16, True)),
                "linear r64": drifts(lowrank_patches(world.model, 0.01, 1, 64)),
                "linear r64 seed 3": drifts(lowrank_patches(world.model, 0.01, 3, 64))}
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
    a.out.write_text(json.dumps(out, indent=1))
    print("| adaptation | " + " | ".join(k for k in out["rows"][0] if k != "adaptation") + " |")
    for row in out["rows"]:
        print(f"| {row['adaptation']} | " + " | ".join(
            f"{', '.join(r['flagged']) or 'none'} (top {r['top'][0][0]} {r['top'][0][1]})"
            for k, r in row.items() if k != "adaptation") + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
