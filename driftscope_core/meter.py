"""Measuring the drift of candidate words: many at once without gradients (scan, re-scoring,
calibration) or one soft choice with gradients (soft-prompt search).

Both sides see the same template, the same noise and the same guidance (method step 3); the
base branch never records gradients. Work is grouped per model so that a host that shares one
network between base and adapted (a LoRA) switches weights as rarely as possible. Inside a
group, words go through the text encoder `runtime.text_batch` prompts at a time and latents
through the UNet `runtime.micro_batch` at a time, and progress is reported after each call, so a
progress function that raises (a cancel) stops the work within one call whatever the list's size.
Neither split changes a number: each prompt and latent is computed on its own row.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Callable

import torch

from .conditioning import Conditioning, Prompt
from .models import ModelSide, Runtime
from .objective import Trajectory, drift_per_sample, run_trajectory
from .prompts import PromptBuilder, Template
from .sampling import Schedule, make_noise
from .soft_prompt import candidate_embeddings, slot_rows
from .vocabulary import Vocabulary

Progress = Callable[..., None]  # progress(done, total, note=""): may raise to cancel
Beat = Callable[[int], None]  # beat(items done so far) after every model call


@dataclass(frozen=True)
class SamplingSettings:
    """The truncated guided denoising of method step 3."""

    latent_shape: tuple[int, int, int]  # (C, h, w)
    kept_steps: int = 4
    cfg: float = 7.5
    objective: str = "attention"
    group_size: int = 256  # latents per model switch in batched scoring
    cache_size: int = 1024  # word conditionings kept per side and template (re-scoring reuses them)


class _SideState:
    """Per-side text state: prompt builders per template and text encoder, candidate rows per
    text encoder, the empty prompt, and a cache of word conditionings."""

    def __init__(self, side: ModelSide, vocab: Vocabulary, templates: list[Template]):
        self.side, self.vocab = side, vocab
        self.builders = [{name: PromptBuilder(t.for_encoder(name), lay) for name, lay in side.text.layouts.items()}
                         for t in templates]
        self.uncond = side.empty_prompt()  # 1 prompt
        self.cache: dict[tuple[int, int], Conditioning] = {}  # (template, word) -> 1 prompt

    @classmethod
    def reading(cls, side: ModelSide, other: "_SideState") -> "_SideState":
        """The state of a side with `other`'s text encoder (the placebo: the base's text, another
        denoiser): its builders, empty prompt and cache, so nothing is encoded twice."""
        st = cls.__new__(cls)
        st.__dict__.update(other.__dict__)
        st.side = side
        return st

    def prompt(self, t_idx: int, slots: dict[str, object] | None = None, word: int | None = None) -> Prompt:
        """Template `t_idx` for every text encoder, its slot filled with the word's token ids
        (`word`) or with rows per encoder (`slots`, the soft prompt)."""
        if word is not None:
            cand = self.vocab[word]
            return {name: b.prompt(cand.ids(name)) for name, b in self.builders[t_idx].items()}
        return {name: b.prompt(slots[name]) for name, b in self.builders[t_idx].items()}

    @cached_property
    def candidates(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per text encoder, padded candidate rows (C, L, D) and lengths (C,), for the soft
        prompt only: built on first use, since a long list's rows take time and memory that
        scoring never needs."""
        return {name: candidate_embeddings(self.vocab, self.side.text.token_embedding(name), name)
                for name in self.side.text.layouts}

    def slot_rows(self, one_hot: torch.Tensor) -> dict[str, torch.Tensor]:
        """The soft choice's slot rows (k, D) per text encoder."""
        return {name: slot_rows(one_hot, *cands) for name, cands in self.candidates.items()}


