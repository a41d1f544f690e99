"""ComfyUI workflows in both formats: UI (what the frontend saves, artists load) and API (``POST /prompt``).

* :func:`ui_to_api` converts a UI-format workflow into the API prompt the frontend (1.32, shipped with
  ComfyUI 0.3.75; 1.49 with 0.33) would queue, following its ``graphToPrompt``
  (``src/utils/executionUtil.ts``) and ``ExecutableNodeDTO.resolveInput``/``resolveOutput``: muted (mode 2)
  and bypassed (mode 4) nodes are left out, a bypassed node passes its matching input through, ``Reroute``
  is followed to its source, a ``PrimitiveNode`` writes its value into the widget it feeds, notes are
  skipped, inputs that end at a left-out node are dropped, widget values are mapped to input names from the
  node definitions (``/object_info``), list values are wrapped as ``{"__value__": [...]}`` and
  ``dynamicPrompts`` strings get their comments stripped and ``{a|b}`` choices resolved.
* :class:`WorkflowBuilder` writes UI-format workflows from a compact Python description (nodes, widget
  values, links, reroutes, primitives, notes, groups), laid out left to right, and also states the API
  prompt it means (:meth:`WorkflowBuilder.expected_api`), so a round trip can be checked.
* :func:`validate_ui_workflow` checks a UI workflow against ``/object_info``: node types exist, links are
  consistent and their types match the sockets, widget values fit, required inputs are set.
* :func:`local_object_info` builds ``/object_info`` in process (a ComfyUI started by ``comfy_host``).

How the frontend lays out widgets (``widgets_values`` order), from ``litegraphService.ts`` and
``widgets.ts``: the node definition's inputs in ``input_order`` (required, then optional); an input gets
a widget when its type is a widget type (INT, FLOAT, BOOLEAN, STRING, COMBO, ...) unless ``forceInput``;
an INT with ``control_after_generate`` (or, when that option is absent, named ``seed``/``noise_seed``)
is followed by one control widget ("fixed", "increment", "decrement", "randomize"), a COMBO with
``control_after_generate`` by a control widget and a filter string; a required combo with
``image_upload``/``video_upload``/``animated_image_upload`` adds an ``upload`` button widget after all
others (its saved value is "image"). Control, filter and upload widgets are saved in
``widgets_values`` but never sent to the server. Saved workflows drop widget input slots that are not
linked, so ``inputs`` lists the socket inputs plus the linked widget inputs (``"widget": {"name": ...}``).

Newer ComfyUI (0.33, frontend 1.49) adds the V3 dynamic combo (``COMFY_DYNAMICCOMBO_V3``, e.g. SaveVideo's
``format``, whose options each add a ``codec`` dynamic combo): a combo widget of the option keys (first
key by default), and the chosen option's inputs as widgets named ``<combo>.<input>`` right after it
(``dynamicComboWidget``). ``LGraphNode.configure`` assigns ``widgets_values`` one by one and each combo
re-lays out its widgets as soon as it is set (:func:`fill_widgets`), so a workflow saved by 0.3.75
(SaveVideo ``[prefix, "mp4", "h264"]``) loads in 0.33 with ``format.codec`` = "h264" and the new widgets
(``format.codec.encoding``, the hidden legacy ``codec``, CreateVideo's ``bit_depth``) on their defaults;
the 0.33 frontend queues all of them. The converter takes the layout from whichever ``/object_info`` it is
given, so it follows each ComfyUI's own frontend (tests/test_workflow_api.py checks both in Chromium).
"""

from __future__ import annotations

import copy
import json
import random
import re
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ObjectInfo = Mapping[str, Mapping[str, Any]]
ApiPrompt = dict[str, dict[str, Any]]

#: LiteGraph node modes.
MODE_ALWAYS = 0
MODE_NEVER = 2  # "muted": not executed, not sent
MODE_BYPASS = 4  # not executed; its outputs pass the matching input through

#: Frontend-only node types (``isVirtualNode``): never sent to the server.
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
VIRTUAL_NODE_TYPES = frozenset({"Reroute", "PrimitiveNode", *NOTE_TYPES})

#: Input types the frontend 1.32 builds a widget for (``ComfyWidgets`` in ``scripts/widgets.ts``), plus
#: the V3 dynamic combo of newer frontends.
WIDGET_TYPES = frozenset(
    {
        "INT",
        "FLOAT",
        "BOOLEAN",
        "STRING",
        "COMBO",
        "MARKDOWN",
        "COLOR",
        "TEXTAREA",
        "IMAGECOMPARE",
        "CHART",
        "COMFY_DYNAMICCOMBO_V3",
    }
)

#: ``io.DynamicCombo`` (ComfyUI 0.33+, e.g. SaveVideo's ``format`` and ``codec``): a combo whose chosen
#: option brings its own inputs, named ``<combo>.<input>``, placed right after it (recursively). ComfyUI
#: 0.3.75 has none, so 0.3.75-era layouts are unchanged.
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"

CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
_UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")


class WorkflowError(ValueError):
    """A workflow cannot be converted (unknown node type, broken link, widget values that do not fit)."""


# -- node definitions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputDef:
    """One input of a node definition, as the frontend sees it.

    Attributes:
        name: input name (the key in the API prompt's ``inputs``; ``format.codec`` for an input of a
            dynamic combo's option).
        type: ``"COMBO"`` for combos (list, V3 style or dynamic), else the type string (``"INT"``, ...).
        options: the spec's option dict (``default``, ``min``, ``max``, ``options`` for combos, ...).
        optional: listed under ``optional``.
        widget: the frontend shows a widget for it (a value in ``widgets_values``); else a socket only.
        extra_widgets: widgets the frontend adds right after it: ``"control"`` and ``"filter"``.
        choices: for a dynamic combo, option key -> the inputs that option adds (``{"required": {...},
            "optional": {...}}``); None for every other input.
    """

    name: str
    type: str
    options: Mapping[str, Any]
    optional: bool
    widget: bool
    extra_widgets: tuple[str, ...] = ()
    choices: Mapping[str, Mapping[str, Any]] | None = None

    @property
    def dynamic(self) -> bool:
        """A dynamic combo: its value decides which inputs follow it."""
        return self.choices is not None

    @property
    def combo_options(self) -> list[Any]:
        """The allowed values of a combo ([] for other types)."""
        return list(self.options.get("options", [])) if self.type == "COMBO" else []

    def default(self) -> Any:
        """A fresh widget's value: ``default``, else a combo's first option, else 0 / 0.0 / "" / False."""
        if "default" in self.options:
            return self.options["default"]
        if self.type == "COMBO":
            return self.combo_options[0] if self.combo_options else ""
        return {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False}.get(self.type, "")

    def children(self, key: Any, widget_types: frozenset[str] = WIDGET_TYPES) -> list[InputDef]:
        """The inputs a dynamic combo adds for option ``key``, named ``<name>.<input>``: required, then
        optional ones, like the frontend's ``dynamicComboWidget`` (none for an unknown key)."""
        inputs = (self.choices or {}).get(key) if isinstance(key, str) else None
        if not inputs:
            return []
        return [
            _input_def(f"{self.name}.{name}", spec, section == "optional", widget_types)
            for section in ("required", "optional")
            for name, spec in (inputs.get(section) or {}).items()
        ]


