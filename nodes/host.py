"""ComfyUI objects -> the core's plain-torch model sides. The only place that knows ComfyUI's
model internals (MODEL/CLIP patchers, attention patches, sigma schedules)."""
from __future__ import annotations

import contextlib
import hashlib
import re
from typing import Sequence

import torch

import comfy.lora
import comfy.model_management
import comfy.samplers
from comfy.ldm.modules.attention import optimized_attention

from ..driftscope_core.conditioning import Conditioning, Prompt, needs_grad, slot_mask
from ..driftscope_core.models import ModelSide, Runtime
from ..driftscope_core.prompts import SlotPrompt, TokenLayout
from ..driftscope_core.sampling import Schedule
from . import compat
from .families import ADAPTERS, FamilyAdapter, UnsupportedFamily, adapter_for

_ATTN2 = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\.\d+\.transformer_blocks\.(\d+)\.attn2$")
_BLOCK = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}


class InputError(ValueError):
    """A node input cannot be used; the message names the input and the fix."""


# -- models -------------------------------------------------------------------------------------
def check_pair(base_model, adapted_model, base_clip, adapted_clip) -> FamilyAdapter:
    """Base and adapted must be one family and one architecture, each CLIP that family's text
    encoders at the model's context width; returns the family's adapter."""
    try:
        fam_b, fam_a = adapter_for(base_model, "base_model"), adapter_for(adapted_model, "adapted_model")
        for name, clip in (("base_clip", base_clip), ("adapted_clip", adapted_clip)):
            fam_b.encoders(clip, name)
    except UnsupportedFamily as err:
        raise InputError(str(err)) from err
    ctx_b, ctx_a = fam_b.model_context_width(base_model), fam_a.model_context_width(adapted_model)
    cfg_b, cfg_a = (type(m.model.model_config).__name__ for m in (base_model, adapted_model))
    if fam_b is not fam_a or cfg_b != cfg_a or ctx_b != ctx_a:
        raise InputError(
            f"base_model ({cfg_b}, context {ctx_b}) and adapted_model ({cfg_a}, context {ctx_a}) are "
            "different architectures; compare an adaptation with the checkpoint it was made from."
        )
    for name, clip in (("base_clip", base_clip), ("adapted_clip", adapted_clip)):
        width = fam_b.clip_context_width(clip, fam_b.encoders(clip, name))
        if width != ctx_b:
            raise InputError(f"{name}: text encoder width {width} does not match the model's context {ctx_b}; "
                             "connect the CLIP of the same checkpoint.")
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
    roots = []
    for side in sides:
        if getattr(side.denoiser, "patcher", None) is not None:
            roots.append(side.denoiser.patcher.model)
        if getattr(side.text, "grad_clip", None) is not None:
            roots.append(side.text.grad_clip.patcher.model)
    for root in roots:
        for module in root.modules():
            for attr in ("weight_function", "bias_function"):
                functions = getattr(module, attr, None)
                if functions:
                    setattr(module, attr, [f for f in functions if f is not _same])


