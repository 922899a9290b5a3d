"""Deterministic stand-in models for DriftScope's tests and demo (no downloaded weights).

Everything here is built from ComfyUI's own classes and initialized from a seed, so the
objects behave like real SD1.x / SD2.x / SDXL models to every ComfyUI code path, only smaller and
with random weights.

A. In-process tiny components for fast tests (fp32, a few seconds to build):
     tiny_sd15(seed) -> (ModelPatcher, comfy.sd.CLIP, comfy.sd.VAE)   SD1.x, eps-prediction
     tiny_sd2(seed)  -> (ModelPatcher, comfy.sd.CLIP, comfy.sd.VAE)   SD2.x, v-prediction
     tiny_sdxl(seed, prediction="eps"|"v") -> the same for SDXL (comfy.model_base.SDXL, clip_l +
                                                clip_g), eps or v-prediction

   tiny_flux(seed, variant="dev"|"schnell"), tiny_chroma(seed) -> the same for Flux.1 and Chroma
                                                (ComfyUI's own model classes and model sampling,
                                                tiny CLIP-L + T5 / T5 only, a 16-channel TAESD VAE)

B. File-based demo models that ComfyUI's stock loaders accept, written under a models folder:
     checkpoints/driftscope_demo_base.safetensors     smallest SD1.5-detectable UNet,
                                                      random CLIP-L-shaped text encoder, TAESD
     checkpoints/driftscope_demo_adapted.safetensors  base with a planted concept edit
     loras/driftscope_demo_planted.safetensors        the same edit as an exact kohya LoRA
     planted.json                                     what was planted (the ground truth)
   ensure_demo_models(models_dir) builds them once and reuses them while the version stamp holds.
   sdxl_checkpoint_file(path) writes the smallest checkpoint CheckpointLoaderSimple detects as
   SDXL (132M UNet, full-size random CLIP-L/G, TAESD; fp16, 1.9 GB; not built by the tests).

The planted edit is a closed-form edit of the UNet's cross-attention key/value projections in
the spirit of UCE (Gandikota et al., "Unified Concept Editing"): the keys and values of the
text-encoder outputs of the planted words move a lot, those of the rest of the vocabulary and
of the template barely move.  planted_edit_in_process() applies the same edit to any
in-process model as ComfyUI weight patches on a clone.

The module imports ComfyUI lazily: put the ComfyUI folder on sys.path before calling anything
(the CLI does that from --comfy), and on a machine without CUDA set
comfy.cli_args.args.cpu = True before comfy.model_management is first imported.

Other entry points: planted_edit_deltas (the edit as weight deltas plus statistics),
lora_state_dict (an exact kohya LoRA of such deltas), verify_demo_models (load the files back
with ComfyUI's loaders and check them), token_ids / slot_layout / encode_prefixes (text-encoder
outputs at chosen token positions), encode_conditioning (ComfyUI's cond of whole prompts; the
planted edit's vectors for SDXL), load_vocabulary.  SDXL files as people share them:
sdxl_kohya_lora_state_dict (kohya LoRA, UNet + lora_te1_/lora_te2_), lokr_state_dict (LyCORIS
LoKr on the cross-attention), write_sdxl_loras (both as safetensors); sdxl_adapted_clip (a CLIP
that differs from the base's).  Flux.1 / Chroma (section C): t5_slot_positions, flux_euler (a
truncated Euler sampling), flux_txt_qkv_inputs, flux_planted_edit (the planted edit of the double
blocks' text keys/values), flux_lora_state_dict / write_flux_lora (it as a kohya-style Flux LoRA).

CLI:  python scripts/demo_models.py --comfy PATH/TO/ComfyUI --out PATH/TO/models
          [--force] [--verify | --no-verify]
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

DEMO_VERSION = 1
TEMPLATE = "a photo of a {}"
PLANTED = ("tiger", "bicycle", "castle")
VOCABULARY = "cifar100"
DEMO_SEED = 0
# Planted keys/values are pushed by DEMO_STRENGTH times their own norm; DEMO_LAM weighs the
# preserve set (vocabulary without the planted words, plus the template prefix) against that;
# DEMO_EPS is a ridge on the whole edit that keeps words outside the vocabulary from moving much
# (without it, reaching the nearly collinear end-of-text targets takes a large edit that moves
# unseen words as much as the planted ones).
DEMO_STRENGTH = 2.0
DEMO_LAM = 10.0
DEMO_EPS = 0.1
# The padding positions of this many preserved prompts join the preserve set (each needs a
# full-length pass through the CLIP-L-sized encoder; 8 already keep the padding in place).
DEMO_PAD_PROMPTS = 8
# Common words outside CIFAR-100, used only to report how much unseen words move.
HELDOUT_WORDS = ("dog", "cat", "car", "guitar", "pizza", "ship", "horse", "airplane", "banana",
                 "church", "robot", "umbrella")

BASE_CKPT = "driftscope_demo_base.safetensors"
ADAPTED_CKPT = "driftscope_demo_adapted.safetensors"
PLANTED_LORA = "driftscope_demo_planted.safetensors"
PLANTED_JSON = "planted.json"
STAMP_JSON = ".driftscope_demo_stamp.json"

_DATA_DIR = Path(__file__).resolve().parents[1] / "driftscope_core" / "data"

# Text-encoder configs (merged by ComfyUI's SDClipModel into its json config).
TINY_CLIP_L_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
                      "num_hidden_layers": 2, "projection_dim": 64}
# SD2 uses the penultimate layer: ComfyUI asserts more than 2 layers.
TINY_CLIP_H_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
                      "num_hidden_layers": 3, "projection_dim": 64}
CLIP_L_CONFIG = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                 "num_hidden_layers": 12, "projection_dim": 768}

# Init scales of the random text encoders.  The token embedding is much larger than what each
# layer adds to the residual stream, so a token's output keeps its identity (distinct,
# well-conditioned context vectors for different words) while attention still mixes context
# into it (the end-of-text vector depends on the word).
CLIP_TOKEN_STD = 1.0
CLIP_POSITION_STD = 0.1
CLIP_LAYER_GAIN = 0.5


# --------------------------------------------------------------------------------------------
# small helpers

def load_vocabulary(name: str = VOCABULARY) -> list[str]:
    """Concept words, one per line, from driftscope_core/data/<name>.txt."""
    path = _DATA_DIR / f"{name}.txt"
    words = [w.strip() for w in path.read_text(encoding="utf-8").splitlines()]
    return [w for w in words if w and not w.startswith("#")]


def _generator(seed: int, stream: int) -> torch.Generator:
    """Independent, reproducible random streams per component."""
    return torch.Generator().manual_seed(int(seed) * 1009 + int(stream))


def _cpu_fallback_if_needed() -> None:
    """Set ComfyUI's --cpu flag when there is no CUDA, if model_management is not loaded yet."""
    if "comfy.model_management" in sys.modules or torch.cuda.is_available():
        return
    try:
        import comfy.cli_args
    except ImportError as exc:
        raise ImportError("ComfyUI is not importable: put its folder on sys.path or pass comfy_dir") from exc
    comfy.cli_args.args.cpu = True


def prepare_comfy(comfy_dir: str | os.PathLike | None) -> None:
    """Make `import comfy` work from an explicit ComfyUI folder (call time, never import time)."""
    if comfy_dir is not None:
        comfy_dir = str(Path(comfy_dir).resolve())
        if not (Path(comfy_dir) / "comfy").is_dir():
            raise FileNotFoundError(f"no ComfyUI 'comfy' package under {comfy_dir}")
        if comfy_dir not in sys.path:
            sys.path.insert(0, comfy_dir)
    _cpu_fallback_if_needed()


