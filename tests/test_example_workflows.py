"""The shipped example workflows (``example_workflows/*.json``, UI format) in a real in-process ComfyUI.

For every workflow: it is what ``scripts/make_example_workflows.py`` makes (regenerating gives the same
JSON), it has a thumbnail, it validates against the real node definitions, and converted to the API
prompt the frontend would queue it RUNS on tiny models (the same graph; only model file names, sizes,
steps and frames are swapped for tiny ones by :func:`tiny_api`). The checks are on what happened:
shot modes, CFG, seeds and memory selections (recorded by spying on the pack's ``generate_shot`` /
``select_memory``), the saved videos and the saved memory bank.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from tiny_comfy_models import TINY_FILES
from workflow_api import assert_valid_ui_workflow, load_workflow, local_object_info, ui_to_api

from memento_core.media import read_mp4
from memento_core.memory import MemoryBank, load_bank

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = REPO_ROOT / "example_workflows"
NAMES = (
    "memento_3_shot_story",
    "memento_reference_images",
    "storymem_continuation",
    "memento_render_story",
    "memento_camera_story",
)

W, H, FRAMES, STEPS = 64, 32, 9, 2


def template_path(name: str, ext: str = ".json") -> Path:
    """The shipped file of workflow ``name`` (a NAMES key; files are named "<title> - <description>")."""
    return WORKFLOW_DIR / f"{load_script().template_file(name)}{ext}"


def template_files() -> list[str]:
    return sorted(load_script().template_file(name) for name in NAMES)


def load_script() -> Any:
    """``scripts/make_example_workflows.py`` as a module."""
    name = "make_example_workflows"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def tiny_api(api: dict[str, dict[str, Any]], tag: str, steps: int = STEPS) -> dict[str, dict[str, Any]]:
    """The converted prompt with tiny files, 64x32 px, 9 frames, ``steps`` steps and output prefixes
    under ``<tag>/``; the graph itself is unchanged."""
    out = json.loads(json.dumps(api))
    for node in out.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "MementoLoadBackbone":
            inputs |= {
                "high_noise_model": TINY_FILES["high"],
                "low_noise_model": TINY_FILES["low"],
                "memento_high": TINY_FILES["memento_high"],
                "memento_low": TINY_FILES["memento_low"],
                "weight_dtype": "fp32",
                "offload": "none",
            }
        elif kind == "CLIPLoader":
            inputs["clip_name"] = TINY_FILES["text_encoder"]
        elif kind == "VAELoader":
            inputs["vae_name"] = TINY_FILES["vae"]
        elif kind == "CLIPVisionLoader":
            inputs["clip_name"] = TINY_FILES["clip_vision"]
        elif kind in ("MementoGenerateShot", "MementoRenderStory"):
            inputs |= {"width": W, "height": H, "frames": FRAMES, "steps": steps}
        elif kind == "ImageScale":
            inputs |= {"width": W, "height": H}
        for key in ("filename_prefix", "output_folder"):
            if isinstance(inputs.get(key), str):
                inputs[key] = f"{tag}/{inputs[key]}"
    return out


def node_id(api: dict[str, dict[str, Any]], title: str) -> str:
    """The id of the node titled ``title`` (``ui_to_api(..., meta=True)`` keeps titles in ``_meta``)."""
    ids = [k for k, v in api.items() if v.get("_meta", {}).get("title") == title]
    assert len(ids) == 1, (title, ids)
    return ids[0]


def write_reference_images(folder: Path, size: tuple[int, int] = (96, 48)) -> list[Path]:
    """The PNGs the reference workflow's Load Image nodes name (plain colours, made here)."""
    script = load_script()
    paths = []
    for i, name in enumerate(script.REFERENCE_IMAGES):
        path = folder / name
        Image.new("RGB", size, ((200, 60, 40), (40, 120, 200))[i % 2]).save(path)
        paths.append(path)
    return paths


def saved_bank(result: Any, node: str) -> MemoryBank:
    """The bank a Save Memory Bank node wrote (its UI text starts with the path)."""
    return load_bank(result.ui_text(node).splitlines()[0])


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def object_info(comfy_host) -> dict[str, Any]:
    return local_object_info()


@pytest.fixture(scope="module")
def tiny(comfy_host, tiny):
    """The shared tiny models (conftest) plus the reference images the MR2V workflow loads."""
    write_reference_images(Path(comfy_host.folder_paths.get_input_directory()))
    return tiny


