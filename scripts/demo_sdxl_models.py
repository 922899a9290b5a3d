"""The SDXL demo files: a checkpoint the stock Load Checkpoint node detects as SDXL and a
kohya-format SDXL LoRA that plants drift on known words (no downloaded weights).

    python scripts/demo_sdxl_models.py --comfy PATH/TO/ComfyUI --out PATH/TO/models [--force]

writes, under the models folder:
    checkpoints/driftscope_demo_sdxl.safetensors   demo_models.sdxl_checkpoint_file: 132M UNet,
                                                   full-size random CLIP-L/G, TAESD; fp16, 1.9 GB
    loras/driftscope_demo_sdxl_planted.safetensors the planted edit (UCE-style, on the UNet's
                                                   cross-attention keys/values) as an exact kohya
                                                   LoRA with SGM names (lora_unet_input_blocks_...),
                                                   plus small random lora_te1_/lora_te2_ modules on
                                                   both text encoders, as kohya writes them
    sdxl_planted.json                              what was planted and for which words
and skips the work while its stamp says the files are current (the first time about 4.5 CPU
minutes, 9.6 min on a busy shared 2-core CPU, 5.2 GB peak resident memory). The edit preserves the words of SDXL_WORDS (a cheap custom
vocabulary: SDXL's CLIP-G takes ~1.7 s per prompt on a CPU). Not part of `make demo`:
`make test-sdxl` and `python scripts/demo.py --workflow sdxl_lora_side_effects` build it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

import demo_models as dm  # scripts/demo_models.py, next to this file

SDXL_DEMO_VERSION = 1
SDXL_CKPT = "driftscope_demo_sdxl.safetensors"
SDXL_LORA = "driftscope_demo_sdxl_planted.safetensors"
SDXL_PLANTED_JSON = "sdxl_planted.json"
SDXL_STAMP_JSON = ".driftscope_sdxl_stamp.json"
# The planted words among ordinary ones (the vocabulary the SDXL demo audits as custom words).
SDXL_WORDS = ("tiger", "bicycle", "castle", "apple", "river", "chair", "cloud", "horse", "lamp", "mountain",
              "bread", "guitar", "forest", "boat", "candle", "rabbit", "bridge", "flower", "clock", "shoe")
# Relative size of each text-encoder module's random delta: present (the LoRA has both kohya
# text-encoder prefixes and the adapted CLIP differs) but small next to the planted edit.
TEXT_STRENGTH = 0.002


def sdxl_paths(models_dir) -> dict[str, Path]:
    models_dir = Path(models_dir)
    return {"checkpoint": models_dir / "checkpoints" / SDXL_CKPT, "lora": models_dir / "loras" / SDXL_LORA,
            "planted": models_dir / SDXL_PLANTED_JSON, "stamp": models_dir / SDXL_STAMP_JSON}


def _recipe() -> dict:
    return {"version": SDXL_DEMO_VERSION, "template": dm.TEMPLATE, "planted": list(dm.PLANTED),
            "words_sha1": hashlib.sha1("\n".join(SDXL_WORDS).encode("utf-8")).hexdigest(),
            "strength": dm.DEMO_STRENGTH, "lam": dm.DEMO_LAM, "eps": dm.DEMO_EPS, "seed": dm.DEMO_SEED,
            "text_strength": TEXT_STRENGTH}


def _stamp_ok(paths: dict[str, Path]) -> bool:
    try:
        stamp = json.loads(paths["stamp"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    files = stamp.get("files", {})
    return stamp.get("recipe") == _recipe() and all(
        paths[k].is_file() and paths[k].stat().st_size == files.get(k) for k in ("checkpoint", "lora", "planted"))


def planted_sdxl_lora(model, clip, log=print) -> tuple[dict, dict]:
    """(kohya SDXL LoRA state dict, statistics): the planted edit's exact low-rank factors under
    kohya's SGM UNet names, and TEXT_STRENGTH-sized random te1/te2 modules."""
    deltas, stats = dm.planted_edit_deltas(model, clip, dm.PLANTED, list(SDXL_WORDS), dm.TEMPLATE, dm.DEMO_STRENGTH,
                                           dm.DEMO_LAM, dm.DEMO_SEED, dm.DEMO_EPS, (), dm.DEMO_PAD_PROMPTS)
    unet, ranks = dm.lora_state_dict(model, deltas)
    # lora_state_dict names modules the diffusers way; an SDXL kohya file uses the SGM paths.
    rename = {name: dm.kohya_sdxl_unet_name(key) for key, name in dm.kohya_unet_names(model, deltas).items()}
    sd = {}
    for k, v in unet.items():
        name, _, suffix = k.partition(".")
        sd[f"{rename[name]}.{suffix}"] = v
    # Text encoders: kohya's rank-4 modules (alpha = rank / 2) on every attention and MLP
    # projection of clip_l (te1) and clip_g (te2), one module's weight in fp32 at a time.
    weights = clip.cond_stage_model.state_dict()
    gen, rank = dm._generator(dm.DEMO_SEED, 5), 4
    for name, (side, key) in sorted(dm.kohya_sdxl_targets(model, clip).items()):
        if side == "clip":
            up, down = dm._random_lora_pair(weights[key], rank, 0.5, TEXT_STRENGTH, gen)
            sd.update({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
                       f"{name}.alpha": torch.tensor(rank / 2)})
    return sd, {"stats": stats, "ranks": {rename[n]: r for n, r in ranks.items()}}


