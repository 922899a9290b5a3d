"""The placebo of the calibration (calibration.py, host.placebo_model): a seeded random
low-rank change of the base through ComfyUI's own LoRA code, of the size asked for, that leaves
the input model as it was."""
import pytest
import torch

import comfy.model_management as mm

from audit_helpers import PLANTED, TEMPLATE, WORDS, assert_same, audit, fingerprint


@pytest.fixture(scope="module")
def tiny(demo_models):
    model, clip, vae = demo_models.tiny_sd15(0)
    return model, clip, demo_models.planted_edit_in_process(model, clip, PLANTED, WORDS, TEMPLATE)


def weights(patcher) -> dict:
    """The diffusion model's weights as `patcher` computes them (loaded: its patches applied)."""
    mm.load_models_gpu([patcher])
    return {n: p.detach().float().clone() for n, p in patcher.model.diffusion_model.named_parameters()}


def test_the_placebo_moves_every_weight_by_about_the_size_asked_for(pack, tiny):
    model, _, _ = tiny
    host = pack.nodes.host
    before = weights(model)
    placebo = host.placebo_model(model, 0.01, seed=3)
    changed = weights(placebo)
    moved = {n: float((changed[n] - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt())
             for n, w in before.items() if w.ndim in (2, 4) and n.endswith(".weight") and w.abs().sum() > 0}
    assert len(moved) > 20 and len(placebo.patches) == len(moved)
    relative = torch.tensor(list(moved.values()))
    assert 0.007 < float(relative.median()) < 0.013  # 1% of each weight's RMS, a rank-16 draw's spread around it
    assert float(relative.min()) > 0.003
    others = [n for n, w in before.items() if n not in moved]  # biases, norms, zero weights
    assert others and all(torch.equal(changed[n], before[n]) for n in others)
    assert not model.patches or len(model.patches) < len(placebo.patches)
    assert all(torch.equal(t, before[n]) for n, t in weights(model).items())  # the input again, exactly


def test_the_placebo_is_seeded(pack, tiny):
    model, _, _ = tiny
    host = pack.nodes.host
    a, b, c = (weights(host.placebo_model(model, 0.01, seed=s)) for s in (5, 5, 6))
    name = next(n for n, w in a.items() if w.ndim == 2)
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])


def test_an_audit_with_its_placebo_leaves_the_inputs_unchanged_and_reports_it(pack, tiny):
    model, clip, adapted = tiny
    before = fingerprint(model, clip), fingerprint(adapted, clip)
    report = audit(pack, model, clip, adapted, mode="screen")
    assert report.settings["placebo"] == 0.01 and report.baseline["reference"] == "placebo"
    assert report.evaluations["placebo"]["unet_forward"] > 0
    assert all(e.placebo_drift is not None and e.placebo_drift > 0 for e in report.entries)
    assert {e.token for e in report.entries[:3]} == set(PLANTED)
    assert all(e.significant for e in report.entries[:3])
    assert_same(fingerprint(model, clip), before[0])
    assert_same(fingerprint(adapted, clip), before[1])
    off = audit(pack, model, clip, adapted, mode="screen", placebo=0.0)
    assert off.baseline["reference"] == "none" and "placebo" not in off.evaluations
    assert [e.token for e in off.entries] == [e.token for e in report.entries]  # the order is the drift's alone
