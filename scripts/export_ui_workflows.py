"""Turn the API-format example workflows into ComfyUI's editor (UI) format, the honest way.

For each ``workflows/api/<name>.json`` this starts a real ComfyUI server (scripts/comfy_server.py),
opens the real editor in headless Chromium, loads the API workflow with the frontend's own
``app.loadApiJson``, lays the nodes out in columns by their distance from the loaders (widened so
titles and values are readable), and writes ``app.graph.serialize()`` to ``workflows/<name>.json``
(the folder ComfyUI offers as the pack's templates). Node ids stay those of the API file.

    python scripts/export_ui_workflows.py [NAME ...] [--screenshots DIR]

Needs Chromium (Debian: ``apt-get install chromium``; CHROMIUM=path overrides) and the Python
package playwright; no browser is downloaded. No models are needed: the editor only builds the graph.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
API_DIR = ROOT / "workflows" / "api"
UI_DIR = ROOT / "workflows"
VIEWPORT = {"width": 1600, "height": 900}

# Chromium flags that render the ComfyUI editor headless in a container (--user-data-dir is
# given by launch_persistent_context).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Resolves once the editor has its graph, the node definitions and our extension.
EDITOR_READY_JS = """() => !!(window.app && app.graph && app.canvas && window.LiteGraph
    && LiteGraph.registered_node_types.DriftScopeAudit
    && app.extensions.some(e => e.name === 'DriftScope.Table'))"""

# Load an API workflow through the editor and lay it out in columns, left to right by the longest
# chain of links from a loader, top to bottom in API order. Returns the ids of unknown node types.
LOAD_AND_LAYOUT_JS = """async ([api, filename]) => {
  const missing = [...new Set(Object.values(api).map(n => n.class_type))]
    .filter(t => !LiteGraph.registered_node_types[t]);
  if (missing.length) return {missing};
  await app.loadApiJson(api, filename);
  const graph = app.graph;
  const nodes = Object.keys(api).map(id => graph.getNodeById(id));

  const ctx = document.createElement('canvas').getContext('2d');
  const textWidth = (text, px) => { ctx.font = `${px}px ${LiteGraph.NODE_FONT}`; return ctx.measureText(text).width; };
  for (const node of nodes) {
    let width = Math.max(node.size[0], node.computeSize()[0], textWidth(node.title, LiteGraph.NODE_TEXT_SIZE) + 70);
    for (const w of node.widgets ?? []) {
      if (w.element || typeof w.value === 'object') continue;  // text areas and DOM widgets stretch
      width = Math.max(width, textWidth(`${w.label ?? w.name}   ${w.value}`, 12) + 80);
    }
    node.setSize([Math.min(Math.ceil(width / 10) * 10, 480), node.size[1]]);
  }

  const column = new Map();
  const columnOf = (node) => {
    if (!column.has(node.id)) {
      column.set(node.id, 0);  // guards against cycles
      const parents = (node.inputs ?? []).map((_, i) => node.getInputNode(i)).filter(Boolean);
      column.set(node.id, Math.max(0, ...parents.map(p => columnOf(p) + 1)));
    }
    return column.get(node.id);
  };
  const columns = [];
  for (const node of nodes) (columns[columnOf(node)] ??= []).push(node);

  // A link that jumps over one column runs behind the nodes there. When those nodes are
  // smaller than the node the link goes to (a LoRA loader between the checkpoint and the
  // Audit), move them below the link so it stays visible; a big node stays on top.
  const GAP_X = 110, GAP_Y = 60, TITLE = LiteGraph.NODE_TITLE_HEIGHT;
  const links = nodes.flatMap(target => (target.inputs ?? []).map((input, slot) => {
    const source = target.getInputNode(slot);
    return source && {source, target, output: graph.getLink(input.link).origin_slot};
  }).filter(Boolean));
  let x = 0;
  columns.forEach((col, c) => {
    if (!col) return;
    const over = links.filter(l => column.get(l.source.id) < c && column.get(l.target.id) === c + 1);
    const tallest = Math.max(...col.map(n => n.size[1]));
    let y = TITLE;
    if (over.length && over.every(l => l.target.size[1] > tallest))
      y = Math.max(...over.map(l => l.source.getOutputPos(l.output)[1])) + GAP_Y + TITLE;
    for (const node of col) {
      node.pos = [x, y];
      y += node.size[1] + TITLE + GAP_Y;
    }
    x += Math.max(...col.map(n => n.size[0])) + GAP_X;
  });

  // The API file fixes every seed, so the editor should not re-roll them after each run.
  for (const node of nodes)
    for (const w of node.widgets ?? [])
      if (w.name === 'control_after_generate') w.value = 'fixed';

  const right = Math.max(...nodes.map(n => n.pos[0] + n.size[0]));
  const bottom = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
  app.canvas.ds.fitToBounds([-120, -80, right + 200, bottom + 160], {zoom: 0.9});
  app.canvas.setDirty(true, true);
  return {missing: [], columns: columns.map(c => (c ?? []).map(n => n.id))};
}"""

# Two nodes overlap when their boxes (title bar included) intersect.
OVERLAPS_JS = """() => {
  const T = LiteGraph.NODE_TITLE_HEIGHT;
  const box = n => [n.pos[0], n.pos[1] - T, n.pos[0] + n.size[0], n.pos[1] + n.size[1]];
  const nodes = app.graph._nodes, out = [];
  for (let i = 0; i < nodes.length; i++) for (let j = i + 1; j < nodes.length; j++) {
    const [a, b] = [box(nodes[i]), box(nodes[j])];
    if (a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3]) out.push([nodes[i].id, nodes[j].id]);
  }
  return out;
}"""


def find_chromium() -> str:
    """The system Chromium (env CHROMIUM overrides); never a downloaded one."""
    for candidate in (os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    raise FileNotFoundError("Chromium not found: install it (apt-get install chromium) or set CHROMIUM")


def open_editor(playwright, server, user_data_dir, viewport=VIEWPORT, timeout_ms: int = 60_000,
                on_page=None):
    """Open the editor of a running ComfyServer in headless Chromium; returns (context, page) once ready.

    ``on_page(page)`` runs before the page loads (to attach listeners). A fresh user would get the
    template browser and a "Nodes 2.0" banner over the canvas: the first is a server-side
    setting, the second a localStorage flag of the frontend.
    """
    server.post("/settings/Comfy.TutorialCompleted", True)
    context = playwright.chromium.launch_persistent_context(
        os.fspath(user_data_dir), executable_path=find_chromium(), args=CHROMIUM_ARGS,
        headless=True, viewport=viewport)
    context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
    try:
        page = context.pages[0] if context.pages else context.new_page()
        if on_page is not None:
            on_page(page)
        page.goto(server.url)
        page.wait_for_function(EDITOR_READY_JS, timeout=timeout_ms)
    except BaseException:
        context.close()
        raise
    return context, page


def load_and_layout(page, api: dict, filename: str) -> dict:
    """Load an API workflow into the open editor and lay it out; raises on unknown node types."""
    result = page.evaluate(LOAD_AND_LAYOUT_JS, [api, filename])
    if result["missing"]:
        raise RuntimeError(f"{filename}: the server does not know node types {result['missing']}")
    overlaps = page.evaluate(OVERLAPS_JS)
    if overlaps:
        raise RuntimeError(f"{filename}: nodes overlap after layout: {overlaps}")
    return result


def export(names=None, screenshots: Path | None = None, out_dir: Path = UI_DIR) -> list[Path]:
    from playwright.sync_api import sync_playwright

    import comfy_server as harness  # scripts/comfy_server.py, next to this file
    sources = sorted(API_DIR.glob("*.json"))
    if names:
        sources = [p for p in sources if p.stem in set(names)]
    if not sources:
        raise FileNotFoundError(f"no API workflows to export in {API_DIR}")
    written = []
    with tempfile.TemporaryDirectory(prefix="driftscope-export-") as tmp, \
            harness.ComfyServer(harness.default_comfy_dir(), base_directory=Path(tmp) / "comfy") as server, \
            sync_playwright() as p:
        context, page = open_editor(p, server, Path(tmp) / "chromium")
        try:
            for source in sources:
                load_and_layout(page, harness.load_api_workflow(source), source.name)
                # Stringify in the page: playwright would turn undefined fields into nulls,
                # which the editor's own workflow validator then rejects.
                workflow = json.loads(page.evaluate("() => JSON.stringify(app.graph.serialize())"))
                target = out_dir / source.name
                target.write_text(json.dumps(workflow, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
                written.append(target)
                if screenshots is not None:
                    screenshots.mkdir(parents=True, exist_ok=True)
                    page.wait_for_timeout(300)  # let the canvas draw the new view
                    page.screenshot(path=screenshots / f"{source.stem}.png")
        finally:
            context.close()
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="workflow names (default: every workflows/api/*.json)")
    parser.add_argument("--screenshots", type=Path, help="also save a PNG of each laid-out workflow here")
    args = parser.parse_args(argv)
    for path in export(args.names, args.screenshots):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