def _input_def(name: str, spec: Any, optional: bool, widget_types: frozenset[str]) -> InputDef:
    if isinstance(spec, str):
        spec = [spec]
    kind, opts = spec[0], dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
    choices = None
    if isinstance(kind, list):
        kind, opts = "COMBO", {**opts, "options": list(kind)}
    elif kind == DYNAMIC_COMBO:
        # the frontend makes a COMBO widget of the option keys and ignores any default (first key)
        choices = {str(o["key"]): dict(o.get("inputs") or {}) for o in opts.get("options", [])}
        opts = {k: v for k, v in opts.items() if k != "default"} | {"options": list(choices)}
        widget = DYNAMIC_COMBO in widget_types and not opts.get("forceInput", False)
        return InputDef(name, "COMBO", opts, optional, widget, (), choices)
    kind = str(kind)
    widget_type = str(opts.get("widgetType") or kind)
    widget = widget_type in widget_types and not opts.get("forceInput", False)
    extra: tuple[str, ...] = ()
    if widget and widget_type == "INT":
        control = opts.get("control_after_generate")
        if (name in ("seed", "noise_seed")) if control is None else bool(control):
            extra = ("control",)
    elif widget and widget_type == "COMBO" and opts.get("control_after_generate"):
        extra = ("control", "filter")
    return InputDef(name, kind, opts, optional, widget, extra)


def input_defs(node_def: Mapping[str, Any], widget_types: frozenset[str] = WIDGET_TYPES) -> list[InputDef]:
    """The node's inputs (hidden ones excluded) in the frontend's order: ``input_order``, required first.

    Inputs of dynamic combo options are not listed (see :meth:`InputDef.children`)."""
    sections = node_def.get("input") or {}
    order = node_def.get("input_order") or {}
    result: list[InputDef] = []
    for section in ("required", "optional"):
        specs = sections.get(section) or {}
        names = [n for n in order.get(section, []) if n in specs] + [
            n for n in specs if n not in order.get(section, [])
        ]
        result.extend(_input_def(n, specs[n], section == "optional", widget_types) for n in names)
    return result


def all_input_defs(
    node_def: Mapping[str, Any], widget_types: frozenset[str] = WIDGET_TYPES
) -> dict[str, InputDef]:
    """Every input the node can have by name: :func:`input_defs` plus the inputs of every option of its
    dynamic combos (recursively)."""
    result: dict[str, InputDef] = {}
    pending = list(input_defs(node_def, widget_types))
    while pending:
        d = pending.pop(0)
        result.setdefault(d.name, d)
        for key in d.choices or {}:
            pending.extend(d.children(key, widget_types))
    return result


def expand_inputs(
    defs: Sequence[InputDef], pick: Any, widget_types: frozenset[str] = WIDGET_TYPES
) -> list[InputDef]:
    """``defs`` with each dynamic combo followed by the inputs of the option ``pick(combo)`` chooses."""
    result: list[InputDef] = []
    for d in defs:
        result.append(d)
        if d.dynamic:
            result.extend(expand_inputs(d.children(pick(d), widget_types), pick, widget_types))
    return result


@dataclass(frozen=True)
class WidgetSlot:
    """One entry of a node's ``widgets_values``: the input it belongs to and its kind.

    ``kind`` is ``"value"`` (sent to the server under ``input``), or ``"control"``, ``"filter"`` or
    ``"upload"`` (frontend-only, saved but never sent).
    """

    input: str
    kind: str


def _slots(defs: Sequence[InputDef]) -> list[tuple[InputDef, str]]:
    """The widgets of already expanded ``defs``: each value widget, then its control/filter widgets."""
    slots: list[tuple[InputDef, str]] = []
    for d in defs:
        if d.widget:
            slots.append((d, "value"))
            slots.extend((d, extra) for extra in d.extra_widgets)
    return slots


def _layout(
    node_def: Mapping[str, Any], pick: Any = None, widget_types: frozenset[str] = WIDGET_TYPES
) -> list[tuple[InputDef, str]]:
    """(input, kind) of each widget, dynamic combos set to ``pick(combo)`` (default: a fresh node's)."""
    defs = input_defs(node_def, widget_types)
    slots = _slots(expand_inputs(defs, pick or (lambda d: d.default()), widget_types))
    upload = next((d for d in defs if not d.optional and d.type == "COMBO" and _is_upload(d)), None)
    if upload is not None:
        slots.append((upload, "upload"))
    return slots


def widget_layout(
    node_def: Mapping[str, Any], widget_types: frozenset[str] = WIDGET_TYPES
) -> list[WidgetSlot]:
    """What each position of ``widgets_values`` holds for a fresh node of this definition (dynamic
    combos on their first option)."""
    return [WidgetSlot(d.name, kind) for d, kind in _layout(node_def, widget_types=widget_types)]


def _is_upload(d: InputDef) -> bool:
    return any(d.options.get(flag) is True for flag in _UPLOAD_FLAGS)


def output_types(node_def: Mapping[str, Any]) -> list[str]:
    """The node's output types, one per output slot (combo outputs as ``"COMBO"``)."""
    return ["COMBO" if isinstance(t, list) else str(t) for t in node_def.get("output", [])]


def fill_widgets(
    node_def: Mapping[str, Any], widgets_values: Sequence[Any]
) -> tuple[list[tuple[InputDef, str]], int]:
    """The frontend's ``LGraphNode.configure``: ``widgets_values`` are assigned to the node's widgets in
    order; setting a dynamic combo replaces the widgets of its options by those of the chosen one, right
    after it, before the next value is assigned. Returns the node's widgets afterwards and how many of
    them got a saved value (the rest keep their defaults)."""
    values = list(widgets_values)
    slots = _layout(node_def)
    index = 0
    while index < len(slots) and index < len(values):
        d, kind = slots[index]
        if kind == "value" and d.dynamic:
            prefix = d.name + "."
            rest = [s for s in slots[index + 1 :] if not s[0].name.startswith(prefix)]
            added = _slots(expand_inputs(d.children(values[index]), lambda c: c.default()))
            slots = [*slots[: index + 1], *added, *rest]
        index += 1
    return slots, min(len(values), len(slots))


