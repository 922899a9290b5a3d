"""Does the reported drift show in the images? The paper's claim in a small trained world (issue 13).

    python benchmarks/image_world.py [--variant full|smoke] [--out DIR] [--no-cache]

The world (everything generated in process, nothing downloaded):
- the benchmark's taught base (cases.teach_concepts): the tiny SD1.5 learns the 91 one-token
  CIFAR-100 concepts, drawn procedurally by cases.concept_images, from "a photo of a {concept}";
- a small CNN classifier trained on fresh draws of the same concepts, seen through the VAE
  (decode(encode(x)), the images a perfect generator would give), with held-out draws for its
  own accuracy. It plays the paper's zero-shot classifier; its penultimate layer plays Inception
  for the FID-like and KID-like aggregates;
- adaptations of the base at two strengths each: the customization LoRA (cases.train_lora,
  ComfyUI's TrainLoraNode), a DreamBooth-style full fine-tune on "tiger" without and with a
  prior-preservation set, an ESD-style erasure fine-tune (negative guidance), a closed-form
  UCE-style erasure of the cross-attention keys/values, and the diffuse null (cases.diffuse_patches).

Per model, "a photo of a {concept}" is sampled in full with ComfyUI's own sampler
(comfy.sample.sample, euler) on a fixed set of noise seeds (the same noise for every model: the
pairs are what an Evidence Grid shows); the base also on a second seed set, which gives the
seed-to-seed noise of every score. DriftScope audits every adaptation on the 91 concept words
(the Audit node's entry point, nodes.audit.audit_models, scan mode, every word reported) for each
objective and kept_steps setting, and its per-concept drift is compared with the per-concept
accuracy drop. Writes results.json and results.md to --out (default benchmarks/results/image_world/).
Trained bases and classifiers are cached under benchmarks/cache/image_world/ (gitignored).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

import cases as case_lib
import environment
import metrics

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache" / "image_world"
DEFAULT_OUT = HERE / "results" / "image_world"
TEMPLATE = case_lib.TEMPLATE
OBJECTIVES = ("attention", "prediction", "latent")
# The objective the CI smoke test holds to a floor: the one the full run favours (results.md).
CHOSEN_OBJECTIVE = "attention"
FALL = 0.25  # a concept "falls" when its accuracy drops by at least this (25 points)
CODE_VERSION = 1  # bump when the world's recipe changes: the caches are keyed by it
ANCHOR = "object"  # the UCE erasure maps its target onto this word (not one of the concepts)


@dataclass(frozen=True)
class Adaptation:
    kind: str  # lora | dreambooth | dreambooth_prior | esd | uce | null
    label: str  # its strength, as shown in the tables
    params: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.label}"

    @property
    def is_null(self) -> bool:
        return self.kind == "null"


@dataclass(frozen=True)
class Variant:
    name: str
    concepts: int | None  # the first n concept words (None: all 91)
    teaching: dict  # cases.teach_concepts settings
    classifier: dict  # training draws and test draws per concept, epochs, learning rate
    seeds: int  # noise seeds per concept for full sampling
    steps: int  # full-sampling steps (euler, normal schedule)
    adaptations: tuple
    objectives: tuple = OBJECTIVES
    kept_steps: tuple = (2, 4)
    size: int = 32  # pixels (the TAESD VAE: 8x smaller latents)
    cfg: float = 7.5
    model_seed: int = 0
    # audit settings (on top of the node's "standard" preset): scan every word and report all of
    # them; the quick preset's noise batch and re-scoring seeds (CPU budget)
    audit: dict = field(default_factory=lambda: dict(mode="scan", schedule_steps=20, cfg=7.5, noise_batch=2,
                                                     rescore_seeds=4, calibration_size=32, direction="most"))
    note: str = ""


FULL_ADAPTATIONS = (
    Adaptation("lora", "120x1e-3", dict(steps=120, learning_rate=1e-3)),  # today's lora_trained case
    Adaptation("lora", "480x3e-3", dict(steps=480, learning_rate=3e-3)),
    Adaptation("dreambooth", "100x1e-4", dict(steps=100, lr=1e-4, prior=False)),
    Adaptation("dreambooth", "400x1e-4", dict(steps=400, lr=1e-4, prior=False)),
    Adaptation("dreambooth_prior", "100x1e-4", dict(steps=100, lr=1e-4, prior=True)),
    Adaptation("dreambooth_prior", "400x1e-4", dict(steps=400, lr=1e-4, prior=True)),
    Adaptation("esd", "100x1e-4", dict(steps=100, lr=1e-4, eta=1.0)),
    Adaptation("esd", "400x1e-4", dict(steps=400, lr=1e-4, eta=1.0)),
    Adaptation("uce", "s1", dict(strength=1.0, lam=1.0)),
    Adaptation("uce", "s3", dict(strength=3.0, lam=1.0)),
    Adaptation("null", "1%", dict(relative=0.01)),
    Adaptation("null", "3%", dict(relative=0.03)),
)

VARIANTS = {
    "full": Variant("full", None, dict(case_lib.TEACHING), dict(train=48, test=16, epochs=30, lr=3e-3),
                    seeds=16, steps=10, adaptations=FULL_ADAPTATIONS,
                    note="91 concepts, 16 seeds, 12 adaptations, 3 objectives x kept_steps 2 and 4"),
    "smoke": Variant("smoke", 24, dict(case_lib.TEACHING, steps=400, batch_size=32),
                     dict(train=32, test=8, epochs=30, lr=3e-3), seeds=8, steps=10,
                     adaptations=(Adaptation("uce", "s3", dict(strength=3.0, lam=1.0)),
                                  Adaptation("null", "1%", dict(relative=0.01))),
                     objectives=(CHOSEN_OBJECTIVE,), kept_steps=(4,),
                     note="CI: 24 concepts, a short teaching, one erasure and the null, the chosen objective"),
}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _generator(*key) -> torch.Generator:
    return torch.Generator().manual_seed(int(hashlib.sha256(repr(key).encode()).hexdigest()[:12], 16))


# -- the world: concepts, base, classifier ---------------------------------------------------------
def concept_words(env, count: int | None) -> list[str]:
    """The taught concepts: the one-word CIFAR-100 classes (91), or the first `count`."""
    words = [w for w in env.demo_models.load_vocabulary(case_lib.TEACHING["vocabulary"]) if " " not in w]
    return words if count is None else words[:count]


@dataclass
class World:
    model: object  # the taught base, a comfy ModelPatcher
    clip: object
    vae: object
    words: list[str]
    latent_scale: float  # VAE latents / latent_scale = the model's data (cases.teach_concepts)
    info: dict


def taught_base(env, variant: Variant, words: Sequence[str], use_cache: bool, log) -> World:
    """The taught base (cached under CACHE, keyed by the recipe and the initial weights)."""
    model, clip, vae = env.demo_models.tiny_sd15(variant.model_seed, text_width=case_lib.TEXT_WIDTH)
    key = _digest([CODE_VERSION, "base", variant.teaching, list(words), variant.size, variant.model_seed,
                   case_lib.effective_weights_digest(model)])
    path = CACHE / f"base-{key}.pt"
    if use_cache and path.exists():
        saved = torch.load(path, weights_only=True)
        model.model.diffusion_model.load_state_dict(saved["unet"])
        info = json.loads(saved["info"])
        log(f"[world] taught base from the cache ({path.name})")
        return World(model, clip, vae, list(words), float(saved["latent_scale"]), dict(info, cached=True))
    with case_lib.one_thread():
        scale, info = case_lib.teach_concepts(model, clip, vae, words, variant.model_seed, variant.size,
                                              settings=variant.teaching, log=log)
    if use_cache:
        CACHE.mkdir(parents=True, exist_ok=True)
        unet = {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}
        torch.save({"unet": unet, "latent_scale": scale, "info": json.dumps(info)}, path)
    return World(model, clip, vae, list(words), scale, dict(info, cached=False))


class Classifier(torch.nn.Module):
    """A small CNN on the model's latents (N, 4, h, w): two conv layers, global average pooling
    to `width` features (the FID/KID feature space), a linear head over the concepts."""

    def __init__(self, classes: int, width: int = 64, channels: int = 4):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(channels, width, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.head = torch.nn.Linear(width, classes)

    def features(self, latents: torch.Tensor) -> torch.Tensor:
        return self.body(latents)  # (N, 4, h, w) -> (N, width)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(latents))  # (N, classes)


def real_images(world: World, variant: Variant, first: int, count: int, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws first..first+count-1 of every concept (the teaching used the first images_per_word),
    as the model sees them (VAE-encoded, in the model's space): (W*count, 4, h, w), labels (W*count,).
    The tiny VAE is random: its decoder adds no information to a latent, so the classifier reads
    what the sampler produces directly."""
    draws = torch.cat([case_lib.concept_images(w, first + count, variant.size, variant.model_seed)[first:]
                       for w in world.words])  # (W*count, H, W, 3)
    with torch.no_grad():
        raw = torch.cat([world.vae.encode(draws[i : i + chunk]) for i in range(0, len(draws), chunk)])
    labels = torch.arange(len(world.words)).repeat_interleave(count)  # (W*count,)
    return _model_space(world, raw / world.latent_scale), labels


