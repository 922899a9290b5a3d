"""The benchmark's cases: a base model, an adapted model and a candidate vocabulary, built in
process from the tiny demo models (scripts/demo_models.py). Nothing is written to disk.

Kinds of adaptation (one base per family and model seed, shared by its cases):
- planted: a closed-form edit of every cross-attention key/value projection that moves the
  text-encoder outputs of a few planted words (UCE/TIME spirit, demo_models.planted_edit_in_process),
  preserving the CIFAR-100 words. Whatever else it moves (collateral) is part of the truth.
- lora_trained: a LoRA trained by ComfyUI's own TrainLoraNode on procedurally drawn tiger-stripe
  images captioned "a photo of a tiger" (a real adaptation method written outside this project),
  applied with ComfyUI's LoraModelLoader.
- null_diffuse: every non-zero UNet parameter gets a seeded Gaussian "diff" patch of 1% of its
  own RMS: drift with no concept behind it.
- null_identical: the base model against a clone of itself.
"""
from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

KINDS = ("planted", "lora_trained", "null_diffuse", "null_identical")
NULL_KINDS = ("null_diffuse", "null_identical")
FAMILIES = ("sd15", "sd2")
TEMPLATE = "a photo of a {}"

PLANTED_COUNT = 10  # enough planted words to fill the truth's top 10 (past them the drift has no gaps)
PLANTED_POOL = ("cifar100", "coco80")  # planted words are drawn from these lists' one-token words
PLANTED_PRESERVE = "cifar100"  # the edit's preserve set (minus the planted words), as in the demo

LORA_PROMPT = "a photo of a tiger"
LORA_WORD = "tiger"
# TrainLoraNode inputs. fp32 because CPU autocast knows only bf16/fp16; a list of one-image
# latents because 0.3.75 crashes (multi_res unbound) when the latents arrive as one tensor.
LORA_TRAINING = dict(images=8, steps=40, batch_size=2, learning_rate=1e-3, rank=4, optimizer="AdamW",
                     loss_function="MSE", algorithm="LoRA", dtype="fp32")

# Width of the tiny text encoder (and the UNet's context_dim). At the tests' 64 the preserve set
# spans the whole context space, so the planted edit barely moves the planted words (9% of their
# keys/values) and the truth's top 10 is collateral; at 256 they move 133% and lead the truth.
TEXT_WIDTH = 256

DIFFUSE_RELATIVE = 1e-2  # null_diffuse: noise std per tensor, relative to the tensor's RMS


@dataclass(frozen=True)
class CaseSpec:
    family: str  # sd15 | sd2
    model_seed: int
    kind: str  # one of KINDS

    @property
    def name(self) -> str:
        return f"{self.family}-s{self.model_seed}-{self.kind}"

    @property
    def is_null(self) -> bool:
        return self.kind in NULL_KINDS


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
    """Every whole-word token of the CLIP BPE vocabulary that driftscope_core keeps (filtered)."""
    _, bpe, _ = env.host.tokenizer_functions(clip)
    return [c.text for c in env.core.vocabulary.from_bpe_vocab(bpe).candidates]


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


def planted_words(env, vocabulary: Sequence[str], family: str, model_seed: int, count: int = PLANTED_COUNT) -> list[str]:
    """`count` concept words (one BPE token each, i.e. in `vocabulary`) drawn with a seed from
    the built-in lists."""
    in_vocab = set(vocabulary)
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