@torch.no_grad()
def init_parameters_(module: torch.nn.Module, generator: torch.Generator, *, gain: float = 1.0,
                     embedding_std: dict[str, float] | None = None,
                     scalars: dict[str, float] | None = None) -> torch.nn.Module:
    """Give every parameter of a ComfyUI-built module deterministic values.

    ComfyUI creates its layers with torch.empty, so a model built from a config holds garbage.
    Linear/conv weights ~ N(0, gain^2 / fan_in), biases 0; norms weight 1, bias 0; embeddings
    ~ N(0, std^2) with std looked up by the parameter name's ending in `embedding_std`
    (default 0.02); any other parameter must be named in `scalars` (name ending -> value),
    otherwise this raises, so nothing is left uninitialized by accident.
    """
    embedding_std = embedding_std or {}
    scalars = scalars or {}
    seen = set()
    for mod_name, mod in module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            seen.add(id(p))
            if isinstance(mod, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
                p.fill_(1.0 if p_name == "weight" else 0.0)
            elif isinstance(mod, torch.nn.Embedding):
                std = next((s for end, s in embedding_std.items() if full.endswith(end)), 0.02)
                p.normal_(0.0, std, generator=generator)
            elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                if p_name == "weight":
                    fan_in = p[0].numel()
                    p.normal_(0.0, gain / math.sqrt(fan_in), generator=generator)
                else:
                    p.zero_()
            else:
                value = next((v for end, v in scalars.items() if full.endswith(end)), None)
                if value is None:
                    raise ValueError(f"do not know how to initialize parameter {full} of {type(mod).__name__}")
                p.fill_(value)
    left = [n for n, p in module.named_parameters() if id(p) not in seen]
    if left:
        raise ValueError(f"parameters left uninitialized: {left[:5]}")
    return module


@torch.no_grad()
def _round_to_fp16_(module: torch.nn.Module) -> None:
    """Make fp32 weights exactly fp16-representable, so the fp16 file equals the in-process model."""
    for p in module.parameters():
        if p.dtype == torch.float32:
            p.copy_(p.to(torch.float16).to(torch.float32))


# --------------------------------------------------------------------------------------------
# A. in-process components

def unet_config(model_channels: int = 32, context_dim: int = 64, channel_mult=(1, 2),
                attention_input=True, attention_output=True, attention_middle=True,
                use_linear_in_transformer: bool = False) -> dict:
    """A UNet config in the form comfy.model_detection.detect_unet_config produces.

    One res block per level; `attention_*` switch the (depth-1) transformers on in the input
    blocks, the output blocks and the middle block (False for the middle removes the whole
    middle block, as in the smallest detectable SD1.5 checkpoint).
    """
    n = len(channel_mult)
    return {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "out_channels": 4,
        "model_channels": model_channels,
        "num_res_blocks": [1] * n,
        "transformer_depth": [int(bool(attention_input))] * n,
        "transformer_depth_output": [int(bool(attention_output))] * (2 * n),
        "channel_mult": list(channel_mult),
        "transformer_depth_middle": 1 if attention_middle else -2,
        "use_linear_in_transformer": use_linear_in_transformer,
        "context_dim": context_dim,
        "use_temporal_resblock": False, "use_temporal_attention": False,
    }


def _model_patcher(base_model):
    import comfy.model_management as mm
    import comfy.model_patcher
    return comfy.model_patcher.ModelPatcher(base_model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def _make_unet(config_cls, cfg: dict, seed: int, model_type=None, extra_config: dict | None = None,
               *, checkpoint_markers: dict | None = None):
    """A ModelPatcher around `config_cls`'s model with seeded weights.  `checkpoint_markers` are
    state-dict entries the config's model_type() reads, as a real checkpoint holds them (SDXL's
    "v_pred" key selects v-prediction the way a NoobAI v-pred checkpoint does)."""
    import comfy.model_base
    model_config = config_cls(cfg)
    model_config.unet_config.update(extra_config or {})
    model_config.set_inference_dtype(torch.float32, None)
    if model_type is None:
        base = model_config.get_model(dict(checkpoint_markers or {}))
    else:  # the config's own model_type() guesses from real checkpoint statistics
        base = comfy.model_base.BaseModel(model_config, model_type=model_type)
    init_parameters_(base.diffusion_model, _generator(seed, 1))
    return _model_patcher(base)


def _make_clip(tokenizer_cls, clip_cls, clip_name: str, config: dict, seed: int, dtype):
    return _make_text_encoders(tokenizer_cls, clip_cls, {clip_name: config}, seed, dtype)


def _make_text_encoders(tokenizer_cls, clip_cls, configs: dict[str, dict], seed: int, dtype):
    """A comfy.sd.CLIP of `clip_cls` with every encoder's config given by its name ("l", "g",
    "h"), weights seeded in module order."""
    import comfy.sd
    import comfy.supported_models_base
    target = comfy.supported_models_base.ClipTarget(tokenizer_cls, clip_cls)
    options = {f"clip_{name}_model_config": dict(config) for name, config in configs.items()}
    # comfy.sd.CLIP picks fp16 for text encoders on CPU unless told otherwise.
    clip = comfy.sd.CLIP(target, model_options={"dtype": dtype, **options})
    init_parameters_(clip.cond_stage_model, _generator(seed, 2), gain=CLIP_LAYER_GAIN,
                     embedding_std={"token_embedding.weight": CLIP_TOKEN_STD,
                                    "position_embedding.weight": CLIP_POSITION_STD},
                     scalars={"logit_scale": math.log(100.0)})
    return clip


def taesd_state_dict(seed: int = 0) -> dict:
    """State dict of a TAESD-architecture VAE with random weights (about 2.4M parameters);
    comfy.sd.VAE recognizes it by its "taesd_decoder.1.weight" key."""
    import comfy.taesd.taesd
    taesd = comfy.taesd.taesd.TAESD()
    init_parameters_(taesd, _generator(seed, 3), scalars={"vae_scale": 1.0, "vae_shift": 0.0})
    return {k: v.detach().clone() for k, v in taesd.state_dict().items()}


def tiny_vae(seed: int = 0):
    """A TAESD-architecture comfy.sd.VAE with random weights, fp32."""
    import comfy.sd
    return comfy.sd.VAE(sd=taesd_state_dict(seed), dtype=torch.float32)


def tiny_text_config(base: dict, width: int) -> dict:
    """A tiny text-encoder config at another width (the UNet's context_dim must match)."""
    if width % 32:
        raise ValueError(f"text width {width} must be a multiple of 32 (32 channels per head)")
    return {**base, "hidden_size": width, "intermediate_size": 2 * width,
            "num_attention_heads": width // 32, "projection_dim": width}


def tiny_sd15(seed: int = 0, text_width: int = 64):
    """Tiny SD1.x: UNet 32 ch, two levels with attention everywhere (three cross-attention
    layers at the highest resolution), a `text_width`-wide 2-layer CLIP (the UNet's context_dim)
    with the real SD1 tokenizer, TAESD VAE; fp32, eps-prediction.  The default width 64 keeps the
    tests fast; wider encoders give words more distinct context vectors (the benchmark's choice)."""
    import comfy.sd1_clip
    import comfy.supported_models
    model = _make_unet(comfy.supported_models.SD15, unet_config(32, text_width, (1, 2)), seed)
    clip = _make_clip(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel, "l",
                      tiny_text_config(TINY_CLIP_L_CONFIG, text_width), seed, torch.float32)
    return model, clip, tiny_vae(seed)


def tiny_sd2(seed: int = 0, text_width: int = 64):
    """Tiny SD2.x: the SD20 model config (linear transformer projections, fp32 attention),
    forced to v-prediction, a `text_width`-wide 3-layer OpenCLIP-H-style text encoder read at
    the penultimate layer with the SD2 tokenizer, TAESD VAE; fp32."""
    import comfy.model_base
    import comfy.supported_models
    import comfy.text_encoders.sd2_clip as sd2_clip
    # SD20 uses 64 channels per head: with 32 channels that would be zero heads.
    model = _make_unet(comfy.supported_models.SD20,
                       unet_config(32, text_width, (1, 2), use_linear_in_transformer=True), seed,
                       model_type=comfy.model_base.ModelType.V_PREDICTION,
                       extra_config={"num_head_channels": 8})
    assert model.model.model_type == comfy.model_base.ModelType.V_PREDICTION
    clip = _make_clip(sd2_clip.SD2Tokenizer, sd2_clip.SD2ClipModel, "h",
                      tiny_text_config(TINY_CLIP_H_CONFIG, text_width), seed, torch.float32)
    return model, clip, tiny_vae(seed)


# --------------------------------------------------------------------------------------------
# A'. in-process SDXL

# SDXL reads both encoders at the penultimate layer (ComfyUI needs more than 2 layers); the two
# widths add up to the UNet's context_dim, clip_g's projection is the pooled vector in `y`.
TINY_SDXL_TEXT_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
                         "num_hidden_layers": 3, "projection_dim": 64}
SDXL_SIZE_EMBEDDINGS = 6 * 256  # model_base.SDXL.encode_adm: 6 size/crop values x Timestep(256)


def sdxl_unet_config(model_channels: int = 32, context_dim: int = 128, pooled_dim: int = 64) -> dict:
    """A tiny SDXL-style UNet config (detect_unet_config's form): three levels with two res blocks
    each, cross-attention only at the two lower resolutions (input blocks 4, 5, 7, 8, the middle
    block, output blocks 0-5) as in SDXL, linear transformer projections, 32 channels per head,
    `y` = pooled text vector + the six size embeddings."""
    return {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "num_classes": "sequential", "adm_in_channels": pooled_dim + SDXL_SIZE_EMBEDDINGS,
        "in_channels": 4, "out_channels": 4, "model_channels": model_channels,
        "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
        "transformer_depth": [0, 0, 1, 1, 1, 1], "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
        "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": context_dim,
        "num_head_channels": 32, "use_temporal_resblock": False, "use_temporal_attention": False,
    }


def tiny_sdxl_clip(seed: int = 0, dtype=torch.float32):
    """SDXL's text side at tiny size: comfy.sdxl_clip's tokenizer and SDXLClipModel (clip_l +
    clip_g, both at layer -2, pooled = clip_g's projected end-of-text output), each encoder
    3 layers and 64 wide, so the conditioning is 128 wide and the pooled vector 64."""
    import comfy.sdxl_clip
    configs = {"l": TINY_SDXL_TEXT_CONFIG, "g": TINY_SDXL_TEXT_CONFIG}
    return _make_text_encoders(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel, configs, seed, dtype)


def tiny_sdxl(seed: int = 0, prediction: str = "eps"):
    """Tiny SDXL: comfy.supported_models.SDXL's model (a comfy.model_base.SDXL, so `y` is built by
    its encode_adm) on sdxl_unet_config, the tiny_sdxl_clip text encoders, a TAESD-architecture
    VAE (4 latent channels like SDXL's latent format; the model's latent_format scales them);
    fp32.  prediction "v" marks the state dict with "v_pred", which SDXL.model_type() turns into
    ModelSamplingDiscrete with V_PREDICTION, as a NoobAI v-pred checkpoint loads."""
    import comfy.supported_models
    markers = {"eps": {}, "v": {"v_pred": torch.tensor([])}}
    if prediction not in markers:
        raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    model = _make_unet(comfy.supported_models.SDXL, sdxl_unet_config(), seed,
                       checkpoint_markers=markers[prediction])
    return model, tiny_sdxl_clip(seed), tiny_vae(seed)


# --------------------------------------------------------------------------------------------
# Text-encoder outputs at chosen token positions

def _text_encoder(clip):
    """The single SDClipModel inside a comfy.sd.CLIP (SD1.x: clip_l, SD2.x: clip_h)."""
    outer = clip.cond_stage_model
    name = getattr(outer, "clip", None)
    if name is None or not hasattr(outer, name):
        raise NotImplementedError(f"only single-encoder CLIPs are supported, got {type(outer).__name__}")
    return getattr(outer, name), getattr(outer, "clip_name")


def _is_single_encoder(clip) -> bool:
    """True for CLIPs with one text encoder (SD1.x, SD2.x), False for SDXL's clip_l + clip_g."""
    outer = clip.cond_stage_model
    name = getattr(outer, "clip", None)
    return name is not None and hasattr(outer, name)


def _token_source(clip):
    """(encoder, tokenizer key) whose token ids give the token positions: the only encoder, or
    SDXL's clip_l (clip_g tokenizes to the same ids up to the first end token, padding apart)."""
    if _is_single_encoder(clip):
        return _text_encoder(clip)
    outer = clip.cond_stage_model
    if hasattr(outer, "clip_l") and hasattr(outer, "clip_g"):
        return outer.clip_l, "l"
    raise NotImplementedError(f"no token layout for text encoder {type(outer).__name__}")


def _up_to_end(ids: list[int], end: int) -> list[int]:
    """Token ids cut after the first end token."""
    return ids[: ids.index(end) + 1]


def token_ids(clip, text: str, padded: bool = False) -> list[int]:
    """Token ids of `text` as ComfyUI feeds them to the text encoder: start token, ..., first
    end token, and with `padded` the padding after it (77 ids for CLIP).  For SDXL these are
    clip_l's ids; clip_g's must agree up to the first end token (checked)."""
    inner, key = _token_source(clip)
    tokens = clip.tokenize(text)
    ids = [int(t) for t, _ in tokens[key][0]]
    end = inner.special_tokens["end"]
    for other, pairs in tokens.items():
        if other != key and _up_to_end([int(t) for t, _ in pairs[0]], end) != _up_to_end(ids, end):
            raise ValueError(f"tokenizers {key!r} and {other!r} disagree on {text!r}")
    if padded:
        return ids
    return _up_to_end(ids, end)


def slot_layout(clip, template: str, word: str) -> tuple[list[int], list[int], int]:
    """(ids up to the first end token, slot positions, position of the first end token)."""
    ids = token_ids(clip, template.format(word))
    prefix = template.split("{}")[0].strip()
    n_prefix = len(token_ids(clip, prefix)) - 2 if prefix else 0
    word_ids = token_ids(clip, word)[1:-1]
    start = 1 + n_prefix
    slot = list(range(start, start + len(word_ids)))
    if ids[start:start + len(word_ids)] != word_ids:
        raise ValueError(f"could not locate {word!r} in the tokens of {template.format(word)!r}")
    return ids, slot, len(ids) - 1


@torch.no_grad()
def encode_prefixes(clip, id_lists: list[list[int]], check: bool = True) -> torch.Tensor:
    """Text-encoder outputs for several token sequences at once, fp32, [batch, max_len, dim].

    Runs ComfyUI's own embedding, encoder layers and final norm (and the CLIP's layer choice:
    last, penultimate for SD2, clip skip) on the given sequences, usually cut after their first
    end token (token_ids) instead of the padded 77 positions (token_ids(..., padded=True)).
    The text encoder is causal, so the outputs at those positions are the ones
    CLIP.encode_from_tokens produces, about ten times cheaper; `check` compares the first
    sequence with encode_from_tokens to make sure.  Single-encoder CLIPs (SD1.x, SD2.x) only.
    """
    import comfy.ops
    inner, key = _text_encoder(clip)
    clip.cond_stage_model.reset_clip_options()
    if clip.layer_idx is not None:
        clip.cond_stage_model.set_clip_options({"layer": clip.layer_idx})
    clip.load_model()
    if inner.layer not in ("last", "hidden"):
        raise NotImplementedError(f"layer mode {inner.layer!r}")
    text_model = inner.transformer.text_model
    emb = text_model.embeddings
    device = emb.token_embedding.weight.device
    length = max(len(x) for x in id_lists)
    end = inner.special_tokens["end"]
    ids = torch.tensor([x + [end] * (length - len(x)) for x in id_lists], device=device)
    x = emb.token_embedding(ids, out_dtype=torch.float32)
    x = x + comfy.ops.cast_to(emb.position_embedding.weight[:length], dtype=torch.float32, device=device)
    mask = torch.full((length, length), -torch.finfo(torch.float32).max, device=device).triu_(1)
    hidden = inner.layer_idx if inner.layer == "hidden" else None
    x, inter = text_model.encoder(x, mask=mask, intermediate_output=hidden)
    if inner.layer == "last":
        out = text_model.final_layer_norm(x)
    else:
        out = text_model.final_layer_norm(inter) if inner.layer_norm_hidden_state else inter
    out = out.float()
    if check:
        n = len(id_lists[0])
        pad = inner.special_tokens.get("pad", end)
        full_ids = id_lists[0] + [pad] * (inner.max_length - n)
        ref = clip.encode_from_tokens({key: [[(t, 1.0) for t in full_ids]]})[0, :n].to(out)
        err = (ref - out[0, :n]).abs().max().item()
        if not err <= 1e-3 * max(1.0, ref.abs().max().item()):
            raise RuntimeError(f"prefix encoding differs from CLIP.encode_from_tokens by {err:.3g}")
    return out


@torch.no_grad()
def encode_conditioning(clip, prompts: list[str]) -> torch.Tensor:
    """The context ComfyUI's sampling gets for each prompt, fp32, [n, tokens, context_dim]:
    clip.encode_from_tokens(clip.tokenize(p), return_dict=True)["cond"] (for SDXL the cat of
    clip_l's and clip_g's penultimate-layer outputs)."""
    rows = [clip.encode_from_tokens(clip.tokenize(p), return_dict=True)["cond"].float() for p in prompts]
    if len({r.shape for r in rows}) != 1:
        raise ValueError(f"prompts encode to different lengths: {sorted({tuple(r.shape) for r in rows})}")
    return torch.cat(rows)  # (n, tokens, context_dim)


def _context_rows(clip, template: str, words: list[str], layouts):
    """(outputs up to each prompt's first end token at least [n, len, dim], a function giving the
    full padded outputs of chosen word indices).  Single encoders use the cheaper causal prefix
    encoding; other CLIPs (SDXL) encode whole prompts with encode_conditioning."""
    if _is_single_encoder(clip):
        out = encode_prefixes(clip, [ids for ids, _, _ in layouts])

        def padded(indices):
            ids = [token_ids(clip, template.format(words[i]), padded=True) for i in indices]
            return encode_prefixes(clip, ids, check=False)
        return out, padded
    out = encode_conditioning(clip, [template.format(w) for w in words])
    return out, lambda indices: out[list(indices)]


def edit_and_preserve_vectors(clip, planted, vocabulary, template: str = TEMPLATE, heldout=(),
                              pad_prompts: int | None = None):
    """Context vectors to edit and to preserve.

    Edit set: for each planted word, the text-encoder outputs of template.format(word) at the
    word-dependent positions (the slot tokens, anything after them, the first end token).
    Preserve set: the same positions for every other vocabulary word, the template's prefix
    positions (start token and words before the slot; identical for every word since the
    encoder is causal), and the padding positions after the first end token of `pad_prompts`
    of the preserved prompts (None: all; they need a full-length encoding each).  The padding
    makes up most of the 77 context vectors the UNet attends to: left out, the edit would move
    it for every prompt.  Returns (edit [n_e, dim], preserve [n_p, dim], info) where info also
    holds "edit_kind" ("slot"/"eos" per edit row) and "heldout" vectors of `heldout` words
    (same positions as the edit set; for reporting only).  The vectors are rows of the context
    the UNet attends to: for SDXL, of the cat(clip_l, clip_g) conditioning (encode_conditioning).
    """
    planted = list(dict.fromkeys(planted))
    others = [w for w in dict.fromkeys(vocabulary) if w not in set(planted)]
    heldout = [w for w in dict.fromkeys(heldout) if w not in set(planted) | set(others)]
    words = planted + others + heldout
    layouts = [slot_layout(clip, template, w) for w in words]
    out, padded_rows = _context_rows(clip, template, words, layouts)
    per_word = [out[i, slot[0]: eos + 1] for i, (ids, slot, eos) in enumerate(layouts)]
    prefix_len = layouts[0][1][0]
    n_p, n_o = len(planted), len(others)

    n_pad = n_o if pad_prompts is None else max(0, min(int(pad_prompts), n_o))
    chosen = sorted({round(i * (n_o - 1) / max(1, n_pad - 1)) for i in range(n_pad)}) if n_pad else []
    pads = []
    if chosen:
        full = padded_rows([n_p + i for i in chosen])
        pads = [full[j, layouts[n_p + i][2] + 1:] for j, i in enumerate(chosen)]

    edit = torch.cat(per_word[:n_p])
    preserve = torch.cat([out[0, :prefix_len]] + per_word[n_p:n_p + n_o] + pads)
    edit_kind = []
    for _, slot, eos in layouts[:n_p]:
        edit_kind += ["eos" if pos == eos else "slot" for pos in range(slot[0], eos + 1)]
    info = {"planted": planted, "preserved_words": others, "heldout_words": heldout,
            "edit_positions": [list(range(slot[0], eos + 1)) for _, slot, eos in layouts[:n_p]],
            "prefix_positions": list(range(prefix_len)), "edit_kind": edit_kind,
            "padding_preserved_for": [others[i] for i in chosen],
            "heldout": torch.cat(per_word[n_p + n_o:]) if heldout else None}
    return edit, preserve, info


# --------------------------------------------------------------------------------------------
# The closed-form edit

def uce_delta(weight: torch.Tensor, edit: torch.Tensor, preserve: torch.Tensor, strength: float,
              lam: float, eps: float, generator: torch.Generator) -> torch.Tensor:
    """Delta = W' - W for one projection W [out, in] (context vectors are rows, [n, in]).

    W' minimizes ||W' C_e - T||^2 + lam ||(W' - W) C_p||^2 + eps' ||W' - W||^2 with targets
    T = W C_e + strength * ||W c|| * u (a seeded random unit direction per edit vector) and
    eps' = eps * mean ||c_e||^2.  Setting the gradient to zero gives
    Delta (C_e C_e^T + lam C_p C_p^T + eps' I) = R C_e^T with R = T - W C_e.
    Solved in float64; the result has rank <= number of edit vectors.
    """
    w = weight.detach().to(torch.float64)
    ce = edit.detach().to(torch.float64).T
    cp = preserve.detach().to(torch.float64).T
    directions = torch.randn(w.shape[0], ce.shape[1], generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    residual = strength * (w @ ce).norm(dim=0, keepdim=True) * directions
    ridge = eps * ce.pow(2).sum(0).mean()
    a = ce @ ce.T + lam * (cp @ cp.T) + ridge * torch.eye(w.shape[1], dtype=torch.float64)
    delta_t = torch.linalg.solve(a, ce @ residual.T)
    return delta_t.T.to(torch.float32).contiguous()


def _relative_change(weight, delta, vectors):
    w = weight.detach().double()
    v = vectors.detach().double().T
    return ((delta.double() @ v).norm(dim=0) / (w @ v).norm(dim=0).clamp_min(1e-12)).float()


def cross_attention_kv_keys(model_patcher) -> list[str]:
    """State-dict keys of every cross-attention key/value projection weight of the UNet."""
    keys = model_patcher.model.state_dict().keys()
    return sorted(k for k in keys if k.startswith("diffusion_model.")
                  and (k.endswith("attn2.to_k.weight") or k.endswith("attn2.to_v.weight")))


def _effective_weights(model_patcher, keys) -> dict[str, torch.Tensor]:
    """The weights the patcher computes with: stored weights plus any patches it already holds."""
    key_patches = model_patcher.get_key_patches("diffusion_model.")
    return {key: _patched_weight(key, key_patches[key]) for key in keys}


def _patched_weight(key, entry) -> torch.Tensor:
    import comfy.lora
    weight, _convert = entry[0]
    weight = weight.detach().to(torch.float32).clone()
    if len(entry) > 1:
        weight = comfy.lora.calculate_weight(entry[1:], weight, key)
    return weight


def _summary(values: torch.Tensor) -> dict:
    return {"mean": values.mean().item(), "min": values.min().item(),
            "median": values.median().item(), "max": values.max().item()}


def planted_edit_deltas(model_patcher, clip, planted=PLANTED, vocabulary=None, template: str = TEMPLATE,
                        strength: float = DEMO_STRENGTH, lam: float = DEMO_LAM, seed: int = DEMO_SEED,
                        eps: float = DEMO_EPS, heldout=(), pad_prompts: int | None = None):
    """The planted edit as {unet state-dict key: fp32 delta}, and statistics about it.

    The statistics are relative changes ||Delta c|| / ||W c|| over all edited projections:
    "planted_rel_change" (every edit vector), "planted_slot_rel_change" and
    "planted_eos_rel_change" (by position), "preserved_rel_change", and, when `heldout`
    words are given, "heldout_rel_change" (words in neither set); plus "delta_rel_norm"
    (||Delta|| / ||W|| per projection).
    """
    if vocabulary is None:
        vocabulary = load_vocabulary()
    edit, preserve, info = edit_and_preserve_vectors(clip, planted, vocabulary, template, heldout, pad_prompts)
    held = info.pop("heldout")
    kinds = info["edit_kind"]
    gen = _generator(seed, 4)
    deltas, rel_norm, changes = {}, {}, {"planted": [], "preserved": [], "heldout": []}
    with torch.no_grad():
        weights = _effective_weights(model_patcher, cross_attention_kv_keys(model_patcher))
        for key, w in weights.items():
            d = uce_delta(w, edit, preserve, strength, lam, eps, gen)
            deltas[key] = d
            rel_norm[key] = (d.norm() / w.norm()).item()
            changes["planted"].append(_relative_change(w, d, edit))
            changes["preserved"].append(_relative_change(w, d, preserve))
            if held is not None:
                changes["heldout"].append(_relative_change(w, d, held))
    if not deltas:
        raise ValueError("the model has no cross-attention key/value projections")
    planted_rc = torch.stack(changes["planted"])  # [n_keys, n_edit]
    stats = {"planted_rel_change": _summary(planted_rc),
             "preserved_rel_change": _summary(torch.cat(changes["preserved"]))}
    for kind in ("slot", "eos"):
        cols = [i for i, k in enumerate(kinds) if k == kind]
        if cols:
            stats[f"planted_{kind}_rel_change"] = _summary(planted_rc[:, cols])
    if changes["heldout"]:
        stats["heldout_rel_change"] = _summary(torch.cat(changes["heldout"]))
    stats.update(delta_rel_norm=rel_norm, n_edit_vectors=int(edit.shape[0]),
                 n_preserve_vectors=int(preserve.shape[0]), **info)
    return deltas, stats


def planted_edit_in_process(model_patcher, clip, planted=PLANTED, vocabulary=None, template: str = TEMPLATE,
                            strength: float = DEMO_STRENGTH, lam: float = DEMO_LAM, seed: int = DEMO_SEED,
                            eps: float = DEMO_EPS, heldout=(), pad_prompts: int | None = None):
    """A clone of `model_patcher` carrying the planted edit as ComfyUI "diff" weight patches.

    The input patcher is left unchanged.  The statistics of the edit (planted_edit_deltas) are
    attached to the clone as `.driftscope_planted_stats`.
    """
    deltas, stats = planted_edit_deltas(model_patcher, clip, planted, vocabulary, template,
                                        strength, lam, seed, eps, heldout, pad_prompts)
    patched = clone_with_deltas(model_patcher, deltas)
    patched.driftscope_planted_stats = stats
    return patched


def clone_with_deltas(model_patcher, deltas: dict[str, torch.Tensor]):
    """A clone of `model_patcher` with weight deltas (state-dict key -> delta) as ComfyUI "diff"
    patches; every delta must be accepted."""
    patched = model_patcher.clone()
    added = patched.add_patches({k: ("diff", (d,)) for k, d in deltas.items()}, 1.0)
    if len(added) != len(deltas):
        raise RuntimeError(f"only {len(added)} of {len(deltas)} patches were accepted")
    return patched


# --------------------------------------------------------------------------------------------
# LoRA export

def kohya_unet_names(model_patcher, keys) -> dict[str, str]:
    """{unet state-dict key: kohya LoRA name}, preferring the diffusers-style names kohya writes
    (lora_unet_down_blocks_0_attentions_0_..._attn2_to_k) over the raw ones ComfyUI also maps."""
    import comfy.lora
    key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
    names = {}
    for key in keys:
        cands = sorted(n for n, v in key_map.items() if v == key and n.startswith("lora_unet_"))
        diffusers = [n for n in cands if any(s in n for s in ("_down_blocks_", "_up_blocks_", "_mid_block_"))]
        if not cands:
            raise KeyError(f"no kohya LoRA name for {key}")
        names[key] = (diffusers or cands)[0]
    return names


def lora_state_dict(model_patcher, deltas: dict[str, torch.Tensor], rtol: float = 1e-6):
    """Exact kohya-format LoRA (fp32) of weight deltas via truncated SVD.

    The rank of each module is the number of singular values above rtol * the largest; the
    reconstruction is checked to fp32 precision.  alpha = rank, so ComfyUI's scale alpha/rank = 1.
    """
    names = kohya_unet_names(model_patcher, deltas.keys())
    sd, ranks = {}, {}
    for key, delta in deltas.items():
        d = delta.detach().to(torch.float64)
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        rank = max(1, int((s > s[0] * rtol).sum().item()))
        root = s[:rank].sqrt()
        up = (u[:, :rank] * root).to(torch.float32).contiguous()
        down = (root[:, None] * vh[:rank]).to(torch.float32).contiguous()
        err = ((up @ down) - delta.float()).norm() / delta.float().norm().clamp_min(1e-30)
        if err > 1e-5:
            raise RuntimeError(f"LoRA reconstruction of {key} is off by {err:.2e}")
        name = names[key]
        sd[f"{name}.lora_up.weight"] = up
        sd[f"{name}.lora_down.weight"] = down
        sd[f"{name}.alpha"] = torch.tensor(float(rank))
        ranks[name] = rank
    return sd, ranks


# --------------------------------------------------------------------------------------------
# SDXL LoRA files as people share them, and an adapted CLIP

# The UNet modules a kohya sd-scripts SDXL LoRA trains: the Linear layers of the transformers.
_KOHYA_UNET_MODULE = re.compile(
    r"^diffusion_model\.(input_blocks|middle_block|output_blocks)\.[\d.]*"
    r"(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))\.weight$")
# The text-encoder modules it trains: attention and MLP projections of every encoder layer.
_KOHYA_TEXT_MODULE = re.compile(
    r"^clip_([lg])\.transformer\.(text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12]))\.weight$")
_KOHYA_TEXT_PREFIX = {"l": "lora_te1_", "g": "lora_te2_"}  # SDXL: clip_l is te1, clip_g te2
_CROSS_ATTENTION_MODULE = re.compile(r"\.attn2\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def _computed_weights(patcher, keys) -> dict[str, torch.Tensor]:
    """fp32 copies of the weights `patcher` (a ModelPatcher, or a CLIP's .patcher) computes with:
    the stored weights (from ComfyUI's backup while a clone's patches sit in the shared modules)
    plus the patcher's own patches."""
    key_patches = patcher.get_key_patches()
    return {key: _patched_weight(key, key_patches[key]) for key in keys}


def kohya_sdxl_unet_name(key: str) -> str:
    """kohya's SDXL LoRA name of a UNet weight: the original (SGM) module path with dots as
    underscores, e.g. lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k."""
    return "lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")


def kohya_sdxl_text_name(key: str) -> str:
    """kohya's SDXL LoRA name of a text-encoder weight, e.g.
    clip_g.transformer.text_model.encoder.layers.0.mlp.fc1.weight -> lora_te2_text_model_encoder_layers_0_mlp_fc1."""
    match = _KOHYA_TEXT_MODULE.match(key)
    return _KOHYA_TEXT_PREFIX[match[1]] + match[2].replace(".", "_")


def kohya_sdxl_targets(model_patcher, clip) -> dict[str, tuple[str, str]]:
    """{kohya name: ("unet" | "clip", state-dict key)} of every module a kohya SDXL LoRA with
    text-encoder training touches."""
    targets = {kohya_sdxl_unet_name(k): ("unet", k) for k in model_patcher.model.state_dict()
               if _KOHYA_UNET_MODULE.match(k)}
    targets.update({kohya_sdxl_text_name(k): ("clip", k) for k in clip.cond_stage_model.state_dict()
                    if _KOHYA_TEXT_MODULE.match(k)})
    return targets


def _random_lora_pair(weight: torch.Tensor, rank: int, scale: float, strength: float,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_up [out, rank], lora_down [rank, in]) with ||scale * up @ down|| = strength * ||W||."""
    out_dim, in_dim = weight.shape
    down = torch.randn(rank, in_dim, generator=generator) / math.sqrt(in_dim)
    up = torch.randn(out_dim, rank, generator=generator)
    norm = (scale * up @ down).norm().clamp_min(1e-30)
    return (up * (strength * weight.float().norm() / norm)).contiguous(), down.contiguous()


def sdxl_kohya_lora_state_dict(model_patcher, clip, seed: int = 0, strength: float = 0.1,
                               rank: int = 4) -> dict[str, torch.Tensor]:
    """A kohya-format SDXL LoRA (fp32) with random factors from `seed`: lora_down/lora_up/alpha for
    every transformer Linear of the UNet (lora_unet_...) and every attention/MLP projection of
    clip_l (lora_te1_...) and clip_g (lora_te2_...).  alpha = rank / 2 as kohya users often set it
    (ComfyUI scales by alpha / rank); each module's delta is `strength` times its weight's norm."""
    targets = kohya_sdxl_targets(model_patcher, clip)
    weights = {side: _computed_weights(patcher, [k for s, k in targets.values() if s == side])
               for side, patcher in (("unet", model_patcher), ("clip", clip.patcher))}
    gen = _generator(seed, 5)
    alpha = rank / 2
    sd = {}
    for name, (side, key) in sorted(targets.items()):
        up, down = _random_lora_pair(weights[side][key], rank, alpha / rank, strength, gen)
        sd[f"{name}.lora_up.weight"] = up
        sd[f"{name}.lora_down.weight"] = down
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    return sd


def cross_attention_keys(model_patcher) -> list[str]:
    """State-dict keys of the q, k, v and output projections of every cross-attention (attn2)."""
    return sorted(k for k in model_patcher.model.state_dict()
                  if k.startswith("diffusion_model.") and _CROSS_ATTENTION_MODULE.search(k))


def nearest_kronecker(matrix: torch.Tensor, shape1: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) minimizing ||matrix - kron(A, B)|| with A of `shape1` (Van Loan and Pitsianis:
    the best rank-1 approximation of the rearranged matrix)."""
    (m1, n1), (m, n) = shape1, matrix.shape
    m2, n2 = m // m1, n // n1
    blocks = matrix.detach().double().reshape(m1, m2, n1, n2)  # (m1, m2, n1, n2)
    rearranged = blocks.permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)  # (m1*n1, m2*n2)
    u, s, vh = torch.linalg.svd(rearranged, full_matrices=False)
    root = s[0].sqrt()
    a = (root * u[:, 0]).reshape(m1, n1)  # (m1, n1)
    b = (root * vh[0]).reshape(m2, n2)  # (m2, n2)
    return a.float().contiguous(), b.float().contiguous()


def _lokr_factors(weight, delta, factor: int, strength: float, generator):
    """(lokr_w1 [factor, factor], lokr_w2 [out/factor, in/factor]) for one weight: the nearest
    Kronecker product of `delta`, or random with ||kron(w1, w2)|| = strength * ||W|| when None."""
    out_dim, in_dim = weight.shape
    if out_dim % factor or in_dim % factor:
        raise ValueError(f"LoKr factor {factor} does not divide the weight's shape {tuple(weight.shape)}")
    if delta is not None:
        return nearest_kronecker(delta, (factor, factor))
    w1 = torch.randn(factor, factor, generator=generator)
    w2 = torch.randn(out_dim // factor, in_dim // factor, generator=generator)
    w2 *= strength * weight.float().norm() / (w1.norm() * w2.norm())  # ||kron(a, b)|| = ||a|| ||b||
    return w1.contiguous(), w2.contiguous()


def lokr_state_dict(model_patcher, deltas_or_seed=0, factor: int = 4, strength: float = 0.1,
                    keys=None) -> dict[str, torch.Tensor]:
    """A LyCORIS LoKr file's state dict (fp32, full-matrix factors lokr_w1/lokr_w2 plus alpha, as
    LyCORIS writes it; ComfyUI applies kron(w1, w2) unscaled for full factors) under kohya names.

    `deltas_or_seed`: an int gives random factors for `keys` (default: every cross-attention
    projection, cross_attention_keys) with each delta `strength` times its weight's norm; a dict
    {UNet key: delta} gives the nearest Kronecker product of each delta (exact if it is one)."""
    if isinstance(deltas_or_seed, dict):
        deltas, gen = deltas_or_seed, None
        keys = sorted(deltas)
    else:
        deltas, gen = {}, _generator(int(deltas_or_seed), 6)
        keys = sorted(keys or cross_attention_keys(model_patcher))
    weights = _computed_weights(model_patcher, keys)
    sd = {}
    for key in keys:
        w1, w2 = _lokr_factors(weights[key], deltas.get(key), factor, strength, gen)
        name = kohya_sdxl_unet_name(key)
        sd[f"{name}.lokr_w1"], sd[f"{name}.lokr_w2"] = w1, w2
        sd[f"{name}.alpha"] = torch.tensor(float(factor))
    return sd


SDXL_KOHYA_LORA = "driftscope_sdxl_kohya.safetensors"
SDXL_LOKR = "driftscope_sdxl_lokr.safetensors"


def write_sdxl_loras(folder, model_patcher, clip, seed: int = 0, strength: float = 0.1) -> dict[str, Path]:
    """Write the kohya LoRA (UNet + both text encoders) and the LoKr file (UNet cross-attention)
    of the given SDXL model as safetensors into `folder`, with the metadata kohya and LyCORIS
    write.  Returns {"kohya": path, "lokr": path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "kohya": (SDXL_KOHYA_LORA, sdxl_kohya_lora_state_dict(model_patcher, clip, seed, strength),
                  {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"}),
        "lokr": (SDXL_LOKR, lokr_state_dict(model_patcher, seed, strength=strength),
                 {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "lokr"}),
                  "ss_base_model_version": "sdxl_base_v1-0"}),
    }
    paths = {}
    for kind, (name, sd, meta) in files.items():
        paths[kind] = folder / name
        _atomic_save(sd, paths[kind], metadata=meta)
    return paths


def sdxl_adapted_clip(clip, seed: int = 1, scale: float = 0.05):
    """A clone of an SDXL `clip` whose clip_l and clip_g differ from it (the adapted-CLIP side of a
    fine-tuned checkpoint): "diff" patches of relative size `scale` on every attention and MLP
    projection of both encoders.  The input CLIP is left unchanged."""
    gen = _generator(seed, 7)
    keys = sorted(k for k in clip.cond_stage_model.state_dict() if _KOHYA_TEXT_MODULE.match(k))
    weights = _computed_weights(clip.patcher, keys)
    patches = {}
    for key in keys:
        w = weights[key]
        noise = torch.randn(w.shape, generator=gen)
        patches[key] = ("diff", ((scale * w.norm() / noise.norm()) * noise,))
    adapted = clip.clone()
    added = adapted.add_patches(patches, 1.0)
    if len(added) != len(patches) or not patches:
        raise RuntimeError(f"only {len(added)} of {len(patches)} text-encoder patches were accepted")
    return adapted


# --------------------------------------------------------------------------------------------
# B. file-based demo models

def demo_unet(seed: int = DEMO_SEED):
    """Smallest UNet that ComfyUI detects as SD1.5: 320 channels, context 768, one level, one res
    block with a transformer, no output-block attention and no middle block (13.6M params).
    fp32 with fp16-representable weights."""
    import comfy.supported_models
    cfg = unet_config(320, 768, (1,), attention_output=False, attention_middle=False)
    model = _make_unet(comfy.supported_models.SD15, cfg, seed)
    _round_to_fp16_(model.model)
    return model


def demo_clip(seed: int = DEMO_SEED):
    """Random text encoder with the real CLIP-L shapes (768 wide, 12 layers, 12 heads, 3072
    MLP; CheckpointLoaderSimple needs them), held in fp16 like a loaded checkpoint on CPU."""
    import comfy.sd1_clip
    return _make_clip(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel, "l",
                      CLIP_L_CONFIG, seed, torch.float16)


def _atomic_save(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    import comfy.utils
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    comfy.utils.save_torch_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _atomic_write_json(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def checkpoint_state_dict(model_patcher, clip_sd: dict, vae_sd: dict) -> dict:
    """A full checkpoint's state dict (UNet, CLIP, VAE under the keys the stock loader reads).

    BaseModel.state_dict_for_saving takes the UNet's state dict first since ComfyUI 0.12
    (before, it read the UNet itself and took the CLIP first: a positional call then silently
    writes a checkpoint without its UNet). Told apart by the parameter's name.
    """
    import inspect
    base = model_patcher.model
    if "unet_state_dict" in inspect.signature(base.state_dict_for_saving).parameters:
        return base.state_dict_for_saving(base.diffusion_model.state_dict(), clip_state_dict=clip_sd, vae_state_dict=vae_sd)
    return base.state_dict_for_saving(clip_state_dict=clip_sd, vae_state_dict=vae_sd)


def demo_paths(models_dir) -> dict[str, Path]:
    models_dir = Path(models_dir)
    return {"base": models_dir / "checkpoints" / BASE_CKPT,
            "adapted": models_dir / "checkpoints" / ADAPTED_CKPT,
            "lora": models_dir / "loras" / PLANTED_LORA,
            "planted": models_dir / PLANTED_JSON,
            "stamp": models_dir / STAMP_JSON}


def _demo_recipe() -> dict:
    vocab = load_vocabulary(VOCABULARY)
    return {"version": DEMO_VERSION, "template": TEMPLATE, "planted": list(PLANTED),
            "vocabulary": VOCABULARY,
            "vocabulary_sha1": hashlib.sha1("\n".join(vocab).encode("utf-8")).hexdigest(),
            "strength": DEMO_STRENGTH, "lam": DEMO_LAM, "eps": DEMO_EPS, "seed": DEMO_SEED,
            "pad_prompts": DEMO_PAD_PROMPTS}


def build_demo_models(models_dir, log=print) -> dict:
    """Generate the demo checkpoints, LoRA and planted.json under `models_dir` (always)."""
    t0 = time.perf_counter()
    timings = {}
    paths = demo_paths(models_dir)
    for key in ("base", "lora"):
        paths[key].parent.mkdir(parents=True, exist_ok=True)
    recipe = _demo_recipe()
    vocab = load_vocabulary(VOCABULARY)

    model, clip, vae_sd = demo_unet(DEMO_SEED), demo_clip(DEMO_SEED), taesd_state_dict(DEMO_SEED)
    timings["build"] = time.perf_counter() - t0

    t = time.perf_counter()
    deltas, stats = planted_edit_deltas(model, clip, PLANTED, vocab, TEMPLATE, DEMO_STRENGTH, DEMO_LAM,
                                        DEMO_SEED, DEMO_EPS, HELDOUT_WORDS, DEMO_PAD_PROMPTS)
    timings["edit"] = time.perf_counter() - t

    t = time.perf_counter()
    sd = checkpoint_state_dict(model, clip.get_sd(), vae_sd)
    sd = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous()
          for k, v in sd.items()}
    meta = {"driftscope_demo": json.dumps(recipe)}
    _atomic_save(sd, paths["base"], metadata=meta)
    unet_sd = model.model.state_dict()
    for key, delta in deltas.items():
        sd["model." + key] = (unet_sd[key].float() + delta).to(torch.float16).contiguous()
    _atomic_save(sd, paths["adapted"], metadata=meta)
    del sd
    lora, ranks = lora_state_dict(model, deltas)
    _atomic_save(lora, paths["lora"], metadata=meta)
    timings["save"] = time.perf_counter() - t

    planted = {k: recipe[k] for k in ("template", "planted", "vocabulary", "strength", "lam")}
    planted.update({
        "version": DEMO_VERSION, "eps": DEMO_EPS, "seed": DEMO_SEED, "pad_prompts": DEMO_PAD_PROMPTS,
        "edited": "UNet cross-attention to_k/to_v (closed-form, UCE-style)",
        "edit_positions": "slot tokens and first end-of-text token of template.format(word)",
        "preserve_positions": "same positions of the other vocabulary words, the template prefix, and the"
                              " padding of the prompts in padding_preserved_for",
        "padding_preserved_for": stats["padding_preserved_for"],
        "files": {"base": f"checkpoints/{BASE_CKPT}", "adapted": f"checkpoints/{ADAPTED_CKPT}",
                  "lora": f"loras/{PLANTED_LORA}"},
        "lora_ranks": ranks,
        "relative_change_of_keys_values": {k[: -len("_rel_change")]: stats[k] for k in stats
                                           if k.endswith("_rel_change")},
        "heldout_words": stats["heldout_words"],
    })
    _atomic_write_json(planted, paths["planted"])
    timings["total"] = time.perf_counter() - t0
    stamp = dict(recipe, files={k: paths[k].stat().st_size for k in ("base", "adapted", "lora", "planted")})
    _atomic_write_json(stamp, paths["stamp"])
    if log is not None:
        parts = ", ".join(f"{k[:-len('_rel_change')]} {v['mean']:.4f} (max {v['max']:.4f})"
                          for k, v in stats.items() if k.endswith("_rel_change"))
        log(f"[demo_models] relative change of cross-attention keys/values: {parts};"
            f" LoRA ranks {sorted(set(ranks.values()))};"
            f" {timings['total']:.1f}s ({', '.join(f'{k} {v:.1f}s' for k, v in timings.items() if k != 'total')})")
    return {"stats": stats, "timings": timings, "ranks": ranks}


# --------------------------------------------------------------------------------------------
# B'. the smallest SDXL checkpoint the stock loader detects (not part of the test suite)

def sdxl_min_unet_config() -> dict:
    """The smallest UNet comfy.model_detection still matches to supported_models.SDXL (SDXL's
    widths and transformer depths: 320 channels, context 2048, adm 2816, depth [0,0,2,2,10,10],
    64 channels per head), shrunk where detection does not look: channel_mult [1,1,1], no
    transformers in the output blocks and no middle block (about 132M parameters)."""
    return {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "out_channels": 4,
        "model_channels": 320, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 1, 1],
        "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_output": [0] * 9,
        "transformer_depth_middle": -2, "use_linear_in_transformer": True, "context_dim": 2048,
        "num_heads": -1, "num_head_channels": 64, "use_temporal_resblock": False, "use_temporal_attention": False,
    }


def sdxl_min_unet(seed: int = DEMO_SEED):
    """The sdxl_min_unet_config UNet as an SDXL ModelPatcher, fp32 with fp16-representable weights."""
    import comfy.supported_models
    model = _make_unet(comfy.supported_models.SDXL, sdxl_min_unet_config(), seed)
    _round_to_fp16_(model.model)
    return model


def sdxl_full_clip(seed: int = DEMO_SEED):
    """SDXL's text encoders at their real sizes (CLIP-L 123M + CLIP-G 695M, ComfyUI's own configs:
    CheckpointLoaderSimple needs them), random weights, fp16."""
    import comfy.sdxl_clip
    return _make_text_encoders(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel, {}, seed, torch.float16)


def sdxl_checkpoint_file(path, seed: int = DEMO_SEED, log=print) -> dict:
    """Write the smallest checkpoint the stock loader detects as SDXL (sdxl_min_unet, sdxl_full_clip,
    a TAESD VAE; fp16, about 1.9 GB) to `path`.  Returns {"path", "bytes", "seconds": {"build", "save"}}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, clip = sdxl_min_unet(seed), sdxl_full_clip(seed)
    t1 = time.perf_counter()
    sd = checkpoint_state_dict(model, clip.get_sd(), taesd_state_dict(seed))
    del model, clip
    sd = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous() for k, v in sd.items()}
    _atomic_save(sd, path, metadata={"driftscope_demo": json.dumps({"family": "SDXL", "seed": seed})})
    seconds = {"build": t1 - t0, "save": time.perf_counter() - t1}
    if log is not None:
        log(f"[demo_models] SDXL checkpoint {path.name}: {path.stat().st_size / 1e9:.2f} GB,"
            f" build {seconds['build']:.1f}s, save {seconds['save']:.1f}s")
    return {"path": path, "bytes": path.stat().st_size, "seconds": seconds}


def _stamp_ok(paths: dict[str, Path]) -> bool:
    try:
        stamp = json.loads(paths["stamp"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if {k: stamp.get(k) for k in _demo_recipe()} != _demo_recipe():
        return False
    files = stamp.get("files", {})
    return all(paths[k].is_file() and paths[k].stat().st_size == files.get(k)
               for k in ("base", "adapted", "lora", "planted"))


@contextlib.contextmanager
def _lock(models_dir: Path):
    models_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, writes are still atomic
        yield
        return
    with open(models_dir / ".driftscope_demo.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_demo_models(models_dir, comfy_dir=None, force: bool = False, log=print) -> dict:
    """Paths of the demo files under `models_dir`, generating them first if any is missing or
    the version stamp does not match this module's recipe.

    Returns {"base", "adapted", "lora", "planted", "stamp", "models_dir": Path,
    "generated": bool, "seconds": float, "report": build report or None}.
    """
    prepare_comfy(comfy_dir)
    models_dir = Path(models_dir)
    paths = demo_paths(models_dir)
    t = time.perf_counter()
    report = None
    with _lock(models_dir):
        generated = force or not _stamp_ok(paths)
        if generated:
            report = build_demo_models(models_dir, log=log)
    return dict(paths, models_dir=models_dir, generated=generated,
                seconds=time.perf_counter() - t, report=report)


def verify_demo_models(paths: dict, log=print) -> dict:
    """Load the demo files with ComfyUI's loaders and check what the tests rely on: SD15
    detection with CLIP and VAE, LoRA-on-base == adapted checkpoint for every edited weight,
    and an unchanged base patcher.  Returns the measured numbers."""
    import comfy.model_management as mm
    import comfy.sd
    import comfy.supported_models
    import comfy.utils
    base, base_clip, base_vae, _ = comfy.sd.load_checkpoint_guess_config(str(paths["base"]))
    if not isinstance(base.model.model_config, comfy.supported_models.SD15):
        raise AssertionError(f"detected {type(base.model.model_config).__name__}, not SD15")
    if base_clip is None or base_vae is None:
        raise AssertionError("checkpoint loaded without CLIP or VAE")
    adapted = comfy.sd.load_checkpoint_guess_config(str(paths["adapted"]), output_clip=False, output_vae=False)[0]
    keys = cross_attention_kv_keys(base)
    before = {k: v.detach().clone() for k, v in base.model.state_dict().items() if k in keys}
    lora = comfy.utils.load_torch_file(str(paths["lora"]), safe_load=True)
    patched, _ = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0.0)
    mm.load_models_gpu([patched], force_patch_weights=True)
    got = {k: v.detach().float().clone() for k, v in patched.model.state_dict().items() if k in keys}
    mm.load_models_gpu([adapted])
    want = {k: v.detach().float() for k, v in adapted.model.state_dict().items() if k in keys}
    max_err = max((got[k] - want[k]).abs().max().item() for k in keys)
    moved = min((want[k] - before[k].float()).abs().max().item() for k in keys)
    patched.unpatch_model()
    mm.unload_all_models()
    unchanged = all(torch.equal(before[k], v) for k, v in base.model.state_dict().items() if k in keys)
    result = {"model_config": type(base.model.model_config).__name__, "edited_keys": keys,
              "lora_vs_adapted_max_abs_err": max_err, "min_edit_max_abs": moved,
              "base_unchanged": unchanged}
    if log is not None:
        log(f"[demo_models] verified: {result['model_config']}, LoRA vs adapted max |err| {max_err:.2e}"
            f" (edit size {moved:.3f}), base unchanged: {unchanged}")
    if max_err > 1e-3 * max(1.0, moved) or not unchanged:
        raise AssertionError(f"demo model verification failed: {result}")
    return result


# --------------------------------------------------------------------------------------------
# C. Flux.1 and Chroma

# ComfyUI's T5-XXL class at tiny size (2 heads x 32, 2 layers); Flux's CLIP-L gives only the
# pooled vector, TINY_CLIP_L_CONFIG's 64 (vec_in_dim).
TINY_T5_CONFIG = {"d_model": 64, "d_ff": 128, "num_heads": 2, "d_kv": 32, "num_layers": 2}
T5_TOKEN_STD = 1.0
T5_RELATIVE_BIAS_STD = 0.1
# Flux.1 at tiny size: hidden 64 = 2 heads x 32 (axes_dim adds up to 32), two double blocks and
# one single block.  guidance_embed is set by the variant.
TINY_FLUX_CONFIG = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 64,
                    "context_in_dim": 64, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2,
                    "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2,
                    "qkv_bias": True}
# Chroma: Flux blocks without vector_in and modulation, the modulations come from the "distilled
# guidance" approximator: input 16 (timestep) + 16 (guidance) + 32 (modulation index) = 64 wide,
# output hidden_size wide.  in/out_channels are the patchified 16 x 2 x 2.
TINY_CHROMA_CONFIG = {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 64,
                      "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 1,
                      "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True,
                      "in_dim": 64, "out_dim": 64, "hidden_dim": 64, "n_layers": 2}
# Newer ComfyUI params dataclasses require fields older ones do not have (0.33: txt_ids_dims for
# Flux, txt_ids_dims and vec_in_dim for Chroma): their values for a plain Flux.1 / Chroma.
_DIT_FIELD_DEFAULTS = {"txt_ids_dims": [], "vec_in_dim": None}
# RMSNorm scales (QK norms; Chroma's approximator norms are added per layer): "scale" of 0.3.75's
# flux RMSNorm, "weight" of comfy.ops.RMSNorm in newer versions.
_DIT_SCALARS = {"scale": 1.0, "_norm.weight": 1.0}
FLUX_LATENT_CHANNELS = 16
# The adaLN modulation layers of the tiny DiTs (Flux: img_mod/txt_mod/modulation .lin, Chroma:
# the approximator's output) start at this fraction of init_parameters_' scale.
FLUX_MODULATION_GAIN = 0.25
_MODULATION_MODULE = re.compile(r"(_mod\.lin|^single_blocks\.\d+\.modulation\.lin|distilled_guidance_layer\.out_proj)$")
# The planted edit on Flux's double blocks (see uce_delta): the planted tokens' keys/values are
# pushed by FLUX_STRENGTH times their norm; the preserve set (every token of 100 prompts at three
# sigmas, about 77k vectors, against one edit vector per planted token) needs a far smaller lam
# than the UNet edit's.  Flux normalizes queries and keys (RMSNorm) before the softmax, so a key
# pushed far past its own norm only turns, and a leak into other words of a quarter of the push
# turns theirs nearly as much: at strength 12 (planted keys/values moved 9.4x, held-out 2.1x) the
# attention maps of planted and other words drifted alike.  At 1.5 (planted 1.3x, held-out 0.3x,
# with the 31 test words) an attention audit ranks single-piece planted words 1-3 and flags only
# them (tests/nodes/test_flux_audit.py).
FLUX_STRENGTH = 1.5
FLUX_LAM = 0.02
FLUX_EPS = 0.1
FLUX_PAD_PROMPTS = None  # the padding of every preserved prompt joins the preserve set
FLUX_SIGMAS = (1.0, 0.75, 0.5)


def _seeded_text_side(tokenizer_cls, clip_cls, options: dict, seed: int, dtype):
    """A comfy.sd.CLIP of (tokenizer_cls, clip_cls) built with `options` as model_options,
    every CLIP and T5 parameter seeded (token and position embeddings as _make_text_encoders,
    T5's shared embedding and relative attention bias, T5's RMS norms at 1)."""
    import comfy.sd
    import comfy.supported_models_base
    target = comfy.supported_models_base.ClipTarget(tokenizer_cls, clip_cls)
    clip = comfy.sd.CLIP(target, model_options={"dtype": dtype, **options})
    init_parameters_(clip.cond_stage_model, _generator(seed, 2), gain=CLIP_LAYER_GAIN,
                     embedding_std={"token_embedding.weight": CLIP_TOKEN_STD,
                                    "position_embedding.weight": CLIP_POSITION_STD,
                                    "shared.weight": T5_TOKEN_STD,
                                    "relative_attention_bias.weight": T5_RELATIVE_BIAS_STD},
                     scalars={"logit_scale": math.log(100.0), "layer_norm.weight": 1.0})
    return clip


def tiny_flux_clip(seed: int = 0, dtype=torch.float32):
    """Flux.1's text side at tiny size: comfy.text_encoders.flux's FluxTokenizer and FluxClipModel
    (CLIP-L for the pooled vector, T5-XXL for the context; T5 has no start token, end 1, pad 0,
    at least 256 tokens), CLIP-L 2 layers x 64 and T5 2 layers x 64 (TINY_T5_CONFIG), seeded.
    encode_from_tokens(..., return_dict=True) gives cond [1, 256, 64] and pooled_output [1, 64].
    The same model_options work on ComfyUI 0.3.75 and 0.33."""
    import comfy.text_encoders.flux
    options = {"clip_l_model_config": dict(TINY_CLIP_L_CONFIG), "t5xxl_model_config": dict(TINY_T5_CONFIG)}
    return _seeded_text_side(comfy.text_encoders.flux.FluxTokenizer,
                             comfy.text_encoders.flux.flux_clip(dtype_t5=dtype), options, seed, dtype)


def tiny_chroma_clip(seed: int = 0, dtype=torch.float32):
    """Chroma's text side at tiny size, as supported_models.Chroma.clip_target builds it:
    comfy.text_encoders.pixart_t5's PixArtTokenizer (T5 pieces and the end token, no padding)
    and pixart_te (T5 only, no pooled vector), T5 as TINY_T5_CONFIG, seeded."""
    import comfy.text_encoders.pixart_t5
    options = {"t5xxl_model_config": dict(TINY_T5_CONFIG)}
    return _seeded_text_side(comfy.text_encoders.pixart_t5.PixArtTokenizer,
                             comfy.text_encoders.pixart_t5.pixart_te(dtype_t5=dtype), options, seed, dtype)


def _dit_config(params_cls, cfg: dict) -> dict:
    """`cfg` with the fields this ComfyUI's params dataclass requires and `cfg` lacks filled from
    _DIT_FIELD_DEFAULTS (the dataclass is built from the config's keys, so none may be extra)."""
    import dataclasses
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    out = {k: v for k, v in cfg.items() if k == "image_model" or k in fields}
    extra = sorted(set(cfg) - set(out))
    if extra:
        raise ValueError(f"{params_cls.__name__} has no fields {extra}")
    for name, field in fields.items():
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if name not in out and required:
            if name not in _DIT_FIELD_DEFAULTS:
                raise ValueError(f"no value for {params_cls.__name__}.{name}")
            out[name] = _DIT_FIELD_DEFAULTS[name]
    return out


@torch.no_grad()
def _shape_dit_init_(dit: torch.nn.Module, generator: torch.Generator) -> None:
    """Two changes to init_parameters_' Gaussian init of a Flux/Chroma DiT that keep different
    words apart at the text stream's qkv inputs: txt_in gets orthonormal columns (norm-preserving,
    where a square Gaussian matrix squeezes the T5 outputs' spread), and the adaLN modulation
    layers are scaled by FLUX_MODULATION_GAIN (trained DiTs start from zero modulation; at full
    gain the per-channel scales weigh a few channels far above the rest).  Measured on tiny_flux:
    the participation ratio of 100 words' qkv inputs rises from 18 to 34 of 64, and in a 2-step
    sampling the planted edit changes held-out words by about 0.3 of what it changes the planted
    ones, down from 0.7."""
    w = dit.txt_in.weight
    tall = w.shape[0] >= w.shape[1]
    g = torch.randn(w.shape if tall else w.shape[::-1], generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r))
    w.copy_((q if tall else q.T).to(w.dtype))
    for name, module in dit.named_modules():
        if _MODULATION_MODULE.search(name):
            module.weight.mul_(FLUX_MODULATION_GAIN)


def _make_dit(config_cls, cfg: dict, seed: int, scalars: dict | None = None):
    """A ModelPatcher around `config_cls`'s own model (its get_model: model_base class, model type
    and model_sampling as a loaded checkpoint gets them), fp32, seeded weights (init_parameters_
    with _DIT_SCALARS and `scalars`, then _shape_dit_init_)."""
    model_config = config_cls(cfg)
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    init_parameters_(base.diffusion_model, _generator(seed, 1), scalars={**_DIT_SCALARS, **(scalars or {})})
    _shape_dit_init_(base.diffusion_model, _generator(seed, 9))
    return _model_patcher(base)


def taef1_state_dict(seed: int = 0) -> dict:
    """State dict of a TAESD-architecture VAE with 16 latent channels (the "taef1" layout,
    about 2.4M parameters; comfy.sd.VAE builds any AutoencoderKL state dict with SD's fixed
    widths, 128 channels x [1, 2, 4, 4], about 84M, so this is the smallest 16-channel VAE it
    accepts), random weights from `seed`.  comfy.sd.VAE reads the latent channels from
    "taesd_decoder.1.weight"."""
    import comfy.taesd.taesd
    taesd = comfy.taesd.taesd.TAESD(latent_channels=FLUX_LATENT_CHANNELS)
    init_parameters_(taesd, _generator(seed, 3), scalars={"vae_scale": 1.0, "vae_shift": 0.0})
    return {k: v.detach().clone() for k, v in taesd.state_dict().items()}


def tiny_flux_vae(seed: int = 0):
    """A comfy.sd.VAE for Flux latents (16 channels, taef1_state_dict), fp32."""
    import comfy.sd
    return comfy.sd.VAE(sd=taef1_state_dict(seed), dtype=torch.float32)


def tiny_flux(seed: int = 0, variant: str = "dev"):
    """Tiny Flux.1: (ModelPatcher, comfy.sd.CLIP, comfy.sd.VAE).

    variant "dev": comfy.supported_models.Flux (guidance_embed True; a comfy.model_base.Flux with
    ModelType.FLUX and ModelSamplingFlux, shift 1.15), "schnell": FluxSchnell (guidance_embed
    False; ComfyUI gives it ModelType.FLOW with ModelSamplingDiscreteFlow, shift 1.0).  The DiT is
    TINY_FLUX_CONFIG (0.43M parameters for dev), the text side tiny_flux_clip, the VAE
    tiny_flux_vae; fp32, all from `seed`."""
    import comfy.ldm.flux.model
    import comfy.supported_models
    variants = {"dev": (comfy.supported_models.Flux, True), "schnell": (comfy.supported_models.FluxSchnell, False)}
    if variant not in variants:
        raise ValueError(f"variant must be 'dev' or 'schnell', got {variant!r}")
    config_cls, guidance = variants[variant]
    cfg = _dit_config(comfy.ldm.flux.model.FluxParams, dict(TINY_FLUX_CONFIG, guidance_embed=guidance))
    return _make_dit(config_cls, cfg, seed), tiny_flux_clip(seed), tiny_flux_vae(seed)


def tiny_chroma(seed: int = 0):
    """Tiny Chroma: (ModelPatcher, comfy.sd.CLIP, comfy.sd.VAE) from comfy.supported_models.Chroma
    (a comfy.model_base.Chroma, a subclass of model_base.Flux: test for it first), the DiT as
    TINY_CHROMA_CONFIG, tiny_chroma_clip (T5 only) and tiny_flux_vae; fp32, from `seed`.  Its
    extra_conds put guidance 0 unless told otherwise."""
    import comfy.ldm.chroma.model
    import comfy.supported_models
    cfg = _dit_config(comfy.ldm.chroma.model.ChromaParams, TINY_CHROMA_CONFIG)
    norms = {f"distilled_guidance_layer.norms.{i}.{name}": 1.0
             for i in range(cfg["n_layers"]) for name in ("weight", "scale")}
    model = _make_dit(comfy.supported_models.Chroma, cfg, seed, norms)
    return model, tiny_chroma_clip(seed), tiny_flux_vae(seed)


# -- token positions and conditioning ---------------------------------------------------------

def _t5_ids(clip, text: str) -> list[int]:
    return [int(t[0]) for t in clip.tokenize(text)["t5xxl"][0]]


def t5_slot_positions(clip, template: str, word: str) -> list[int]:
    """Positions of `word`'s T5 pieces in clip.tokenize(template.format(word))["t5xxl"] (T5 has no
    start token; a word is its SentencePiece pieces, e.g. "tiger" -> "▁", "t", "iger", the pieces
    ComfyUI's tokenizer gives the word on its own).  Raises if they are not found after the
    template's prefix."""
    ids = _t5_ids(clip, template.format(word))
    end = clip.cond_stage_model.t5xxl.special_tokens["end"]
    pieces = _up_to_end(_t5_ids(clip, word), end)[:-1]
    prefix = template.split("{}")[0].strip()
    start = len(_up_to_end(_t5_ids(clip, prefix), end)) - 1 if prefix else 0
    for i in range(start, len(ids) - len(pieces) + 1):
        if pieces and ids[i:i + len(pieces)] == pieces:
            return list(range(i, i + len(pieces)))
    raise ValueError(f"could not locate {word!r} in the T5 tokens of {template.format(word)!r}")


def flux_conditioning(clip, prompt: str) -> dict:
    """ComfyUI's conditioning of a prompt: encode_from_tokens(tokenize(prompt), return_dict=True)
    ({"cond": [1, tokens, 64], "pooled_output": [1, 64] or None for Chroma's T5-only side})."""
    return clip.encode_from_tokens(clip.tokenize(prompt), return_dict=True)


@torch.no_grad()
def flux_euler(model_patcher, conds: list[dict], sigmas=FLUX_SIGMAS, seed: int = 0, size: int = 8,
               guidance: float | None = None, hooks: dict | None = None) -> torch.Tensor:
    """Truncated Euler sampling of a Flux/Chroma model, one row per conditioning (all of the same
    token length), all from the same seeded noise [1, 16, size, size]: start at sigmas[0]
    (ModelSamplingFlux.noise_scaling of an empty latent), evaluate model.apply_model at every
    sigma with the conds the model's own extra_conds builds (pooled_output as y, guidance:
    None = the model's default, 3.5 for Flux dev, 0 for Chroma), Euler steps in between.
    Returns the model's denoised prediction at the last sigma [n, 16, size, size] (fp32, CPU).
    `hooks` {module: fn(module, args)} are registered as forward pre-hooks during the run."""
    import comfy.model_management as mm
    mm.load_models_gpu([model_patcher])
    base = model_patcher.model
    device = mm.get_torch_device()
    n = len(conds)
    cond = torch.cat([c["cond"] for c in conds]).to(device)
    pooled = [c.get("pooled_output") for c in conds]
    pooled = None if any(p is None for p in pooled) else torch.cat(pooled).to(device)
    noise = torch.randn(1, FLUX_LATENT_CHANNELS, size, size, generator=_generator(seed, 8)).to(device)
    noise = noise.expand(n, -1, -1, -1).clone()
    x = base.model_sampling.noise_scaling(torch.tensor([float(sigmas[0])], device=device), noise,
                                          torch.zeros_like(noise))
    kwargs = {"pooled_output": pooled, "cross_attn": cond, "device": device, "noise": x}
    if guidance is not None:
        kwargs["guidance"] = guidance
    extra = {k: v.process_cond(batch_size=n, device=device, area=None).cond.to(device)
             for k, v in base.extra_conds(**kwargs).items()}
    handles = [m.register_forward_pre_hook(fn) for m, fn in (hooks or {}).items()]
    try:
        for i, sigma in enumerate(sigmas):
            s = torch.full((n,), float(sigma), device=device)
            denoised = base.apply_model(x, s, **extra).float()
            if i + 1 < len(sigmas):
                x = x + (x - denoised) / float(sigma) * (float(sigmas[i + 1]) - float(sigma))
    finally:
        for h in handles:
            h.remove()
    return denoised.cpu()


def flux_txt_qkv_keys(model_patcher) -> list[str]:
    """State-dict keys of every double block's text-stream qkv weight, in block order."""
    keys = model_patcher.model.state_dict().keys()
    found = [k for k in keys if re.fullmatch(r"diffusion_model\.double_blocks\.\d+\.txt_attn\.qkv\.weight", k)]
    return sorted(found, key=lambda k: int(k.split(".")[2]))


def flux_txt_qkv_inputs(model_patcher, clip, prompts: list[str], sigmas=FLUX_SIGMAS, seed: int = 0,
                        size: int = 8, guidance: float | None = None) -> dict[str, list[torch.Tensor]]:
    """The inputs of every double block's txt_attn.qkv while flux_euler runs each prompt:
    {qkv weight key: [one tensor [len(sigmas), tokens, hidden] per prompt]} (fp32, CPU),
    captured with forward pre-hooks.  Prompts of different token lengths (Chroma's unpadded T5)
    run in separate batches."""
    dm = model_patcher.model.diffusion_model
    keys = flux_txt_qkv_keys(model_patcher)
    modules = {k: dm.double_blocks[int(k.split(".")[2])].txt_attn.qkv for k in keys}
    conds = [flux_conditioning(clip, p) for p in prompts]
    out = {k: [None] * len(prompts) for k in keys}
    groups = {}
    for i, c in enumerate(conds):
        groups.setdefault(c["cond"].shape[1], []).append(i)
    for indices in groups.values():
        seen = {k: [] for k in keys}
        hooks = {m: (lambda k: lambda mod, args: seen[k].append(args[0].detach().float().cpu()))(k)
                 for k, m in modules.items()}
        flux_euler(model_patcher, [conds[i] for i in indices], sigmas, seed, size, guidance, hooks)
        for k in keys:
            stacked = torch.stack(seen[k], dim=1)  # (batch, n_sigmas, tokens, hidden)
            for j, i in enumerate(indices):
                out[k][i] = stacked[j]
    return out


def _t5_layout(clip, template: str, word: str) -> tuple[list[int], list[int], int, int]:
    """(slot positions, the slot positions whose piece does not also occur elsewhere in the
    prompt (all slot positions if none is left), position of the end token after the slot,
    number of tokens up to it)."""
    slot = t5_slot_positions(clip, template, word)
    ids = _t5_ids(clip, template.format(word))
    end = clip.cond_stage_model.t5xxl.special_tokens["end"]
    end_pos = ids.index(end, slot[-1] + 1)
    outside = {ids[p] for p in range(end_pos + 1) if p not in slot}
    own = [p for p in slot if ids[p] not in outside] or slot
    return slot, own, end_pos, end_pos + 1


def flux_planted_edit_deltas(model_patcher, clip, planted=PLANTED, vocabulary=None, template: str = TEMPLATE,
                             strength: float = FLUX_STRENGTH, lam: float = FLUX_LAM, seed: int = DEMO_SEED,
                             eps: float = FLUX_EPS, heldout=HELDOUT_WORDS, sigmas=FLUX_SIGMAS,
                             include_end: bool = False, pad_prompts: int | None = FLUX_PAD_PROMPTS):
    """The planted edit of a Flux/Chroma model as {double_blocks.N.txt_attn.qkv weight key: fp32
    delta} (q rows zero: only the key and value rows [hidden:3*hidden] move), and statistics.

    The edit and preserve vectors are the inputs of each block's txt_attn.qkv, captured with
    flux_txt_qkv_inputs at every sigma of the truncated sampling on seeded noise.  A word's
    positions are its T5 slot pieces in template.format(word) that occur nowhere else in the
    prompt, for a planted word also in no preserved prompt (T5's output keeps its token's
    identity: the "▁" of "▁ t iger" is nearly the template's "▁", its "t" nearly that of
    "▁be e t le"), plus the end token after them with `include_end` (off by default: T5's
    end-token output hardly depends on the word).
    Edit: one vector per planted position, its inputs averaged over the sigmas (uce_delta draws
    one target direction per vector; the sigma copies are within cosine 0.85-0.98).  Preserve:
    every position up to the end token of the other vocabulary words' prompts, the remaining
    positions up to the end token of the planted prompts, and the padding after the end token
    of the planted prompts and of `pad_prompts` evenly spaced preserved prompts (None: all), at
    every sigma.  Each block's key/value rows get uce_delta(strength, lam, eps).

    Statistics (relative changes ||Delta c|| / ||W_kv c|| over blocks and vectors, like
    planted_edit_deltas): "planted_rel_change" (every edit vector), "planted_slot_rel_change"
    (edited slot pieces), "planted_end_rel_change" (end tokens, edited or not),
    "preserved_rel_change" (every preserve vector), "preserved_words_rel_change" (the preserved
    words' positions), "template_rel_change" (template and padding positions of the preserve
    set), "heldout_rel_change" (the positions of `heldout` words, in neither set); plus
    "delta_rel_norm" (||Delta_kv|| / ||W_kv|| per key), counts, positions and settings.
    """
    if vocabulary is None:
        vocabulary = load_vocabulary()
    planted = list(dict.fromkeys(planted))
    others = [w for w in dict.fromkeys(vocabulary) if w not in set(planted)]
    heldout = [w for w in dict.fromkeys(heldout) if w not in set(planted) | set(others)]
    words = planted + others + heldout
    layouts = [_t5_layout(clip, template, w) for w in words]
    inputs = flux_txt_qkv_inputs(model_patcher, clip, [template.format(w) for w in words], sigmas, seed)
    n_p, n_o = len(planted), len(others)
    n_pad = n_o if pad_prompts is None else max(0, min(int(pad_prompts), n_o))
    padded = set(range(n_p)) | {n_p + round(i * (n_o - 1) / max(1, n_pad - 1)) for i in range(n_pad)}
    # a planted word's pieces that also occur in a preserved prompt ("t" of "▁ t iger" in
    # "▁be e t le") are left alone: T5's output for them is nearly the same in both prompts
    ids = [_t5_ids(clip, template.format(w))[:length] for w, (_, _, _, length) in zip(words, layouts)]
    kept = {t for i in range(n_p, n_p + n_o) for t in ids[i]}
    words_own = [own if i >= n_p else ([p for p in own if ids[i][p] not in kept] or own)
                 for i, (_, own, _, _) in enumerate(layouts)]
    positions = [own + [end] if include_end else list(own) for own, (_, _, end, _) in zip(words_own, layouts)]

    def rows(x, pos):  # (n_sigmas, tokens, hidden) -> (n_sigmas * len(pos), hidden)
        return x[:, pos].reshape(-1, x.shape[-1])

    gen = _generator(seed, 4)
    weights = _effective_weights(model_patcher, list(inputs))
    deltas, rel_norm = {}, {}
    names = ("planted", "planted_slot", "planted_end", "preserved", "preserved_words", "template", "heldout")
    changes = {k: [] for k in names}
    for key, per_prompt in inputs.items():
        w = weights[key]
        hidden = w.shape[1]
        w_kv = w[hidden:3 * hidden]
        sets = {k: [] for k in names}
        edit = []
        for i, (x, (slot, _, end, length), own, pos) in enumerate(zip(per_prompt, layouts, words_own, positions)):
            pad = list(range(length, x.shape[1])) if i in padded else []
            rest = [p for p in range(length) if p not in pos] + pad
            if i < n_p:
                edit.append(x[:, pos].mean(0))
                sets["planted"].append(rows(x, pos))
                sets["planted_slot"].append(rows(x, own))
                sets["planted_end"].append(rows(x, [end]))
                sets["preserved"].append(rows(x, rest))
                sets["template"].append(rows(x, rest))
            elif i < n_p + n_o:
                sets["preserved"].append(rows(x, list(range(length)) + pad))
                sets["preserved_words"].append(rows(x, pos))
                sets["template"].append(rows(x, rest))
            else:
                sets["heldout"].append(rows(x, pos))
        edit, preserve = torch.cat(edit), torch.cat(sets["preserved"])
        d_kv = uce_delta(w_kv, edit, preserve, strength, lam, eps, gen)
        delta = torch.zeros_like(w)
        delta[hidden:3 * hidden] = d_kv
        deltas[key] = delta
        rel_norm[key] = (d_kv.norm() / w_kv.norm()).item()
        for name in names:
            if sets[name]:
                changes[name].append(_relative_change(w_kv, d_kv, torch.cat(sets[name])))
    if not deltas:
        raise ValueError("the model has no double blocks")
    stats = {f"{name}_rel_change": _summary(torch.cat(values)) for name, values in changes.items() if values}
    stats.update(delta_rel_norm=rel_norm, n_edit_vectors=int(edit.shape[0]), n_preserve_vectors=int(preserve.shape[0]),
                 planted=planted, preserved_words=others, heldout_words=heldout, sigmas=[float(s) for s in sigmas],
                 edit_positions=dict(zip(planted, positions)),
                 padding_preserved_for=[words[i] for i in sorted(padded)],
                 strength=strength, lam=lam, eps=eps, include_end=include_end)
    return deltas, stats


def flux_planted_edit(model_patcher, clip, planted=PLANTED, vocabulary=None, template: str = TEMPLATE,
                      strength: float = FLUX_STRENGTH, seed: int = DEMO_SEED, sigmas=FLUX_SIGMAS,
                      lam: float = FLUX_LAM, eps: float = FLUX_EPS, heldout=HELDOUT_WORDS,
                      include_end: bool = False, pad_prompts: int | None = FLUX_PAD_PROMPTS):
    """(clone of `model_patcher` carrying the planted edit of flux_planted_edit_deltas as "diff"
    patches, stats).  The stats are also attached to the clone as `.driftscope_planted_stats`
    and hold the deltas under "deltas"; the input patcher is left unchanged."""
    deltas, stats = flux_planted_edit_deltas(model_patcher, clip, planted, vocabulary, template, strength, lam,
                                             seed, eps, heldout, sigmas, include_end, pad_prompts)
    patched = clone_with_deltas(model_patcher, deltas)
    stats["deltas"] = deltas
    patched.driftscope_planted_stats = stats
    return patched, stats


# -- Flux LoRA files ----------------------------------------------------------------------------

def flux_kohya_name(key: str) -> str:
    """kohya's Flux LoRA name of a DiT weight (diffusion_model.double_blocks.0.txt_attn.qkv.weight
    -> lora_unet_double_blocks_0_txt_attn_qkv), the name comfy.lora.model_lora_keys_unet maps."""
    return "lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")