def _widget_values(
    node_def: Mapping[str, Any],
    widgets_values: Sequence[Any] | Mapping[str, Any] | None,
    strict: bool,
    where: str,
) -> tuple[dict[str, Any], dict[str, InputDef]]:
    """:func:`widget_values_by_name` and the definitions of the widget inputs it names."""
    if isinstance(widgets_values, Mapping):
        named = dict(widgets_values)
        slots = _layout(node_def, lambda d: named.get(d.name, d.default()))
        defs = {d.name: d for d, kind in slots if kind == "value"}
        return {k: v for k, v in named.items() if k in defs}, defs
    values = list(widgets_values or [])
    slots, filled = fill_widgets(node_def, values)
    missing = [d for d, _kind in slots[filled:] if not d.optional]
    if strict and (len(values) > len(slots) or missing):
        expected = [d.name if kind == "value" else f"<{kind} of {d.name}>" for d, kind in slots]
        note = " (only widgets of optional inputs may be left out at the end)" if missing else ""
        raise WorkflowError(
            f"{where}: {len(values)} widget values {values!r} but the definition has {len(slots)} widgets "
            f"{expected}{note}"
        )
    result: dict[str, Any] = {}
    defs: dict[str, InputDef] = {}
    for i, (d, kind) in enumerate(slots):
        if kind == "value":
            result[d.name] = values[i] if i < len(values) else d.default()
            defs[d.name] = d
    return result, defs


def widget_values_by_name(
    node_def: Mapping[str, Any],
    widgets_values: Sequence[Any] | Mapping[str, Any] | None,
    *,
    strict: bool = True,
    where: str = "node",
) -> dict[str, Any]:
    """Map a node's saved ``widgets_values`` to input names (value widgets only, in widget order).

    Values are assigned in order like the frontend does (:func:`fill_widgets`): missing ones keep their
    defaults, extras are dropped.

    Args:
        strict: the values must fill the widget layout: not more values than widgets, and only widgets of
            optional inputs may be left out at the end (inputs a newer ComfyUI added to a node: a
            workflow saved with an older one lacks them, and the frontend keeps their defaults).
        where: names the node in error messages.
    """
    return _widget_values(node_def, widgets_values, strict, where)[0]


def valid_connection(type_a: Any, type_b: Any) -> bool:
    """LiteGraph's ``isValidConnection``: ``*``/empty match anything; comma lists match if they overlap."""
    a = 0 if type_a in ("", "*", None) else type_a
    b = 0 if type_b in ("", "*", None) else type_b
    if not a or not b or a == b:
        return True
    sa, sb = str(a).lower(), str(b).lower()
    if "," not in sa and "," not in sb:
        return sa == sb
    return any(valid_connection(x, y) for x in sa.split(",") for y in sb.split(","))


def process_dynamic_prompt(text: str, rng: random.Random | None = None) -> str:
    """The frontend's ``processDynamicPrompt``: strip ``/* */``, ``//`` comments; pick ``{a|b}`` choices."""
    rng = rng or random.Random(0)
    text = re.sub(r"/\*[\s\S]*?\*/|//.*", "", text)
    pos = 0

    def escape() -> str:
        nonlocal pos
        char = "\\" + (text[pos] if pos < len(text) else "undefined")
        pos += 1
        return char

    def choice_block() -> str:
        nonlocal pos
        choices: list[str] = []
        current, depth = "", 0
        while pos < len(text):
            char = text[pos]
            pos += 1
            if char == "\\":
                current += escape()
                continue
            if char == "{":
                depth += 1
            elif char == "}":
                if not depth:
                    break
                depth -= 1
            elif char == "|" and not depth:
                choices.append(current)
                current = ""
                continue
            current += char
        choices.append(current)
        return process_dynamic_prompt(rng.choice(choices), rng)

    out = ""
    while pos < len(text):
        char = text[pos]
        pos += 1
        out += escape() if char == "\\" else choice_block() if char == "{" else char
    return re.sub(r"\\([{}|])", r"\1", out)


# -- UI -> API -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """One entry of the UI workflow's ``links``."""

    id: int
    origin_id: str
    origin_slot: int
    target_id: str
    target_slot: int
    type: Any


def parse_links(workflow: Mapping[str, Any]) -> dict[int, Link]:
    """``links`` as ``{id: Link}``; takes the array form ``[id, from, slot, to, slot, type]`` and objects."""
    result: dict[int, Link] = {}
    for raw in workflow.get("links") or []:
        if raw is None:
            continue
        if isinstance(raw, Mapping):
            values = [raw["id"], raw["origin_id"], raw["origin_slot"], raw["target_id"], raw["target_slot"]]
            link_type = raw.get("type")
        else:
            values, link_type = list(raw[:5]), raw[5] if len(raw) > 5 else None
        link = Link(int(values[0]), str(values[1]), int(values[2]), str(values[3]), int(values[4]), link_type)
        result[link.id] = link
    return result


