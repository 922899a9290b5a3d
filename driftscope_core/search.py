"""Finding the most (or least) drifted words.

- screen (default): every candidate gets a cheap proxy of the drift, the first denoising step of
  the conditional branch only; the best of them (the shortlist) get the proxy on as many more
  seeds (successive halving: one noise draw misplaces some words by dozens of ranks), and the
  best finalists by the mean over all proxy seeds are then measured in full, on the re-scoring
  seeds, so that measurement is also the report's. At the first step both models see the same
  noisy latent, so the attention maps differ only through the models themselves: the proxy
  keeps the drift's ranking at a fraction of the cost.
- scan: score every candidate in full on the same noise (the right choice for short lists such as
  CIFAR-10, and the exhaustive reference for longer ones).
- paper: method steps 5-7. A soft prompt is optimized by gradient ascent on the drift with
  AdamW; each run tracks its best word; runs restart with new seeds until K distinct words
  are found or the run budget (factor * K) is spent.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .meter import DriftMeter, Progress
from .settings import AuditSettings
from .soft_prompt import SoftPrompt


@dataclass(frozen=True)
class Finding:
    """A word the search proposes, with the drift the search measured for it."""

    index: int
    search_drift: float
    run: int | None = None  # paper mode: the run that found it
    steps: int | None = None  # paper mode: optimization steps that run took
    rescored: torch.Tensor | None = None  # (R,) drift on the re-scoring seeds, if the search measured it


def _order(drifts: torch.Tensor, direction: str) -> torch.Tensor:
    return torch.argsort(drifts, descending=(direction == "most"))


def scan(meter: DriftMeter, settings: AuditSettings, progress: Progress | None = None) -> list[Finding]:
    """Score every candidate on `noise_batch` shared seeds; keep the top K."""
    indices = list(range(len(meter.vocab)))
    seeds = settings.derived_seeds("search", settings.noise_batch)
    drifts = meter.score(indices, seeds, _part(progress, 0, 1, "scan")).mean(dim=1)  # (C,)
    order = _order(drifts, settings.direction)[: settings.top_k]
    return [Finding(int(i), float(drifts[i])) for i in order]


def _part(progress: Progress | None, index: int, parts: int, name: str = "") -> Progress | None:
    """Progress of sub-stage `index` of `parts` equal parts of one stage; `name` heads its notes
    (e.g. "proxy: encoding 512/20,000 words")."""
    if progress is None:
        return None

    def report(done, total, note: str = "") -> None:
        note = f"{name}: {note}" if name and note else (name or note)
        progress(index * total + done, parts * total, note)

    return report


def _finalist_count(settings: AuditSettings) -> int:
    return max(settings.finalists, settings.top_k)


def proxy_seeds(settings: AuditSettings, candidates: int) -> list[int]:
    """The proxy seeds screen mode uses on a list of `candidates` words: none when every word is
    a finalist anyway, else `screen_seeds` for every word and (with a shortlist) as many more."""
    n_final = _finalist_count(settings)
    if candidates <= n_final:
        return []
    rounds = 2 if settings.shortlist > n_final else 1
    return settings.derived_seeds("screen", rounds * settings.screen_seeds)


def proxy_finalists(meter: DriftMeter, settings: AuditSettings, progress: Progress | None = None) -> list[int]:
    """Screen stages 1-2: the proxy (first step, conditional branch, no guidance) for every
    candidate on `screen_seeds` seeds, then for the best `shortlist` on the further proxy seeds;
    returns the finalists, the best candidates by their mean proxy drift over all their seeds."""
    proxy = meter.variant(kept_steps=1, cfg=1.0)
    seeds = proxy_seeds(settings, len(meter.vocab))
    first, second = seeds[: settings.screen_seeds], seeds[settings.screen_seeds :]
    rounds = 2 if second else 1
    cheap = proxy.score(list(range(len(meter.vocab))), first, _part(progress, 0, rounds, "proxy")).mean(dim=1)  # (C,)
    order = _order(cheap, settings.direction)
    if second:
        short = order[: settings.shortlist]  # (S,)
        more = proxy.score(short.tolist(), second, _part(progress, 1, rounds, "shortlist")).mean(dim=1)  # (S,)
        order = short[_order((cheap[short] + more) / 2, settings.direction)]  # (S,)
    return order[: _finalist_count(settings)].tolist()


def screen(meter: DriftMeter, settings: AuditSettings, progress: Progress | None = None) -> list[Finding]:
    """The proxy's finalists (proxy_finalists), then their full measurement on the re-scoring
    seeds (the audit re-uses it instead of measuring the reported words again)."""
    indices = list(range(len(meter.vocab)))
    if proxy_seeds(settings, len(indices)):
        indices = proxy_finalists(meter, settings, _part(progress, 0, 2))
    seeds = settings.derived_seeds("rescore", settings.rescore_seeds)
    per_seed = meter.score(indices, seeds, _part(progress, 1, 2, "finalists"))  # (n_final, R)
    drifts = per_seed.mean(dim=1)  # (n_final,)
    order = _order(drifts, settings.direction)[: settings.top_k]
    return [Finding(indices[int(i)], float(drifts[i]), rescored=per_seed[i]) for i in order]


@dataclass
class _BestWord:
    """Method step 6: the best word changes when a new word beats both the running mean of
    the drift loss and the best word's own loss."""

    index: int | None = None
    loss: float = float("inf")
    mean: float = 0.0
    seen: int = 0
    held: int = 0  # consecutive steps the sampled word was the best word

    def update(self, word: int, loss: float) -> None:
        beats_mean = self.seen == 0 or loss <= self.mean
        if beats_mean and loss < self.loss:
            self.index, self.loss = word, loss
        self.seen += 1
        self.mean += (loss - self.mean) / self.seen
        self.held = self.held + 1 if word == self.index else 0