def flux_lora_state_dict(model_patcher, deltas: dict[str, torch.Tensor], rank: int | None = None,
                         rtol: float = 1e-6):
    """(kohya-style Flux LoRA state dict, {name: rank}) of weight deltas: lora_up [out, r],
    lora_down [r, in] and alpha = r (ComfyUI scales by alpha / r = 1) per module, from a truncated
    SVD.  r is the delta's numerical rank (singular values above rtol * the largest) or `rank`
    if smaller; at the numerical rank the reconstruction is checked to fp32 precision.  Every
    name must be one ComfyUI maps to the key (comfy.lora.model_lora_keys_unet)."""
    import comfy.lora
    key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
    sd, ranks = {}, {}
    for key, delta in deltas.items():
        name = flux_kohya_name(key)
        if key_map.get(name) != key:
            raise KeyError(f"ComfyUI does not map {name} to {key}")
        d = delta.detach().to(torch.float64)
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        numerical = max(1, int((s > s[0] * rtol).sum().item()))
        r = numerical if rank is None else max(1, min(int(rank), numerical))
        root = s[:r].sqrt()
        up = (u[:, :r] * root).to(torch.float32).contiguous()
        down = (root[:, None] * vh[:r]).to(torch.float32).contiguous()
        if r == numerical:
            err = ((up @ down) - delta.float()).norm() / delta.float().norm().clamp_min(1e-30)
            if err > 1e-5:
                raise RuntimeError(f"LoRA reconstruction of {key} is off by {err:.2e}")
        sd[f"{name}.lora_up.weight"] = up
        sd[f"{name}.lora_down.weight"] = down
        sd[f"{name}.alpha"] = torch.tensor(float(r))
        ranks[name] = r
    return sd, ranks


