"""Ground truth: the drift of every candidate word, measured exhaustively and cached.

Every word is measured with DriftMeter.score on many seeds with the full sampling schedule
(every step kept), classifier-free guidance, the same noise for base and adapted: the expensive
version of exactly the quantity an audit estimates. Results are cached per case under
benchmarks/cache/<case>-<hash>.pt, the hash covering these settings and the case's fingerprint
(effective weights of both models and the recipe). The cache holds words, not a candidate set:
a word asked for later (a token some search reported, a larger candidate set) is measured and
added; words already there are never measured again. Partial progress is saved as it goes.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

CACHE_DIR = Path(__file__).resolve().parent / "cache"
CACHE_VERSION = 1


@dataclass(frozen=True)
class TruthSettings:
    seeds: int = 8
    schedule_steps: int = 20  # every step of this schedule is kept
    width: int = 32
    height: int = 32
    cfg: float = 7.5
    objective: str = "attention"
    scheduler: str = "normal"
    template: str = "a photo of a {}"
    # not part of the definition (no effect on the figures, only on speed)
    micro_batch: int = 64
    chunk_words: int = 64  # words per model switch and per cache save

    def seed_list(self) -> list[int]:
        rng = random.Random("driftscope-bench:truth")
        return [rng.randrange(2**31) for _ in range(self.seeds)]

    def definition(self) -> dict:
        d = asdict(self)
        for k in ("micro_batch", "chunk_words"):
            d.pop(k)
        return d


@dataclass
class Truth:
    """Per-seed drift of measured words for one case."""

    case: str
    per_seed: dict[str, list[float]]
    settings: dict
    cost: dict  # {"unet_forward": n, "text_forward": n, "seconds": s, "words": n} summed over all runs
    path: Path | None = None

    def mean(self, word: str) -> float:
        v = self.per_seed[word]
        return sum(v) / len(v)

    def ranking(self, words: Sequence[str]) -> list[str]:
        """`words` sorted by mean truth drift, most drifted first (ties by word)."""
        return sorted(words, key=lambda w: (-self.mean(w), w))

    def half_ranking(self, words: Sequence[str], half: int) -> list[str]:
        """Ranking by the mean over one half of the seeds (0: first half, 1: second half)."""
        def m(w):
            v = self.per_seed[w]
            n = len(v) // 2
            part = v[:n] if half == 0 else v[n:]
            return sum(part) / len(part)
        return sorted(words, key=lambda w: (-m(w), w))


def cache_path(case, settings: TruthSettings, cache_dir: Path = CACHE_DIR) -> Path:
    key = json.dumps({"v": CACHE_VERSION, "truth": settings.definition(), "case": case.fingerprint}, sort_keys=True)
    return Path(cache_dir) / f"{case.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"


def _load(path: Path, case, settings: TruthSettings) -> Truth:
    if path.is_file():
        data = torch.load(path, weights_only=False)
        if data.get("version") == CACHE_VERSION and data.get("fingerprint") == case.fingerprint:
            return Truth(case.name, data["per_seed"], data["settings"], data["cost"], path)
    return Truth(case.name, {}, settings.definition(), {"unet_forward": 0, "text_forward": 0, "seconds": 0.0, "words": 0}, path)


def _save(truth: Truth, case) -> None:
    truth.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = truth.path.with_name(f".{truth.path.name}.{os.getpid()}.tmp")
    torch.save({"version": CACHE_VERSION, "case": case.name, "fingerprint": case.fingerprint, "recipe": case.recipe,
                "settings": truth.settings, "seeds": TruthSettings(**{k: v for k, v in truth.settings.items()}).seed_list(),
                "per_seed": truth.per_seed, "cost": truth.cost}, tmp)
    os.replace(tmp, truth.path)


def measure(env, case, words: Sequence[str], settings: TruthSettings = TruthSettings(),
            cache_dir: Path = CACHE_DIR, log: Callable[[str], None] = print) -> Truth:
    """The truth for `words` of `case`: cached words are read, the others measured and added."""
    core, host = env.core, env.host
    truth = _load(cache_path(case, settings, cache_dir), case, settings)
    missing = [w for w in dict.fromkeys(words) if w not in truth.per_seed]
    if not missing:
        return truth
    log(f"[truth] {case.name}: measuring {len(missing)} words ({len(truth.per_seed)} cached), "
        f"{settings.seeds} seeds x {settings.schedule_steps} steps, cfg {settings.cfg}")
    seeds = settings.seed_list()
    t_start = time.perf_counter()
    with torch.inference_mode():  # as ComfyUI runs nodes
        runtime = host.runtime_for("fp32", settings.micro_batch, False)
        base, adapted = host.model_sides(case.base_model, case.base_clip, case.adapted_model, case.adapted_clip,
                                         runtime, need_grad=False)
        tokenize, _, _ = host.tokenizer_functions(case.base_clip)
        templates = [core.prompts.tokenize_template(settings.template, tokenize, base.layout)]
        schedule = host.schedule_of(case.base_model, settings.scheduler, settings.schedule_steps)
        channels = case.base_model.model.latent_format.latent_channels
        sampling = core.meter.SamplingSettings(
            latent_shape=(channels, settings.height // 8, settings.width // 8), kept_steps=settings.schedule_steps,
            cfg=settings.cfg, objective=settings.objective, group_size=settings.chunk_words * len(seeds))
        for start in range(0, len(missing), settings.chunk_words):
            chunk = missing[start : start + settings.chunk_words]
            t = time.perf_counter()
            before = base.counts.unet_forward + adapted.counts.unet_forward, base.counts.text_forward + adapted.counts.text_forward
            vocab = core.vocabulary.from_words(chunk, tokenize, name="truth")
            meter = core.meter.DriftMeter(base, adapted, vocab, templates, schedule, sampling, runtime)
            drifts = meter.score(list(range(len(chunk))), seeds)  # (n, seeds)
            for w, row in zip(chunk, drifts.tolist()):
                truth.per_seed[w] = row
            truth.cost["unet_forward"] += base.counts.unet_forward + adapted.counts.unet_forward - before[0]
            truth.cost["text_forward"] += base.counts.text_forward + adapted.counts.text_forward - before[1]
            truth.cost["seconds"] += time.perf_counter() - t
            truth.cost["words"] += len(chunk)
            _save(truth, case)
            done = min(start + len(chunk), len(missing))
            elapsed = time.perf_counter() - t_start
            log(f"[truth] {case.name}: {done}/{len(missing)} words, {elapsed:.0f}s, "
                f"eta {elapsed / done * (len(missing) - done):.0f}s")
    return truth


def main(argv=None) -> int:
    """Fill the truth cache of a benchmark variant's cases ahead of `run.py` (e.g. in another process)."""
    import argparse

    import cases as case_lib
    import environment
    import run

    ap = argparse.ArgumentParser(description="Measure and cache the ground truth of benchmark cases.")
    ap.add_argument("--variant", default="full", choices=sorted(run.VARIANTS))
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: every case of the variant)")
    ap.add_argument("--cache", type=Path, default=CACHE_DIR)
    ap.add_argument("--comfy", default=None)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    variant = run.VARIANTS[a.variant]
    specs = [s for s in variant.specs if a.cases is None or s.name in a.cases.split(",")]
    env = environment.load(a.comfy, threads=a.threads)
    builder = case_lib.CaseBuilder(env, variant.candidates, resolution=variant.truth.width)
    for spec in specs:
        if spec.is_null:
            continue  # null cases: no truth, or (identical) only for the words an audit reports
        case = builder.build(spec)
        truth = measure(env, case, case.words, variant.truth, a.cache)
        print(f"[truth] {case.name}: {len(truth.per_seed)} words cached in {truth.path.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
