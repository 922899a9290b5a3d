"""A prepared GPU check: real-size SD1.5 with random weights, audited under every memory setting.

    .venv/bin/python benchmarks/gpu_check.py [--json gpu_check.json]   # one NVIDIA GPU, < 8 min
    .venv/bin/python benchmarks/gpu_check.py --cpu-smoke [--json F]    # tiny sizes, < 1 min of CPU

What it does (GitHub issue 9, "A prepared GPU check"):
1. Builds an SD1.5 checkpoint in memory: ComfyUI's SD1.5 UNet config (859.5M parameters) and a
   CLIP-L text encoder (123M), every weight drawn from a seed (scripts/demo_models.py's
   init_parameters_), and loads it with ComfyUI's own checkpoint loader
   (comfy.sd.load_state_dict_guess_config), which must detect it as SD15. UNet weights are kept
   fp32 (model_options dtype) so that the Audit's `precision` input alone decides the compute
   dtype; the text encoder gets ComfyUI's default dtype.
2. Plants a known edit (scripts/demo_models: the closed-form edit planted_edit_in_process plants,
   computed once on the CPU by planted_edit_deltas and added as the same "diff" weight patches to
   each loaded MODEL's clone; tiger, bicycle, castle move, the rest of the vocabulary barely
   does), so every audit has a right answer.
3. Runs the DriftScope Audit's entry point (nodes/audit.audit_models) with Dynamic VRAM off and
   on (each group loads the checkpoint afresh, the way ComfyUI 0.16+ starts with or without
   --disable-dynamic-vram), each precision (fp32, bf16, fp16) in screen mode, and paper mode
   with and without gradient checkpointing. Every configuration starts with all models
   unloaded and the CUDA peak-memory counter reset.
4. Prints one line per configuration: status, wall time, UNet evaluations (the report's
   `evaluations`, both models, forward passes) per second of wall time, peak GPU memory
   (torch.cuda.max_memory_allocated), the top words and whether they match the reference.
   The last line is a JSON summary (also written to --json).

The reference ranking is the screen-mode fp32 run (no autocast) with Dynamic VRAM off on the
same device and the same seed: the closest thing to a CPU fp32 run this check can afford at 512 px
(its 2,224 UNet evaluations would take a CPU days: one 860M forward at an 8x8 latent took 1.2 s
here, and a 64x64 latent has 64 times the positions). It is not bit-equal to a CPU run: cuDNN may use TF32
for fp32 convolutions (the summary records torch's TF32 flags) and reductions run in another
order. Runs are compared with it by their top-k word sets (k = the run's top_k; for paper mode,
the reference's best k words among paper mode's candidates): `same_set`, `overlap` (shared words
/ k) and `same_order`. Separately, `planted_on_top` says whether the run's first min(k, 3) words
are planted ones, which is the right answer by construction.

Caveats printed with the figures: under Dynamic VRAM, ComfyUI keeps weights in comfy-aimdo's own
VRAM allocations, which torch.cuda.max_memory_allocated does not see; the check adds aimdo's own
usage count after each run and the device-wide used memory (torch.cuda.mem_get_info, which
includes other processes). Wall time includes moving the weights to the GPU, since each
configuration starts unloaded. torch's default caching allocator is used (ComfyUI's main.py may
switch to cudaMallocAsync, whose statistics torch does not fully report).

Dynamic VRAM is switched the way ComfyUI's main.py does it: comfy_aimdo.control.init() before
torch is imported, comfy_aimdo.control.init_devices() for the GPU, then
comfy.model_patcher.CoreModelPatcher = ModelPatcherDynamic and
comfy.memory_management.aimdo_enabled = True (both put back afterwards). The "off" group runs
first; --dynamic off|on runs one group per process for a cleaner comparison (with "off" alone the
aimdo library is never loaded, as with --disable-dynamic-vram). Where Dynamic VRAM cannot run (no
CUDA, no NVIDIA GPU, comfy_aimdo not loading, a ComfyUI without ModelPatcherDynamic such as
0.3.75), its configurations are reported as skipped with the reason; so are the bf16/fp16
configurations on a CPU (nodes/host.runtime_for runs every CPU pass in fp32) and anything left
when --max-seconds is used up. A configuration that raises is reported as an error with its
message, and the rest still run.

Exit status: 0 when no configuration failed, every screen-mode run has the planted words on top
(each with a drift above every other reported word's) and every paper-mode run found at least one
of them (its soft-prompt search recalled half of the truth's top 10 in the benchmark,
benchmarks/README.md); 1 otherwise. Mismatches with the reference are reported, not failed:
bf16/fp16 may reorder words whose drift is close.

--cpu-smoke runs the same code at tiny sizes (ComfyUI's smallest SD1.5-detectable UNet, 13.6M
parameters; a 1-layer CLIP-L-wide text encoder; 10 custom words; 32 px; the quick preset with
smaller budgets) so that tests/bench/test_gpu_check.py keeps it working on machines without a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

PLANTED = ("tiger", "bicycle", "castle")
TEMPLATE = "a photo of a {}"
SEED = 0  # model weights, planted edit and audit seed
SUMMARY_VERSION = 1

# ComfyUI's SD1.5 UNet config: what comfy.model_detection reads from a real SD1.5 checkpoint
# (plus SD15's own num_heads). The check asserts that ComfyUI's loader detects SD15 from the
# weights built from it.
SD15_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
# The planted words come last: a ranking of equal drifts (identical models) keeps the list's order,
# and must not look like a found edit.
SMOKE_WORDS = ("apple", "river", "chair", "cloud", "horse", "lamp", "bridge", "tiger", "bicycle", "castle")


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU check and the CPU smoke."""

    name: str
    unet: str  # "sd15" (real) or "smallest" (demo_models' smallest detectable SD1.5 UNet)
    clip_layers: int  # CLIP-L has 12
    width: int
    screen_vocabulary: str  # a built-in list, or "custom" for `words`
    paper_words: tuple[str, ...]
    screen_top_k: int
    paper_top_k: int
    micro_batch: int
    preset: str = "quick"
    screen_settings: dict = field(default_factory=dict)  # AuditSettings overrides
    paper_settings: dict = field(default_factory=dict)
    words: tuple[str, ...] = ()
    max_seconds: float | None = None


