"""The pack inside a real ComfyUI 0.3.75 (in process, CPU): loading, a small graph, a readable error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from comfy_host import ComfyHost
from safetensors.torch import save_file

from memento_core import DiTConfig, WanDiT

PACK_NODE_IDS = ("MementoLoadDiT", "MementoDiTInfo")

TINY_I2V = DiTConfig(
    dim=256,
    ffn_dim=512,
    num_heads=2,
    num_layers=2,
    in_dim=36,
    out_dim=16,
    text_dim=64,
    freq_dim=256,
    patch_size=(1, 2, 2),
    eps=1e-6,
    text_len=512,
)
CHECKPOINT_NAME = "tiny_wan_expert.safetensors"  # no kind in the name: the message must say it


@pytest.fixture(scope="module")
def tiny_i2v_checkpoint(comfy_host: ComfyHost) -> Path:
    """A tiny random Wan I2V DiT saved as a ComfyUI user has it (``model.diffusion_model.`` keys)."""
    torch.manual_seed(0)
    model = WanDiT(TINY_I2V)
    generator = torch.Generator().manual_seed(0)
    state = {
        f"model.diffusion_model.{key}": (torch.randn(value.shape, generator=generator) * 0.02).contiguous()
        for key, value in model.state_dict().items()
    }
    assert "model.diffusion_model.head.modulation" in state
    path = comfy_host.model_dir("diffusion_models") / CHECKPOINT_NAME
    save_file(state, str(path))
    return path


def _load_and_describe(expected_kind: str) -> dict[str, dict]:
    """API-format prompt: Load Memento DiT -> Memento DiT Info."""
    return {
        "1": {
            "class_type": "MementoLoadDiT",
            "inputs": {"model_name": CHECKPOINT_NAME, "weight_dtype": "fp32", "expected_kind": expected_kind},
        },
        "2": {"class_type": "MementoDiTInfo", "inputs": {"dit": ["1", 0]}},
    }


def test_pack_loads_as_v3_extension(comfy_host: ComfyHost) -> None:
    """ComfyUI imports the repo as a custom node pack through comfy_entrypoint and lists our nodes."""
    from comfy_api.latest import io

    mappings = comfy_host.nodes.NODE_CLASS_MAPPINGS
    assert set(PACK_NODE_IDS) <= set(comfy_host.pack_node_ids)
    for node_id in PACK_NODE_IDS:
        cls = mappings[node_id]
        assert issubclass(cls, io.ComfyNode), f"{node_id} took the V1 path"
        assert cls.CATEGORY == "Memento"
        assert cls.RELATIVE_PYTHON_MODULE == "custom_nodes.ComfyUI-Memento"
    assert comfy_host.nodes.NODE_DISPLAY_NAME_MAPPINGS["MementoLoadDiT"] == "Load Memento DiT"
    assert comfy_host.nodes.NODE_DISPLAY_NAME_MAPPINGS["MementoDiTInfo"] == "Memento DiT Info"
    assert mappings["MementoDiTInfo"].OUTPUT_NODE is True
    assert not hasattr(comfy_host.pack_module, "NODE_CLASS_MAPPINGS")
    assert comfy_host.combo_options("MementoLoadDiT", "weight_dtype") == ["fp32", "bf16", "fp16"]
    assert comfy_host.combo_options("MementoLoadDiT", "expected_kind") == ["any", "i2v", "t2v"]


def test_load_dit_then_info_reports_the_config(comfy_host: ComfyHost, tiny_i2v_checkpoint: Path) -> None:
    """A graph runs end to end and the info node shows the checkpoint's shape on the node."""
    assert CHECKPOINT_NAME in comfy_host.combo_options("MementoLoadDiT", "model_name")
    result = comfy_host.run(_load_and_describe("i2v"))
    text = result.ui_text("2")
    n_params = sum(v.numel() for v in WanDiT(TINY_I2V).state_dict().values())
    for line in (
        "kind: i2v",
        "dim: 256",
        "layers: 2",
        "heads: 2",
        "in_dim: 36",
        f"parameters: {n_params} ",
        "dtype: fp32",
    ):
        assert line in text, f"{line!r} not in:\n{text}"
    assert set(result.outputs) == {"2"}


def test_wrong_kind_fails_with_a_readable_message(comfy_host: ComfyHost, tiny_i2v_checkpoint: Path) -> None:
    """Asking for a T2V model on an I2V file stops at the loader with ComfyUI showing why."""
    result = comfy_host.run(_load_and_describe("t2v"), check=False)
    assert not result.success
    error = result.execution_error
    assert error is not None, result.error_message
    assert error["node_id"] == "1" and error["node_type"] == "MementoLoadDiT"
    message = error["exception_message"].strip()  # ComfyUI appends "\n" + tips (empty unless OOM)
    assert message.startswith("Load Memento DiT:")
    assert CHECKPOINT_NAME in message
    lowered = message.lower()
    assert "i2v" in lowered and "t2v" in lowered, message
    assert "in_dim 36" in message and "in_dim 16" in message, message
    assert error["exception_type"] == "ValueError"
    assert message in (result.error_message or "")
    assert "2" not in result.outputs


def test_missing_file_fails_with_a_readable_message(comfy_host: ComfyHost) -> None:
    """A file name not in diffusion_models is refused when the prompt is queued, with the loader's message
    saying where to put the file, once, on the model_name widget.

    The node's ``validate_inputs`` names ``model_name``, so ComfyUI calls it instead of its own "Value not
    in list" check (ComfyUI 0.33+ checks V3 combos, 0.3.75 did not); a workflow from another machine
    gets the same message on both.
    """
    prompt = _load_and_describe("any")
    prompt["1"]["inputs"]["model_name"] = "missing.safetensors"
    result = comfy_host.run(prompt, check=False)
    assert not result.success and result.execution_error is None
    assert list(result.node_errors) == ["1"], result.error_message
    (error,) = result.node_errors["1"]["errors"]
    assert error["type"] == "custom_validation_failed"
    assert error["extra_info"]["input_name"] == "model_name"
    assert "Value not in list" not in (result.error_message or "")
    assert "Load Memento DiT: the model file 'missing.safetensors' was not found" in error["details"]
    assert (
        "diffusion_models" in error["details"]
        and "Put the Wan2.2 DiT .safetensors file there" in error["details"]
    )


def test_invalid_prompt_reports_validation_errors(comfy_host: ComfyHost) -> None:
    """A prompt ComfyUI rejects raises ComfyPromptError carrying ComfyUI's validation text."""
    from comfy_host import ComfyPromptError

    prompt = _load_and_describe("any")
    del prompt["1"]["inputs"]["expected_kind"]
    with pytest.raises(ComfyPromptError, match="Required input is missing: expected_kind") as info:
        comfy_host.run(prompt)
    assert info.value.result.execution_error is None
    assert "1" in info.value.result.node_errors
