"""UI-format workflow <-> API prompt conversion (tests/workflow_api.py), checked against the frontend's rules.

Most tests use hand-written node definitions in the shape ``/object_info`` returns (no ComfyUI needed);
the last ones convert workflows with the in-process ComfyUI's definitions and run them there.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
from browser import find_chromium, open_frontend
from comfy_host import ComfyHost
from comfy_server import ComfyServer
from workflow_api import (
    MODE_BYPASS,
    MODE_NEVER,
    WidgetSlot,
    WorkflowBuilder,
    WorkflowError,
    assert_valid_ui_workflow,
    load_workflow,
    local_object_info,
    process_dynamic_prompt,
    save_workflow,
    ui_to_api,
    validate_ui_workflow,
    widget_layout,
    widget_values_by_name,
)


def _int(default: int, lo: int = 0, hi: int = 16384, **extra: object) -> list:
    return ["INT", {"default": default, "min": lo, "max": hi, **extra}]


def _node(required: dict, output: list, optional: dict | None = None, output_node: bool = False) -> dict:
    inputs = {"required": required, **({"optional": optional} if optional else {})}
    return {
        "input": inputs,
        "input_order": {k: list(v) for k, v in inputs.items()},
        "output": output,
        "output_name": output,
        "output_node": output_node,
    }


#: Definitions as /object_info reports them (V1 list combos, V3 "COMBO" specs, hidden inputs).
OBJECT_INFO = {
    "EmptyImage": _node(
        {
            "width": _int(512, 1),
            "height": _int(512, 1),
            "batch_size": _int(1, 1, 4096),
            "color": _int(0, 0, 16777215),
        },
        ["IMAGE"],
    ),
    "ImageScale": _node(
        {
            "image": ["IMAGE"],
            "upscale_method": [["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]],
            "width": _int(512),
            "height": _int(512),
            "crop": [["disabled", "center"]],
        },
        ["IMAGE"],
    ),
    "ImageInvert": _node({"image": ["IMAGE"]}, ["IMAGE"]),
    "ImageBlend": _node(
        {
            "image1": ["IMAGE"],
            "image2": ["IMAGE"],
            "blend_factor": ["FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}],
            "blend_mode": [["normal", "multiply"]],
        },
        ["IMAGE"],
    ),
    "SaveImage": {
        **_node(
            {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}, [], output_node=True
        ),
        "input": {
            "required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        },
    },
    "KSamplerLike": _node(
        {
            "model": ["MODEL"],
            "seed": ["INT", {"default": 0, "min": 0, "max": 2**64 - 1, "control_after_generate": True}],
            "steps": _int(20, 1, 10000),
            "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0}],
        },
        ["LATENT"],
        optional={"noise_seed": _int(0), "latent": ["LATENT"]},
    ),
    "NamedSeedNoControl": _node({"seed": ["INT", {"default": 0, "control_after_generate": False}]}, ["INT"]),
    "LegacySeed": _node({"noise_seed": _int(3)}, ["INT"]),
    "V3ComboControl": _node(
        {
            "mode": ["COMBO", {"options": ["a", "b", "c"], "default": "b", "control_after_generate": True}],
            "count": ["INT", {"default": 2, "forceInput": True}],
            "text": ["STRING", {"multiline": True, "dynamicPrompts": True}],
        },
        ["STRING"],
    ),
    "LoadImage": _node({"image": [["a.png", "b.png"], {"image_upload": True}]}, ["IMAGE", "MASK"]),
    "ListWidget": _node({"values": ["STRING", {"default": ""}]}, ["STRING"], output_node=True),
}

#: A UI workflow exactly as the frontend 1.32 saves it: a Note, a Reroute, a PrimitiveNode feeding two
#: converted widgets, a bypassed node, a muted branch, a group; unlinked widget slots are compressed away.
UI_WORKFLOW = {
    "id": "0c4b8a5e-0000-4000-8000-000000000001",
    "revision": 0,
    "last_node_id": 8,
    "last_link_id": 7,
    "nodes": [
        {
            "id": 1,
            "type": "EmptyImage",
            "pos": [50, 80],
            "size": [315, 130],
            "flags": {},
            "order": 0,
            "mode": 0,
            "inputs": [],
            "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1, 7]}],
            "properties": {"Node name for S&R": "EmptyImage"},
            "widgets_values": [64, 48, 1, 16711680],
        },
        {
            "id": 2,
            "type": "PrimitiveNode",
            "pos": [50, 300],
            "size": [210, 82],
            "flags": {},
            "order": 1,
            "mode": 0,
            "inputs": [],
            "outputs": [{"name": "INT", "type": "INT", "widget": {"name": "width"}, "links": [3, 4]}],
            "title": "size",
            "properties": {"Run widget replace on values": False},
            "widgets_values": [32, "fixed"],
        },
        {
            "id": 3,
            "type": "Reroute",
            "pos": [420, 80],
            "size": [75, 26],
            "flags": {},
            "order": 2,
            "mode": 0,
            "inputs": [{"name": "", "type": "*", "link": 1}],
            "outputs": [{"name": "", "type": "IMAGE", "links": [2]}],
            "properties": {"showOutputText": False, "horizontal": False},
        },
        {
            "id": 4,
            "type": "ImageScale",
            "pos": [560, 80],
            "size": [315, 130],
            "flags": {},
            "order": 3,
            "mode": 0,
            "inputs": [
                {"name": "image", "type": "IMAGE", "link": 2},
                {"name": "width", "type": "INT", "widget": {"name": "width"}, "link": 3},
                {"name": "height", "type": "INT", "widget": {"name": "height"}, "link": 4},
            ],
            "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [5]}],
            "properties": {"Node name for S&R": "ImageScale"},
            "widgets_values": ["nearest-exact", 32, 32, "disabled"],
        },
        {
            "id": 5,
            "type": "ImageInvert",
            "pos": [950, 80],
            "size": [140, 26],
            "flags": {},
            "order": 4,
            "mode": 4,
            "inputs": [{"name": "image", "type": "IMAGE", "link": 5}],
            "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [6]}],
            "properties": {"Node name for S&R": "ImageInvert"},
        },
        {
            "id": 6,
            "type": "SaveImage",
            "pos": [1150, 80],
            "size": [315, 270],
            "flags": {},
            "order": 5,
            "mode": 0,
            "inputs": [{"name": "images", "type": "IMAGE", "link": 6}],
            "outputs": [],
            "properties": {"Node name for S&R": "SaveImage"},
            "widgets_values": ["memento_test"],
        },
        {
            "id": 7,
            "type": "Note",
            "pos": [50, 450],
            "size": [400, 120],
            "flags": {},
            "order": 6,
            "mode": 0,
            "inputs": [],
            "outputs": [],
            "properties": {},
            "widgets_values": ["A red image, scaled; the invert node is bypassed."],
            "color": "#432",
            "bgcolor": "#653",
        },
        {
            "id": 8,
            "type": "SaveImage",
            "pos": [560, 300],
            "size": [315, 270],
            "flags": {},
            "order": 7,
            "mode": 2,
            "inputs": [{"name": "images", "type": "IMAGE", "link": 7}],
            "outputs": [],
            "properties": {"Node name for S&R": "SaveImage"},
            "widgets_values": ["muted"],
        },
    ],
    "links": [
        [1, 1, 0, 3, 0, "IMAGE"],
        [2, 3, 0, 4, 0, "IMAGE"],
        [3, 2, 0, 4, 1, "INT"],
        [4, 2, 0, 4, 2, "INT"],
        [5, 4, 0, 5, 0, "IMAGE"],
        [6, 5, 0, 6, 0, "IMAGE"],
        [7, 1, 0, 8, 0, "IMAGE"],
    ],
    "groups": [
        {
            "id": 1,
            "title": "scale",
            "bounding": [540, 0, 360, 250],
            "color": "#3f789e",
            "font_size": 24,
            "flags": {},
        }
    ],
    "config": {},
    "extra": {"ds": {"scale": 1, "offset": [0, 0]}, "frontendVersion": "1.32.9"},
    "version": 0.4,
}

#: What the frontend queues for UI_WORKFLOW (written by hand from graphToPrompt's rules).
EXPECTED_API = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": 16711680},
    },
    "4": {
        "class_type": "ImageScale",
        "inputs": {
            "image": ["1", 0],
            "upscale_method": "nearest-exact",
            "width": 32,
            "height": 32,
            "crop": "disabled",
        },
    },
    "6": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "memento_test"}},
}


def build_core_workflow(object_info: dict) -> WorkflowBuilder:
    """UI_WORKFLOW's graph, authored with the builder (same ids, same meaning)."""
    b = WorkflowBuilder(object_info)
    image = b.node("EmptyImage", width=64, height=48, batch_size=1, color=0xFF0000)
    size = b.primitive(32, title="size")
    scaled = b.node(
        "ImageScale",
        image=b.reroute(image),
        upscale_method="nearest-exact",
        width=size,
        height=size,
        crop="disabled",
    )
    inverted = b.node("ImageInvert", image=scaled, mode=MODE_BYPASS)
    b.node("SaveImage", images=inverted, filename_prefix="memento_test")
    b.note("A red image, scaled; the invert node is bypassed.")
    b.node("SaveImage", images=image, filename_prefix="muted", mode=MODE_NEVER)
    b.group("scale", [scaled])
    return b


