"""Tier 4: the ComfyUI editor in a real headless Chromium, against a real server.

Two editors, each one server and one browser page for the whole module:
- "pinned": the session's demo server (conftest.py) with the frontend the run's ComfyUI pins
  (or DRIFTSCOPE_FRONTEND_ROOT). Its page checks that the DriftScope.Table extension registers,
  that the shipped UI workflows are faithful twins of the API workflows, and queues the LoRA demo
  (20 words) from the editor once; the later tests reuse that run's output.
- "newest": only when the run is on ComfyUI 0.33 or later, a second server of that ComfyUI
  serving the newest frontend on PyPI that scripts/setup.sh installs (1.58.1), with a tiny
  custom-word audit.
On both, the table must show after the run, come back after a page reload, show in the Vue
"Nodes 2.0" renderer too, and the Audit's help page (web/docs/) must show in the node help.
The pinned editor also checks the template browser and that removing the node removes its box.

Chromium comes from the system (Debian package `chromium`), never downloaded. Without it, or
without playwright, the tests skip locally and fail in CI (env CI set).
"""
import json
import os
import re
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
API_DIR = ROOT / "workflows" / "api"
UI_DIR = ROOT / "workflows"
# Every example workflow ships twice: workflows/api/<name>.json and workflows/<name>.json.
WORKFLOWS = sorted({p.stem for p in API_DIR.glob("*.json")} | {p.stem for p in UI_DIR.glob("*.json")})
AUDIT, SAVE_REPORT = "10", "13"  # node ids in the example workflows
PLANTED = {"tiger", "bicycle", "castle"}  # what scripts/demo_models.py plants in the demo LoRA
# The planted words among ordinary ones. The demo's full cifar100 audit took 4 minutes on a busy
# 2-core CPU, these 20 words a minute and a half; the full demo runs in tests/live/test_workflows.py.
WORDS = ["tiger", "bicycle", "castle", "apple", "river", "chair", "cloud", "horse", "lamp", "mountain",
         "bread", "guitar", "forest", "boat", "candle", "rabbit", "bridge", "flower", "clock", "shoe"]
TINY_WORDS = WORDS[:6]  # the newest frontend's run: about 15 s instead of 90
NEWEST_FRONTEND = "1.58.1"  # the newest comfyui-frontend-package on PyPI (scripts/setup.sh)
VUE_NODES = "Comfy.VueNodes.Enabled"  # the frontend's setting for the "Nodes 2.0" renderer
# Text that only our help page has (the frontend's fallback shows the description and tooltips).
HELP_MARKS = ["Reading the table", "4.06 for 2,000"]
RUN_TIMEOUT_MS = 600_000  # a safety net for a loaded machine, not the expected time


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _unavailable(reason: str):
    if _in_ci():
        pytest.fail(reason + " (CI is set, so this is an error)")
    pytest.skip(reason)


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def exporter():
    """scripts/export_ui_workflows.py: opens the editor the same way the export does."""
    import export_ui_workflows as module

    try:
        module.find_chromium()
    except FileNotFoundError as e:
        _unavailable(str(e))
    return module