class _Graph:
    """Index of a UI workflow used by the converter and the validator."""

    def __init__(self, workflow: Mapping[str, Any], object_info: ObjectInfo) -> None:
        self.workflow = workflow
        self.object_info = object_info
        if (workflow.get("definitions") or {}).get("subgraphs"):
            raise WorkflowError("workflows with subgraphs are not supported by this converter")
        self.nodes: dict[str, Mapping[str, Any]] = {}
        for node in workflow.get("nodes") or []:
            node_id = str(node["id"])
            if node_id in self.nodes:
                raise WorkflowError(f"node id {node_id} is used twice")
            self.nodes[node_id] = node
        self.links = parse_links(workflow)

    def where(self, node: Mapping[str, Any]) -> str:
        title = f" '{node['title']}'" if node.get("title") else ""
        return f"node {node['id']} ({node.get('type')}{title})"

    def node_def(self, node: Mapping[str, Any]) -> Mapping[str, Any]:
        node_type = str(node.get("type"))
        if node_type not in self.object_info:
            if node_type.startswith("workflow>") or node_type.startswith("workflow/"):
                raise WorkflowError(f"{self.where(node)}: group nodes are not supported by this converter")
            raise WorkflowError(
                f"{self.where(node)}: node type '{node_type}' is not installed (not in /object_info)"
            )
        return self.object_info[node_type]

    def link(self, link_id: Any, node: Mapping[str, Any]) -> Link:
        try:
            return self.links[int(link_id)]
        except (KeyError, TypeError, ValueError):
            raise WorkflowError(
                f"{self.where(node)}: link {link_id} is not in the workflow's links"
            ) from None

    def origin(self, link: Link) -> Mapping[str, Any]:
        try:
            return self.nodes[link.origin_id]
        except KeyError:
            raise WorkflowError(
                f"link {link.id} starts at node {link.origin_id}, which does not exist"
            ) from None

    # Resolution, as ExecutableNodeDTO does it. Returns ("link", node_id, slot), ("value", v) or None.
    def resolve_input(
        self, node: Mapping[str, Any], index: int, visited: set[str], link_type: Any = None
    ) -> tuple[Any, ...] | None:
        key = f"{node['id']}[I]{index}"
        if key in visited:
            raise WorkflowError(f"{self.where(node)}: circular reference while resolving input {index}")
        visited.add(key)
        inputs = node.get("inputs") or []
        if index >= len(inputs) or inputs[index].get("link") is None:
            return None
        link = self.link(inputs[index]["link"], node)
        return self.resolve_output(
            self.origin(link), link.origin_slot, link_type or inputs[index].get("type"), visited
        )

    def resolve_output(
        self, node: Mapping[str, Any], slot: int, link_type: Any, visited: set[str]
    ) -> tuple[Any, ...] | None:
        key = f"{node['id']}[O]{slot}"
        if key in visited:
            raise WorkflowError(f"{self.where(node)}: circular reference while resolving output {slot}")
        visited.add(key)
        if node.get("mode", MODE_ALWAYS) == MODE_BYPASS:
            index = self._bypass_index(node, slot, link_type)
            return None if index < 0 else self.resolve_input(node, index, visited, link_type)
        node_type = node.get("type")
        if node_type == "PrimitiveNode":
            values = node.get("widgets_values") or []
            return ("value", values[0]) if values else None
        if node_type in VIRTUAL_NODE_TYPES:  # Reroute: follow its input; notes have none
            return self.resolve_input(node, slot, visited, link_type)
        return ("link", str(node["id"]), int(slot))

    def _bypass_index(self, node: Mapping[str, Any], slot: int, link_type: Any) -> int:
        inputs = node.get("inputs") or []
        outputs = node.get("outputs") or []
        output_type = outputs[slot].get("type") if slot < len(outputs) else None
        if link_type in ("*", "", None):
            return slot if len(inputs) > slot else 0
        if slot < len(inputs):
            opposite = inputs[slot].get("type")
            if valid_connection(opposite, output_type) and valid_connection(opposite, link_type):
                return slot
        for i, inp in enumerate(inputs):
            if inp.get("type") == link_type:
                return i
        for i, inp in enumerate(inputs):
            if valid_connection(inp.get("type"), output_type) and valid_connection(
                inp.get("type"), link_type
            ):
                return i
        return -1


def _sorted_nodes(nodes: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    def key(node: Mapping[str, Any]) -> tuple[int, int, str]:
        node_id = str(node["id"])
        return (int(node.get("order", 0) or 0), int(node_id) if node_id.isdigit() else 0, node_id)

    return sorted(nodes, key=key)


def _wrap(value: Any) -> Any:
    return {"__value__": value} if isinstance(value, list) else value


def ui_to_api(
    workflow: Mapping[str, Any],
    object_info: ObjectInfo,
    *,
    strict: bool = True,
    meta: bool = False,
    rng: random.Random | None = None,
) -> ApiPrompt:
    """Convert a UI-format workflow into the API prompt the frontend would send to ``POST /prompt``.

    Args:
        workflow: the UI workflow (``nodes``, ``links``, ...), as loaded from its JSON file.
        object_info: node definitions (``ComfyServer.object_info()`` or :func:`local_object_info`).
        strict: widget value counts must match the definitions (see :func:`widget_values_by_name`).
        meta: add ``"_meta": {"title": ...}`` like the frontend does (the server ignores it).
        rng: random source for ``{a|b}`` choices in dynamic-prompt strings (seeded 0 by default).

    Raises:
        WorkflowError: unknown node type, broken link, widget values that do not fit, subgraphs.
    """
    graph = _Graph(workflow, object_info)
    rng = rng or random.Random(0)
    output: ApiPrompt = {}
    for node in _sorted_nodes(graph.nodes.values()):
        mode = node.get("mode", MODE_ALWAYS)
        if node.get("type") in VIRTUAL_NODE_TYPES or mode in (MODE_NEVER, MODE_BYPASS):
            continue
        node_def = graph.node_def(node)
        inputs: dict[str, Any] = {}
        widgets, defs = _widget_values(node_def, node.get("widgets_values"), strict, graph.where(node))
        for name, value in widgets.items():
            if defs[name].options.get("dynamicPrompts") and isinstance(value, str):
                value = process_dynamic_prompt(value, rng)
            inputs[name] = _wrap(value)
        for index, inp in enumerate(node.get("inputs") or []):
            if inp.get("link") is None:
                continue
            resolved = graph.resolve_input(node, index, set())
            if resolved is None:
                continue
            name = str(inp["name"])
            if resolved[0] == "value":
                inputs[(inp.get("widget") or {}).get("name", name)] = _wrap(resolved[1])
            else:
                inputs[name] = [resolved[1], resolved[2]]
        entry: dict[str, Any] = {"inputs": inputs, "class_type": str(node["type"])}
        if meta:
            entry["_meta"] = {"title": node.get("title") or node_def.get("display_name") or node["type"]}
        output[str(node["id"])] = entry
    for entry in output.values():  # inputs that end at a muted node are dropped
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and value[0] not in output:
                del entry["inputs"][name]
    return output


# -- validation ------------------------------------------------------------------------------------


def validate_ui_workflow(
    workflow: Mapping[str, Any], object_info: ObjectInfo, *, check_combos: bool = False
) -> list[str]:
    """Problems that would stop a UI workflow from loading or running; an empty list when it is fine.

    Checks: node types exist (notes, reroutes and primitives excepted); every link's ends exist and
    agree with the nodes' ``inputs``/``outputs``; link, output and input socket types match; widget
    values fit the definition (count, INT/FLOAT ranges, BOOLEAN type; combo options when
    ``check_combos``: model file names only match on a machine that has the files); every required input
    of every active node is linked to an active node or has a widget value; some active node is an output
    node.
    """
    try:
        graph = _Graph(workflow, object_info)
    except WorkflowError as exc:
        return [str(exc)]
    problems: list[str] = []
    active_output = False
    for node in graph.nodes.values():
        node_type = node.get("type")
        if node_type in VIRTUAL_NODE_TYPES:
            continue
        try:
            node_def = graph.node_def(node)
        except WorkflowError as exc:
            problems.append(str(exc))
            continue
        if node.get("mode", MODE_ALWAYS) == MODE_ALWAYS and node_def.get("output_node"):
            active_output = True
        problems.extend(_check_widgets(graph, node, node_def, check_combos))
    problems.extend(_check_links(graph))
    if not problems:
        try:
            api = ui_to_api(workflow, object_info)
        except WorkflowError as exc:
            return [str(exc)]
        for node_id, entry in api.items():
            node = graph.nodes[node_id]
            for d in input_defs(object_info[entry["class_type"]]):
                if not d.optional and d.name not in entry["inputs"]:
                    what = "linked to a node that runs" if not d.widget else "linked or given a widget value"
                    problems.append(
                        f"{graph.where(node)}: required input '{d.name}' ({d.type}) is not {what}"
                    )
    if not active_output and not problems:
        problems.append("no active output node (ComfyUI refuses a prompt without outputs)")
    return problems


def assert_valid_ui_workflow(workflow: Mapping[str, Any], object_info: ObjectInfo, **kwargs: Any) -> None:
    """Raise :class:`WorkflowError` listing every problem :func:`validate_ui_workflow` finds."""
    problems = validate_ui_workflow(workflow, object_info, **kwargs)
    if problems:
        raise WorkflowError("invalid workflow:\n  " + "\n  ".join(problems))


def _check_widgets(
    graph: _Graph, node: Mapping[str, Any], node_def: Mapping[str, Any], check_combos: bool
) -> list[str]:
    where = graph.where(node)
    try:
        values, defs = _widget_values(node_def, node.get("widgets_values"), True, where)
    except WorkflowError as exc:
        return [str(exc)]
    problems: list[str] = []
    for name, value in values.items():
        d = defs[name]
        if d.type in ("INT", "FLOAT"):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or (d.type == "INT" and value != int(value))
            ):
                problems.append(f"{where}: widget '{name}' ({d.type}) has value {value!r}")
                continue
            low, high = d.options.get("min"), d.options.get("max")
            if (low is not None and value < low) or (high is not None and value > high):
                problems.append(f"{where}: widget '{name}' = {value} is outside [{low}, {high}]")
        elif d.type == "BOOLEAN" and not isinstance(value, bool):
            problems.append(f"{where}: widget '{name}' (BOOLEAN) has value {value!r}")
        elif (
            d.type == "COMBO"
            and check_combos
            and not d.options.get("multiselect")
            and value not in d.combo_options
        ):
            problems.append(f"{where}: widget '{name}' = {value!r} is not one of {d.combo_options}")
    raw = node.get("widgets_values")
    if isinstance(raw, list):
        slots, filled = fill_widgets(node_def, raw)
        for (d, kind), value in zip(slots[:filled], raw, strict=False):
            if kind == "control" and value not in (*CONTROL_VALUES, "increment-wrap"):
                problems.append(f"{where}: control widget of '{d.name}' has value {value!r}")
    return problems