def write_flux_lora(path, model_patcher, deltas: dict[str, torch.Tensor], rank: int | None = None) -> Path:
    """Write flux_lora_state_dict(model_patcher, deltas, rank) as safetensors to `path` with the
    metadata kohya writes for Flux LoRAs; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd, ranks = flux_lora_state_dict(model_patcher, deltas, rank)
    _atomic_save(sd, path, metadata={"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1",
                                     "driftscope_lora_ranks": json.dumps(ranks)})
    return path


# --------------------------------------------------------------------------------------------
# Qwen-Image

# Qwen2.5-VL at tiny size (its vision tower has a fixed size of 659M parameters: it is built but
# never initialized or run, since text-only prompts do not reach it; torch.empty leaves its pages
# untouched) and a 2-block Qwen-Image transformer on its 64-wide context.
TINY_QWEN25_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
                      "num_hidden_layers": 2}
TINY_QWEN_IMAGE_CONFIG = {"image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 2,
                          "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 64,
                          "axes_dims_rope": [8, 12, 12]}
QWEN_STRENGTH = 1.5  # as FLUX_STRENGTH: Qwen-Image normalizes its keys too (norm_added_k)
QWEN_SIGMAS = (1.0, 0.75, 0.5)


def tiny_qwen_image_clip(seed: int = 0, dtype=torch.float32):
    """Qwen-Image's text side at tiny size: comfy.text_encoders.qwen_image's tokenizer (the chat
    template, byte-level BPE) and QwenImageTEModel on a 2-layer, 64-wide Qwen2.5 language model
    (TINY_QWEN25_CONFIG); the language model's weights seeded, the vision tower left alone."""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.qwen_image as qwen_image
    target = comfy.supported_models_base.ClipTarget(qwen_image.QwenImageTokenizer, qwen_image.te(dtype_llama=dtype))
    clip = comfy.sd.CLIP(target, model_options={"dtype": dtype, "qwen25_7b_model_config": dict(TINY_QWEN25_CONFIG)})
    init_parameters_(clip.cond_stage_model.qwen25_7b.transformer.model, _generator(seed, 2), gain=CLIP_LAYER_GAIN,
                     embedding_std={"embed_tokens.weight": 1.0}, scalars={"weight": 1.0})
    return clip


