"""Load Story Script: one shot of a SPEC 7 story script as widgets-ready values.

The script comes from ``text`` (JSON pasted into the node) when it is not empty, else from ``path``
(absolute, or relative to ComfyUI's input folder). ``shot_index`` is 0-based over the whole story.
Outputs the shot's prompt, its global caption (SPEC 4.7 rule), whether it is a hard cut (false:
continue from the previous shot's last frame), the story's reconstruct target ("" when none), the
number of shots, and the shot's 0-based index within its scene (Memento seeds a shot with
``seed + index_in_scene``). Malformed scripts give memento_core's StoryError text (file and field).
"""

from __future__ import annotations

import hashlib
import io as io_bytes
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import comfy.model_management
import folder_paths
import torch
from comfy_api.latest import InputImpl, io, ui
from PIL import Image

from ..memento_core.dit import WanDiT
from ..memento_core.errors import MementoError
from ..memento_core.fp8 import is_fp8
from ..memento_core.m2v import WAN_NEGATIVE_PROMPT
from ..memento_core.memory import get_policy, load_bank
from ..memento_core.models import ModelSet, load_t2v_experts
from ..memento_core.runner import (
    CONTINUATIONS,
    RUNNER_POLICIES,
    Progress,
    RunFolderError,
    RunSettings,
    render_story,
)
from ..memento_core.sampling import SOLVERS, StepInfo
from ..memento_core.story import Story, StoryShot, load_story, parse_story
from .backbone_nodes import (
    check_model_files,
    compute_device,
    experts_on_device,
    find_model_file,
    require_backbone,
)
from .comfy_adapters import ComfyImageEmbedder, ComfyTextEncoder, ComfyVideoVAE
from .errors import check_image, check_text_path, node_errors
from .progress import StepProgress
from .released_inputs import idt_back_mode_input, kfq_precision_input, memory_noise_input, noise_input
from .shot_nodes import check_text_width
from .types import LoadedBackbone, MementoBackboneSocket, MemoryBankSocket

CATEGORY = "Memento"
NODE = "Load Story Script"


def _resolve(path: str) -> str:
    text = check_text_path((path or "").strip().strip('"'), "path", NODE)
    if os.path.isabs(text):
        return text
    return os.path.join(folder_paths.get_input_directory(), text)


def script_inputs() -> list[io.Input]:
    """The two ways to give a story script: a file ``path`` or the JSON ``text``."""
    return [
        io.String.Input(
            "path",
            default="",
            tooltip="Story JSON file: absolute, or relative to ComfyUI's input folder.",
        ),
        io.String.Input(
            "text", multiline=True, default="", tooltip="Or the script itself (used when not empty)."
        ),
    ]


def script_fingerprint(path: str, text: str) -> Any:
    """Changes when the script changes: the text, or the file's path and modification time."""
    if (text or "").strip():
        return text
    try:
        full = _resolve(path)
        return (full, os.path.getmtime(full))
    except OSError:
        return path


def read_story(path: str, text: str) -> Story:
    """The story from ``text`` when given, else from ``path``; readable ValueErrors."""
    with node_errors(NODE):
        if (text or "").strip():
            return parse_story(text, source="the 'text' input")
        if not (path or "").strip():
            raise ValueError(f"{NODE}: give a story script: a JSON file 'path' or the script as 'text'.")
        return load_story(_resolve(path))


