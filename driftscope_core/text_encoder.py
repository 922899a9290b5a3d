"""A differentiable CLIP text transformer in plain torch, and the text side it makes.

The host (nodes/) runs the model's own text encoders with the slot's embedding rows put into the
token list, so that is what an audit uses. This plain-torch CLIP is the core's reference text
side: the core's own tests build toy models with it, and the node tests check ComfyUI's
encoders against it (method step 2 needs the gradient from the drift back to the slot's input
embedding, which this encoder computes as a pure function of its weights).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from .conditioning import Conditioning, Prompt, slot_mask
from .prompts import SlotPrompt, TokenLayout

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


class ClipText:
    """conditioning.TextSide over one ClipTextEncoder (named `name`): the context is the
    encoder's output, the slot mask its slot positions; no extras."""

    def __init__(self, encoder: ClipTextEncoder, layout: TokenLayout, name: str = "clip"):
        self.encoder, self.name = encoder, name
        self.layouts = {name: layout}

    def token_embedding(self, encoder: str) -> torch.Tensor:
        return self.encoder.token_embedding.float()  # (V, D)

    def input_embeddings(self, prompt: SlotPrompt) -> torch.Tensor:
        """The input embeddings (T, D) of one prompt, slot rows in place."""
        table = self.encoder.token_embedding
        ids = lambda seq: table[torch.tensor(list(seq), dtype=torch.long, device=table.device)].float()  # noqa: E731
        slot = ids(prompt.slot) if isinstance(prompt.slot, tuple) else prompt.slot.float()
        return torch.cat([ids(prompt.head), slot, ids(prompt.tail)])  # (T, D)

    def encode(self, prompts: Sequence[Prompt]) -> Conditioning:
        embeds = torch.stack([self.input_embeddings(p[self.name]) for p in prompts])  # (B, T, D)
        return Conditioning(self.encoder.encode(embeds), slot_mask(prompts, self.name, embeds.shape[1], embeds.device))