def tiny_qwen_image(seed: int = 0):
    """Tiny Qwen-Image: (ModelPatcher of comfy.supported_models.QwenImage on
    TINY_QWEN_IMAGE_CONFIG, tiny_qwen_image_clip, None: no VAE, Qwen-Image's is a video VAE)."""
    import comfy.supported_models
    config = comfy.supported_models.QwenImage(dict(TINY_QWEN_IMAGE_CONFIG))
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    init_parameters_(base.diffusion_model, _generator(seed, 1), scalars={"weight": 1.0, "scale": 1.0})
    return _model_patcher(base), tiny_qwen_image_clip(seed), None


def qwen_text_kv_keys(model_patcher) -> list[str]:
    """State-dict keys of every block's text-stream key and value projections (add_k_proj,
    add_v_proj), in block order."""
    keys = model_patcher.model.state_dict().keys()
    found = [k for k in keys if re.fullmatch(r"diffusion_model\.transformer_blocks\.\d+\.attn\.add_[kv]_proj\.weight", k)]
    return sorted(found, key=lambda k: (int(k.split(".")[2]), k))


def _capture_inputs(model_patcher, cond_kwargs: dict, noise: torch.Tensor, modules: list, sigmas) -> list[torch.Tensor]:
    """The inputs of `modules` [len(sigmas), tokens, width] each (prompt 0 of the batch) while
    the model denoises `noise` over `sigmas` from the conditioning extra_conds builds out of
    `cond_kwargs` (Euler steps in between), captured with forward pre-hooks."""
    import comfy.model_management as mm
    mm.load_models_gpu([model_patcher])
    base = model_patcher.model
    x = base.model_sampling.noise_scaling(torch.tensor([float(sigmas[0])]), noise, torch.zeros_like(noise))
    extra = {k: v.process_cond(batch_size=1, area=None).cond for k, v in
             base.extra_conds(device="cpu", noise=x, **cond_kwargs).items()}
    seen = [[] for _ in modules]
    handles = [m.register_forward_pre_hook((lambda i: lambda mod, args: seen[i].append(args[0].detach().float()[0]))(i))
               for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            for j, sigma in enumerate(sigmas):
                denoised = base.apply_model(x, torch.tensor([float(sigma)]), **extra).float()
                if j + 1 < len(sigmas):
                    x = x + (x - denoised) / float(sigma) * (float(sigmas[j + 1]) - float(sigma))
    finally:
        for h in handles:
            h.remove()
    return [torch.stack(v) for v in seen]


def qwen_text_inputs(model_patcher, clip, prompt: str, sigmas=QWEN_SIGMAS, seed: int = 0, size: int = 8):
    """{block index: the input of its add_k_proj (= add_v_proj's) [len(sigmas), tokens, 64]} while
    the model denoises `prompt` from seeded noise over `sigmas`."""
    cond = clip.encode_from_tokens(clip.tokenize(prompt), return_dict=True)["cond"]
    noise = torch.randn(1, 16, 1, size, size, generator=_generator(seed, 8))  # one video frame
    blocks = model_patcher.model.diffusion_model.transformer_blocks
    inputs = _capture_inputs(model_patcher, {"cross_attn": cond}, noise, [b.attn.add_k_proj for b in blocks], sigmas)
    return dict(enumerate(inputs))


def _after_space_slot_positions(hf, template: str, word: str, offset: int = 0) -> list[int]:
    """Positions of `word`'s byte-level BPE tokens (" word": the space goes with the word) after
    `offset` tokens and template's text before the slot."""
    before = template.split("{}")[0].rstrip()
    start = offset + (len(hf(before)["input_ids"]) if before else 0)
    return list(range(start, start + len(hf(" " + word)["input_ids"])))


def qwen_slot_positions(clip, template: str, word: str) -> list[int]:
    """Positions of `word`'s tokens in the context ComfyUI's Qwen-Image text encoder gives for
    template.format(word) (the user's text onwards)."""
    return _after_space_slot_positions(clip.tokenizer.qwen25_7b.tokenizer, template, word)


def qwen_planted_edit(model_patcher, clip, planted, vocabulary, template: str = TEMPLATE,
                      strength: float = QWEN_STRENGTH, lam: float = FLUX_LAM, eps: float = FLUX_EPS,
                      seed: int = DEMO_SEED, sigmas=QWEN_SIGMAS):
    """(clone with the planted edit as "diff" patches, stats): a closed-form edit (uce_delta) of
    every block's text key and value projections so that the planted words' tokens get other
    keys and values and every other position of every vocabulary prompt keeps its own; edit
    and preserve vectors are the projections' inputs at `sigmas` (qwen_text_inputs). Stats:
    mean relative change of the projected vectors for planted and for preserved positions."""
    planted = list(dict.fromkeys(planted))
    others = [w for w in dict.fromkeys(vocabulary) if w not in set(planted)]
    inputs = {w: qwen_text_inputs(model_patcher, clip, template.format(w), sigmas, seed) for w in planted + others}
    slots = {p: qwen_slot_positions(clip, template, p) for p in planted}
    weights = _effective_weights(model_patcher, qwen_text_kv_keys(model_patcher))
    gen = _generator(seed, 4)
    deltas, changes = {}, {"planted": [], "preserved": []}
    for key, w in weights.items():
        block = int(key.split(".")[2])
        edit = torch.stack([inputs[p][block][:, slots[p]].mean(0).mean(0) for p in planted])
        keep = []
        for word, per_block in inputs.items():
            x = per_block[block]  # (n_sigmas, tokens, 64)
            slot = set(slots.get(word, ()))
            rows = [t for t in range(x.shape[1]) if t not in slot]
            keep.append(x[:, rows].reshape(-1, x.shape[-1]))  # (n_sigmas * kept, 64)
        preserve = torch.cat(keep)
        d = uce_delta(w, edit, preserve, strength, lam, eps, gen)
        deltas[key] = d
        changes["planted"].append(_relative_change(w, d, edit))
        changes["preserved"].append(_relative_change(w, d, preserve))
    patched = clone_with_deltas(model_patcher, deltas)
    stats = {f"{k}_rel_change": _summary(torch.cat(v)) for k, v in changes.items()}
    patched.driftscope_planted_stats = stats
    return patched, stats


# --------------------------------------------------------------------------------------------
# Z-Image

TINY_QWEN3_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 1, "num_key_value_heads": 1,
                     "num_hidden_layers": 3}
