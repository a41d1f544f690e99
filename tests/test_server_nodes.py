"""The Memento nodes and the shipped example workflows in the real ComfyUI 0.3.75 server (HTTP, 127.0.0.1).

The session server (``comfy_server``) runs ``tests/tiny_comfy_models.py::patch_tiny_umt5`` before
``main.py`` (``SERVER_PRELOAD`` in conftest_server.py), so ``CLIPLoader(type="wan")`` accepts the tiny
umT5 there. Tiny model files (written by the in-process host's helpers) are copied into the server's
model folders; the example workflows are taken from ``/workflow_templates``, converted to API prompts,
made tiny (:func:`test_example_workflows.tiny_api`) and queued with ``POST /prompt``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from comfy_server import ComfyPromptRejected, ComfyServer
from test_example_workflows import (
    NAMES,
    load_script,
    node_id,
    template_path,
    tiny_api,
    write_reference_images,
)
from test_nodes_graph import STEPS, story_graph
from test_render_story_node import render_graph
from tiny_comfy_models import TINY_FILES, backbone_inputs, install_tiny_models
from workflow_api import assert_valid_ui_workflow, input_defs, local_object_info, ui_to_api

from memento_core.memory import load_bank

PACK = "ComfyUI-Memento"

#: Every node the pack registers (nodes.all_nodes()).
MEMENTO_NODES = (
    "MementoLoadBackbone",
    "MementoMemoryBank",
    "MementoUpdateMemory",
    "MementoSaveMemoryBank",
    "MementoLoadMemoryBank",
    "MementoMemoryPreview",
    "MementoKeyframeRetrieve",
    "MementoGenerateShot",
    "MementoCameraTrajectory",
    "MementoLoadStoryScript",
    "MementoRenderStory",
    "MementoStoryConsistency",
    "MementoLoadDiT",
    "MementoDiTInfo",
)

#: Folder in the server's models/ for each tiny file.
FOLDERS = {
    "vae": "vae",
    "text_encoder": "text_encoders",
    "high": "diffusion_models",
    "low": "diffusion_models",
    "memento_high": "loras",
    "memento_low": "loras",
}


def signature(node_def: dict[str, Any]) -> dict[str, Any]:
    """A node definition without its option lists (model files differ between the two ComfyUIs)."""
    return {
        "inputs": [(d.name, d.type, d.optional) for d in input_defs(node_def)],
        "output": node_def["output"],
        "output_name": node_def["output_name"],
        "output_node": node_def["output_node"],
        "category": node_def["category"],
        "display_name": node_def["display_name"],
    }


@pytest.fixture(scope="module")
def server(comfy_server: ComfyServer, comfy_host) -> ComfyServer:
    """The session server with the tiny model files and the reference images in its folders."""
    paths = install_tiny_models(comfy_host)
    for key, folder in FOLDERS.items():
        target = comfy_server.model_dir(folder) / TINY_FILES[key]
        if not target.exists():
            shutil.copyfile(paths[key], target)
    write_reference_images(comfy_server.root / "input")
    return comfy_server


def served_api(server: ComfyServer, info: dict[str, Any], name: str, tag: str, **kw: Any) -> dict:
    """The served example workflow, validated, converted (titles kept in _meta) and made tiny."""
    workflow = server.workflow_template(PACK, load_script().template_file(name))
    assert_valid_ui_workflow(workflow, info)
    return tiny_api(ui_to_api(workflow, info, meta=True), tag, **kw)


def test_object_info_lists_every_memento_node(server: ComfyServer, comfy_host) -> None:
    """/object_info has all the pack's nodes, with the same sockets and types as the pack defines."""
    info = server.object_info()
    assert sorted(comfy_host.pack_node_ids) == sorted(MEMENTO_NODES)
    assert sorted(k for k, v in info.items() if v["category"] == "Memento") == sorted(MEMENTO_NODES)
    local = local_object_info()
    for name in MEMENTO_NODES:
        assert info[name]["python_module"] == f"custom_nodes.{PACK}"
        assert signature(info[name]) == signature(local[name]), name
    generate = {d.name: d for d in input_defs(info["MementoGenerateShot"])}
    assert generate["first_frame"].optional and generate["first_frame"].type == "IMAGE"
    assert generate["selection"].type == "MEMORY_SELECTION" and generate["positive"].type == "CONDITIONING"
    assert info["MementoGenerateShot"]["output"] == ["LATENT", "IMAGE"]
    assert info["MementoKeyframeRetrieve"]["output"] == ["MEMORY_SELECTION", "MEMORY_BANK", "IMAGE", "IMAGE"]
    assert info["MementoLoadStoryScript"]["output"] == ["STRING", "STRING", "BOOLEAN", "STRING", "INT", "INT"]
    assert info["MementoSaveMemoryBank"]["output_node"] is True
    assert info["MementoRenderStory"]["output"] == ["VIDEO", "MEMORY_BANK", "STRING"]
    assert info["MementoRenderStory"]["output_node"] is True
    generate_cut = generate["cut"]
    assert generate_cut.type == "BOOLEAN" and generate_cut.optional
    backbone = info["MementoLoadBackbone"]["input"]["required"]
    assert TINY_FILES["high"] in backbone["high_noise_model"][1]["options"]  # the server's own folders