class UNetDenoiser:
    """The core's denoiser protocol on a ComfyUI UNet MODEL: x0 from BaseModel.apply_model, its
    inputs built by the model's own extra_conds from the family's conditioning (as ComfyUI's
    sampler builds them: SDXL's `y` from the pooled vector and the size embeddings), with the
    attention probe installed as an attn2 replacement on every cross-attention layer."""

    def __init__(self, patcher, family: FamilyAdapter):
        self.patcher, self.family = patcher, family
        unet = patcher.model.diffusion_model
        self.attn2_keys = [(_BLOCK[m[1]], int(m[2]), int(m[3])) for n, _ in unet.named_modules() if (m := _ATTN2.match(n))]

    def model_inputs(self, x: torch.Tensor, cond: Conditioning) -> dict:
        """apply_model's keyword arguments (c_crossattn, y, ...) for latents x (B, C, h, w)."""
        kwargs = self.family.model_kwargs(cond.context, cond.extras)
        # the pixel size ComfyUI's sampler passes (samplers.encode_model_conds: latent size x 8)
        conds = self.patcher.model.extra_conds(device=x.device, noise=x, width=x.shape[3] * 8,
                                               height=x.shape[2] * 8, **kwargs)
        # repeated to the batch as the sampler does (e.g. Flux's guidance, a single value)
        return {k: c.process_cond(batch_size=x.shape[0], area=None).cond for k, c in conds.items()}

    def __call__(self, x, sigma, cond: Conditioning, attention_probe):
        comfy.model_management.load_models_gpu([self.patcher])
        options = dict(self.patcher.model_options.get("transformer_options", {}))
        if attention_probe is not None:
            def replace(q, k, v, extra):
                out = attention_probe(q, k, v, extra["n_heads"])
                return optimized_attention(q, k, v, extra["n_heads"]) if out is None else out
            patches = dict(options.get("patches_replace", {}))
            patches["attn2"] = {**patches.get("attn2", {}), **{key: replace for key in self.attn2_keys}}
            options["patches_replace"] = patches
        return self.patcher.model.apply_model(x, sigma, transformer_options=options, **self.model_inputs(x, cond))


class DiTDenoiser:
    """The core's denoiser protocol on a joint-attention transformer MODEL (Flux): x0 from
    BaseModel.apply_model with the inputs built by the model's own extra_conds (the family's
    distilled `guidance` value included), and the probe reading each recorded block's q and k
    through ComfyUI's `optimized_attention_override` (families.md fact 2). The override calls
    the attention it wraps (or an override already installed, e.g. another pack's kernel) for
    the output, so the model computes exactly what it computes without the probe."""

    def __init__(self, patcher, family: FamilyAdapter, guidance: float | None = None):
        self.patcher, self.family, self.guidance = patcher, family, guidance

    def model_inputs(self, x: torch.Tensor, cond: Conditioning) -> dict:
        kwargs = self.family.model_kwargs(cond.context, cond.extras, self.guidance)
        conds = self.patcher.model.extra_conds(device=x.device, noise=x, width=x.shape[-1] * 8,
                                               height=x.shape[-2] * 8, **kwargs)
        # repeated to the batch as the sampler does (e.g. Flux's guidance, a single value)
        return {k: c.process_cond(batch_size=x.shape[0], area=None).cond for k, c in conds.items()}

    def _override(self, probe, layout: tuple[int, int, int], previous):
        """An attention override that hands the probe the joint-attention calls the family
        records: its blocks (family.records), the whole [text | image] sequence (a refiner pass
        over text or image alone has another length), no mask."""
        family = self.family
        first_image, images, length = layout

        def override(func, q, k, v, heads, *args, **kwargs):
            options = kwargs.get("transformer_options") or {}
            if family.records(options) and kwargs.get("mask") is None:
                qh, kh = (_heads_first(t, heads, kwargs.get("skip_reshape", False)) for t in (q, k))  # (B, H, L, dh)
                if qh.shape[2] == length:
                    probe.joint(qh, kh, first_image, images)
            if previous is not None:
                return previous(func, q, k, v, heads, *args, **kwargs)
            return func(q, k, v, heads, *args, **kwargs)

        return override

    def __call__(self, x, sigma, cond: Conditioning, attention_probe):
        comfy.model_management.load_models_gpu([self.patcher])
        options = dict(self.patcher.model_options.get("transformer_options", {}))
        if attention_probe is not None:
            previous = options.get("optimized_attention_override")
            layout = self.family.joint_tokens(self.patcher, cond.context.shape[1], x)
            options["optimized_attention_override"] = self._override(attention_probe, layout, previous)
        grad = torch.is_grad_enabled()
        # paper mode: kernels with a backward, and saved tensors cloned because Flux's blocks add
        # their residuals in place (img += ..., txt += ...)
        saved = torch.autograd.graph.saved_tensors_hooks(_clone_saved, _same_saved) if grad else contextlib.nullcontext()
        frames = getattr(self.patcher.model.latent_format, "latent_dimensions", 2) == 3 and x.ndim == 4
        x_in = x.unsqueeze(2) if frames else x  # (B, C, 1, h, w): one frame of a video latent (Qwen-Image)
        with compat.differentiable_kernels(grad), saved:
            out = self.patcher.model.apply_model(x_in, sigma, transformer_options=options, **self.model_inputs(x_in, cond))
        return out.squeeze(2) if frames else out  # (B, C, h, w)