class _Pulse:
    """Progress of one score() call in model evaluations (text-encoder passes and UNet
    evaluations of both sides, as EvaluationCounts counts them), reported with a note such as
    "encoding 512/20,000 words" after every model call."""

    def __init__(self, progress: Progress | None, sides: tuple[ModelSide, ...], total: int, words: int, templates: int):
        self.progress, self.sides, self.total = progress, sides, total
        self.words, self.templates = words, templates
        self.start = self._spent()

    def _spent(self) -> int:
        return sum(s.counts.forward for s in self.sides)

    def beat(self, what: str, words_done: int, t_idx: int = 0) -> None:
        if self.progress is None:
            return
        done = min(self._spent() - self.start, self.total)
        where = f" (template {t_idx + 1}/{self.templates})" if self.templates > 1 else ""
        self.progress(done, self.total, f"{what} {words_done:,}/{self.words:,} words{where}")


def _in_chunks(n: int, size: int, run: Callable[[slice], object], beat: Beat | None) -> list:
    """`run` on consecutive slices of at most `size` of n rows; `beat(rows done)` after each."""
    parts = []
    for i in range(0, n, size):
        parts.append(run(slice(i, i + size)))
        if beat is not None:
            beat(min(i + size, n))
    return parts


class DriftMeter:
    def __init__(
        self,
        base: ModelSide,
        adapted: ModelSide,
        vocab: Vocabulary,
        templates: list[Template],
        schedule: Schedule,
        sampling: SamplingSettings,
        runtime: Runtime,
        placebo: ModelSide | None = None,
    ):
        self.vocab, self.templates, self.sampling, self.runtime = vocab, templates, sampling, runtime
        self.schedule = schedule
        self.sigmas = schedule.truncated(sampling.kept_steps).to(runtime.device)
        self.initial_scale = schedule.initial_scale
        self.sides = {s.name: _SideState(s, vocab, templates) for s in (base, adapted)}
        self.base, self.adapted = self.sides[base.name], self.sides[adapted.name]
        if placebo is not None:  # calibration.py's placebo reference: the base's text, a randomly changed denoiser
            if placebo.text is not base.text:
                raise ValueError("the placebo side must read the base side's text encoder")
            self.sides[placebo.name] = _SideState.reading(placebo, self.base)

    def variant(self, **changes) -> "DriftMeter":
        """The same meter (same models, caches and counters) with other sampling settings,
        e.g. a cheaper screen: `meter.variant(kept_steps=1, cfg=1.0)`."""
        other = copy.copy(self)
        other.sampling = replace(self.sampling, **changes)
        other.sigmas = self.schedule.truncated(other.sampling.kept_steps).to(self.runtime.device)
        return other

    # -- shared pieces -------------------------------------------------------------------------
    def _trajectory(self, st: _SideState, noise, cond: Conditioning) -> Trajectory:
        s = self.sampling
        return run_trajectory(st.side, self.sigmas, self.initial_scale, noise, cond, st.uncond, s.cfg, s.objective, self.runtime)

    def _trajectories(self, st: _SideState, noise, cond: Conditioning, beat: Beat | None = None) -> Trajectory:
        """Trajectories for many latents, micro-batched; `beat(latents done)` after each call."""
        def run(sl: slice) -> Trajectory:
            return self._trajectory(st, noise[sl], cond.rows(sl))

        return Trajectory.cat(_in_chunks(noise.shape[0], self.runtime.micro_batch, run, beat))

    def _encode_chunked(self, side: ModelSide, prompts: list[Prompt], beat: Beat | None = None) -> Conditioning:
        """Conditioning of m prompts, `runtime.text_batch` prompts per text-side call;
        `beat(prompts done)` after each call."""
        def run(sl: slice) -> Conditioning:
            return side.encode(prompts[sl])  # m' prompts

        return Conditioning.cat(_in_chunks(len(prompts), self.runtime.text_batch, run, beat))

    def _word_prompts(self, st: _SideState, t_idx: int, indices: list[int], beat: Beat | None = None) -> Conditioning:
        """Conditioning of candidate words (n prompts, exact ids); words encoded before with this
        template come from the cache. `beat(words encoded)`."""
        missing = [i for i in indices if (t_idx, i) not in st.cache]
        fresh = {}
        if missing:
            conds = self._encode_chunked(st.side, [st.prompt(t_idx, word=i) for i in missing], beat)  # m prompts
            fresh = {(t_idx, i): conds.rows(slice(j, j + 1)) for j, i in enumerate(missing)}
        rows = [fresh[(t_idx, i)] if (t_idx, i) in fresh else st.cache[(t_idx, i)] for i in indices]
        room = self.sampling.cache_size * len(self.templates) - len(st.cache)
        st.cache.update(list(fresh.items())[: max(room, 0)])
        return Conditioning.cat(rows)

    # -- batched scoring -----------------------------------------------------------------------
    @property
    def shared_text(self) -> bool:
        """One text encoder for both sides (e.g. a UNet-only LoRA): words are encoded once."""
        return self.base.side.text is self.adapted.side.text

    def _others(self, against: tuple[str, ...]) -> list[_SideState]:
        return [self.sides[name] for name in against]

    def planned_evaluations(self, indices: list[int], n_seeds: int, against: tuple[str, ...] = ("adapted",)) -> int:
        """Model evaluations (forward, every side involved) that score_against(indices, n_seeds
        seeds, against) will run: the prompts not cached yet on each text encoder, and every
        latent's kept steps on the base and on each side in `against`."""
        sides = [self.base, *self._others(against)]
        encoding = list({id(st.side.text): st for st in sides}.values())  # one state per text encoder
        prompts = sum((t, i) not in st.cache for st in encoding for t in range(len(self.templates)) for i in indices)
        per_latent = (len(self.sigmas) - 1) * (1 if self.sampling.cfg == 1.0 else 2)
        return prompts + len(sides) * len(indices) * n_seeds * len(self.templates) * per_latent

    @torch.no_grad()
    def score(self, indices: list[int], seeds: list[int], progress: Progress | None = None) -> torch.Tensor:
        """Drift (n, N) of candidates `indices` on the noise of `seeds`, averaged over templates.
        `progress(done, total, note)` counts model evaluations; it is called once at the start
        and after every model call, and may raise to cancel."""
        return self.score_against(indices, seeds, ("adapted",), progress)[0]

    @torch.no_grad()
    def score_against(self, indices: list[int], seeds: list[int], against: tuple[str, ...],
                      progress: Progress | None = None) -> torch.Tensor:
        """Drift (S, n, N) from the base to each side named in `against` (e.g. ("adapted",
        "placebo")), the base's trajectories computed once for all of them; as score()."""
        n_seeds = len(seeds)
        noise = make_noise(seeds, self.sampling.latent_shape)  # (N, C, h, w)
        per_group = max(1, self.sampling.group_size // n_seeds)
        groups = [bucket[i : i + per_group] for bucket in self._same_length(indices)
                  for i in range(0, len(bucket), per_group)]  # positions into `indices`
        others = self._others(against)
        pulse = _Pulse(progress, tuple(st.side for st in (self.base, *others)),
                       self.planned_evaluations(indices, n_seeds, against), len(indices), len(self.templates))
        pulse.beat("starting on", 0)
        out = torch.zeros(len(others), len(indices), n_seeds)
        for t_idx, _ in enumerate(self.templates):
            done = 0
            for group in groups:
                words = [indices[p] for p in group]
                out[:, group] += self._score_group(t_idx, words, noise, pulse, done, others).cpu()
                done += len(group)
        return out / len(self.templates)

    def _same_length(self, indices: list[int]) -> list[list[int]]:
        """Positions into `indices`, in buckets whose prompts have one length in every text
        encoder, so a batch of them is one context tensor: one bucket when every encoder pads
        its prompts to a fixed length; by the word's token count where one does not (Chroma's
        T5). Order is kept inside a bucket; no number depends on the bucketing."""
        unpadded = [name for name, lay in self.base.side.text.layouts.items() if not lay.padded]
        if not unpadded:
            return [list(range(len(indices)))]
        buckets: dict[tuple[int, ...], list[int]] = {}
        for p, i in enumerate(indices):
            buckets.setdefault(tuple(len(self.vocab[i].ids(n)) for n in unpadded), []).append(p)
        return list(buckets.values())

    def _score_group(self, t_idx: int, group: list[int], noise: torch.Tensor, pulse: _Pulse, row: int,
                     others: list[_SideState]) -> torch.Tensor:
        """Drift (S, n, N) of one group of words from the base to each of `others`; `row` words
        of this template came before it."""
        n, n_seeds = len(group), noise.shape[0]
        noise_rep = noise.repeat(n, 1, 1, 1)  # (n*N, C, h, w): word-major, seed-minor

        def encoded(k: int) -> None:  # k prompts of the group encoded
            pulse.beat("encoding", row + k, t_idx)

        trajectories, conds = [], {}
        for st in (self.base, *others):
            key = id(st.side.text)
            if key not in conds:  # one text encoder shared by sides (a UNet-only LoRA, the placebo): encode once
                conds[key] = self._word_prompts(st, t_idx, group, encoded).repeat_interleave(n_seeds)  # n*N prompts

            def measured(k: int, name: str = st.side.name) -> None:  # k latents of the group denoised
                pulse.beat(f"{name} model on", row + k // n_seeds, t_idx)

            trajectories.append(self._trajectories(st, noise_rep, conds[key], measured))
        base, *rest = trajectories
        d = torch.stack([drift_per_sample(base, t, self.sampling.objective) for t in rest])  # (S, n*N)
        return d.view(len(rest), n, n_seeds)  # (S, n, N)

    # -- soft-prompt gradient ------------------------------------------------------------------
    def soft_backward(self, one_hot: torch.Tensor, seeds: list[int], sign: float, beat: Callable[[], None] | None = None) -> torch.Tensor:
        """Method steps 2-5 for one optimization step: the drift (N,) of the word chosen by
        `one_hot` (C,), and `sign * mean drift` back-propagated into `one_hot`'s graph.
        The base branch runs without gradients; the adapted branch is micro-batched, its
        conditioning graph is back-propagated once. `beat()` after every model call (it may
        raise to cancel; the graph is then dropped)."""
        tick = None if beat is None else (lambda _: beat())
        noise = make_noise(seeds, self.sampling.latent_shape)  # (N, C, h, w)
        n_seeds, n_tpl = noise.shape[0], len(self.templates)
        weight = sign / (n_seeds * n_tpl)
        drifts = torch.zeros(n_seeds)
        for t_idx in range(n_tpl):
            with torch.no_grad():
                st = self.base
                prompt = st.prompt(t_idx, st.slot_rows(one_hot.detach()))  # slot rows (k, D) per encoder
                cond_b = st.side.encode([prompt]).expand(n_seeds)  # N prompts
                base_traj = self._trajectories(st, noise, cond_b, tick)
            st = self.adapted
            cond_a = st.side.encode([st.prompt(t_idx, st.slot_rows(one_hot))])  # 1 prompt, graph to one_hot
            leaf = cond_a.detached_leaf()
            inputs = leaf.differentiable()
            grads = [torch.zeros_like(t) for t in inputs]
            mb = self.runtime.micro_batch
            for i in range(0, n_seeds, mb):
                sl = slice(i, i + mb)
                n = noise[sl].shape[0]
                traj = self._trajectory(st, noise[sl], leaf.expand(n))
                d = drift_per_sample(base_traj.rows(sl), traj, self.sampling.objective)  # (n,)
                # the gradient of the conditioning only: the model's weights may require grad
                # (a model a training node made) and must not collect a .grad
                step = torch.autograd.grad(d.sum() * weight, inputs, allow_unused=True)
                grads = [g if s is None else g + s for g, s in zip(grads, step)]
                drifts[sl] += d.detach().cpu()
                if beat is not None:
                    beat()
            outputs = [(t, g) for t, g in zip(cond_a.differentiable(), grads) if t.requires_grad]
            torch.autograd.backward([t for t, _ in outputs], [g for _, g in outputs])
            st.side.count_backward()
        return drifts / n_tpl