# -- widget layout ---------------------------------------------------------------------------------


def test_widget_layout_follows_the_frontend() -> None:
    """Control widgets after seeds, filter after combo controls, upload last, sockets take no value."""
    assert widget_layout(OBJECT_INFO["KSamplerLike"]) == [
        WidgetSlot("seed", "value"),
        WidgetSlot("seed", "control"),
        WidgetSlot("steps", "value"),
        WidgetSlot("cfg", "value"),
        WidgetSlot("noise_seed", "value"),  # optional, named noise_seed, no option: legacy control widget
        WidgetSlot("noise_seed", "control"),
    ]
    assert widget_layout(OBJECT_INFO["NamedSeedNoControl"]) == [WidgetSlot("seed", "value")]
    assert widget_layout(OBJECT_INFO["LegacySeed"]) == [
        WidgetSlot("noise_seed", "value"),
        WidgetSlot("noise_seed", "control"),
    ]
    assert widget_layout(OBJECT_INFO["V3ComboControl"]) == [
        WidgetSlot("mode", "value"),
        WidgetSlot("mode", "control"),
        WidgetSlot("mode", "filter"),
        WidgetSlot("text", "value"),  # count has forceInput: a socket
    ]
    assert widget_layout(OBJECT_INFO["LoadImage"]) == [
        WidgetSlot("image", "value"),
        WidgetSlot("image", "upload"),
    ]
    values = widget_values_by_name(OBJECT_INFO["KSamplerLike"], [7, "randomize", 4, 2.5, 9, "fixed"])
    assert values == {"seed": 7, "steps": 4, "cfg": 2.5, "noise_seed": 9}
    assert widget_values_by_name(OBJECT_INFO["LoadImage"], ["b.png", "image"]) == {"image": "b.png"}
    with pytest.raises(WorkflowError, match=r"KSamplerLike.*3 widget values .* 6 widgets"):
        widget_values_by_name(OBJECT_INFO["KSamplerLike"], [7, 4, 2.5], where="node 3 (KSamplerLike)")
    lenient = widget_values_by_name(OBJECT_INFO["KSamplerLike"], [7, "fixed", 4], strict=False)
    assert lenient == {"seed": 7, "steps": 4, "cfg": 8.0, "noise_seed": 0}
    assert widget_values_by_name(OBJECT_INFO["KSamplerLike"], {"seed": 1, "junk": 2}) == {"seed": 1}


