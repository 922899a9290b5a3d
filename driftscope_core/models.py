"""The two model sides as the core sees them, and what running them costs.

The core never touches the host's model objects: each side is a text side (the host's text
encoders behind conditioning.TextSide) and a denoiser callable
`(x, sigma, conditioning, attention_probe) -> x0`. Every call goes through a ModelSide so that
model evaluations are counted the same way everywhere.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from .conditioning import Conditioning, Prompt, TextSide, needs_grad
from .prompts import PromptBuilder, Template


class Denoiser(Protocol):
    def __call__(
        self,
        x: torch.Tensor,  # (B, C, h, w) noisy latents
        sigma: torch.Tensor,  # (B,)
        conditioning: Conditioning,  # B prompts: context (B, T, D) and extras
        attention_probe: Callable | None,  # see attention.SlotAttentionProbe
    ) -> torch.Tensor:  # (B, C, h, w) x0 prediction
        ...


@dataclass
class EvaluationCounts:
    """Machine-independent cost: one UNet evaluation is one latent at one step (a guided step
    costs two); one text evaluation is one prompt through the text encoder."""

    unet_forward: int = 0
    unet_backward: int = 0
    text_forward: int = 0
    text_backward: int = 0

    @property
    def forward(self) -> int:
        """Forward evaluations of both kinds, what progress and the cost limit count."""
        return self.text_forward + self.unet_forward

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Runtime:
    """Where and how the models run. Autocast applies to denoiser passes only (text encoders
    run as the host runs them); the soft prompt, its optimizer and every loss stay float32."""

    device: torch.device = torch.device("cpu")
    autocast_dtype: torch.dtype | None = None
    micro_batch: int = 8  # latents per denoiser call (a guided call runs twice as many)
    # prompts per text-encoder call, each followed by progress and a cancel point: a CLIP-L pass
    # costs 0.2-0.35 s per prompt on a 2-core CPU (no faster per prompt in larger batches), so
    # that is about a second; on a GPU the extra calls cost seconds per 20,000 words
    text_batch: int = 4
    gradient_checkpointing: bool = False

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


@dataclass
class ModelSide:
    """One of the two models: base or adapted."""

    name: str
    text: TextSide
    denoiser: Denoiser
    counts: EvaluationCounts = field(default_factory=EvaluationCounts)
    _pending_unet: int = 0
    _pending_text: int = 0

    def encode(self, prompts: Sequence[Prompt]) -> Conditioning:
        """Conditioning of a batch of prompts, computed by the host's text encoders as it would
        compute them (no autocast: the text side is exact by construction)."""
        self.counts.text_forward += len(prompts)
        if needs_grad(prompts):
            self._pending_text += len(prompts)
        return self.text.encode(prompts).float()

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, probe, runtime: Runtime) -> torch.Tensor:
        """x0 (B, C, h, w). Every call is a forward pass, including recomputations under
        gradient checkpointing; backward passes are noted by the caller (note_backward_pending)."""
        self.counts.unet_forward += x.shape[0]
        with runtime.autocast():
            return self.denoiser(x, sigma, cond, probe).float()

    def note_backward_pending(self, latents: int) -> None:
        """`latents` evaluations were recorded for autograd; they count once backward runs."""
        self._pending_unet += latents

    def count_backward(self) -> None:
        """Call after a backward pass through this side's graph."""
        self.counts.unet_backward += self._pending_unet
        self.counts.text_backward += self._pending_text
        self._pending_unet = self._pending_text = 0

    def drop_pending(self) -> None:
        self._pending_unet = self._pending_text = 0

    def empty_prompt(self) -> Conditioning:
        """Conditioning (1, ...) of the empty prompt, the unconditional branch of guidance."""
        empty = Template("{}", (), ())
        prompt = {name: PromptBuilder(empty, lay).prompt(()) for name, lay in self.text.layouts.items()}
        with torch.no_grad():
            return self.encode([prompt])
