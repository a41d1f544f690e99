// ComfyUI-Memento's canvas additions (loaded by ComfyUI from the pack's WEB_DIRECTORY).
//
// 1. Node summaries: a Memento node that returns text in its UI output (V3 ui.PreviewText: the
//    backbone's info, Render Story's result, Save Memory Bank's path, the memory preview's counts)
//    shows it in a read-only box at the bottom of the node. The box exists from the start (so the
//    node's size does not change after a run and it never grows over its neighbours) and is not
//    saved with the workflow.
// 2. Labels on wired text inputs: since frontend 1.4x a multiline text widget fed by a link is hidden
//    and only an unlabelled socket is left; we write "<name> (wired)" next to that socket (in 1.32,
//    ComfyUI 0.3.75's frontend, the same label sits above the greyed-out box: one look in both).
import { app } from "../../scripts/app.js";

const SUMMARY = "summary";
const SUMMARY_HEIGHT = 84;
// The nodes whose execute returns ui.PreviewText (keep in step with nodes/*.py; scripts/
// make_example_workflows.py reserves SUMMARY_HEIGHT for them in the templates' layout).
export const SUMMARY_NODES = new Set([
  "MementoLoadBackbone",
  "MementoCameraTrajectory",
  "MementoDiTInfo",
  "MementoStoryConsistency",
  "MementoSaveMemoryBank",
  "MementoMemoryPreview",
  "MementoRenderStory",
]);

function addSummaryBox(node) {
  if (node.widgets?.some((w) => w.name === SUMMARY)) return;
  const box = document.createElement("textarea");
  box.readOnly = true;
  box.placeholder = "summary (after a run)";
  box.className = "comfy-multiline-input memento-summary";
  box.style.opacity = "0.85";
  box.style.fontSize = "11px";
  const widget = node.addDOMWidget(SUMMARY, "memento_summary", box, {
    serialize: false,
    getValue: () => box.value,
    setValue: (v) => {
      box.value = v ?? "";
    },
    getMinHeight: () => SUMMARY_HEIGHT,
    getMaxHeight: () => SUMMARY_HEIGHT,
  });
  widget.serialize = false;
  widget.options = { ...(widget.options ?? {}), serialize: false };
  return widget;
}

function showSummary(node, text) {
  const widget = node.widgets?.find((w) => w.name === SUMMARY) ?? addSummaryBox(node);
  if (!widget) return;
  const value = Array.isArray(text) ? text.join("\n") : String(text ?? "");
  widget.value = value;
  if (widget.element) widget.element.value = value;
  node.setDirtyCanvas?.(true, true);
}

function drawWiredTextLabels(node, ctx) {
  if (node.flags?.collapsed || !node.inputs) return;
  node.inputs.forEach((input, slot) => {
    if (input.link == null || !input.widget) return;
    const widget = node.widgets?.find((w) => w.name === input.widget.name);
    if (!widget || !(widget.element ?? widget.inputEl)) return; // canvas widgets draw a greyed label
    const [x, y] = node.getConnectionPos(true, slot);
    ctx.save();
    ctx.font = "12px Arial";
    ctx.fillStyle = "#aaa";
    ctx.textBaseline = "middle";
    const label = `${input.label ?? input.localized_name ?? input.name} (wired)`;
    ctx.fillText(label, x - node.pos[0] + 12, y - node.pos[1]);
    ctx.restore();
  });
}

app.registerExtension({
  name: "Memento.Canvas",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx, ...rest) {
      const r = onDrawForeground?.apply(this, [ctx, ...rest]);
      drawWiredTextLabels(this, ctx);
      return r;
    };
    if (!SUMMARY_NODES.has(nodeData?.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const r = onNodeCreated?.apply(this, args);
      addSummaryBox(this);
      return r;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message, ...rest) {
      const r = onExecuted?.apply(this, [message, ...rest]);
      if (message?.text != null) showSummary(this, message.text);
      return r;
    };
  },
});