def _check_links(graph: _Graph) -> list[str]:
    problems: list[str] = []
    for link in graph.links.values():
        origin, target = graph.nodes.get(link.origin_id), graph.nodes.get(link.target_id)
        if origin is None or target is None:
            problems.append(
                f"link {link.id}: node {link.origin_id if origin is None else link.target_id} is missing"
            )
            continue
        outputs, inputs = origin.get("outputs") or [], target.get("inputs") or []
        if link.origin_slot >= len(outputs) or link.id not in (outputs[link.origin_slot].get("links") or []):
            problems.append(
                f"link {link.id}: {graph.where(origin)} output {link.origin_slot} does not list it"
            )
            continue
        if link.target_slot >= len(inputs) or inputs[link.target_slot].get("link") != link.id:
            problems.append(
                f"link {link.id}: {graph.where(target)} input {link.target_slot} does not hold it"
            )
            continue
        out_type = _socket_output_type(graph, origin, link.origin_slot)
        inp = inputs[link.target_slot]
        in_type = _socket_input_type(graph, target, inp)
        if not valid_connection(link.type, out_type) or not valid_connection(out_type, in_type):
            problems.append(
                f"link {link.id}: {graph.where(origin)} output {link.origin_slot} ({out_type}) -> "
                f"{graph.where(target)} input '{inp.get('name')}' ({in_type}), link type {link.type}"
            )
    for node in graph.nodes.values():
        for inp in node.get("inputs") or []:
            if inp.get("link") is not None and int(inp["link"]) not in graph.links:
                problems.append(
                    f"{graph.where(node)}: input '{inp.get('name')}' holds unknown link {inp['link']}"
                )
        for slot, out in enumerate(node.get("outputs") or []):
            for link_id in out.get("links") or []:
                link = graph.links.get(int(link_id))
                if link is None or link.origin_id != str(node["id"]) or link.origin_slot != slot:
                    problems.append(
                        f"{graph.where(node)}: output {slot} lists link {link_id} that does not start there"
                    )
    return problems


def _socket_output_type(graph: _Graph, node: Mapping[str, Any], slot: int) -> Any:
    if node.get("type") in VIRTUAL_NODE_TYPES or node.get("type") not in graph.object_info:
        return (node.get("outputs") or [])[slot].get("type")
    types = output_types(graph.object_info[str(node["type"])])
    return types[slot] if slot < len(types) else None


def _socket_input_type(graph: _Graph, node: Mapping[str, Any], inp: Mapping[str, Any]) -> Any:
    if node.get("type") in VIRTUAL_NODE_TYPES or node.get("type") not in graph.object_info:
        return inp.get("type")
    defs = {d.name: d for d in input_defs(graph.object_info[str(node["type"])])}
    d = defs.get(str((inp.get("widget") or {}).get("name", inp.get("name"))))
    return inp.get("type") if d is None else d.type


# -- in-process object_info ------------------------------------------------------------------------


