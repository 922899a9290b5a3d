"""Tier 3: the example workflows checked against a live server's node definitions (every run),
and workflows/api/sdxl_lora_side_effects.json run end to end on a checkpoint the stock Load
Checkpoint node detects as SDXL with a kohya SDXL LoRA (UNet + te1 + te2 keys) that plants drift
on known words, through the stock LoraLoader (only with DRIFTSCOPE_SDXL_LIVE=1: `make test-sdxl`).

The UI twins (workflows/<name>.json) are compared with the editor's own conversion of them in
tests/live/test_frontend.py::test_ui_workflow_is_twin_of_api_workflow, for every workflow.
"""
import json
import os
import resource
import time
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
API_DIR, UI_DIR = REPO / "workflows" / "api", REPO / "workflows"
WORKFLOWS = sorted(p.stem for p in API_DIR.glob("*.json"))
SDXL = "sdxl_lora_side_effects"
AUDIT, GRID, GRID_SAVE, REPORT_SAVE = "10", "11", "12", "13"
# combos listing the server's model files: the user's own names
FILE_INPUTS = {"ckpt_name", "lora_name", "unet_name", "clip_name", "clip_name1", "clip_name2", "clip_name3", "vae_name"}
SDXL_LIVE = os.environ.get("DRIFTSCOPE_SDXL_LIVE", "").strip() == "1"
# Measured on a busy shared 2-core CPU (README, `make test-sdxl`): the workflow 497 s (ComfyUI
# 0.33.0) and 528 s (0.3.75), server peak RSS 5.7 and 4.7 GB, the demo files 9.6 min to build
# once; the whole default suite has a 30 min budget for both versions.
SDXL_SKIP = ("the SDXL workflow's live run takes about 9 min and 6 GB on a 2-core CPU (SDXL's full-size "
             "text encoders, a 1.9 GB checkpoint): set DRIFTSCOPE_SDXL_LIVE=1 or run `make test-sdxl`")


def _inputs(info: dict) -> dict:
    """{input name: (type, options)} of a node definition from /object_info."""
    out = {}
    for section in ("required", "optional"):
        for name, spec in (info["input"].get(section) or {}).items():
            out[name] = (spec[0], spec[1] if len(spec) > 1 else {}, section == "required")
    return out


def _check_value(where: str, name: str, kind, options: dict, value) -> None:
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else options.get("options", [])
        if name in FILE_INPUTS:
            assert isinstance(value, str) and value.endswith(".safetensors"), (where, name, value)
        else:
            assert value in choices, f"{where}: {name}={value!r} is not one of {choices}"
    elif kind in ("INT", "FLOAT"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (where, name, value)
        if kind == "INT":
            assert value == int(value), f"{where}: {name}={value!r} is not an integer"
            step = options.get("step", 1)
            assert (value - options.get("min", 0)) % step == 0 or value == 0, (where, name, value, step)
        assert options.get("min", value) <= value <= options.get("max", value), (where, name, value, options)
    elif kind == "STRING":
        assert isinstance(value, str), (where, name, value)
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), (where, name, value)
    else:
        pytest.fail(f"{where}: {name} is a {kind} socket but holds the value {value!r}, not a link")


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_matches_the_servers_node_definitions(demo_server, name):
    """Every node of the API workflow exists on the server; every input is one the node has,
    every required one is set, links join outputs and inputs of the same type, and every
    widget value fits its input (combo choice, number range and type); the UI twin has the same
    nodes, types and titles."""
    api = json.loads((API_DIR / f"{name}.json").read_text(encoding="utf-8"))
    info = demo_server.object_info()
    unknown = sorted({n["class_type"] for n in api.values()} - set(info))
    assert not unknown, f"{name}: node types the server does not know: {unknown}"
    for node_id, node in api.items():
        where = f"{name} node {node_id} ({node['class_type']})"
        spec = _inputs(info[node["class_type"]])
        assert not set(node["inputs"]) - set(spec), f"{where}: unknown inputs {set(node['inputs']) - set(spec)}"
        missing = [k for k, (_, _, required) in spec.items() if required and k not in node["inputs"]]
        assert not missing, f"{where}: required inputs not set: {missing}"
        for key, value in node["inputs"].items():
            kind, options, _ = spec[key]
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                source, slot = value
                assert source in api, f"{where}: {key} links to missing node {source}"
                outputs = info[api[source]["class_type"]]["output"]
                assert outputs[slot] == kind, f"{where}: {key} wants {kind}, node {source} output {slot} is {outputs[slot]}"
            else:
                _check_value(where, key, kind, options, value)

    ui = json.loads((UI_DIR / f"{name}.json").read_text(encoding="utf-8"))
    got = {str(n["id"]): (n["type"], n.get("title") or info[n["type"]]["display_name"]) for n in ui["nodes"]}
    want = {k: (n["class_type"], n.get("_meta", {}).get("title") or info[n["class_type"]]["display_name"])
            for k, n in api.items()}
    assert got == want, f"workflows/{name}.json and its API twin differ in nodes or titles"