# NextDiT with Z-Image's modulation: 256 wide (2 heads x 128, axes_dims add up to 128), one
# refiner layer per stream, two main layers, caption and image padded to multiples of 32.
TINY_Z_IMAGE_CONFIG = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": 64,
                       "n_layers": 2, "n_refiner_layers": 1, "qk_norm": True, "n_heads": 2, "n_kv_heads": 2,
                       "axes_dims": [32, 48, 48], "axes_lens": [64, 32, 32], "rope_theta": 256.0,
                       "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0,
                       "pad_tokens_multiple": 32, "multiple_of": 32}
Z_IMAGE_STRENGTH = 1.5


def tiny_z_image_clip(seed: int = 0, dtype=torch.float32):
    """Z-Image's text side at tiny size: comfy.text_encoders.z_image's tokenizer (chat template,
    byte-level BPE) and ZImageTEModel (Qwen3 read at its second-to-last layer) on a 3-layer,
    64-wide Qwen3 (TINY_QWEN3_CONFIG), seeded."""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.z_image as z_image
    target = comfy.supported_models_base.ClipTarget(z_image.ZImageTokenizer, z_image.te(dtype_llama=dtype))
    clip = comfy.sd.CLIP(target, model_options={"dtype": dtype, "qwen3_4b_model_config": dict(TINY_QWEN3_CONFIG)})
    init_parameters_(clip.cond_stage_model.qwen3_4b.transformer, _generator(seed, 2), gain=CLIP_LAYER_GAIN,
                     embedding_std={"embed_tokens.weight": 1.0}, scalars={"weight": 1.0})
    return clip