def _check_lora(model, clip, lora: dict) -> dict:
    """Every key of `lora` maps to a UNet or text-encoder weight the stock loader patches."""
    import comfy.lora
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    patches = comfy.lora.load_lora(lora, key_map)
    modules = {k.rsplit(".", 2)[0] if k.endswith((".lora_up.weight", ".lora_down.weight")) else k.rsplit(".", 1)[0]
               for k in lora}
    counts = {p: sum(m.startswith(p) for m in modules) for p in ("lora_unet_", "lora_te1_", "lora_te2_")}
    if len(patches) != len(modules) or not all(counts.values()):
        raise AssertionError(f"the stock loader maps {len(patches)} of {len(modules)} LoRA modules ({counts})")
    return counts


def build_sdxl_demo(models_dir, log=print) -> dict:
    import comfy.sd
    paths = sdxl_paths(models_dir)
    paths["lora"].parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dm.sdxl_checkpoint_file(paths["checkpoint"], dm.DEMO_SEED, log=log)
    t_ckpt = time.perf_counter() - t0
    # The edit is computed on the model the stock loader reads back from that file.
    model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(str(paths["checkpoint"]), output_vae=False)
    detected = type(model.model.model_config).__name__
    if detected != "SDXL":
        raise AssertionError(f"{SDXL_CKPT} is detected as {detected}, not SDXL")
    t = time.perf_counter()
    lora, info = planted_sdxl_lora(model, clip)
    counts = _check_lora(model, clip, lora)
    t_lora = time.perf_counter() - t
    meta = {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0",
            "driftscope_demo": json.dumps(_recipe())}
    dm._atomic_save(lora, paths["lora"], metadata=meta)
    rel = {k[: -len("_rel_change")]: v for k, v in info["stats"].items() if k.endswith("_rel_change")}
    planted = dict(_recipe(), words=list(SDXL_WORDS), detected=detected, lora_modules=counts,
                   lora_ranks=info["ranks"], relative_change_of_keys_values=rel,
                   files={"checkpoint": f"checkpoints/{SDXL_CKPT}", "lora": f"loras/{SDXL_LORA}"})
    dm._atomic_write_json(planted, paths["planted"])
    dm._atomic_write_json({"recipe": _recipe(), "files": {k: paths[k].stat().st_size
                                                          for k in ("checkpoint", "lora", "planted")}}, paths["stamp"])
    if log is not None:
        log(f"[demo_sdxl] checkpoint {t_ckpt:.1f}s; LoRA {t_lora:.1f}s ({counts});"
            f" planted keys/values moved {rel['planted']['mean']:.3f}, preserved {rel['preserved']['mean']:.4f}")
    return planted


def ensure_sdxl_demo(models_dir, comfy_dir=None, force: bool = False, log=print) -> dict:
    """Paths of the SDXL demo files under `models_dir`, built first unless the stamp holds."""
    dm.prepare_comfy(comfy_dir)
    models_dir = Path(models_dir)
    paths = sdxl_paths(models_dir)
    with dm._lock(models_dir):
        generated = force or not _stamp_ok(paths)
        if generated:
            build_sdxl_demo(models_dir, log=log)
    return dict(paths, generated=generated)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfy", required=True, help="the ComfyUI folder (holding comfy/ and main.py)")
    ap.add_argument("--out", required=True, help="models folder; writes checkpoints/, loras/, sdxl_planted.json")
    ap.add_argument("--force", action="store_true", help="rebuild even if the stamp matches")
    a = ap.parse_args(argv)
    info = ensure_sdxl_demo(a.out, a.comfy, force=a.force)
    if not info["generated"]:
        print(f"[demo_sdxl] up to date in {a.out}")
    for k in ("checkpoint", "lora", "planted"):
        print(f"{k}: {info[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