def test_sdxl_workflow_has_sdxl_settings():
    api = json.loads((API_DIR / f"{SDXL}.json").read_text(encoding="utf-8"))
    chain = {k: n["class_type"] for k, n in api.items()}
    assert chain == {"1": "CheckpointLoaderSimple", "2": "LoraLoader", AUDIT: "DriftScopeAudit",
                     GRID: "DriftScopeEvidenceGrid", GRID_SAVE: "SaveImage", REPORT_SAVE: "DriftScopeSaveReport"}
    audit = api[AUDIT]["inputs"]
    assert (audit["width"], audit["height"]) == (512, 512)  # SDXL's audit default (nodes/families/sdxl.py)
    assert (api[GRID]["inputs"]["width"], api[GRID]["inputs"]["height"]) == (1024, 1024)  # SDXL's native size
    assert "xl" in api["1"]["inputs"]["ckpt_name"] and "sdxl" in api["2"]["inputs"]["lora_name"]
    assert audit["adapted_model"] == ["2", 0] and audit["adapted_clip"] == ["2", 1]


def test_flux_workflow_has_flux_loaders_and_guidance():
    """The Flux example uses the loaders Flux is used with (UNETLoader, LoraLoaderModelOnly,
    DualCLIPLoader type flux, VAELoader) and leaves CFG and guidance to the family (0 and -1:
    CFG 1 with dev's distilled 3.5); its grid samples at CFG 1 at Flux's native 1024 px."""
    api = json.loads((API_DIR / "flux_lora_side_effects.json").read_text(encoding="utf-8"))
    chain = {k: n["class_type"] for k, n in api.items()}
    assert chain == {"1": "UNETLoader", "2": "LoraLoaderModelOnly", "3": "DualCLIPLoader", "4": "VAELoader",
                     AUDIT: "DriftScopeAudit", GRID: "DriftScopeEvidenceGrid", GRID_SAVE: "SaveImage",
                     REPORT_SAVE: "DriftScopeSaveReport"}
    assert api["3"]["inputs"]["type"] == "flux"
    audit, grid = api[AUDIT]["inputs"], api[GRID]["inputs"]
    assert (audit["cfg"], audit["guidance"]) == (0.0, -1.0)
    assert audit["adapted_model"] == ["2", 0] and audit["base_clip"] == audit["adapted_clip"] == ["3", 0]
    assert grid["cfg"] == 1.0 and (grid["width"], grid["height"]) == (1024, 1024)