def train_lora(model, clip, vae, seed: int, size: int, settings: dict = LORA_TRAINING):
    """ComfyUI's TrainLoraNode on tiger images captioned LORA_PROMPT; returns (adapted model, info)."""
    import comfy.utils
    from comfy_extras.nodes_train import LoraModelLoader, TrainLoraNode

    with torch.no_grad():
        latents = vae.encode(tiger_images(settings["images"], size, seed))  # (N, C, h, w)
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(LORA_PROMPT))
    bar, comfy.utils.PROGRESS_BAR_ENABLED = comfy.utils.PROGRESS_BAR_ENABLED, False
    try:
        with torch.random.fork_rng():  # the node draws batches and timesteps from the global RNG
            torch.manual_seed(seed)
            out = TrainLoraNode.execute(
                model=[model], latents=[{"samples": latents[i : i + 1]} for i in range(latents.shape[0])],
                positive=[cond], batch_size=[settings["batch_size"]], steps=[settings["steps"]],
                grad_accumulation_steps=[1], learning_rate=[settings["learning_rate"]], rank=[settings["rank"]],
                optimizer=[settings["optimizer"]], loss_function=[settings["loss_function"]], seed=[seed],
                training_dtype=[settings["dtype"]], lora_dtype=[settings["dtype"]], algorithm=[settings["algorithm"]],
                gradient_checkpointing=[False], existing_lora=["[None]"])
    finally:
        comfy.utils.PROGRESS_BAR_ENABLED = bar
    _trained, lora, loss_map, _steps = out.result
    adapted = LoraModelLoader.execute(model, lora, 1.0).result[0]
    losses = loss_map["loss"]
    tail = max(1, len(losses) // 4)
    info = {"lora_tensors": len(lora), "weight_patches": len(adapted.patches),
            "loss_first_quarter": sum(losses[:tail]) / tail, "loss_last_quarter": sum(losses[-tail:]) / tail}
    return adapted, info


def diffuse_patches(model, relative: float, seed: int):
    """A clone with a seeded Gaussian "diff" patch on every non-zero UNet parameter
    (std = relative * the parameter's RMS; zero-initialized biases have no scale and stay)."""
    import comfy.model_management

    # another case's patcher may still be loaded, i.e. its patches applied in place: read the
    # stored weights, not that case's
    comfy.model_management.unload_all_models()
    g = torch.Generator().manual_seed(seed)
    patches, skipped = {}, 0
    for name, p in sorted(model.model.diffusion_model.named_parameters()):
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


# -- building -------------------------------------------------------------------------------------
class CaseBuilder:
    """Builds cases; the base model of each (family, model seed) is made once and shared."""

    def __init__(self, env, candidates: int | None, candidate_seed: int = 0, resolution: int = 32,
                 text_width: int = TEXT_WIDTH, log: Callable[[str], None] = print):
        self.env, self.candidates, self.candidate_seed = env, candidates, candidate_seed
        self.text_width = text_width
        self.resolution, self.log = resolution, log
        self._bases: dict[tuple[str, int], tuple] = {}

    def base(self, family: str, model_seed: int):
        key = (family, model_seed)
        if key not in self._bases:
            make = {"sd15": self.env.demo_models.tiny_sd15, "sd2": self.env.demo_models.tiny_sd2}[family]
            model, clip, vae = make(model_seed, text_width=self.text_width)
            self._bases[key] = (model, clip, vae, effective_weights_digest(model), clip_digest(clip),
                                full_vocabulary(self.env, clip))
        return self._bases[key]

    def build(self, spec: CaseSpec) -> Case:
        t0 = time.perf_counter()
        model, clip, vae, base_digest, clip_sha, vocabulary = self.base(spec.family, spec.model_seed)
        dm = self.env.demo_models
        recipe: dict = {"kind": spec.kind, "family": spec.family, "model_seed": spec.model_seed, "template": TEMPLATE,
                        "text_width": self.text_width}
        info: dict = {}
        adapted_clip = clip
        if spec.kind == "planted":
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
            recipe.update(prompt=LORA_PROMPT, resolution=self.resolution, training=dict(LORA_TRAINING), train_seed=spec.model_seed)
            adapted, info = train_lora(model, clip, vae, spec.model_seed, self.resolution)
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
        if spec.kind == "null_identical" and adapted_digest != base_digest:
            raise RuntimeError("null_identical: the clone computes with other weights than the base")
        if spec.kind != "null_identical" and adapted_digest == base_digest:
            raise RuntimeError(f"{spec.name}: the adaptation did not change any weight")
        fingerprint = hashlib.sha256(repr((base_digest, adapted_digest, clip_sha, sorted(recipe.items()))).encode()).hexdigest()
        case = Case(spec, model, clip, adapted, adapted_clip, words, targets, recipe, fingerprint,
                    time.perf_counter() - t0, info)
        self.log(f"[cases] {spec.name}: {len(words)} candidates, targets {list(targets) or '-'}, "
                 f"built in {case.build_seconds:.1f}s")
        return case