def train_classifier(world: World, variant: Variant, use_cache: bool, log) -> tuple[Classifier, dict]:
    """The classifier (cached), its held-out accuracy, and the held-out images (the FID reference)."""
    s = variant.classifier
    first = variant.teaching["images_per_word"]  # draws after the teaching's own
    train_x, train_y = real_images(world, variant, first, s["train"])
    test_x, test_y = real_images(world, variant, first + s["train"], s["test"])
    with torch.random.fork_rng():  # a seeded initialization: every process trains the same classifier
        torch.manual_seed(variant.model_seed)
        clf = Classifier(len(world.words))
    key = _digest([CODE_VERSION, "classifier", s, world.words, variant.size, variant.model_seed,
                   float(train_x.sum()), float(test_x.sum())])
    path = CACHE / f"classifier-{key}.pt"
    t0 = time.perf_counter()
    if use_cache and path.exists():
        clf.load_state_dict(torch.load(path, weights_only=True))
    else:
        _fit(clf, train_x, train_y, s, variant.model_seed)
        if use_cache:
            CACHE.mkdir(parents=True, exist_ok=True)
            torch.save(clf.state_dict(), path)
    clf.eval()
    with torch.no_grad():
        acc = float((clf(test_x).argmax(1) == test_y).float().mean())
    info = {"train_images": len(train_y), "test_images": len(test_y), "heldout_accuracy": acc,
            "seconds": round(time.perf_counter() - t0, 1)}
    log(f"[world] classifier: held-out accuracy {acc:.3f} on {len(test_y)} draws")
    return clf, {**info, "test_images_tensor": test_x}


def _fit(clf: Classifier, x: torch.Tensor, y: torch.Tensor, s: dict, seed: int, batch: int = 128) -> None:
    """AdamW on cross-entropy, with light noise on the inputs so that generated latents are not out of domain."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(clf.parameters(), lr=s["lr"], weight_decay=1e-4)
    clf.train()
    for _ in range(s["epochs"]):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            pick = order[i : i + batch]
            xb = x[pick] + 0.05 * torch.randn(x[pick].shape, generator=g)
            loss = torch.nn.functional.cross_entropy(clf(xb), y[pick])
            opt.zero_grad()
            loss.backward()
            opt.step()


# -- full sampling ----------------------------------------------------------------------------------
def seed_noise(variant: Variant, seed_set: str) -> torch.Tensor:
    """The noise of one seed set, shared by every concept and model: (S, 4, h, w)."""
    h = variant.size // 8
    return torch.randn((variant.seeds, 4, h, h), generator=_generator("image-world", variant.model_seed, seed_set))


class Prompts:
    """ComfyUI conditionings of every concept's prompt and of the empty prompt, encoded once."""

    def __init__(self, clip, words: Sequence[str]):
        self.words = list(words)
        self.cond = [clip.encode_from_tokens_scheduled(clip.tokenize(TEMPLATE.format(w))) for w in words]
        self.empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))


