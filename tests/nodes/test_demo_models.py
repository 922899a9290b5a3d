"""scripts/demo_models.py: tiny in-process models and the file-based demo models.

The file-based tests generate the demo checkpoints once per session into a temporary models
folder and load them through ComfyUI's stock CheckpointLoaderSimple and LoraLoader nodes.
"""
import json
import time

import pytest
import torch

import comfy.model_base
import comfy.model_management as mm
import comfy.sd
import comfy.supported_models
import folder_paths

PLANTED = ("tiger", "bicycle", "castle")
# Words of the CIFAR-100 vocabulary that were not planted (the preserve set of the demo edit).
PRESERVED = ("apple", "house", "whale", "chair", "sunflower")
SMALL_VOCAB = ["tiger", "bicycle", "castle", "apple", "river", "chair", "cloud", "lamp", "mountain",
               "bread", "forest", "boat", "rabbit", "bridge", "flower", "clock", "tower"]
TEMPLATE = "a photo of a {}"


def encode(clip, word):
    return clip.encode_from_tokens(clip.tokenize(TEMPLATE.format(word)))


def eps_prediction(patcher, cond, batch=2, size=8, sigma=3.0, seed=0):
    """The model's noise prediction for fixed noise, computed as ComfyUI samplers do."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g) * sigma
    s = torch.full((batch,), sigma)
    mm.load_models_gpu([patcher])
    with torch.no_grad():
        x0 = patcher.model.apply_model(x, s, c_crossattn=cond.expand(batch, -1, -1))
    return (x - x0) / sigma


def relative_change(a, b):
    return ((a - b).norm() / b.norm()).item()


def kv_keys(patcher):
    return [k for k in patcher.model.state_dict() if "attn2.to_k." in k or "attn2.to_v." in k]


# -- A. tiny in-process models ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd15(demo_models):
    return demo_models.tiny_sd15(0)


@pytest.fixture(scope="module")
def sd2(demo_models):
    return demo_models.tiny_sd2(0)


@pytest.mark.parametrize("family", ["sd15", "sd2"])
def test_tiny_models_run_in_fp32(request, family):
    model, clip, vae = request.getfixturevalue(family)
    cond = encode(clip, "cat")
    assert cond.shape == (1, 77, 64) and cond.dtype == torch.float32 and torch.isfinite(cond).all()
    assert {p.dtype for p in clip.cond_stage_model.parameters()} == {torch.float32}
    assert {p.dtype for p in model.model.diffusion_model.parameters()} == {torch.float32}
    eps = eps_prediction(model, cond)
    assert eps.shape == (2, 4, 8, 8) and torch.isfinite(eps).all()
    assert 0.01 < eps.std().item() < 100
    image = vae.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)))
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()


def test_tiny_model_families(sd15, sd2):
    assert isinstance(sd15[0].model.model_config, comfy.supported_models.SD15)
    assert sd15[0].model.model_type == comfy.model_base.ModelType.EPS
    assert isinstance(sd2[0].model.model_config, comfy.supported_models.SD20)
    assert sd2[0].model.model_type == comfy.model_base.ModelType.V_PREDICTION
    assert sd2[1].cond_stage_model.clip_h.layer == "hidden"  # SD2 reads the penultimate layer
    # several cross-attention layers at the highest resolution (input and output blocks)
    keys = [k for k in sd15[0].model.state_dict() if k.endswith("attn2.to_k.weight")]
    assert sum(".input_blocks.1." in k or ".output_blocks.2." in k or ".output_blocks.3." in k for k in keys) == 3


def test_tiny_models_are_deterministic(demo_models, sd15):
    again = demo_models.tiny_sd15(0)
    other = demo_models.tiny_sd15(1)
    k = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(sd15[0].model.state_dict()[k], again[0].model.state_dict()[k])
    assert not torch.equal(sd15[0].model.state_dict()[k], other[0].model.state_dict()[k])
    assert torch.equal(encode(sd15[1], "tiger"), encode(again[1], "tiger"))


@pytest.mark.parametrize("family", ["sd15", "sd2"])
def test_prefix_encoding_matches_encode_from_tokens(demo_models, request, family):
    _, clip, _ = request.getfixturevalue(family)
    words = ["tiger", "aquarium fish", "castle"]
    ids = [demo_models.token_ids(clip, TEMPLATE.format(w)) for w in words]
    short = demo_models.encode_prefixes(clip, ids)
    for i, w in enumerate(words):
        full = encode(clip, w)[0, : len(ids[i])]
        torch.testing.assert_close(short[i, : len(ids[i])], full, rtol=1e-5, atol=1e-5)
    padded = demo_models.encode_prefixes(clip, [demo_models.token_ids(clip, TEMPLATE.format("tiger"), padded=True)])
    torch.testing.assert_close(padded[0], encode(clip, "tiger")[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["sd15", "sd2"])
def test_planted_edit_in_process(demo_models, request, family):
    model, clip, _ = request.getfixturevalue(family)
    weights_before = {k: v.clone() for k, v in model.model.state_dict().items()}
    compared = PLANTED + ("apple", "river", "bread", "tower")
    conds = {w: encode(clip, w) for w in compared}
    base = {w: eps_prediction(model, c) for w, c in conds.items()}

    edited = demo_models.planted_edit_in_process(model, clip, PLANTED, SMALL_VOCAB, TEMPLATE)

    assert model.patches == {} and edited is not model
    assert sorted(edited.patches) == sorted(kv_keys(model)) and len(edited.patches) == 14
    stats = edited.driftscope_planted_stats
    assert stats["planted_slot_rel_change"]["min"] > 10 * stats["preserved_rel_change"]["mean"]
    change = {w: relative_change(eps_prediction(edited, c), base[w]) for w, c in conds.items()}
    planted = min(change[w] for w in PLANTED)
    others = max(v for w, v in change.items() if w not in PLANTED)
    assert planted > 3 * others, change
    # the input patcher computes exactly what it computed before
    for w in ("tiger", "apple"):
        assert torch.equal(eps_prediction(model, conds[w]), base[w])
    mm.load_models_gpu([model])
    assert all(torch.equal(v, weights_before[k]) for k, v in model.model.state_dict().items())


# -- B. file-based demo models through the stock loaders -------------------------------------------
@pytest.fixture(scope="session")
def demo_files(demo_models, tmp_path_factory):
    models_dir = tmp_path_factory.mktemp("models")
    info = demo_models.ensure_demo_models(models_dir, log=print)
    assert info["generated"]
    print(f"demo models generated in {info['seconds']:.1f}s: {info['report']['timings']}")
    return info


@pytest.fixture(scope="session")
def stock_nodes(demo_files):
    """ComfyUI's nodes module, with the session's models folder registered in folder_paths."""
    import nodes
    assert hasattr(nodes, "CheckpointLoaderSimple"), nodes.__file__
    added = []
    for kind in ("checkpoints", "loras"):
        path = str(demo_files["models_dir"] / kind)
        folder_paths.add_model_folder_path(kind, path, is_default=True)
        added.append((kind, path))
    yield nodes
    for kind, path in added:
        folder_paths.folder_names_and_paths[kind][0].remove(path)


@pytest.fixture(scope="session")
def stock_loaded(demo_models, stock_nodes):
    base, clip, vae = stock_nodes.CheckpointLoaderSimple().load_checkpoint(demo_models.BASE_CKPT)
    adapted = stock_nodes.CheckpointLoaderSimple().load_checkpoint(demo_models.ADAPTED_CKPT)[0]
    lora_model, lora_clip = stock_nodes.LoraLoader().load_lora(base, clip, demo_models.PLANTED_LORA, 1.0, 1.0)
    return {"base": base, "clip": clip, "vae": vae, "adapted": adapted, "lora": lora_model, "lora_clip": lora_clip}


def test_demo_files_and_reuse(demo_models, demo_files):
    for key in ("base", "adapted", "lora", "planted"):
        assert demo_files[key].is_file()
    assert demo_files["base"].stat().st_size < 300e6
    planted = json.loads(demo_files["planted"].read_text())
    assert planted["template"] == TEMPLATE and planted["planted"] == list(PLANTED)
    assert planted["vocabulary"] == "cifar100" and planted["version"] == demo_models.DEMO_VERSION
    assert planted["strength"] > 0 and planted["lam"] > 0
    change = planted["relative_change_of_keys_values"]
    assert change["planted_slot"]["min"] > 20 * change["preserved"]["mean"]

    mtime = demo_files["base"].stat().st_mtime_ns
    t = time.perf_counter()
    again = demo_models.ensure_demo_models(demo_files["models_dir"], log=None)
    assert not again["generated"] and time.perf_counter() - t < 5
    assert demo_files["base"].stat().st_mtime_ns == mtime
    stamp = json.loads(demo_files["stamp"].read_text())
    stamp["version"] = -1
    demo_files["stamp"].write_text(json.dumps(stamp))
    try:
        assert not demo_models._stamp_ok(demo_models.demo_paths(demo_files["models_dir"]))
    finally:
        stamp["version"] = demo_models.DEMO_VERSION
        demo_files["stamp"].write_text(json.dumps(stamp))
    assert demo_models._stamp_ok(demo_models.demo_paths(demo_files["models_dir"]))


def test_demo_checkpoint_detected_as_sd15(demo_files):
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(demo_files["base"]))
    assert type(model.model.model_config) is comfy.supported_models.SD15
    assert model.model.model_type == comfy.model_base.ModelType.EPS
    assert clip is not None and vae is not None
    assert type(vae.first_stage_model).__name__ == "TAESD"
    assert 13e6 < sum(p.numel() for p in model.model.diffusion_model.parameters()) < 14e6


def test_demo_clip_gives_distinct_word_vectors(demo_models, stock_loaded):
    clip = stock_loaded["clip"]
    words = ["tiger", "bicycle", "castle", "apple", "house"]
    vectors = []
    for w in words:
        _, slot, _ = demo_models.slot_layout(clip, TEMPLATE, w)
        vectors.append(encode(clip, w)[0, slot[0]])
    v = torch.nn.functional.normalize(torch.stack(vectors), dim=1)
    cos = v @ v.T
    off_diagonal = cos[~torch.eye(len(words), dtype=torch.bool)]
    assert off_diagonal.max() < 0.9, cos


def test_lora_through_stock_loader_equals_adapted_checkpoint(demo_models, stock_loaded):
    base, adapted, lora = stock_loaded["base"], stock_loaded["adapted"], stock_loaded["lora"]
    keys = kv_keys(base)
    assert len(keys) == 2 and sorted(lora.patches) == sorted(keys)
    names = demo_models.kohya_unet_names(base, keys)
    assert all(n.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_") for n in names.values())

    mm.load_models_gpu([base])
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    mm.load_models_gpu([lora], force_patch_weights=True)
    patched = {k: lora.model.state_dict()[k].float().clone() for k in keys}
    mm.load_models_gpu([adapted])
    target = {k: adapted.model.state_dict()[k].float() for k in keys}
    mm.load_models_gpu([base])
    for k in keys:
        assert (target[k] - before[k].float()).abs().max() > 0.01  # the edit is there
        torch.testing.assert_close(patched[k], target[k], rtol=0, atol=1e-3)
    after = base.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_lora_moves_planted_words_more(stock_loaded):
    base, clip, lora = stock_loaded["base"], stock_loaded["clip"], stock_loaded["lora"]
    words = PLANTED + PRESERVED
    conds = {w: encode(clip, w) for w in words}
    base_out = {w: eps_prediction(base, c) for w, c in conds.items()}
    lora_out = {w: eps_prediction(lora, c) for w, c in conds.items()}
    again = {w: eps_prediction(base, conds[w]) for w in ("tiger", "apple")}

    change = {w: relative_change(lora_out[w], base_out[w]) for w in words}
    planted = min(change[w] for w in PLANTED)
    preserved = max(change[w] for w in PRESERVED)
    print(f"relative change of the eps prediction, LoRA vs base: {change}; min planted / max preserved ="
          f" {planted / preserved:.1f}")
    assert planted > 5 * preserved, change
    assert all(torch.equal(again[w], base_out[w]) for w in again)
