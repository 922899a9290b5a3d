"""Ground truth: the drift of every candidate word, measured exhaustively and cached.

Every word is measured with DriftMeter.score on many seeds with the full sampling schedule
(every step kept), classifier-free guidance, the same noise for base and adapted: the expensive
version of exactly the quantity an audit estimates. The words at the top of the ranking, where
recall@10 and @20 are decided and neighbours differ by a few percent, are then measured on more
seeds (refinement): with 8 seeds the SD2.x planted truth's 10th and 11th words were 1% apart
and its top 10 agreed with itself at 0.80 between seed halves. Results are cached per case under
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
    seeds: int = 8  # every word
    refine_top: int = 40  # the top words of the ranking ...
    refine_seeds: int = 32  # ... are measured on this many seeds (the first `seeds` included)
    schedule_steps: int = 20  # every step of this schedule is kept
    width: int = 32
    height: int = 32
    cfg: float = 7.5
    objective: str = "attention"
    scheduler: str = "normal"
    template: str = "a photo of a {}"
    guidance: float | None = None  # a guidance-distilled model's input (Flux dev: 3.5); None: none
    # not part of the definition (no effect on the figures, only on speed)
    micro_batch: int = 64
    chunk_words: int = 64  # words per model switch and per cache save

    def seed_list(self, n: int | None = None) -> list[int]:
        """The first n truth seeds (default `seeds`); a longer list extends a shorter one."""
        rng = random.Random("driftscope-bench:truth")
        return [rng.randrange(2**31) for _ in range(self.seeds if n is None else n)]

    def definition(self) -> dict:
        """What the cached figures depend on. Refinement only adds seeds to some words (seed i is
        the same seed whatever the count), so it stays out of the cache key."""
        d = asdict(self)
        for k in ("micro_batch", "chunk_words", "refine_top", "refine_seeds"):
            d.pop(k)
        if d["guidance"] is None:  # families without guidance keep the keys they had before it existed
            d.pop("guidance")
        return d


@dataclass
class Truth:
    """Per-seed drift of measured words for one case."""

    case: str
    per_seed: dict[str, list[float]]
    settings: dict
    cost: dict  # {"unet_forward": n, "text_forward": n, "seconds": s, "words": n} summed over all runs
    path: Path | None = None

    def seed_count(self, word: str) -> int:
        return len(self.per_seed[word])

    def mean(self, word: str) -> float:
        v = self.per_seed[word]
        return sum(v) / len(v)

    def ranking(self, words: Sequence[str]) -> list[str]:
        """`words` sorted by mean truth drift, most drifted first (ties by word)."""
        return sorted(words, key=lambda w: (-self.mean(w), w))

    def _ranking_by(self, words: Sequence[str], part: Callable[[list[float]], list[float]]) -> list[str]:
        """`words` sorted by the mean over `part` of each word's per-seed drifts, most drifted first."""
        def m(w):
            v = part(self.per_seed[w])
            return sum(v) / len(v)
        return sorted(words, key=lambda w: (-m(w), w))

    def half_ranking(self, words: Sequence[str], half: int) -> list[str]:
        """Ranking by the mean over one half of each word's seeds (0: first half, 1: second half)."""
        return self._ranking_by(words, lambda v: v[: len(v) // 2] if half == 0 else v[len(v) // 2 :])

    def seed_group_rankings(self, words: Sequence[str], k: int, skip: int) -> list[list[str]]:
        """Rankings of the words measured on the most seeds (the refined top), each by the mean
        over one group of `k` of their seeds, past the first `skip` (the seeds that chose them for
        refinement, whose luck would favour them). How well these rankings agree is how well a
        measurement on k seeds per word can agree with itself, even without having to find the
        words among all candidates."""
        most = max(self.seed_count(w) for w in words)
        pool = [w for w in words if self.seed_count(w) == most]
        starts = range(skip, most - k + 1, k)
        return [self._ranking_by(pool, lambda v, lo=lo: v[lo : lo + k]) for lo in starts]


def cache_path(case, settings: TruthSettings, cache_dir: Path = CACHE_DIR) -> Path:
    key = json.dumps({"v": CACHE_VERSION, "truth": settings.definition(), "case": case.fingerprint}, sort_keys=True)
    return Path(cache_dir) / f"{case.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"


def _read(path: Path) -> dict | None:
    """A cache file's contents: JSON, or a cache of an earlier release written with torch.save
    under the same key (read with weights_only=True: plain data, no pickled objects)."""
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    legacy = path.with_suffix(".pt")
    if legacy.is_file():
        return torch.load(legacy, weights_only=True)
    return None


def _load(path: Path, case, settings: TruthSettings) -> Truth:
    data = _read(path)
    if data is not None and data.get("version") == CACHE_VERSION and data.get("fingerprint") == case.fingerprint:
        return Truth(case.name, data["per_seed"], data["settings"], data["cost"], path)
    return Truth(case.name, {}, settings.definition(), {"unet_forward": 0, "text_forward": 0, "seconds": 0.0, "words": 0}, path)


def check_sampling(family, model, settings: TruthSettings) -> None:
    """The truth samples as the pack samples the family by default (FamilyAdapter.sampling_defaults:
    Flux dev CFG 1 and guidance 3.5; None: the CFG is the settings' own, no guidance), or it
    would measure another quantity than the audits."""
    defaults = family.sampling_defaults(model)
    if defaults["cfg"] is not None and settings.cfg != defaults["cfg"]:
        raise ValueError(f"truth settings: cfg {settings.cfg}, but the pack samples {family.name} at cfg {defaults['cfg']}")
    if settings.guidance != defaults["guidance"]:
        raise ValueError(f"truth settings: guidance {settings.guidance}, but the pack gives {family.name} "
                         f"guidance {defaults['guidance']}")


def _save(truth: Truth, case) -> None:
    truth.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = truth.path.with_name(f".{truth.path.name}.{os.getpid()}.tmp")
    longest = max((len(v) for v in truth.per_seed.values()), default=0)
    data = {"version": CACHE_VERSION, "case": case.name, "fingerprint": case.fingerprint, "recipe": case.recipe,
            "settings": truth.settings, "seeds": TruthSettings(**truth.settings).seed_list(longest),
            "per_seed": truth.per_seed, "cost": truth.cost}
    tmp.write_text(json.dumps(data), encoding="utf-8")  # floats round-trip exactly
    os.replace(tmp, truth.path)


class _Measurer:
    """The truth's DriftMeter set-up for one case; measures words on given seeds into a Truth."""

    def __init__(self, env, case, settings: TruthSettings, truth: Truth, log):
        core, host = env.core, env.host
        self.core, self.case, self.settings, self.truth, self.log = core, case, settings, truth, log
        self.runtime = host.runtime_for("fp32", settings.micro_batch, False)
        family = host.check_pair(case.base_model, case.adapted_model, case.base_clip, case.adapted_clip)
        check_sampling(family, case.base_model, settings)
        self.family, self.node = family, env.pack.nodes.audit
        self.base, self.adapted = host.model_sides(family, case.base_model, case.base_clip, case.adapted_model,
                                                   case.adapted_clip, self.runtime, need_grad=False,
                                                   guidance=settings.guidance)
        self.tokenize, _, _ = host.tokenizer_functions(case.base_clip, family)
        self.schedule = host.schedule_of(case.base_model, settings.scheduler, settings.schedule_steps)
        channels = case.base_model.model.latent_format.latent_channels
        self.latent_shape = (channels, settings.height // 8, settings.width // 8)

    def prompts(self, words: Sequence[str]):
        """(vocabulary, templates) of `words` as the Audit node builds them: ids in every
        tokenizer of the family (Flux: CLIP-L's and T5's), the template tokenized by each."""
        clip = self.case.base_clip
        vocab = self.core.vocabulary.from_words(words, self.tokenize, name="truth")
        vocab = self.node.family_vocabulary(vocab, clip, self.family)
        if [c.text for c in vocab.candidates] != list(words):
            raise ValueError(f"{self.case.name}: the family's tokenizers drop some of {list(words)}")
        return vocab, self.node.family_templates([self.settings.template], clip, self.family, self.base.text, vocab)

    def _counts(self) -> tuple[int, int]:
        return (self.base.counts.unet_forward + self.adapted.counts.unet_forward,
                self.base.counts.text_forward + self.adapted.counts.text_forward)

    def extend(self, words: Sequence[str], seeds: Sequence[int], what: str) -> None:
        """Measure `words` on `seeds` and append the values to their per-seed lists, in chunks
        (each saved to the cache as it finishes)."""
        st, truth = self.settings, self.truth
        sampling = self.core.meter.SamplingSettings(
            latent_shape=self.latent_shape, kept_steps=st.schedule_steps, cfg=st.cfg, objective=st.objective,
            group_size=st.chunk_words * len(seeds))
        t_start = time.perf_counter()
        for start in range(0, len(words), st.chunk_words):
            chunk = list(words[start : start + st.chunk_words])
            t, before = time.perf_counter(), self._counts()
            vocab, templates = self.prompts(chunk)
            meter = self.core.meter.DriftMeter(self.base, self.adapted, vocab, templates, self.schedule, sampling,
                                               self.runtime)
            drifts = meter.score(list(range(len(chunk))), list(seeds))  # (n, seeds)
            for w, row in zip(chunk, drifts.tolist()):
                truth.per_seed[w] = truth.per_seed.get(w, []) + row
            after = self._counts()
            truth.cost["unet_forward"] += after[0] - before[0]
            truth.cost["text_forward"] += after[1] - before[1]
            truth.cost["seconds"] += time.perf_counter() - t
            truth.cost["words"] += len(chunk)
            _save(truth, self.case)
            done, elapsed = min(start + len(chunk), len(words)), time.perf_counter() - t_start
            self.log(f"[truth] {self.case.name}: {what} {done}/{len(words)} words, {elapsed:.0f}s, "
                     f"eta {elapsed / done * (len(words) - done):.0f}s")


def _unrefined(truth: Truth, words: Sequence[str], settings: TruthSettings) -> list[str]:
    """The top `refine_top` words of the ranking that have fewer than `refine_seeds` seeds."""
    return [w for w in truth.ranking(words)[: settings.refine_top] if truth.seed_count(w) < settings.refine_seeds]


def measure(env, case, words: Sequence[str], settings: TruthSettings = TruthSettings(),
            cache_dir: Path = CACHE_DIR, log: Callable[[str], None] = print, refine: bool = True) -> Truth:
    """The truth for `words` of `case`: cached words are read, the others measured and added on
    `settings.seeds` seeds. With `refine`, the ranking's top `refine_top` words are then measured
    on seeds up to `refine_seeds`, until the top holds only such words (a word that climbs into
    it on its extra seeds pulls in the next one)."""
    words = list(dict.fromkeys(words))
    truth = _load(cache_path(case, settings, cache_dir), case, settings)
    missing = [w for w in words if w not in truth.per_seed]
    if not missing and not (refine and _unrefined(truth, words, settings)):
        return truth
    with torch.inference_mode():  # as ComfyUI runs nodes
        measurer = _Measurer(env, case, settings, truth, log)
        if missing:
            log(f"[truth] {case.name}: measuring {len(missing)} words ({len(truth.per_seed)} cached), "
                f"{settings.seeds} seeds x {settings.schedule_steps} steps, cfg {settings.cfg}"
                + ("" if settings.guidance is None else f", guidance {settings.guidance}") + f", {settings.scheduler}")
            measurer.extend(missing, settings.seed_list(), "measured")
        all_seeds = settings.seed_list(settings.refine_seeds)
        while refine and (short := _unrefined(truth, words, settings)):
            by_count: dict[int, list[str]] = {}
            for w in short:  # an interrupted refinement can leave words at different counts
                by_count.setdefault(truth.seed_count(w), []).append(w)
            for count, group in sorted(by_count.items()):
                measurer.extend(group, all_seeds[count:], f"refined to {settings.refine_seeds} seeds:")
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
    ap.add_argument("--candidates", type=int, default=None, help="random candidates per case instead of the "
                                                                   "variant's (as run.py --candidates)")
    a = ap.parse_args(argv)
    variant = run.VARIANTS[a.variant]
    if a.candidates is not None:
        variant = run.with_candidates(variant, a.candidates)
    specs = [s for s in variant.specs if a.cases is None or s.name in a.cases.split(",")]
    env = environment.load(a.comfy, threads=a.threads)
    builder = case_lib.CaseBuilder(env, variant.candidates, resolution=variant.truth.width)
    for spec in specs:
        if spec.is_null:
            continue  # null cases: no truth, or (identical) only for the words an audit reports
        case = builder.build(spec)
        truth = measure(env, case, case.words, run.truth_settings(variant, spec.family), a.cache)
        t = run.truth_summary(case, truth, case.words)
        print(f"[truth] {case.name}: {len(truth.per_seed)} words cached in {truth.path.name}; "
              f"top 5 {[r['token'] for r in t['top20'][:5]]}, targets' ranks {t['targets_rank']}, "
              f"self-agreement @10 {t['self_agreement_at_10']}, @10 by seeds per word {t['agreement_at_10_by_seeds']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