def local_object_info() -> dict[str, dict[str, Any]]:
    """``/object_info`` built in this process like 0.3.75's ``server.py`` (needs a started ``comfy_host``)."""
    if "nodes" not in sys.modules or not hasattr(sys.modules["nodes"], "NODE_CLASS_MAPPINGS"):
        raise RuntimeError(
            "ComfyUI is not loaded in this process: start it with the comfy_host fixture first"
        )
    nodes = sys.modules["nodes"]
    folder_paths = sys.modules["folder_paths"]
    from comfy_api.internal import _ComfyNodeInternal

    out: dict[str, dict[str, Any]] = {}
    with folder_paths.cache_helper:
        for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
            if issubclass(cls, _ComfyNodeInternal):
                out[name] = cls.GET_NODE_INFO_V1()
                continue
            inputs = cls.INPUT_TYPES()
            info: dict[str, Any] = {
                "input": inputs,
                "input_order": {key: list(value.keys()) for key, value in inputs.items()},
                "output": cls.RETURN_TYPES,
                "output_is_list": getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES)),
                "output_name": getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES),
                "name": name,
                "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name, name),
                "description": getattr(cls, "DESCRIPTION", ""),
                "python_module": getattr(cls, "RELATIVE_PYTHON_MODULE", "nodes"),
                "category": getattr(cls, "CATEGORY", "sd"),
                "output_node": getattr(cls, "OUTPUT_NODE", False) is True,
            }
            out[name] = json.loads(json.dumps(info, default=str))  # tuples -> lists, as over HTTP
    return out


# -- files -----------------------------------------------------------------------------------------