def test_chroma_workflow_has_chroma_loaders_and_real_cfg():
    api = json.loads((API_DIR / "chroma_lora_side_effects.json").read_text(encoding="utf-8"))
    assert {k: n["class_type"] for k, n in api.items() if k in ("1", "2", "3", "4")} == {
        "1": "UNETLoader", "2": "LoraLoaderModelOnly", "3": "CLIPLoader", "4": "VAELoader"}
    assert api["3"]["inputs"]["type"] == "chroma"
    assert (api[AUDIT]["inputs"]["cfg"], api[GRID]["inputs"]["cfg"]) == (0.0, 4.0)  # the family's CFG 4 in both


# ---------------------------------------------------------------------------------- the live run
@pytest.fixture(scope="module")
def sdxl_models(comfy_dir, demo_script):
    """The SDXL demo checkpoint and LoRA (built once into .demo/sdxl/models, then reused)."""
    models = REPO / ".demo" / "sdxl" / "models"
    t = time.perf_counter()
    planted = demo_script.ensure_sdxl_models(models)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    print(f"\n[sdxl] demo files ready in {time.perf_counter() - t:.1f}s (builder peak RSS {children:.2f} GB)")
    return models, planted


@pytest.mark.skipif(not SDXL_LIVE, reason=SDXL_SKIP)
def test_sdxl_lora_side_effects_workflow_finds_the_planted_words(comfy_dir, sdxl_models, demo_script,
                                                                 comfy_server_module, tmp_path):
    harness = comfy_server_module
    models, planted = sdxl_models
    base = tmp_path / "comfy-sdxl"
    base.mkdir()
    (base / "models").symlink_to(models, target_is_directory=True)
    prompt = demo_script.demo_overrides(harness.load_api_workflow(API_DIR / f"{SDXL}.json"), SDXL)
    prompt[GRID_SAVE]["inputs"]["filename_prefix"] = "t_sdxl/evidence"
    prompt[REPORT_SAVE]["inputs"]["filename_prefix"] = "t_sdxl/report"
    t0 = time.perf_counter()
    with harness.ComfyServer(comfy_dir, base_directory=base) as server:
        t1 = time.perf_counter()
        entry = server.run(prompt, timeout=1500)
        t_run = time.perf_counter() - t1
        status = Path(f"/proc/{server.pid}/status")
        peak = next((int(line.split()[1]) / 2**20 for line in status.read_text().splitlines()
                     if line.startswith("VmHWM:")), float("nan")) if status.exists() else float("nan")
        saved = harness.outputs_of(entry, REPORT_SAVE)["text"][0]
        report_path = server.output_directory / saved.replace("saved ", "").split(" and ")[0]
        image = harness.outputs_of(entry, GRID_SAVE)["images"][0]
        grid_path = server.output_directory / image["subfolder"] / image["filename"]
        table = harness.outputs_of(entry, AUDIT)["text"][0]
    print(f"[sdxl] server up in {t1 - t0:.1f}s, workflow {t_run:.1f}s, server peak RSS {peak:.2f} GB,"
          f" {time.perf_counter() - t0:.1f}s with the server's start and stop\n{table}")
    report = json.loads(report_path.read_text())
    print(f"[sdxl] evaluations {json.dumps(report['evaluations'])}, timings {json.dumps(report.get('timings'))}")
    assert report["models"]["family"] == "SDXL"
    assert {e["token"] for e in report["entries"][:3]} == set(planted["planted"]), table
    assert all(e["significant"] for e in report["entries"][:3]), table
    # The LoRA's small text-encoder modules move every prompt a little (a few ordinary words may
    # pass the threshold: that drift is real); the planted edit stands far above it.
    assert report["entries"][2]["drift"] > 10 * report["entries"][3]["drift"], table
    adapted, base_id = report["models"]["adapted"], report["models"]["base"]
    assert adapted["weight_patches"] > 0 and adapted["clip_weight_patches"] > 0  # UNet and both text encoders
    assert base_id["weight_patches"] == 0 and base_id["clip_weight_patches"] == 0
    with Image.open(grid_path) as grid:
        assert grid.width > 3 * 64 and grid.height > 4 * 64  # 4 rows of base | adapted | difference
