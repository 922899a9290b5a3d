"""Which resolution should an SDXL audit default to? Measures, on the tiny SDXL model of
scripts/demo_models.py with a planted edit, the cost of the default audit (screen mode, quick
preset) at several resolutions and how far its ranking agrees with the one at SDXL's native
1024 px.

    .venv/bin/python benchmarks/sdxl_resolution.py [--sizes 256,512,1024] [--json out.json]

Prints one line per size: wall time, UNet evaluations per model, peak RSS, the planted words'
ranks, and the overlap of the top 10 with the top 10 at the largest size.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import environment  # noqa: E402  (puts ComfyUI on sys.path, CPU, the pack and demo_models)

PLANTED = ("tiger", "bicycle", "castle")
WORDS = ["tiger", "bicycle", "castle", "apple", "river", "chair", "cloud", "horse", "lamp", "mountain", "bread",
         "guitar", "forest", "boat", "candle", "rabbit", "bridge", "flower", "clock", "shoe", "tower", "lemon",
         "train", "violin", "desert", "pencil", "snake", "window", "cookie", "rocket", "aquarium fish"]
TEMPLATE = "a photo of a {}"


def audit_at(env, base, clip, adapted, size: int) -> dict:
    """One default audit at size x size px: its ranking and cost."""
    import torch
    args = dict(vocabulary="custom", custom_words="\n".join(WORDS), templates=TEMPLATE, preset="quick", mode="preset",
                scheduler="normal", precision="auto", micro_batch=8, gradient_checkpointing=False, width=size,
                height=size, top_k=10, seed=0, direction="most", objective="attention")
    t = time.perf_counter()
    with torch.inference_mode():
        report = env.pack.nodes.audit.audit_models(base, clip, adapted, clip, **args)
    return {"size": size, "seconds": round(time.perf_counter() - t, 1),
            "unet_per_model": report.evaluations["adapted"]["unet_forward"],
            "text_per_model": report.evaluations["adapted"]["text_forward"],
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "top10": [e.token for e in report.entries],
            "planted_ranks": sorted(e.rank for e in report.entries if e.token in PLANTED)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,512,1024")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    env = environment.load(threads=1)
    base, clip, _ = env.demo_models.tiny_sdxl(0)
    adapted = env.demo_models.planted_edit_in_process(base, clip, PLANTED, WORDS, TEMPLATE)
    rows = []
    for size in args.sizes.split(","):  # each row as soon as it is measured
        rows.append(audit_at(env, base, clip, adapted, int(size)))
        row = rows[-1]
        print(f"{row['size']:>5} px: {row['seconds']:7.1f} s, {row['unet_per_model']:,} UNet and "
              f"{row['text_per_model']:,} text evaluations per model, peak RSS {row['peak_rss_mb']:,} MB, planted ranks "
              f"{row['planted_ranks']}, top 10 {row['top10']}", flush=True)
    reference = set(rows[-1]["top10"])
    for row in rows:
        row["top10_overlap_with_largest"] = len(reference & set(row["top10"])) / 10
        print(f"{row['size']:>5} px: top-10 overlap with {rows[-1]['size']} px {row['top10_overlap_with_largest']:.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