@pytest.fixture(scope="module")
def playwright(exporter):
    """One Playwright driver for the module (its sync API cannot be started twice at once)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the Python package playwright is not installed")
    with sync_playwright() as p:
        yield p


class Editor:
    """An open editor page, its server, and every page error and console error seen since it opened."""

    def __init__(self, page, server, exporter):
        self.page = page
        self.server = server
        self.ready_js = exporter.EDITOR_READY_JS
        self.errors = []
        self.run = None  # what the module's audit run from this editor returned (see _queue)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("console", lambda msg: msg.type == "error" and self.errors.append(f"console: {msg.text}"))

    def js(self, expression, arg=None):
        return self.page.evaluate(expression, arg)

    def reload(self):
        self.page.reload()
        self.page.wait_for_function(self.ready_js, timeout=60_000)

    def ours(self):
        return [e for e in self.errors if "driftscope" in e.lower()]


def _open(exporter, playwright, server, profile):
    holder = {}
    context, _ = exporter.open_editor(playwright, server, profile,
                                      on_page=lambda page: holder.setdefault("editor", Editor(page, server, exporter)))
    return context, holder["editor"]


@pytest.fixture(scope="module")
def editor(exporter, playwright, demo_server, tmp_path_factory):
    context, editor = _open(exporter, playwright, demo_server, tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield editor
    finally:
        context.close()


@pytest.fixture(scope="module")
def newest_editor(exporter, playwright, demo_server, demo_models_dir, comfy_server_module, tmp_path_factory):
    """The newest frontend on a second server of this run's ComfyUI, after one tiny audit."""
    version = demo_server.get("/system_stats")["system"]["comfyui_version"]
    if tuple(int(x) for x in re.findall(r"\d+", version)[:2]) < (0, 33):
        pytest.skip(f"frontend {NEWEST_FRONTEND} is checked on ComfyUI 0.33+ only; this run is on {version}")
    root = comfy_server_module.frontend_root(NEWEST_FRONTEND)
    if not (root / "index.html").is_file():
        _unavailable(f"frontend {NEWEST_FRONTEND} is not installed at {root}; run scripts/setup.sh")
    if demo_server.front_end_root is not None and demo_server.front_end_root.resolve() == root.resolve():
        pytest.skip(f"the pinned editor already runs frontend {NEWEST_FRONTEND}")
    base = tmp_path_factory.mktemp("comfy-newest")
    (base / "models").symlink_to(demo_models_dir, target_is_directory=True)
    with comfy_server_module.ComfyServer(demo_server.comfy_dir, base_directory=base, front_end_root=root) as server:
        context, editor = _open(exporter, playwright, server, tmp_path_factory.mktemp("chromium-newest"))
        try:
            served = editor.js("() => window.__COMFYUI_FRONTEND_VERSION__")
            assert served == NEWEST_FRONTEND, f"ComfyUI {version} was given frontend {NEWEST_FRONTEND} but serves {served}"
            yield editor
        finally:
            context.close()


def _api_workflow(name):
    return json.loads((API_DIR / f"{name}.json").read_text(encoding="utf-8"))


def _queue(editor, api, filename):
    """Load an API workflow into the editor, press Run, wait for the end; editor.run gets the
    prompt id, the seconds and the text the server sent per node (from /history)."""
    editor.js("""async ([api, filename]) => {
        window.__driftscopeRun = {done: false, error: null};
        const events = window.comfyAPI.api.api;
        events.addEventListener('execution_success', (e) => { window.__driftscopeRun.done = e.detail.prompt_id; });
        events.addEventListener('execution_error', (e) => { window.__driftscopeRun.error = e.detail; });
        await app.loadApiJson(api, filename);
    }""", [api, filename])
    t0 = time.monotonic()
    editor.page.get_by_test_id("queue-button").click()  # the Run button (its menu is labelled Run too)
    editor.page.wait_for_function("() => window.__driftscopeRun.done || window.__driftscopeRun.error",
                                  timeout=RUN_TIMEOUT_MS, polling=500)
    seconds = time.monotonic() - t0
    error = editor.js("() => window.__driftscopeRun.error")
    assert error is None, f"the workflow failed: {json.dumps(error)[:2000]}"
    prompt_id = editor.js("() => window.__driftscopeRun.done")
    # The server files the prompt in /history just after it reports success.
    outputs = editor.server.wait(prompt_id, timeout=60)["outputs"]
    sent = {node_id: "\n".join(out["text"]) for node_id, out in outputs.items() if "text" in out}
    editor.run = {"prompt_id": prompt_id, "seconds": seconds, "sent": sent}
    return editor.run


@pytest.fixture(scope="module")
def pinned(editor, demo_server, demo_script):
    """The pinned editor after the LoRA demo (20 words) was queued from it, once per module."""
    if editor.run is None:
        api = demo_script.demo_overrides(_api_workflow("lora_side_effects"), "lora_side_effects")
        api[AUDIT]["inputs"].update(vocabulary="custom", custom_words="\n".join(WORDS))
        _queue(editor, api, "lora_side_effects_demo.json")
    return editor


@pytest.fixture(scope="module")
def newest(newest_editor, demo_script):
    """The newest editor after a tiny audit (no Evidence Grid: the table is what it checks)."""
    if newest_editor.run is None:
        api = demo_script.demo_overrides(_api_workflow("lora_side_effects"), "lora_side_effects")
        for node_id in [k for k, n in api.items() if n["class_type"] in ("DriftScopeEvidenceGrid", "SaveImage")]:
            del api[node_id]
        api[AUDIT]["inputs"].update(vocabulary="custom", custom_words="\n".join(TINY_WORDS))
        _queue(newest_editor, api, "lora_side_effects_tiny.json")
    return newest_editor


