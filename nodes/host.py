"""ComfyUI objects -> the core's plain-torch model sides. The only place that knows ComfyUI's
model internals (MODEL/CLIP patchers, attention patches, sigma schedules)."""
from __future__ import annotations

import hashlib
import re

import torch

import comfy.clip_model
import comfy.model_management
import comfy.samplers
from comfy.ldm.modules.attention import optimized_attention

from ..driftscope_core.models import ModelSide, Runtime
from . import compat
from ..driftscope_core.prompts import TokenLayout
from ..driftscope_core.sampling import Schedule
from ..driftscope_core.text_encoder import ClipTextEncoder, TextEncoderConfig

SUPPORTED_FAMILIES = {"SD15": "SD1.x", "SD20": "SD2.x"}
_ATTN2 = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\.\d+\.transformer_blocks\.(\d+)\.attn2$")
_BLOCK = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}


class InputError(ValueError):
    """A node input cannot be used; the message names the input and the fix."""


# -- models -------------------------------------------------------------------------------------
def family_of(model, input_name: str) -> str:
    """The model family's config class name; SD1.x and SD2.x are supported."""
    name = type(model.model.model_config).__name__
    if name not in SUPPORTED_FAMILIES:
        raise InputError(
            f"{input_name}: model family '{name}' is not supported yet. DriftScope audits SD1.x and "
            "SD2.x checkpoints (SD15, SD20); load one of those."
        )
    return name


def check_pair(base_model, adapted_model, base_clip, adapted_clip) -> str:
    """Base and adapted must be the same architecture; returns the family."""
    fam_b, fam_a = family_of(base_model, "base_model"), family_of(adapted_model, "adapted_model")
    ctx_b = base_model.model.model_config.unet_config.get("context_dim")
    ctx_a = adapted_model.model.model_config.unet_config.get("context_dim")
    if fam_b != fam_a or ctx_b != ctx_a:
        raise InputError(
            f"base_model ({fam_b}, context {ctx_b}) and adapted_model ({fam_a}, context {ctx_a}) are "
            "different architectures; compare an adaptation with the checkpoint it was made from."
        )
    for name, clip in (("base_clip", base_clip), ("adapted_clip", adapted_clip)):
        width = _clip_inner(clip, name).transformer.text_model.embeddings.token_embedding.weight.shape[1]
        if width != ctx_b:
            raise InputError(f"{name}: text encoder width {width} does not match the model's context {ctx_b}; connect the CLIP of the same checkpoint.")
    return fam_b


def grad_ready_clone(patcher):
    """A clone whose every weight is copied at forward time (identity weight wrappers), so
    gradients can flow through weights that loaders created as inference tensors. LoRA and
    other patches stay applied; the input patcher is untouched. Under Dynamic VRAM the clone is
    ComfyUI's non-dynamic delegate (compat.non_dynamic)."""
    p = compat.non_dynamic(patcher)
    for name, module in p.model.named_modules():
        if hasattr(module, "weight_function"):
            for attr in ("weight", "bias"):
                if getattr(module, attr, None) is not None:
                    p.add_weight_wrapper(f"{name}.{attr}", _same)
    return p


def _same(weight):
    return weight


def release(*sides: ModelSide) -> None:
    """Take the gradient clones' identity wrappers off the torch modules they share with the input
    models (ComfyUI installs a patcher's weight wrappers on the modules when it loads it, and
    they stay there until it loads another patcher). ComfyUI's own entries stay."""
    for side in sides:
        for module in side.denoiser.patcher.model.modules():
            for attr in ("weight_function", "bias_function"):
                functions = getattr(module, attr, None)
                if functions:
                    setattr(module, attr, [f for f in functions if f is not _same])


class ComfyDenoiser:
    """The core's denoiser protocol on a ComfyUI MODEL: x0 from BaseModel.apply_model, with the
    attention probe installed as an attn2 replacement on every cross-attention layer."""

    def __init__(self, patcher):
        self.patcher = patcher
        unet = patcher.model.diffusion_model
        self.attn2_keys = [(_BLOCK[m[1]], int(m[2]), int(m[3])) for n, _ in unet.named_modules() if (m := _ATTN2.match(n))]

    def __call__(self, x, sigma, context, attention_probe):
        comfy.model_management.load_models_gpu([self.patcher])
        options = dict(self.patcher.model_options.get("transformer_options", {}))
        if attention_probe is not None:
            def replace(q, k, v, extra):
                out = attention_probe(q, k, v, extra["n_heads"])
                return optimized_attention(q, k, v, extra["n_heads"]) if out is None else out
            patches = dict(options.get("patches_replace", {}))
            patches["attn2"] = {**patches.get("attn2", {}), **{key: replace for key in self.attn2_keys}}
            options["patches_replace"] = patches
        return self.patcher.model.apply_model(x, sigma, c_crossattn=context, transformer_options=options)