def generate(model, prompts: Prompts, noise: torch.Tensor, variant: Variant) -> torch.Tensor:
    """Full sampling with ComfyUI's sampler (euler, normal schedule, CFG), every concept on the
    same noise: VAE-space latents (W, S, 4, h, w)."""
    import comfy.sample

    out = []
    with torch.no_grad():
        for cond in prompts.cond:
            out.append(comfy.sample.sample(model, noise, variant.steps, variant.cfg, "euler", "normal", cond,
                                           prompts.empty, torch.zeros_like(noise), disable_pbar=True, seed=0))
    return torch.stack(out)  # (W, S, 4, h, w)


def decode(world: World, latents: torch.Tensor) -> torch.Tensor:
    """What the classifier reads of sampled VAE-space latents (W, S, 4, h, w): the same in the
    model's space (the space of real_images)."""
    return _model_space(world, latents)


@dataclass
class Scores:
    features: torch.Tensor  # (W, S, F)
    correct: torch.Tensor  # (W, S) bool
    true_prob: torch.Tensor  # (W, S)

    @property
    def accuracy(self) -> torch.Tensor:
        return self.correct.float().mean(1)  # (W,)


def score(clf: Classifier, images: torch.Tensor) -> Scores:
    """The classifier on generated images (W, S, 4, h, w): features, hits, probability of the prompt's concept."""
    w, s = images.shape[:2]
    with torch.no_grad():
        feats = clf.features(images.flatten(0, 1))  # (W*S, F)
        probs = clf.head(feats).softmax(-1).view(w, s, -1)  # (W, S, classes)
    labels = torch.arange(w)[:, None].expand(w, s)  # (W, S)
    return Scores(feats.view(w, s, -1), probs.argmax(-1) == labels,
                  probs.gather(-1, labels[..., None]).squeeze(-1))


# -- aggregate scores ------------------------------------------------------------------------------
def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets (N, F) and (M, F) (FID's formula)."""
    a, b = a.double(), b.double()
    mu = a.mean(0) - b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)  # (F, F)
    vals, vecs = torch.linalg.eigh(ca)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T  # ca^(1/2)
    inner = torch.linalg.eigvalsh(root_a @ cb @ root_a).clamp_min(0).sqrt().sum()  # tr((ca^1/2 cb ca^1/2)^1/2)
    return float(mu @ mu + ca.trace() + cb.trace() - 2 * inner)


def kid(a: torch.Tensor, b: torch.Tensor, subsets: int = 10, size: int = 500, seed: int = 0) -> float:
    """KID: unbiased MMD^2 with the cubic polynomial kernel, mean over random subsets, x1000."""
    g = torch.Generator().manual_seed(seed)
    a, b = a.double(), b.double()
    d, m = a.shape[1], min(size, len(a), len(b))
    total = 0.0
    for _ in range(subsets):
        x, y = a[torch.randperm(len(a), generator=g)[:m]], b[torch.randperm(len(b), generator=g)[:m]]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)  # (m, m) each
        off = m * (m - 1)
        total += float((kxx.sum() - kxx.trace()) / off + (kyy.sum() - kyy.trace()) / off - 2 * kxy.mean())
    return 1000 * total / subsets


def aggregate(features: torch.Tensor, reference: torch.Tensor) -> dict:
    """FID-like and KID-like scores of generated features (W, S, F) against the reference (N, F),
    both in units of the reference features' overall standard deviation (the classifier's
    feature scale is arbitrary)."""
    unit = reference.std()
    flat = features.flatten(0, 1) / unit  # (W*S, F)
    return {"fid": frechet(flat, reference / unit), "kid": kid(flat, reference / unit)}


def bootstrap_noise(features: torch.Tensor, reference: torch.Tensor, rounds: int, seed: int) -> dict:
    """Standard deviation of the aggregate scores when the generated images are resampled
    (with replacement, within each concept): how much the seeds alone move them."""
    g = torch.Generator().manual_seed(seed)
    w, s = features.shape[:2]
    vals = {"fid": [], "kid": []}
    for _ in range(rounds):
        pick = torch.randint(0, s, (w, s), generator=g)  # (W, S)
        resampled = features.gather(1, pick[..., None].expand(-1, -1, features.shape[-1]))  # (W, S, F)
        for k, v in aggregate(resampled, reference).items():
            vals[k].append(v)
    return {k: float(torch.tensor(v).std()) for k, v in vals.items()}


# -- adaptations -----------------------------------------------------------------------------------
def _model_space(world: World, vae_latents: torch.Tensor) -> torch.Tensor:
    """VAE-space latents (what comfy.sample returns) in the model's own space (what it was taught on)."""
    return world.model.model.latent_format.process_in(vae_latents)


def _with_deltas(model, deltas: dict):
    """A clone of `model` carrying `deltas` (state-dict key -> tensor) as "diff" weight patches."""
    clone = model.clone()
    added = clone.add_patches({k: ("diff", (d,)) for k, d in deltas.items()}, 1.0)
    if len(added) != len(deltas):
        raise RuntimeError(f"only {len(added)} of {len(deltas)} patches were accepted")
    return clone