@pytest.fixture(params=["pinned", "newest"])
def after_run(request):
    """Each editor after its audit run: the pinned frontend, then the newest one."""
    return request.getfixturevalue(request.param)


# ------------------------------------------------------------------------------------- page helpers
# What the page shows of a DriftScope text widget: the element, whether it is in the page and
# on top at its own centre (not hidden behind the canvas or another node), and which renderer
# holds it (the Vue renderer puts each node in an element with data-node-id).
TABLE_STATE_JS = """(id) => {
    const node = app.graph.getNodeById(id);
    const widget = node?.widgets?.find(w => w.name === 'driftscope_table');
    const el = widget?.element;
    if (!el) return null;
    const box = el.getBoundingClientRect();
    const top = document.elementFromPoint(box.x + box.width / 2, box.y + box.height / 2);
    const vueNode = document.querySelector(`[data-node-id="${id}"]`);
    return {tag: el.tagName, readOnly: el.readOnly, text: el.value, widgetValue: widget.value,
            inPage: el.isConnected, onTop: top === el || el.contains(top),
            inVueNode: !!vueNode && vueNode.contains(el), vueNodes: !!document.querySelector('[data-node-id]'),
            width: box.width, height: box.height, font: getComputedStyle(el).fontFamily};
}"""

FIT_NODE_JS = """(id) => {
    const n = app.graph.getNodeById(id);
    app.canvas.ds.fitToBounds([n.pos[0] - 20, n.pos[1] - 50, n.size[0] + 40, n.size[1] + 70], {zoom: 0.9});
    app.canvas.setDirty(true, true);
}"""


def _table(editor, node_id=AUDIT):
    # After a reload the editor restores the workflow a moment after it is ready.
    try:
        editor.page.wait_for_function("(id) => app.graph?.getNodeById(id)?.type === 'DriftScopeAudit'",
                                      arg=int(AUDIT), timeout=20_000)
    except Exception:
        pytest.fail("the editor does not show the audited workflow: nodes "
                    + str(editor.js("() => app.graph?._nodes.map(n => `${n.id}:${n.type}`)"))
                    + ", workflow " + str(editor.js("() => app.extensionManager.workflow?.activeWorkflow?.path")))
    editor.js(FIT_NODE_JS, int(node_id))
    editor.page.wait_for_timeout(300)  # the DOM widgets follow the canvas on the next frames
    return editor.js(TABLE_STATE_JS, int(node_id))


def _assert_shows(state, text, where):
    assert state, f"{where}: no DriftScope table widget on the Audit node"
    assert state["tag"] == "TEXTAREA" and state["readOnly"] and state["inPage"], (where, state)
    assert state["text"] == text and state["widgetValue"] == text, (
        f"{where}: the box does not show the text the server sent\n--- shown:\n{state['text']}\n--- sent:\n{text}")
    assert state["width"] > 100 and state["height"] > 100, (where, state)
    assert state["onTop"], f"{where}: the box is covered at its centre: {state}"
    assert "monospace" in state["font"], (where, state)


def _set_vue_nodes(editor, on: bool):
    editor.js("([id, on]) => app.extensionManager.setting.set(id, on)", [VUE_NODES, on])
    wait = "() => !!document.querySelector('[data-node-id]')" if on else "() => !document.querySelector('[data-node-id]')"
    editor.page.wait_for_function(wait, timeout=30_000)
    editor.page.wait_for_timeout(500)