def check_memory(model, width: int, height: int, runtime: Runtime) -> None:
    """Refuse, before anything runs, an audit whose single model call cannot fit in half the memory
    the device has free (issue 12: a 4096 px audit on a CPU drew the kernel's OOM killer before a
    cancel could act). The estimate is a floor: a guided call's batch (2 x micro_batch latents)
    through the first convolution (input, output and residual at the model's channel width) plus
    the probe's attention probabilities at the highest resolution, in float32."""
    unet = model.model.diffusion_model
    channels = model.model.model_config.unet_config.get("model_channels", 320)
    heads = max((m.heads for m in unet.modules() if isinstance(getattr(m, "heads", None), int)), default=8)
    positions = (width // 8) * (height // 8)

    def floor_bytes(micro_batch: int) -> int:
        latents = 2 * micro_batch
        return 4 * latents * positions * (3 * channels + heads * 77)

    free = comfy.model_management.get_free_memory(runtime.device)
    budget = free / 2  # the other half for what the floor leaves out (the rest of the UNet, the second model)
    need = floor_bytes(runtime.micro_batch)
    if need <= budget:
        return
    fits = next((mb for mb in range(runtime.micro_batch - 1, 0, -1) if floor_bytes(mb) <= budget), 0)
    fix = f"lower micro_batch to {fits} or less" if fits else "lower width/height"
    raise InputError(f"width/height {width}x{height} with micro_batch {runtime.micro_batch}: one model call needs at "
                     f"least {need / 2**30:.1f} GB, and an audit may take half of the {free / 2**30:.1f} GB free on "
                     f"{runtime.device}; {fix} (the paper audits SD1.x at 512x512).")


CPU_MAX_PIXELS = 1024 * 1024  # past this a CPU needs minutes for one full-resolution attention


def check_cpu_resolution(width: int, height: int, runtime: Runtime) -> None:
    """Refuse, on a CPU, an audit whose full-resolution self-attention cannot be cancelled within
    seconds: a cancel acts between ComfyUI's operations, and one attention over the latent's
    positions grows with their square (measured on this project's CPU, 2 latents x 8 heads:
    0.6 s at 512x512, 10 s at 1024x1024, so about 45 minutes at 4096x4096)."""
    if runtime.device.type == "cpu" and width * height > CPU_MAX_PIXELS:
        raise InputError(f"width/height {width}x{height}: on a CPU an audit takes at most {CPU_MAX_PIXELS:,} pixels "
                         "(e.g. 1024x1024; one attention step past that takes minutes and cannot be cancelled "
                         "while it runs). Lower width/height, or run ComfyUI on a GPU.")


def schedule_of(model, scheduler: str, steps: int) -> Schedule:
    """The model's own sigma schedule and its initial noise scale (maximum denoise)."""
    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, scheduler, steps).float().cpu()
    scale = ms.noise_scaling(sigmas[:1], torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), max_denoise=True)
    return Schedule(sigmas=sigmas, initial_scale=float(scale.flatten()[0]))


# -- text encoders -------------------------------------------------------------------------------
def _clip_inner(clip, input_name: str):
    cond = clip.cond_stage_model
    inner = getattr(cond, getattr(cond, "clip", ""), None)
    if inner is None or not hasattr(inner, "transformer"):
        raise InputError(f"{input_name}: this CLIP ({type(cond).__name__}) is not an SD1.x/SD2.x text encoder.")
    return inner


def _tokenizer(clip):
    tok = clip.tokenizer
    return getattr(tok, tok.clip)


def _effective_layer(clip, inner, input_name: str) -> tuple[int | None, bool]:
    """The layer ComfyUI reads out (CLIPSetLastLayer sets clip.layer_idx; newer loaders may
    give a list, compat.clip_layer_index)."""
    try:
        idx = compat.clip_layer_index(clip.layer_idx)
    except ValueError as err:
        raise InputError(f"{input_name}: {err}; DriftScope reads one output layer. Use CLIP Set Last Layer "
                         "to choose one.") from err
    if idx is not None:
        return (None if abs(idx) > inner.num_layers else idx), inner.layer_norm_hidden_state
    layer, idx = inner.options_default[0], inner.options_default[1]
    return (None if layer == "last" else idx), inner.layer_norm_hidden_state


def _module_name(root: torch.nn.Module, module: torch.nn.Module) -> str:
    """The dotted name of `module` inside `root`."""
    return next(name for name, m in root.named_modules() if m is module)