def _dynamic(options: dict[str, dict], **extra: object) -> list:
    """A V3 dynamic combo spec as /object_info reports it (ComfyUI 0.33+)."""
    return [
        "COMFY_DYNAMICCOMBO_V3",
        {"options": [{"key": k, "inputs": v} for k, v in options.items()], **extra},
    ]


_ENCODING = _dynamic(
    {
        "auto": {"required": {}},
        "re-encode": {
            "required": {
                "crf": ["FLOAT", {"default": 23.0, "min": 0.0, "max": 51.0}],
                "color_space": ["COMBO", {"options": ["auto", "sRGB"], "default": "auto"}],
            }
        },
    }
)
_CODEC = {"auto": {"required": {}}, "h264": {"required": {}, "optional": {"encoding": _ENCODING}}}

#: ComfyUI 0.33's SaveVideo and CreateVideo (trimmed): ``format`` is a dynamic combo whose options add a
#: ``codec`` dynamic combo (h264 adds an optional ``encoding`` one); the old top-level ``codec`` is kept as a
#: hidden optional input; CreateVideo gained an optional ``bit_depth``.
OBJECT_INFO_033 = {
    "SaveVideo": _node(
        {
            "video": ["VIDEO"],
            "filename_prefix": ["STRING", {"default": "video/ComfyUI"}],
            "format": _dynamic(
                {
                    "auto": {"required": {"codec": _dynamic(_CODEC)}},
                    "mp4": {"required": {"codec": _dynamic(_CODEC)}},
                }
            ),
        },
        ["VIDEO"],
        optional={"codec": _dynamic(_CODEC, hidden=True)},
        output_node=True,
    ),
    "CreateVideo": _node(
        {"images": ["IMAGE"], "fps": ["FLOAT", {"default": 30.0, "min": 1.0, "max": 120.0}]},
        ["VIDEO"],
        optional={"audio": ["AUDIO"], "bit_depth": _int(8, 8, 10)},
    ),
    "EmptyImage": OBJECT_INFO["EmptyImage"],
}


