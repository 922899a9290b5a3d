"""Tier 3: what the server hands the editor from this pack, without a browser: the example
workflows as templates (the template browser lists /api/workflow_templates under the pack's
folder name) and the node help pages (web/docs/<NodeId>.md, which the frontend fetches from
/extensions/<pack>/docs/). The browser side of both is in test_frontend.py.

The node help is the frontend's: the server only serves web/ as static files. Frontend 1.32.9
(what ComfyUI 0.3.75 pins) looks pages up the same way as 1.49 and 1.58 (first
docs/<NodeId>/<locale>.md, then docs/<NodeId>.md), so 0.3.75 shows them too. A frontend without
node help, or a page that does not load, falls back to the node's description and tooltips.

ComfyUI 0.3.75 and 0.33 list templates from any of example_workflows/, example/, examples/,
workflow/ or workflows/ (only the folder's top-level *.json), and log the hint "consider renaming
it to 'example_workflows'" for the others at debug level only (--verbose DEBUG).
"""
import json
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UI_DIR = ROOT / "workflows"
NODES = ["DriftScopeAudit", "DriftScopeEvidenceGrid", "DriftScopeSaveReport"]


def _raw(server, path) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never a proxy
    with opener.open(server.url + path, timeout=30) as resp:
        assert resp.status == 200, path
        return resp.read()


def _pack_folder(server) -> str:
    """The name this pack has in the server's custom_nodes folder (a link to this checkout)."""
    folder = server.base_directory / "custom_nodes"
    names = [p.name for p in folder.iterdir() if p.resolve() == ROOT]
    assert len(names) == 1, f"this checkout is linked into {folder} as {names}"
    return names[0]


def test_example_workflows_are_listed_as_templates_under_the_pack(comfy_server):
    pack = _pack_folder(comfy_server)
    templates = comfy_server.get("/api/workflow_templates")
    assert pack in templates, f"no templates for {pack}: {templates}"
    # Exactly the top-level UI workflows: the API twins in workflows/api/ are not offered.
    assert sorted(templates[pack]) == sorted(p.stem for p in UI_DIR.glob("*.json"))
    for name in templates[pack]:
        served = json.loads(_raw(comfy_server, f"/api/workflow_templates/{pack}/{name}.json"))
        assert served == json.loads((UI_DIR / f"{name}.json").read_text(encoding="utf-8")), name
        assert {n["type"] for n in served["nodes"]} & set(NODES), f"{name} has no DriftScope node"


@pytest.mark.parametrize("node", NODES)
def test_help_page_is_served_where_the_frontend_looks(comfy_server, node):
    info = comfy_server.object_info(node)
    # The frontend takes the pack name from python_module "custom_nodes.<pack>".
    kind, pack = info["python_module"].split(".", 1)
    assert kind == "custom_nodes"
    page = ROOT / "web" / "docs" / f"{node}.md"
    assert _raw(comfy_server, f"/extensions/{pack}/docs/{node}.md") == page.read_bytes()
    text = page.read_text(encoding="utf-8")
    assert text.startswith(f"# {info['display_name']}\n")
    # Every input is explained, under the name the editor shows.
    inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    missing = [name for name in inputs if f"`{name}`" not in text]
    assert not missing, f"{page.relative_to(ROOT)} does not explain {missing}"