def _heads_first(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """q or k as (B, H, L, dh): ComfyUI's attention gets them so (skip_reshape) or as (B, L, H*dh)."""
    if skip_reshape:
        return t
    b, length, inner = t.shape
    return t.reshape(b, length, heads, inner // heads).transpose(1, 2)  # (B, H, L, dh)


def denoiser_for(patcher, family: FamilyAdapter, guidance: float | None = None):
    """The denoiser of the family's attention kind: UNet cross-attention or DiT joint attention."""
    if family.attention == "joint":
        return DiTDenoiser(patcher, family, guidance)
    return UNetDenoiser(patcher, family)


def check_memory(model, width: int, height: int, runtime: Runtime) -> None:
    """Refuse, before anything runs, an audit whose single model call cannot fit in half the memory
    the device has free (issue 12: a 4096 px audit on a CPU drew the kernel's OOM killer before a
    cancel could act). The estimate is a floor: a guided call's batch (2 x micro_batch latents)
    through the first convolution (input, output and residual at the model's channel width) plus
    the probe's attention probabilities at the highest resolution, in float32."""
    unet = model.model.diffusion_model
    config = model.model.model_config.unet_config
    channels = config.get("model_channels") or config.get("hidden_size") or 320  # a UNet's, or a DiT's width
    heads = max((m.heads for m in unet.modules() if isinstance(getattr(m, "heads", None), int)),
                default=config.get("num_heads", 8))
    patch = config.get("patch_size", 1) or 1
    positions = (width // 8 // patch) * (height // 8 // patch)

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
def _embedding(clip, attr: str):
    """The token-embedding module of the CLIP's text encoder `attr` (e.g. "clip_l")."""
    return getattr(clip.cond_stage_model, attr).transformer.get_input_embeddings()


def _layout(tokenizer, end: int | None = None) -> TokenLayout:
    """An SDTokenizer's layout: CLIP pads to its max_length (77); Flux's T5 has no start token and
    pads to its min_length (256); Chroma's T5 and Qwen pad nothing. `end`: the family's end token
    where the tokenizer adds none (a chat template's)."""
    padded = tokenizer.max_length if tokenizer.pad_to_max_length else tokenizer.min_length
    if padded is not None and padded <= 1:  # min_length 1: nothing padded
        padded = None
    return TokenLayout(start=getattr(tokenizer, "start_token", None), end=tokenizer.end_token if end is None else end,
                       pad=tokenizer.pad_token, max_length=padded)


def grad_ready_clip(clip):
    """A CLIP clone whose text encoders pass gradients to the slot rows: identity weight wrappers
    on every weight (grad_ready_clone), patches kept, the input CLIP untouched."""
    out = clip.clone()
    out.patcher = grad_ready_clone(clip.patcher)
    return out


def _clone_saved(t: torch.Tensor) -> torch.Tensor:
    return t.clone()


def _same_saved(t: torch.Tensor) -> torch.Tensor:
    return t


class ComfyText:
    """The core's TextSide on a ComfyUI CLIP: the family's own text encoders, each called once per
    batch of prompts (its SDClipModel.forward, as encode_token_weights calls it) with the slot's
    positions given as the word's token ids or as embedding rows in ComfyUI's token list
    ({"type": "embedding", "data": row}, families.md fact 1), then joined as the family joins
    them. So the conditioning is ComfyUI's own, exactly, whatever the encoder's dtype, offloading
    or patches (a LoRA), and nothing is copied.

    Gradients (paper mode) run on `grad_clip` (grad_ready_clip) with saved tensors cloned,
    because ComfyUI's text transformers add residuals in place."""

    def __init__(self, clip, family: FamilyAdapter, input_name: str, grad_clip=None):
        try:  # CLIPSetLastLayer's int, or a newer loader's list of one index (compat.clip_layer_index)
            self.layer = compat.clip_layer_index(clip.layer_idx)
        except ValueError as err:
            raise InputError(f"{input_name}: {err}; DriftScope reads one output layer. Use CLIP Set Last Layer "
                             "to choose one.") from err
        self.clip, self.family, self.grad_clip = clip, family, grad_clip
        self.encoders = family.encoders(clip, input_name)  # core name -> attribute
        self.layouts = {name: _layout(family.tokenizer(clip, attr), family.layout_end(clip, name))
                        for name, attr in self.encoders.items()}
        # a chat template around every prompt (Qwen): ids before and after, output rows dropped
        self.templates = {name: family.template_tokens(clip, name) for name in self.encoders}
        head_shift = {name: len(head) - cut for name, (head, _, cut) in self.templates.items()}
        self.context_parts = [(name, offset + head_shift[name]) for name, offset in family.context_parts(self.encoders)]
        self._tables: dict[str, TokenRows] = {}

    def _ready(self, clip):
        """Set the CLIP's options and load it as CLIP.encode_from_tokens does; its device."""
        model = clip.cond_stage_model
        model.reset_clip_options()
        if self.layer is not None:
            model.set_clip_options({"layer": self.layer})
        comfy.model_management.load_models_gpu([clip.patcher])
        device = clip.patcher.load_device
        model.set_clip_options({"execution_device": device})  # ComfyUI 0.3.75 ignores it
        return device

    def token_embedding(self, encoder: str) -> "TokenRows":
        """The encoder's token embeddings as it computes them (patches applied), float32, looked
        up by index: `rows[ids]` is (..., D) for ids (...). Only the rows asked for are computed,
        so a Qwen2.5-VL's 152,064 x 3,584 table (2.2 GB in float32) is never built."""
        if encoder not in self._tables:
            self._tables[encoder] = TokenRows(self, encoder)
        return self._tables[encoder]

    @staticmethod
    def _tokens(prompt: SlotPrompt) -> list:
        """ComfyUI's token list for one encoder: ids, the slot as ids or one embedding entry per row."""
        if isinstance(prompt.slot, tuple):
            slot = list(prompt.slot)
        else:
            slot = [{"type": "embedding", "data": row[None]} for row in prompt.slot]  # each (1, D)
        return [*prompt.head, *slot, *prompt.tail]

    def encode(self, prompts: Sequence[Prompt]) -> Conditioning:
        grad = needs_grad(prompts)
        if grad and self.grad_clip is None:
            raise RuntimeError("this text side was built without a gradient-ready clone")
        clip = self.grad_clip if grad else self.clip
        device = self._ready(clip)
        hooks = (torch.autograd.graph.saved_tensors_hooks(_clone_saved, _same_saved) if grad
                 else contextlib.nullcontext())
        no_out = compat.differentiable_text_encoder() if grad else contextlib.nullcontext()
        outputs = {}
        with hooks, no_out, _device_context(device):
            for name, attr in self.encoders.items():
                head, tail, cut = self.templates[name]
                z, *rest = getattr(clip.cond_stage_model, attr)([[*head, *self._tokens(p[name]), *tail] for p in prompts])
                outputs[name] = (z[:, cut:], *rest)
        context, extras = self.family.combine(outputs)
        mask = slot_mask(prompts, self.context_parts, context.shape[1], context.device)
        return Conditioning(context, mask, extras)


class TokenRows:
    """Rows of one ComfyUI text encoder's token embedding, computed on lookup (no gradient)."""

    def __init__(self, text: ComfyText, encoder: str):
        self.text, self.encoder = text, encoder

    @property
    def device(self) -> torch.device:
        """Where the rows come out: the text encoder's device, as its embedding table lives."""
        return torch.device(self.text.clip.patcher.load_device)

    def __getitem__(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long)
        with torch.no_grad():
            device = self.text._ready(self.text.clip)
            module = _embedding(self.text.clip, self.text.encoders[self.encoder])
            flat = ids.reshape(1, -1).to(device)  # (1, n)
            rows = module(flat, out_dtype=torch.float32)[0].detach()  # (n, D)
        return rows.reshape(*ids.shape, rows.shape[-1])  # (..., D)


def _device_context(device):
    """ComfyUI 0.33's cuda_device_context (encode_from_tokens runs under it), else nothing."""
    enter = getattr(comfy.model_management, "cuda_device_context", None)
    return enter(device) if enter is not None else contextlib.nullcontext()


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


def clip_family(clip, input_name: str = "clip") -> FamilyAdapter:
    """The adapter whose text encoders this CLIP has (for tools that hold a CLIP only)."""
    for adapter in ADAPTERS:
        try:
            adapter.encoders(clip, input_name)
            return adapter
        except UnsupportedFamily:
            continue
    raise InputError(f"{input_name}: no supported model family reads this CLIP ({type(clip.cond_stage_model).__name__})")


def template_tokenizer(clip, family: FamilyAdapter):
    """tokenize(text) for the template's text on either side of the slot, in the vocabulary
    tokenizer: the word tokenizer itself, except for byte-level BPE (Qwen), where the text before
    the slot ends at its last word (the space goes with the word) and the text after it keeps
    its leading space."""
    tokenize, _, _ = tokenizer_functions(clip, family)
    if not family.word_prefix:
        return tokenize
    hf = family.vocabulary_tokenizer(clip).tokenizer

    def tokenize_text(text: str) -> list[int]:
        return [int(i) for i in hf(text.rstrip())["input_ids"]]

    return tokenize_text


def encoder_tokenizers(clip, family: FamilyAdapter) -> dict:
    """For each encoder with its own tokenizer (family.own_tokenizers, e.g. Flux's T5):
    (tokenize(text) -> ids without start/end, its TokenLayout, reserved ids). ComfyUI's
    tokenizer splits a prompt at spaces and tokenizes each word on its own; so does this."""
    encoders = family.encoders(clip, "base_clip")
    out = {}
    for name in (n for n in family.own_tokenizers if n in encoders):
        tok = family.tokenizer(clip, encoders[name])
        hf = tok.tokenizer
        first = 0 if getattr(tok, "start_token", None) is None else 1

        def tokenize(text: str, hf=hf, first=first) -> list[int]:
            return [int(i) for word in text.split() for i in hf(word)["input_ids"][first:-1]]

        reserved = {tok.end_token, tok.pad_token, hf.unk_token_id} - {None}
        out[name] = (tokenize, _layout(tok, family.layout_end(clip, name)), reserved)
    return out


def tokenizer_functions(clip, family: FamilyAdapter | None = None):
    """(tokenize(text) -> BPE ids without start/end, BPE vocabulary dict, reserved ids) of the
    tokenizer every text encoder of the family reads (the family of the CLIP if not given)."""
    family = family or clip_family(clip)
    tok = family.vocabulary_tokenizer(clip)
    hf = tok.tokenizer
    if family.word_prefix:  # byte-level BPE (Qwen): a word after a space, as it reads inside a prompt
        def tokenize(text: str) -> list[int]:
            return [int(i) for i in hf(family.word_prefix + text)["input_ids"]]
    elif getattr(tok, "start_token", None) is None:  # a T5 (Chroma): ComfyUI tokenizes word by word
        def tokenize(text: str) -> list[int]:
            return [int(i) for word in text.split() for i in hf(word)["input_ids"][:-1]]
    else:
        def tokenize(text: str) -> list[int]:
            return list(hf(text)["input_ids"][1:-1])

    reserved = {getattr(tok, "start_token", None), tok.end_token, hf.unk_token_id} - {None}
    if getattr(tok, "start_token", None) is None:
        reserved.add(tok.pad_token)  # T5's <pad> (0); CLIP's SD2.x pad id 0 is the "!" token, a real piece
    end = family.layout_end(clip, family.vocabulary_encoder)
    if end is not None:
        reserved.add(end)  # a chat template's end token (Qwen's <|im_end|>), typed as a word
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


def identity(model, clip, family: FamilyAdapter) -> dict:
    """What the report says about a model: family, dtype and a fingerprint of its patches."""
    keys = sorted(model.patches) + sorted(f"clip:{k}" for k in clip.patcher.patches)
    strengths = [round(float(p[0]), 6) for k in sorted(model.patches) for p in model.patches[k]]
    digest = hashlib.sha256(repr((keys, strengths)).encode()).hexdigest()[:16]
    return {
        "family": family.name,
        "model_config": type(model.model.model_config).__name__,
        "prediction": model.model.model_type.name,
        "dtype": str(model.model.get_dtype()),
        "weight_patches": len(model.patches),
        "clip_weight_patches": len(clip.patcher.patches),
        "patch_fingerprint": digest,
    }


def model_sides(family: FamilyAdapter, base_model, base_clip, adapted_model, adapted_clip, runtime: Runtime,
                need_grad: bool, guidance: float | None = None, placebo: float = 0.0,
                placebo_seed: int = 0) -> list[ModelSide]:
    """The sides for the core, base and adapted (and the placebo when `placebo` > 0: the base's
    text with placebo_model's denoiser); models are cloned (gradient-ready where paper mode needs
    it: the adapted side's UNet and text encoders), never modified."""
    base_text = ComfyText(base_clip, family, "base_clip")
    if same_text_encoder(base_clip, adapted_clip):  # e.g. a LoRA without text-encoder keys: one text side
        adapted_text = base_text
    else:
        adapted_text = ComfyText(adapted_clip, family, "adapted_clip")
    if need_grad:  # the base branch runs without gradients (method step 3)
        adapted_text.grad_clip = grad_ready_clip(adapted_clip)
    base = ModelSide("base", base_text, denoiser_for(base_model.clone(), family, guidance))
    adapted_patcher = grad_ready_clone(adapted_model) if need_grad else adapted_model.clone()
    sides = [base, ModelSide("adapted", adapted_text, denoiser_for(adapted_patcher, family, guidance))]
    if placebo > 0:
        sides.append(ModelSide("placebo", base_text, denoiser_for(placebo_model(base_model, placebo, placebo_seed),
                                                                  family, guidance)))
    return sides


PLACEBO_RANK = 16  # image world: rank 4 left some words barely touched by chance (2 false flags), 16 none


def placebo_model(model, relative: float, seed: int):
    """The placebo of calibration.py: a clone of `model` with a seeded random low-rank patch
    (rank PLACEBO_RANK) on every linear and convolution weight of its diffusion model, each of
    RMS about `relative` times the weight's own, put in as a LoRA through ComfyUI's own LoRA
    code (comfy.lora.load_lora, as LoraLoaderModelOnly does), so it runs wherever a LoRA runs
    and holds r x (in + out) numbers per weight, not a copy of the model. The input is unchanged."""
    comfy.model_management.load_models_gpu([model])  # its weights as the model computes them, whatever ran before
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, w in sorted(model.model.diffusion_model.named_parameters()):
        if not name.endswith(".weight") or w.ndim not in (2, 4):
            continue
        rms = float(w.detach().float().pow(2).mean().sqrt())
        if rms == 0.0:
            continue
        out_features, r = w.shape[0], PLACEBO_RANK
        # up (out, r) @ down (r, in...) has entries of variance r * s^4: RMS relative * rms at s below
        s = (relative * rms / r**0.5) ** 0.5
        key = f"diffusion_model.{name[: -len('.weight')]}"
        lora[f"{key}.lora_up.weight"] = torch.randn(out_features, r, *[1] * (w.ndim - 2), generator=g) * s  # (out, r[, 1, 1])
        lora[f"{key}.lora_down.weight"] = torch.randn(r, *w.shape[1:], generator=g) * s  # (r, in[, kh, kw])
    patches = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(model.model, {}), log_missing=False)
    out = model.clone()
    added = out.add_patches(patches, 1.0)
    if len(added) != len(lora) // 2:
        raise RuntimeError(f"ComfyUI took {len(added)} of the placebo's {len(lora) // 2} patches")
    return out
