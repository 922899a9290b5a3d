"""The soft prompt: a learnable distribution over candidate words for the template's slot.

Method step 2 (adapted): logits over the candidate vocabulary go through a hard Gumbel-softmax
with straight-through gradients; the one-hot row times each text encoder's candidate embeddings
is the slot's input, so the word choice stays differentiable. Parameters and optimizer state
are float32 whatever the models' precision (an fp16 soft prompt turns NaN after one Adam step).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .vocabulary import Vocabulary


def gumbel_straight_through(logits: torch.Tensor, tau: float, generator: torch.Generator) -> torch.Tensor:
    """Hard one-hot sample (C,) whose gradient is that of the soft Gumbel-softmax (Jang et al. 2017)."""
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float32).clamp(1e-10, 1.0 - 1e-7)
    gumbel = -torch.log(-torch.log(u)).to(logits.device)  # (C,) standard Gumbel noise
    soft = F.softmax((logits + gumbel) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(dim=-1), soft.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft


def candidate_embeddings(vocab: Vocabulary, token_embedding: torch.Tensor, encoder: str = ""
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded per-candidate slot rows (C, L, D) of text encoder `encoder` (its own token ids
    of each word), zeros past each word's length, and lengths (C,)."""
    words = [cand.ids(encoder) for cand in vocab.candidates]
    c, l = len(vocab), max(len(w) for w in words)
    ids = torch.zeros(c, l, dtype=torch.long)
    lengths = torch.tensor([len(w) for w in words])
    for i, w in enumerate(words):
        ids[i, : len(w)] = torch.tensor(w)
    rows = token_embedding[ids.to(token_embedding.device)].float()  # (C, L, D)
    valid = torch.arange(l)[None, :] < lengths[:, None]  # (C, L)
    return rows * valid[..., None].to(rows.device), lengths


def slot_rows(one_hot: torch.Tensor, cand_rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Slot input rows (k, D) for a one-hot choice (C,): exact rows of the chosen word in the
    forward pass; the gradient reaches every candidate through its own padded rows."""
    k = int(lengths[int(one_hot.argmax())])
    mixed = torch.einsum("c,cld->ld", one_hot, cand_rows)  # (L, D)
    return mixed[:k]


class SoftPrompt(torch.nn.Module):
    """Logits over the candidates (float32), initialized from a seed."""

    def __init__(self, num_candidates: int, seed: int, init_scale: float = 0.01, device=None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        init = torch.randn(num_candidates, generator=g) * init_scale
        self.logits = torch.nn.Parameter(init.to(device=device, dtype=torch.float32))

    def sample(self, tau: float, generator: torch.Generator) -> torch.Tensor:
        return gumbel_straight_through(self.logits, tau, generator)

    def probabilities(self) -> torch.Tensor:
        return F.softmax(self.logits.detach(), dim=-1)
