"""Memory-bank nodes: create (empty or from reference images, MR2V), save, load, update after a shot,
and preview as a contact sheet.

Banks are immutable ``memento_core.memory.MemoryBank`` values; every node returns a new one.

* Memento Memory Bank: each reference IMAGE is VAE-encoded ALONE as a 1-frame clip (SPEC 4.1) and
  pinned (never evicted); references set the bank's resolution, so they must have the shots' size.
* Update Memory: the bank's memory policy adds the finished shot (``update: policy``): Memento's 8
  evenly spaced frames (SPEC 4.6), or StoryMem's CLIP keyframes (SPEC 5: the frames a continuation
  repeats are dropped first, keyframes picked with the CLIP_VISION input, sink + most recent kept);
  ``update`` can also force either rule. Each frame is re-encoded alone; story time advances by the
  frames kept. Give it the shot's decoded IMAGE frames (VAE Decode of the shot's LATENT) or the LATENT
  itself (decoded here; identical), and the shot's ``cut`` / ``continue_with`` as given to Generate
  Shot. Its ``memory`` input takes the MEMORY_SELECTION of the shot (Keyframe Query Retrieve), whose
  bank is the bank AFTER selection, so evicted frames stay gone (Memento's eviction); a MEMORY_BANK is
  accepted as it is. The ``frames`` output is the shot as the policy keeps it (for Create Video).
* Save / Load Memory Bank: one safetensors file with versioned JSON metadata, written atomically
  (``memento_core.memory.save_bank``); never pickle. Save writes ``<output>/<prefix>_00001.safetensors``.
"""

from __future__ import annotations

import os
from typing import Any

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..memento_core.adapters import encode_frames
from ..memento_core.conditioning import check_frame_size
from ..memento_core.m2v import remember_shot
from ..memento_core.memory import MemoryBank, MemoryTools, bank_to_dict, get_policy, load_bank, save_bank
from ..memento_core.preview import SheetTile, contact_sheet, selection_rows
from ..memento_core.runner import RUNNER_POLICIES
from .comfy_adapters import ComfyImageEmbedder, ComfyVideoVAE, approx_decode, image_to_video, video_to_image
from .errors import check_finite, check_image, check_text_path, node_errors
from .types import (
    CameraTrajectorySocket,
    MemoryBankSocket,
    MemorySelection,
    MemorySelectionSocket,
    require_bank,
    require_camera,
)

CATEGORY = "Memento"
#: The policies a node graph can run (their selection needs only the KeyframeQuerys).
POLICIES = RUNNER_POLICIES
#: Update Memory's ``update`` widget -> the policy whose update rule is used (None: the bank's own).
UPDATE_RULES: dict[str, str | None] = {
    "policy": None,
    "evenly spaced (Memento)": "memento",
    "CLIP keyframes (StoryMem)": "storymem",
}
#: How the shot continued the previous one (Generate Shot's continue_with) -> shot mode.
CONTINUE_WITH: dict[str, str] = {"last frame (MI2V)": "mi2v", "last 5 frames (MM2V)": "mm2v"}


def _captions(text: str, n: int, node: str) -> list[str]:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        return [""] * n
    if len(lines) == 1:
        return lines * n
    if len(lines) != n:
        raise ValueError(
            f"{node}: reference_captions has {len(lines)} lines for {n} reference images; give one line per "
            "image, one line for all, or none."
        )
    return lines


