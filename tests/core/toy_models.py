"""Plain-torch toy models for testing the core without a host: a small CLIP-style text encoder
and a one-layer cross-attention denoiser, plus a closed-form key/value edit that plants drift on
chosen words (in the spirit of UCE)."""
from __future__ import annotations

import torch

from driftscope_core.models import ModelSide
from driftscope_core.prompts import PromptBuilder, TokenLayout, tokenize_template
from driftscope_core.text_encoder import ClipText, ClipTextEncoder, TextEncoderConfig
from driftscope_core.vocabulary import Vocabulary, from_words

D, HEADS, INNER, VOCAB_SIZE = 128, 2, 16, 300
LAYOUT = TokenLayout(start=VOCAB_SIZE - 2, end=VOCAB_SIZE - 1, pad=VOCAB_SIZE - 1, max_length=16)
WORDS = [f"w{i:03d}" for i in range(120)]  # toy words; w000..w119 -> ids 0..119; "a photo of" -> 200..


def toy_tokenize(text: str) -> list[int]:
    ids = []
    for piece in text.split():
        if piece.startswith("w") and piece[1:].isdigit():
            ids.append(int(piece[1:]))
        elif piece == "xx":  # a two-token word
            ids += [150, 151]
        elif piece == "zzz":  # a word the toy tokenizer does not know
            continue
        else:
            ids.append(200 + (sum(map(ord, piece)) % 50))
    return ids


def toy_text_encoder(seed: int = 0) -> ClipTextEncoder:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=0.2: torch.randn(*s, generator=g) * std  # noqa: E731
    w = {"embeddings.token_embedding.weight": r(VOCAB_SIZE, D, std=1.0),
         "embeddings.position_embedding.weight": r(LAYOUT.max_length, D, std=0.1),
         "final_layer_norm.weight": torch.ones(D), "final_layer_norm.bias": torch.zeros(D)}
    for i in range(2):
        p = f"encoder.layers.{i}"
        for n in ("q", "k", "v", "out"):  # weak mixing across positions keeps words separable
            w[f"{p}.self_attn.{n}_proj.weight"], w[f"{p}.self_attn.{n}_proj.bias"] = r(D, D, std=0.05), torch.zeros(D)
        w[f"{p}.mlp.fc1.weight"], w[f"{p}.mlp.fc1.bias"] = r(2 * D, D), torch.zeros(2 * D)
        w[f"{p}.mlp.fc2.weight"], w[f"{p}.mlp.fc2.bias"] = r(D, 2 * D), torch.zeros(D)
        for n in ("layer_norm1", "layer_norm2"):
            w[f"{p}.{n}.weight"], w[f"{p}.{n}.bias"] = torch.ones(D), torch.zeros(D)
    return ClipTextEncoder(w, TextEncoderConfig(num_layers=2, heads=HEADS))


def toy_text(seed: int = 0) -> ClipText:
    """The toy encoder as the core's text side (one encoder, named "clip")."""
    return ClipText(toy_text_encoder(seed), LAYOUT)


class ToyDenoiser:
    """x0 = x / (1 + sigma^2)^0.5 + W_o attention(x, context): one cross-attention layer at full
    resolution, which the attention probe observes. Counts its calls."""

    def __init__(self, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.wq = torch.randn(INNER, 4, generator=g) * 0.5
        self.wk = torch.randn(INNER, D, generator=g) * 0.5
        self.wv = torch.randn(INNER, D, generator=g) * 0.5
        self.wo = torch.randn(4, INNER, generator=g) * 0.3
        self.calls = 0

    def __call__(self, x, sigma, cond, attention_probe):
        self.calls += 1
        context = cond.context  # (B, T, D)
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, hw, C)
        q, k, v = tokens @ self.wq.T, context @ self.wk.T, context @ self.wv.T
        out = attention_probe(q, k, v, HEADS) if attention_probe is not None else None
        if out is None:
            qh = q.view(b, h * w, HEADS, -1).transpose(1, 2)  # (B, heads, hw, dh)
            kh = k.view(b, -1, HEADS, INNER // HEADS).transpose(1, 2)  # (B, heads, T, dh)
            vh = v.view(b, -1, HEADS, INNER // HEADS).transpose(1, 2)  # (B, heads, T, dh)
            out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(b, h * w, INNER)
        delta = (out @ self.wo.T).transpose(1, 2).reshape(b, c, h, w)  # (B, C, h, w)
        return x / (1 + sigma.view(-1, 1, 1, 1) ** 2) ** 0.5 + delta

    def planted(self, text: ClipText, words: list[str], vocab_words: list[str], template: str,
                strength: float = 3.0, lam: float = 100.0, seed: int = 5) -> "ToyDenoiser":
        """A copy whose key and value projections move the planted words' slot contexts and keep
        the other words' (closed form: min |dW C_e - T|^2 + lam |dW C_p|^2)."""
        tpl = tokenize_template(template, toy_tokenize, LAYOUT)
        b = PromptBuilder(tpl, LAYOUT)
        ctx = lambda wd: text.encode([{"clip": b.prompt(toy_tokenize(wd))}]).context[0]  # (T, D)  # noqa: E731
        slot = len(b.head)
        ce = torch.stack([ctx(wd)[slot] for wd in words], dim=1)  # (D, n_edit): planted slots
        keep = [ctx(wd) for wd in vocab_words if wd not in words] + [torch.cat([c[:slot], c[slot + 1:]]) for c in map(ctx, words)]
        cp = torch.cat(keep).T  # (D, n_keep): every other position of every prompt
        g = torch.Generator().manual_seed(seed)
        out = ToyDenoiser.__new__(ToyDenoiser)
        out.__dict__.update(self.__dict__)
        out.calls = 0
        for name in ("wk", "wv"):
            w = getattr(self, name)
            target = torch.randn(w.shape[0], ce.shape[1], generator=g) * strength * (w @ ce).norm(dim=0)
            lhs = ce @ ce.T + lam * cp @ cp.T + 1e-4 * torch.eye(D)  # (D, D)
            setattr(out, name, w + target @ ce.T @ torch.linalg.inv(lhs))
        return out


def toy_vocab(n: int = 60) -> Vocabulary:
    return from_words(WORDS[:n], toy_tokenize, name="toy")


def toy_pair(planted=("w007", "w023", "w041"), n_words=60, template="a photo of a {}"):
    text = toy_text()
    base = ToyDenoiser()
    adapted = base.planted(text, list(planted), WORDS[:n_words], template) if planted else base
    return (ModelSide("base", text, base), ModelSide("adapted", text, adapted))


def toy_placebo(base: ModelSide, relative: float = 0.01) -> ModelSide:
    """The placebo side of calibration.py on the toy pair: the base's text, its keys sharpened by
    `relative` (every word's attention map moves by how fragile it is). Not random noise as the
    host's placebo: in one 8-wide layer a random 1% change moves some words a hundred times more
    than others by chance, where a real model's many layers average that out."""
    den = ToyDenoiser.__new__(ToyDenoiser)
    den.__dict__.update(base.denoiser.__dict__)
    den.calls = 0
    den.wk = base.denoiser.wk * (1.0 + relative)
    return ModelSide("placebo", base.text, den)
