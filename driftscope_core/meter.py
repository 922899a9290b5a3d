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
    """Per-side text state: prompt builders per template, candidate rows, empty prompt."""

    def __init__(self, side: ModelSide, vocab: Vocabulary, templates: list[Template], runtime: Runtime):
        emb = side.text_encoder.token_embedding.float()  # (V, D)
        self.side, self.vocab, self.emb = side, vocab, emb
        self.builders = [PromptBuilder(t, side.layout, emb) for t in templates]
        self.uncond = side.empty_prompt(runtime)  # (1, T, D)
        self.cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (template, word) -> (cond, mask)

    @cached_property
    def candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded candidate rows (C, L, D) and lengths (C,), for the soft prompt only: built on
        first use, since a long list's rows take time and memory that scoring never needs."""
        return candidate_embeddings(self.vocab, self.emb)


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
    ):
        self.vocab, self.templates, self.sampling, self.runtime = vocab, templates, sampling, runtime
        self.schedule = schedule
        self.sigmas = schedule.truncated(sampling.kept_steps).to(runtime.device)
        self.initial_scale = schedule.initial_scale
        self.sides = {s.name: _SideState(s, vocab, templates, runtime) for s in (base, adapted)}
        self.base, self.adapted = self.sides[base.name], self.sides[adapted.name]

    def variant(self, **changes) -> "DriftMeter":
        """The same meter (same models, caches and counters) with other sampling settings,
        e.g. a cheaper screen: `meter.variant(kept_steps=1, cfg=1.0)`."""
        other = copy.copy(self)
        other.sampling = replace(self.sampling, **changes)
        other.sigmas = self.schedule.truncated(other.sampling.kept_steps).to(self.runtime.device)
        return other

    # -- shared pieces -------------------------------------------------------------------------
    def _trajectory(self, st: _SideState, noise, cond, mask) -> Trajectory:
        s = self.sampling
        return run_trajectory(st.side, self.sigmas, self.initial_scale, noise, cond, st.uncond, s.cfg, mask, s.objective, self.runtime)

    def _trajectories(self, st: _SideState, noise, cond, mask, beat: Beat | None = None) -> Trajectory:
        """Trajectories for many latents, micro-batched; `beat(latents done)` after each call."""
        def run(sl: slice) -> Trajectory:
            return self._trajectory(st, noise[sl], cond[sl], mask[sl])

        return Trajectory.cat(_in_chunks(noise.shape[0], self.runtime.micro_batch, run, beat))

    def _encode_chunked(self, side: ModelSide, embeds: torch.Tensor, beat: Beat | None = None) -> torch.Tensor:
        """Conditioning (m, T, D) of input embeddings (m, T, D), `runtime.text_batch` prompts per
        encoder call; `beat(prompts done)` after each call."""
        def run(sl: slice) -> torch.Tensor:
            return side.encode(embeds[sl], self.runtime)  # (m', T, D)

        return torch.cat(_in_chunks(embeds.shape[0], self.runtime.text_batch, run, beat))

    def _word_prompts(self, st: _SideState, t_idx: int, indices: list[int], beat: Beat | None = None):
        """Conditioning (n, T, D) and slot masks (n, T) for candidate words, exact ids; words
        encoded before with this template come from the cache. `beat(words encoded)`."""
        missing = [i for i in indices if (t_idx, i) not in st.cache]
        if missing:
            builder = st.builders[t_idx]
            pairs = [builder.embed_ids(self.vocab[i].token_ids) for i in missing]
            embeds = torch.stack([p[0] for p in pairs])  # (m, T, D)
            conds = self._encode_chunked(st.side, embeds, beat)  # (m, T, D)
            fresh = {(t_idx, i): (conds[j], pairs[j][1]) for j, i in enumerate(missing)}
        else:
            fresh = {}
        rows = [fresh.get((t_idx, i)) or st.cache[(t_idx, i)] for i in indices]
        room = self.sampling.cache_size * len(self.templates) - len(st.cache)
        st.cache.update(list(fresh.items())[: max(room, 0)])
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    # -- batched scoring -----------------------------------------------------------------------
    @property
    def shared_text(self) -> bool:
        """One text encoder for both sides (e.g. a UNet-only LoRA): words are encoded once."""
        return self.base.side.text_encoder is self.adapted.side.text_encoder

    def planned_evaluations(self, indices: list[int], n_seeds: int) -> int:
        """Model evaluations (both sides, forward) that score(indices, n_seeds seeds) will run:
        the prompts not cached yet on each side that encodes, and every latent's kept steps."""
        encoding = (self.base,) if self.shared_text else (self.base, self.adapted)
        prompts = sum((t, i) not in st.cache for st in encoding for t in range(len(self.templates)) for i in indices)
        per_latent = (len(self.sigmas) - 1) * (1 if self.sampling.cfg == 1.0 else 2)
        return prompts + 2 * len(indices) * n_seeds * len(self.templates) * per_latent

    @torch.no_grad()
    def score(self, indices: list[int], seeds: list[int], progress: Progress | None = None) -> torch.Tensor:
        """Drift (n, N) of candidates `indices` on the noise of `seeds`, averaged over templates.
        `progress(done, total, note)` counts model evaluations; it is called once at the start
        and after every model call, and may raise to cancel."""
        n_seeds = len(seeds)
        noise = make_noise(seeds, self.sampling.latent_shape)  # (N, C, h, w)
        per_group = max(1, self.sampling.group_size // n_seeds)
        groups = [indices[i : i + per_group] for i in range(0, len(indices), per_group)]
        pulse = _Pulse(progress, (self.base.side, self.adapted.side), self.planned_evaluations(indices, n_seeds),
                       len(indices), len(self.templates))
        pulse.beat("starting on", 0)
        out = torch.zeros(len(indices), n_seeds)
        for t_idx, _ in enumerate(self.templates):
            row = 0
            for group in groups:
                out[row : row + len(group)] += self._score_group(t_idx, group, noise, pulse, row).cpu()
                row += len(group)
        return out / len(self.templates)

    def _score_group(self, t_idx: int, group: list[int], noise: torch.Tensor, pulse: _Pulse, row: int) -> torch.Tensor:
        """Drift (n, N) of one group of words; `row` words of this template came before it."""
        n, n_seeds = len(group), noise.shape[0]
        noise_rep = noise.repeat(n, 1, 1, 1)  # (n*N, C, h, w): word-major, seed-minor

        def encoded(k: int) -> None:  # k prompts of the group encoded
            pulse.beat("encoding", row + k, t_idx)

        trajectories = []
        for st in (self.base, self.adapted):
            if not (self.shared_text and st is self.adapted):  # one text encoder: encode once for both
                cond, mask = self._word_prompts(st, t_idx, group, encoded)
                cond = cond.repeat_interleave(n_seeds, dim=0)  # (n*N, T, D)
                mask = mask.repeat_interleave(n_seeds, dim=0)  # (n*N, T)

            def measured(k: int, name: str = st.side.name) -> None:  # k latents of the group denoised
                pulse.beat(f"{name} model on", row + k // n_seeds, t_idx)

            trajectories.append(self._trajectories(st, noise_rep, cond, mask, measured))
        d = drift_per_sample(trajectories[0], trajectories[1], self.sampling.objective)  # (n*N,)
        return d.view(n, n_seeds)  # (n, N)

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
                rows = slot_rows(one_hot.detach(), *st.candidates)  # (k, D)
                emb, mask = st.builders[t_idx].embed(rows)
                cond_b = st.side.encode(emb[None], self.runtime).expand(n_seeds, -1, -1)  # (N, T, D)
                masks = mask[None].expand(n_seeds, -1)  # (N, T)
                base_traj = self._trajectories(st, noise, cond_b, masks, tick)
            st = self.adapted
            rows = slot_rows(one_hot, *st.candidates)  # (k, D), graph to one_hot
            emb, _ = st.builders[t_idx].embed(rows)
            cond_a = st.side.encode(emb[None], self.runtime)  # (1, T, D)
            leaf = cond_a.detach().requires_grad_(True)
            leaf_grad = torch.zeros_like(leaf)  # (1, T, D)
            mb = self.runtime.micro_batch
            for i in range(0, n_seeds, mb):
                sl = slice(i, i + mb)
                n = noise[sl].shape[0]
                traj = self._trajectory(st, noise[sl], leaf.expand(n, -1, -1), masks[sl])
                d = drift_per_sample(base_traj.rows(sl), traj, self.sampling.objective)  # (n,)
                # the gradient of the conditioning only: the model's weights may require grad
                # (a model a training node made) and must not collect a .grad
                leaf_grad += torch.autograd.grad(d.sum() * weight, leaf)[0]
                drifts[sl] += d.detach().cpu()
                if beat is not None:
                    beat()
            cond_a.backward(leaf_grad)
            st.side.count_backward()
        return drifts / n_tpl
