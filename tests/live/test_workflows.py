"""Tier 3: the example workflows (API-format twins) through a live ComfyUI server with the
tiny demo models: stock loaders, stock LoRA loader, stock SaveImage, our nodes."""
import copy
import json
import time

import pytest
from PIL import Image

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]
PLANTED = {"tiger", "bicycle", "castle"}
SMALL_VOCAB = ["tiger", "bicycle", "castle", "apple", "river", "chair", "cloud", "horse", "lamp", "mountain",
               "bread", "guitar", "forest", "boat", "candle", "rabbit", "bridge", "flower", "clock", "shoe"]


def workflow(demo_script, name, **audit_inputs):
    prompt = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
    prompt = demo_script.demo_overrides(prompt, name)
    prompt["10"]["inputs"].update(audit_inputs)
    return prompt


def small(prefix, **kw):
    return dict(vocabulary="custom", custom_words="\n".join(SMALL_VOCAB), **kw)


def saved_report(server, entry, harness):
    text = harness.outputs_of(entry, "13")["text"][0]
    json_rel = text.replace("saved ", "").split(" and ")[0]
    return json.loads((server.output_directory / json_rel).read_text()), server.output_directory / json_rel


def test_lora_side_effects_workflow_finds_the_planted_words(demo_server, demo_script, comfy_server_module):
    prompt = workflow(demo_script, "lora_side_effects")
    prompt["12"]["inputs"]["filename_prefix"] = "t_lora/evidence"
    prompt["13"]["inputs"]["filename_prefix"] = "t_lora/report"
    t = time.perf_counter()
    entry = demo_server.run(prompt, timeout=1500)
    print(f"lora_side_effects (cifar100, quick, 64 px): {time.perf_counter() - t:.1f}s")
    table = comfy_server_module.outputs_of(entry, "10")["text"][0]
    report, path = saved_report(demo_server, entry, comfy_server_module)
    assert {e["token"] for e in report["entries"][:3]} == PLANTED
    assert all(e["significant"] for e in report["entries"][:3])
    assert not any(e["significant"] for e in report["entries"][3:])
    assert report["models"]["adapted"]["weight_patches"] > 0 and report["models"]["base"]["weight_patches"] == 0
    assert path.with_suffix(".csv").read_text().startswith("rank,token")
    assert sum(w in "\n".join(table.splitlines()[2:5]) for w in PLANTED) == 3
    image = comfy_server_module.outputs_of(entry, "12")["images"][0]
    with Image.open(demo_server.output_directory / image["subfolder"] / image["filename"]) as grid:
        assert grid.width > 3 * 64 and grid.height > 4 * 64  # 4 rows of base | adapted | difference


def test_checkpoint_vs_checkpoint_workflow_finds_the_planted_words(demo_server, demo_script, comfy_server_module):
    prompt = workflow(demo_script, "checkpoint_vs_checkpoint", **small("t_ckpt"))
    prompt["12"]["inputs"]["filename_prefix"] = "t_ckpt/evidence"
    prompt["13"]["inputs"]["filename_prefix"] = "t_ckpt/report"
    entry = demo_server.run(prompt, timeout=900)
    report, _ = saved_report(demo_server, entry, comfy_server_module)
    assert {e["token"] for e in report["entries"][:3]} == PLANTED
    assert report["models"]["adapted"]["weight_patches"] == 0  # a second checkpoint, not a patch


def test_bad_template_fails_with_the_input_named(demo_server, demo_script, comfy_server_module):
    prompt = workflow(demo_script, "lora_side_effects", **small("t_bad", templates="a photo without a slot"))
    with pytest.raises(comfy_server_module.PromptFailed) as err:
        demo_server.run(prompt, timeout=300)
    assert err.value.node_type == "DriftScopeAudit"
    assert "exactly one" in err.value.exception_message and "template" in err.value.exception_message


def test_cancel_stops_the_audit_and_leaves_the_models_as_they_were(demo_server, demo_script, comfy_server_module):
    harness = comfy_server_module
    scan = workflow(demo_script, "lora_side_effects", **small("t_cancel", top_k=5, seed=11))
    del scan["11"], scan["12"]  # audit and report only
    before, _ = saved_report(demo_server, demo_server.run(scan, timeout=600), harness)

    paper = workflow(demo_script, "lora_side_effects", **small("t_cancel", mode="paper", top_k=5, seed=12))
    del paper["11"], paper["12"]
    prompt_id = demo_server.queue(paper)
    time.sleep(8)
    demo_server.interrupt()
    entry = demo_server.wait(prompt_id, timeout=300)
    assert entry["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])

    again = copy.deepcopy(scan)
    again["10"]["inputs"]["top_k"] = 4  # a changed input makes ComfyUI run the audit again
    after, _ = saved_report(demo_server, demo_server.run(again, timeout=600), harness)
    assert [(e["token"], e["per_seed"]) for e in after["entries"]] == [(e["token"], e["per_seed"]) for e in before["entries"][:4]]