class MementoMemoryBank(io.ComfyNode):
    """An empty memory bank, or one seeded with reference images (MR2V)."""

    NODE = "Memento Memory Bank"

    @classmethod
    def define_schema(cls) -> io.Schema:
        """Policy, capacity; optional reference images + VAE + captions."""
        return io.Schema(
            node_id="MementoMemoryBank",
            display_name="Memento Memory Bank",
            category=CATEGORY,
            description="Creates a memory bank: empty, or holding reference images (MR2V) as pinned memory.",
            inputs=[
                io.Combo.Input(
                    "policy",
                    options=list(POLICIES),
                    default="memento",
                    tooltip="; ".join(f"{name}: {get_policy(name).summary}" for name in POLICIES),
                ),
                io.Int.Input(
                    "capacity",
                    default=0,
                    min=0,
                    max=64,
                    tooltip="Memory frames per shot; 0 = the policy's default (memento 8, storymem 10).",
                ),
                io.Image.Input(
                    "reference_images",
                    optional=True,
                    tooltip="Reference images (the shots' width and height); each becomes one pinned "
                    "memory frame.",
                ),
                io.Vae.Input("vae", optional=True, tooltip="Wan 2.1 VAE, needed with reference images."),
                io.String.Input(
                    "reference_captions",
                    multiline=True,
                    default="",
                    optional=True,
                    tooltip="One caption per line (or one for all).",
                ),
                *(
                    io.Image.Input(
                        f"reference_images_{n}",
                        optional=True,
                        tooltip="More reference images, after the ones above (same width and height).",
                    )
                    for n in (2, 3, 4)
                ),
            ],
            outputs=[MemoryBankSocket.Output("memory_bank", display_name="memory_bank")],
        )

    @classmethod
    def execute(
        cls,
        policy: str,
        capacity: int,
        reference_images: torch.Tensor | None = None,
        vae: Any = None,
        reference_captions: str = "",
        reference_images_2: torch.Tensor | None = None,
        reference_images_3: torch.Tensor | None = None,
        reference_images_4: torch.Tensor | None = None,
    ) -> io.NodeOutput:
        """Build the bank; each reference image is encoded alone, in input order."""
        node = cls.NODE
        if policy not in POLICIES:
            raise ValueError(f"{node}: policy '{policy}' is not one of {', '.join(POLICIES)}.")
        bank = MemoryBank.empty(policy, int(capacity) or None)
        given = [
            (name, check_image(value, name, node))
            for name, value in (
                ("reference_images", reference_images),
                ("reference_images_2", reference_images_2),
                ("reference_images_3", reference_images_3),
                ("reference_images_4", reference_images_4),
            )
            if value is not None
        ]
        if not given:
            return io.NodeOutput(bank)
        first_name, first = given[0]
        for name, value in given[1:]:
            if value.shape[1:] != first.shape[1:]:
                raise ValueError(
                    f"{node}: {name} is {value.shape[2]}x{value.shape[1]} but {first_name} is "
                    f"{first.shape[2]}x{first.shape[1]}; reference images must have one size (the shots' "
                    "width and height: use Upscale Image)."
                )
        images = torch.cat([value for _, value in given])
        if vae is None:
            raise ValueError(f"{node}: reference_images need the 'vae' input (Wan 2.1 VAE) to be encoded.")
        if images.shape[0] > bank.capacity:
            raise ValueError(
                f"{node}: {images.shape[0]} reference images exceed the capacity {bank.capacity} (references "
                "are pinned and never evicted); raise the capacity or use fewer images."
            )
        adapter = ComfyVideoVAE(vae, node)
        video = image_to_video(images)
        latents = encode_frames(adapter, video, list(range(video.shape[1])))  # [N, 16, h, w]
        caps = _captions(reference_captions, images.shape[0], node)
        with node_errors(node):
            bank = bank.with_references(latents, captions=caps)
        return io.NodeOutput(bank)