# Time on an H200 (estimates: a bf16 860M UNet forward at a 64x64 latent, batch 8, takes tens of
# ms; fp32 several times longer). Building the random 860M UNet on the CPU: ~25 s (22 s on this
# project's CPU); each checkpoint load 5-15 s (16 s on that CPU); the planted edit a few s.
# Screen, quick preset, CIFAR-100 at 512 px: 1,112 UNet evaluations per model (2,224 in all),
# ~30-55 s in fp32, ~5-10 s in bf16 or fp16. Paper, quick preset (30 AdamW steps, patience 8),
# 20 candidates, K=3 (at most 6 restarts): at most ~4,300 forward and ~2,200 backward
# evaluations plus re-scoring, ~20-40 s; gradient checkpointing adds one forward per backward.
# Both Dynamic VRAM groups: about 4-5 minutes. --max-seconds (390) skips what is left once
# 6.5 minutes have passed (the configuration running then still finishes).
GPU = Sizes(
    name="gpu", unet="sd15", clip_layers=12, width=512, screen_vocabulary="cifar100",
    paper_words=("apple", "aquarium fish", "baby", "bear", "bed", "bee", "bottle", "bowl", "boy", "bridge",
                 "butterfly", "camel", "can", "caterpillar", "chair", "cloud", "cup") + PLANTED,
    screen_top_k=10, paper_top_k=3, micro_batch=8, max_seconds=390.0,
)
# CPU (2 shared cores): 2-3 s per screen audit on the smallest detectable SD1.5 UNet (13.6M) at a
# 4x4 latent, 5-15 s per paper audit; about 25-35 s in all plus ComfyUI's import.
SMOKE = Sizes(
    name="cpu-smoke", unet="smallest", clip_layers=1, width=32, screen_vocabulary="custom",
    paper_words=SMOKE_WORDS, words=SMOKE_WORDS, screen_top_k=5, paper_top_k=1, micro_batch=8,
    screen_settings=dict(rescore_seeds=2, calibration_size=8, finalists=5),
    # 8 AdamW steps find a planted word (3 steps found none of them)
    paper_settings=dict(opt_steps=8, patience=3, rescore_seeds=2, calibration_size=8, max_runs_factor=2),
)