@dataclass
class Calls:
    generate: list[Any]
    select: list[Any]


@pytest.fixture
def spy(comfy_host, monkeypatch) -> Iterator[Calls]:
    """Records each Generate Shot request and each Keyframe Query Retrieve selection."""
    shot_nodes = sys.modules[f"{comfy_host.pack_module.__name__}.nodes.shot_nodes"]
    calls = Calls([], [])
    generate, select = shot_nodes.generate_shot, shot_nodes.select_memory

    def generate_spy(backbone, bank, request, *args, **kwargs):
        calls.generate.append((request, kwargs.get("continuation") is not None, bank))
        return generate(backbone, bank, request, *args, **kwargs)

    def select_spy(*args, **kwargs):
        result = select(*args, **kwargs)
        calls.select.append(result[1])
        return result

    monkeypatch.setattr(shot_nodes, "generate_shot", generate_spy)
    monkeypatch.setattr(shot_nodes, "select_memory", select_spy)
    yield calls


def run_example(comfy_host, object_info, name: str, tag: str) -> tuple[dict[str, Any], Any]:
    workflow = load_workflow(template_path(name))
    api = tiny_api(ui_to_api(workflow, object_info, meta=True), tag)
    return api, comfy_host.run(api)


def saved_videos(comfy_host, result: Any, api: dict[str, Any]) -> list[Path]:
    out = Path(comfy_host.folder_paths.get_output_directory())
    paths = []
    for node in sorted((k for k, v in api.items() if v["class_type"] == "SaveVideo"), key=int):
        (item,) = result.ui(node)["images"]
        paths.append(out / item["subfolder"] / item["filename"])
    return paths


# -- the files ----------------------------------------------------------------------------------------


def test_shipped_files_are_what_the_script_makes(comfy_host, object_info) -> None:
    """The files are generated against CI's ComfyUI; another one (COMFYUI_PATH) lays out some core nodes
    differently (e.g. 0.33's SaveVideo, CreateVideo), so there only the files themselves are checked here
    (the tests below load and run them on it)."""
    from comfy_host import CI_COMFYUI_VERSION

    assert sorted(p.stem for p in WORKFLOW_DIR.glob("*.json")) == template_files()
    for name in NAMES:
        with Image.open(template_path(name, ".jpg")) as thumb:
            assert thumb.format == "JPEG" and thumb.size == (320, 180)
    if comfy_host.version != CI_COMFYUI_VERSION:
        pytest.skip(
            f"example_workflows/ are generated against ComfyUI {CI_COMFYUI_VERSION}'s node definitions; "
            f"this is ComfyUI {comfy_host.version}"
        )
    script = load_script()
    built = script.build_workflows(object_info)
    assert sorted(built) == template_files()
    assert script.out_of_date(built, WORKFLOW_DIR) == [], (
        "run: .venv/bin/python scripts/make_example_workflows.py"
    )