def test_dynamic_combos_follow_the_frontend() -> None:
    """A dynamic combo's chosen option puts its inputs right after it (recursively); saved values are
    assigned in order, each combo re-laid out before the next value, as LGraphNode.configure does. A
    template saved on ComfyUI 0.3.75 (SaveVideo [prefix, format, codec], CreateVideo [fps]) maps to what the
    0.33 frontend shows and queues; widgets of optional inputs a newer ComfyUI added keep their defaults."""
    save = OBJECT_INFO_033["SaveVideo"]
    assert widget_layout(save) == [
        WidgetSlot("filename_prefix", "value"),
        WidgetSlot("format", "value"),
        WidgetSlot("format.codec", "value"),  # the first option ("auto") adds a codec, itself on "auto"
        WidgetSlot("codec", "value"),  # hidden, but a widget the frontend saves and sends
    ]
    assert widget_values_by_name(save, ["shots/a", "mp4", "h264"]) == {
        "filename_prefix": "shots/a",
        "format": "mp4",
        "format.codec": "h264",
        "format.codec.encoding": "auto",  # added by h264, optional: its default
        "codec": "auto",
    }
    saved_033 = ["shots/a", "mp4", "h264", "re-encode", 18.0, "sRGB", "auto"]
    assert widget_values_by_name(save, saved_033) == {
        "filename_prefix": "shots/a",
        "format": "mp4",
        "format.codec": "h264",
        "format.codec.encoding": "re-encode",
        "format.codec.encoding.crf": 18.0,
        "format.codec.encoding.color_space": "sRGB",
        "codec": "auto",
    }
    with pytest.raises(WorkflowError, match=r"1 widget values .* 4 widgets .*optional inputs"):
        widget_values_by_name(save, ["shots/a"])  # format and format.codec are required
    with pytest.raises(WorkflowError, match=r"8 widget values"):
        widget_values_by_name(save, [*saved_033, "extra"])
    assert widget_values_by_name(OBJECT_INFO_033["CreateVideo"], [16.0]) == {"fps": 16.0, "bit_depth": 8}

    b = WorkflowBuilder(OBJECT_INFO_033)
    image = b.node("EmptyImage", width=64, height=48)
    video = b.node("CreateVideo", images=image, fps=16.0)
    b.node("SaveVideo", video=video, filename_prefix="shots/a", format="mp4", **{"format.codec": "h264"})
    workflow = b.build()
    assert workflow["nodes"][2]["widgets_values"] == ["shots/a", "mp4", "h264", "auto", "auto"]
    assert_valid_ui_workflow(workflow, OBJECT_INFO_033, check_combos=True)
    api = ui_to_api(workflow, OBJECT_INFO_033)
    assert api == b.expected_api()
    assert api["3"]["inputs"] == {
        "video": ["2", 0],
        "filename_prefix": "shots/a",
        "format": "mp4",
        "format.codec": "h264",
        "format.codec.encoding": "auto",
        "codec": "auto",
    }
    old = copy.deepcopy(workflow)  # the same nodes as saved by the 0.3.75 frontend
    old["nodes"][1]["widgets_values"] = [16.0]
    old["nodes"][2]["widgets_values"] = ["shots/a", "mp4", "h264"]
    assert validate_ui_workflow(old, OBJECT_INFO_033, check_combos=True) == []
    assert ui_to_api(old, OBJECT_INFO_033) == api


def test_dynamic_prompts_match_the_frontend() -> None:
    """Comments are stripped, single choices resolved, escapes kept literal, choices drawn from the rng."""
    assert process_dynamic_prompt("a cat /* hidden */ on a mat // note") == "a cat  on a mat "
    assert process_dynamic_prompt(r"a {red} cat \{not a choice\}") == "a red cat {not a choice}"
    picks = {process_dynamic_prompt("{a|b|{c|d}}", random.Random(seed)) for seed in range(40)}
    assert picks == {"a", "b", "c", "d"}


