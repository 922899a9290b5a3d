"""The truncated, guided denoising that both models run from the same noise.

Method step 3: both models denoise the same noise with the same conditioning over the first S
steps of an N-step schedule, with classifier-free guidance. Euler steps on the host's sigma
schedule (k-diffusion's formulation, Karras et al. 2022, eq. 5).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    """Noise levels of a full N-step schedule (N+1 values, last 0) and the scale that turns unit
    noise into the first latent (the host's noise scaling at maximum denoise)."""

    sigmas: torch.Tensor
    initial_scale: float

    def truncated(self, kept_steps: int) -> torch.Tensor:
        """The first kept_steps + 1 sigmas: the steps the audit runs."""
        return self.sigmas[: kept_steps + 1]


def cfg_combine(x0_cond: torch.Tensor, x0_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) on x0 predictions."""
    return x0_uncond + scale * (x0_cond - x0_uncond)


def euler_step(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One Euler step of the probability-flow ODE from sigma to sigma_next."""
    d = (x - x0) / sigma
    return x + d * (sigma_next - sigma)


def make_noise(seeds: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """Unit Gaussian noise (N, C, h, w), one sample per seed, generated on the CPU so a seed means
    the same noise on every device."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