@pytest.mark.parametrize("name", NAMES)
def test_workflow_is_valid_and_has_the_real_settings(object_info, name: str) -> None:
    workflow = load_workflow(template_path(name))
    assert_valid_ui_workflow(workflow, object_info)
    api = ui_to_api(workflow, object_info)
    kinds = [v["class_type"] for v in api.values()]
    shots = [v["inputs"] for v in api.values() if v["class_type"] == "MementoGenerateShot"]
    if name in ("memento_render_story", "memento_camera_story"):
        return check_render_story_workflow(workflow, api)
    assert len(shots) == (2 if name == "memento_reference_images" else 3)
    storymem = name == "storymem_continuation"
    # Memento: shift 5, CFG 3.5 and 5.0 on a hard cut; StoryMem (wan_m2v_A14B.py): shift 4, CFG 3.5 always.
    shift, boost, folder = (4.0, 0.0, "Wan2.2-MI2V-A14B/") if storymem else (5.0, 1.5, "")
    for s in shots:
        assert (s["width"], s["height"], s["frames"], s["steps"]) == (832, 480, 81, 40)
        assert (s["shift"], s["boundary"], s["cfg_high"] == s["cfg_low"]) == (shift, 0.9, True)
        assert (s["cfg_high"], s["cut_cfg_boost"]) == (3.5, boost)
        assert s["position_scheme"] == "policy"
    (bb,) = (v["inputs"] for v in api.values() if v["class_type"] == "MementoLoadBackbone")
    assert (bb["high_noise_model"], bb["low_noise_model"]) == (
        "wan2.2_i2v_high_noise_14B_fp16.safetensors",
        "wan2.2_i2v_low_noise_14B_fp16.safetensors",
    )
    assert (bb["memento_high"], bb["memento_low"], bb["weight_dtype"]) == (
        f"{folder}backbone_high_noise.safetensors",
        f"{folder}backbone_low_noise.safetensors",
        "bf16",
    )
    if storymem:
        updates = [v["inputs"] for v in api.values() if v["class_type"] == "MementoUpdateMemory"]
        assert all(u["update"] == "policy" and "clip_vision" in u for u in updates)
        assert "CLIPVisionLoader" in kinds
    (clip,) = (v["inputs"] for v in api.values() if v["class_type"] == "CLIPLoader")
    assert clip["clip_name"] == "umt5_xxl_fp8_e4m3fn_scaled.safetensors" and clip["type"] == "wan"
    (vae,) = (v["inputs"] for v in api.values() if v["class_type"] == "VAELoader")
    assert vae["vae_name"] == "wan_2.1_vae.safetensors"
    for kind in ("VAEDecode", "MementoUpdateMemory", "CreateVideo", "SaveVideo"):
        assert kinds.count(kind) == len(shots), kind
    assert kinds.count("MementoSaveMemoryBank") == 1 and "MementoMemoryPreview" in kinds
    notes = [n for n in workflow["nodes"] if n["type"] == "Note"]
    titles = [g["title"] for g in workflow["groups"]]
    assert len(notes) == len(workflow["groups"]) and all(n["widgets_values"][0] for n in notes)
    assert [t for t in titles if t.startswith("Shot ")] == [f"Shot {i + 1}" for i in range(len(shots))]


def check_loaders(api: dict[str, Any]) -> None:
    (bb,) = (v["inputs"] for v in api.values() if v["class_type"] == "MementoLoadBackbone")
    assert (bb["high_noise_model"], bb["memento_high"]) == (
        "wan2.2_i2v_high_noise_14B_fp16.safetensors",
        "backbone_high_noise.safetensors",
    )
    (clip,) = (v["inputs"] for v in api.values() if v["class_type"] == "CLIPLoader")
    assert clip["type"] == "wan"


def check_render_story_workflow(workflow: dict[str, Any], api: dict[str, Any]) -> None:
    check_loaders(api)
    (render,) = (v["inputs"] for v in api.values() if v["class_type"] == "MementoRenderStory")
    assert (render["width"], render["height"], render["frames"], render["steps"]) == (832, 480, 81, 40)
    assert (render["cfg"], render["cut_cfg"], render["shift"], render["boundary"]) == (3.5, 5.0, 5.0, 0.9)
    assert render["if_exists"] == "resume" and render["first_shot"] == "empty memory"
    kinds = [v["class_type"] for v in api.values()]
    assert kinds.count("SaveVideo") == 1 and kinds.count("MementoSaveMemoryBank") == 1
    notes = [n for n in workflow["nodes"] if n["type"] == "Note"]
    assert len(notes) == len(workflow["groups"]) and all(n["widgets_values"][0] for n in notes)


# -- running them -------------------------------------------------------------------------------------


def test_3_shot_story_runs(comfy_host, object_info, tiny, spy) -> None:
    api, result = run_example(comfy_host, object_info, "memento_3_shot_story", "ex_story")
    story = json.loads((REPO_ROOT / "example_stories" / "lighthouse_keeper.json").read_text())
    prompts = story["scenes"][0]["video_prompts"]
    videos = saved_videos(comfy_host, result, api)
    assert len(videos) == 3 and all(p.is_file() and p.stat().st_size > 0 for p in videos)
    requests = [r for r, _, _ in spy.generate]
    assert [r.mode for r in requests] == ["cut", "mi2v", "cut"]  # cut flags [true, false, true]
    assert [r.settings.guidance_high for r in requests] == [5.0, 3.5, 5.0]
    assert all(r.settings.renoise_memory for r in requests)  # Memento re-noises memory every step
    assert [r.settings.seed for r in requests] == [42, 43, 44]
    assert all(r.reconstruct == story["reconstruct_target"] for r in requests)  # identity slot on
    # shot 1: empty memory (no selection); shot 2: shot 1's 8 frames kept; shot 3: 16 -> 6 local + 2 global
    assert spy.select[0].pools[0].method == "all" and len(spy.select) == 2
    for pool in spy.select[1].pools:
        assert pool.method == "kfq" and (len(pool.local_ids), len(pool.global_ids)) == (6, 2)
        assert len(pool.frame_ids) == 8 and len(pool.evicted_ids) == 8
    bank = saved_bank(result, node_id(api, "Save Memory Bank"))
    assert (bank.current_time, bank.shots_done) == (3 * FRAMES, 3)
    for index, pool in enumerate(("high", "low")):
        ids = bank.frame_ids(pool)
        assert len(ids) == 16 and len([i for i in ids if i.startswith("s3f")]) == 8  # 8 selected + 8 new
        assert not set(spy.select[1].pools[index].evicted_ids) & set(ids)
    assert next(f.caption for f in bank.frames() if f.frame_id.startswith("s3f")) == prompts[2]
    assert "story time 27, shots 3" in result.ui_text(node_id(api, "Memory Preview"))


