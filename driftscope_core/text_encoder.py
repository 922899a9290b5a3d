"""A differentiable CLIP text transformer in plain torch.

Method step 2 needs gradients from the drift back to the slot's input embedding. The model's own
text encoder is run here as a pure function of its (already patched) weights, so the soft prompt's
graph never passes through code that updates tensors in place. A test proves it equals the host's
encoder numerically.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "quick_gelu": lambda a: a * torch.sigmoid(1.702 * a),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda a: F.gelu(a, approximate="tanh"),
}


@dataclass(frozen=True)
class TextEncoderConfig:
    """How the host reads out the conditioning from the transformer."""

    num_layers: int
    heads: int
    activation: str = "quick_gelu"
    output_layer: int | None = None  # None: last layer; else a layer index (negative from the end)
    norm_intermediate: bool = True  # final layer norm applied to an intermediate output
    eps: float = 1e-5


class ClipTextEncoder:
    """CLIP text transformer over input embeddings; weights use Hugging Face CLIP key names
    (`embeddings.token_embedding.weight`, `encoder.layers.N.self_attn.q_proj.weight`, ...)."""

    def __init__(self, weights: Mapping[str, torch.Tensor], config: TextEncoderConfig):
        if config.activation not in ACTIVATIONS:
            raise ValueError(f"unknown text-encoder activation {config.activation!r}")
        self.w = dict(weights)
        self.config = config
        self.act = ACTIVATIONS[config.activation]

    @property
    def token_embedding(self) -> torch.Tensor:
        return self.w["embeddings.token_embedding.weight"]  # (V, D)

    @property
    def device(self) -> torch.device:
        return self.token_embedding.device

    def _last_layer(self) -> int:
        out = self.config.output_layer
        if out is None:
            return self.config.num_layers - 1
        return out % self.config.num_layers

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"].to(x.dtype), self.w[f"{name}.bias"].to(x.dtype))

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        d = x.shape[-1]
        return F.layer_norm(x, (d,), self.w[f"{name}.weight"].to(x.dtype), self.w[f"{name}.bias"].to(x.dtype), self.config.eps)

    def _attention(self, x: torch.Tensor, p: str) -> torch.Tensor:
        b, t, d = x.shape
        h = self.config.heads
        q, k, v = (self._linear(x, f"{p}.self_attn.{n}_proj") for n in ("q", "k", "v"))
        q, k, v = (z.view(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))  # (B, heads, T, d/heads)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, d/heads)
        out = out.transpose(1, 2).reshape(b, t, d)  # (B, T, D)
        return self._linear(out, f"{p}.self_attn.out_proj")

    def _layer(self, x: torch.Tensor, i: int) -> torch.Tensor:
        p = f"encoder.layers.{i}"
        x = x + self._attention(self._norm(x, f"{p}.layer_norm1"), p)
        hidden = self.act(self._linear(self._norm(x, f"{p}.layer_norm2"), f"{p}.mlp.fc1"))
        return x + self._linear(hidden, f"{p}.mlp.fc2")

    def encode(self, input_embeds: torch.Tensor) -> torch.Tensor:
        """Conditioning (B, T, D) from input token embeddings (B, T, D), computed in float32
        unless an autocast context says otherwise."""
        x = input_embeds.float() + self.w["embeddings.position_embedding.weight"][: input_embeds.shape[1]].float()
        last = self._last_layer()
        for i in range(last + 1):
            x = self._layer(x, i)
        if self.config.output_layer is None or self.config.norm_intermediate:
            x = self._norm(x, "final_layer_norm")
        return x.float()
