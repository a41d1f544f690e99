"""Load Memento Backbone: the two Wan2.2 I2V A14B experts with the Memento LoRA merged, their
KeyframeQuerys, extra LoRAs, and how the weights are placed on the GPU during a shot.

Files: base experts from ``models/diffusion_models``; the memory model's weights from ``models/memento``
(a folder this pack registers) or ``models/loras``: Memento's ``backbone_high_noise`` /
``backbone_low_noise.safetensors`` (LoRA + KeyframeQuery) or StoryMem's (``Wan2.2-MI2V-A14B`` /
``Wan2.2-MM2V-A14B``: LoRA only; convert its ``.pth`` files once with ``python -m memento_core.convert``).
The family of the files (reported in ``info``) picks the default memory policy. Extra LoRAs from
``models/loras``.

Weight dtype: bf16 (default), fp16, fp32, or fp8: loaded in bf16, LoRAs merged, then the block
projections are stored as fp8 e4m3fn with per-row scales and dequantised to bf16 per projection at run
time (``memento_core.fp8``; half the memory of bf16). fp8 "scaled" FILES load with any choice.

Model management: each expert (the parts that live on the device, plus its KeyframeQuery) is wrapped
in a ``comfy.model_patcher.ModelPatcher`` (load device: ComfyUI's torch device, offload device:
ComfyUI's unet offload device) and loaded with ``comfy.model_management.load_models_gpu(...,
force_full_load=True)``, so ComfyUI accounts for it and can unload it (plain ``nn.Module``s cannot be
partially loaded by ComfyUI's lowvram path, hence the full loads and our own block swap). Offload modes:

* ``none``: both experts on the GPU for the whole shot;
* ``swap experts``: only the active expert on the GPU (swapped at the high/low boundary);
* ``block swap``: like ``swap experts``, and the last ``swap_blocks`` blocks of each expert stay on the
  CPU and are moved in per forward (``memento_core.offload.BlockSwap``); ComfyUI manages the rest.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import comfy.model_management
import comfy.model_patcher
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..memento_core.attention import ATTENTION_CHOICES
from ..memento_core.errors import MementoError
from ..memento_core.expert import FAMILY_NAMES, MementoExpert, load_memento_expert_report
from ..memento_core.fast_paths import FastPaths, apply_to_experts
from ..memento_core.fp8 import is_fp8, quantize_fp8, uses_scaled_mm
from ..memento_core.m2v import Backbone
from ..memento_core.offload import BlockSwap, ExpertSwap, resident_modules, swapped_blocks
from ..memento_core.plan import GB, make_plan
from .types import LoadedBackbone, MementoBackboneSocket

CATEGORY = "Memento"
NODE = "Load Memento Backbone"

#: ComfyUI model folder name of the Memento weight files (models/memento).
MEMENTO_FOLDER = "memento"

WEIGHT_DTYPES: dict[str, torch.dtype | None] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp8": torch.bfloat16,  # loaded and merged in bf16, then stored as fp8 (memento_core.fp8)
}

#: Offload widget values -> memento_core.offload mode names.
OFFLOAD_CHOICES: dict[str, str] = {
    "none": "none",
    "swap experts": "swap_experts",
    "block swap": "block_swap",
    "auto": "auto",
}

LORA_SLOTS = 3
LORA_NONE = "None"
LORA_EXPERTS = ("both", "high", "low")


def register_memento_folder() -> None:
    """Register ``models/memento`` (.safetensors) with folder_paths once; ``loras`` is searched too."""
    if MEMENTO_FOLDER not in folder_paths.folder_names_and_paths:
        path = os.path.join(folder_paths.models_dir, MEMENTO_FOLDER)
        folder_paths.folder_names_and_paths[MEMENTO_FOLDER] = ([path], {".safetensors"})


register_memento_folder()


def memento_file_options() -> list[str]:
    """Files offered for the Memento weights: models/memento first, then models/loras (no duplicates)."""
    names = list(folder_paths.get_filename_list(MEMENTO_FOLDER))
    names += [n for n in folder_paths.get_filename_list("loras") if n not in names]
    return names


def find_model_file(folders: tuple[str, ...], name: str, what: str, widget: str, node: str = NODE) -> str:
    """Full path of ``name`` in the first of ``folders`` holding it, or a readable ValueError naming
    ``node`` and its ``widget``."""
    for folder in folders:
        if folder in folder_paths.folder_names_and_paths:
            path = folder_paths.get_full_path(folder, name)
            if path is not None and os.path.isfile(path):
                return path
    where = ", ".join(
        p
        for f in folders
        if f in folder_paths.folder_names_and_paths
        for p in folder_paths.get_folder_paths(f)
    )
    raise ValueError(
        f"{node}: the {what} file '{name}' ({widget}) was not found in {where or '(no folders)'}. Put the "
        ".safetensors file there, refresh ComfyUI (press R) and pick it in the list."
    )


def check_model_files(node: str, files: list[tuple[tuple[str, ...], object, str, str]]) -> bool:
    """The model-file check of a loader's ``validate_inputs``, run when a prompt is queued: every
    ``(folders, name, what, widget)`` must name a file there (a name fed by a link is not known yet and is
    checked when the node runs). Returns True, or raises ONE ValueError listing every missing file with
    its folders (:func:`find_model_file`'s message).

    A ``validate_inputs`` that names the file widgets makes ComfyUI skip its own "Value not in list" check
    of them (ComfyUI 0.33+ checks V3 combos; 0.3.75 did not) and call this instead. It raises instead of
    returning the message because ComfyUI (0.3.75 and 0.33) repeats a returned message once per declared
    input (seven here, most of them about files that exist); an exception is reported once, on this node
    (``node_errors``: "Exception when validating inner node", the message as its details).
    """
    problems = []
    for folders, name, what, widget in files:
        if not isinstance(name, str) or name == LORA_NONE:
            continue
        try:
            find_model_file(folders, name, what, widget, node)
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ValueError("\n".join(problems))
    return True


def _expert_patcher(expert: MementoExpert, n_swap: int) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher over the expert's device-resident modules (all but ``n_swap`` blocks) + its KFQ."""
    module = resident_modules(expert.dit, n_swap, {"keyframe_query": expert.keyframe_query})
    return comfy.model_patcher.ModelPatcher(
        module,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def _describe(pool: str, base: str, memento: str, expert: MementoExpert) -> str:
    cfg = expert.dit.config
    head = (
        f"{pool}-noise expert: {base} + {memento}\n"
        f"  kind {cfg.model_kind}, dim {cfg.dim}, layers {cfg.num_layers}, heads {cfg.num_heads}, "
        f"text_dim {cfg.text_dim}, dtype {str(expert.dit.weight_dtype).removeprefix('torch.')}"
        + (" (block weights stored in fp8 e4m3fn)" if is_fp8(expert.dit) else "")
    )
    return head + "\n" + "\n".join("  " + line for line in expert.summary().splitlines())


def _auto_offload(weight_dtype: str) -> tuple[str, int, str]:
    """offload "auto": the memory plan for ComfyUI's torch device at 832x480x81 -> (mode, swapped
    blocks, a note for the summary). A CPU device needs no offloading."""
    device = comfy.model_management.get_torch_device()
    if torch.device(device).type == "cpu":
        return "none", 0, ""
    vram_gb = comfy.model_management.get_total_memory(device) / GB
    plan = make_plan(vram_gb, 832, 480, 81, "fp8" if weight_dtype == "fp8" else "bf16")
    note = f" (plan for {vram_gb:.0f} GB at 832x480x81: peak {plan.predicted_peak_gb:.1f} GB)"
    if not plan.fits:
        note += f"; {plan.message}"
    return plan.mode, plan.swap_blocks, note


class MementoLoadBackbone(io.ComfyNode):
    """Load both Memento experts (base I2V experts + Memento LoRA/KeyframeQuery + extra LoRAs)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        """Base experts, Memento files, dtype, Memento strength, offload mode, 3 extra LoRA slots."""
        models = folder_paths.get_filename_list("diffusion_models")
        memento = memento_file_options()
        loras = [LORA_NONE, *folder_paths.get_filename_list("loras")]
        inputs: list[io.Input] = [
            io.Combo.Input(
                "high_noise_model",
                options=models,
                tooltip="Wan2.2 I2V A14B high-noise expert (models/diffusion_models).",
            ),
            io.Combo.Input(
                "low_noise_model",
                options=models,
                tooltip="Wan2.2 I2V A14B low-noise expert (models/diffusion_models).",
            ),
            io.Combo.Input(
                "memento_high",
                options=memento,
                tooltip="backbone_high_noise.safetensors (Memento LoRA + KeyframeQuery), from "
                "models/memento or models/loras.",
            ),
            io.Combo.Input(
                "memento_low",
                options=memento,
                tooltip="backbone_low_noise.safetensors (Memento LoRA + KeyframeQuery).",
            ),
            io.Combo.Input(
                "weight_dtype",
                options=list(WEIGHT_DTYPES),
                default="bf16",
                tooltip="Precision of the weights. bf16 as Wan2.2 was trained; fp8 stores the block "
                "weights in 8 bits (half the memory, computed in bf16; LoRAs are merged first).",
            ),
            io.Float.Input(
                "memento_strength",
                default=1.0,
                min=-4.0,
                max=4.0,
                step=0.05,
                tooltip="Memento LoRA strength.",
            ),
            io.Combo.Input(
                "offload",
                options=list(OFFLOAD_CHOICES),
                default="swap experts",
                tooltip="none: both experts on the GPU; swap experts: only the active one; block swap: "
                "also keep swap_blocks blocks of it on the CPU; auto: the fastest that fits this GPU for "
                "an 832x480x81 Memento shot (python -m memento_core.plan), swap_blocks ignored.",
            ),
            io.Int.Input(
                "swap_blocks",
                default=20,
                min=0,
                max=40,
                tooltip="block swap only: blocks per expert kept on the CPU and moved in per forward "
                "(copied in on a side stream from pinned memory while the previous block computes).",
            ),
            io.Combo.Input(
                "attention",
                options=list(ATTENTION_CHOICES),
                default="auto",
                tooltip="auto: SageAttention or flash-attn when installed and they agree with PyTorch SDPA "
                "on this GPU (checked once), else SDPA. sdpa: always PyTorch's.",
            ),
            io.Boolean.Input(
                "compile",
                default=False,
                tooltip="torch.compile the transformer blocks (faster sampling after a slow first step).",
            ),
        ]
        for n in range(1, LORA_SLOTS + 1):
            inputs += [
                io.Combo.Input(
                    f"lora_{n}", options=loras, default=LORA_NONE, tooltip="An extra LoRA (models/loras)."
                ),
                io.Float.Input(f"strength_{n}", default=1.0, min=-4.0, max=4.0, step=0.05),
                io.Combo.Input(
                    f"expert_{n}",
                    options=list(LORA_EXPERTS),
                    default="both",
                    tooltip="Which expert this LoRA is merged into.",
                ),
            ]
        return io.Schema(
            node_id="MementoLoadBackbone",
            display_name="Load Memento Backbone",
            category=CATEGORY,
            description="Loads the Wan2.2 I2V A14B experts with a memory model merged: Memento's files "
            "(LoRA + KeyframeQuery) or StoryMem's (MI2V / MM2V LoRA only). The family picks the default "
            "memory policy.",
            inputs=inputs,
            outputs=[
                MementoBackboneSocket.Output("backbone", display_name="backbone"),
                io.String.Output("info", display_name="info"),
            ],
        )

    @classmethod
    def validate_inputs(
        cls,
        high_noise_model: str | None = None,
        low_noise_model: str | None = None,
        memento_high: str | None = None,
        memento_low: str | None = None,
        lora_1: str | None = None,  # one parameter per LoRA slot (LORA_SLOTS)
        lora_2: str | None = None,
        lora_3: str | None = None,
    ) -> bool:
        """Every chosen model file exists (:func:`check_model_files`), else one readable error naming the
        files and the folders to put them in."""
        loras = {1: lora_1, 2: lora_2, 3: lora_3}
        return check_model_files(
            NODE,
            [
                (("diffusion_models",), high_noise_model, "model", "high_noise_model"),
                (("diffusion_models",), low_noise_model, "model", "low_noise_model"),
                ((MEMENTO_FOLDER, "loras"), memento_high, "Memento", "memento_high"),
                ((MEMENTO_FOLDER, "loras"), memento_low, "Memento", "memento_low"),
                *((("loras",), loras[n], "LoRA", f"lora_{n}") for n in range(1, LORA_SLOTS + 1)),
            ],
        )

    @classmethod
    def execute(
        cls,
        high_noise_model: str,
        low_noise_model: str,
        memento_high: str,
        memento_low: str,
        weight_dtype: str,
        memento_strength: float,
        offload: str,
        swap_blocks: int,
        attention: str = "auto",
        compile: bool = False,
        **loras: object,
    ) -> io.NodeOutput:
        """Load both experts onto ComfyUI's offload device and wrap them for model management."""
        if weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(
                f"{NODE}: weight_dtype '{weight_dtype}' is not one of {', '.join(WEIGHT_DTYPES)}."
            )
        dtype = WEIGHT_DTYPES[weight_dtype]
        if offload not in OFFLOAD_CHOICES:
            raise ValueError(f"{NODE}: offload '{offload}' is not one of {', '.join(OFFLOAD_CHOICES)}.")
        mode = OFFLOAD_CHOICES[offload]
        try:
            fast = FastPaths(attention=attention, compile=bool(compile))
        except MementoError as exc:
            raise ValueError(f"{NODE}: {exc}") from exc
        extras: dict[str, list[tuple[str, float]]] = {"high": [], "low": []}
        names: dict[str, list[str]] = {"high": [], "low": []}
        for n in range(1, LORA_SLOTS + 1):
            name = loras.get(f"lora_{n}", LORA_NONE)
            if name in (None, "", LORA_NONE):
                continue
            strength = float(loras.get(f"strength_{n}", 1.0))  # type: ignore[arg-type]
            target = loras.get(f"expert_{n}", "both")
            if target not in LORA_EXPERTS:
                raise ValueError(f"{NODE}: expert_{n} '{target}' is not one of {', '.join(LORA_EXPERTS)}.")
            path = find_model_file(("loras",), str(name), "LoRA", f"lora_{n}")
            for pool in ("high", "low"):
                if target in ("both", pool):
                    extras[pool].append((path, strength))
                    names[pool].append(f"{name} x{strength:g}")

        files = {
            "high": (
                find_model_file(("diffusion_models",), high_noise_model, "model", "high_noise_model"),
                high_noise_model,
            ),
            "low": (
                find_model_file(("diffusion_models",), low_noise_model, "model", "low_noise_model"),
                low_noise_model,
            ),
        }
        memento = {
            "high": (
                find_model_file((MEMENTO_FOLDER, "loras"), memento_high, "Memento", "memento_high"),
                memento_high,
            ),
            "low": (
                find_model_file((MEMENTO_FOLDER, "loras"), memento_low, "Memento", "memento_low"),
                memento_low,
            ),
        }
        experts: dict[str, MementoExpert] = {}
        for pool in ("high", "low"):
            try:
                experts[pool] = load_memento_expert_report(
                    files[pool][0],
                    memento[pool][0],
                    dtype=dtype,
                    device=comfy.model_management.unet_offload_device(),
                    lora_strength=float(memento_strength),
                    extra_loras=extras[pool],
                )
            except (ValueError, OSError) as exc:  # CheckpointError / LoraError name the file
                raise ValueError(f"{NODE}: {pool}-noise expert: {exc}") from exc
            if weight_dtype == "fp8":
                quantize_fp8(experts[pool].dit)  # after every LoRA merge
        high, low = experts["high"], experts["low"]
        if high.family != low.family:
            raise ValueError(
                f"{NODE}: memento_high is a {FAMILY_NAMES[high.family]} file but memento_low is a "
                f"{FAMILY_NAMES[low.family]} file; pick both experts' files of one release."
            )
        if high.dit.config.text_dim != low.dit.config.text_dim or high.dit.config.dim != low.dit.config.dim:
            raise ValueError(
                f"{NODE}: the high-noise and low-noise experts do not match (dim {high.dit.config.dim} vs "
                f"{low.dit.config.dim}); pick the two experts of one Wan2.2 I2V A14B release."
            )
        auto_note = ""
        if mode == "auto":
            mode, swap_blocks, auto_note = _auto_offload(weight_dtype)
        n_swap = int(swap_blocks) if mode == "block_swap" else 0
        if n_swap > len(high.dit.blocks):
            raise ValueError(
                f"{NODE}: swap_blocks {n_swap} exceeds the {len(high.dit.blocks)} blocks of each expert."
            )
        # the checks run on the GPU the experts will compute on
        notices = apply_to_experts((high.dit, low.dit), fast, comfy.model_management.get_torch_device())
        patchers = {pool: _expert_patcher(experts[pool], n_swap) for pool in ("high", "low")}
        lines = [
            _describe(pool, files[pool][1], memento[pool][1], experts[pool])
            + ("\n  extra LoRAs: " + ", ".join(names[pool]) if names[pool] else "")
            for pool in ("high", "low")
        ]
        lines.append(
            f"offload: {offload}"
            + (f" -> {mode.replace('_', ' ')}" if offload == "auto" else "")
            + (f" ({n_swap} blocks per expert on the CPU)" if n_swap else "")
            + auto_note
        )
        fp8_path = ""
        if weight_dtype == "fp8":
            fp8_path = ", fp8 matmuls" if uses_scaled_mm(high.dit) else ", fp8 dequantised to bf16"
        lines.append(f"attention: {high.dit.attention.name}{fp8_path}" + (", compiled" if compile else ""))
        lines += notices
        summary = "\n".join(lines)
        loaded = LoadedBackbone(
            backbone=Backbone(high.dit, low.dit, high.keyframe_query, low.keyframe_query),
            patchers=patchers,
            offload=mode,
            swap_blocks=n_swap,
            summary=summary,
            files={pool: files[pool][0] for pool in files},
            facts={
                "experts": {pool: files[pool][1] for pool in files},
                "memento": {pool: memento[pool][1] for pool in memento},
                "family": high.family,
                "memento_strength": float(memento_strength),
                "weight_dtype": weight_dtype,
                "attention": high.dit.attention.name,
                "compile": bool(compile),
                "extra_loras": {pool: names[pool] for pool in names},
            },
        )
        return io.NodeOutput(loaded, summary, ui=ui.PreviewText(summary))


def require_backbone(value: object, node: str) -> LoadedBackbone:
    """``value`` as a LoadedBackbone, or a readable ValueError naming ``node``."""
    if not isinstance(value, LoadedBackbone):
        raise ValueError(f"{node}: the 'backbone' input is not from Load Memento Backbone.")
    return value


def _unload(patcher: comfy.model_patcher.ModelPatcher) -> None:
    """Take one patcher off the device through ComfyUI's model management (no-op if not loaded)."""
    mm = comfy.model_management
    for i, loaded in enumerate(mm.current_loaded_models):
        if loaded.model is patcher:
            if loaded.model_unload():
                mm.current_loaded_models.pop(i)
            return


@contextmanager
def experts_on_device(loaded: LoadedBackbone) -> Iterator[Callable[[str], None]]:
    """Place the experts for a shot according to the offload mode; yields ``ensure(pool)``.

    none: both loaded now. swap_experts / block_swap: an expert is loaded on its first use (a forward,
    or ``ensure(pool)`` before a KeyframeQuery selection) and the other one is unloaded; block_swap
    also moves the swapped blocks in and out around each forward. Hooks are removed on exit.
    """
    mm = comfy.model_management
    patchers = loaded.patchers
    if loaded.offload == "none":
        mm.load_models_gpu([patchers["high"], patchers["low"]], force_full_load=True)
        yield lambda pool: None
        return

    def activate(pool: str) -> None:
        other = "low" if pool == "high" else "high"
        _unload(patchers[other])
        mm.load_models_gpu([patchers[pool]], force_full_load=True)

    bb = loaded.backbone
    swap = ExpertSwap({"high": bb.high, "low": bb.low}, activate)
    with ExitStack() as stack:
        stack.enter_context(swap.attached())
        if loaded.offload == "block_swap" and loaded.swap_blocks:
            device, offload = mm.get_torch_device(), mm.unet_offload_device()
            for dit in (bb.high, bb.low):
                blocks = swapped_blocks(dit, loaded.swap_blocks)
                stack.enter_context(BlockSwap(blocks, device, offload).attached())
        yield swap.ensure


def compute_device() -> torch.device:
    """The device ComfyUI runs models on."""
    return comfy.model_management.get_torch_device()


NODES: list[type[io.ComfyNode]] = [MementoLoadBackbone]