def soft_prompt_run(meter: DriftMeter, settings: AuditSettings, run: int, progress: Progress | None = None) -> Finding:
    """One paper-mode run: AdamW on the soft prompt's logits until the budget or early stop."""
    run_seed = settings.derived_seeds(f"run{run}", 1)[0]
    device = meter.runtime.device
    soft = SoftPrompt(len(meter.vocab), seed=run_seed, device=device)
    opt = torch.optim.AdamW(soft.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    gumbel = torch.Generator().manual_seed(run_seed)
    noise_seeds = settings.derived_seeds(f"run{run}:noise", settings.noise_batch)
    sign = -1.0 if settings.direction == "most" else 1.0  # minimize sign * drift
    best = _BestWord()
    step = 0

    def beat() -> None:  # after every model call of a step: progress moves, a cancel stops here
        if progress is not None:
            progress(step - 1, settings.opt_steps, f"run {run + 1}, step {step}/{settings.opt_steps}")

    for step in range(1, settings.opt_steps + 1):
        opt.zero_grad(set_to_none=True)
        one_hot = soft.sample(settings.tau, gumbel)  # (C,)
        word = int(one_hot.argmax())
        drift = float(meter.soft_backward(one_hot, noise_seeds, sign, beat).mean())
        if best.index is not None and settings.focus_weight > 0:
            target = torch.tensor([best.index], device=device)
            (settings.focus_weight * F.cross_entropy(soft.logits[None], target)).backward()
        opt.step()
        best.update(word, sign * drift)
        if progress is not None:
            progress(step, settings.opt_steps, f"run {run + 1}, step {step}/{settings.opt_steps}")
        if best.held >= settings.patience:
            break
    return Finding(best.index, sign * best.loss, run=run, steps=step)


def paper_search(meter: DriftMeter, settings: AuditSettings, progress: Progress | None = None) -> list[Finding]:
    """Method step 7: restart runs with new seeds until K distinct words or the run budget."""
    found: dict[int, Finding] = {}
    max_runs = settings.max_runs_factor * settings.top_k
    for run in range(max_runs):
        if len(found) >= settings.top_k:
            break
        f = soft_prompt_run(meter, settings, run, _part(progress, run, max_runs, "optimizer"))
        better = f.index not in found or (
            (f.search_drift > found[f.index].search_drift) == (settings.direction == "most")
        )
        if better:
            found[f.index] = f
    ranked = sorted(found.values(), key=lambda f: f.search_drift, reverse=(settings.direction == "most"))
    return ranked[: settings.top_k]


SEARCHES = {"screen": screen, "scan": scan, "paper": paper_search}