# -- UI -> API -------------------------------------------------------------------------------------


def test_saved_ui_workflow_converts_like_the_frontend() -> None:
    """Reroute followed, primitive copied into both widgets, bypass passed through, mute and note dropped."""
    assert ui_to_api(UI_WORKFLOW, OBJECT_INFO) == EXPECTED_API
    assert validate_ui_workflow(UI_WORKFLOW, OBJECT_INFO, check_combos=True) == []
    with_meta = ui_to_api(UI_WORKFLOW, OBJECT_INFO, meta=True)
    assert with_meta["6"]["_meta"] == {"title": "SaveImage"}


def test_primitive_value_wins_over_the_stale_widget_value() -> None:
    """The frontend's PrimitiveNode.applyToGraph writes its value into the target widget before queueing."""
    workflow = copy.deepcopy(UI_WORKFLOW)
    workflow["nodes"][1]["widgets_values"] = [40, "increment"]
    api = ui_to_api(workflow, OBJECT_INFO)
    assert api["4"]["inputs"]["width"] == 40 and api["4"]["inputs"]["height"] == 40


def test_muted_source_drops_the_input_and_bypass_picks_the_matching_type() -> None:
    """An input fed by a muted node disappears (widget value too); a bypassed node passes its input on."""
    b = WorkflowBuilder(OBJECT_INFO)
    first = b.node("EmptyImage", width=8, height=8)
    second = b.node("EmptyImage", width=16, height=16, mode=MODE_NEVER)
    blend = b.node("ImageBlend", image1=first, image2=second, blend_factor=0.25, mode=MODE_BYPASS)
    scaled = b.node(
        "ImageScale", image=blend, width=second, height=4
    )  # width: converted widget <- muted INT?
    b.node("SaveImage", images=scaled)
    workflow = b.build()
    api = ui_to_api(workflow, OBJECT_INFO)
    assert set(api) == {"1", "4", "5"}
    assert api["4"]["inputs"]["image"] == ["1", 0]  # through the bypassed blend's image1
    assert "width" not in api["4"]["inputs"]  # linked to a muted node: dropped, widget value included
    assert api["4"]["inputs"]["height"] == 4
    assert api == b.expected_api()
    problems = validate_ui_workflow(workflow, OBJECT_INFO)
    assert any("link" in p and "INT" in p for p in problems), problems  # IMAGE output into an INT widget


def test_list_values_are_wrapped_and_dynamic_prompts_applied() -> None:
    """Array widget values become {"__value__": [...]}; dynamicPrompts strings lose their comments."""
    b = WorkflowBuilder(OBJECT_INFO)
    b.node("ListWidget", values=["x", "y"])
    source = b.node("LegacySeed", noise_seed=5)
    b.node(
        "V3ComboControl", {"mode": "c"}, count=source, text="hello // world", controls={"mode": "randomize"}
    )
    workflow = b.build()
    assert workflow["nodes"][2]["widgets_values"] == ["c", "randomize", "", "hello // world"]
    api = ui_to_api(workflow, OBJECT_INFO)
    assert api["1"]["inputs"] == {"values": {"__value__": ["x", "y"]}}
    assert api["3"]["inputs"] == {"mode": "c", "text": "hello ", "count": ["2", 0]}


def test_unsupported_and_broken_workflows_raise_readable_errors() -> None:
    """Unknown node types, dangling links and subgraphs stop the conversion with the node named."""
    workflow = copy.deepcopy(UI_WORKFLOW)
    workflow["nodes"][3]["type"] = "NotInstalled"
    with pytest.raises(
        WorkflowError, match=r"node 4 \(NotInstalled\): node type 'NotInstalled' is not installed"
    ):
        ui_to_api(workflow, OBJECT_INFO)
    workflow = copy.deepcopy(UI_WORKFLOW)
    workflow["nodes"][3]["inputs"][0]["link"] = 99
    with pytest.raises(WorkflowError, match="link 99 is not in the workflow's links"):
        ui_to_api(workflow, OBJECT_INFO)
    with pytest.raises(WorkflowError, match="subgraphs"):
        ui_to_api({**UI_WORKFLOW, "definitions": {"subgraphs": [{"id": "x"}]}}, OBJECT_INFO)


