"""The main job on the embedded tiny demo, end to end through a real ComfyUI server.

Generates a tiny SD1.5-architecture checkpoint (loadable by the stock CheckpointLoaderSimple) and
a LoRA that plants drift on known words, starts ComfyUI headless on loopback, queues the example
workflow workflows/api/lora_side_effects.json with the demo models swapped in, prints the ranked
table and where the report and the evidence grid were written, and stops the server.

    python scripts/demo.py [--workflow lora_side_effects|checkpoint_vs_checkpoint] [--work-dir .demo]

`--workflow sdxl_lora_side_effects` runs the SDXL twin instead, on a checkpoint the stock loader
detects as SDXL and a kohya SDXL LoRA with the planted edit (scripts/demo_sdxl_models.py; 1.9 GB,
built once into <work-dir>/sdxl/models, never by default), auditing 20 custom words.

Exit status 0 when the planted words are the top 3, 1 otherwise.
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AUDIT, GRID_SAVE, REPORT_SAVE = "10", "12", "13"

# What the demo changes in the shipped workflows: the tiny demo files instead of the user's
# models, a 64 px audit (an 8x8 latent), the quick preset and CPU-sized model batches, so it
# runs in minutes on a CPU.
DEMO_FILES = {
    "lora_side_effects": {"1": {"ckpt_name": "driftscope_demo_base.safetensors"},
                          "2": {"lora_name": "driftscope_demo_planted.safetensors"}},
    "checkpoint_vs_checkpoint": {"1": {"ckpt_name": "driftscope_demo_base.safetensors"},
                                 "2": {"ckpt_name": "driftscope_demo_adapted.safetensors"}},
    "sdxl_lora_side_effects": {"1": {"ckpt_name": "driftscope_demo_sdxl.safetensors"},
                               "2": {"lora_name": "driftscope_demo_sdxl_planted.safetensors"}},
}
SDXL_WORKFLOWS = {"sdxl_lora_side_effects"}  # their demo files: ensure_sdxl_models, in <work-dir>/sdxl
DEMO_AUDIT = {"preset": "quick", "width": 64, "height": 64, "micro_batch": 32}
DEMO_GRID = {"steps": 8}


def demo_overrides(prompt: dict, workflow: str = "lora_side_effects") -> dict:
    """A copy of an API-format workflow with the demo models and the demo budget swapped in."""
    out = copy.deepcopy(prompt)
    for node_id, inputs in DEMO_FILES[workflow].items():
        out[node_id]["inputs"].update(inputs)
    out[AUDIT]["inputs"].update(DEMO_AUDIT)
    grid = dict(DEMO_GRID)
    if workflow in SDXL_WORKFLOWS:
        # SDXL's CLIP-G costs ~1.7 s a prompt on a CPU: the demo's own 20 words, not cifar100;
        # the evidence at the audit's 64 px instead of the workflow's 1024.
        import demo_sdxl_models  # scripts/demo_sdxl_models.py, next to this file
        out[AUDIT]["inputs"].update(vocabulary="custom", custom_words="\n".join(demo_sdxl_models.SDXL_WORDS))
        grid.update(width=0, height=0)
    for node in out.values():
        if node["class_type"] == "DriftScopeEvidenceGrid":
            node["inputs"].update(grid)
    return out


def ensure_models(models_dir: Path) -> dict:
    """Generate the demo models (once; a stamp file says when they are current)."""
    import comfy_server as harness  # scripts/comfy_server.py, next to this file

    subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_models.py"), "--comfy", str(harness.default_comfy_dir()),
                    "--out", str(models_dir)], check=True)
    return json.loads((models_dir / "planted.json").read_text())


def ensure_sdxl_models(models_dir: Path) -> dict:
    """Generate the SDXL demo checkpoint and LoRA (once; stamped like the others)."""
    import comfy_server as harness  # scripts/comfy_server.py, next to this file

    subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_sdxl_models.py"), "--comfy", str(harness.default_comfy_dir()),
                    "--out", str(models_dir)], check=True)
    return json.loads((models_dir / "sdxl_planted.json").read_text())


def run_demo(workflow: str, work_dir: Path, timeout: float = 1200.0) -> int:
    import comfy_server as harness  # scripts/comfy_server.py, next to this file

    comfy_dir = harness.default_comfy_dir()  # DRIFTSCOPE_COMFYUI, else .comfyui/ComfyUI (0.33.0)
    sdxl = workflow in SDXL_WORKFLOWS
    base_dir = work_dir / ("sdxl" if sdxl else "comfy")
    t0 = time.perf_counter()
    planted = (ensure_sdxl_models if sdxl else ensure_models)(base_dir / "models")
    t_models = time.perf_counter() - t0
    prompt = demo_overrides(harness.load_api_workflow(ROOT / "workflows" / "api" / f"{workflow}.json"), workflow)
    with harness.ComfyServer(comfy_dir, base_directory=base_dir) as server:
        print(f"[demo] ComfyUI {server.url} up in {server.startup_seconds:.1f}s; queueing {workflow}", flush=True)
        t1 = time.perf_counter()
        entry = server.run(prompt, timeout=timeout)
        t_run = time.perf_counter() - t1
        table = harness.outputs_of(entry, AUDIT)["text"][0]
        grid = harness.outputs_of(entry, GRID_SAVE)["images"][0]
        saved = harness.outputs_of(entry, REPORT_SAVE)["text"][0]
        out_dir = server.output_directory
    print(table)
    print(f"[demo] evidence grid: {out_dir / grid['subfolder'] / grid['filename']}")
    print(f"[demo] report: {saved.replace('saved ', '')} in {out_dir}")
    report_json = sorted((out_dir / "driftscope").glob("report_*.json"))[-1]
    report = json.loads(report_json.read_text())
    top3 = [e["token"] for e in report["entries"][:3]]
    found = set(top3) & set(planted["planted"])
    print(f"[demo] models {t_models:.1f}s, workflow {t_run:.1f}s, total {time.perf_counter() - t0:.1f}s")
    print(f"[demo] evaluations: {json.dumps(report['evaluations'])}")
    print(f"[demo] planted {sorted(planted['planted'])}; top 3 {top3}: {len(found)}/3 recovered")
    return 0 if len(found) == 3 else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflow", default="lora_side_effects", choices=sorted(DEMO_FILES))
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".demo")
    args = parser.parse_args(argv)
    return run_demo(args.workflow, args.work_dir.resolve())


if __name__ == "__main__":
    sys.exit(main())