def test_workflow_templates_lists_the_examples(server: ComfyServer) -> None:
    """GET /workflow_templates lists the three workflows under the pack folder; files and thumbnails."""
    files = {name: load_script().template_file(name) for name in NAMES}
    assert sorted(server.workflow_templates()[PACK]) == sorted(files.values())
    for name, stem in files.items():
        served = server.workflow_template(PACK, stem)
        assert served == json.loads(template_path(name).read_text(encoding="utf-8"))
        status, _ = server.request("GET", f"/api/workflow_templates/{PACK}/{urllib.parse.quote(stem)}.jpg")
        assert status == 200


def test_story_workflow_runs_and_interrupt_keeps_the_saved_bank(server: ComfyServer) -> None:
    """POST /prompt of the 3-shot story: success. Then the same story with a slow shot 1, interrupted
    while it samples: execution_interrupted, the bank saved by the first run is byte-for-byte unchanged
    and no new bank file is written. The next prompt (the StoryMem workflow) runs normally."""
    info = server.object_info()
    api = served_api(server, info, "memento_3_shot_story", "srv")
    entry = server.run(api, timeout=120)
    assert entry.success and entry.status_str == "success", entry.error_message
    save = node_id(api, "Save Memory Bank")
    bank_path = Path(entry.ui_text(save).splitlines()[0])
    assert (
        bank_path.is_relative_to(server.output_dir)
        and bank_path.name == "lighthouse_memory_00001.safetensors"
    )
    bank = load_bank(bank_path)
    assert (bank.shots_done, bank.current_time, len(bank.frame_ids("high"))) == (3, 27, 16)
    videos = [k for k, v in api.items() if v["class_type"] == "SaveVideo"]
    assert len(videos) == 3 and all(entry.ui(k)["images"] for k in videos)
    before = hashlib.sha256(bank_path.read_bytes()).hexdigest()

    slow = json.loads(json.dumps(api))
    shot1 = node_id(slow, "Shot 1 Generate")
    slow[shot1]["inputs"]["steps"] = 1000  # minutes on CPU; stopped after a few steps
    prompt_id = server.queue_prompt(slow)
    server.wait_executing(prompt_id, shot1, timeout=60)
    server.wait_event("progress", prompt_id=prompt_id, node=shot1, timeout=60)  # sampling has begun
    server.interrupt(prompt_id)
    stopped = server.wait_history(prompt_id, timeout=60)
    assert stopped.interrupted and not stopped.success, stopped.messages
    assert stopped.status_str == "error"
    # only output nodes that ran before shot 1 (its memory preview) report; no video, no bank
    assert save not in stopped.outputs and not set(videos) & set(stopped.outputs)
    assert stopped.message("execution_interrupted")["node_id"] == shot1
    assert stopped.message("execution_interrupted")["node_type"] == "MementoGenerateShot"
    assert hashlib.sha256(bank_path.read_bytes()).hexdigest() == before
    assert len(list(bank_path.parent.glob("shot_*.mp4"))) == 3  # no video of the stopped run either
    assert sorted(p.name for p in bank_path.parent.glob("*.safetensors")) == [bank_path.name]

    after = server.run(served_api(server, info, "storymem_continuation", "srv_next"), timeout=120)
    assert after.success, after.error_message
    assert sorted(p.name for p in bank_path.parent.glob("*.safetensors")) == [bank_path.name]