# -- builder and validator -------------------------------------------------------------------------


def test_builder_round_trip_equals_the_hand_written_workflow(tmp_path: Path) -> None:
    """The builder's UI JSON converts to the frontend-saved file's API prompt, and survives a save."""
    b = build_core_workflow(OBJECT_INFO)
    workflow = b.build()
    assert b.expected_api() == EXPECTED_API
    assert ui_to_api(workflow, OBJECT_INFO) == EXPECTED_API
    assert_valid_ui_workflow(workflow, OBJECT_INFO, check_combos=True)
    saved = load_workflow(save_workflow(workflow, tmp_path / "core.json"))
    assert saved == workflow
    # Structure the frontend expects: compressed widget slots, links mirrored on both ends, laid out.
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert [i["name"] for i in nodes[4]["inputs"]] == ["image", "width", "height"]
    assert nodes[4]["widgets_values"] == ["nearest-exact", 32, 32, "disabled"]
    assert nodes[2]["widgets_values"] == [32, "fixed"] and nodes[2]["outputs"][0]["type"] == "INT"
    assert nodes[3]["outputs"][0]["type"] == "IMAGE"
    assert [n["mode"] for n in workflow["nodes"]] == [0, 0, 0, 0, 4, 0, 0, 2]
    xs = [nodes[i]["pos"][0] for i in (1, 3, 4, 5, 6)]
    assert xs == sorted(xs) and len(set(xs)) == 5  # left to right along the links
    (group,) = workflow["groups"]
    x, _, w, _ = group["bounding"]
    assert x <= nodes[4]["pos"][0] and x + w >= nodes[4]["pos"][0] + nodes[4]["size"][0]
    assert workflow["last_link_id"] == len(workflow["links"]) == 7


def test_builder_rejects_unknown_inputs_and_bad_primitives() -> None:
    """Typos in input names and primitives on socket-only inputs fail where the workflow is authored."""
    b = WorkflowBuilder(OBJECT_INFO)
    with pytest.raises(WorkflowError, match=r"ImageScale has no inputs \['widht'\]"):
        b.node("ImageScale", widht=3)
    with pytest.raises(WorkflowError, match="unknown node type"):
        b.node("Nope")
    with pytest.raises(WorkflowError, match="not a widget"):
        b.node("ImageInvert", image=b.primitive(1))
    with pytest.raises(WorkflowError, match="no control_after_generate"):
        b.node("ImageScale", controls={"width": "randomize"})


def test_validator_finds_each_kind_of_problem() -> None:
    """Type mismatches, missing inputs, bad widget values, inconsistent links, no output node."""
    bad = copy.deepcopy(UI_WORKFLOW)
    nodes = {n["id"]: n for n in bad["nodes"]}
    nodes[1]["widgets_values"] = [64, 0, 1, 16711680]  # height below min 1
    nodes[4]["widgets_values"] = ["nearest-exact", 32, 32, "sideways"]  # not a crop option
    nodes[6]["inputs"][0]["link"] = None  # SaveImage.images no longer linked
    nodes[1]["outputs"][0]["type"] = "IMAGE"
    bad["links"][5] = [6, 5, 0, 6, 0, "IMAGE"]
    problems = validate_ui_workflow(bad, OBJECT_INFO, check_combos=True)
    text = "\n".join(problems)
    assert "widget 'height' = 0 is outside [1, 16384]" in text
    assert "widget 'crop' = 'sideways' is not one of ['disabled', 'center']" in text
    assert "link 6: node 6 (SaveImage) input 0 does not hold it" in text

    missing = copy.deepcopy(UI_WORKFLOW)
    missing["nodes"][5]["inputs"] = []
    missing["nodes"][4]["outputs"][0]["links"] = []
    missing["links"] = [link for link in missing["links"] if link[0] != 6]
    assert validate_ui_workflow(missing, OBJECT_INFO) == [
        "node 6 (SaveImage): required input 'images' (IMAGE) is not linked to a node that runs"
    ]

    wrong_type = copy.deepcopy(UI_WORKFLOW)
    wrong_type["nodes"][3]["type"] = "ImageBlend"  # its input 0 is image1; widgets no longer fit either
    problems = validate_ui_workflow(wrong_type, OBJECT_INFO)
    assert any("4 widget values" in p for p in problems), problems

    no_output = copy.deepcopy(UI_WORKFLOW)
    for node in no_output["nodes"]:
        if node["type"] == "SaveImage":
            node["mode"] = MODE_NEVER
    assert validate_ui_workflow(no_output, OBJECT_INFO) == [
        "no active output node (ComfyUI refuses a prompt without outputs)"
    ]