# ------------------------------------------------------------------------------------- tests
def test_editor_registers_driftscope_extension(editor):
    names = editor.js("() => app.extensions.map(e => e.name)")
    assert "DriftScope.Table" in names
    types = editor.js("() => ['DriftScopeAudit', 'DriftScopeEvidenceGrid', 'DriftScopeSaveReport']"
                      ".filter(t => LiteGraph.registered_node_types[t])")
    assert len(types) == 3, types
    assert not editor.ours(), "page errors about DriftScope:\n" + "\n".join(editor.ours())


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_workflow_is_twin_of_api_workflow(editor, name):
    assert (API_DIR / f"{name}.json").is_file(), f"workflows/{name}.json has no API twin"
    api = _api_workflow(name)
    ui_path = UI_DIR / f"{name}.json"
    assert ui_path.is_file(), f"run scripts/export_ui_workflows.py to write {ui_path.relative_to(ROOT)}"
    workflow = json.loads(ui_path.read_text(encoding="utf-8"))

    missing = editor.js("(wf) => wf.nodes.map(n => n.type).filter(t => !LiteGraph.registered_node_types[t])",
                        workflow)
    assert not missing, f"{name}: node types the server does not know: {missing}"
    # The editor validates a workflow on load and reports problems only as toasts.
    complaints = "() => ['Invalid workflow', 'Workflow Validation', 'Links Fixed']" \
                 ".map(t => document.body.innerText.split(t).length - 1)"
    before = editor.js(complaints)
    prompt = editor.js("""async ([wf, name]) => {
        await app.loadGraphData(wf, true, true, name, {showMissingNodesDialog: false, showMissingModelsDialog: false});
        return (await app.graphToPrompt()).output;
    }""", [workflow, f"{name}.json"])
    editor.page.wait_for_timeout(200)  # toasts render on the next frame
    assert editor.js(complaints) == before, f"{name}: the editor's workflow validation complained"

    assert sorted(prompt) == sorted(api), f"{name}: node ids differ"
    for node_id, node in api.items():
        got = prompt[node_id]
        assert got["class_type"] == node["class_type"], f"{name} node {node_id}"
        assert got["inputs"] == node["inputs"], f"{name} node {node_id} ({node['class_type']}) inputs differ"


def test_queue_lora_demo_shows_ranked_table(pinned, tmp_path):
    editor = pinned
    sent = editor.run["sent"]
    table = _table(editor, AUDIT)
    _assert_shows(table, sent[AUDIT], "after the run")
    ranked = [m.group(1) for m in re.finditer(r"^\s*\d+\s+(\S+)", table["text"], re.MULTILINE)]
    assert set(ranked[:3]) == PLANTED, f"top of the table: {ranked[:5]}\n{table['text']}"
    saved = editor.js(TABLE_STATE_JS, int(SAVE_REPORT))
    assert saved and saved["text"] == sent[SAVE_REPORT] and saved["text"].startswith("saved driftscope/report")

    # An output display, not an input: it must not leak into the prompt or the widget values.
    prompt = editor.js("async () => (await app.graphToPrompt()).output")
    assert "driftscope_table" not in prompt[AUDIT]["inputs"]
    node = editor.js("(id) => app.graph.serialize().nodes.find(n => n.id === id)", int(AUDIT))
    assert sent[AUDIT] not in json.dumps(node.get("widgets_values"))

    editor.page.screenshot(path=tmp_path / "audit_table.png")
    print(f"workflow run from the editor: {editor.run['seconds']:.1f}s; screenshot {tmp_path / 'audit_table.png'}")


def test_newest_frontend_shows_table_after_run(newest):
    _assert_shows(_table(newest, AUDIT), newest.run["sent"][AUDIT], f"frontend {NEWEST_FRONTEND} after the run")
    assert not newest.ours(), "page errors about DriftScope:\n" + "\n".join(newest.ours())
    print(f"tiny run from the editor on frontend {NEWEST_FRONTEND}: {newest.run['seconds']:.1f}s")


def test_table_survives_page_reload(after_run):
    editor = after_run
    sent = editor.run["sent"][AUDIT]
    editor.reload()  # the editor restores the open workflow from the browser's storage
    _assert_shows(_table(editor, AUDIT), sent, "after a page reload")
    # Still an output: the restored text is not sent as an input either.
    prompt = editor.js("async () => (await app.graphToPrompt()).output")
    assert "driftscope_table" not in prompt[AUDIT]["inputs"]
    assert not editor.ours(), "page errors about DriftScope:\n" + "\n".join(editor.ours())


