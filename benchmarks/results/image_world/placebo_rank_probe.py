"""Probe (placebo design): which random change makes a placebo whose drift tells fragile words?

placebo_probe.py showed that scoring each concept by its drift over its drift under a full-rank
random change of every UNet tensor removes the diffuse nulls' false alarms ("couch") and keeps
the UCE target ("house"). The pack's placebo must not hold a copy of the model, so it is a
random low-rank change (a LoRA of random factors, each product scaled to 1% of its weight's
RMS). This probe compares ranks 4, 16 and 64, linear weights only or convolutions too, and
other placebo seeds, with the score of placebo_probe.py (robust z of the log ratio over the 91
concepts, the variant's scan audit). Not part of the pack. (First run in two halves, their
rows merged; re-run whole on 2026-12-02, which gave the same JSON.)

    OMP_NUM_THREADS=1 python benchmarks/results/image_world/placebo_rank_probe.py [--out placebo_rank_probe.json]
"""
import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # placebo_probe.py
sys.path.insert(0, str(HERE.parents[1]))  # benchmarks/

import cases as case_lib  # noqa: E402
from placebo_probe import compare  # noqa: E402


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
        u, d = torch.randn(out, rank, generator=g), torch.randn(rank, inn, generator=g)
        diff = (u @ d).reshape(p.shape)
        diff = diff * (relative * rms / float(diff.pow(2).mean().sqrt()))
        patches[f"diffusion_model.{name}"] = ("diff", (diff,))
    m = model.clone()
    m.add_patches(patches, 1.0)
    return m


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=HERE / "placebo_rank_probe.json")
    a = ap.parse_args()

    def placebos(world, drifts) -> dict:
        return {"all tensors": drifts(case_lib.diffuse_patches(world.model, 0.01, 1)[0]),
                "linear r4": drifts(lowrank_patches(world.model, 0.01, 1, 4)),
                "linear r4 seed 3": drifts(lowrank_patches(world.model, 0.01, 3, 4)),
                "linear+conv r4": drifts(lowrank_patches(world.model, 0.01, 1, 4, True)),
                "linear r16": drifts(lowrank_patches(world.model, 0.01, 1, 16)),
                "linear r16 seed 3": drifts(lowrank_patches(world.model, 0.01, 3, 16)),
                "linear r16 seed 5": drifts(lowrank_patches(world.model, 0.01, 5, 16)),
                "linear+conv r16": drifts(lowrank_patches(world.model, 0.01, 1, 16, True)),
                "linear r64": drifts(lowrank_patches(world.model, 0.01, 1, 64)),
                "linear r64 seed 3": drifts(lowrank_patches(world.model, 0.01, 3, 64))}

    return compare(placebos, a.out)


if __name__ == "__main__":
    sys.exit(main())