class MementoUpdateMemory(io.ComfyNode):
    """Add a finished shot to the memory with the bank's policy (Memento: 8 evenly spaced frames;
    StoryMem: CLIP keyframes), each re-encoded alone."""

    NODE = "Update Memory"

    @classmethod
    def define_schema(cls) -> io.Schema:
        """Memory (selection or bank), VAE, prompt; the shot as IMAGE frames or LATENT; update rule."""
        return io.Schema(
            node_id="MementoUpdateMemory",
            display_name="Update Memory",
            category=CATEGORY,
            description="Adds a finished shot to the memory bank, as the bank's policy does it (Memento: 8 "
            "evenly spaced frames; StoryMem: CLIP keyframes, needs clip_vision), each VAE-encoded alone. "
            "Connect the shot's selection so evicted frames stay evicted.",
            inputs=[
                io.MultiType.Input(
                    "memory",
                    types=[MemorySelectionSocket, MemoryBankSocket],
                    tooltip="The shot's MEMORY_SELECTION (from Keyframe Query Retrieve), or a MEMORY_BANK.",
                ),
                io.Vae.Input("vae"),
                io.String.Input(
                    "prompt", multiline=True, default="", tooltip="The shot's prompt (a caption)."
                ),
                io.Image.Input("images", optional=True, tooltip="The shot's decoded frames (VAE Decode)."),
                io.Latent.Input("latent", optional=True, tooltip="Or the shot's LATENT (decoded here)."),
                io.Int.Input(
                    "shot_index",
                    default=0,
                    min=0,
                    max=100000,
                    tooltip="1-based story shot number used in frame ids; 0 = the next one.",
                ),
                io.Combo.Input(
                    "update",
                    options=list(UPDATE_RULES),
                    default="policy",
                    optional=True,
                    tooltip="Which frames join the memory: the bank policy's rule, Memento's 8 evenly "
                    "spaced frames, or StoryMem's CLIP keyframes (needs clip_vision).",
                ),
                io.ClipVision.Input(
                    "clip_vision",
                    optional=True,
                    tooltip="Load CLIP Vision: image embeddings for StoryMem's keyframes (StoryMem used "
                    "CLIP ViT-B/32; ComfyUI loads ViT-L/14 and larger).",
                ),
                io.Boolean.Input(
                    "cut",
                    default=True,
                    optional=True,
                    tooltip="The shot was a hard cut (as given to Generate Shot). Off: it continued the "
                    "previous shot, whose repeated first frames StoryMem drops.",
                ),
                io.Combo.Input(
                    "continue_with",
                    options=list(CONTINUE_WITH),
                    default="last frame (MI2V)",
                    optional=True,
                    tooltip="How the shot continued (as given to Generate Shot), when 'cut' is off.",
                ),
                CameraTrajectorySocket.Input(
                    "camera",
                    optional=True,
                    tooltip="The shot's camera (Camera Trajectory): each remembered frame keeps the pose of "
                    "its frame, for the camera policies.",
                ),
            ],
            outputs=[
                MemoryBankSocket.Output("memory_bank", display_name="memory_bank"),
                io.Image.Output(
                    "frames",
                    display_name="frames",
                    tooltip="The shot as the policy keeps it (StoryMem drops the frames a continuation "
                    "repeats): save these as the shot.",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        memory: Any,
        vae: Any,
        prompt: str,
        images: torch.Tensor | None = None,
        latent: dict[str, Any] | None = None,
        shot_index: int = 0,
        update: str = "policy",
        clip_vision: Any = None,
        cut: bool = True,
        continue_with: str = "last frame (MI2V)",
        camera: Any = None,
    ) -> io.NodeOutput:
        """New bank = memory's bank + this shot's frames; the input bank is unchanged."""
        node = cls.NODE
        bank = require_bank(memory, "memory", node)
        adapter = ComfyVideoVAE(vae, node)
        if update not in UPDATE_RULES:
            raise ValueError(f"{node}: update '{update}' is not one of {', '.join(UPDATE_RULES)}.")
        if continue_with not in CONTINUE_WITH:
            raise ValueError(
                f"{node}: continue_with '{continue_with}' is not one of {', '.join(CONTINUE_WITH)}."
            )
        rule = UPDATE_RULES[update]
        with node_errors(node):
            policy = bank.policy_object() if rule is None else get_policy(rule, capacity=bank.capacity)
        if images is not None:
            video = image_to_video(check_image(images, "images", node))
        elif latent is not None:
            samples = latent.get("samples") if isinstance(latent, dict) else None
            if not isinstance(samples, torch.Tensor) or samples.ndim != 5 or samples.shape[:2] != (1, 16):
                got = list(samples.shape) if isinstance(samples, torch.Tensor) else None
                raise ValueError(
                    f"{node}: the 'latent' input is not one Wan video latent [1, 16, T, h, w] (got {got})."
                )
            check_finite(samples, "latent", node)
            video = adapter.decode_raw(samples)
            with node_errors(node):
                check_frame_size(video.shape[3], video.shape[2], "the 'latent' input's frames")
        else:
            raise ValueError(f"{node}: connect the shot's frames ('images') or its 'latent'.")
        if video.shape[1] < 9:
            raise ValueError(
                f"{node}: the shot has {video.shape[1]} frames; Memento remembers 8 evenly spaced frames, so "
                "it needs at least 9 (normally 81)."
            )
        embedder = None
        if policy.needs_embedder:
            if clip_vision is None:
                raise ValueError(
                    f"{node}: the {policy.name} update picks keyframes with CLIP image embeddings: connect "
                    "Load CLIP Vision to 'clip_vision'."
                )
            embedder = ComfyImageEmbedder(clip_vision, node)
        mode = "cut" if cut else CONTINUE_WITH[continue_with]
        with node_errors(node):
            remembered = remember_shot(
                bank,
                adapter,
                video,
                prompt,
                shot_index or None,
                mode=mode,
                policy=policy,
                tools=MemoryTools(adapter, embedder),
                camera=require_camera(camera, "camera", node),
            )
        return io.NodeOutput(remembered.bank, video_to_image(remembered.video))


class MementoSaveMemoryBank(io.ComfyNode):
    """Save a memory bank to the output folder (safetensors + JSON metadata, atomic)."""

    NODE = "Save Memory Bank"

    @classmethod
    def define_schema(cls) -> io.Schema:
        """A bank and a filename prefix; outputs the written path."""
        return io.Schema(
            node_id="MementoSaveMemoryBank",
            display_name="Save Memory Bank",
            category=CATEGORY,
            description="Saves a memory bank as <output>/<prefix>_00001.safetensors (no pickle).",
            inputs=[
                io.MultiType.Input("memory_bank", types=[MemoryBankSocket, MemorySelectionSocket]),
                io.String.Input("filename_prefix", default="memento/memory_bank"),
            ],
            outputs=[io.String.Output("path", display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, memory_bank: Any, filename_prefix: str) -> io.NodeOutput:
        """Write the next numbered file; show and return its path."""
        node = cls.NODE
        bank = require_bank(memory_bank, "memory_bank", node)
        check_text_path(filename_prefix, "filename_prefix", node)
        output_dir = folder_paths.get_output_directory()
        try:
            folder, filename, counter, _sub, _prefix = folder_paths.get_save_image_path(
                filename_prefix or "memento/memory_bank", output_dir
            )
        except Exception as exc:  # folder_paths raises a bare Exception for a prefix leaving the folder
            raise ValueError(f"{node}: filename_prefix '{filename_prefix}': {exc}") from exc
        path = save_bank(bank, os.path.join(folder, f"{filename}_{counter:05}.safetensors"))
        text = f"{path}\n{len(bank)} frames, story time {bank.current_time}, {bank.shots_done} shots"
        return io.NodeOutput(str(path), ui=ui.PreviewText(text))


def _resolve_bank_path(path: str, node: str) -> str:
    text = check_text_path((path or "").strip().strip('"'), "path", node)
    if not text:
        raise ValueError(f"{node}: 'path' is empty; give a .safetensors file written by Save Memory Bank.")
    if os.path.isabs(text):
        return text
    for base in (folder_paths.get_output_directory(), folder_paths.get_input_directory()):
        candidate = os.path.join(base, text)
        if os.path.isfile(candidate):
            return candidate
    return os.path.join(folder_paths.get_output_directory(), text)


class MementoLoadMemoryBank(io.ComfyNode):
    """Load a memory bank written by Save Memory Bank."""

    NODE = "Load Memory Bank"

    @classmethod
    def define_schema(cls) -> io.Schema:
        """A path (absolute, or relative to the output or input folder)."""
        return io.Schema(
            node_id="MementoLoadMemoryBank",
            display_name="Load Memory Bank",
            category=CATEGORY,
            description="Loads a memory bank file (from Save Memory Bank).",
            inputs=[
                io.String.Input(
                    "path",
                    default="memento/memory_bank_00001.safetensors",
                    tooltip="Absolute, or relative to ComfyUI's output (then input) folder.",
                )
            ],
            outputs=[MemoryBankSocket.Output("memory_bank", display_name="memory_bank")],
        )

    @classmethod
    def fingerprint_inputs(cls, path: str) -> Any:
        """Re-run when the file changes."""
        try:
            full = _resolve_bank_path(path, cls.NODE)
            return (full, os.path.getmtime(full), os.path.getsize(full))
        except (OSError, ValueError):
            return path

    @classmethod
    def execute(cls, path: str) -> io.NodeOutput:
        """Read and validate the file."""
        full = _resolve_bank_path(path, cls.NODE)
        with node_errors(cls.NODE):
            bank = load_bank(full)
        return io.NodeOutput(bank)


def _bank_rows(bank: MemoryBank, decode: Any) -> list[tuple[str, list[SheetTile]]]:
    """Contact-sheet rows of a bank: one per pool (one for shared policies), then the archive."""
    cache: dict[str, torch.Tensor] = {}

    def tiles(frames: Any) -> list[SheetTile]:
        out = []
        for f in frames:
            if f.frame_id not in cache:
                cache[f.frame_id] = decode(f.latent[:, None])[:, 0]
            mark = "reference" if f.source == "reference" else "kept"
            out.append(SheetTile(cache[f.frame_id], f"{f.frame_id} t{f.abs_frame}", mark))
        return out

    pools = ("shared",) if bank.shared else ("high", "low")
    rows = [(p, tiles(bank.pool("high" if p == "shared" else p))) for p in pools]
    if bank.archive:
        rows.append(("archive", tiles(bank.archive)))
    return rows


def preview_decoder(vae: Any, node: str) -> Any:
    """latent [16, 1, h, w] (normalised) -> [3, 1, H, W]: through the VAE, or approximate without one."""
    if vae is None:
        return approx_decode
    return ComfyVideoVAE(vae, node).decode


class MementoMemoryPreview(io.ComfyNode):
    """A contact sheet of a memory bank (or of a shot's selection, local and global marked)."""

    NODE = "Memory Preview"

    @classmethod
    def define_schema(cls) -> io.Schema:
        """Bank or selection, optional VAE (else approximate colours), tile height, columns."""
        return io.Schema(
            node_id="MementoMemoryPreview",
            display_name="Memory Preview",
            category=CATEGORY,
            description="Shows the frames of a memory bank as one image; with a selection, the chosen "
            "frames marked local (blue) / global (orange) / reference (green).",
            inputs=[
                io.MultiType.Input("memory", types=[MemoryBankSocket, MemorySelectionSocket]),
                io.Vae.Input("vae", optional=True, tooltip="Decode frames properly (else rough colours)."),
                io.Int.Input(
                    "tile_height", default=120, min=16, max=1024, tooltip="Height of each frame in px."
                ),
                io.Int.Input(  # keep last (saved workflows list [tile_height] only); optional so
                    "columns",  # API prompts saved without it still validate
                    default=4,
                    min=1,
                    max=32,
                    optional=True,
                    tooltip="Frames per line; each pool wraps onto more lines (the sheet grows taller, "
                    "not wider).",
                ),
            ],
            outputs=[io.Image.Output("image", display_name="image")],
        )

    @classmethod
    def execute(cls, memory: Any, vae: Any = None, tile_height: int = 120, columns: int = 4) -> io.NodeOutput:
        """Render the sheet [1, H, W, 3]."""
        decode = preview_decoder(vae, cls.NODE)
        if isinstance(memory, MemorySelection):
            rows = selection_sheet_rows(memory, decode)
        else:
            rows = _bank_rows(require_bank(memory, "memory", cls.NODE), decode)
        sheet = contact_sheet(rows, tile_height=int(tile_height), columns=int(columns))
        info = bank_to_dict(require_bank(memory, "memory", cls.NODE))
        return io.NodeOutput(sheet[None], ui=ui.PreviewText(_describe_bank(info)))


def selection_sheet_rows(sel: MemorySelection, decode: Any) -> list[tuple[str, list[SheetTile]]]:
    """Rows of a shot's selection: per pool, the frames the shot uses with their positions (the policy's
    position scheme)."""
    bank = sel.bank
    pools = ("high",) if bank.shared else ("high", "low")
    used = {p: bank.frame_ids(p) for p in pools}
    scheme = bank.policy_object().sampler.scheme
    positions = {p: bank.frame_positions(p, scheme, 0, False).tolist() for p in pools}
    return selection_rows(bank, used, sel.selection, decode, positions)


def _describe_bank(info: dict[str, Any]) -> str:
    pools = info.get("pools", {})
    return (
        f"policy {info.get('policy')}, capacity {info.get('capacity')}, "
        f"story time {info.get('current_time')}, shots {info.get('shots_done')}, "
        f"resolution {info.get('resolution')}\n"
        f"high: {[f['id'] for f in pools.get('high', [])]}\nlow: {[f['id'] for f in pools.get('low', [])]}"
    )


NODES: list[type[io.ComfyNode]] = [
    MementoMemoryBank,
    MementoUpdateMemory,
    MementoSaveMemoryBank,
    MementoLoadMemoryBank,
    MementoMemoryPreview,
]