def test_3_shot_story_follows_the_scripts_cut_flags(comfy_host, object_info, tiny, spy) -> None:
    """Edit only the pasted script's cut list to [true, true, false]: shot 2 becomes a hard cut (first
    frame ignored, CFG 5.0) and shot 3 continues from shot 2's last frame (CFG 3.5)."""
    workflow = load_workflow(template_path("memento_3_shot_story"))
    api = tiny_api(ui_to_api(workflow, object_info, meta=True), "ex_story_cuts")
    script = node_id(api, "Story script (JSON)")
    story = json.loads(api[script]["inputs"]["value"])
    story["scenes"][0]["cut"] = [True, True, False]
    api[script]["inputs"]["value"] = json.dumps(story)
    result = comfy_host.run(api)
    assert len(saved_videos(comfy_host, result, api)) == 3
    assert [r.mode for r, _, _ in spy.generate] == ["cut", "cut", "mi2v"]
    assert [continued for _, continued, _ in spy.generate] == [False, False, True]
    assert [r.settings.guidance_high for r, _, _ in spy.generate] == [5.0, 5.0, 3.5]
    assert [r.settings.guidance_low for r, _, _ in spy.generate] == [5.0, 5.0, 3.5]


def test_reference_images_workflow_runs(comfy_host, object_info, tiny, spy) -> None:
    api, result = run_example(comfy_host, object_info, "memento_reference_images", "ex_refs")
    assert len(saved_videos(comfy_host, result, api)) == 2
    first_bank = spy.generate[0][2]
    assert [f.frame_id for f in first_bank.frames()] == ["ref0", "ref1"]  # shot 1 sees the references
    assert [r.mode for r, _, _ in spy.generate] == ["cut", "mi2v"]
    assert [r.settings.guidance_high for r, _, _ in spy.generate] == [5.0, 3.5]
    for pool in spy.select[1].pools:  # shot 2: 2 pinned references + shot 1's 8 frames -> 8
        assert pool.pinned_ids == ("ref0", "ref1") and len(pool.frame_ids) == 8
    bank = saved_bank(result, node_id(api, "Save Memory Bank"))
    refs = [f for f in bank.frames() if f.frame_id.startswith("ref")]
    assert [f.frame_id for f in refs] == ["ref0", "ref1"] and all(f.pinned for f in refs)
    assert refs[0].caption.startswith("[Person A] a young woman")
    assert bank.resolution == (H // 8, W // 8) and bank.shots_done == 2
    for pool in ("high", "low"):
        assert {"ref0", "ref1"} <= set(bank.frame_ids(pool)) and len(bank.frame_ids(pool)) == 16


def test_storymem_continuation_runs(comfy_host, object_info, tiny, spy) -> None:
    api, result = run_example(comfy_host, object_info, "storymem_continuation", "ex_storymem")
    videos = saved_videos(comfy_host, result, api)
    # The continuation's first frame repeats shot 2's last: StoryMem drops it from the saved shot.
    assert [read_mp4(v).shape[0] for v in videos] == [FRAMES, FRAMES, FRAMES - 1]
    requests = [r for r, _, _ in spy.generate]
    assert [r.mode for r in requests] == ["cut", "cut", "mi2v"]  # a hard cut, then a continuation
    assert [continued for _, continued, _ in spy.generate] == [False, False, True]
    # StoryMem's released settings: CFG 3.5 on every shot (no cut boost), shift 4, boundary 0.9.
    assert [(r.settings.guidance_high, r.settings.guidance_low) for r in requests] == [(3.5, 3.5)] * 3
    assert {(r.settings.shift, r.settings.boundary) for r in requests} == {(4.0, 0.9)}
    # Sequential positions (the released model code), no identity slot, memory slots stay noise.
    assert {r.scheme for r in requests} == {"sequential"} and all(r.reconstruct is None for r in requests)
    assert not any(r.settings.renoise_memory for r in requests)
    assert all(p.method == "storymem" for s in spy.select for p in s.pools)
    bank = saved_bank(result, node_id(api, "Save Memory Bank"))
    assert bank.policy == "storymem" and bank.shared and bank.capacity == 10
    assert (bank.current_time, bank.shots_done) == (3 * FRAMES - 1, 3)  # shot 3 keeps 8 frames
    ids = bank.frame_ids("high")
    assert ids == bank.frame_ids("low") and 1 <= len(ids) <= 9  # at most 3 keyframes per shot
    # Every remembered frame carries its CLIP embedding, and no two keyframes of a shot are the frame.
    assert all(f.clip_embedding is not None for f in bank.frames())
    assert all(f.shot in (1, 2, 3) for f in bank.frames())


def test_render_story_workflow_runs(comfy_host, object_info, tiny) -> None:
    api, result = run_example(comfy_host, object_info, "memento_render_story", "ex_render")
    (video,) = saved_videos(comfy_host, result, api)
    assert read_mp4(video).shape[0] == 3 * FRAMES  # the joined story
    folder = (
        Path(comfy_host.folder_paths.get_output_directory()) / "ex_render" / "memento" / "lighthouse_keeper"
    )
    log = json.loads((folder / "story_log.json").read_text())
    assert [s["mode"] for s in log["shots"]] == ["empty", "mi2v", "cut"]  # cut flags [true, false, true]
    assert [s["guidance"]["high"] for s in log["shots"]] == [5.0, 3.5, 5.0]
    assert [s["seed"] for s in log["shots"]] == [42, 43, 44]
    bank = saved_bank(result, node_id(api, "Save Memory Bank"))
    assert (bank.current_time, bank.shots_done) == (3 * FRAMES, 3)
    assert "story time 27, shots 3" in result.ui_text(node_id(api, "Memory Preview"))


def test_camera_story_workflow_runs(comfy_host, object_info, tiny) -> None:
    """The revisit story with memento+fov: the last shot (back in the workshop) recalls only workshop
    frames, and the run folder has a camera map per shot."""
    api, result = run_example(comfy_host, object_info, "memento_camera_story", "ex_camera")
    (video,) = saved_videos(comfy_host, result, api)
    folder = (
        Path(comfy_host.folder_paths.get_output_directory()) / "ex_camera" / "memento" / "clockmaker_returns"
    )
    log = json.loads((folder / "story_log.json").read_text())
    assert log["settings"]["policy"] == "memento+fov" and len(log["shots"]) == 6
    last = log["shots"][-1]
    for pool in ("high", "low"):
        assert {int(i[1 : i.index("f")]) for i in last["memory_ids"][pool]} <= {1, 2}
    assert last["camera"] == [{"x": 0.5, "z": 0.5, "yaw": 5.0, "fov": 60.0}]
    assert len(list((folder / "memory").glob("*_cameras.png"))) == 6
    assert read_mp4(video).shape[0] == 6 * FRAMES


def test_summary_nodes_agree_with_the_frontend_script_and_the_nodes() -> None:
    """The nodes that get a summary box: web/memento.js adds it, the template layout reserves room for
    it (SUMMARY_NODES), and they are exactly the pack's nodes whose execute returns ui.PreviewText."""
    import ast
    import re

    js = (REPO_ROOT / "web" / "memento.js").read_text(encoding="utf-8")
    block = re.search(r"SUMMARY_NODES = new Set\(\[(.*?)\]\)", js, re.S)
    assert block is not None
    in_js = set(re.findall(r'"(Memento\w+)"', block.group(1)))
    returning_text = set()
    for path in (REPO_ROOT / "nodes").glob("*.py"):
        source = path.read_text(encoding="utf-8")
        for cls in (n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef)):
            body = ast.get_source_segment(source, cls) or ""
            node_id = re.search(r'node_id="(\w+)"', body)
            if node_id and "ui.PreviewText(" in body:
                returning_text.add(node_id.group(1))
    assert in_js == set(load_script().SUMMARY_NODES) == returning_text
