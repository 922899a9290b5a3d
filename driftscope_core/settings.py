"""Audit settings: one dataclass of defaults, and named presets of the search budget."""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields, replace

from .text import quoted

MODES = ("screen", "scan", "paper")
DIRECTIONS = ("most", "least")


@dataclass(frozen=True)
class AuditSettings:
    mode: str = "screen"  # screen: cheap proxy then finalists; scan: every candidate in full; paper: soft prompt
    direction: str = "most"  # most: most drifted words; least: least drifted
    objective: str = "attention"  # attention | prediction | latent (objective.py)
    top_k: int = 10  # words to report
    seed: int = 0
    # method step 3: truncated guided denoising (paper: 512 px, 4 of 50 steps, CFG 7.5, batch 4)
    width: int = 512
    height: int = 512
    schedule_steps: int = 50
    kept_steps: int = 4
    cfg: float = 7.5
    guidance: float | None = None  # a guidance-distilled model's guidance input (Flux dev: 3.5), given to the host's model
    noise_batch: int = 4  # noise samples per evaluation during the search
    # screen mode: first-step, conditional-branch proxy for every word, then full finalists
    screen_seeds: int = 1  # proxy seeds for every word
    shortlist: int = 160  # the proxy's best words get screen_seeds more seeds (0: none)
    finalists: int = 30  # words measured in full after the proxy (at least top_k)
    # method steps 5-7: soft-prompt search (paper: AdamW, lr 0.1, 100 steps)
    opt_steps: int = 100
    lr: float = 0.1
    weight_decay: float = 0.01
    tau: float = 1.0  # Gumbel-softmax temperature
    focus_weight: float = 0.1  # pull toward the current best word (replaces the paper's LM loss)
    patience: int = 20  # early stop: the sampled word held the best for this many steps
    max_runs_factor: int = 2  # at most factor * top_k restarts
    # re-scoring on shared seeds and calibration against random words
    # 8, not 4: when many words drift alike, 4 seeds leave the order of the top 10 to the noise
    # (benchmark, trained-LoRA case: top-10 overlap across search seeds 0.53 with 4, 0.70 with 8
    # or 16; the planted cases' recall@10 stayed 0.93)
    rescore_seeds: int = 8
    calibration_size: int = 64  # random words measured for the baseline
    calibration_seeds: int = 1  # the first re-scoring seeds, for the random words and the scores (<= rescore_seeds)
    false_alarms: float = 0.05  # expected ordinary words flagged per audit; sets the z threshold (calibration.py)
    # calibration.py's placebo reference: each calibrated score is adjusted by the word's drift
    # under a random change of the base of this relative size (the host makes it; 0: none, the
    # method's plain calibration). Image world, diffuse nulls at the node's defaults: "couch"
    # and "sunflower" flagged without it (z 4.29 > 3.26); benchmarks/README "Placebo reference"
    placebo: float = 0.0

    def validate(self) -> "AuditSettings":
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode {quoted(self.mode)} is not one of {', '.join(MODES)}")
        if self.direction not in DIRECTIONS:
            problems.append(f"direction {quoted(self.direction)} is not one of {', '.join(DIRECTIONS)}")
        if self.width % 8 or self.height % 8 or self.width < 8 or self.height < 8:
            problems.append(f"resolution {self.width}x{self.height}: width and height must be positive multiples of 8 (e.g. 512)")
        if self.kept_steps < 1 or self.schedule_steps < 1:
            problems.append(f"kept_steps ({self.kept_steps}) and schedule_steps ({self.schedule_steps}) must be at least 1 "
                            "(a budget of zero steps measures nothing)")
        if self.kept_steps > self.schedule_steps:
            problems.append(f"kept_steps ({self.kept_steps}) cannot exceed schedule_steps ({self.schedule_steps})")
        if self.mode == "paper" and self.opt_steps < 1:
            problems.append(f"opt_steps ({self.opt_steps}) must be at least 1 in paper mode (a budget of zero steps finds nothing)")
        if self.calibration_seeds > self.rescore_seeds:
            problems.append(f"calibration_seeds ({self.calibration_seeds}) cannot exceed rescore_seeds ({self.rescore_seeds}): "
                            "calibration uses the first re-scoring seeds")
        if not 0.0 < self.false_alarms < 1.0:
            problems.append(f"false_alarms ({self.false_alarms}) must be between 0 and 1 (e.g. 0.05)")
        if not 0.0 <= self.placebo < 1.0:
            problems.append(f"placebo ({self.placebo}) must be at least 0 and below 1 (0.01: a 1% random change; 0: none)")
        if self.shortlist < 0:
            problems.append(f"shortlist ({self.shortlist}) cannot be negative (0 skips the proxy's second round)")
        counts = ("top_k", "noise_batch", "rescore_seeds", "calibration_seeds", "screen_seeds")
        too_few = [f"{name} ({getattr(self, name)})" for name in counts if getattr(self, name) < 1]
        if too_few:
            problems.append(f"{', '.join(too_few)} must be at least 1")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def as_dict(self) -> dict:
        return asdict(self)

    def derived_seeds(self, purpose: str, n: int) -> list[int]:
        """n deterministic seeds for a purpose ("search", "rescore", "run3", ...)."""
        rng = random.Random(f"driftscope:{self.seed}:{purpose}")
        return [rng.randrange(2**31) for _ in range(n)]


PRESETS: dict[str, dict] = {
    # Minutes on a CPU with tiny models; a first look on a GPU.
    "quick": dict(schedule_steps=20, kept_steps=3, noise_batch=2, opt_steps=30, patience=8, rescore_seeds=4, calibration_size=32, placebo=0.01),
    # The default for real audits on a GPU.
    "standard": dict(schedule_steps=50, kept_steps=4, noise_batch=4, opt_steps=60, patience=15, rescore_seeds=8, calibration_size=64, placebo=0.01),
    # The reference numbers of the paper (method.md steps 3 and 6).
    "paper": dict(mode="paper", schedule_steps=50, kept_steps=4, cfg=7.5, noise_batch=4, opt_steps=100, lr=0.1, patience=20, rescore_seeds=8, calibration_size=64, placebo=0.01),
}


def settings_from_preset(preset: str, **overrides) -> AuditSettings:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {quoted(preset)}; choose one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(AuditSettings)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(quoted(name) for name in sorted(unknown))}")
    return replace(AuditSettings(), **{**PRESETS[preset], **overrides}).validate()
