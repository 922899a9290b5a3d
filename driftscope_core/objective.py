"""Drift between the two models' truncated trajectories.

Method step 4: the paper's drift is the L1 distance between the models' cross-attention maps of
the slot word (conditional branch, averaged over heads and over the highest-resolution
cross-attention layers, over the kept steps). Two alternatives are selectable by name:
"prediction" (mean |x0_base - x0_adapted| over the kept steps) and "latent" (mean absolute
difference of the latents after the kept steps).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from .attention import SlotAttentionProbe
from .conditioning import Conditioning
from .models import ModelSide, Runtime
from .sampling import cfg_combine, euler_step

OBJECTIVES = ("attention", "prediction", "latent")


class DriftError(RuntimeError):
    """The drift could not be measured (non-finite values, unsupported model)."""


@dataclass
class Trajectory:
    """What one side produced over the kept steps, for B latents."""

    maps: torch.Tensor | None  # (B, S, L, HW) slot attention maps, conditional branch
    x0: torch.Tensor | None  # (B, S, C, h, w) guided x0 predictions
    latent: torch.Tensor  # (B, C, h, w) latent after the kept steps

    @staticmethod
    def cat(parts: list["Trajectory"]) -> "Trajectory":
        def join(name):
            vals = [getattr(p, name) for p in parts]
            return None if vals[0] is None else torch.cat(vals)

        return Trajectory(join("maps"), join("x0"), join("latent"))

    def rows(self, sl: slice) -> "Trajectory":
        pick = lambda t: None if t is None else t[sl]  # noqa: E731
        return Trajectory(pick(self.maps), pick(self.x0), self.latent[sl])


def _guided_x0(side, x, sigma, cond: Conditioning, uncond: Conditioning, cfg, record, runtime):
    """One guided model evaluation: x0 (B, C, h, w) and slot maps (B, L, HW) or an empty tensor.
    The conditional and unconditional branches share one model call when their contexts have
    the same length; an encoder that is not padded (Chroma's T5) gives the empty prompt a
    shorter context, and then the branches run as two calls, as ComfyUI's sampler runs them."""
    b = x.shape[0]
    probe = SlotAttentionProbe(cond.slot_mask) if record else None
    sig = sigma.reshape(1).expand(2 * b).to(x.device)
    if cfg == 1.0:
        x0 = side.denoise(x, sig[:b], cond, probe, runtime)
    elif cond.context.shape[1] == uncond.context.shape[1]:
        x_in = torch.cat([x, x])  # (2B, C, h, w): conditional rows first
        both = Conditioning.cat([cond, uncond.expand(b)])  # 2B prompts
        out = side.denoise(x_in, sig, both, probe, runtime)
        x0 = cfg_combine(out[:b], out[b:], cfg)
    else:
        positive = side.denoise(x, sig[:b], cond, probe, runtime)
        x0 = cfg_combine(positive, side.denoise(x, sig[:b], uncond.expand(b), None, runtime), cfg)
    maps = probe.stacked() if record else x.new_zeros(0)
    return x0, maps


def run_trajectory(
    side: ModelSide,
    sigmas: torch.Tensor,
    initial_scale: float,
    noise: torch.Tensor,  # (B, C, h, w) unit noise
    cond: Conditioning,  # B prompts, slot mask included
    uncond: Conditioning,  # the empty prompt (1, ...)
    cfg: float,
    objective: str,
    runtime: Runtime,
) -> Trajectory:
    """Method step 3: guided Euler steps over `sigmas` (the kept part of the schedule)."""
    x = noise.to(runtime.device) * initial_scale
    record = objective == "attention"
    keep_x0 = objective == "prediction"
    maps, x0s = [], []
    use_ckpt = runtime.gradient_checkpointing and torch.is_grad_enabled()
    per_step = x.shape[0] * (1 if cfg == 1.0 else 2)
    for i in range(len(sigmas) - 1):
        if torch.is_grad_enabled():
            side.note_backward_pending(per_step)
        args = (side, x, sigmas[i], cond, uncond, cfg, record, runtime)
        if use_ckpt:
            x0, m = checkpoint(_guided_x0, *args, use_reentrant=False)
        else:
            x0, m = _guided_x0(*args)
        if record:
            maps.append(m)
        if keep_x0:
            x0s.append(x0)
        x = euler_step(x, x0, sigmas[i], sigmas[i + 1])
    return Trajectory(
        torch.stack(maps, dim=1) if record else None,  # (B, S, L, HW)
        torch.stack(x0s, dim=1) if keep_x0 else None,  # (B, S, C, h, w)
        x,
    )


def drift_per_sample(base: Trajectory, adapted: Trajectory, objective: str) -> torch.Tensor:
    """Drift (B,) between two trajectories from the same noise; see the module docstring."""
    if objective == "attention":
        diff = (adapted.maps - base.maps).abs()
    elif objective == "prediction":
        diff = (adapted.x0 - base.x0).abs()
    elif objective == "latent":
        diff = (adapted.latent - base.latent).abs()
    else:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    d = diff.flatten(1).mean(dim=1)  # (B,)
    if not torch.isfinite(d).all():
        raise DriftError(
            f"the '{objective}' drift is not finite (NaN/inf). Use precision 'fp32' or 'bf16' "
            "instead of 'fp16', lower the CFG scale, or check the adapted model's weights for NaN."
        )
    return d