def finetune(world: World, loss_fn: Callable, steps: int, lr: float, trainable: Callable[[str], bool], seed: int):
    """Fine-tune a copy of the base's UNet with `loss_fn(copy, generator)`; the base keeps its
    weights. Returns (a clone of the base carrying the weight changes as patches, info)."""
    import comfy.model_management

    comfy.model_management.unload_all_models()  # the stored weights, no loaded patch applied in place
    stored = world.model.model
    work = type(stored)(stored.model_config, model_type=stored.model_type)  # a fresh copy (BaseModel does not deepcopy)
    work.load_state_dict(stored.state_dict())
    before = {n: p.detach().clone() for n, p in work.diffusion_model.named_parameters()}
    g = torch.Generator().manual_seed(seed)
    losses = []
    with torch.inference_mode(False), torch.enable_grad():
        params = [p for n, p in work.diffusion_model.named_parameters() if trainable(n)]
        for p in work.diffusion_model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        for _ in range(steps):
            loss = loss_fn(work, g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    deltas = {f"diffusion_model.{n}": (p.detach() - before[n]) for n, p in work.diffusion_model.named_parameters()
              if trainable(n)}
    q = max(1, steps // 4)
    info = {"trained_tensors": len(deltas), "loss_first_quarter": sum(losses[:q]) / q, "loss_last_quarter": sum(losses[-q:]) / q}
    return _with_deltas(world.model, deltas), info


def dreambooth(world: World, target: str, prior_latents: torch.Tensor | None, prior_words: Sequence[str],
               params: dict, seed: int, size: int):
    """DreamBooth-style: every UNet weight learns 8 tiger-stripe images (cases.tiger_images) as
    "a photo of {target}"; with prior preservation, each step also fits the base's own samples
    of `prior_words` (prior_latents, model space, (P, S', 4, h, w)) under their captions."""
    with torch.no_grad():
        x = world.vae.encode(case_lib.tiger_images(8, size, seed)) / world.latent_scale  # (8, 4, h, w) VAE space
        x = _model_space(world, x)
        caption = world.clip.encode_from_tokens(world.clip.tokenize(TEMPLATE.format(target)))  # (1, T, D)
        prior_caps = (torch.cat([world.clip.encode_from_tokens(world.clip.tokenize(TEMPLATE.format(w))) for w in prior_words])
                      if prior_latents is not None else None)  # (P, T, D)
    x, caption = x.clone(), caption.clone()

    def loss_fn(work, g):
        pick = torch.randint(0, len(x), (4,), generator=g)  # (4,)
        loss = case_lib._diffusion_loss(work, x[pick], caption.expand(4, -1, -1), g)
        if prior_latents is not None:
            p = torch.randint(0, prior_latents.shape[0], (4,), generator=g)  # (4,) which prior word
            s = torch.randint(0, prior_latents.shape[1], (4,), generator=g)  # (4,) which of its samples
            loss = loss + case_lib._diffusion_loss(work, prior_latents[p, s].clone(), prior_caps[p].clone(), g)
        return loss

    return finetune(world, loss_fn, params["steps"], params["lr"], lambda n: True, seed)


def esd(world: World, target: str, target_latents: torch.Tensor, params: dict, seed: int):
    """ESD-u-style erasure: every UNet weight outside cross-attention is trained so that the
    prediction for "a photo of {target}" becomes the frozen base's negatively guided one,
    x0_empty - eta (x0_target - x0_empty) (the eps formula, written in x0), on noised base
    samples of the target (target_latents, model space, (S, 4, h, w))."""
    base = world.model.model
    with torch.no_grad():
        cond = world.clip.encode_from_tokens(world.clip.tokenize(TEMPLATE.format(target)))  # (1, T, D)
        empty = world.clip.encode_from_tokens(world.clip.tokenize(""))  # (1, T, D)
    cond, empty, x0s = cond.clone(), empty.clone(), target_latents.clone()
    ms = base.model_sampling

    def loss_fn(work, g, b: int = 4):
        x0 = x0s[torch.randint(0, len(x0s), (b,), generator=g)]  # (b, 4, h, w)
        sigma = ms.sigmas[torch.randint(0, len(ms.sigmas), (b,), generator=g)]  # (b,)
        x = ms.noise_scaling(sigma, torch.randn(x0.shape, generator=g), x0)
        with torch.no_grad():
            d_c = base.apply_model(x, sigma, c_crossattn=cond.expand(b, -1, -1))
            d_u = base.apply_model(x, sigma, c_crossattn=empty.expand(b, -1, -1))
            goal = d_u - params["eta"] * (d_c - d_u)
        out = work.apply_model(x, sigma, c_crossattn=cond.expand(b, -1, -1))
        return ((out - goal) ** 2 / sigma.view(-1, 1, 1, 1) ** 2).mean()  # eps-space error

    return finetune(world, loss_fn, params["steps"], params["lr"], lambda n: ".attn2." not in n, seed)


def _prompt_vectors(clip, word: str) -> torch.Tensor:
    """The text encoder's full output for TEMPLATE.format(word): (77, D)."""
    with torch.no_grad():
        return clip.encode_from_tokens(clip.tokenize(TEMPLATE.format(word)))[0].float()


def uce_erase(world: World, target: str, preserve: Sequence[str], params: dict):
    """Closed-form UCE-style erasure: every cross-attention key/value projection W gets the
    Delta minimizing ||(W+Delta) c_t - W c_a||^2 (target rows towards `strength` times the way to
    the ANCHOR word's rows) + lam ||Delta c_p||^2 over the preserved concepts' rows + a small
    ridge, i.e. Delta (C_t^T C_t + lam C_p^T C_p + eps I) = R^T C_t with R the target residuals."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    t, a = _prompt_vectors(world.clip, target), _prompt_vectors(world.clip, ANCHOR)  # (77, D) each
    rows = (t - a).abs().amax(1) > 1e-6  # positions that depend on the word (the slot onwards)
    ct, ca = t[rows].double(), a[rows].double()  # (n, D)
    cp = torch.cat([_prompt_vectors(world.clip, w) for w in preserve]).double()  # (P*77, D)
    ridge = 0.1 * ct.pow(2).sum(1).mean()
    gram = ct.T @ ct + params["lam"] * (cp.T @ cp) + ridge * torch.eye(ct.shape[1], dtype=torch.float64)  # (D, D)
    deltas = {}
    for key, w in sorted(world.model.model.state_dict().items()):
        if not (key.endswith("attn2.to_k.weight") or key.endswith("attn2.to_v.weight")):
            continue
        w = w.double()  # (out, D)
        residual = params["strength"] * (ca - ct) @ w.T  # (n, out)
        deltas[key] = torch.linalg.solve(gram, ct.T @ residual).T.float().contiguous()  # (out, D)
    info = {"edited_projections": len(deltas), "target_rows": int(rows.sum()), "preserved_words": len(preserve)}
    return _with_deltas(world.model, deltas), info


def build_adaptation(world: World, ad: Adaptation, targets: dict, base_latents: torch.Tensor, variant: Variant):
    """The adapted model of one Adaptation and what it was made of."""
    seed = variant.model_seed
    if ad.kind == "lora":
        settings = dict(case_lib.LORA_TRAINING, **ad.params)
        with case_lib.one_thread():
            model, info = case_lib.train_lora(world.model, world.clip, world.vae, seed, variant.size, world.latent_scale, settings)
        return model, dict(info, target=case_lib.LORA_WORD)
    if ad.kind in ("dreambooth", "dreambooth_prior"):
        prior_words = targets["prior_words"]
        idx = [world.words.index(w) for w in prior_words]
        prior = _model_space(world, base_latents[idx]) if ad.params["prior"] else None  # (P, S, 4, h, w)
        model, info = dreambooth(world, case_lib.LORA_WORD, prior, prior_words, ad.params, seed, variant.size)
        return model, dict(info, target=case_lib.LORA_WORD, prior_words=len(prior_words) if prior is not None else 0)
    if ad.kind == "esd":
        target = targets["erase"]
        model, info = esd(world, target, _model_space(world, base_latents[world.words.index(target)]), ad.params, seed)
        return model, dict(info, target=target)
    if ad.kind == "uce":
        target = targets["erase"]
        model, info = uce_erase(world, target, targets["preserve"], ad.params)
        return model, dict(info, target=target)
    if ad.kind == "null":
        model, info = case_lib.diffuse_patches(world.model, ad.params["relative"], seed + 7919)
        return model, dict(info, target=None)
    raise ValueError(f"unknown adaptation kind {ad.kind!r}")


def choose_targets(world: World, base: Scores) -> dict:
    """The erasure target: the concept the base draws best (highest accuracy, then probability),
    other than the customization's "tiger"; the UCE preserve set: every other remaining concept
    (so that half of the others are protected and half are not); DreamBooth's prior set: 16
    concepts spread over the list."""
    acc, prob = base.accuracy, base.true_prob.mean(1)
    order = sorted(range(len(world.words)), key=lambda i: (-float(acc[i]), -float(prob[i])))
    erase = next(world.words[i] for i in order if world.words[i] != case_lib.LORA_WORD)
    others = [w for w in world.words if w != erase]
    prior_pool = [w for w in world.words if w != case_lib.LORA_WORD]
    step = max(1, len(prior_pool) // 16)
    return {"erase": erase, "preserve": others[::2], "prior_words": prior_pool[::step][:16]}


# -- audits ----------------------------------------------------------------------------------------
def _run_node(env, world: World, adapted, variant: Variant, **settings):
    """The Audit node's entry point on the concept words (custom list, the world's template, the
    variant's size), in inference mode as ComfyUI runs nodes; `settings` are the audit's own."""
    with torch.inference_mode():
        return env.pack.nodes.audit.audit_models(
            world.model, world.clip, adapted, world.clip, vocabulary="custom", custom_words="\n".join(world.words),
            templates=TEMPLATE, preset="standard", scheduler="normal", precision="fp32", micro_batch=64,
            gradient_checkpointing=False, width=variant.size, height=variant.size, seed=0, **settings)


def audit(env, world: World, adapted, objective: str, kept: int, variant: Variant) -> dict:
    """DriftScope's Audit entry point on the concept words: every word's drift, calibrated score
    and significance, the report's order, and the audit's time and cost."""
    t0 = time.perf_counter()
    report = _run_node(env, world, adapted, variant, top_k=len(world.words), objective=objective, kept_steps=kept,
                       **variant.audit)
    by_word = {e.token: e for e in report.entries}
    missing = [w for w in world.words if w not in by_word]
    if missing:
        raise RuntimeError(f"the audit did not report {missing[:5]}")
    ev = report.evaluations
    return {"order": [e.token for e in report.entries],
            "drift": [by_word[w].drift for w in world.words],
            "calibrated": [by_word[w].calibrated for w in world.words],
            "significant": [e.token for e in report.entries if e.significant],
            "unet_forward": sum(v["unet_forward"] for v in ev.values()),
            "seconds": round(time.perf_counter() - t0, 2)}


def node_defaults_audit(env, world: World, adapted, variant: Variant) -> dict:
    """The null's check as a user would run it: the Audit node on the concept words with its own
    defaults (the standard preset's mode, budget and top_k), only the schedule shortened as in the
    variant's audits. The variant's audits report every word, which leaves no random words to
    calibrate against (the baseline falls back to the reported words themselves); this one keeps
    the node's top 10 and calibrates on the other concepts."""
    t0 = time.perf_counter()
    report = _run_node(env, world, adapted, variant, mode="preset", schedule_steps=variant.audit["schedule_steps"],
                       cfg=variant.cfg)
    return {"settings": {k: report.settings[k] for k in ("mode", "objective", "kept_steps", "top_k", "noise_batch",
                                                         "rescore_seeds", "calibration_size", "schedule_steps")},
            "top10": [e.token for e in report.entries], "significant": [e.token for e in report.entries if e.significant],
            "calibrated": [round(e.calibrated, 3) for e in report.entries], "z_threshold": report.baseline["z_threshold"],
            "calibration_words": report.baseline["size"], "notes": report.notes,
            "seconds": round(time.perf_counter() - t0, 2)}


# -- figures ---------------------------------------------------------------------------------------
def damaged_order(drop: Sequence[float], prob_drop: Sequence[float]) -> list[int]:
    """Concept indices from the most damaged (accuracy drop, then probability drop) down."""
    return sorted(range(len(drop)), key=lambda i: (-drop[i], -prob_drop[i]))


def recall_at5_in_top10(ranking_idx: Sequence[int], damaged: Sequence[int]) -> float:
    """Share of the five most damaged concepts among the ranking's first ten."""
    return len(set(ranking_idx[:10]) & set(damaged[:5])) / 5


def ranking_figures(values: Sequence[float], drop: Sequence[float], damaged: Sequence[int]) -> dict:
    """Spearman rank correlation of a per-concept score with the accuracy drop, and recall@5
    of the most damaged concepts in the score's top 10."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    return {"spearman": metrics.spearman(list(values), list(drop)), "recall5_at10": recall_at5_in_top10(order, damaged)}


def feature_distance(base: Scores, adapted: Scores, seeds: int | None = None) -> list[float]:
    """Per concept, the mean over seeds of 1 - cosine(base features, adapted features) of the
    same noise: the stand-in for a per-seed CLIP_VISION column of the Evidence Grid."""
    a, b = base.features, adapted.features  # (W, S, F)
    if seeds is not None:
        a, b = a[:, :seeds], b[:, :seeds]
    return (1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).mean(1).tolist()  # (W,)


def concept_figures(base: Scores, adapted: Scores) -> dict:
    """Per-concept accuracy drops (base minus adapted, same noise) and how many fall."""
    drop = (base.accuracy - adapted.accuracy).tolist()
    prob_drop = (base.true_prob.mean(1) - adapted.true_prob.mean(1)).tolist()
    return {"drop": drop, "prob_drop": prob_drop, "mean_drop": sum(drop) / len(drop),
            "std_drop": float(torch.tensor(drop).std()), "max_drop": max(drop),
            "fallen": sum(d >= FALL for d in drop), "fallen_50": sum(d >= 0.5 for d in drop)}


# -- the run ---------------------------------------------------------------------------------------
def run_world(env, variant: Variant, out_dir: Path | None = DEFAULT_OUT, use_cache: bool = True,
              log: Callable[[str], None] = print) -> dict:
    """Build the world, sample, adapt, audit; write and return every figure."""
    torch.set_num_threads(1)
    t_start, seconds = time.perf_counter(), {}

    def lap(name, t):
        seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - t, 1)

    t = time.perf_counter()
    world = taught_base(env, variant, concept_words(env, variant.concepts), use_cache, log)
    lap("teaching", t)
    t = time.perf_counter()
    clf, clf_info = train_classifier(world, variant, use_cache, log)
    with torch.no_grad():
        reference = clf.features(clf_info.pop("test_images_tensor"))  # (N, F): the FID/KID reference
    lap("classifier", t)

    t = time.perf_counter()
    prompts = Prompts(world.clip, world.words)
    noise_a, noise_b = seed_noise(variant, "A"), seed_noise(variant, "B")
    base_latents = generate(world.model, prompts, noise_a, variant)  # (W, S, 4, h, w)
    base = score(clf, decode(world, base_latents))
    base_b = score(clf, decode(world, generate(world.model, prompts, noise_b, variant)))
    lap("sampling", t)
    targets = choose_targets(world, base)
    log(f"[world] base accuracy {float(base.accuracy.mean()):.3f} (seed set B {float(base_b.accuracy.mean()):.3f}); "
        f"erasure target {targets['erase']!r}")
    base_agg, base_b_agg = aggregate(base.features, reference), aggregate(base_b.features, reference)
    noise = bootstrap_noise(base.features, reference, 20, variant.model_seed)
    seed_sets = concept_figures(base_b, base)  # the drop from seed set B to A: per-concept noise

    results = {
        "variant": variant.name, "note": variant.note, "settings": _settings(variant),
        "machine": {"threads": torch.get_num_threads(), "python": sys.version.split()[0], "torch": torch.__version__},
        "world": {"concepts": len(world.words), "words": world.words, "teaching": world.info, "classifier": clf_info,
                  "base_accuracy": base.accuracy.tolist(), "base_accuracy_mean": float(base.accuracy.mean()),
                  "base_b_accuracy_mean": float(base_b.accuracy.mean()), "targets": targets},
        "aggregate_base": {"A": base_agg, "B": base_b_agg, "bootstrap_std": noise},
        "seed_set_noise": {k: seed_sets[k] for k in ("mean_drop", "std_drop", "max_drop", "fallen", "fallen_50")},
        "adaptations": [], "seconds": seconds,
    }
    for ad in variant.adaptations:
        results["adaptations"].append(run_adaptation(env, world, ad, variant, prompts, noise_a, base, base_latents,
                                                     targets, clf, reference, base_agg, noise, seconds, log))
        _write_partial(results, out_dir, t_start)
    results["summary"] = summarize(results, variant)
    results["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
    if out_dir is not None:
        write(results, out_dir)
    return results


def run_adaptation(env, world, ad, variant, prompts, noise_a, base, base_latents, targets, clf, reference,
                   base_agg, noise, seconds, log) -> dict:
    """One adaptation: build it, sample it on seed set A, score it, audit it per objective and kept_steps."""
    t = time.perf_counter()
    model, info = build_adaptation(world, ad, targets, base_latents, variant)
    seconds["adapting"] = round(seconds.get("adapting", 0.0) + time.perf_counter() - t, 1)
    t = time.perf_counter()
    adapted = score(clf, decode(world, generate(model, prompts, noise_a, variant)))
    seconds["sampling"] = round(seconds.get("sampling", 0.0) + time.perf_counter() - t, 1)
    agg = aggregate(adapted.features, reference)
    change = {k: agg[k] - base_agg[k] for k in agg}
    within = {k: abs(change[k]) <= 2 * noise[k] for k in agg}
    conc = concept_figures(base, adapted)
    damaged = damaged_order(conc["drop"], conc["prob_drop"])
    target = info.get("target")
    row = {"name": ad.name, "kind": ad.kind, "label": ad.label, "params": ad.params, "info": info,
           "aggregate": agg, "aggregate_change": change, "aggregate_within_noise": within, "concepts": conc,
           "target_drop": None if target is None else conc["drop"][world.words.index(target)],
           "most_damaged": [[world.words[i], round(conc["drop"][i], 3)] for i in damaged[:8]],
           "feature_column": {}, "audits": {}}
    row["fallen_besides_target"] = sum(d >= FALL for i, d in enumerate(conc["drop"]) if world.words[i] != target)
    row["hidden_damage"] = all(within.values()) and row["fallen_besides_target"] > 0
    for n_seeds in (None, 4):
        dist = feature_distance(base, adapted, n_seeds)
        row["feature_column"]["all_seeds" if n_seeds is None else "4_seeds"] = {
            **ranking_figures(dist, conc["drop"], damaged), "mean": sum(dist) / len(dist), "values": dist}
    for objective in variant.objectives:
        for kept in variant.kept_steps:
            t = time.perf_counter()
            a = audit(env, world, model, objective, kept, variant)
            seconds["audits"] = round(seconds.get("audits", 0.0) + time.perf_counter() - t, 1)
            order_idx = [world.words.index(w) for w in a["order"]]
            a.update(ranking_figures(a["drift"], conc["drop"], damaged))
            a["recall5_at10"] = recall_at5_in_top10(order_idx, damaged)  # the report's own order
            a["calibrated_figures"] = ranking_figures(a["calibrated"], conc["drop"], damaged)
            a["top10"] = a["order"][:10]
            row["audits"][f"{objective}/{kept}"] = a
            log(f"[audit] {ad.name} {objective} kept {kept}: rho {_f(a['spearman'])}, recall@5 {a['recall5_at10']:.1f}, "
                f"flagged {len(a['significant'])}, {a['seconds']:.1f}s")
    if ad.is_null:
        t = time.perf_counter()
        row["node_defaults_audit"] = a = node_defaults_audit(env, world, model, variant)
        seconds["audits"] = round(seconds.get("audits", 0.0) + time.perf_counter() - t, 1)
        log(f"[audit] {ad.name} at the node's defaults: flagged {a['significant']} (threshold z {a['z_threshold']:.2f}, "
            f"{a['calibration_words']} calibration words), {a['seconds']:.1f}s")
    log(f"[world] {ad.name}: accuracy drop mean {conc['mean_drop']:+.3f}, max {conc['max_drop']:.2f}, "
        f"fallen {conc['fallen']}, FID {change['fid']:+.2f} (2 sd {2 * noise['fid']:.2f}), "
        f"KID {change['kid']:+.2f} (2 sd {2 * noise['kid']:.2f})")
    return row


def summarize(results: dict, variant: Variant) -> dict:
    """Per objective and kept_steps (and the feature column): mean Spearman and recall@5 over the
    non-null adaptations, pooled Spearman (all their concepts together, raw drift and calibrated),
    and the words the null audits flagged."""
    real = [r for r in results["adaptations"] if r["kind"] != "null"]
    nulls = [r for r in results["adaptations"] if r["kind"] == "null"]
    out = {}
    for key in (f"{o}/{k}" for o in variant.objectives for k in variant.kept_steps):
        rows = [r["audits"][key] for r in real if key in r["audits"]]
        drops = [d for r in real for d in r["concepts"]["drop"]]
        out[key] = {
            "mean_spearman": metrics.mean([a["spearman"] for a in rows]),
            "mean_recall5_at10": metrics.mean([a["recall5_at10"] for a in rows]),
            "mean_spearman_calibrated": metrics.mean([a["calibrated_figures"]["spearman"] for a in rows]),
            "pooled_spearman_drift": metrics.spearman([v for a in rows for v in a["drift"]], drops) if rows else None,
            "pooled_spearman_calibrated": metrics.spearman([v for a in rows for v in a["calibrated"]], drops) if rows else None,
            "null_flagged": {r["name"]: r["audits"][key]["significant"] for r in nulls if key in r["audits"]},
            "flagged_real": {r["name"]: len(r["audits"][key]["significant"]) for r in real if key in r["audits"]},
        }
    for name in ("all_seeds", "4_seeds"):
        rows = [r["feature_column"][name] for r in real]
        drops = [d for r in real for d in r["concepts"]["drop"]]
        out[f"feature_column/{name}"] = {
            "mean_spearman": metrics.mean([f["spearman"] for f in rows]),
            "mean_recall5_at10": metrics.mean([f["recall5_at10"] for f in rows]),
            "pooled_spearman_drift": metrics.spearman([v for f in rows for v in f["values"]], drops) if rows else None,
            "null_mean": {r["name"]: r["feature_column"][name]["mean"] for r in nulls},
            "real_mean": {r["name"]: r["feature_column"][name]["mean"] for r in real}}
    out["null_at_node_defaults"] = {r["name"]: r["node_defaults_audit"]["significant"] for r in nulls
                                    if "node_defaults_audit" in r}
    audited = [k for k in out if not k.startswith(("feature_column", "null_at_")) and out[k]["mean_spearman"] is not None]
    out["favoured"] = max(audited, key=lambda k: (out[k]["mean_spearman"], out[k]["mean_recall5_at10"])) if audited else None
    return out


def merge(parts: Sequence[dict], variant: Variant) -> dict:
    """One results dict from runs of the same world on disjoint adaptations, in the variant's order."""
    first = parts[0]
    if any(p["world"]["targets"] != first["world"]["targets"] or p["aggregate_base"] != first["aggregate_base"] for p in parts):
        raise SystemExit("these runs were made in different worlds (targets or base scores differ)")
    rows = {r["name"]: r for p in parts for r in p["adaptations"]}
    order = [a.name for a in variant.adaptations]
    merged = dict(first, adaptations=sorted(rows.values(), key=lambda r: order.index(r["name"]) if r["name"] in order else len(order)),
                  settings=_settings(variant), note=variant.note)
    merged["seconds"] = {k: round(sum(p["seconds"].get(k, 0.0) for p in parts), 1) for k in first["seconds"]}
    merged["seconds"]["merged_from"] = len(parts)
    merged["summary"] = summarize(merged, variant)
    return merged


def _settings(variant: Variant) -> dict:
    d = asdict(variant)
    d["adaptations"] = [asdict(a) for a in variant.adaptations]
    return d


def _write_partial(results: dict, out_dir: Path | None, t_start: float) -> None:
    if out_dir is not None:
        results["seconds"]["total"] = round(time.perf_counter() - t_start, 1)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))


def write(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    (out_dir / "results.md").write_text(markdown(results))


# -- tables ----------------------------------------------------------------------------------------
def _f(v, fmt="{:.2f}", none="–"):
    return none if v is None else fmt.format(v)


def markdown(results: dict) -> str:
    """The tables of a run (results.md)."""
    w, s = results["world"], results["seconds"]
    ab, noise = results["aggregate_base"], results["aggregate_base"]["bootstrap_std"]
    lines = [f"# Image world, variant `{results['variant']}`", "", results["note"], "",
             f"World: {w['concepts']} concepts; classifier held-out accuracy {w['classifier']['heldout_accuracy']:.3f}; "
             f"base accuracy on generated images {w['base_accuracy_mean']:.3f} (seed set A), {w['base_b_accuracy_mean']:.3f} (B); "
             f"erasure target `{w['targets']['erase']}`. Base FID {ab['A']['fid']:.2f} (B {ab['B']['fid']:.2f}, bootstrap sd "
             f"{noise['fid']:.2f}), KID {ab['A']['kid']:.2f} (B {ab['B']['kid']:.2f}, sd {noise['kid']:.2f}). Seed set B against A "
             f"per concept: sd of the change {results['seed_set_noise']['std_drop']:.3f}, "
             f"{results['seed_set_noise']['fallen']} concepts 'fall' by >= {FALL:.0%} from seeds alone.",
             "", "Seconds: " + ", ".join(f"{k} {v}" for k, v in s.items()), "",
             "## Aggregate vs noise, per-concept drops", "",
             "| adaptation | FID Δ (2 sd) | KID Δ (2 sd) | within noise | mean drop | sd drop | max drop | target drop | fallen >=25 (besides target) | >=50 | hidden damage | most damaged |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["adaptations"]:
        c, ch = r["concepts"], r["aggregate_change"]
        lines.append(f"| {r['name']} | {ch['fid']:+.2f} ({2 * noise['fid']:.2f}) | {ch['kid']:+.2f} ({2 * noise['kid']:.2f}) | "
                     f"{'yes' if all(r['aggregate_within_noise'].values()) else 'no'} | {c['mean_drop']:+.3f} | {c['std_drop']:.3f} | "
                     f"{c['max_drop']:.2f} | {_f(r['target_drop'])} | {c['fallen']} ({r['fallen_besides_target']}) | {c['fallen_50']} | "
                     f"{'YES' if r['hidden_damage'] else 'no'} | {', '.join(f'{n} {d:.2f}' for n, d in r['most_damaged'][:4])} |")
    keys = sorted({k for r in results["adaptations"] for k in r["audits"]})
    lines += ["", "## Spearman(drift, accuracy drop) and recall@5 in the report's top 10", "",
              "| adaptation | " + " | ".join(keys) + " | feature column (all seeds) | (4 seeds) |",
              "|---|" + "---|" * (len(keys) + 2)]
    for r in results["adaptations"]:
        cells = ["–" if k not in r["audits"] else f"{_f(r['audits'][k]['spearman'])} / {r['audits'][k]['recall5_at10']:.1f}" + (
            f" ⚑{len(r['audits'][k]['significant'])}" if r["audits"][k]["significant"] else "") for k in keys]
        fc = r["feature_column"]
        cells += [f"{_f(fc[n]['spearman'])} / {fc[n]['recall5_at10']:.1f}" for n in ("all_seeds", "4_seeds")]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    sm = results.get("summary", {})
    lines += ["", "Cells: Spearman / recall@5; ⚑n: words flagged significant.", "",
              "## Per objective and kept_steps (non-null adaptations)", "",
              "| setting | mean ρ | mean recall@5 | mean ρ calibrated | pooled ρ drift | pooled ρ calibrated | null flagged |",
              "|---|---|---|---|---|---|---|"]
    for k, v in sm.items():
        if k in ("favoured", "null_at_node_defaults"):
            continue
        flagged = "–" if "null_flagged" not in v else ", ".join(f"{n}: {len(f)}" for n, f in v["null_flagged"].items())
        lines.append(f"| {k} | {_f(v['mean_spearman'])} | {_f(v['mean_recall5_at10'])} | {_f(v.get('mean_spearman_calibrated'))} | "
                     f"{_f(v['pooled_spearman_drift'])} | {_f(v.get('pooled_spearman_calibrated'))} | {flagged} |")
    lines += ["", f"Favoured (highest mean ρ, then recall@5): `{sm.get('favoured')}`.", ""]
    checks = [(r["name"], r["node_defaults_audit"]) for r in results["adaptations"] if "node_defaults_audit" in r]
    if checks:
        lines += ["Nulls audited with the node's defaults (" + ", ".join(f"{k} {v}" for k, v in checks[0][1]["settings"].items())
                  + "): " + "; ".join(f"{name}: {len(a['significant'])} flagged {a['significant']} (z threshold "
                                      f"{a['z_threshold']:.2f}, top z {max(a['calibrated']):.2f}, "
                                      f"{a['calibration_words']} calibration words)" for name, a in checks), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="full", choices=sorted(VARIANTS))
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/image_world/ (full) or a temporary folder")
    ap.add_argument("--no-cache", action="store_true", help="train the base and the classifier again")
    ap.add_argument("--comfy", default=None)
    ap.add_argument("--render", type=Path, default=None, help="print the tables of an earlier results.json")
    ap.add_argument("--only", default=None, help="comma-separated adaptation names (e.g. lora-120x1e-3): run only these")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="combine results.json files of runs of disjoint --only sets (same world) into --out")
    args = ap.parse_args(argv)
    if args.render:
        print(markdown(json.loads(args.render.read_text())))
        return 0
    variant = VARIANTS[args.variant]
    out = args.out or (DEFAULT_OUT if variant.name == "full" else DEFAULT_OUT / variant.name)
    if args.merge:
        results = merge([json.loads(p.read_text()) for p in args.merge], variant)
        write(results, out)
        print(markdown(results))
        return 0
    if args.only:
        names = args.only.split(",")
        unknown = set(names) - {a.name for a in variant.adaptations}
        if unknown:
            raise SystemExit(f"unknown adaptations {sorted(unknown)}; {variant.name} has {[a.name for a in variant.adaptations]}")
        variant = replace(variant, adaptations=tuple(a for a in variant.adaptations if a.name in names))
    env = environment.load(args.comfy, threads=1)
    results = run_world(env, variant, out, use_cache=not args.no_cache)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