def load_workflow(path: str | Path) -> dict[str, Any]:
    """Read a workflow JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def save_workflow(workflow: Mapping[str, Any], path: str | Path) -> Path:
    """Write a workflow as indented JSON (what the frontend's export looks like, diff friendly)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(workflow, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


# -- builder ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """Output ``slot`` of a node in a :class:`WorkflowBuilder`; pass it as an input value to link it."""

    node: NodeRef
    slot: int


@dataclass(eq=False)
class NodeRef:
    """A node added to a :class:`WorkflowBuilder`.

    ``ref[0]`` / ``ref["IMAGE"]`` is an output; ``ref`` alone means output 0.
    """

    builder: WorkflowBuilder = field(repr=False)
    id: int
    type: str
    title: str | None = None
    mode: int = MODE_ALWAYS
    values: dict[str, Any] = field(default_factory=dict)
    controls: dict[str, str] = field(default_factory=dict)
    text: str | None = None  # notes; a primitive's value lives in values["value"]

    def __getitem__(self, key: int | str) -> Output:
        if isinstance(key, str):
            names = self.builder._output_names(self)
            if key not in names:
                raise KeyError(f"node {self.id} ({self.type}) has no output named {key!r}; it has {names}")
            key = names.index(key)
        return Output(self, int(key))


class WorkflowBuilder:
    """Author a UI-format workflow in Python; :meth:`build` lays it out and returns the JSON dict.

    Example::

        b = WorkflowBuilder(object_info)
        image = b.node("EmptyImage", width=64, height=48, color=0xFF0000)
        size = b.primitive(32, title="size")
        scaled = b.node("ImageScale", image=b.reroute(image), upscale_method="nearest-exact",
                        width=size, height=size, crop="disabled")
        b.node("SaveImage", images=scaled, filename_prefix="test")
        b.note("Scales a red square.")
        workflow = b.build()
        assert ui_to_api(workflow, object_info) == b.expected_api()

    Inputs not given get the definition's default. A value that is an :class:`Output` or :class:`NodeRef`
    links that input (for a widget input it becomes a converted widget socket); a primitive passed to a
    widget input feeds it. ``mode=MODE_BYPASS`` / ``MODE_NEVER`` bypass or mute a node. Node ids are
    1, 2, ... in the order of the calls.
    """

    def __init__(self, object_info: ObjectInfo) -> None:
        self.object_info = object_info
        self.refs: list[NodeRef] = []
        self.groups: list[tuple[str, list[NodeRef], str]] = []

    # -- adding nodes ------------------------------------------------------------------------------

    def _add(self, node_type: str, **kwargs: Any) -> NodeRef:
        ref = NodeRef(self, len(self.refs) + 1, node_type, **kwargs)
        self.refs.append(ref)
        return ref

    def node(
        self,
        class_type: str,
        inputs: Mapping[str, Any] | None = None,
        *,
        title: str | None = None,
        mode: int = MODE_ALWAYS,
        controls: Mapping[str, str] | None = None,
        **values: Any,
    ) -> NodeRef:
        """Add a node. ``inputs``/``values``: input name -> widget value, :class:`Output`, :class:`NodeRef`
        or primitive (pass inputs named ``title``, ``mode`` or ``controls`` in the ``inputs`` dict).

        ``controls``: control-widget values by input name (default "fixed", so saved workflows replay).
        """
        values = {**dict(inputs or {}), **values}
        if mode not in (0, 1, 2, 3, 4):
            raise WorkflowError(
                f"{class_type}: node mode must be 0..4 (MODE_BYPASS, MODE_NEVER), got {mode!r}"
            )
        if class_type not in self.object_info:
            raise WorkflowError(f"unknown node type '{class_type}'")
        defs = all_input_defs(self.object_info[class_type])  # inputs of dynamic combo options too
        unknown = sorted(set(values) - set(defs))
        if unknown:
            raise WorkflowError(f"{class_type} has no inputs {unknown}; it has {list(defs)}")
        for name, value in values.items():
            if isinstance(value, NodeRef) and value.type == "PrimitiveNode" and not defs[name].widget:
                raise WorkflowError(f"{class_type}.{name} is not a widget: a PrimitiveNode cannot feed it")
        for name in controls or {}:
            if name not in defs or "control" not in defs[name].extra_widgets:
                raise WorkflowError(f"{class_type}.{name} has no control_after_generate widget")
        return self._add(
            class_type, title=title, mode=mode, values=dict(values), controls=dict(controls or {})
        )

    def reroute(self, source: Output | NodeRef) -> NodeRef:
        """Add a ``Reroute`` fed by ``source``; link from it like from any node."""
        return self._add("Reroute", values={"": source})

    def primitive(self, value: Any, *, title: str | None = None, control: str = "fixed") -> NodeRef:
        """Add a ``PrimitiveNode`` holding ``value``; pass it as the value of widget inputs to feed them."""
        return self._add("PrimitiveNode", title=title, values={"value": value}, controls={"value": control})

    def note(self, text: str, *, markdown: bool = False, title: str | None = None) -> NodeRef:
        """Add a ``Note`` (or ``MarkdownNote``) with ``text``; never executed."""
        return self._add("MarkdownNote" if markdown else "Note", title=title, text=text)

    def group(self, title: str, nodes: Sequence[NodeRef], color: str = "#3f789e") -> None:
        """Draw a titled group box around ``nodes`` (computed at :meth:`build`)."""
        self.groups.append((title, list(nodes), color))

    # -- helpers -----------------------------------------------------------------------------------

    @staticmethod
    def _source(value: Any) -> Output | None:
        if isinstance(value, Output):
            return value
        if isinstance(value, NodeRef):
            return value[0]
        return None

    def _output_names(self, ref: NodeRef) -> list[str]:
        if ref.type in VIRTUAL_NODE_TYPES:
            return [self._output_type(ref, 0)]
        node_def = self.object_info[ref.type]
        return [str(n) for n in node_def.get("output_name") or output_types(node_def)]

    def _output_type(self, ref: NodeRef, slot: int) -> str:
        if ref.type == "Reroute":
            source = self._source(ref.values[""])
            return self._output_type(source.node, source.slot) if source else "*"
        if ref.type == "PrimitiveNode":
            targets = self._primitive_targets(ref)
            return targets[0][1].type if targets else "*"
        return output_types(self.object_info[ref.type])[slot]

    def _primitive_targets(self, prim: NodeRef) -> list[tuple[NodeRef, InputDef]]:
        result = []
        for ref in self.refs:
            if ref.type in VIRTUAL_NODE_TYPES:
                continue
            defs = all_input_defs(self.object_info[ref.type])
            result.extend((ref, defs[name]) for name, value in ref.values.items() if value is prim)
        return result

    def _links_in(self, ref: NodeRef) -> list[tuple[str, Output | NodeRef]]:
        """(input name, source) pairs of ``ref`` in socket order: socket inputs, then linked widget inputs."""
        if ref.type == "Reroute":
            return [("", ref.values[""])]
        if ref.type in VIRTUAL_NODE_TYPES:
            return []
        defs = self._defs(ref)
        linked = [
            d for d in defs if self._source(ref.values.get(d.name)) or _is_primitive(ref.values.get(d.name))
        ]
        return [
            (d.name, ref.values[d.name])
            for d in [*(d for d in linked if not d.widget), *(d for d in linked if d.widget)]
        ]

    def _pick(self, ref: NodeRef) -> Any:
        """The option each dynamic combo of ``ref`` is set to (its value; a linked one keeps its default)."""

        def pick(d: InputDef) -> Any:
            value = ref.values.get(d.name, d.default())
            if _is_primitive(value):
                return value.values["value"]
            return d.default() if self._source(value) is not None else value

        return pick

    def _defs(self, ref: NodeRef) -> list[InputDef]:
        """``ref``'s inputs in order, with the inputs its dynamic combos' chosen options add."""
        return expand_inputs(input_defs(self.object_info[ref.type]), self._pick(ref))

    # -- output --------------------------------------------------------------------------------------

    def build(self, *, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The UI-format workflow (frontend 1.32 layout, schema version 0.4) as a JSON-ready dict."""
        links: list[list[Any]] = []
        node_inputs: dict[int, list[dict[str, Any]]] = {}
        node_outputs: dict[int, list[dict[str, Any]]] = {
            ref.id: self._outputs_skeleton(ref) for ref in self.refs
        }
        for ref in self.refs:
            defs = {d.name: d for d in self._defs(ref)} if ref.type not in VIRTUAL_NODE_TYPES else {}
            entries = []
            if ref.type not in VIRTUAL_NODE_TYPES:
                entries = [
                    {"name": d.name, "type": d.type, **({"shape": 7} if d.optional else {}), "link": None}
                    for d in defs.values()
                    if not d.widget
                ]
            elif ref.type == "Reroute":
                entries = [{"name": "", "type": "*", "link": None}]
            by_name = {e["name"]: e for e in entries}
            for name, value in self._links_in(ref):
                source = value[0] if isinstance(value, NodeRef) else value
                link_id = len(links) + 1
                link_type = self._output_type(source.node, source.slot)
                links.append([link_id, source.node.id, source.slot, ref.id, 0, link_type])
                node_outputs[source.node.id][source.slot]["links"].append(link_id)
                if name in by_name:
                    by_name[name]["link"] = link_id
                else:
                    d = defs[name]
                    entries.append({"name": name, "type": d.type, "widget": {"name": name}, "link": link_id})
            entries = [e for e in entries if not (e.get("widget") and e["link"] is None)]
            for slot, entry in enumerate(entries):
                if entry["link"] is not None:
                    links[entry["link"] - 1][4] = slot
            node_inputs[ref.id] = entries
        nodes = []
        positions = self._layout(node_inputs, node_outputs)
        for order, ref in enumerate(self._execution_order()):
            pos, size = positions[ref.id]
            node: dict[str, Any] = {
                "id": ref.id,
                "type": ref.type,
                "pos": list(pos),
                "size": list(size),
                "flags": {},
                "order": order,
                "mode": ref.mode,
                "inputs": node_inputs[ref.id],
                "outputs": node_outputs[ref.id],
                "properties": self._properties(ref),
            }
            if ref.title:
                node["title"] = ref.title
            values = self._widgets_values(ref)
            if values:
                node["widgets_values"] = values
            nodes.append(node)
        nodes.sort(key=lambda n: n["id"])
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, json.dumps([n["type"] for n in nodes]))),
            "revision": 0,
            "last_node_id": len(self.refs),
            "last_link_id": len(links),
            "nodes": nodes,
            "links": links,
            "groups": self._groups(positions),
            "config": {},
            "extra": {"ds": {"scale": 1, "offset": [0, 0]}, **dict(extra or {})},
            "version": 0.4,
        }

    def _outputs_skeleton(self, ref: NodeRef) -> list[dict[str, Any]]:
        if ref.type in NOTE_TYPES:
            return []
        if ref.type == "Reroute":
            return [{"name": "", "type": self._output_type(ref, 0), "links": []}]
        if ref.type == "PrimitiveNode":
            targets = self._primitive_targets(ref)
            widget = {"name": targets[0][1].name} if targets else {}
            kind = self._output_type(ref, 0)
            return [
                {
                    "name": kind if targets else "connect to widget input",
                    "type": kind,
                    "links": [],
                    "widget": widget,
                }
            ]
        node_def = self.object_info[ref.type]
        names = [str(n) for n in node_def.get("output_name") or output_types(node_def)]
        return [
            {"name": n, "type": t, "links": []} for n, t in zip(names, output_types(node_def), strict=False)
        ]

    def _widgets_values(self, ref: NodeRef) -> list[Any] | None:
        if ref.type in NOTE_TYPES:
            return [ref.text or ""]
        if ref.type == "Reroute":
            return None
        if ref.type == "PrimitiveNode":
            targets = self._primitive_targets(ref)
            value = ref.values["value"]
            if not targets:
                return [value]
            d = targets[0][1]
            if d.type in ("INT", "FLOAT"):
                return [value, ref.controls.get("value", "fixed")]
            if d.type == "COMBO":
                return [value, ref.controls.get("value", "fixed"), ""]
            return [value]
        values: list[Any] = []
        for d, kind in _layout(self.object_info[ref.type], self._pick(ref)):
            if kind == "value":
                given = ref.values.get(d.name, d.default())
                if _is_primitive(given):
                    given = given.values["value"]
                elif self._source(given) is not None:
                    given = d.default()  # a converted widget keeps a value the UI shows greyed out
                values.append(given)
            elif kind == "control":
                values.append(ref.controls.get(d.name, "fixed"))
            elif kind == "filter":
                values.append("")
            else:
                values.append("image")
        return values

    def _properties(self, ref: NodeRef) -> dict[str, Any]:
        if ref.type == "Reroute":
            return {"showOutputText": False, "horizontal": False}
        if ref.type == "PrimitiveNode":
            return {"Run widget replace on values": False}
        if ref.type in NOTE_TYPES:
            return {}
        return {"Node name for S&R": ref.type}

    def _upstream(self, ref: NodeRef) -> list[NodeRef]:
        result = []
        for value in ref.values.values():
            if _is_primitive(value):
                result.append(value)
            elif (source := self._source(value)) is not None:
                result.append(source.node)
        return result

    def _execution_order(self) -> list[NodeRef]:
        depth: dict[int, int] = {}

        def level(ref: NodeRef, stack: tuple[int, ...] = ()) -> int:
            if ref.id in stack:
                raise WorkflowError(f"cycle through node {ref.id}")
            if ref.id not in depth:
                ups = self._upstream(ref)
                depth[ref.id] = 1 + max((level(u, (*stack, ref.id)) for u in ups), default=-1)
            return depth[ref.id]

        for ref in self.refs:
            level(ref)
        self._depth = depth
        return sorted(self.refs, key=lambda r: (depth[r.id], r.id))

    def _layout(
        self,
        node_inputs: Mapping[int, list[dict[str, Any]]],
        node_outputs: Mapping[int, list[dict[str, Any]]],
    ) -> dict[int, tuple[tuple[float, float], tuple[float, float]]]:
        self._execution_order()
        columns: dict[int, list[NodeRef]] = {}
        for ref in self.refs:
            columns.setdefault(0 if ref.type in NOTE_TYPES else self._depth[ref.id], []).append(ref)
        result: dict[int, tuple[tuple[float, float], tuple[float, float]]] = {}
        x = 50.0
        for col in sorted(columns):
            y = 80.0
            width = 0.0
            for ref in columns[col]:
                size = self._size(ref, node_inputs[ref.id], node_outputs[ref.id])
                result[ref.id] = ((x, y), size)
                y += size[1] + 70.0
                width = max(width, size[0])
            x += width + 80.0
        return result

    def _size(
        self, ref: NodeRef, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]
    ) -> tuple[float, float]:
        if ref.type == "Reroute":
            return (75.0, 26.0)
        if ref.type in NOTE_TYPES:
            lines = max(3, len((ref.text or "").splitlines()) + len(ref.text or "") // 60)
            return (400.0, 30.0 + 20.0 * lines)
        values = self._widgets_values(ref) or []
        multiline = 0
        if ref.type not in VIRTUAL_NODE_TYPES:
            multiline = sum(
                1 for d in input_defs(self.object_info[ref.type]) if d.widget and d.options.get("multiline")
            )
        sockets = max(len([i for i in inputs if not i.get("widget")]), len(outputs))
        return (320.0, 30.0 + 22.0 * sockets + 26.0 * len(values) + 90.0 * multiline)

    def _groups(
        self, positions: Mapping[int, tuple[tuple[float, float], tuple[float, float]]]
    ) -> list[dict[str, Any]]:
        groups = []
        for index, (title, members, color) in enumerate(self.groups, start=1):
            boxes = [positions[m.id] for m in members]
            x0 = min(p[0] for p, _ in boxes) - 20
            y0 = min(p[1] for p, _ in boxes) - 70
            x1 = max(p[0] + s[0] for p, s in boxes) + 20
            y1 = max(p[1] + s[1] for p, s in boxes) + 20
            groups.append(
                {
                    "id": index,
                    "title": title,
                    "bounding": [x0, y0, x1 - x0, y1 - y0],
                    "color": color,
                    "font_size": 24,
                    "flags": {},
                }
            )
        return groups

    def expected_api(self) -> ApiPrompt:
        """The API prompt this description means, derived from the description (not from the UI JSON)."""
        active = {
            r.id: r
            for r in self.refs
            if r.type not in VIRTUAL_NODE_TYPES and r.mode not in (MODE_NEVER, MODE_BYPASS)
        }

        def follow(source: Output, want: str | None) -> tuple[str, Any] | None:
            ref = source.node
            if ref.type == "Reroute":
                up = self._source(ref.values[""])
                return follow(up, want) if up else None
            if ref.mode == MODE_BYPASS:
                out_type = want or self._output_type(ref, source.slot)
                for name, value in self._links_in(ref):
                    up = self._source(value)
                    d = all_input_defs(self.object_info[ref.type])[name]
                    if up is not None and d.type == out_type:
                        return follow(up, out_type)
                return None
            if ref.id not in active:
                return None
            return ("link", [str(ref.id), source.slot])

        api: ApiPrompt = {}
        for ref in active.values():
            inputs: dict[str, Any] = {}
            for d in self._defs(ref):
                value = ref.values.get(d.name, d.default() if d.widget else None)
                if _is_primitive(value):
                    inputs[d.name] = _wrap(value.values["value"])
                elif (source := self._source(value)) is not None:
                    resolved = follow(source, d.type)
                    if resolved is not None:
                        inputs[d.name] = resolved[1]
                elif d.widget:
                    inputs[d.name] = _wrap(value)
            api[str(ref.id)] = {"inputs": inputs, "class_type": ref.type}
        return api


def _is_primitive(value: Any) -> bool:
    return isinstance(value, NodeRef) and value.type == "PrimitiveNode"


def clone(workflow: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of a workflow (to edit a variant in a test)."""
    return copy.deepcopy(dict(workflow))