# -- in-process ComfyUI ----------------------------------------------------------------------------


def test_local_object_info_matches_the_frontend_view_of_core_and_pack_nodes(comfy_host: ComfyHost) -> None:
    """The in-process definitions give the same widget layouts as the hand-written ones above."""
    info = local_object_info()
    for name in ("EmptyImage", "ImageScale", "SaveImage", "LoadImage"):
        assert widget_layout(info[name]) == widget_layout(OBJECT_INFO[name]), name
    assert widget_layout(info["KSampler"])[:2] == [WidgetSlot("seed", "value"), WidgetSlot("seed", "control")]
    assert widget_layout(info["RandomNoise"]) == [
        WidgetSlot("noise_seed", "value"),
        WidgetSlot("noise_seed", "control"),
    ]
    assert [s.input for s in widget_layout(info["MementoLoadDiT"])] == [
        "model_name",
        "weight_dtype",
        "expected_kind",
    ]
    assert widget_layout(info["MementoDiTInfo"]) == []
    assert info["MementoDiTInfo"]["input"]["required"]["dit"][0] == "MEMENTO_DIT"


def test_converted_core_workflow_runs_in_process(comfy_host: ComfyHost) -> None:
    """The hand-written UI workflow, converted with ComfyUI's own definitions, executes with comfy_host."""
    info = local_object_info()
    assert_valid_ui_workflow(UI_WORKFLOW, info, check_combos=True)
    api = ui_to_api(UI_WORKFLOW, info)
    assert api == EXPECTED_API
    result = comfy_host.run(api)
    (image,) = result.ui("6")["images"]
    assert image["filename"].startswith("memento_test")


def test_converted_dit_workflow_runs_in_process(comfy_host: ComfyHost, tmp_path: Path) -> None:
    """Load Memento DiT -> Memento DiT Info on a tiny checkpoint, authored as UI JSON and converted."""
    from safetensors.torch import save_file

    from memento_core.tiny import random_state_dict, tiny_config

    save_file(
        random_state_dict(tiny_config("t2v"), seed=3), str(comfy_host.model_dir() / "wf_tiny_t2v.safetensors")
    )
    comfy_host.refresh_model_lists()
    info = local_object_info()
    b = WorkflowBuilder(info)
    dit = b.node(
        "MementoLoadDiT", model_name="wf_tiny_t2v.safetensors", weight_dtype="fp32", expected_kind="t2v"
    )
    b.node("MementoDiTInfo", dit=dit)
    workflow = b.build()
    assert_valid_ui_workflow(workflow, info, check_combos=True)
    api = ui_to_api(workflow, info)
    assert api == b.expected_api()
    assert "kind: t2v" in comfy_host.run(api).ui_text("2")


# -- the real frontend -----------------------------------------------------------------------------


@pytest.mark.skipif(
    find_chromium() is None, reason="Chromium and chromium-driver are not installed (scripts/bootstrap.sh)"
)
def test_every_template_converts_like_the_real_frontend(comfy_server: ComfyServer) -> None:
    """Each shipped template opened in the server's own frontend (headless Chromium, app.loadGraphData):
    ``app.graphToPrompt()`` queues exactly what :func:`ui_to_api` makes from the server's /object_info.
    On ComfyUI 0.3.75 (frontend 1.32) and on 0.33 (1.49: SaveVideo's nested dynamic combos, CreateVideo's
    new bit_depth) alike; the templates store SaveVideo as [prefix, format, codec], as 0.3.75 saves it."""
    info = comfy_server.object_info()
    files = sorted((Path(__file__).resolve().parents[1] / "example_workflows").glob("*.json"))
    assert files
    script = (
        "const done = arguments[arguments.length - 1];"
        "app.graphToPrompt().then((p) => done(p.output)).catch((e) => done(String(e)));"
    )
    with open_frontend(comfy_server) as page:
        for path in files:
            workflow = load_workflow(path)
            page.load(workflow)
            queued = page.js_async(script)
            assert isinstance(queued, dict), queued
            got = {k: {"inputs": v["inputs"], "class_type": v["class_type"]} for k, v in queued.items()}
            assert got == ui_to_api(workflow, info), path.name