def text_side(clip, input_name: str, device: torch.device) -> tuple[ClipTextEncoder, TokenLayout]:
    """Copy the CLIP's patched text-encoder weights into the core's differentiable encoder."""
    inner = _clip_inner(clip, input_name)
    if inner.enable_attention_masks:
        raise InputError(f"{input_name}: text encoders with attention masks are not supported yet.")
    text_model = inner.transformer.text_model
    prefix = _module_name(clip.cond_stage_model, text_model) + "."
    patched = compat.patched_state_dict(clip.patcher)  # LoRA applied, the patcher left as it was
    weights = {k[len(prefix):]: v.detach().to(device=device, dtype=torch.float32).clone()
               for k, v in patched.items() if k.startswith(prefix)}
    first = text_model.encoder.layers[0]
    activation = next(k for k, f in comfy.clip_model.ACTIVATIONS.items() if f is first.mlp.activation)
    output_layer, norm = _effective_layer(clip, inner, input_name)
    config = TextEncoderConfig(num_layers=inner.num_layers, heads=first.self_attn.heads, activation=activation,
                               output_layer=output_layer, norm_intermediate=norm)
    tok = _tokenizer(clip)
    layout = TokenLayout(start=tok.start_token, end=tok.end_token, pad=tok.pad_token, max_length=tok.max_length)
    return ClipTextEncoder(weights, config), layout


def same_text_encoder(a, b) -> bool:
    """True when two CLIPs compute the same thing: one network, the same patches, same layer."""
    pa, pb = a.patcher, b.patcher
    if a is b:
        return True
    if pa.model is not pb.model or a.layer_idx != b.layer_idx or pa.patches.keys() != pb.patches.keys():
        return False
    return all(_same_value(pa.patches[k], pb.patches[k]) for k in pa.patches)


def _same_value(u, v) -> bool:
    if u is v:
        return True
    if isinstance(u, (list, tuple)) and isinstance(v, (list, tuple)):
        return len(u) == len(v) and all(_same_value(x, y) for x, y in zip(u, v))
    if torch.is_tensor(u) or torch.is_tensor(v):
        return False  # different tensor objects: assume different values
    return u == v


def tokenizer_functions(clip):
    """(tokenize(text) -> BPE ids without start/end, BPE vocabulary dict, reserved ids)."""
    tok = _tokenizer(clip)
    hf = tok.tokenizer

    def tokenize(text: str) -> list[int]:
        return list(hf(text)["input_ids"][1:-1])

    reserved = {tok.start_token, tok.end_token, hf.unk_token_id} - {None}
    return tokenize, hf.get_vocab(), reserved


# -- runtime and identities ----------------------------------------------------------------------
def runtime_for(precision: str, micro_batch: int, gradient_checkpointing: bool) -> Runtime:
    device = comfy.model_management.get_torch_device()
    dtype = None
    if device.type == "cuda":
        if precision == "auto":
            dtype = torch.bfloat16 if comfy.model_management.should_use_bf16(device) else torch.float16
        else:
            dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    # Prompts per text-encoder call: each call ends in a cancel point. A CPU takes 0.2-0.35 s per
    # CLIP-L prompt, so 4 keep a cancel within a second; a GPU encodes 64 in milliseconds.
    text_batch = 64 if device.type == "cuda" else 4
    return Runtime(device=device, autocast_dtype=dtype, micro_batch=micro_batch, text_batch=text_batch,
                   gradient_checkpointing=gradient_checkpointing)


def identity(model, clip) -> dict:
    """What the report says about a model: family, dtype and a fingerprint of its patches."""
    keys = sorted(model.patches) + sorted(f"clip:{k}" for k in clip.patcher.patches)
    strengths = [round(float(p[0]), 6) for k in sorted(model.patches) for p in model.patches[k]]
    digest = hashlib.sha256(repr((keys, strengths)).encode()).hexdigest()[:16]
    return {
        "family": type(model.model.model_config).__name__,
        "dtype": str(model.model.get_dtype()),
        "weight_patches": len(model.patches),
        "clip_weight_patches": len(clip.patcher.patches),
        "patch_fingerprint": digest,
    }


def model_sides(base_model, base_clip, adapted_model, adapted_clip, runtime: Runtime, need_grad: bool):
    """Both sides for the core; models are cloned (gradient-ready when needed), never modified."""
    sides = []
    for name, model, clip in (("base", base_model, base_clip), ("adapted", adapted_model, adapted_clip)):
        if name == "adapted" and same_text_encoder(base_clip, adapted_clip):
            encoder, layout = sides[0].text_encoder, sides[0].layout  # e.g. a LoRA without text-encoder keys
        else:
            encoder, layout = text_side(clip, f"{name}_clip", runtime.device)
        # the base branch runs without gradients (method step 3)
        patcher = grad_ready_clone(model) if need_grad and name == "adapted" else model.clone()
        sides.append(ModelSide(name, encoder, layout, ComfyDenoiser(patcher)))
    return sides
