"""Cost of one audit per preset on the demo models (tiny SD1.5 checkpoint + planted LoRA).

    python benchmarks/presets.py [--presets quick,standard,paper] [--paper-top-k 3]

Loads the demo files with ComfyUI's own loaders in-process, runs the DriftScope Audit node's
entry point for each preset on CIFAR-100 at 64 px and prints wall time, model evaluations per
model, and whether the planted words are the top 3. The paper preset restarts runs until it has
K words; --paper-top-k keeps that affordable on a CPU (the figures say which K was used).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / ".demo" / "comfy" / "models"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="quick,standard,paper")
    parser.add_argument("--paper-top-k", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = parser.parse_args(argv)
    import environment  # benchmarks/environment.py, next to this file: in-process ComfyUI with the pack

    comfy_dir = environment.comfy_dir()  # DRIFTSCOPE_COMFYUI, else .comfyui/ComfyUI (0.33.0)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_models.py"), "--comfy", str(comfy_dir), "--out", str(MODELS)],
                   check=True, stdout=subprocess.DEVNULL)
    pack = environment.load(comfy_dir, threads=None).pack
    import torch
    import comfy.sd
    import comfy.utils

    planted = set(json.loads((MODELS / "planted.json").read_text())["planted"])
    with torch.inference_mode():
        base, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(str(MODELS / "checkpoints" / "driftscope_demo_base.safetensors"))
        lora = comfy.utils.load_torch_file(str(MODELS / "loras" / "driftscope_demo_planted.safetensors"), safe_load=True)
        adapted, adapted_clip = comfy.sd.load_lora_for_models(base, clip, lora, 1.0, 1.0)
    rows = []
    for preset in a.presets.split(","):
        top_k = a.paper_top_k if preset == "paper" else 10
        t = time.perf_counter()
        with torch.inference_mode():
            report = pack.nodes.audit.audit_models(
                base, clip, adapted, adapted_clip, vocabulary="cifar100", custom_words="", templates="a photo of a {}",
                preset=preset, mode="preset", scheduler="normal", precision="auto", micro_batch=32,
                gradient_checkpointing=False, width=64, height=64, top_k=top_k, seed=0, direction="most",
                objective="attention")
        seconds = time.perf_counter() - t
        top = [e.token for e in report.entries[:3]]
        rows.append({"preset": preset, "mode": report.settings["mode"], "top_k": top_k, "seconds": round(seconds, 1),
                     "planted_in_top3": len(set(top) & planted), "top3": top,
                     "timings": {k: round(v, 1) for k, v in report.timings.items()}, "evaluations": report.evaluations})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| preset | mode | K | wall s | planted in top 3 | UNet fwd (base/adapted) | UNet bwd (adapted) | text fwd/bwd (adapted) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        b, ad = r["evaluations"]["base"], r["evaluations"]["adapted"]
        print(f"| {r['preset']} | {r['mode']} | {r['top_k']} | {r['seconds']} | {r['planted_in_top3']}/3 | "
              f"{b['unet_forward']}/{ad['unet_forward']} | {ad['unet_backward']} | {ad['text_forward']}/{ad['text_backward']} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
