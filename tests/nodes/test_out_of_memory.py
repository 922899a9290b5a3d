"""A GPU out-of-memory error, injected on the CPU where ComfyUI's model call would raise it,
becomes a message that names the inputs to lower, stays an out-of-memory error for ComfyUI's
executor (which unloads models on it), and leaves the input models as they were."""
import pytest
import torch

import comfy.model_management

from audit_helpers import PLANTED, WORDS, TEMPLATE, assert_same, audit, fingerprint

errors = pytest.importorskip("DriftScope.nodes.errors")
host = pytest.importorskip("DriftScope.nodes.host")

CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.65 GiB total capacity)"


@pytest.fixture(scope="module")
def models(demo_models):
    model, clip, _ = demo_models.tiny_sd15(0)
    return model, clip, demo_models.planted_edit_in_process(model, clip, PLANTED, WORDS, TEMPLATE)


@pytest.fixture
def oom_after(monkeypatch):
    """Make the n-th UNet call raise CUDA's out-of-memory error."""
    def arm(n):
        calls = {"n": 0}
        real = host.UNetDenoiser.__call__

        def call(self, *args):
            calls["n"] += 1
            if calls["n"] >= n:
                raise torch.OutOfMemoryError(CUDA_OOM)
            return real(self, *args)

        monkeypatch.setattr(host.UNetDenoiser, "__call__", call)
    return arm


@pytest.mark.parametrize("mode,after", [("scan", 1), ("paper", 3)])
def test_audit_out_of_memory_names_what_to_lower(pack, models, oom_after, mode, after):
    model, clip, adapted = models
    before = fingerprint(model, clip), fingerprint(adapted, clip)
    oom_after(after)
    advice = errors.audit_advice(micro_batch=8, width=32, height=32, mode=mode, gradient_checkpointing=False)
    with pytest.raises(errors.DriftScopeOutOfMemory) as caught:
        with errors.out_of_memory_advice("DriftScope Audit", advice):
            audit(pack, model, clip, adapted, mode=mode, top_k=1, opt_steps=3)
    message = str(caught.value)
    assert "micro_batch (now 8)" in message and "width/height (now 32x32)" in message
    assert ("gradient_checkpointing" in message) == (mode == "paper")
    assert "CUDA out of memory" in message and "unchanged" in message
    assert comfy.model_management.is_oom(caught.value) if hasattr(comfy.model_management, "is_oom") \
        else isinstance(caught.value, comfy.model_management.OOM_EXCEPTION)
    after_run = fingerprint(model, clip), fingerprint(adapted, clip)
    assert_same(before[0], after_run[0])
    assert_same(before[1], after_run[1])


def test_other_errors_and_the_cancel_pass_through_unchanged():
    with pytest.raises(ValueError, match="not memory"):
        with errors.out_of_memory_advice("DriftScope Audit", "lower micro_batch"):
            raise ValueError("not memory")
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        with errors.out_of_memory_advice("DriftScope Audit", "lower micro_batch"):
            raise comfy.model_management.InterruptProcessingException()


def test_the_nodes_themselves_translate_out_of_memory(pack, demo_models, models, oom_after, monkeypatch):
    """What a user sees: the Audit and Evidence Grid nodes' execute, not only the helper."""
    from types import SimpleNamespace

    import comfy.sample

    nodes = pack.nodes
    model, clip, adapted = models
    for node in (nodes.audit.DriftScopeAudit, nodes.evidence.DriftScopeEvidenceGrid):
        monkeypatch.setattr(node, "hidden", SimpleNamespace(unique_id=None), raising=False)
    report = audit(pack, model, clip, adapted, top_k=2)
    oom_after(1)
    with torch.inference_mode(), pytest.raises(errors.DriftScopeOutOfMemory, match=r"micro_batch \(now 2\)"):
        nodes.audit.DriftScopeAudit.execute(
            model, clip, adapted, clip, vocabulary="custom", custom_words="\n".join(WORDS), templates=TEMPLATE,
            preset="quick", mode="scan", direction="most", objective="attention", top_k=2, seed=0, width=32,
            height=32, scheduler="normal", precision="auto", micro_batch=2, gradient_checkpointing=False)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(comfy.sample, "sample", out_of_memory)
    vae = demo_models.tiny_vae(0)
    with torch.inference_mode(), pytest.raises(errors.DriftScopeOutOfMemory, match=r"width/height \(now 32x32\)"):
        nodes.evidence.DriftScopeEvidenceGrid.execute(
            report, model, clip, adapted, clip, vae, top_n=1, seed=0, steps=2, cfg=7.5, sampler_name="euler",
            scheduler="normal", width=0, height=0)


def test_an_audit_too_large_for_the_free_memory_is_refused_before_it_starts(pack, models, monkeypatch):
    """A floor estimate of one model call against half the free memory (the 4096 px audit on a
    CPU drew the kernel's OOM killer before a cancel could act): refused naming width/height and
    micro_batch with a micro_batch that fits, before any model runs."""
    model, clip, adapted = models
    calls = []
    monkeypatch.setattr(host.UNetDenoiser, "__call__", lambda self, *a: calls.append(1))
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: 100 * 2**20)  # 100 MB free (a tiny model)
    with pytest.raises(host.InputError, match=r"width/height 512x512 with micro_batch 32.*micro_batch to \d+ or less"):
        audit(pack, model, clip, adapted, width=512, height=512, micro_batch=32)
    with pytest.raises(host.InputError, match=r"width/height 4096x4096 .*lower width/height"):
        host.check_memory(model, 4096, 4096, pack.driftscope_core.models.Runtime(micro_batch=1))
    assert calls == [], "the models ran before the refusal"


def test_a_cpu_audit_past_1024x1024_is_refused_before_it_starts(pack, models, monkeypatch):
    """One full-resolution attention grows with the square of the latent's positions and cannot
    be cancelled while it runs: 10 s at 1024x1024 on this CPU, about 45 minutes at 4096x4096."""
    model, clip, adapted = models
    calls = []
    monkeypatch.setattr(host.UNetDenoiser, "__call__", lambda self, *a: calls.append(1))
    for width, height in ((2048, 1024), (4096, 4096)):
        with pytest.raises(host.InputError, match=rf"width/height {width}x{height}: on a CPU.*GPU"):
            audit(pack, model, clip, adapted, width=width, height=height, micro_batch=1)
    assert calls == [], "the models ran before the refusal"
    cpu = pack.driftscope_core.models.Runtime()
    host.check_cpu_resolution(1024, 1024, cpu)  # the largest CPU audit passes
