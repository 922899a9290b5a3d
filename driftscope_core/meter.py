"""Measuring the drift of candidate words: many at once without gradients (scan, re-scoring,
calibration) or one soft choice with gradients (soft-prompt search).

Both sides see the same template, the same noise and the same guidance (method step 3); the
base branch never records gradients. Work is grouped per model so that a host that shares one
network between base and adapted (a LoRA) switches weights as rarely as possible.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch

from .models import ModelSide, Runtime
from .objective import Trajectory, drift_per_sample, run_trajectory
from .prompts import PromptBuilder, Template
from .sampling import Schedule, make_noise
from .soft_prompt import candidate_embeddings, slot_rows
from .vocabulary import Vocabulary


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
        self.side = side
        self.builders = [PromptBuilder(t, side.layout, emb) for t in templates]
        self.cand_rows, self.lengths = candidate_embeddings(vocab, emb)  # (C, L, D), (C,)
        self.uncond = side.empty_prompt(runtime)  # (1, T, D)
        self.cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (template, word) -> (cond, mask)


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

    def _trajectories(self, st: _SideState, noise, cond, mask) -> Trajectory:
        """Trajectories for many latents, micro-batched, without gradients."""
        mb = self.runtime.micro_batch
        parts = [self._trajectory(st, noise[i : i + mb], cond[i : i + mb], mask[i : i + mb]) for i in range(0, noise.shape[0], mb)]
        return Trajectory.cat(parts)

    def _word_prompts(self, st: _SideState, t_idx: int, indices: list[int]):
        """Conditioning (n, T, D) and slot masks (n, T) for candidate words, exact ids; words
        encoded before with this template come from the cache."""
        missing = [i for i in indices if (t_idx, i) not in st.cache]
        if missing:
            builder = st.builders[t_idx]
            pairs = [builder.embed_ids(self.vocab[i].token_ids) for i in missing]
            embeds = torch.stack([p[0] for p in pairs])  # (m, T, D)
            conds = st.side.encode(embeds, self.runtime)  # (m, T, D)
            fresh = {(t_idx, i): (conds[j], pairs[j][1]) for j, i in enumerate(missing)}
        else:
            fresh = {}
        rows = [fresh.get((t_idx, i)) or st.cache[(t_idx, i)] for i in indices]
        room = self.sampling.cache_size * len(self.templates) - len(st.cache)
        st.cache.update(list(fresh.items())[: max(room, 0)])
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    # -- batched scoring -----------------------------------------------------------------------
    @torch.no_grad()
    def score(self, indices: list[int], seeds: list[int], progress=None) -> torch.Tensor:
        """Drift (n, N) of candidates `indices` on the noise of `seeds`, averaged over templates.
        `progress(done, total)` is called after every group (and may raise to cancel)."""
        n_seeds = len(seeds)
        noise = make_noise(seeds, self.sampling.latent_shape)  # (N, C, h, w)
        per_group = max(1, self.sampling.group_size // n_seeds)
        groups = [indices[i : i + per_group] for i in range(0, len(indices), per_group)]
        total = len(groups) * len(self.templates)
        out = torch.zeros(len(indices), n_seeds)
        done = 0
        for t_idx, _ in enumerate(self.templates):
            row = 0
            for group in groups:
                out[row : row + len(group)] += self._score_group(t_idx, group, noise).cpu()
                row += len(group)
                done += 1
                if progress is not None:
                    progress(done, total)
        return out / len(self.templates)

    def _score_group(self, t_idx: int, group: list[int], noise: torch.Tensor) -> torch.Tensor:
        n, n_seeds = len(group), noise.shape[0]
        noise_rep = noise.repeat(n, 1, 1, 1)  # (n*N, C, h, w): word-major, seed-minor
        shared_text = self.base.side.text_encoder is self.adapted.side.text_encoder
        trajectories = []
        for st in (self.base, self.adapted):
            if not (shared_text and st is self.adapted):  # one text encoder: encode once for both
                cond, mask = self._word_prompts(st, t_idx, group)
                cond = cond.repeat_interleave(n_seeds, dim=0)  # (n*N, T, D)
                mask = mask.repeat_interleave(n_seeds, dim=0)  # (n*N, T)
            trajectories.append(self._trajectories(st, noise_rep, cond, mask))
        d = drift_per_sample(trajectories[0], trajectories[1], self.sampling.objective)  # (n*N,)
        return d.view(n, n_seeds)  # (n, N)

    # -- soft-prompt gradient ------------------------------------------------------------------
    def soft_backward(self, one_hot: torch.Tensor, seeds: list[int], sign: float) -> torch.Tensor:
        """Method steps 2-5 for one optimization step: the drift (N,) of the word chosen by
        `one_hot` (C,), and `sign * mean drift` back-propagated into `one_hot`'s graph.
        The base branch runs without gradients; the adapted branch is micro-batched, its
        conditioning graph is back-propagated once."""
        noise = make_noise(seeds, self.sampling.latent_shape)  # (N, C, h, w)
        n_seeds, n_tpl = noise.shape[0], len(self.templates)
        weight = sign / (n_seeds * n_tpl)
        drifts = torch.zeros(n_seeds)
        for t_idx in range(n_tpl):
            with torch.no_grad():
                st = self.base
                rows = slot_rows(one_hot.detach(), st.cand_rows, st.lengths)  # (k, D)
                emb, mask = st.builders[t_idx].embed(rows)
                cond_b = st.side.encode(emb[None], self.runtime).expand(n_seeds, -1, -1)  # (N, T, D)
                masks = mask[None].expand(n_seeds, -1)  # (N, T)
                base_traj = self._trajectories(st, noise, cond_b, masks)
            st = self.adapted
            rows = slot_rows(one_hot, st.cand_rows, st.lengths)  # (k, D), graph to one_hot
            emb, _ = st.builders[t_idx].embed(rows)
            cond_a = st.side.encode(emb[None], self.runtime)  # (1, T, D)
            leaf = cond_a.detach().requires_grad_(True)
            mb = self.runtime.micro_batch
            for i in range(0, n_seeds, mb):
                sl = slice(i, i + mb)
                n = noise[sl].shape[0]
                traj = self._trajectory(st, noise[sl], leaf.expand(n, -1, -1), masks[sl])
                d = drift_per_sample(base_traj.rows(sl), traj, self.sampling.objective)  # (n,)
                (d.sum() * weight).backward()
                drifts[sl] += d.detach().cpu()
            cond_a.backward(leaf.grad)
            st.side.count_backward()
        return drifts / n_tpl