def test_table_shows_in_vue_nodes_renderer(after_run):
    editor = after_run
    sent = editor.run["sent"][AUDIT]
    assert not _table(editor, AUDIT)["vueNodes"], "the classic canvas should be the default renderer"
    _set_vue_nodes(editor, True)
    try:
        state = _table(editor, AUDIT)
        assert state and state["inVueNode"], f"the box is not inside the Vue node: {state}"
        _assert_shows(state, sent, "Nodes 2.0")
        editor.reload()  # a user who works with Nodes 2.0 on reloads with it on
        state = _table(editor, AUDIT)
        assert state and state["inVueNode"], f"after a reload the box is not inside the Vue node: {state}"
        _assert_shows(state, sent, "Nodes 2.0 after a page reload")
    finally:
        _set_vue_nodes(editor, False)
    _assert_shows(_table(editor, AUDIT), sent, "back on the classic canvas")
    assert not editor.ours(), "page errors about DriftScope:\n" + "\n".join(editor.ours())


def test_node_help_shows_audit_help_page(after_run):
    """Select the Audit node, press the selection toolbox's Info button: the node help must show
    web/docs/DriftScopeAudit.md (1.3x: in the node library sidebar; 1.4x+: the right side panel)."""
    editor = after_run
    # Room above the node for the selection toolbox, clear of the top bar.
    title = editor.js("""(id) => {
        const n = app.graph.getNodeById(id);
        app.canvas.ds.fitToBounds([n.pos[0] - 40, n.pos[1] - 300, n.size[0] + 80, n.size[1] + 340], {zoom: 0.8});
        app.canvas.setDirty(true, true);
        const p = app.canvas.ds.convertOffsetToCanvas([n.pos[0] + 40, n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT / 2]);
        const r = app.canvas.canvas.getBoundingClientRect();
        return [r.left + p[0], r.top + p[1]];
    }""", int(AUDIT))
    editor.page.wait_for_timeout(300)
    editor.page.mouse.click(*title)
    editor.page.locator("[data-testid=info-button]").first.click(timeout=15_000)
    shown = "(marks) => marks.every(m => document.body.innerText.includes(m))"
    try:
        editor.page.wait_for_function(shown, arg=HELP_MARKS, timeout=15_000)
    except Exception:
        pytest.fail("the node help does not show web/docs/DriftScopeAudit.md; page text:\n"
                    + editor.js("() => document.body.innerText")[-3000:])
    # Rendered as Markdown (a heading), not shown as raw text.
    headings = editor.js("() => [...document.querySelectorAll('h1, h2, h3')].map(h => h.textContent.trim())")
    assert "Reading the table" in headings and "DriftScope Audit" in headings, headings


def test_template_browser_lists_example_workflows(pinned):
    """The editor's template browser shows workflows/*.json under the pack's name (EXTENSIONS)."""
    editor = pinned
    pack = editor.server.object_info("DriftScopeAudit")["python_module"].split(".")[-1]
    editor.js("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = editor.page.get_by_role("dialog")
    dialog.get_by_text(pack, exact=True).first.click(timeout=15_000)
    for name in sorted(p.stem for p in UI_DIR.glob("*.json")):
        dialog.get_by_text(name, exact=True).first.wait_for(timeout=15_000)
    editor.page.keyboard.press("Escape")


def test_table_shows_markup_in_token_text_as_text(pinned):
    """Token text is never parsed as HTML: a custom word that is an HTML payload shows as
    written, creates no element and runs nothing (issue 12)."""
    payload = '  1  <img src=x onerror="window.__driftscopePwned=1">  0.04  *\n<b>bold</b> <script>window.__driftscopePwned=2</script>'
    state = pinned.js("""async ([id, text]) => {
        const node = app.graph.getNodeById(id);
        const before = document.querySelectorAll('img[src="x"], b, script').length;
        node.onExecuted({text: [text]});
        await new Promise(r => setTimeout(r, 300));
        return {shown: node.driftscopeTable.element.value, value: node.driftscopeTable.value,
                added: document.querySelectorAll('img[src="x"], b, script').length - before,
                pwned: window.__driftscopePwned ?? null};
    }""", [int(AUDIT), payload])
    assert state["shown"] == payload and state["value"] == payload, state
    assert state["added"] == 0 and state["pwned"] is None, state


def test_removing_node_takes_its_box_out_of_the_page(pinned):
    detached = pinned.js("""(id) => new Promise(resolve => {
        const node = app.graph.getNodeById(id), el = node.driftscopeTable.element;
        app.graph.remove(node);
        setTimeout(() => resolve(!el.isConnected && node.driftscopeTable === null), 200);
    })""", int(AUDIT))
    assert detached