def tiny_z_image(seed: int = 0):
    """Tiny Z-Image: (ModelPatcher of comfy.supported_models.ZImage on TINY_Z_IMAGE_CONFIG (a
    comfy.model_base.Lumina2, flow model), tiny_z_image_clip, None: no VAE)."""
    import comfy.supported_models
    config = comfy.supported_models.ZImage(dict(TINY_Z_IMAGE_CONFIG))
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    init_parameters_(base.diffusion_model, _generator(seed, 1), scalars={"weight": 1.0, "pad_token": 0.0})
    return _model_patcher(base), tiny_z_image_clip(seed), None


def z_image_slot_positions(clip, template: str, word: str) -> list[int]:
    """Positions of `word`'s tokens (" word") in the context ComfyUI's Z-Image text encoder gives
    for template.format(word): the chat template's head, the template's text, then the word."""
    hf = clip.tokenizer.qwen3_4b.tokenizer
    head = len(hf(clip.tokenizer.llama_template.split("{}")[0])["input_ids"])
    return _after_space_slot_positions(hf, template, word, head)


def z_image_planted_edit(model_patcher, clip, planted, vocabulary, template: str = TEMPLATE,
                         strength: float = Z_IMAGE_STRENGTH, lam: float = FLUX_LAM, eps: float = FLUX_EPS,
                         seed: int = DEMO_SEED):
    """(clone with the planted edit as a "diff" patch, stats): a closed-form edit (uce_delta) of
    the caption embedder's projection (cap_embedder.1, the text's way into the transformer, which
    needs no image or timestep), moving the planted words' tokens and keeping every other
    position of every vocabulary prompt. Its inputs are the caption embedder's RMS-normed
    context rows."""
    planted = list(dict.fromkeys(planted))
    others = [w for w in dict.fromkeys(vocabulary) if w not in set(planted)]
    norm = model_patcher.model.diffusion_model.cap_embedder[0]
    edit, keep = [], []
    with torch.no_grad():
        for word in planted + others:
            cond = clip.encode_from_tokens(clip.tokenize(template.format(word)), return_dict=True)["cond"].float()[0]
            x = norm(cond)  # (T, 64): the projection's inputs
            slot = z_image_slot_positions(clip, template, word)
            if word in planted:
                edit.append(x[slot].mean(0))
            keep.append(x[[t for t in range(x.shape[0]) if word not in planted or t not in slot]])
    key = "diffusion_model.cap_embedder.1.weight"
    w = _effective_weights(model_patcher, [key])[key]
    edit, preserve = torch.stack(edit), torch.cat(keep)
    delta = uce_delta(w, edit, preserve, strength, lam, eps, _generator(seed, 4))
    patched = clone_with_deltas(model_patcher, {key: delta})
    stats = {"planted_rel_change": _summary(_relative_change(w, delta, edit)),
             "preserved_rel_change": _summary(_relative_change(w, delta, preserve))}
    patched.driftscope_planted_stats = stats
    return patched, stats