@dataclass(frozen=True)
class Config:
    dynamic: bool
    mode: str  # screen | paper
    precision: str  # the Audit's precision input
    checkpointing: bool

    @property
    def name(self) -> str:
        gc_part = f"/gc-{'on' if self.checkpointing else 'off'}" if self.mode == "paper" else ""
        return f"dynamic-{'on' if self.dynamic else 'off'}/{self.mode}/{self.precision}{gc_part}"


def configurations(dynamic_groups, paper_precision: str) -> list[Config]:
    out = []
    for dyn in dynamic_groups:
        out += [Config(dyn, "screen", p, False) for p in ("fp32", "bf16", "fp16")]
        out += [Config(dyn, "paper", paper_precision, gc) for gc in (False, True)]
    return out


# -- Dynamic VRAM ---------------------------------------------------------------------------------
_AIMDO = {"loaded": None, "devices": None, "error": None, "torch_imported_first": None}


def load_aimdo_library() -> None:
    """comfy_aimdo.control.init(), as ComfyUI's main.py calls it before torch is imported."""
    _AIMDO["torch_imported_first"] = "torch" in sys.modules
    try:
        import comfy_aimdo.control as control
    except Exception as exc:  # not installed, or broken
        _AIMDO.update(loaded=False, error=f"comfy_aimdo is not importable ({type(exc).__name__}: {exc})")
        return
    for kwargs in ({"nvml_pressure": True}, {}):  # newer comfy-aimdo take nvml_pressure
        try:
            _AIMDO["loaded"] = bool(control.init(**kwargs))
            break
        except TypeError:
            continue
        except Exception as exc:
            _AIMDO.update(loaded=False, error=f"comfy_aimdo.control.init() raised {type(exc).__name__}: {exc}")
            return
    if not _AIMDO["loaded"] and _AIMDO["error"] is None:
        _AIMDO["error"] = "comfy_aimdo.control.init() could not load its library"


def _memory_management():
    """comfy.memory_management, or None in a ComfyUI that has none (0.3.75)."""
    try:
        import comfy.memory_management
    except ImportError:
        return None
    return comfy.memory_management


