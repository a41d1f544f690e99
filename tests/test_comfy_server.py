"""The pack in a real ComfyUI 0.3.75 server (``main.py`` in a subprocess, HTTP on 127.0.0.1).

One server is shared by the session (``comfy_server`` fixture); the template test starts a second one
on a throwaway copy of the pack's layout with an example workflow in it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from comfy_server import ComfyPromptRejected, ComfyServer, pack_layout_copy
from comfy_server import comfy_server as server_context
from PIL import Image
from test_workflow_api import EXPECTED_API, UI_WORKFLOW, build_core_workflow
from workflow_api import WorkflowBuilder, assert_valid_ui_workflow, ui_to_api

PACK_NODES = {
    "MementoLoadDiT": {"model_name": "COMBO", "weight_dtype": "COMBO", "expected_kind": "COMBO"},
    "MementoDiTInfo": {"dit": "MEMENTO_DIT"},
}


def _write_tiny_dit(folder: Path, name: str, kind: str = "i2v") -> None:
    from safetensors.torch import save_file

    from memento_core.tiny import random_state_dict, tiny_config

    state = {f"model.diffusion_model.{k}": v for k, v in random_state_dict(tiny_config(kind), seed=5).items()}
    save_file(state, str(folder / name))


def _dit_workflow(object_info: dict, model_name: str) -> WorkflowBuilder:
    b = WorkflowBuilder(object_info)
    dit = b.node("MementoLoadDiT", model_name=model_name, weight_dtype="fp32", expected_kind="i2v")
    b.node("MementoDiTInfo", dit=dit)
    b.note("Loads a tiny Wan2.2 DiT and shows its shape.")
    return b


def test_server_lists_the_pack_nodes(comfy_server: ComfyServer) -> None:
    """/object_info has both pack nodes with their inputs; the pack was loaded from custom_nodes."""
    info = comfy_server.object_info()
    for name, inputs in PACK_NODES.items():
        assert name in info, sorted(k for k in info if "Memento" in k)
        required = info[name]["input"]["required"]
        assert {k: v[0] for k, v in required.items()} == inputs
        assert info[name]["category"] == "Memento"
        assert info[name]["python_module"] == "custom_nodes.ComfyUI-Memento"
    assert info["MementoLoadDiT"]["output"] == ["MEMENTO_DIT"]
    assert info["MementoDiTInfo"]["output_node"] is True
    assert comfy_server.object_info("MementoDiTInfo")["display_name"] == "Memento DiT Info"
    pack_lines = [
        line for line in comfy_server.log_text().splitlines() if "custom_nodes/ComfyUI-Memento" in line
    ]
    assert pack_lines and not any("IMPORT FAILED" in line for line in pack_lines), pack_lines
    assert (comfy_server.custom_nodes_dir / "ComfyUI-Memento").is_symlink()


def test_core_ui_workflow_runs_through_post_prompt(comfy_server: ComfyServer) -> None:
    """Builder -> UI JSON -> API prompt (equal to the hand-written one) -> POST /prompt -> success."""
    info = comfy_server.object_info()
    workflow = build_core_workflow(info).build()
    assert_valid_ui_workflow(workflow, info, check_combos=True)
    api = ui_to_api(workflow, info)
    assert api == EXPECTED_API == ui_to_api(UI_WORKFLOW, info)
    prompt_id = comfy_server.queue_prompt(api)
    entry = comfy_server.wait_history(prompt_id, timeout=60)
    assert entry.success, entry.error_message
    assert entry.status_str == "success" and entry.completed
    (image,) = entry.ui("6")["images"]
    path = comfy_server.output_dir / image["subfolder"] / image["filename"]
    with Image.open(path) as saved:
        assert saved.size == (32, 32)
        assert saved.convert("RGB").getpixel((5, 5)) == (255, 0, 0)  # the bypassed ImageInvert did not run
    assert comfy_server.executed_nodes(prompt_id) == ["1", "4", "6"]
    assert comfy_server.wait_event("executed", prompt_id=prompt_id, node="6", timeout=5).data["output"][
        "images"
    ]


def test_dit_ui_workflow_runs_through_the_server(comfy_server: ComfyServer) -> None:
    """MementoLoadDiT -> MementoDiTInfo on a tiny checkpoint in the server's diffusion_models folder."""
    _write_tiny_dit(comfy_server.model_dir("diffusion_models"), "server_tiny_i2v.safetensors")
    info = comfy_server.object_info()
    assert (
        "server_tiny_i2v.safetensors"
        in info["MementoLoadDiT"]["input"]["required"]["model_name"][1]["options"]
    )
    b = _dit_workflow(info, "server_tiny_i2v.safetensors")
    workflow = b.build()
    assert_valid_ui_workflow(workflow, info, check_combos=True)
    entry = comfy_server.run(ui_to_api(workflow, info), timeout=120)
    text = entry.ui_text("2")
    assert "kind: i2v" in text and "dim: 256" in text, text


def test_invalid_prompt_is_rejected_with_node_errors(comfy_server: ComfyServer) -> None:
    """POST /prompt answers 400; the exception names the node and ComfyUI's reason."""
    prompt = json.loads(json.dumps(EXPECTED_API))
    del prompt["4"]["inputs"]["width"]
    with pytest.raises(ComfyPromptRejected, match=r"node 4 \(ImageScale\): Required input is missing: width"):
        comfy_server.queue_prompt(prompt)