# --------------------------------------------------------------------------------------------
# SD3 / SD3.5

# SD3's text side stacks CLIP-L/G (padded to 4096 wide) and T5 along the sequence, so T5 must be
# 4096 wide even at tiny size: one layer, one 16-wide head, its 32k x 4096 embedding (130M of its
# 133M parameters, 0.5 GB fp32) is most of the model.
TINY_SD3_T5_CONFIG = {"d_model": 4096, "d_ff": 64, "num_heads": 1, "d_kv": 16, "num_layers": 1}
TINY_SD3_CONFIG = {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None,
                   "adm_in_channels": 128, "num_patches": 256, "pos_embed_max_size": 16, "pos_embed_scaling_factor": None,
                   "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
                   "x_block_self_attn_layers": []}
SD3_STRENGTH = 1.5


def tiny_sd3_clip(seed: int = 0, t5: bool = True, dtype=torch.float32):
    """SD3's text side at tiny size: comfy.text_encoders.sd3_clip's tokenizer and SD3ClipModel
    with CLIP-L and CLIP-G (3 layers x 64, read at layer -2; pooled 64 + 64 = 128) and, with `t5`,
    TINY_SD3_T5_CONFIG; seeded."""
    import comfy.text_encoders.sd3_clip as sd3_clip
    options = {"clip_l_model_config": dict(TINY_SDXL_TEXT_CONFIG), "clip_g_model_config": dict(TINY_SDXL_TEXT_CONFIG)}
    if t5:
        options["t5xxl_model_config"] = dict(TINY_SD3_T5_CONFIG)
    return _seeded_text_side(sd3_clip.SD3Tokenizer, sd3_clip.sd3_clip(clip_l=True, clip_g=True, t5=t5, dtype_t5=dtype),
                             options, seed, dtype)


def tiny_sd3(seed: int = 0, t5: bool = True):
    """Tiny SD3: (ModelPatcher of comfy.supported_models.SD3 on TINY_SD3_CONFIG (MMDiT depth 2,
    128 wide; a comfy.model_base.SD3, flow, shift 3), tiny_sd3_clip, None: no VAE)."""
    import comfy.supported_models
    config = comfy.supported_models.SD3(dict(TINY_SD3_CONFIG))
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    init_parameters_(base.diffusion_model, _generator(seed, 1), scalars={"pos_embed": 0.0})
    with torch.no_grad():  # pos_embed is a buffer (a checkpoint carries it): torch.empty left garbage, NaN at times
        base.diffusion_model.pos_embed.normal_(0.0, 0.02, generator=_generator(seed, 3))
    return _model_patcher(base), tiny_sd3_clip(seed, t5), None


def sd3_slot_positions(clip, template: str, word: str) -> list[int]:
    """The word's rows in SD3's context for template.format(word): its CLIP tokens in rows 0-76
    and, with T5, its T5 pieces (t5_slot_positions) in rows 77-153."""
    clip_ids = [int(t) for t, *_ in clip.tokenize(template.format(word))["l"][0]]
    word_ids = [int(t) for t, *_ in clip.tokenize(word)["l"][0]][1:]
    word_ids = _up_to_end(word_ids, 49407)[:-1]
    rows = next(list(range(i, i + len(word_ids))) for i in range(len(clip_ids)) if clip_ids[i:i + len(word_ids)] == word_ids)
    if clip.cond_stage_model.t5xxl is not None:
        rows += [77 + p for p in t5_slot_positions(clip, template, word)]
    return rows


def sd3_context_inputs(model_patcher, clip, prompt: str, sigmas=QWEN_SIGMAS, seed: int = 0, size: int = 8):
    """{block index: the input of its context_block.attn.qkv [len(sigmas), 154, 128]} while the
    model denoises `prompt` from seeded noise over `sigmas`."""
    out = clip.encode_from_tokens(clip.tokenize(prompt), return_dict=True)
    noise = torch.randn(1, 16, size, size, generator=_generator(seed, 8))
    blocks = model_patcher.model.diffusion_model.joint_blocks
    inputs = _capture_inputs(model_patcher, {"cross_attn": out["cond"], "pooled_output": out["pooled_output"]}, noise,
                             [b.context_block.attn.qkv for b in blocks], sigmas)
    return dict(enumerate(inputs))


def sd3_planted_edit(model_patcher, clip, planted, vocabulary, template: str = TEMPLATE, strength: float = SD3_STRENGTH,
                     lam: float = FLUX_LAM, eps: float = FLUX_EPS, seed: int = DEMO_SEED, sigmas=QWEN_SIGMAS):
    """(clone with the planted edit as "diff" patches, stats): a closed-form edit (uce_delta) of
    the key and value rows of every joint block's context qkv projection, moving the planted
    words' rows (both places the word sits in SD3's context) and keeping every other row of
    every vocabulary prompt."""
    planted = list(dict.fromkeys(planted))
    others = [w for w in dict.fromkeys(vocabulary) if w not in set(planted)]
    inputs = {w: sd3_context_inputs(model_patcher, clip, template.format(w), sigmas, seed) for w in planted + others}
    slots = {p: sd3_slot_positions(clip, template, p) for p in planted}
    keys = sorted(k for k in model_patcher.model.state_dict()
                  if re.fullmatch(r"diffusion_model\.joint_blocks\.\d+\.context_block\.attn\.qkv\.weight", k))
    weights = _effective_weights(model_patcher, keys)
    gen = _generator(seed, 4)
    deltas, changes = {}, {"planted": [], "preserved": []}
    for key, w in weights.items():
        block, hidden = int(key.split(".")[2]), w.shape[1]
        w_kv = w[hidden:3 * hidden]
        edit, keep = [], []
        for word, per_block in inputs.items():
            x = per_block[block]  # (n_sigmas, 154, 128)
            rows = slots.get(word, [])
            if rows:
                edit += [x[:, r].mean(0) for r in rows]
            keep.append(x[:, [t for t in range(x.shape[1]) if t not in rows]].reshape(-1, hidden))
        edit, preserve = torch.stack(edit), torch.cat(keep)
        d_kv = uce_delta(w_kv, edit, preserve, strength, lam, eps, gen)
        delta = torch.zeros_like(w)
        delta[hidden:3 * hidden] = d_kv
        deltas[key] = delta
        changes["planted"].append(_relative_change(w_kv, d_kv, edit))
        changes["preserved"].append(_relative_change(w_kv, d_kv, preserve))
    patched = clone_with_deltas(model_patcher, deltas)
    stats = {f"{k}_rel_change": _summary(torch.cat(v)) for k, v in changes.items()}
    patched.driftscope_planted_stats = stats
    return patched, stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Generate DriftScope's demo models (no downloads).")
    ap.add_argument("--comfy", required=True, help="the ComfyUI folder (holding comfy/ and main.py)")
    ap.add_argument("--out", required=True, help="models folder; writes checkpoints/, loras/, planted.json")
    ap.add_argument("--force", action="store_true", help="regenerate even if the stamp matches")
    check = ap.add_mutually_exclusive_group()
    check.add_argument("--verify", action="store_true",
                       help="load the files back and check them even if they were up to date")
    check.add_argument("--no-verify", action="store_true", help="do not check freshly generated files")
    a = ap.parse_args(argv)
    prepare_comfy(a.comfy)
    info = ensure_demo_models(a.out, force=a.force)
    if not info["generated"]:
        print(f"[demo_models] up to date in {info['models_dir']}")
    if a.verify or (info["generated"] and not a.no_verify):
        verify_demo_models(info)
    for k in ("base", "adapted", "lora", "planted"):
        print(f"{k}: {info[k]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
