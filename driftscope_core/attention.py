"""Attention maps of the slot token.

Method step 4: the drift compares where each model's image attends to the slot word. For every
cross-attention layer at the highest resolution that has cross-attention, the probe computes
attention probabilities explicitly, keeps the slot token's map for the conditional rows, and
returns the attention output so the model's forward pass continues unchanged. Other layers are
left to the host.

Joint-attention models (Flux, Chroma and the other DiTs) have no cross-attention: text and
image tokens attend together over one sequence [text | image]. There the slot word's map is the
image-query rows of that joint softmax at the slot's key columns (`joint_slot_map`); the host
keeps computing the attention output with its own kernel, and the probe only reads q and k.
"""
from __future__ import annotations

import torch


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax attention (B, heads, Q, T) from projected queries (B, Q, inner) and keys (B, T, inner)."""
    b, nq, inner = q.shape
    dh = inner // heads
    qh = q.reshape(b, nq, heads, dh).transpose(1, 2).float()  # (B, heads, Q, dh)
    kh = k.reshape(b, k.shape[1], heads, dh).transpose(1, 2).float()  # (B, heads, T, dh)
    return torch.softmax(qh @ kh.transpose(-1, -2) * dh**-0.5, dim=-1)  # (B, heads, Q, T)


def attend(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention output (B, Q, inner) from probabilities (B, heads, Q, T) and values (B, T, inner)."""
    b, heads, nq, t = probs.shape
    dh = v.shape[-1] // heads
    vh = v.reshape(b, t, heads, dh).transpose(1, 2)  # (B, heads, T, dh)
    out = probs.to(vh.dtype) @ vh  # (B, heads, Q, dh)
    return out.transpose(1, 2).reshape(b, nq, heads * dh)  # (B, Q, inner)


def slot_map(probs: torch.Tensor, slot_mask: torch.Tensor) -> torch.Tensor:
    """The slot word's attention map (B, Q), averaged over its tokens and over heads, so words
    of several tokens score on the same scale as single tokens."""
    weights = slot_mask.to(probs.dtype)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, T)
    per_head = torch.einsum("bhqt,bt->bhq", probs, weights)  # (B, heads, Q)
    return per_head.mean(dim=1)


JOINT_CHUNK_ELEMENTS = 1 << 25  # attention scores held at once by joint_slot_map (128 MB in float32)


def joint_slot_map(q: torch.Tensor, k: torch.Tensor, slot_mask: torch.Tensor, first_image: int | None = None,
                   images: int | None = None, chunk_elements: int = JOINT_CHUNK_ELEMENTS) -> torch.Tensor:
    """The slot word's map (Bc, N) in a joint attention over [text | image] tokens: the softmax
    over all L keys of each image query, taken at the slot's key columns, averaged over the
    slot's tokens (slot_mask (Bc, T): the text's first T columns) and over heads. q, k are
    (B, H, L, dh) as the host's attention receives them (position encoding applied); the image
    queries are the N rows from `first_image` (default: T, right after the text; a family that
    pads its text, Z-Image, says where they start) on (default: to the end). Only the first Bc
    rows of the batch (the conditional branch) are read. Computed a few heads and query rows at
    a time, so a 1024 px Flux block (4,096 image queries) never holds its full score matrix."""
    bc, t = slot_mask.shape
    b, heads, length, dh = q.shape
    first = t if first_image is None else first_image
    queries = length - first if images is None else images
    weights = slot_mask.to(device=q.device, dtype=torch.float32)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)  # (Bc, T)
    rows = max(1, min(queries, chunk_elements // max(1, bc * length)))  # query rows per chunk, one head at a time
    keys = k[:bc].float()  # (Bc, H, L, dh)
    parts = []
    for start in range(0, queries, rows):
        stop = min(start + rows, queries)
        acc = 0.0
        for h in range(heads):
            qi = q[:bc, h, first + start : first + stop].float()  # (Bc, n, dh) image queries
            probs = torch.softmax(qi @ keys[:, h].transpose(-1, -2) * dh**-0.5, dim=-1)  # (Bc, n, L)
            acc = acc + torch.einsum("bnt,bt->bn", probs[..., :t], weights)  # (Bc, n)
        parts.append(acc / heads)
    return torch.cat(parts, dim=1)  # (Bc, N)


class SlotAttentionProbe:
    """Callable handed to a denoiser: `probe(q, k, v, heads)` returns the attention output for
    layers it records and None for the others (the host then runs its own attention).

    It records the cross-attention layers at the highest resolution that has any: a layer's
    resolution is its query length, and a layer with more queries than every one before it
    restarts the recording. A UNet meets its highest resolution first (input blocks go from
    high to low resolution), so lower layers are skipped without computing anything. The rule
    comes from the model's shapes alone: SD1.x/SD2.x record their full-resolution layers,
    SDXL (no cross-attention at full latent resolution) its latent/2 layers.

    Only the first `slot_mask.shape[0]` batch rows (the conditional branch) are recorded.
    """

    def __init__(self, slot_mask: torch.Tensor):
        self.slot_mask = slot_mask  # (Bc, T)
        self.resolution = 0  # query length of the layers recorded so far
        self.maps: list[torch.Tensor] = []

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor | None:
        queries = q.shape[1]
        if queries < self.resolution:
            return None
        if queries > self.resolution:
            self.resolution, self.maps = queries, []
        probs = attention_probabilities(q, k, heads)
        rows = self.slot_mask.shape[0]
        self.maps.append(slot_map(probs[:rows], self.slot_mask.to(probs.device)))
        return attend(probs, v).to(q.dtype)

    def joint(self, q: torch.Tensor, k: torch.Tensor, first_image: int | None = None, images: int | None = None) -> None:
        """Record one joint-attention call (q, k (B, H, L, dh), text tokens first; the image
        queries as in joint_slot_map); the host computes the output itself. The resolution rule
        is the same as for cross-attention (the number of image queries); the host decides
        which blocks it hands over."""
        first = self.slot_mask.shape[1] if first_image is None else first_image
        queries = q.shape[2] - first if images is None else images
        if queries < self.resolution:
            return
        if queries > self.resolution:
            self.resolution, self.maps = queries, []
        self.maps.append(joint_slot_map(q, k, self.slot_mask, first, queries))

    def stacked(self) -> torch.Tensor:
        """Recorded maps (Bc, L, Q) over the L recorded layers."""
        if not self.maps:
            raise RuntimeError(
                "no cross-attention or joint-attention layer was observed; this model family is not supported by the "
                "'attention' objective (use 'prediction')"
            )
        return torch.stack(self.maps, dim=1)
