// DriftScope.Table: show the text a DriftScope node returns in `ui.text` (the Audit's ranked
// table, Save Report's "saved ..." line) in a read-only monospace box on the node itself.
//
// The text goes through the widget's value (setValue), which is what the Vue node renderer
// ("Nodes 2.0") and the classic LiteGraph canvas both read. It is also kept in
// node.properties, which the workflow saves: after a page reload (or reopening a saved workflow)
// the node shows its last table again, on every ComfyUI the pack supports. The server's
// has_intermediate_output (0.33) only resends a cached node's output to a later run; it does not
// bring the text back into a reloaded page.
//
// web/js/ is served as /extensions/DriftScope/js/, so the frontend's scripts are three levels up.
import { app } from "../../../scripts/app.js";

const NODE_TYPES = new Set(["DriftScopeAudit", "DriftScopeSaveReport"]);
const WIDGET_NAME = "driftscope_table";
const PROPERTY = "driftscope_table"; // node.properties key of the last text shown
const LINE_PX = 13;
const MAX_HEIGHT_PX = 360; // the box grows with its text up to this, then scrolls

// Tall enough for every line (plus padding and a horizontal scrollbar), up to MAX_HEIGHT_PX.
// The node keeps its width: long lines scroll sideways instead of pushing into neighbours.
function boxHeight(text) {
  const lines = text ? text.split("\n").length : 1;
  return Math.min(MAX_HEIGHT_PX, lines * LINE_PX + 28);
}

function createTableWidget(node) {
  const box = document.createElement("textarea");
  box.readOnly = true;
  box.spellcheck = false;
  box.wrap = "off";
  box.className = "driftscope-table";
  Object.assign(box.style, {
    fontFamily: "ui-monospace, SFMono-Regular, Menlo, Consolas, 'DejaVu Sans Mono', monospace",
    fontSize: "10px",
    lineHeight: `${LINE_PX}px`,
    whiteSpace: "pre",
    overflow: "auto",
    resize: "none",
    boxSizing: "border-box",
    width: "100%", // the Vue renderer (1.32) otherwise gives a textarea its default width
    padding: "4px",
    color: "var(--input-text, #ddd)",
    background: "var(--comfy-input-bg, #222)",
    border: "1px solid var(--border-color, #444)",
    borderRadius: "4px",
  });
  // An output, not an input: keep it out of the prompt (options.serialize) and of the
  // workflow's widgets_values (widget.serialize).
  const widget = node.addDOMWidget(WIDGET_NAME, "driftscope_table", box, {
    serialize: false,
    hideOnZoom: false,
    getValue: () => box.value,
    setValue: (text) => {
      box.value = text; // .value: the text is never parsed as HTML
      // The canvas sizes the box through getMinHeight; the Vue renderer lays the node out with
      // CSS, where this min-height does the same.
      box.style.minHeight = `${boxHeight(text)}px`;
    },
    getMinHeight: () => boxHeight(box.value),
  });
  widget.serialize = false;
  return widget;
}

// Show `text` on the node and keep it in node.properties. A new text is one change of the
// workflow (so the frontend saves it for the next page load, and undo sees it); text restored
// while a workflow loads (`record` false) is not a change.
function showText(node, text, { record = true } = {}) {
  node.properties ??= {};
  const changed = record && node.properties[PROPERTY] !== text;
  if (changed) app.canvas?.emitBeforeChange?.();
  node.driftscopeTable ??= createTableWidget(node);
  node.driftscopeTable.value = text;
  node.properties[PROPERTY] = text;
  node.setSize([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
  node.setDirtyCanvas(true, true);
  if (changed) app.canvas?.emitAfterChange?.();
}

// ui.text arrives as a list of strings.
function textOf(output) {
  const text = output?.text;
  if (text == null) return null;
  return Array.isArray(text) ? text.join("\n") : String(text);
}

// A node by its execution id: "12" at the top level, "5:12" inside the subgraph of node 5.
function nodeByExecutionId(executionId) {
  let graph = app.rootGraph ?? app.graph;
  let node = null;
  for (const id of String(executionId).split(":")) {
    node = graph?.getNodeById(Number(id)) ?? graph?.getNodeById(id);
    graph = node?.subgraph;
  }
  return node;
}

app.registerExtension({
  name: "DriftScope.Table",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.has(nodeData.name)) return;

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = textOf(message);
      if (text != null) showText(this, text);
    };

    // A loaded workflow (page reload, a saved file, paste) brings its last text in properties.
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (info) {
      const result = onConfigure?.apply(this, arguments);
      const text = this.properties?.[PROPERTY];
      if (typeof text === "string" && text) showText(this, text, { record: false });
      return result;
    };

    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      onRemoved?.apply(this, arguments);
      // The frontend detaches a DOM widget's element when its node goes; drop our handle.
      this.driftscopeTable = null;
    };
  },

  // The frontend sets node outputs without an `executed` message too, e.g. when a past run is
  // opened from the queue or history: show that run's text.
  onNodeOutputsUpdated(nodeOutputs) {
    for (const [executionId, output] of Object.entries(nodeOutputs ?? {})) {
      const text = textOf(output);
      if (text == null) continue;
      const node = nodeByExecutionId(executionId);
      if (node && NODE_TYPES.has(node.comfyClass ?? node.type)) showText(node, text);
    }
  },
});
