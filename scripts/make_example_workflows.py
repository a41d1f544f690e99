"""Write the pack's example workflows (``example_workflows/*.json`` + ``.jpg`` thumbnails).

The workflows are authored here in Python with ``tests/workflow_api.py``'s ``WorkflowBuilder`` against
the real node definitions (``/object_info`` of an in-process ComfyUI 0.3.75 with this pack loaded, see
``tests/comfy_host.py``), laid out shot by shot, and saved in the UI format the template browser loads
(``GET /workflow_templates`` lists ``example_workflows/*.json``; a same-named ``.jpg`` is the thumbnail).

    .venv/bin/python scripts/make_example_workflows.py           # (re)write the files
    .venv/bin/python scripts/make_example_workflows.py --check   # exit 1 if a file is out of date

``tests/test_example_workflows.py`` checks that the shipped files equal what :func:`build_workflows`
makes, validates them and runs each one on tiny models.

The settings are the real ones an artist uses (832x480, 81 frames, 40 steps, shift 5, boundary 0.9,
CFG 3.5, 5.0 on a hard cut, seed = base seed + the shot's index within its scene) and the file names
are the released ones; the thumbnails are drawn here from the graph (no third-party images).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = REPO_ROOT / "tests"
OUT_DIR = REPO_ROOT / "example_workflows"
for _p in (str(TESTS_DIR), str(REPO_ROOT)):
    if _p not in sys.path:
        sys.path.append(_p)

from workflow_api import NodeRef, Output, WorkflowBuilder, load_workflow, save_workflow  # noqa: E402

# -- the real settings ---------------------------------------------------------------------------------

HIGH_MODEL = "wan2.2_i2v_high_noise_14B_fp16.safetensors"
LOW_MODEL = "wan2.2_i2v_low_noise_14B_fp16.safetensors"
MEMENTO_HIGH = "backbone_high_noise.safetensors"
MEMENTO_LOW = "backbone_low_noise.safetensors"
#: StoryMem's MI2V LoRA (its released .pth files converted once with python -m memento_core.convert).
STORYMEM_HIGH = "Wan2.2-MI2V-A14B/backbone_high_noise.safetensors"
STORYMEM_LOW = "Wan2.2-MI2V-A14B/backbone_low_noise.safetensors"
#: The CLIP vision file Wan users already have (StoryMem's keyframes compare CLIP image embeddings).
CLIP_VISION = "clip_vision_h.safetensors"
#: StoryMem's released sampler settings (wan_m2v_A14B.py): shift 4, boundary 0.9, CFG 3.5 on every shot.
STORYMEM_SHIFT, STORYMEM_CFG = 4.0, 3.5
TEXT_ENCODER = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
VAE = "wan_2.1_vae.safetensors"

_WAN21 = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files"
_WAN22 = "https://huggingface.co/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files"
#: file -> (ComfyUI model folder, where to get it), written into each loader node's properties.models so
#: that ComfyUI's missing-models dialog names the folder and offers the download. The Memento and
#: StoryMem releases are .pth files (convert once with python -m memento_core.convert): their entries
#: point at the release pages.
MODEL_FILES: dict[str, tuple[str, str]] = {
    HIGH_MODEL: ("diffusion_models", f"{_WAN22}/diffusion_models/{HIGH_MODEL}"),
    LOW_MODEL: ("diffusion_models", f"{_WAN22}/diffusion_models/{LOW_MODEL}"),
    TEXT_ENCODER: ("text_encoders", f"{_WAN21}/text_encoders/{TEXT_ENCODER}"),
    VAE: ("vae", f"{_WAN22}/vae/{VAE}"),
    CLIP_VISION: ("clip_vision", f"{_WAN21}/clip_vision/{CLIP_VISION}"),
    MEMENTO_HIGH: ("memento", "https://huggingface.co/ernie-research/Memento#backbone_high_noise.pth"),
    MEMENTO_LOW: ("memento", "https://huggingface.co/ernie-research/Memento#backbone_low_noise.pth"),
    STORYMEM_HIGH: (
        "memento",
        "https://huggingface.co/Kevin-thu/StoryMem#Wan2.2-MI2V-A14B/backbone_high_noise.pth",
    ),
    STORYMEM_LOW: (
        "memento",
        "https://huggingface.co/Kevin-thu/StoryMem#Wan2.2-MI2V-A14B/backbone_low_noise.pth",
    ),
}


def attach_model_metadata(workflow: dict[str, Any]) -> None:
    """properties.models = [{name, url, directory}] on every node with a MODEL_FILES widget value (the
    fields ComfyUI's own templates carry); the workflow's top-level "models" lists them all once."""
    seen: dict[str, dict[str, str]] = {}
    for node in workflow["nodes"]:
        names = [v for v in node.get("widgets_values") or [] if isinstance(v, str) and v in MODEL_FILES]
        if names:
            entries = [{"name": n, "url": MODEL_FILES[n][1], "directory": MODEL_FILES[n][0]} for n in names]
            node["properties"]["models"] = entries
            seen.update((e["name"], e) for e in entries)
    workflow["models"] = list(seen.values())


WIDTH, HEIGHT, FRAMES, STEPS = 832, 480, 81, 40
SHIFT, BOUNDARY = 5.0, 0.9
CFG, CUT_CFG = 3.5, 5.0
SEED = 42
FPS = 16.0

#: Wan2.2's default negative prompt (memento_core.m2v.WAN_NEGATIVE_PROMPT), as the Wan reference uses it.
NEGATIVE = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

#: The story of workflow 1 (example_stories/lighthouse_keeper.json, pasted into the script node).
STORY_FILE = REPO_ROOT / "example_stories" / "lighthouse_keeper.json"

REFERENCE_IMAGES = ("memento_reference_person.png", "memento_reference_place.png")

#: id -> (title, one-line description). The template browser of ComfyUI's frontend (1.32 in ComfyUI 0.3.75,
#: 1.49 in 0.33) shows a custom pack's template by its file name only (title = the name, description = the
#: name with "-" and "_" as spaces), so each file is named "<title> - <description>" (template_file).
WORKFLOWS: dict[str, tuple[str, str]] = {
    "memento_3_shot_story": ("Memento 3-shot story", "KeyframeQuery memory between shots"),
    "memento_reference_images": ("Memento reference images", "your pictures pinned in memory (MR2V)"),
    "storymem_continuation": ("StoryMem continuation", "a hard cut, then MI2V from the last frame"),
    "memento_render_story": ("Memento Render Story", "a whole story script in one node"),
    "memento_camera_story": ("Cameras back to a place", "memory recalled by view overlap"),
}


def template_file(key: str) -> str:
    """The file name (no extension) the workflow ``key`` ships as: "<title> - <description>"."""
    title, description = WORKFLOWS[key]
    return f"{title} - {description}"


GROUP_COLORS = ("#3f789e", "#a1309b", "#b58b2a", "#8a8", "#444")


# -- layout ----------------------------------------------------------------------------------------------

#: Canvas layout (canvas px). Lanes (one group each: the models, a shot, ...) are laid out as columns of
#: nodes in dependency order, a column holding as many nodes as fit in LANE_HEIGHT; lanes flow left to
#: right into rows at most ROW_WIDTH wide, rows stacked top to bottom (so a 3-shot story is ~3,800 px
#: wide instead of ~11,000). Stacked groups rather than one subgraph per shot: the memory bank that
#: flows from shot to shot stays visible and editable, and ComfyUI 0.3.75's executor and the UI->API
#: conversion in tests/workflow_api.py need no subgraph support.
ROW_WIDTH = 3900.0
LANE_HEIGHT = 1000.0
TITLE_H = 30.0  # LiteGraph draws a node's title bar above its pos
GAP = 30.0
COLUMN_GAP = 50.0
LANE_GAP = 90.0
GROUP_PAD, GROUP_HEAD = 20.0, 50.0
NODE_WIDTH = 340.0
#: Wider nodes (long file names in combo widgets, long prompts) and fixed room for image previews
#: (a preview drawn after a run fits inside the node instead of growing over its neighbours).
NODE_SIZES: dict[str, tuple[float, float | None]] = {
    "MementoLoadBackbone": (520.0, None),  # its widgets show whole file names
    "MementoRenderStory": (440.0, None),
    "CLIPLoader": (440.0, None),
    "VAELoader": (440.0, None),
    "CLIPVisionLoader": (440.0, None),
    "PreviewImage": (420.0, 320.0),
    "LoadImage": (340.0, 330.0),  # its picture shows in the node once the file is there
}
#: Nodes that show a text summary after a run, and the height of that box (web/memento.js adds it).
SUMMARY_NODES = frozenset(
    {
        "MementoLoadBackbone",
        "MementoCameraTrajectory",
        "MementoDiTInfo",
        "MementoStoryConsistency",
        "MementoSaveMemoryBank",
        "MementoMemoryPreview",
        "MementoRenderStory",
    }
)
SUMMARY_HEIGHT = 84.0
#: The view a template opens with: the whole graph fitted into this part of a 1600x1000 browser window
#: (the canvas area left of the minimap and below ComfyUI's menu bar), never zoomed in past 100%.
VIEW = (70.0, 90.0, 1580.0, 840.0)


@dataclass
class Lane:
    """A titled block of nodes laid out in dependency order, boxed by a group; its note on top."""

    title: str
    nodes: list[NodeRef] = field(default_factory=list)
    note: NodeRef | None = None
    color: str = GROUP_COLORS[0]


def note_height(text: str, width: float) -> float:
    """Height a Note of ``width`` needs for ``text`` (the frontend's monospace, ~7.3 px a character)."""
    per_line = max(20, int((width - 20) / 7.3))
    lines = sum(max(1, -(-len(par) // per_line)) for par in text.splitlines() or [""])
    return max(88.0, 24.0 + 15.0 * lines)  # 88: the frontend's smallest Note


class Author:
    """A WorkflowBuilder plus lanes (one group per lane), laid out lane after lane in rows."""

    def __init__(self, object_info: Mapping[str, Any]) -> None:
        self.b = WorkflowBuilder(object_info)
        self.lanes: list[Lane] = []
        self.lane: Lane | None = None

    def start(self, title: str, note: str, color: str = GROUP_COLORS[0]) -> Lane:
        lane = Lane(title, color=color)
        lane.note = self.b.note(note)
        self.lanes.append(lane)
        self.lane = lane
        return lane

    def node(self, class_type: str, inputs: Mapping[str, Any] | None = None, **kw: Any) -> NodeRef:
        ref = self.b.node(class_type, inputs, **kw)
        assert self.lane is not None
        self.lane.nodes.append(ref)
        return ref

    def build(self) -> dict[str, Any]:
        workflow = self.b.build()
        by_id = {n["id"]: n for n in workflow["nodes"]}
        depth = self.b._depth  # computed by build(): longest path from a source node
        for node in workflow["nodes"]:
            width, height = NODE_SIZES.get(node["type"], (NODE_WIDTH, None))
            node["size"] = [width, height if height is not None else self._height(node)]
        blocks = [self._lane_block(lane, by_id, depth) for lane in self.lanes]
        groups, x, y, row_height = [], 0.0, 0.0, 0.0
        for index, (lane, (width, height, place)) in enumerate(zip(self.lanes, blocks, strict=True), 1):
            if x > 0 and x + width > ROW_WIDTH:
                x, y, row_height = 0.0, y + row_height + LANE_GAP, 0.0
            for node_id, (nx, ny) in place.items():
                by_id[node_id]["pos"] = [x + nx, y + ny]
            groups.append(
                {
                    "id": index,
                    "title": lane.title,
                    "bounding": [x, y, width, height],
                    "color": lane.color,
                    "font_size": 24,
                    "flags": {},
                }
            )
            x, row_height = x + width + LANE_GAP, max(row_height, height)
        workflow["groups"] = groups
        attach_model_metadata(workflow)
        workflow["extra"]["ds"] = fitted_view(groups)
        return workflow

    def _height(self, node: Mapping[str, Any]) -> float:
        """The builder's height, less the text box of each wired multiline input (hidden or shrunk
        by the frontend), plus the summary box web/memento.js adds to SUMMARY_NODES."""
        height = float(node["size"][1])
        node_def = self.b.object_info.get(node["type"], {}).get("input", {})
        specs = {**node_def.get("required", {}), **node_def.get("optional", {})}
        for entry in node.get("inputs", []):
            spec = specs.get(entry["name"])
            if entry.get("widget") and entry.get("link") is not None and spec is not None:
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
                height -= 64.0 if options.get("multiline") else 0.0
        return height + (SUMMARY_HEIGHT + 16.0 if node["type"] in SUMMARY_NODES else 0.0)

    @staticmethod
    def _lane_block(
        lane: Lane, by_id: Mapping[int, dict[str, Any]], depth: Mapping[int, int]
    ) -> tuple[float, float, dict[int, tuple[float, float]]]:
        """(width, height, node id -> position relative to the group's corner) of one lane."""
        order = sorted(lane.nodes, key=lambda r: (depth[r.id], r.id))
        budget = max([LANE_HEIGHT] + [by_id[r.id]["size"][1] + TITLE_H for r in order])
        columns: list[list[int]] = [[]]
        used = 0.0
        for ref in order:
            need = by_id[ref.id]["size"][1] + TITLE_H
            if columns[-1] and used + GAP + need > budget:
                columns.append([])
                used = 0.0
            used += (GAP if columns[-1] else 0.0) + need
            columns[-1].append(ref.id)
        place: dict[int, tuple[float, float]] = {}
        x, top, bottom = GROUP_PAD, GROUP_HEAD, 0.0
        cols_x = []
        for column in columns:
            cols_x.append(x)
            x += max(by_id[i]["size"][0] for i in column) + COLUMN_GAP
        width = x - COLUMN_GAP + GROUP_PAD
        if lane.note is not None:
            note = by_id[lane.note.id]
            text = note["widgets_values"][0]
            note["size"] = [width - 2 * GROUP_PAD, note_height(text, width - 2 * GROUP_PAD)]
            place[lane.note.id] = (GROUP_PAD, top + TITLE_H)
            top += TITLE_H + note["size"][1] + GAP
        for cx, column in zip(cols_x, columns, strict=True):
            y = top
            for node_id in column:
                place[node_id] = (cx, y + TITLE_H)
                y += TITLE_H + by_id[node_id]["size"][1] + GAP
            bottom = max(bottom, y - GAP)
        return width, bottom + GROUP_PAD, place


def fitted_view(groups: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The saved view (``extra.ds``): every group inside VIEW, at most 100%."""
    x0 = min(g["bounding"][0] for g in groups)
    y0 = min(g["bounding"][1] for g in groups)
    x1 = max(g["bounding"][0] + g["bounding"][2] for g in groups)
    y1 = max(g["bounding"][1] + g["bounding"][3] for g in groups)
    left, top, right, bottom = VIEW
    scale = min(1.0, (right - left) / (x1 - x0), (bottom - top) / (y1 - y0))
    scale = math.floor(scale * 1000) / 1000
    return {"scale": scale, "offset": [round(left / scale - x0, 1), round(top / scale - y0, 1)]}


# -- shared pieces ---------------------------------------------------------------------------------------


@dataclass
class Loaders:
    backbone: NodeRef
    clip: NodeRef
    vae: NodeRef
    negative: NodeRef


LOADERS_NOTE = (
    "Models (put the files in these ComfyUI folders, then press R to refresh the lists):\n"
    "- models/diffusion_models: wan2.2_i2v_high_noise_14B_fp16.safetensors and "
    "wan2.2_i2v_low_noise_14B_fp16.safetensors (Wan2.2-I2V-A14B, ComfyUI's repackaged files; bf16 and fp8 "
    '"scaled" files work too)\n'
    "- models/memento (or models/loras): backbone_high_noise.safetensors and "
    "backbone_low_noise.safetensors (Memento: LoRA + KeyframeQuery)\n"
    "- models/text_encoders: umt5_xxl_fp8_e4m3fn_scaled.safetensors (Load CLIP, type wan)\n"
    "- models/vae: wan_2.1_vae.safetensors (the Wan 2.1 VAE; Wan2.2-A14B uses it)\n"
    'Offload "swap experts" keeps one 14B expert on the GPU at a time; use "block swap" on smaller GPUs.'
)


def loaders(
    a: Author,
    color: str = GROUP_COLORS[4],
    memory_files: tuple[str, str] = (MEMENTO_HIGH, MEMENTO_LOW),
    note: str = "",
) -> Loaders:
    a.start("Models", note or LOADERS_NOTE, color)
    backbone = a.node(
        "MementoLoadBackbone",
        high_noise_model=HIGH_MODEL,
        low_noise_model=LOW_MODEL,
        memento_high=memory_files[0],
        memento_low=memory_files[1],
        weight_dtype="bf16",
        memento_strength=1.0,
        offload="swap experts",
        swap_blocks=20,
        attention="auto",
        compile=False,
        lora_1="None",
        lora_2="None",
        lora_3="None",
    )
    clip = a.node("CLIPLoader", clip_name=TEXT_ENCODER, type="wan", device="default")
    vae = a.node("VAELoader", vae_name=VAE)
    negative = a.node("CLIPTextEncode", title="Negative prompt", clip=clip, text=NEGATIVE)
    return Loaders(backbone, clip, vae, negative)


@dataclass
class Shot:
    retrieve: NodeRef
    generate: NodeRef
    decode: NodeRef
    update: NodeRef


def shot(
    a: Author,
    m: Loaders,
    n: int,
    memory: Output | NodeRef,
    prompt: Any,
    *,
    global_caption: Any = "",
    reconstruct: Any = "",
    first_frame: Output | NodeRef | None = None,
    cut: Any = False,
    seed: int = SEED,
    scheme: str = "policy",
    preview_selection: bool = True,
    shift: float = SHIFT,
    cfg: float = CFG,
    cut_cfg: float = CUT_CFG,
    clip_vision: Output | NodeRef | None = None,
) -> Shot:
    """Retrieve -> Generate Shot -> VAE Decode -> Update Memory, plus the shot's video (CreateVideo +
    SaveVideo). ``prompt``, ``global_caption``, ``reconstruct``: a value or a STRING output; ``cut``: a
    bool or a BOOLEAN output. CFG 3.5, plus 1.5 on a hard cut (Generate Shot's cut_cfg_boost)."""
    positive = a.node("CLIPTextEncode", title=f"Shot {n} prompt", clip=m.clip, text=prompt)
    retrieve = a.node(
        "MementoKeyframeRetrieve",
        title=f"Shot {n} Keyframe Query Retrieve",
        backbone=m.backbone,
        memory_bank=memory,
        clip=m.clip,
        prompt=prompt,
        global_caption=global_caption,
        vae=m.vae,
    )
    if preview_selection:
        a.node("PreviewImage", title=f"Shot {n} memory used", images=retrieve["preview"])
    extra = {"first_frame": first_frame} if first_frame is not None else {}
    generate = a.node(
        "MementoGenerateShot",
        title=f"Shot {n} Generate",
        backbone=m.backbone,
        selection=retrieve["selection"],
        clip=m.clip,
        positive=positive,
        negative=m.negative,
        vae=m.vae,
        reconstruct=reconstruct,
        width=WIDTH,
        height=HEIGHT,
        frames=FRAMES,
        steps=STEPS,
        shift=shift,
        cfg_high=cfg,
        cfg_low=cfg,
        boundary=BOUNDARY,
        seed=seed,
        position_scheme=scheme,
        solver="unipc",
        cut=cut,
        cut_cfg_boost=cut_cfg - cfg,
        controls={"seed": "fixed"},
        **extra,
    )
    decode = a.node("VAEDecode", title=f"Shot {n} decode", samples=generate["latent"], vae=m.vae)
    extra_update = {"clip_vision": clip_vision} if clip_vision is not None else {}
    update = a.node(
        "MementoUpdateMemory",
        title=f"Shot {n} Update Memory",
        memory=retrieve["selection"],
        vae=m.vae,
        prompt=prompt,
        images=decode,
        shot_index=n,
        update="policy",
        cut=cut if first_frame is not None else True,
        continue_with="last frame (MI2V)",
        **extra_update,
    )
    video = a.node("CreateVideo", title=f"Shot {n} video", images=update["frames"], fps=FPS)
    a.node(
        "SaveVideo",
        title=f"Shot {n} save",
        video=video,
        filename_prefix=f"memento/shot_{n:02d}",
        format="mp4",
        codec="h264",
    )
    return Shot(retrieve, generate, decode, update)


def finish(a: Author, m: Loaders, bank: Output | NodeRef, prefix: str, note: str) -> None:
    """Save Memory Bank + Memory Preview of the final bank."""
    a.start("Memory after the story", note, GROUP_COLORS[3])
    a.node("MementoSaveMemoryBank", title="Save Memory Bank", memory_bank=bank, filename_prefix=prefix)
    sheet = a.node("MementoMemoryPreview", title="Memory Preview", memory=bank, vae=m.vae, tile_height=120)
    a.node("PreviewImage", title="Memory bank", images=sheet)


FINISH_NOTE = (
    "The memory bank after the last shot, saved as output/{prefix}_00001.safetensors (Load Memory Bank "
    "continues the story in another workflow) and shown as a contact sheet (one row per expert pool; "
    "frame id and story time under each frame)."
)


def _shot_colors(n: int) -> str:
    return GROUP_COLORS[(n - 1) % 3]


# -- workflow 1: a 3-shot story ------------------------------------------------------------------------


def story_workflow(object_info: Mapping[str, Any]) -> dict[str, Any]:
    story = json.loads(STORY_FILE.read_text(encoding="utf-8"))
    cuts = story["scenes"][0]["cut"]
    a = Author(object_info)
    m = loaders(a)
    a.start(
        "Story script",
        "The story script (Memento's JSON: story_name, reconstruct_target, scenes with video_prompts and "
        "cut) is pasted into the text box below and read once per shot by Load Story Script (shot_index "
        "0, 1, 2). Or leave the text empty and give a file in ComfyUI's input folder as 'path' on each "
        "Load Story Script.\nEach shot's prompt feeds its CLIP Text Encode, Keyframe Query Retrieve and "
        "Update Memory; reconstruct_target feeds the identity slot (reconstruct) of Generate Shot, and "
        "the cut flag feeds Generate Shot's 'cut': edit the script's cut list and the shots follow it.",
        GROUP_COLORS[4],
    )
    script = a.node(
        "PrimitiveStringMultiline", title="Story script (JSON)", value=json.dumps(story, indent=2) + "\n"
    )
    memory = a.node("MementoMemoryBank", title="Empty memory", policy="memento", capacity=8)
    bank: Output | NodeRef = memory
    previous: Shot | None = None
    describe = {
        1: "Shot 1 starts from an empty memory: a hard cut (CFG 3.5 + cut_cfg_boost 1.5 = 5.0).",
        2: "Shot 2 (cut: false in the script) continues from shot 1's last frame: shot 1's decoded video "
        "goes into first_frame (MI2V, CFG 3.5). Its memory is shot 1's 8 frames (no selection needed).",
        3: "Shot 3 (cut: true in the script) is a hard cut: Generate Shot ignores first_frame and adds "
        "cut_cfg_boost (CFG 5.0). The memory holds 16 frames, so each expert's KeyframeQuery picks 6 "
        "local + 2 global frames for this prompt.",
    }
    assert [bool(c) for c in cuts[:3]] == [True, False, True], "the notes describe these cut flags"
    for n in (1, 2, 3):
        a.start(
            f"Shot {n}",
            describe[n] + f"\nSeed: base seed {SEED} + the shot's index in its scene ({SEED + n - 1}). "
            "Update Memory takes the Retrieve's selection, so frames not selected stay evicted, and adds 8 "
            "evenly spaced frames of this shot.",
            _shot_colors(n),
        )
        line = a.node(
            "MementoLoadStoryScript", title=f"Story shot {n}", path="", text=script, shot_index=n - 1
        )
        s = shot(
            a,
            m,
            n,
            bank,
            line["prompt"],
            global_caption=line["global_caption"],
            reconstruct=line["reconstruct_target"],
            first_frame=previous.decode if previous else None,
            cut=line["cut"],
            seed=SEED + n - 1,
        )
        bank, previous = s.update, s
    finish(a, m, bank, "memento/lighthouse_memory", FINISH_NOTE.format(prefix="memento/lighthouse_memory"))
    return a.build()


# -- workflow 2: reference images (MR2V) ---------------------------------------------------------------

REF_PROMPTS = (
    "global caption: [Person A]: a young woman with short black hair, a red raincoat and a green scarf; "
    "shot caption: [Person A] walks through a narrow market street in the rain, looking at the stalls.",
    "global caption: [Person A]: a young woman with short black hair, a red raincoat and a green scarf; "
    "shot caption: [Person A] stops at a flower stall and smiles at the seller, raindrops on her hood.",
)
REF_RECONSTRUCT = "[Person A] a young woman with short black hair, a red raincoat and a green scarf"


def reference_workflow(object_info: Mapping[str, Any]) -> dict[str, Any]:
    a = Author(object_info)
    m = loaders(a)
    a.start(
        "Reference images (MR2V)",
        "Reference images become the first memory (MR2V): each is resized to the shots' size (832x480, "
        "the bank's resolution), VAE-encoded alone and pinned (never evicted). Put your images in "
        "ComfyUI's input folder (or upload them in Load Image): here one of the person and one of the "
        "place. reference_captions: one line per image.\nMore references: another Load Image -> Upscale "
        "Image into reference_images_3 or _4 (capacity 8 includes the references).",
        GROUP_COLORS[4],
    )
    images = []
    for name in REFERENCE_IMAGES:
        loaded = a.node("LoadImage", title=f"Reference {len(images) + 1}", image=name)
        images.append(
            a.node(
                "ImageScale",
                title=f"Reference {len(images) + 1} at shot size",
                image=loaded["IMAGE"],
                upscale_method="lanczos",
                width=WIDTH,
                height=HEIGHT,
                crop="center",
            )
        )
    bank = a.node(
        "MementoMemoryBank",
        title="Memory from references",
        policy="memento",
        capacity=8,
        reference_images=images[0],
        reference_images_2=images[1],
        vae=m.vae,
        reference_captions=REF_RECONSTRUCT + "\nthe narrow market street in the rain",
    )
    a.node(
        "PreviewImage",
        title="References in memory",
        images=a.node("MementoMemoryPreview", memory=bank, vae=m.vae),
    )
    previous: Shot | None = None
    memory: Output | NodeRef = bank
    notes = {
        1: "Shot 1 is rendered from the reference memory (memory-to-video, hard cut, CFG 3.5 + 1.5); the "
        "identity slot reconstructs [Person A] from the reconstruct caption.",
        2: "Shot 2 continues from shot 1's last frame (first_frame, MI2V, CFG 3.5); the references stay "
        "pinned in memory next to shot 1's 8 frames.",
    }
    for n in (1, 2):
        a.start(f"Shot {n}", notes[n] + f"\nSeed {SEED} + index in scene ({SEED + n - 1}).", _shot_colors(n))
        prompt = a.node("PrimitiveStringMultiline", title=f"Shot {n} text", value=REF_PROMPTS[n - 1])
        s = shot(
            a,
            m,
            n,
            memory,
            prompt,
            reconstruct=REF_RECONSTRUCT,
            first_frame=previous.decode if previous else None,
            cut=previous is None,
            seed=SEED + n - 1,
        )
        memory, previous = s.update, s
    finish(a, m, memory, "memento/reference_memory", FINISH_NOTE.format(prefix="memento/reference_memory"))
    return a.build()


# -- workflow 3: StoryMem-style continuation ------------------------------------------------------------

STORYMEM_PROMPTS = (
    "A fisherman in a grey knitted cap mends a net on a wooden pier at dawn, gulls on the posts behind him.",
    "Close-up of weathered hands tying a knot in the net, a coil of rope and a rusty bucket beside them.",
    "The fisherman lifts the mended net, looks out over the harbour and walks towards his small red boat.",
)


STORYMEM_LOADERS_NOTE = (
    "StoryMem's own model: the Wan2.2 I2V A14B experts with StoryMem's MI2V LoRA (models/memento/"
    "Wan2.2-MI2V-A14B/backbone_high_noise.safetensors and backbone_low_noise.safetensors; the release "
    "ships .pth files: convert each once with python -m memento_core.convert IN.pth OUT.safetensors). "
    "It has no KeyframeQuery; the info output says 'StoryMem (LoRA only)'. Load CLIP Vision gives the "
    "image embeddings StoryMem picks keyframes with (StoryMem used CLIP ViT-B/32; ComfyUI loads ViT-H/14 "
    "as clip_vision_h.safetensors, which Wan users have)."
)


def storymem_workflow(object_info: Mapping[str, Any]) -> dict[str, Any]:
    a = Author(object_info)
    m = loaders(a, memory_files=(STORYMEM_HIGH, STORYMEM_LOW), note=STORYMEM_LOADERS_NOTE)
    clip_vision = a.node("CLIPVisionLoader", title="Load CLIP Vision", clip_name=CLIP_VISION)
    a.start(
        "StoryMem memory",
        "StoryMem's memory as its released code runs it: one pool for both experts; after each shot its "
        "CLIP keyframes (at most 3, duplicates of stored keyframes dropped) join the memory, which keeps "
        "the first 3 ever stored (the sink) and the most recent, 10 in all (capacity 0 = the policy's "
        "default). position_scheme 'policy': sequential positions, as StoryMem's model; the memory slots "
        "stay noise (no re-noising) and there is no identity slot. Sampler: shift 4.0, boundary 0.9, "
        "CFG 3.5 on every shot, cuts included.",
        GROUP_COLORS[4],
    )
    memory: Output | NodeRef = a.node(
        "MementoMemoryBank", title="StoryMem memory", policy="storymem", capacity=0
    )
    previous: Shot | None = None
    notes = {
        1: "Shot 1 starts from the empty memory (a hard cut, CFG 3.5).",
        2: "Shot 2 is a hard CUT: 'cut' is on, so Generate Shot ignores first_frame (CFG 3.5: StoryMem adds "
        "nothing on cuts). Only the memory (shot 1's keyframes) carries the look of the story across the "
        "cut. Turn 'cut' off to continue from shot 1's last frame instead.",
        3: "Shot 3 CONTINUES shot 2 (MI2V, 'cut' off): shot 2's frames go into first_frame (its last frame "
        "is used), CFG 3.5. Update Memory drops the first frame (it repeats shot 2's last) from the saved "
        "shot and from the keyframes, as StoryMem does.",
    }
    for n in (1, 2, 3):
        a.start(f"Shot {n}", notes[n] + f"\nSeed {SEED + n - 1}.", _shot_colors(n))
        prompt = a.node("PrimitiveStringMultiline", title=f"Shot {n} text", value=STORYMEM_PROMPTS[n - 1])
        s = shot(
            a,
            m,
            n,
            memory,
            prompt,
            first_frame=previous.update["frames"] if previous else None,
            cut=n != 3,
            seed=SEED + n - 1,
            shift=STORYMEM_SHIFT,
            cfg=STORYMEM_CFG,
            cut_cfg=STORYMEM_CFG,
            clip_vision=clip_vision,
        )
        memory, previous = s.update, s
    finish(a, m, memory, "memento/storymem_memory", FINISH_NOTE.format(prefix="memento/storymem_memory"))
    return a.build()


# -- workflow 4: a whole story in one node ---------------------------------------------------------------


def render_story_and_save(
    a: Any, m: Any, script: Any, title: str, folder: str, video_prefix: str, memory_prefix: str, **extra: Any
) -> dict[str, Any]:
    """A Render Story node over ``script`` (the shared sampler widgets + ``extra``), its Save Video, and
    the memory-bank finish; returns the built workflow."""
    render = a.node(
        "MementoRenderStory",
        title=title,
        backbone=m.backbone,
        clip=m.clip,
        vae=m.vae,
        path="",
        text=script,
        output_folder=f"memento/{folder}",
        if_exists="resume",
        width=WIDTH,
        height=HEIGHT,
        frames=FRAMES,
        steps=STEPS,
        seed=SEED,
        shift=SHIFT,
        boundary=BOUNDARY,
        cfg=CFG,
        cut_cfg=CUT_CFG,
        solver="unipc",
        first_shot="empty memory",
        identity=True,
        max_shots=0,
        negative=NEGATIVE,
        t2v_high="None",
        t2v_low="None",
        **extra,
    )
    a.node(
        "SaveVideo",
        title="Story video",
        video=render["story"],
        filename_prefix=video_prefix,
        format="mp4",
        codec="h264",
    )
    finish(a, m, render["memory_bank"], memory_prefix, FINISH_NOTE.format(prefix=memory_prefix))
    return a.build()


def render_story_workflow(object_info: Mapping[str, Any]) -> dict[str, Any]:
    story = json.loads(STORY_FILE.read_text(encoding="utf-8"))
    a = Author(object_info)
    m = loaders(a)
    a.start(
        "Render the story",
        "Memento Render Story renders every shot of the script with memory, as the command line "
        "(python -m memento_core.story) does, with the models loaded on the left: shot 1 from an empty "
        "memory (or reference images, or Wan2.2 T2V: pick t2v_high / t2v_low), then per the script's cut "
        "flags a hard cut (CFG 5.0) or a continuation from the previous shot's last frame (CFG 3.5), "
        "KeyframeQuery selection and a memory update between shots; seed = base seed + the shot's index "
        "in its scene.\nEverything goes to output/memento/lighthouse_keeper: shots/*.mp4, story.mp4, "
        "memory/*.png (the frames each shot used), identity/*.png, memory_bank.safetensors and "
        "story_log.json. If the render is interrupted, queue it again: with if_exists 'resume' it goes on "
        "after the last finished shot and gives the same frames.",
        GROUP_COLORS[0],
    )
    script = a.node(
        "PrimitiveStringMultiline", title="Story script (JSON)", value=json.dumps(story, indent=2) + "\n"
    )
    return render_story_and_save(
        a, m, script, "Render Story", "lighthouse_keeper", "memento/lighthouse_story",
        "memento/lighthouse_story_memory",
    )  # fmt: skip


CAMERA_STORY_FILE = REPO_ROOT / "example_stories" / "clockmaker_returns.json"


def camera_story_workflow(object_info: Mapping[str, Any]) -> dict[str, Any]:
    """Render Story with the memento+fov policy on a story whose script gives each shot's camera."""
    story = json.loads(CAMERA_STORY_FILE.read_text(encoding="utf-8"))
    a = Author(object_info)
    m = loaders(a)
    a.start(
        "Cameras: back to a place",
        "The clockmaker leaves his workshop for the garden and comes back. The script gives each shot a "
        "camera (scenes[].camera: {x, z, yaw, fov} on the ground plane, or poses along the shot). With "
        "policy memento+fov (Context-as-Memory's retrieval on Memento's model) every earlier frame stays "
        "in the memory bank; a shot first recalls the frames whose view overlaps its camera (the workshop "
        "shots, when the last shot is back in the workshop facing the window, not the recent garden "
        "shots), then each expert's KeyframeQuery picks among them. memory/*_cameras.png in the output "
        "folder maps where each remembered frame was seen from and which were chosen. Policy fov keeps "
        "only the overlap (one frame per run of a shot, the most recent 8).",
        GROUP_COLORS[0],
    )
    script = a.node(
        "PrimitiveStringMultiline",
        title="Story script with cameras (JSON)",
        value=json.dumps(story, indent=2) + "\n",
    )
    return render_story_and_save(
        a, m, script, "Render Story (memento+fov)", "clockmaker_returns", "memento/clockmaker_story",
        "memento/clockmaker_memory", policy="memento+fov", sampler_settings="policy defaults",
    )  # fmt: skip


BUILDERS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "memento_3_shot_story": story_workflow,
    "memento_reference_images": reference_workflow,
    "storymem_continuation": storymem_workflow,
    "memento_render_story": render_story_workflow,
    "memento_camera_story": camera_story_workflow,
}


def build_workflows(object_info: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every example workflow (UI format) by file name (no extension, see template_file)."""
    return {template_file(key): build(object_info) for key, build in BUILDERS.items()}


# -- thumbnails -----------------------------------------------------------------------------------------


def _hex(color: str) -> tuple[int, int, int]:
    c = color.lstrip("#")
    if len(c) == 3:
        c = "".join(ch * 2 for ch in c)
    return (int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16))


def draw_thumbnail(
    workflow: Mapping[str, Any], title: str, subtitle: str, size: tuple[int, int] = (320, 180)
):
    """A schematic of the graph (groups, nodes, links) under a title -> PIL image."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = size
    img = Image.new("RGB", size, (24, 26, 30))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    top = 38
    boxes = [g["bounding"] for g in workflow.get("groups", [])] + [
        [*n["pos"], *n["size"]] for n in workflow["nodes"]
    ]
    x0 = min(b[0] for b in boxes)
    y0 = min(b[1] for b in boxes)
    x1 = max(b[0] + b[2] for b in boxes)
    y1 = max(b[1] + b[3] for b in boxes)
    sx, sy = (w - 16) / (x1 - x0), (h - top - 8) / (y1 - y0)  # stretched: a schematic, not a screenshot

    def box(b: Sequence[float]) -> list[float]:
        return [
            8 + (b[0] - x0) * sx,
            top + (b[1] - y0) * sy,
            8 + (b[0] + b[2] - x0) * sx,
            top + (b[1] + b[3] - y0) * sy,
        ]

    for g in workflow.get("groups", []):
        r, gr, bl = _hex(g["color"])
        d.rectangle(box(g["bounding"]), fill=(r // 3, gr // 3, bl // 3), outline=(r, gr, bl))
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link in workflow["links"]:
        a, b = (
            box([*nodes[link[1]]["pos"], *nodes[link[1]]["size"]]),
            box([*nodes[link[3]]["pos"], *nodes[link[3]]["size"]]),
        )
        d.line([a[2], (a[1] + a[3]) / 2, b[0], (b[1] + b[3]) / 2], fill=(110, 120, 135), width=1)
    for n in workflow["nodes"]:
        memento = str(n["type"]).startswith("Memento")
        fill = (120, 190, 255) if memento else (200, 200, 200)
        if n["type"] in ("Note", "MarkdownNote"):
            fill = (90, 90, 70)
        d.rectangle(box([*n["pos"], *n["size"]]), fill=fill)
    d.rectangle([0, 0, w, top - 6], fill=(14, 15, 18))
    d.text((8, 5), title, fill=(255, 255, 255), font=font)
    d.text((8, 19), subtitle, fill=(170, 200, 230), font=font)
    return img


def write_thumbnail(workflow: Mapping[str, Any], name: str, path: Path) -> Path:
    """``name``: the file name (template_file) of the workflow."""
    title, subtitle = next(v for k, v in WORKFLOWS.items() if template_file(k) == name)
    draw_thumbnail(workflow, title, subtitle).save(path, format="JPEG", quality=85)
    return path


# -- main -----------------------------------------------------------------------------------------------


def object_info_in_process() -> dict[str, dict[str, Any]]:
    """``/object_info`` of an in-process ComfyUI 0.3.75 with this pack (tests/comfy_host.py)."""
    from comfy_host import start_comfy_host
    from workflow_api import local_object_info

    start_comfy_host()
    return local_object_info()


def out_of_date(workflows: Mapping[str, Mapping[str, Any]], folder: Path = OUT_DIR) -> list[str]:
    """Names whose shipped JSON differs from ``workflows`` (or is missing, or has no thumbnail)."""
    stale = []
    for name, workflow in workflows.items():
        path = folder / f"{name}.json"
        if not path.is_file() or load_workflow(path) != json.loads(json.dumps(workflow)):
            stale.append(name)
        elif not (folder / f"{name}.jpg").is_file():
            stale.append(f"{name} (thumbnail)")
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the files are up to date")
    parser.add_argument(
        "--out", type=Path, default=OUT_DIR, help="folder to write (default: example_workflows)"
    )
    args = parser.parse_args(argv)
    workflows = build_workflows(object_info_in_process())
    if args.check:
        stale = out_of_date(workflows, args.out)
        for name in stale:
            print(f"out of date: {args.out / name}")
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, workflow in workflows.items():
        save_workflow(workflow, args.out / f"{name}.json")
        write_thumbnail(workflow, name, args.out / f"{name}.jpg")
        print(f"wrote {args.out / name}.json ({len(workflow['nodes'])} nodes) and .jpg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