class MementoLoadStoryScript(io.ComfyNode):
    """Read a story script and output one shot's texts and flags."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        """path or text, shot_index."""
        return io.Schema(
            node_id="MementoLoadStoryScript",
            display_name="Load Story Script",
            category=CATEGORY,
            description="Reads a story script (JSON: story_name, reconstruct_target, scenes with "
            "video_prompts and cut) and outputs one shot's prompt, global caption and cut flag.",
            inputs=[
                *script_inputs(),
                io.Int.Input(
                    "shot_index",
                    default=0,
                    min=0,
                    max=9999,
                    tooltip="0-based shot number over the whole story.",
                ),
            ],
            outputs=[
                io.String.Output("prompt", display_name="prompt"),
                io.String.Output("global_caption", display_name="global_caption"),
                io.Boolean.Output("cut", display_name="cut"),
                io.String.Output("reconstruct_target", display_name="reconstruct_target"),
                io.Int.Output("shot_count", display_name="shot_count"),
                io.Int.Output("index_in_scene", display_name="index_in_scene"),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, path: str, text: str, shot_index: int) -> Any:
        """Re-run when the script file changes."""
        return (script_fingerprint(path, text), shot_index)

    @classmethod
    def execute(cls, path: str, text: str, shot_index: int) -> io.NodeOutput:
        """Parse and pick the shot."""
        story = read_story(path, text)
        n = len(story.shots)
        if not 0 <= int(shot_index) < n:
            raise ValueError(
                f"{NODE}: shot_index {shot_index} is out of range: the story '{story.name}' has {n} shots "
                f"(0..{n - 1})."
            )
        shot = story.shots[int(shot_index)]
        return io.NodeOutput(
            shot.prompt,
            shot.global_caption,
            bool(shot.cut),
            story.reconstruct_target or "",
            n,
            shot.index_in_scene,
        )


# -- Memento Render Story ----------------------------------------------------------------------------

RENDER_NODE = "Memento Render Story"

#: Render Story's first-shot widget -> memento_core.runner first_shot mode.
FIRST_SHOT_CHOICES: dict[str, str] = {
    "empty memory": "empty",
    "reference images": "references",
    "t2v": "t2v",
}
IF_EXISTS_CHOICES = ("resume", "overwrite", "stop")
T2V_NONE = "None"
#: Render Story's policy widget: the backbone's family, or a policy by name.
FAMILY_POLICY = "backbone family"
#: Render Story's sampler_settings widget -> whether shift / boundary / cfg / cut_cfg are used.
SETTINGS_CHOICES = {"policy defaults": False, "widgets": True}


def run_folder(folder: str) -> Path:
    """``folder`` (relative to ComfyUI's output folder) as an absolute path inside it, or a ValueError."""
    root = Path(folder_paths.get_output_directory()).resolve()
    text = check_text_path((folder or "").strip().strip('"'), "output_folder", RENDER_NODE)
    if not text or os.path.isabs(text):
        raise ValueError(
            f"{RENDER_NODE}: 'output_folder' must be a folder name relative to ComfyUI's output folder "
            f"(e.g. memento/my_story), got {folder!r}."
        )
    path = (root / text).resolve()
    if path == root or not path.is_relative_to(root):
        raise ValueError(f"{RENDER_NODE}: 'output_folder' {folder!r} points outside ComfyUI's output folder.")
    return path


class ComfyStoryProgress(Progress):
    """The runner's console progress plus ComfyUI's progress bar (one tick per sampling step over the
    whole story) and ComfyUI's interrupt, checked when a shot starts and after every step."""

    def __init__(self, total_shots: int, steps: int) -> None:
        super().__init__(total_shots)
        self.steps = steps
        self.bar = StepProgress(total_shots * steps)
        self.offset = 0

    def shot(self, shot: StoryShot, mode: str) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.offset = shot.number * self.steps
        self.bar.update(self.offset)
        super().shot(shot, mode)

    def step(self, info: StepInfo) -> None:
        super().step(info)
        self.bar.update(self.offset + info.step + 1)
        comfy.model_management.throw_exception_if_processing_interrupted()


def _write_references(images: torch.Tensor, folder: Path) -> tuple[str, ...]:
    """IMAGE [N, H, W, 3] -> PNG files ``folder/ref_NN_<sha256 prefix>.png`` (the runner fits them to the
    shot size). Named by content, so other references never overwrite the files of an earlier run."""
    check_image(images, "reference_images", RENDER_NODE, frame_size=False)  # fitted to the shot size
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        buffer = io_bytes.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        data = buffer.getvalue()
        path = folder / f"ref_{i + 1:02d}_{hashlib.sha256(data).hexdigest()[:10]}.png"
        if not path.exists():
            tmp = path.with_name(path.name + ".part")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        paths.append(str(path))
    return tuple(paths)


def _t2v_loader(loaded: LoadedBackbone, high: str, low: str) -> Callable[[], tuple[WanDiT, WanDiT]] | None:
    """Loads the Wan2.2 T2V experts (``diffusion_models``) for shot 1 in the backbone's dtype, after
    ComfyUI has unloaded its models; they wait on the CPU and run one at a time (the runner swaps them)."""
    if high == T2V_NONE and low == T2V_NONE:
        return None
    if T2V_NONE in (high, low):
        raise ValueError(f"{RENDER_NODE}: pick both t2v_high and t2v_low, or neither.")
    paths = [
        find_model_file(("diffusion_models",), name, "T2V", widget, RENDER_NODE)
        for name, widget in ((high, "t2v_high"), (low, "t2v_low"))
    ]
    dit = loaded.backbone.high
    fp8 = is_fp8(dit)
    dtype = torch.bfloat16 if fp8 else dit.weight_dtype

    def load() -> tuple[WanDiT, WanDiT]:
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
        with node_errors(RENDER_NODE):
            return load_t2v_experts(paths[0], paths[1], dtype, "cpu", fp8=fp8)

    return load


class MementoRenderStory(io.ComfyNode):
    """Render a whole story script shot by shot with memory (memento_core's story runner), inside ComfyUI."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        """Models from ComfyUI's loaders, the script, the run's folder, settings; optional references."""
        t2v_files = [T2V_NONE, *folder_paths.get_filename_list("diffusion_models")]
        return io.Schema(
            node_id="MementoRenderStory",
            display_name="Memento Render Story",
            category=CATEGORY,
            description="Renders every shot of a story script with memory, as `python -m "
            "memento_core.story` does, using ComfyUI's loaders. Resumable: interrupted renders continue "
            "after the last finished shot.",
            is_output_node=True,
            inputs=[
                MementoBackboneSocket.Input("backbone"),
                io.Clip.Input("clip", tooltip="The umT5 'wan' text encoder (Load CLIP, type wan)."),
                io.Vae.Input("vae", tooltip="Wan 2.1 VAE."),
                *script_inputs(),
                io.String.Input(
                    "output_folder",
                    default="memento/story",
                    tooltip="Run folder inside ComfyUI's output folder: shots/, story.mp4, memory/, "
                    "identity/, memory_bank.safetensors, story_log.json.",
                ),
                io.Combo.Input(
                    "if_exists",
                    options=list(IF_EXISTS_CHOICES),
                    default="resume",
                    tooltip="The folder already holds a run: resume it after its last finished shot "
                    "(same script, settings and models only), start over, or stop.",
                ),
                io.Int.Input("width", default=832, min=16, max=4096, step=16),
                io.Int.Input("height", default=480, min=16, max=4096, step=16),
                io.Int.Input("frames", default=81, min=9, max=1025, step=4, tooltip="4n+1 pixel frames."),
                io.Int.Input("steps", default=40, min=1, max=1000),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    tooltip="Base seed; each shot uses seed + its index in its scene.",
                ),
                io.Float.Input("shift", default=5.0, min=0.01, max=100.0, step=0.1),
                io.Float.Input("boundary", default=0.9, min=0.0, max=1.0, step=0.005),
                io.Float.Input(
                    "cfg", default=3.5, min=0.0, max=30.0, step=0.1, tooltip="CFG of continuing shots."
                ),
                io.Float.Input(
                    "cut_cfg",
                    default=5.0,
                    min=0.0,
                    max=30.0,
                    step=0.1,
                    tooltip="CFG of hard cuts (Memento: 5.0).",
                ),
                io.Combo.Input("solver", options=list(SOLVERS), default="unipc"),
                io.Combo.Input(
                    "first_shot",
                    options=list(FIRST_SHOT_CHOICES),
                    default="empty memory",
                    tooltip="Shot 1: memory-to-video from an empty memory, from the reference images "
                    "(MR2V, pinned), or plain Wan2.2 T2V (pick the T2V experts).",
                ),
                io.Boolean.Input("identity", default=True, tooltip="Use the script's reconstruct_target."),
                io.Int.Input(
                    "max_shots", default=0, min=0, max=9999, tooltip="Render only the first N (0: all)."
                ),
                io.String.Input("negative", multiline=True, default=WAN_NEGATIVE_PROMPT),
                io.Combo.Input(
                    "continuation",
                    options=list(CONTINUATIONS),
                    default="mi2v",
                    optional=True,
                    tooltip="How 'cut: false' shots continue: from the last frame (mi2v, CFG cfg) or the "
                    "last 5 frames (mm2v, CFG cut_cfg, as Memento's --mm2v).",
                ),
                io.Combo.Input("t2v_high", options=t2v_files, default=T2V_NONE, optional=True),
                io.Combo.Input("t2v_low", options=t2v_files, default=T2V_NONE, optional=True),
                io.Image.Input(
                    "reference_images", optional=True, tooltip="For first_shot 'reference images'."
                ),
                io.Combo.Input(
                    "policy",
                    options=[FAMILY_POLICY, *RUNNER_POLICIES],
                    default=FAMILY_POLICY,
                    optional=True,
                    tooltip="Memory policy: the backbone's family (Memento files: memento; StoryMem files: "
                    "storymem), or "
                    + "; ".join(f"{name}: {get_policy(name).summary}" for name in RUNNER_POLICIES),
                ),
                io.Combo.Input(
                    "sampler_settings",
                    options=list(SETTINGS_CHOICES),
                    default="policy defaults",
                    optional=True,
                    tooltip="policy defaults: the policy's shift, boundary and CFG (Memento 5.0 / 0.9 / "
                    "3.5, 5.0 on cuts; StoryMem 4.0 / 0.9 / 3.5); widgets: shift, boundary, cfg and cut_cfg "
                    "above.",
                ),
                io.ClipVision.Input(
                    "clip_vision",
                    optional=True,
                    tooltip="Load CLIP Vision: image embeddings for the storymem policy's keyframes.",
                ),
                io.Int.Input(
                    "fix",
                    default=-1,
                    min=-1,
                    max=64,
                    optional=True,
                    tooltip="Keep the first N memory frames (Memento's --fix N, StoryMem's sink); -1: the "
                    "policy's default.",
                ),
                idt_back_mode_input(),
                io.Boolean.Input(
                    "storymem_mode",
                    default=False,
                    optional=True,
                    tooltip="Memento's --storymem_mode: memory positions 20 latent frames apart.",
                ),
                noise_input(),
                memory_noise_input(),
                kfq_precision_input(),
            ],
            outputs=[
                io.Video.Output("story", display_name="story"),
                MemoryBankSocket.Output("memory_bank", display_name="memory_bank"),
                io.String.Output("folder", display_name="folder"),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, path: str = "", text: str = "", **_: Any) -> Any:
        """Re-run when the script file changes (other inputs are part of ComfyUI's cache key)."""
        return script_fingerprint(path, text)

    @classmethod
    def validate_inputs(cls, t2v_high: str | None = None, t2v_low: str | None = None) -> bool:
        """The chosen T2V files exist (checked when the prompt is queued, one readable error naming the
        folder instead of ComfyUI 0.33's "Value not in list"; see backbone_nodes.check_model_files)."""
        return check_model_files(
            RENDER_NODE,
            [
                (("diffusion_models",), t2v_high, "T2V", "t2v_high"),
                (("diffusion_models",), t2v_low, "T2V", "t2v_low"),
            ],
        )

    @classmethod
    def execute(
        cls,
        backbone: Any,
        clip: Any,
        vae: Any,
        path: str,
        text: str,
        output_folder: str,
        if_exists: str,
        width: int,
        height: int,
        frames: int,
        steps: int,
        seed: int,
        shift: float,
        boundary: float,
        cfg: float,
        cut_cfg: float,
        solver: str,
        first_shot: str,
        identity: bool,
        max_shots: int,
        negative: str,
        continuation: str = "mi2v",
        t2v_high: str = T2V_NONE,
        t2v_low: str = T2V_NONE,
        reference_images: torch.Tensor | None = None,
        policy: str = FAMILY_POLICY,
        sampler_settings: str = "policy defaults",
        clip_vision: Any = None,
        fix: int = -1,
        idt_back_mode: bool = False,
        storymem_mode: bool = False,
        noise: str = "cpu",
        memory_noise: str = "released",
        kfq_precision: str = "auto",
    ) -> io.NodeOutput:
        """Check inputs, build the runner's models from ComfyUI's, render (resumable)."""
        node = RENDER_NODE
        loaded = require_backbone(backbone, node)
        story = read_story(path, text)
        out = run_folder(output_folder)
        if if_exists not in IF_EXISTS_CHOICES:
            raise ValueError(f"{node}: if_exists '{if_exists}' is not one of {', '.join(IF_EXISTS_CHOICES)}.")
        if first_shot not in FIRST_SHOT_CHOICES:
            raise ValueError(
                f"{node}: first_shot '{first_shot}' is not one of {', '.join(FIRST_SHOT_CHOICES)}."
            )
        mode = FIRST_SHOT_CHOICES[first_shot]
        if policy not in (FAMILY_POLICY, *RUNNER_POLICIES):
            raise ValueError(
                f"{node}: policy '{policy}' is not one of {', '.join((FAMILY_POLICY, *RUNNER_POLICIES))}."
            )
        if sampler_settings not in SETTINGS_CHOICES:
            raise ValueError(
                f"{node}: sampler_settings '{sampler_settings}' is not one of {', '.join(SETTINGS_CHOICES)}."
            )
        widgets = SETTINGS_CHOICES[sampler_settings]
        load_t2v = _t2v_loader(loaded, t2v_high, t2v_low)
        if mode == "t2v" and load_t2v is None:
            raise ValueError(
                f"{node}: first_shot 't2v' needs the Wan2.2 T2V experts: pick t2v_high and t2v_low."
            )
        references: tuple[str, ...] = ()
        if mode == "references":
            if reference_images is None:
                raise ValueError(f"{node}: first_shot 'reference images' needs the 'reference_images' input.")
            references = _write_references(reference_images, out / "references")
        text_encoder = ComfyTextEncoder(clip, node)
        check_text_width(text_encoder.encode(""), loaded.text_dim, "clip", node)
        settings = RunSettings(
            width=int(width),
            height=int(height),
            frames=int(frames),
            steps=int(steps),
            seed=int(seed),
            policy=None if policy == FAMILY_POLICY else policy,
            shift=float(shift) if widgets else None,
            boundary=float(boundary) if widgets else None,
            guidance=float(cfg) if widgets else None,
            cut_guidance=float(cut_cfg) if widgets else None,
            solver=solver,
            first_shot=mode,
            continuation=continuation,
            references=references,
            identity=bool(identity),
            max_shots=int(max_shots) or None,
            negative=negative,
            fix=int(fix) if int(fix) >= 0 else None,
            identity_back=bool(idt_back_mode),
            storymem_mode=bool(storymem_mode),
            noise=noise,
            memory_noise=memory_noise,
            kfq_precision=kfq_precision,
        )
        models = ModelSet(
            kind="comfyui",
            description={
                "kind": "comfyui",
                "backbone": loaded.facts,
                "t2v": [t2v_high, t2v_low] if load_t2v else None,
                "text_encoder": type(getattr(clip, "cond_stage_model", clip)).__name__,
                "vae": type(getattr(vae, "first_stage_model", vae)).__name__,
                "clip_vision": None
                if clip_vision is None
                else type(getattr(clip_vision, "model", clip_vision)).__name__,
            },
            vae=ComfyVideoVAE(vae, node),
            text_encoder=text_encoder,
            load_backbone=lambda: loaded.backbone,
            load_t2v=load_t2v,
            device=str(compute_device()),
            swap_experts=True,  # the T2V experts; the backbone is placed by `placement`
            placement=lambda _backbone: experts_on_device(loaded),
            family=loaded.backbone.family,
            load_embedder=None if clip_vision is None else (lambda: ComfyImageEmbedder(clip_vision, node)),
        )
        shots = min(len(story.shots), settings.max_shots or len(story.shots))
        progress = ComfyStoryProgress(shots, settings.steps)
        for warning in story.warnings:
            progress.message(f"warning: {warning}")
        try:
            log = render_story(
                story,
                models,
                settings,
                out,
                resume=if_exists == "resume",
                overwrite=if_exists == "overwrite",
                progress=progress,
            )
        except RunFolderError as exc:
            if exc.differs:
                what = f"holds a render of other inputs ({', '.join(exc.differs)})"
            elif if_exists == "stop":
                what = "already holds a render"
            else:  # the runner's reason (no state to resume from, damaged state, another render running)
                what = f"cannot be resumed: {str(exc).split('; ')[0]}"
            raise ValueError(
                f"{node}: the output folder {out} {what}. Set if_exists to 'overwrite' to start over there, "
                "or pick another output_folder."
            ) from exc
        except MementoError as exc:
            raise ValueError(f"{node}: {exc}") from exc
        with node_errors(node):
            bank = load_bank(out / "memory_bank.safetensors")
        modes = ", ".join(f"{e['label']} {e['mode']}" for e in log["shots"])
        summary = f"{out}\n{story.name}: {shots} shots ({modes})\n{out / 'story.mp4'}"
        return io.NodeOutput(
            InputImpl.VideoFromFile(str(out / "story.mp4")), bank, str(out), ui=ui.PreviewText(summary)
        )


NODES: list[type[io.ComfyNode]] = [MementoLoadStoryScript, MementoRenderStory]
