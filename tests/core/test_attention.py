"""Method step 4's attention probe: which layers it records, and that it changes no output."""
import torch
import torch.nn.functional as F

from driftscope_core.attention import SlotAttentionProbe, attend, attention_probabilities


def _layer(queries, tokens=6, inner=8, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed + queries)
    return (torch.randn(batch, queries, inner, generator=g), torch.randn(batch, tokens, inner, generator=g),
            torch.randn(batch, tokens, inner, generator=g))


def _mask(batch=2, tokens=6):
    m = torch.zeros(batch, tokens)
    m[:, 2] = 1.0
    return m


def _run(probe, resolutions):
    return [probe(*_layer(q), heads=2) for q in resolutions]


def test_records_the_highest_resolution_layers_of_an_sd1_unet():
    probe = SlotAttentionProbe(_mask())
    outs = _run(probe, [64, 16, 4, 16, 64, 64])  # input blocks high to low, output blocks back up
    assert [o is not None for o in outs] == [True, False, False, False, True, True]
    assert probe.stacked().shape == (2, 3, 64)  # (B, layers, Q)


def test_records_half_resolution_when_the_model_has_none_at_full_resolution():
    """SDXL: cross-attention only at latent/2 and latent/4; a full-resolution rule records nothing."""
    probe = SlotAttentionProbe(_mask())
    outs = _run(probe, [16, 16, 4, 4, 16, 16])
    assert [o is not None for o in outs] == [True, True, False, False, True, True]
    assert probe.stacked().shape == (2, 4, 16)


def test_a_higher_resolution_seen_later_restarts_the_recording():
    probe = SlotAttentionProbe(_mask())
    _run(probe, [4, 4, 16])
    assert probe.stacked().shape == (2, 1, 16)


def test_recorded_layers_return_the_attention_the_host_computes():
    q, k, v = _layer(64)
    probe = SlotAttentionProbe(_mask())
    out = probe(q, k, v, heads=2)
    qh, kh, vh = (t.view(2, -1, 2, 4).transpose(1, 2) for t in (q, k, v))  # (B, heads, L, d)
    want = F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(2, 64, 8)  # (B, Q, inner)
    assert torch.allclose(out, want, atol=1e-5)
    assert torch.allclose(attend(attention_probabilities(q, k, 2), v), want, atol=1e-5)


def test_no_cross_attention_is_a_clear_error():
    probe = SlotAttentionProbe(_mask())
    try:
        probe.stacked()
    except RuntimeError as err:
        assert "prediction" in str(err)
    else:
        raise AssertionError("an empty probe must say that the objective cannot be measured")
