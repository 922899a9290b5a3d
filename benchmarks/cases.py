"""The benchmark's cases: a base model, an adapted model and a candidate vocabulary, built in
process from the tiny demo models (scripts/demo_models.py). Nothing is written to disk.

Kinds of adaptation (one base per family and model seed, shared by its cases):
- planted: a closed-form edit of every cross-attention key/value projection that moves the
  text-encoder outputs of a few planted words (UCE/TIME spirit, demo_models.planted_edit_in_process),
  preserving the CIFAR-100 words. Whatever else it moves (collateral) is part of the truth.
- lora_trained: a LoRA trained by ComfyUI's own TrainLoraNode on procedurally drawn tiger-stripe
  images captioned "a photo of a tiger" (a real adaptation method written outside this project),
  applied with ComfyUI's LoraModelLoader. Its base is a taught one (teach_concepts): the random
  tiny UNet first learns to draw CIFAR-100 concepts from their captions, so that, like a real
  pretrained model, it uses its text (the LoRA's drift is still broad: benchmarks/README.md).
- null_diffuse: every non-zero UNet parameter gets a seeded Gaussian "diff" patch of 1% of its
  own RMS: drift with no concept behind it.
- null_identical: the base model against a clone of itself.

Families: sd15 and sd2 (tiny_sd15 / tiny_sd2), sdxl (tiny_sdxl's architecture with wider
CLIP-L and CLIP-G, sdxl_models) and flux (tiny_flux, Flux.1 dev, with its own planted edit of the
double blocks' text key/value rows, sampled at its own CFG, guidance and scheduler:
FAMILY_SAMPLING). lora_trained is not built for sdxl and flux (SKIPPED_KINDS says why).
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

KINDS = ("planted", "lora_trained", "null_diffuse", "null_identical")
NULL_KINDS = ("null_diffuse", "null_identical")
FAMILIES = ("sd15", "sd2", "sdxl", "flux")
TEMPLATE = "a photo of a {}"

PLANTED_COUNT = 10  # enough planted words to fill the truth's top 10 (past them the drift has no gaps)
PLANTED_POOL = ("cifar100", "coco80")  # planted words are drawn from these lists' one-token words
PLANTED_PRESERVE = "cifar100"  # the edit's preserve set (minus the planted words), as in the demo

LORA_PROMPT = "a photo of a tiger"
LORA_WORD = "tiger"
# TrainLoraNode inputs. fp32 because CPU autocast knows only bf16/fp16; a list of one-image
# latents because 0.3.75 crashes (multi_res unbound) when the latents arrive as one tensor.
LORA_TRAINING = dict(images=8, steps=120, batch_size=2, learning_rate=1e-3, rank=4, optimizer="AdamW",
                     loss_function="MSE", algorithm="LoRA", dtype="fp32")

# lora_trained's base is taught first (teach_concepts): every UNet weight, a diffusion loss on 8
# procedurally drawn images per CIFAR-100 one-token word, captioned TEMPLATE, 10% of captions
# dropped (the unconditional branch of CFG). Without it the random UNet ignores its text (own and
# shuffled captions give the same loss) and the LoRA's truth ranked "tiger" 519th of 2,001; with
# it, own captions halve the loss against shuffled ones and "tiger" is 93rd.
TEACHING = dict(vocabulary="cifar100", images_per_word=8, steps=1200, batch_size=64, learning_rate=1e-3,
                caption_dropout=0.1)

# Width of the tiny text encoder (and the UNet's context_dim). At the tests' 64 the preserve set
# spans the whole context space, so the planted edit barely moves the planted words (9% of their
# keys/values) and the truth's top 10 is collateral; at 256 they move 133% and lead the truth.
TEXT_WIDTH = 256

# SDXL: CLIP-L and CLIP-G, each half of TEXT_WIDTH, side by side make the UNet's context, as wide as
# SD1.5's benchmark context (the planted edit acts on those context rows); clip_g's projection (the
# pooled vector) is as wide as clip_g.
SDXL_ENCODER_WIDTH = TEXT_WIDTH // 2

# Pixel size of every audit and truth, per family (others: the variant's). SDXL's native size is
# twice SD1.5's and its highest cross-attention sits one level lower: at 64 px its recorded maps
# are 4x4, as SD1.5's are at 32 px (at 32 px they would be 2x2).
# Flux patchifies its 8x8 latent at 64 px into 4x4 image tokens: the 16 positions SD1.5's maps
# have at 32 px (at 32 px Flux would have 2x2).
FAMILY_RESOLUTION = {"sdxl": 64, "flux": 64}

# CFG scale, distilled guidance and scheduler of every audit and truth, per family (others: the
# variant's CFG 7.5, no guidance, "normal"). Flux.1 dev as its users sample it: CFG 1 (one model
# pass per step), guidance 3.5, the "simple" scheduler. The CFG and guidance must be the pack's
# defaults for the family (FamilyAdapter.sampling_defaults): ground_truth checks it.
FAMILY_SAMPLING = {"flux": {"cfg": 1.0, "guidance": 3.5, "scheduler": "simple"}}

# Kinds a family does not build, and why.
SKIPPED_KINDS = {"sdxl": {"lora_trained": (
    "teach_concepts' loss passes only the text context, while SDXL also needs its pooled and size "
    "conditioning (y); teaching plus TrainLoraNode on the tiny SDXL UNet would take about 3x the "
    "5 CPU-minutes of SD1.5's, and the trained-LoRA case on SD1.5 has no clear concept to recall "
    "yet (benchmarks/README.md)")},
    "flux": {"lora_trained": (
    "teach_concepts' loss is SD's (a UNet on the text context alone, eps/v weights), while Flux "
    "needs the pooled vector, the guidance input and a flow-matching loss; teaching a tiny Flux "
    "from its captions and training a LoRA on it with TrainLoraNode is not set up, and the "
    "trained-LoRA case on SD1.5 has no clear concept to recall yet (benchmarks/README.md)")}}

DIFFUSE_RELATIVE = 1e-2  # null_diffuse: noise std per tensor, relative to the tensor's RMS


@dataclass(frozen=True)
class CaseSpec:
    family: str  # one of FAMILIES
    model_seed: int
    kind: str  # one of KINDS

    @property
    def name(self) -> str:
        return f"{self.family}-s{self.model_seed}-{self.kind}"

    @property
    def is_null(self) -> bool:
        return self.kind in NULL_KINDS


def family_sampling(family: str, cfg: float, scheduler: str) -> dict:
    """{"cfg", "guidance", "scheduler"} of `family`'s audits and truths: FAMILY_SAMPLING's, else
    `cfg` and `scheduler` (the variant's) and no guidance (None)."""
    return {"cfg": cfg, "guidance": None, "scheduler": scheduler, **FAMILY_SAMPLING.get(family, {})}


def family_resolution(family: str, default: int) -> int:
    """The pixel size (width = height) audits and truths of `family` run at: FAMILY_RESOLUTION's,
    else `default` (the variant's)."""
    return FAMILY_RESOLUTION.get(family, default)


@dataclass
class Case:
    spec: CaseSpec
    base_model: Any  # comfy ModelPatcher
    base_clip: Any  # comfy.sd.CLIP
    adapted_model: Any
    adapted_clip: Any
    words: list[str]  # the candidate vocabulary, ordered by BPE id
    targets: tuple[str, ...]  # what the adaptation was aimed at (planted words, the LoRA's word)
    recipe: dict  # how the adaptation was made (also goes into the truth cache key)
    fingerprint: str  # hash of both models' effective weights and the recipe
    build_seconds: float
    info: dict = field(default_factory=dict)  # statistics of the adaptation (edit sizes, losses)

    @property
    def name(self) -> str:
        return self.spec.name


# -- candidate vocabulary -----------------------------------------------------------------------
def full_vocabulary(env, clip) -> list[str]:
    """Every whole-word token of the CLIP BPE vocabulary that driftscope_core keeps (filtered),
    and that every other tokenizer of the CLIP's family keeps as the Audit node does
    (nodes.audit.family_vocabulary: Flux's T5; for SD families nothing is dropped)."""
    _, bpe, _ = env.host.tokenizer_functions(clip)
    vocab = env.core.vocabulary.from_bpe_vocab(bpe)
    texts = [c.text for c in vocab.candidates]
    family = env.host.clip_family(clip)
    if env.host.encoder_tokenizers(clip, family):
        kept = {c.text for c in env.pack.nodes.audit.family_vocabulary(vocab, clip, family).candidates}
        texts = [t for t in texts if t in kept]
    return texts


def t5_pieces(clip, word: str) -> int:
    """How many T5 pieces Flux's tokenizer makes of `word` (without the end token)."""
    return len(clip.tokenizer.t5xxl.tokenizer(word)["input_ids"]) - 1


def candidate_words(vocabulary: Sequence[str], size: int | None, seed: int, extra: Sequence[str] = ()) -> list[str]:
    """The full filtered `vocabulary` (size None), or a seeded random sample of `size` of its
    words; `extra` words (planted, trained) are always in. Ordered as `vocabulary` (by BPE id)."""
    texts = list(vocabulary)
    if size is None or size >= len(texts):
        chosen = set(texts)
    else:
        chosen = set(random.Random(f"driftscope-bench:candidates:{seed}").sample(texts, size))
    missing = [w for w in extra if w not in set(texts)]
    if missing:
        raise ValueError(f"extra candidate words that are not one whole-word token: {missing}")
    chosen.update(extra)
    return [t for t in texts if t in chosen]


def planted_words(env, vocabulary: Sequence[str], family: str, model_seed: int, count: int = PLANTED_COUNT,
                  keep: Callable[[str], bool] | None = None) -> list[str]:
    """`count` concept words (one BPE token each, i.e. in `vocabulary`) drawn with a seed from
    the built-in lists; `keep`: only words it accepts (Flux: one T5 piece, which the planted
    edit can move whole)."""
    in_vocab = {w for w in vocabulary if keep is None or keep(w)}
    # a word inside a preserved phrase ("truck" of "pickup truck") would be edited and preserved at once
    preserved_parts = {part for phrase in env.demo_models.load_vocabulary(PLANTED_PRESERVE) if " " in phrase
                       for part in phrase.split()}
    pool = sorted({w for name in PLANTED_POOL for w in env.demo_models.load_vocabulary(name)
                   if w in in_vocab and w != LORA_WORD and w not in preserved_parts})
    return random.Random(f"driftscope-bench:planted:{family}:{model_seed}").sample(pool, count)


# -- fingerprints ---------------------------------------------------------------------------------
def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().to("cpu", torch.float32).contiguous()
    h.update(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())


def effective_weights_digest(patcher, prefix: str = "diffusion_model.") -> str:
    """sha256 of the weights the patcher computes with (stored weights plus its patches)."""
    import comfy.lora
    import comfy.model_management

    comfy.model_management.unload_all_models()  # stored weights unpatched, backups restored
    h = hashlib.sha256()
    for key, entry in sorted(patcher.get_key_patches(prefix).items()):
        weight = entry[0][0].detach().to(torch.float32).clone()
        if len(entry) > 1:
            weight = comfy.lora.calculate_weight(entry[1:], weight, key)
        h.update(key.encode())
        _hash_tensor(h, weight)
    return h.hexdigest()


def clip_digest(clip) -> str:
    h = hashlib.sha256(repr((clip.layer_idx, sorted(clip.patcher.patches))).encode())
    for key, t in sorted(clip.patcher.model.state_dict().items()):
        h.update(key.encode())
        _hash_tensor(h, t)
    return h.hexdigest()


# -- adaptations ----------------------------------------------------------------------------------
def tiger_images(count: int, size: int, seed: int) -> torch.Tensor:
    """Orange images with dark stripes at seeded angles and widths: (count, size, size, 3) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    out = []
    for _ in range(count):
        angle, freq, phase = (torch.rand(3, generator=g) * torch.tensor([math.pi, 0.15, 2 * math.pi]) + torch.tensor([0.0, 0.12, 0.0])).tolist()
        wave = torch.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)  # (H, W)
        stripe = (wave > 0.35).float()[..., None]  # (H, W, 1)
        orange = torch.tensor([0.92, 0.52, 0.12]) + 0.05 * torch.randn(size, size, 3, generator=g)
        img = orange * (1 - stripe) + 0.06 * stripe
        out.append(img.clamp(0, 1))
    return torch.stack(out)  # (N, H, W, 3)


def _word_generator(word: str, seed: int) -> torch.Generator:
    digest = hashlib.sha256(f"driftscope-bench:concept:{seed}:{word}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:12], 16))


def concept_images(word: str, count: int, size: int, seed: int) -> torch.Tensor:
    """`count` drawings of one concept: two colours and a layout (stripes, a disc or a gradient)
    fixed by (`seed`, `word`), with position, phase and angle varying per image:
    (count, size, size, 3) in [0, 1]."""
    g = _word_generator(word, seed)
    colour_a, colour_b = torch.rand(3, generator=g), torch.rand(3, generator=g)
    layout = int(torch.randint(0, 3, (1,), generator=g))
    angle, freq = float(torch.rand(1, generator=g)) * math.pi, 0.05 + 0.15 * float(torch.rand(1, generator=g))
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    out = []
    for _ in range(count):
        j1, j2 = torch.rand(2, generator=g).tolist()
        a = angle + 0.3 * (j1 - 0.5)
        along = xx * math.cos(a) + yy * math.sin(a)  # (H, W)
        if layout == 0:  # stripes
            mask = (torch.sin(2 * math.pi * freq * along + 2 * math.pi * j2) > 0).float()
        elif layout == 1:  # a disc
            cx, cy, r = size * (0.3 + 0.4 * j1), size * (0.3 + 0.4 * j2), size * (0.15 + freq)
            mask = (((xx - cx) ** 2 + (yy - cy) ** 2).sqrt() < r).float()
        else:  # a gradient
            mask = (along / size * 0.7 + 0.3 * j2).clamp(0, 1)
        mask = mask[..., None]  # (H, W, 1)
        img = colour_a * (1 - mask) + colour_b * mask + 0.03 * torch.randn(size, size, 3, generator=g)
        out.append(img.clamp(0, 1))
    return torch.stack(out)  # (N, H, W, 3)


def _diffusion_loss(base_model, x0: torch.Tensor, context: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The model's own training loss on clean latents `x0` (B, C, h, w) in its space: a random
    training timestep, noise, and the squared error of its prediction (eps or v, whichever the
    model predicts) written through the denoised estimate."""
    import comfy.model_base

    ms = base_model.model_sampling
    sigma = ms.sigmas[torch.randint(0, len(ms.sigmas), (x0.shape[0],), generator=g)]  # (B,)
    x = ms.noise_scaling(sigma, torch.randn(x0.shape, generator=g), x0)
    denoised = base_model.apply_model(x, sigma, c_crossattn=context)
    s2 = sigma.view(-1, 1, 1, 1) ** 2  # (B, 1, 1, 1)
    # eps error = x0 error / sigma; v error (sigma_data 1) = x0 error * sqrt(sigma^2 + 1) / sigma
    weight = (s2 + 1) / s2 if base_model.model_type == comfy.model_base.ModelType.V_PREDICTION else 1 / s2
    return (weight * (denoised - x0) ** 2).mean()


def teach_concepts(model, clip, vae, words: Sequence[str], seed: int, size: int, settings: dict = TEACHING,
                   log: Callable[[str], None] = print):
    """Fine-tune every UNet weight of `model` (in place) to draw the concepts `words` from TEMPLATE
    captions (concept_images), so the base uses its text as a pretrained model does.
    Returns (latent_scale, info): VAE latents divided by latent_scale have unit std in the model's
    space (the job of SD's 0.18215 for the real VAE); info holds the losses and how much the
    captions help: the loss with each image's own caption, a shuffled one, and an empty one."""
    import comfy.model_management

    per = settings["images_per_word"]
    with torch.no_grad():
        raw = vae.encode(torch.cat([concept_images(w, per, size, seed) for w in words]))  # (W*per, C, h, w)
        raw_std = float(raw.std())
        latents = raw / raw_std
        captions = torch.cat([clip.encode_from_tokens(clip.tokenize(TEMPLATE.format(w))) for w in words])  # (W, T, D)
        empty = clip.encode_from_tokens(clip.tokenize(""))  # (1, T, D)
    labels = torch.arange(len(words)).repeat_interleave(per)  # (W*per,)
    comfy.model_management.unload_all_models()  # train the stored weights, no patch applied
    base_model, unet = model.model, model.model.diffusion_model
    g = torch.Generator().manual_seed(seed)
    t0, losses, b = time.perf_counter(), [], settings["batch_size"]
    with torch.inference_mode(False), torch.enable_grad():
        params = list(unet.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=settings["learning_rate"], weight_decay=0.0)
        latents, captions, empty = latents.clone(), captions.clone(), empty.clone()  # out of inference mode
        try:
            for step in range(settings["steps"]):
                pick = torch.randint(0, latents.shape[0], (b,), generator=g)  # (B,)
                dropped = torch.rand(b, generator=g) < settings["caption_dropout"]
                context = torch.where(dropped[:, None, None], empty.expand(b, -1, -1), captions[labels[pick]])  # (B, T, D)
                loss = _diffusion_loss(base_model, latents[pick], context, g)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                if (step + 1) % 300 == 0:
                    log(f"[cases] teaching {len(words)} concepts: step {step + 1}/{settings['steps']}, "
                        f"loss {sum(losses[-50:]) / 50:.4f}")
        finally:
            for p in params:
                p.requires_grad_(False)
    info = {"taught_words": len(words), "teaching_seconds": round(time.perf_counter() - t0, 1),
            "teaching_loss_first_50": sum(losses[:50]) / 50, "teaching_loss_last_50": sum(losses[-50:]) / 50}
    info.update(caption_use(base_model, latents, captions, empty, labels, seed))
    return raw_std * model.model.latent_format.scale_factor, info


def caption_use(base_model, latents, captions, empty, labels, seed: int, n: int = 512) -> dict:
    """Diffusion loss on `n` taught images (the same timesteps and noise each time) with their
    own captions, with shuffled captions and with the empty caption: a model that ignores its
    text scores the three alike."""
    g = torch.Generator().manual_seed(seed + 1)
    pick = torch.randint(0, latents.shape[0], (n,), generator=g)  # (n,)
    shuffled = labels[pick][torch.randperm(n, generator=g)]
    out = {}
    with torch.no_grad():
        for name, context in (("own", captions[labels[pick]]), ("shuffled", captions[shuffled]),
                              ("empty", empty.expand(n, -1, -1))):
            out[f"loss_{name}_caption"] = float(_diffusion_loss(base_model, latents[pick], context,
                                                                torch.Generator().manual_seed(seed + 2)))
    return out


# TrainLoraNode inputs that newer ComfyUI added (bucket_mode 0.6; bypass_mode, checkpoint_depth,
# offloading, quantized_backward 0.19): passed at these values, each the node's own default and
# each leaving training as 0.3.75 did it, where the node has the parameter.
NEWER_TRAINING_INPUTS = dict(bucket_mode=False, bypass_mode=False, checkpoint_depth=1, offloading=False,
                             quantized_backward=False)


def _newer_training_inputs(node) -> dict:
    """NEWER_TRAINING_INPUTS that `node.execute` takes (a feature check), as the node's input lists."""
    import inspect

    params = inspect.signature(node.execute).parameters
    return {k: [v] for k, v in NEWER_TRAINING_INPUTS.items() if k in params}


def _reloadable(model):
    """A clone that newer TrainLoraNode can copy. Since 0.19 it trains on a deep copy that it
    makes by reloading the model from its file (`cached_patcher_init`, which ComfyUI's loaders
    set); an in-process model has no file, so its clone gets a loader that copies it in memory."""
    if getattr(model, "cached_patcher_init", "absent") is not None:
        return model  # 0.3.75 (no such attribute) or a model loaded from a file
    import comfy.model_patcher

    def reload(disable_dynamic=True):
        base = model.model
        fresh = type(base)(base.model_config, model_type=base.model_type)
        fresh.load_state_dict(base.state_dict())  # the stored weights: a base's patches stay in its patcher
        return comfy.model_patcher.ModelPatcher(fresh, model.load_device, model.offload_device)

    clone = model.clone()
    clone.cached_patcher_init = (reload, ())
    return clone


def train_lora(model, clip, vae, seed: int, size: int, latent_scale: float, settings: dict = LORA_TRAINING):
    """ComfyUI's TrainLoraNode on tiger images captioned LORA_PROMPT; returns (adapted model, info).
    `latent_scale`: what the VAE's latents are divided by (see teach_concepts)."""
    import comfy.utils
    from comfy_extras.nodes_train import LoraModelLoader, TrainLoraNode

    with torch.no_grad():
        latents = vae.encode(tiger_images(settings["images"], size, seed)) / latent_scale  # (N, C, h, w)
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(LORA_PROMPT))
    bar, comfy.utils.PROGRESS_BAR_ENABLED = comfy.utils.PROGRESS_BAR_ENABLED, False
    try:
        with torch.random.fork_rng():  # the node draws batches and timesteps from the global RNG
            torch.manual_seed(seed)
            out = TrainLoraNode.execute(
                **_newer_training_inputs(TrainLoraNode),
                model=[_reloadable(model)], latents=[{"samples": latents[i : i + 1]} for i in range(latents.shape[0])],
                positive=[cond], batch_size=[settings["batch_size"]], steps=[settings["steps"]],
                grad_accumulation_steps=[1], learning_rate=[settings["learning_rate"]], rank=[settings["rank"]],
                optimizer=[settings["optimizer"]], loss_function=[settings["loss_function"]], seed=[seed],
                training_dtype=[settings["dtype"]], lora_dtype=[settings["dtype"]], algorithm=[settings["algorithm"]],
                gradient_checkpointing=[False], existing_lora=["[None]"])
    finally:
        comfy.utils.PROGRESS_BAR_ENABLED = bar
    lora, loss_map, _steps = out.result[-3:]  # 0.3.75 also returned the trained model first
    adapted = LoraModelLoader.execute(model, lora, 1.0).result[0]
    losses = loss_map["loss"]
    tail = max(1, len(losses) // 4)
    info = {"lora_tensors": len(lora), "weight_patches": len(adapted.patches),
            "loss_first_quarter": sum(losses[:tail]) / tail, "loss_last_quarter": sum(losses[-tail:]) / tail}
    return adapted, info


def diffuse_patches(model, relative: float, seed: int, only: Callable[[str], bool] | None = None):
    """A clone with a seeded Gaussian "diff" patch on every non-zero UNet parameter (or those
    whose name `only` accepts; std = relative * the parameter's RMS; zero-initialized biases
    have no scale and stay)."""
    import comfy.model_management

    # another case's patcher may still be loaded, i.e. its patches applied in place: read the
    # stored weights, not that case's
    comfy.model_management.unload_all_models()
    g = torch.Generator().manual_seed(seed)
    patches, skipped = {}, 0
    for name, p in sorted(model.model.diffusion_model.named_parameters()):
        if only is not None and not only(name):
            continue
        rms = float(p.detach().float().pow(2).mean().sqrt())
        if rms == 0.0:
            skipped += 1
            continue
        patches[f"diffusion_model.{name}"] = ("diff", (torch.randn(p.shape, generator=g) * (relative * rms),))
    adapted = model.clone()
    added = adapted.add_patches(patches, 1.0)
    if len(added) != len(patches):
        raise RuntimeError(f"only {len(added)} of {len(patches)} diffuse patches were accepted")
    return adapted, {"patched_tensors": len(patches), "zero_tensors_left": skipped, "relative_std": relative}


@contextlib.contextmanager
def one_thread():
    """Training with one CPU thread: its weights (and so the case's fingerprint, the truth cache's
    key) must not depend on the process's thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- building -------------------------------------------------------------------------------------
def sdxl_models(demo_models, seed: int, encoder_width: int = SDXL_ENCODER_WIDTH):
    """Tiny SDXL as demo_models.tiny_sdxl builds it (comfy.supported_models.SDXL on
    sdxl_unet_config, SDXLClipModel with 3-layer CLIP-L and CLIP-G read at layer -2, TAESD VAE;
    fp32, eps), with both encoders `encoder_width` wide instead of 64: the UNet's context is
    2 * encoder_width, the pooled vector encoder_width. At width 64 it is tiny_sdxl(seed)."""
    import comfy.sdxl_clip
    import comfy.supported_models

    config = demo_models.tiny_text_config(demo_models.TINY_SDXL_TEXT_CONFIG, encoder_width)
    model = demo_models._make_unet(comfy.supported_models.SDXL,
                                   demo_models.sdxl_unet_config(32, 2 * encoder_width, encoder_width), seed)
    clip = demo_models._make_text_encoders(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel,
                                           {"l": config, "g": config}, seed, torch.float32)
    return model, clip, demo_models.tiny_vae(seed)


def family_models(env, family: str, seed: int, text_width: int):
    """(model, clip, vae) of a family's tiny base at the benchmark's context width `text_width`."""
    dm = env.demo_models
    if family == "sdxl":
        return sdxl_models(dm, seed, text_width // 2)
    if family == "flux":  # at the demo's widths: see family_text_width
        return dm.tiny_flux(seed, "dev")
    makers = {"sd15": dm.tiny_sd15, "sd2": dm.tiny_sd2}
    if family not in makers:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    return makers[family](seed, text_width=text_width)


def family_text_width(family: str, text_width: int) -> int:
    """The context width a family's benchmark base has: `text_width` (the benchmark's), except
    Flux: tiny_flux as it is, T5 64 wide into a DiT 64 wide. Widening the encoders (SD1.5's fix
    for an edit that moved its words by 9%) would not change where Flux's edit acts: on the
    inputs of the double blocks' txt_attn.qkv, which txt_in maps to the DiT's hidden width;
    there the edit already moves its words by about 115% (SD1.5 at width 256: 133%)."""
    return FLUX_TEXT_WIDTH if family == "flux" else text_width


FLUX_TEXT_WIDTH = 64  # demo_models.TINY_T5_CONFIG["d_model"], tiny_flux's context_in_dim


@dataclass
class Base:
    model: Any  # comfy ModelPatcher
    clip: Any
    vae: Any
    digest: str  # effective_weights_digest(model)
    clip_digest: str
    vocabulary: list[str]  # every filtered whole-word token
    latent_scale: float | None = None  # taught bases: VAE latents / latent_scale is the model's data
    info: dict = field(default_factory=dict)  # taught bases: the teaching's figures


class CaseBuilder:
    """Builds cases; each base model (family, model seed, taught or not) is made once and shared."""

    def __init__(self, env, candidates: int | None, candidate_seed: int = 0, resolution: int = 32,
                 text_width: int = TEXT_WIDTH, log: Callable[[str], None] = print):
        self.env, self.candidates, self.candidate_seed = env, candidates, candidate_seed
        self.text_width = text_width
        self.resolution, self.log = resolution, log
        self._bases: dict[tuple[str, int, bool], Base] = {}

    def base(self, family: str, model_seed: int, taught: bool = False) -> Base:
        key = (family, model_seed, taught)
        if key not in self._bases:
            model, clip, vae = family_models(self.env, family, model_seed, self.text_width)
            scale, info = None, {}
            if taught:
                words = [w for w in self.env.demo_models.load_vocabulary(TEACHING["vocabulary"]) if " " not in w]
                with one_thread():
                    scale, info = teach_concepts(model, clip, vae, words, model_seed, self.resolution, log=self.log)
            self._bases[key] = Base(model, clip, vae, effective_weights_digest(model), clip_digest(clip),
                                    full_vocabulary(self.env, clip), scale, info)
        return self._bases[key]

    def build(self, spec: CaseSpec) -> Case:
        skipped = SKIPPED_KINDS.get(spec.family, {}).get(spec.kind)
        if skipped:
            raise ValueError(f"{spec.name}: the {spec.family} family has no {spec.kind} case: {skipped}")
        t0 = time.perf_counter()
        base = self.base(spec.family, spec.model_seed, taught=spec.kind == "lora_trained")
        model, clip, vocabulary = base.model, base.clip, base.vocabulary
        dm = self.env.demo_models
        recipe: dict = {"kind": spec.kind, "family": spec.family, "model_seed": spec.model_seed, "template": TEMPLATE,
                        "text_width": family_text_width(spec.family, self.text_width)}
        info: dict = {}
        adapted_clip = clip
        if spec.kind == "planted" and spec.family == "flux":
            targets = tuple(planted_words(self.env, vocabulary, spec.family, spec.model_seed,
                                          keep=lambda w: t5_pieces(clip, w) == 1))
            preserve = [w for w in dm.load_vocabulary(PLANTED_PRESERVE) if w not in targets]
            recipe.update(planted=list(targets), preserve=PLANTED_PRESERVE, edit="flux_planted_edit",
                          strength=dm.FLUX_STRENGTH, lam=dm.FLUX_LAM, eps=dm.FLUX_EPS, sigmas=list(dm.FLUX_SIGMAS),
                          edit_seed=spec.model_seed)
            adapted, stats = dm.flux_planted_edit(model, clip, targets, preserve, TEMPLATE, strength=dm.FLUX_STRENGTH,
                                                  seed=spec.model_seed, lam=dm.FLUX_LAM, eps=dm.FLUX_EPS)
            info = {k: v for k, v in stats.items() if k.endswith("_rel_change")}
        elif spec.kind == "planted":
            targets = tuple(planted_words(self.env, vocabulary, spec.family, spec.model_seed))
            preserve = [w for w in dm.load_vocabulary(PLANTED_PRESERVE) if w not in targets]
            recipe.update(planted=list(targets), preserve=PLANTED_PRESERVE, strength=dm.DEMO_STRENGTH, lam=dm.DEMO_LAM,
                          eps=dm.DEMO_EPS, edit_seed=spec.model_seed)
            adapted = dm.planted_edit_in_process(model, clip, targets, preserve, TEMPLATE, strength=dm.DEMO_STRENGTH,
                                                 lam=dm.DEMO_LAM, seed=spec.model_seed, eps=dm.DEMO_EPS)
            stats = adapted.driftscope_planted_stats
            info = {k: v for k, v in stats.items() if k.endswith("_rel_change")}
        elif spec.kind == "lora_trained":
            targets = (LORA_WORD,)
            recipe.update(prompt=LORA_PROMPT, resolution=self.resolution, training=dict(LORA_TRAINING), train_seed=spec.model_seed,
                          teaching=dict(TEACHING))
            with one_thread():
                adapted, info = train_lora(model, clip, base.vae, spec.model_seed, self.resolution, base.latent_scale)
            info = {**base.info, **info}
        elif spec.kind == "null_diffuse":
            targets = ()
            recipe.update(relative_std=DIFFUSE_RELATIVE, noise_seed=spec.model_seed)
            adapted, info = diffuse_patches(model, DIFFUSE_RELATIVE, spec.model_seed + 7919)
        elif spec.kind == "null_identical":
            targets = ()
            adapted = model.clone()
        else:
            raise ValueError(f"unknown case kind {spec.kind!r}; choose one of {', '.join(KINDS)}")
        words = candidate_words(vocabulary, self.candidates, self.candidate_seed, targets)
        adapted_digest = effective_weights_digest(adapted)
        if spec.kind == "null_identical" and adapted_digest != base.digest:
            raise RuntimeError("null_identical: the clone computes with other weights than the base")
        if spec.kind != "null_identical" and adapted_digest == base.digest:
            raise RuntimeError(f"{spec.name}: the adaptation did not change any weight")
        fingerprint = hashlib.sha256(repr((base.digest, adapted_digest, base.clip_digest, sorted(recipe.items()))).encode()).hexdigest()
        case = Case(spec, model, clip, adapted, adapted_clip, words, targets, recipe, fingerprint,
                    time.perf_counter() - t0, info)
        self.log(f"[cases] {spec.name}: {len(words)} candidates, targets {list(targets) or '-'}, "
                 f"built in {case.build_seconds:.1f}s")
        return case