def test_interrupt_stops_a_running_prompt(comfy_server: ComfyServer) -> None:
    """POST /interrupt while node 3 of a slow chain runs: the next node stops, history says interrupted.

    Each 1024<->2048 bicubic resize of 4 images takes 0.3-1.2 s on 2 CPU cores; the whole chain ~8 s.
    ComfyUI checks the flag when a node starts (and in ProgressBar updates). It sends "executing 3"
    just before node 3's own check, so on a busy machine the interrupt can land in that gap and node 3
    is the one reported; otherwise node 3 finishes and node 4 is. Either way nothing after it runs.
    The random colour keeps the server's output cache from answering instantly.
    """
    prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 4}}}
    prompt["1"]["inputs"]["color"] = random.randint(1, 0xFFFFFF)
    for i in range(2, 12):
        size = 2048 if i % 2 == 0 else 1024
        prompt[str(i)] = {
            "class_type": "ImageScale",
            "inputs": {
                "image": [str(i - 1), 0],
                "upscale_method": "bicubic",
                "width": size,
                "height": size,
                "crop": "disabled",
            },
        }
    prompt["20"] = {"class_type": "PreviewImage", "inputs": {"images": ["11", 0]}}
    prompt_id = comfy_server.queue_prompt(prompt)
    comfy_server.wait_executing(prompt_id, "3", timeout=60)
    assert comfy_server.running_prompt_ids() == [prompt_id]
    comfy_server.interrupt(prompt_id)
    entry = comfy_server.wait_history(prompt_id, timeout=60)
    assert entry.interrupted and not entry.success, entry.messages
    assert entry.status_str == "error" and entry.completed is False  # 0.3.75 has no "interrupted" status
    stop = entry.message("execution_interrupted")
    assert stop is not None and stop["node_id"] in ("3", "4") and stop["node_type"] == "ImageScale"
    stopped_at = int(stop["node_id"])
    assert set(stop["executed"]) == {str(i) for i in range(1, stopped_at)}
    assert entry.message("execution_error") is None and entry.outputs == {}
    assert entry.error_message == f"execution interrupted at node {stopped_at} (ImageScale)"
    assert "20" not in comfy_server.executed_nodes(prompt_id)
    event = comfy_server.wait_event("execution_interrupted", prompt_id=prompt_id, timeout=5)
    assert event.data["node_id"] == str(stopped_at)
    # The flag is cleared when the next prompt starts: the server runs the next one normally.
    assert comfy_server.run(EXPECTED_API, timeout=60).success


def test_interrupt_for_another_prompt_id_is_ignored(comfy_server: ComfyServer) -> None:
    """A targeted interrupt for a prompt that is not running changes nothing (0.3.75 only logs it)."""
    comfy_server.interrupt("not-a-running-prompt")
    entry = comfy_server.run(EXPECTED_API, timeout=60)
    assert entry.success
    assert (
        "Prompt not-a-running-prompt is not currently running, skipping interrupt" in comfy_server.log_text()
    )


@pytest.fixture(scope="module")
def template_server(
    comfy_server: ComfyServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ComfyServer]:
    """A second server whose ComfyUI-Memento is a layout copy with one example workflow and a preload."""
    info = comfy_server.object_info()
    root = tmp_path_factory.mktemp("template_server")
    pack = pack_layout_copy(
        root / "pack", {"tiny_dit_info": _dit_workflow(info, "template_tiny_i2v.safetensors").build()}
    )
    preload = root / "preload_probe.py"
    preload.write_text(
        "import json, sys\n"
        "from comfy.cli_args import args\n"
        "import memento_core  # absolute import works while preloading (repo root is on sys.path)\n"
        "def record():\n"
        "    probe = {'port': args.port, 'cpu': args.cpu, 'argv0': sys.argv[0]}\n"
        f"    json.dump(probe, open({str(root / 'probe.json')!r}, 'w'))\n"
    )
    server_root = root / "base"
    models = server_root / "models" / "diffusion_models"
    models.mkdir(parents=True)
    _write_tiny_dit(models, "template_tiny_i2v.safetensors")
    with server_context(server_root, pack_source=pack, preload=[f"{preload}::record"]) as server:
        yield server


def test_workflow_templates_serves_the_pack_examples(template_server: ComfyServer) -> None:
    """GET /workflow_templates lists example_workflows/*.json by pack folder name.

    The files and thumbnails are served under /api/workflow_templates/<folder>/; the served workflow
    converts and runs.
    """
    assert template_server.workflow_templates() == {"ComfyUI-Memento": ["tiny_dit_info"]}
    workflow = template_server.workflow_template("ComfyUI-Memento", "tiny_dit_info")
    assert workflow["nodes"][0]["type"] == "MementoLoadDiT"
    status, _ = template_server.request("GET", "/api/workflow_templates/ComfyUI-Memento/tiny_dit_info.jpg")
    assert status == 200
    info = template_server.object_info()
    assert_valid_ui_workflow(workflow, info, check_combos=True)
    entry = template_server.run(ui_to_api(workflow, info), timeout=120)
    assert "kind: i2v" in entry.ui_text("2")
    # A folder added to custom_nodes later is listed too (the listing globs at request time).
    extra = template_server.custom_nodes_dir / "LateProbe" / "example_workflows"
    extra.mkdir(parents=True)
    (extra / "late.json").write_text("{}")
    assert template_server.workflow_templates()["LateProbe"] == ["late"]


def test_preload_runs_inside_the_server_before_main(template_server: ComfyServer) -> None:
    """The preload hook saw ComfyUI's parsed arguments (this port, --cpu) and the pack still loaded."""
    probe = json.loads((template_server.root.parent / "probe.json").read_text())
    assert probe == {"port": template_server.port, "cpu": True, "argv0": "main.py"}
    assert "[memento preload] ran" in template_server.log_text()
    assert "MementoDiTInfo" in template_server.object_info()
