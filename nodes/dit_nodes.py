"""ComfyUI nodes that load a Wan2.2 DiT expert into memento_core and describe it.

Thin by design: validate the widget values, turn them into memento_core arguments, call
:func:`memento_core.load_dit`, and turn its errors into messages an artist can act on.
"""

from __future__ import annotations

import os

import comfy.model_management
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..memento_core import WanDiT, load_dit

CATEGORY = "Memento"

#: The custom socket type carrying a loaded :class:`memento_core.WanDiT` between Memento nodes.
MementoDiT = io.Custom("MEMENTO_DIT")

#: Weight dtype widget values and the torch dtypes they stand for.
WEIGHT_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Expected-kind widget values and the ``expect`` argument of :func:`memento_core.load_dit`.
EXPECTED_KINDS: dict[str, str | None] = {"any": None, "i2v": "i2v", "t2v": "t2v"}


def _diffusion_model_path(model_name: str) -> str:
    """Full path of ``model_name`` in ComfyUI's ``diffusion_models`` folders, or a readable ValueError."""
    path = folder_paths.get_full_path("diffusion_models", model_name)
    if path is None or not os.path.isfile(path):
        folders = ", ".join(folder_paths.get_folder_paths("diffusion_models")) or "(none configured)"
        raise ValueError(
            f"Load Memento DiT: the model file '{model_name}' was not found in the diffusion_models "
            f"folders ({folders}). Put the Wan2.2 DiT .safetensors file there, then refresh ComfyUI "
            "(press R) and pick it in the list."
        )
    return path


def describe_dit(model: WanDiT) -> str:
    """Human-readable summary of a loaded DiT: kind, shape, parameter count and weight dtype."""
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    dtype = next(model.parameters()).dtype if n_params else torch.float32
    dtype_name = {v: k for k, v in WEIGHT_DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))
    if n_params >= 1e9:
        count = f"{n_params / 1e9:.2f}B"
    elif n_params >= 1e6:
        count = f"{n_params / 1e6:.2f}M"
    else:
        count = f"{n_params / 1e3:.1f}K"
    lines = [
        f"kind: {cfg.model_kind}",
        f"dim: {cfg.dim}",
        f"ffn_dim: {cfg.ffn_dim}",
        f"layers: {cfg.num_layers}",
        f"heads: {cfg.num_heads}",
        f"in_dim: {cfg.in_dim}",
        f"out_dim: {cfg.out_dim}",
        f"text_dim: {cfg.text_dim}",
        f"parameters: {n_params} ({count})",
        f"dtype: {dtype_name}",
    ]
    return "\n".join(lines)


class MementoLoadDiT(io.ComfyNode):
    """Load one Wan2.2 DiT expert (T2V or I2V) from the diffusion_models folder for Memento sampling."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        """Widgets: the model file, its weight dtype and the kind of model the workflow expects."""
        return io.Schema(
            node_id="MementoLoadDiT",
            display_name="Load Memento DiT",
            category=CATEGORY,
            description=(
                "Loads a Wan2.2 DiT expert (high-noise or low-noise, T2V or I2V) from "
                "models/diffusion_models for the Memento samplers."
            ),
            inputs=[
                io.Combo.Input(
                    "model_name",
                    options=folder_paths.get_filename_list("diffusion_models"),
                    tooltip="A Wan2.2 DiT .safetensors file in models/diffusion_models.",
                ),
                io.Combo.Input(
                    "weight_dtype",
                    options=list(WEIGHT_DTYPES),
                    default="bf16",
                    tooltip="Precision the weights are kept in. bf16 is what Wan2.2 was trained in.",
                ),
                io.Combo.Input(
                    "expected_kind",
                    options=list(EXPECTED_KINDS),
                    default="any",
                    tooltip="Stop with a clear message if the file is not this kind of model "
                    "(i2v: image-to-video, 36 input channels; t2v: text-to-video, 16).",
                ),
            ],
            outputs=[MementoDiT.Output(display_name="dit")],
        )

    @classmethod
    def validate_inputs(cls, model_name: str | None = None) -> bool | str:
        """The file exists, checked when the prompt is queued (a name fed by a link is checked when the
        node runs). Naming ``model_name`` here replaces ComfyUI's "Value not in list" check (0.33+ checks
        V3 combos, 0.3.75 did not) with :func:`_diffusion_model_path`'s message saying where to put the
        file, which ComfyUI shows on the ``model_name`` widget (its only declared input, so only once)."""
        if isinstance(model_name, str):
            try:
                _diffusion_model_path(model_name)
            except ValueError as exc:
                return str(exc)
        return True

    @classmethod
    def execute(cls, model_name: str, weight_dtype: str, expected_kind: str) -> io.NodeOutput:
        """Load the file onto ComfyUI's offload device with memento_core; re-raise errors readably."""
        if weight_dtype not in WEIGHT_DTYPES:
            choices = ", ".join(WEIGHT_DTYPES)
            raise ValueError(f"Load Memento DiT: weight_dtype '{weight_dtype}' is not one of {choices}.")
        if expected_kind not in EXPECTED_KINDS:
            choices = ", ".join(EXPECTED_KINDS)
            raise ValueError(f"Load Memento DiT: expected_kind '{expected_kind}' is not one of {choices}.")
        path = _diffusion_model_path(model_name)
        try:
            model = load_dit(
                path,
                dtype=WEIGHT_DTYPES[weight_dtype],
                device=comfy.model_management.unet_offload_device(),
                expect=EXPECTED_KINDS[expected_kind],
            )
        except (ValueError, OSError) as exc:  # CheckpointError is a ValueError naming the file.
            raise ValueError(f"Load Memento DiT: {exc}") from exc
        return io.NodeOutput(model)


class MementoDiTInfo(io.ComfyNode):
    """Show what a loaded Memento DiT is: kind, width, depth, input channels, size and dtype."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        """One DiT in, its description out (also shown on the node)."""
        return io.Schema(
            node_id="MementoDiTInfo",
            display_name="Memento DiT Info",
            category=CATEGORY,
            description="Describes a loaded Memento DiT: kind, dim, layers, heads, in_dim, size, dtype.",
            inputs=[MementoDiT.Input("dit")],
            outputs=[io.String.Output(display_name="info")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, dit: WanDiT) -> io.NodeOutput:
        """Describe ``dit`` and show the text on the node."""
        if not isinstance(dit, WanDiT):
            raise ValueError("Memento DiT Info: the 'dit' input is not a model from Load Memento DiT.")
        text = describe_dit(dit)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


NODES: list[type[io.ComfyNode]] = [MementoLoadDiT, MementoDiTInfo]
