"""Shared by the node-tier tests: the planted demo words and the Audit's entry point as ComfyUI's
executor runs it (tests/nodes/conftest.py puts this folder on sys.path)."""
import torch

import comfy.model_management

PLANTED = ("tiger", "bicycle", "castle")
WORDS = ["tiger", "bicycle", "castle", "apple", "river", "chair", "cloud", "horse", "lamp", "mountain", "bread",
         "guitar", "forest", "boat", "candle", "rabbit", "bridge", "flower", "clock", "shoe", "tower", "lemon",
         "train", "violin", "desert", "pencil", "snake", "window", "cookie", "rocket", "aquarium fish"]
TEMPLATE = "a photo of a {}"


def audit(pack, base, clip, adapted, adapted_clip=None, **kw):
    """The node's own entry point, inside inference mode as ComfyUI's executor runs it."""
    args = dict(vocabulary="custom", custom_words="\n".join(WORDS), templates=TEMPLATE, preset="quick", mode="scan",
                scheduler="normal", precision="auto", micro_batch=8, gradient_checkpointing=False, width=32,
                height=32, top_k=5, seed=0, direction="most", objective="attention")
    args.update(kw)
    with torch.inference_mode():
        return pack.nodes.audit.audit_models(base, clip, adapted, adapted_clip or clip, **args)


def fingerprint(model, clip):
    """Outputs that change if anything about the model or the CLIP changed."""
    with torch.inference_mode():
        cond = clip.encode_from_tokens(clip.tokenize("a photo of a tiger"))
        comfy.model_management.load_models_gpu([model])
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 4, 4, generator=g)
        out = model.model.apply_model(x, torch.tensor([2.0]), c_crossattn=cond)
    return cond.clone(), out.clone()


def assert_same(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# -- shared by the per-family tests (tests/nodes/test_<family>_audit.py) ---------------------------
def family_prompts(pack, clip, family, text, words, template=TEMPLATE):
    """(vocabulary, prompts with the slot as ids, prompts with the slot as embedding rows) of
    `words` in `template` for every text encoder of `text` (a host.ComfyText), built as the
    Audit node builds them (family_vocabulary, family_templates)."""
    core, host, node = pack.driftscope_core, pack.nodes.host, pack.nodes.audit
    tokenize, _, reserved = host.tokenizer_functions(clip, family)
    vocab = node.family_vocabulary(core.vocabulary.from_words(words, tokenize, reserved_ids=reserved), clip, family)
    tpl, = node.family_templates([template], clip, family, text, vocab)
    builders = {n: core.prompts.PromptBuilder(tpl.for_encoder(n), lay) for n, lay in text.layouts.items()}
    by_ids = [{n: b.prompt(c.ids(n)) for n, b in builders.items()} for c in vocab.candidates]
    by_rows = [{n: b.prompt(text.token_embedding(n)[torch.tensor(c.ids(n))]) for n, b in builders.items()}
               for c in vocab.candidates]
    return vocab, by_ids, by_rows


def stock_first_x0(model, clip, prompt, noise, sigmas, cfg, seed):
    """The x0 ComfyUI's own sampler (CFGGuider, euler) computes at its first step for `prompt`
    against the empty negative, both as CLIPTextEncode makes them."""
    import comfy.samplers
    seen = {}
    guider = comfy.samplers.CFGGuider(model)
    encode = lambda t: clip.encode_from_tokens_scheduled(clip.tokenize(t))  # noqa: E731
    guider.set_conds(encode(prompt), encode(""))
    guider.set_cfg(cfg)
    guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas[:2],
                  callback=lambda step, x0, x, total: seen.setdefault(step, x0.clone()), disable_pbar=True, seed=seed)
    return seen[0].float()


def pack_first_x0(pack, family, model, clip, word, noise, cfg, steps=10, scheduler="simple"):
    """The pack's guided x0 at the first step of the model's schedule for `word` in TEMPLATE."""
    core, host = pack.driftscope_core, pack.nodes.host
    runtime = host.runtime_for("fp32", 4, False)
    base, _ = host.model_sides(family, model, clip, model, clip, runtime, need_grad=False,
                               guidance=family.sampling_defaults(model)["guidance"])
    _, by_ids, _ = family_prompts(pack, clip, family, base.text, [word])
    schedule = host.schedule_of(model, scheduler, steps)
    x0, _ = core.objective._guided_x0(base, noise * schedule.initial_scale, schedule.sigmas[0], base.encode(by_ids),
                                      base.empty_prompt(), cfg, False, runtime)
    return x0, schedule.sigmas


def dit_fingerprint(model, clip, latent_shape=(1, 16, 8, 8)):
    """An output of a DiT model on its CLIP's conditioning that changes if either changed."""
    with torch.inference_mode():
        out = clip.encode_from_tokens(clip.tokenize("a photo of a castle"), return_dict=True)
        comfy.model_management.load_models_gpu([model])
        x = torch.randn(*latent_shape, generator=torch.Generator().manual_seed(0))
        conds = model.model.extra_conds(cross_attn=out["cond"], pooled_output=out.get("pooled_output"), device=x.device,
                                        noise=x)
        return model.model.apply_model(x, torch.tensor([0.7]), **{k: c.cond for k, c in conds.items()}).clone()


def assert_paper_mode_leaves_models_unchanged(pack, model, clip, adapted, latent_shape=(1, 16, 8, 8), **audit_args):
    """A paper-mode audit runs (backward passes counted) and both models compute as before."""
    before = dit_fingerprint(model, clip, latent_shape), dit_fingerprint(adapted, clip, latent_shape)
    report = audit(pack, model, clip, adapted, None, mode="paper", top_k=1, opt_steps=2, **audit_args)
    assert report.evaluations["adapted"]["unet_backward"] > 0
    after = dit_fingerprint(model, clip, latent_shape), dit_fingerprint(adapted, clip, latent_shape)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