def test_every_sampling_step_reaches_the_ui(server: ComfyServer) -> None:
    """The websocket ``progress`` messages (and ``progress_state``) the browser gets: Generate Shot sends
    every step 1..N of N, Render Story every step of the whole story (shots x steps), each naming the node.
    ComfyUI 0.33's ProgressBar would drop updates less than 100 ms apart (tiny steps are faster)."""
    steps = 8
    graph = story_graph("srv_progress", 1)
    graph["s1_gen"]["inputs"]["steps"] = steps
    prompt_id = server.queue_prompt(graph)
    server.wait_event("execution_success", prompt_id=prompt_id, timeout=120)
    assert server.progress(prompt_id, "s1_gen") == [(k, steps) for k in range(1, steps + 1)]
    running = {(v, m) for v, m, state in server.progress_state(prompt_id, "s1_gen") if state == "running"}
    assert {(k, steps) for k in range(1, steps + 1)} <= running

    prompt_id = server.queue_prompt(render_graph("srv_progress/render"))
    server.wait_event("execution_success", prompt_id=prompt_id, timeout=180)
    total = 3 * STEPS  # three shots
    # 0 when shot 1 starts, then every step; a shot's start repeats the previous shot's last step: not resent
    assert server.progress(prompt_id, "render") == [(k, total) for k in range(total + 1)]
    running = {(v, m) for v, m, state in server.progress_state(prompt_id, "render") if state == "running"}
    assert {(k, total) for k in range(1, total + 1)} <= running


def test_missing_model_files_are_refused_when_queued(server: ComfyServer) -> None:
    """POST /prompt answers 400 with the loader's own message (file, widget, folders) as the UI shows it,
    once per node, on ComfyUI 0.3.75 and 0.33 alike, not ComfyUI's "Value not in list"."""
    graph = {
        "bb": {
            "class_type": "MementoLoadBackbone",
            "inputs": backbone_inputs(memento_low="gone.safetensors"),
        },
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["bb", 1]}},
    }
    with pytest.raises(ComfyPromptRejected) as rejected:
        server.queue_prompt(graph)
    assert list(rejected.value.response["node_errors"]) == ["bb"]
    (error,) = rejected.value.response["node_errors"]["bb"]["errors"]
    assert error["type"] == "exception_during_inner_validation"  # raised: reported once (check_model_files)
    details = error["details"]
    assert details.startswith(
        "Load Memento Backbone: the Memento file 'gone.safetensors' (memento_low) was not"
    )
    assert str(server.models_root / "loras") in details and "Put the .safetensors file there" in details
    assert "Value not in list" not in str(rejected.value)

    graph = {
        "dit": {
            "class_type": "MementoLoadDiT",
            "inputs": {"model_name": "gone.safetensors", "weight_dtype": "fp32", "expected_kind": "any"},
        },
        "info": {"class_type": "MementoDiTInfo", "inputs": {"dit": ["dit", 0]}},
    }
    with pytest.raises(ComfyPromptRejected) as rejected:
        server.queue_prompt(graph)
    (error,) = rejected.value.response["node_errors"]["dit"]["errors"]
    assert error["type"] == "custom_validation_failed" and error["extra_info"]["input_name"] == "model_name"
    assert "Load Memento DiT: the model file 'gone.safetensors' was not found" in error["details"]
    assert str(server.models_root / "diffusion_models") in error["details"]
