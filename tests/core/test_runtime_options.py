"""Memory and precision options change cost, not results."""
import torch

from driftscope_core.meter import DriftMeter, SamplingSettings
from driftscope_core.models import Runtime
from driftscope_core.prompts import tokenize_template
from driftscope_core.sampling import Schedule
from driftscope_core.soft_prompt import SoftPrompt
from toy_models import LAYOUT, toy_pair, toy_tokenize, toy_vocab

SCHEDULE = Schedule(sigmas=torch.linspace(10.0, 0.0, 11), initial_scale=10.0)


def soft_gradient(runtime: Runtime, seeds=(1, 2, 3), favour: str | None = None):
    base, adapted = toy_pair()
    tpl = [tokenize_template("a photo of a {}", toy_tokenize, LAYOUT)]
    meter = DriftMeter(base, adapted, toy_vocab(), tpl, SCHEDULE, SamplingSettings(latent_shape=(4, 4, 4), kept_steps=3), runtime)
    soft = SoftPrompt(len(meter.vocab), seed=0)
    if favour is not None:  # make the soft prompt all but choose this word
        with torch.no_grad():
            soft.logits[[c.text for c in meter.vocab.candidates].index(favour)] += 20.0
    one_hot = soft.sample(1.0, torch.Generator().manual_seed(0))
    drift = meter.soft_backward(one_hot, list(seeds), sign=-1.0)
    return drift, soft.logits.grad, adapted.counts


def test_gradient_checkpointing_and_micro_batches_give_the_same_gradient():
    d0, g0, c0 = soft_gradient(Runtime(micro_batch=8))
    d1, g1, c1 = soft_gradient(Runtime(micro_batch=1, gradient_checkpointing=True))
    assert torch.allclose(d0, d1, atol=1e-6) and torch.allclose(g0, g1, atol=1e-6, rtol=1e-4)
    assert torch.isfinite(g0).all() and g0.abs().sum() > 0
    # checkpointing recomputes every forward pass once during the backward pass
    assert c1.unet_forward == 2 * c0.unet_forward and c1.unet_backward == c0.unet_backward


def test_autocast_keeps_the_soft_prompt_and_its_gradient_in_float32():
    # a planted word: a drift well above bf16's rounding noise (a word the edit left alone
    # drifts so little that bf16 rounding alone changes its drift by half)
    drift, grad, _ = soft_gradient(Runtime(autocast_dtype=torch.bfloat16), favour="w023")
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0
    exact, _, _ = soft_gradient(Runtime(), favour="w023")
    # bf16 model passes: per-sample drifts move by up to ~20% on this toy, the mean much less
    assert abs(float(drift.mean()) - float(exact.mean())) < 0.15 * float(exact.mean())