def dynamic_vram_unavailable(device) -> str | None:
    """Why Dynamic VRAM cannot run here (None: it can). Feature checks, no version strings."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import torch

    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic") or not hasattr(_memory_management(), "aimdo_enabled"):
        return "this ComfyUI has no ModelPatcherDynamic / memory_management.aimdo_enabled (no Dynamic VRAM)"
    if device.type != "cuda":
        return f"Dynamic VRAM needs a CUDA device; this run uses {device.type}"
    if hasattr(mm, "is_nvidia") and not mm.is_nvidia():
        return "Dynamic VRAM is on by default only on NVIDIA GPUs; this is not one"
    version = getattr(mm, "torch_version_numeric", None)
    if version is not None and tuple(version) < (2, 8):
        return f"Dynamic VRAM needs PyTorch 2.8 or later (torch {torch.__version__})"
    if _AIMDO["loaded"] is None:
        return "comfy_aimdo was not initialised in this process (the full-size check loads it before torch; --cpu-smoke does not)"
    if not _AIMDO["loaded"]:
        return _AIMDO["error"]
    if _AIMDO["devices"] is None:
        import comfy_aimdo.control as control
        index = device.index if device.index is not None else torch.cuda.current_device()
        try:
            try:
                _AIMDO["devices"] = bool(control.init_devices([(index, 0)]))  # (device, extra headroom)
            except TypeError:  # older protocol: plain device ids
                _AIMDO["devices"] = bool(control.init_devices([index]))
        except Exception as exc:
            _AIMDO["devices"] = False
            _AIMDO["error"] = f"comfy_aimdo.control.init_devices raised {type(exc).__name__}: {exc}"
        if not _AIMDO["devices"] and _AIMDO["error"] is None:
            _AIMDO["error"] = f"comfy_aimdo could not initialise CUDA device {index} (no working comfy-aimdo)"
    return None if _AIMDO["devices"] else _AIMDO["error"]


@contextlib.contextmanager
def dynamic_vram(on: bool):
    """ComfyUI's global switch: which patcher its loaders build, and aimdo's loading paths."""
    import comfy.model_patcher as mp

    mem = _memory_management()
    saved = {name: getattr(obj, name) for obj, name in ((mp, "CoreModelPatcher"), (mem, "aimdo_enabled"))
             if hasattr(obj, name)}
    if hasattr(mp, "CoreModelPatcher"):
        mp.CoreModelPatcher = mp.ModelPatcherDynamic if on else mp.ModelPatcher
    if hasattr(mem, "aimdo_enabled"):
        mem.aimdo_enabled = on
    try:
        yield
    finally:
        free_memory()
        if "CoreModelPatcher" in saved:
            mp.CoreModelPatcher = saved["CoreModelPatcher"]
        if "aimdo_enabled" in saved:
            mem.aimdo_enabled = saved["aimdo_enabled"]


def free_memory() -> None:
    import comfy.model_management as mm
    import torch

    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- models ---------------------------------------------------------------------------------------
def build_checkpoint(env, sizes: Sizes, vocabulary: list[str]) -> tuple[dict, dict, dict, dict]:
    """An SD1.5 checkpoint state dict (UNet fp32, text encoder fp16) with seeded random weights,
    the text-encoder options to load it with, the planted edit as UNet weight deltas, and facts.

    The edit (demo_models.planted_edit_deltas: what planted_edit_in_process plants) is computed
    here once, on the CPU, from the freshly built models, so every Dynamic VRAM group gets the
    same edit whatever the device and patcher, and planting does not depend on what the dynamic
    patcher allows."""
    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.supported_models_base
    import torch

    demo = env.demo_models
    cpu = torch.device("cpu")
    cfg = dict(SD15_UNET_CONFIG) if sizes.unet == "sd15" else demo.unet_config(
        320, 768, (1,), attention_output=False, attention_middle=False)
    model_config = comfy.supported_models.SD15(cfg)
    model_config.set_inference_dtype(torch.float32, None)
    with dynamic_vram(False):  # ComfyUI's layers are lazily created under aimdo; build plain ones
        base = model_config.get_model({})
        demo.init_parameters_(base.diffusion_model, torch.Generator().manual_seed(SEED * 1009 + 1))
        unet_params = sum(p.numel() for p in base.diffusion_model.parameters())
        clip_cfg = {**demo.CLIP_L_CONFIG, "num_hidden_layers": sizes.clip_layers}
        clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel),
                             model_options={"dtype": torch.float32, "clip_l_model_config": clip_cfg,
                                            "load_device": cpu, "offload_device": cpu})
        clip.cond_stage_model.to(cpu)  # where the seeded CPU generator can fill it
        demo.init_parameters_(clip.cond_stage_model, torch.Generator().manual_seed(SEED * 1009 + 2),
                              gain=demo.CLIP_LAYER_GAIN, scalars={"logit_scale": math.log(100.0)},
                              embedding_std={"token_embedding.weight": demo.CLIP_TOKEN_STD,
                                             "position_embedding.weight": demo.CLIP_POSITION_STD})
        clip_params = sum(p.numel() for p in clip.cond_stage_model.parameters())
        patcher = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
        # the edit demo_models.planted_edit_in_process plants, with its default strength
        deltas, stats = demo.planted_edit_deltas(patcher, clip, PLANTED, vocabulary, TEMPLATE,
                                                 pad_prompts=demo.DEMO_PAD_PROMPTS)
        stats = {k: v for k, v in stats.items() if k.endswith("_rel_change")}
        sd = {f"model.diffusion_model.{k}": v.detach() for k, v in base.diffusion_model.state_dict().items()}
        clip_sd = model_config.process_clip_state_dict_for_saving(clip.get_sd())
        del base, clip, patcher
    sd.update({k: v.detach().to(torch.float16) for k, v in clip_sd.items()})
    te_options = {} if sizes.clip_layers == 12 else {"clip_l_model_config": {"num_hidden_layers": sizes.clip_layers}}
    facts = {"unet": sizes.unet, "unet_parameters": unet_params, "text_encoder_layers": sizes.clip_layers,
             "text_encoder_parameters": clip_params, "planted": list(PLANTED), "template": TEMPLATE,
             "edited_weights": len(deltas), "planted_stats": stats}
    return sd, te_options, deltas, facts


def load_checkpoint(sd: dict, te_options: dict):
    """ComfyUI's checkpoint loader on the in-memory state dict (the loader pops keys: a copy)."""
    import comfy.sd
    import torch

    out = comfy.sd.load_state_dict_guess_config(dict(sd), output_vae=False, output_clip=True,
                                                model_options={"dtype": torch.float32},
                                                te_model_options=dict(te_options))
    if out is None or out[0] is None or out[1] is None:
        raise RuntimeError("ComfyUI's checkpoint loader did not return a MODEL and a CLIP")
    model, clip = out[0], out[1]
    family = type(model.model.model_config).__name__
    if family != "SD15":
        raise RuntimeError(f"ComfyUI detected {family}, not SD15, from the generated checkpoint")
    return model, clip


