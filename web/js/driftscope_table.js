// DriftScope.Table: show the text a DriftScope node returns in `ui.text` (the Audit's ranked
// table, Save Report's "saved ..." line) in a read-only monospace box on the node itself.
// web/js/ is served as /extensions/DriftScope/js/, so the frontend's scripts are three levels up.
import { app } from "../../../scripts/app.js";

const NODE_TYPES = new Set(["DriftScopeAudit", "DriftScopeSaveReport"]);
const WIDGET_NAME = "driftscope_table";
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
      box.value = text;
    },
    getMinHeight: () => boxHeight(box.value),
  });
  widget.serialize = false;
  return widget;
}

function showText(node, text) {
  node.driftscopeTable ??= createTableWidget(node);
  node.driftscopeTable.element.value = text; // .value: the text is never parsed as HTML
  node.setSize([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "DriftScope.Table",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.has(nodeData.name)) return;

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text == null) return;
      showText(this, Array.isArray(text) ? text.join("\n") : String(text));
    };

    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      onRemoved?.apply(this, arguments);
      // The frontend detaches a DOM widget's element when its node goes; drop our handle.
      this.driftscopeTable = null;
    };
  },
});