# -- one configuration ------------------------------------------------------------------------------
def run_config(env, sizes: Sizes, cfg: Config, models, device) -> dict:
    import torch

    base, clip, adapted = models
    paper = cfg.mode == "paper"
    words = sizes.paper_words if paper else sizes.words
    vocabulary = "custom" if paper or sizes.screen_vocabulary == "custom" else sizes.screen_vocabulary
    top_k = sizes.paper_top_k if paper else sizes.screen_top_k
    settings = dict(sizes.paper_settings if paper else sizes.screen_settings)
    runtime = env.host.runtime_for(cfg.precision, sizes.micro_batch, cfg.checkpointing)
    free_memory()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        report = env.pack.nodes.audit.audit_models(
            base, clip, adapted, clip, vocabulary=vocabulary, custom_words="\n".join(words), templates=TEMPLATE,
            preset=sizes.preset, mode=cfg.mode, scheduler="normal", precision=cfg.precision,
            micro_batch=sizes.micro_batch, gradient_checkpointing=cfg.checkpointing, width=sizes.width,
            height=sizes.width, top_k=top_k, seed=SEED, direction="most", objective="attention", **settings)
    if cuda:
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - t
    ev = report.evaluations
    forward = sum(side["unet_forward"] for side in ev.values())
    row = {
        "status": "ran", "wall_s": round(wall, 3), "unet_forward": forward,
        "unet_backward": sum(side["unet_backward"] for side in ev.values()),
        "text_forward": sum(side["text_forward"] for side in ev.values()),
        "evals_per_s": round(forward / wall, 3) if wall > 0 else None,
        "autocast": str(runtime.autocast_dtype).replace("torch.", "") if runtime.autocast_dtype else "none (fp32)",
        "top_k": top_k, "top": [e.token for e in report.entries], "candidates": len(words) if vocabulary == "custom" else vocabulary,
        "report_mode": report.settings["mode"], "stage_s": {k: round(v, 3) for k, v in report.timings.items()},
        "peak_allocated_bytes": None, "peak_reserved_bytes": None, "aimdo_vram_bytes_after": None,
        "device_used_bytes_after": None,
    }
    if cuda:
        row["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
        row["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
        free, total = torch.cuda.mem_get_info(device)
        row["device_used_bytes_after"] = int(total - free)
        if cfg.dynamic:
            import comfy_aimdo.control
            row["aimdo_vram_bytes_after"] = int(comfy_aimdo.control.get_total_vram_usage())
    # the right answer: the first min(k, 3) words are the planted ones
    n = min(top_k, len(PLANTED))
    row["drift"] = [e.drift for e in report.entries]
    row["planted_found"] = len(set(row["top"][:n]) & set(PLANTED))
    row["planted_on_top"] = row["planted_found"] == n
    # ... and clearly apart: the least drifted of them above every other reported word (equal drifts
    # would leave the order of the list)
    others = [d for w, d in zip(row["top"], row["drift"]) if w not in PLANTED]
    mine = [d for w, d in zip(row["top"][:n], row["drift"][:n]) if w in PLANTED]
    row["planted_separated"] = bool(mine) and all(math.isfinite(d) for d in row["drift"]) and (
        not others or min(mine) > max(others))
    # screen must find them all; paper's soft-prompt search is weaker by design (it recalled half the
    # truth's top 10 in the benchmark, benchmarks/README.md): it must find at least one
    if cfg.mode == "screen":
        row["planted_ok"] = row["planted_on_top"] and row["planted_separated"]
    else:
        row["planted_ok"] = row["planted_found"] >= 1 and all(math.isfinite(d) for d in row["drift"])
    return row


def compare(row: dict, reference: dict | None, ref_name: str | None, candidates) -> None:
    """Top-k set comparison with the reference run (its best k among this run's candidates)."""
    if reference is None:
        row.update(reference=None, same_set=None, overlap=None, same_order=None)
        return
    k = row["top_k"]
    allowed = set(candidates) if candidates is not None else None
    ref = [w for w in reference["top"] if allowed is None or w in allowed][:k]
    top = row["top"][:k]
    row.update(reference=ref_name, reference_top=ref, same_set=set(top) == set(ref) and len(ref) == k,
               overlap=round(len(set(top) & set(ref)) / k, 3), same_order=top == ref)


# -- the check --------------------------------------------------------------------------------------
def gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def print_row(name: str, row: dict) -> None:
    """One human-readable line per configuration (tolerates missing figures)."""
    if row.get("status") != "ran":
        print(f"{name:34s} {row.get('status')}: {row.get('reason')}", flush=True)
        return
    k = row.get("top_k", 0)
    ref = "" if row.get("reference") is None else (
        f" | vs reference: same top-{k} set {'yes' if row.get('same_set') else 'NO'}"
        f" ({row.get('overlap', 0):.0%}), same order {'yes' if row.get('same_order') else 'no'}")
    twin = "" if row.get("same_as_without_checkpointing") is None else (
        f" | same words as gc-off: {'yes' if row['same_as_without_checkpointing'] else 'NO'}")
    print(f"{name:34s} ran {row.get('wall_s', 0):7.1f} s | {row.get('unet_forward', 0):6d} UNet evals,"
          f" {row.get('evals_per_s') or 0:8.1f}/s | peak {gib(row.get('peak_allocated_bytes'))}"
          f" | autocast {row.get('autocast')} | top {', '.join(row.get('top', [])[:5])}"
          f" | planted on top: {row.get('planted_found')}/{min(k, len(PLANTED))}"
          f"{'' if row.get('planted_ok') else ' (NOT OK)'}{ref}{twin}", flush=True)


def environment_facts(env, device) -> dict:
    import torch

    try:
        import comfyui_version
        comfy_version = comfyui_version.__version__
    except Exception:
        comfy_version = None
    facts = {"comfyui": comfy_version, "torch": torch.__version__, "device": str(device),
             "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
             "threads": torch.get_num_threads(),
             "tf32": {"cudnn_conv": bool(torch.backends.cudnn.allow_tf32),
                      "cuda_matmul": bool(torch.backends.cuda.matmul.allow_tf32)}}
    try:
        import importlib.metadata
        facts["comfy_aimdo"] = importlib.metadata.version("comfy-aimdo")
    except Exception:
        facts["comfy_aimdo"] = None
    return facts


def run_check(env, sizes: Sizes, dynamic_groups=(False, True), paper_precision: str = "auto",
              max_seconds: float | None = None, log=print) -> dict:
    """Every configuration of the check; returns the summary (see the module docstring)."""
    import torch

    import comfy.model_management as mm

    t0 = time.perf_counter()
    device = mm.get_torch_device()
    summary = {"check": "driftscope-gpu-check", "version": SUMMARY_VERSION, "sizes": sizes.name,
               "environment": environment_facts(env, device),
               "settings": {"preset": sizes.preset, "width": sizes.width, "height": sizes.width,
                            "micro_batch": sizes.micro_batch, "screen_vocabulary": sizes.screen_vocabulary,
                            "screen_words": list(sizes.words), "paper_words": list(sizes.paper_words),
                            "screen_top_k": sizes.screen_top_k, "paper_top_k": sizes.paper_top_k,
                            "screen_overrides": sizes.screen_settings, "paper_overrides": sizes.paper_settings,
                            "seed": SEED, "paper_precision": paper_precision, "max_seconds": max_seconds},
               "reference": {"definition": "no fp32 screen run ran: nothing to compare with", "name": None},
               "memory_note": "peak_allocated_bytes is torch.cuda.max_memory_allocated; under Dynamic VRAM the weights "
                              "live in comfy-aimdo allocations it does not count (see aimdo_vram_bytes_after)",
               "configurations": []}
    log(f"[gpu_check] {sizes.name}: ComfyUI {summary['environment']['comfyui']}, torch {torch.__version__}, "
        f"{summary['environment']['device_name']}")
    t = time.perf_counter()
    vocab_words = list(sizes.words) if sizes.screen_vocabulary == "custom" else env.demo_models.load_vocabulary(sizes.screen_vocabulary)
    sd, te_options, deltas, facts = build_checkpoint(env, sizes, vocab_words)
    facts["build_s"] = round(time.perf_counter() - t, 2)
    summary["models"] = facts
    log(f"[gpu_check] built an SD1.5 checkpoint with random weights: UNet {facts['unet_parameters'] / 1e6:.1f}M, "
        f"text encoder {facts['text_encoder_parameters'] / 1e6:.1f}M parameters, planted edit on "
        f"{facts['edited_weights']} cross-attention weights ({facts['build_s']} s)")
    state = {"reference": None, "paper_twins": {}}
    groups = {}
    for dyn in dynamic_groups:
        group = {"dynamic": dyn, "status": "ran", "reason": None}
        groups["on" if dyn else "off"] = group
        configs = configurations([dyn], paper_precision)
        reason = dynamic_vram_unavailable(device) if dyn else None
        if reason is None and max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            reason = f"time budget of {max_seconds:.0f} s used up"
        if reason is None:
            try:
                run_group(env, sizes, dyn, configs, sd, te_options, deltas, device, t0, max_seconds,
                          summary, group, state, log)
            except Exception as exc:  # loading or planting failed: the group's remaining configs say why
                traceback.print_exc()
                group.update(status="error", reason=f"{type(exc).__name__}: {exc}")
            free_memory()  # the group's models are gone with run_group's frame
        else:
            group.update(status="skipped", reason=reason)
        done = {c["name"] for c in summary["configurations"]}
        for cfg in configs:
            if cfg.name not in done:
                status = "error" if group["status"] == "error" else "skipped"
                row = {"name": cfg.name, "dynamic_vram": dyn, "mode": cfg.mode, "precision": cfg.precision,
                       "gradient_checkpointing": cfg.checkpointing, "status": status,
                       "reason": f"not run: {group['reason']}" if status == "error" else reason}
                summary["configurations"].append(row)
                print_row(cfg.name, row)
    summary["dynamic_vram_groups"] = groups
    summary["aimdo"] = dict(_AIMDO)
    ran = [c for c in summary["configurations"] if c["status"] == "ran"]
    summary["errors"] = [c["name"] for c in summary["configurations"] if c["status"] == "error"]
    summary["planted_missed"] = [c["name"] for c in ran if not c["planted_ok"]]
    summary["ran"] = len(ran)
    summary["skipped"] = sum(c["status"] == "skipped" for c in summary["configurations"])
    summary["ok"] = bool(ran) and not summary["errors"] and not summary["planted_missed"]
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def run_group(env, sizes, dyn, configs, sd, te_options, deltas, device, t0, max_seconds, summary, group,
              state, log) -> None:
    """Load the checkpoint with Dynamic VRAM on or off, plant the edit, run the group's configurations."""
    with dynamic_vram(dyn):
        t = time.perf_counter()
        base, clip = load_checkpoint(sd, te_options)
        adapted = env.demo_models.clone_with_deltas(base, deltas)  # the planted edit, as diff patches
        group.update(load_s=round(time.perf_counter() - t, 2),
                     patchers={"model": type(base).__name__, "clip": type(clip.patcher).__name__})
        if dyn and not (base.is_dynamic() and clip.patcher.is_dynamic()):
            raise RuntimeError(f"Dynamic VRAM is on but ComfyUI built {group['patchers']}")
        log(f"[gpu_check] Dynamic VRAM {'on' if dyn else 'off'}: loaded with {group['patchers']} "
            f"and planted the edit ({group['load_s']} s)")
        for cfg in configs:
            row = run_one(env, sizes, cfg, (base, clip, adapted), device, t0, max_seconds)
            if row["status"] == "ran":
                if cfg.mode == "screen" and cfg.precision == "fp32" and state["reference"] is None:
                    state["reference"] = row
                    summary["reference"]["name"] = cfg.name
                    summary["reference"]["definition"] = (
                        f"screen mode, precision fp32 (no autocast), Dynamic VRAM {'on' if dyn else 'off'}, same device "
                        "and seed; runs compare their top-k word sets with it (paper mode: the reference's best k among "
                        "paper mode's candidates)")
                compare(row, state["reference"], summary["reference"]["name"],
                        sizes.paper_words if cfg.mode == "paper" else None)
                if cfg.mode == "paper":
                    twin = state["paper_twins"].setdefault((dyn, cfg.precision), {})
                    twin[cfg.checkpointing] = row
                    if True in twin and False in twin:
                        twin[True]["same_as_without_checkpointing"] = twin[True]["top"] == twin[False]["top"]
            summary["configurations"].append({"name": cfg.name, "dynamic_vram": dyn, "mode": cfg.mode,
                                              "precision": cfg.precision, "gradient_checkpointing": cfg.checkpointing,
                                              **row})
            print_row(cfg.name, row)


def run_one(env, sizes, cfg: Config, models, device, t0, max_seconds) -> dict:
    if cfg.precision in ("bf16", "fp16") and device.type != "cuda":
        return {"status": "skipped", "reason": f"autocast precisions apply on CUDA only: nodes/host.runtime_for "
                                               f"runs every {device.type} pass in fp32, so this would repeat fp32"}
    if cfg.precision == "bf16" and device.type == "cuda":
        import torch
        if not torch.cuda.is_bf16_supported():
            return {"status": "skipped", "reason": "this GPU does not support bf16"}
    if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
        return {"status": "skipped", "reason": f"time budget of {max_seconds:.0f} s used up"}
    try:
        return run_config(env, sizes, cfg, models, device)
    except Exception as exc:
        traceback.print_exc()
        return {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    finally:
        free_memory()


def _strict_json(obj):
    """Non-finite floats (an fp16 overflow's NaN drift) as strings, so the summary stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    return obj


def main(argv=None, env=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes; runs on a CPU in well under a minute")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary JSON here")
    parser.add_argument("--dynamic", choices=("both", "off", "on"), default="both",
                        help="which Dynamic VRAM groups to run (default both, off first)")
    parser.add_argument("--paper-precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="precision of the paper-mode runs (default auto: bf16 where the GPU has it)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="skip configurations that would start after this many seconds (GPU default 390)")
    parser.add_argument("--comfy", default=None, help="ComfyUI folder (default: DRIFTSCOPE_COMFYUI or .comfyui/ComfyUI)")
    a = parser.parse_args(argv)
    sizes = SMOKE if a.cpu_smoke else GPU
    groups = {"both": (False, True), "off": (False,), "on": (True,)}[a.dynamic]
    if True in groups and not a.cpu_smoke and _AIMDO["loaded"] is None:
        load_aimdo_library()  # before torch, as ComfyUI's main.py
    if env is None:
        import environment  # benchmarks/environment.py: in-process ComfyUI with the pack

        env = environment.load(a.comfy, threads=None)
    max_seconds = a.max_seconds if a.max_seconds is not None else sizes.max_seconds
    summary = run_check(env, sizes, groups, a.paper_precision, max_seconds)
    line = json.dumps(_strict_json(summary), sort_keys=True, allow_nan=False)
    if a.json:
        a.json.write_text(line + "\n", encoding="utf-8")
    print(f"[gpu_check] {summary['ran']} ran, {summary['skipped']} skipped, {len(summary['errors'])} failed, "
          f"planted words missed by {len(summary['planted_missed'])}; {summary['seconds']} s; "
          f"{'OK' if summary['ok'] else 'NOT OK'}", flush=True)
    print(line, flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
