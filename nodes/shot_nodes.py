"""The two halves of a Memento shot as nodes: Keyframe Query Retrieve (choose the memory) and Memento
Generate Shot (sample the shot), so artists can inspect and swap memory between them.

Keyframe Query Retrieve: the bank's memory policy chooses the shot's memory. Memento: each expert's
KeyframeQuery picks 6 local + 2 global frames of its pool given THIS shot's prompt and global caption
(umT5-encoded with the connected CLIP, then the expert's own text embedding), when the pool holds more
than its capacity; otherwise the pool is kept as it is (shot 2 keeps shot 1's 8 frames). StoryMem: the
whole bank as it stands (sink + most recent). Outputs the MEMORY_SELECTION (for Generate Shot and
Update Memory), the selected bank, and a contact sheet of the chosen frames (local / global /
reference marked).
An empty global caption means the SPEC 4.7 rule (the text between "global caption:" and "shot
caption:", else the whole prompt), as memento_core's ``render_shot`` does.

Memento Generate Shot: positive / negative come as CONDITIONING from CLIP Text Encode (umT5 "wan");
the identity slot's texts (the reconstruct caption, and "" for its unconditional pass, SPEC 4.4) are
encoded with the CLIP input. The memory frames' latents are used as stored (never decoded). Mode:
"mi2v" (continue from a frame) when ``first_frame`` is connected (its LAST image is used, so the
previous shot's whole decoded video can be wired in) and ``cut`` is false, else "cut" (M2V); with
``continue_with`` "last 5 frames (MM2V)" its last 5 images are the motion frames ("mm2v"). ``cut``
takes Load Story Script's cut flag, so one graph follows the script; on a cut, ``cut_cfg_boost`` is
added to both CFGs (Memento's runner: 3.5 + 1.5 = 5.0 on a hard cut; StoryMem adds nothing).
``position_scheme`` "policy" (default) takes the bank policy's positions (Memento: time-aware negative
RoPE + identity slot; StoryMem: sequential); whether the memory slots are re-noised every step is the
policy's (Memento yes, StoryMem no). Output LATENT: the target latents
in ComfyUI's raw convention (like KSampler; connect VAE Decode), and the identity slot decoded (a
gray frame without identity slot). The seed is ``ShotSettings.seed`` (noise from a CPU generator: the
same on every device); Memento's story runner uses ``seed + shot index within the scene``.
One ComfyUI progress step per sampling step; ComfyUI's interrupt is checked before every step and
stops the node with ComfyUI's own InterruptProcessingException (no bank is produced or changed).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import comfy.model_management
import torch
from comfy_api.latest import io

from ..memento_core.conditioning import continuation_frames
from ..memento_core.keyframe_query import split_global_caption
from ..memento_core.m2v import KFQ_PRECISIONS, ShotRequest, generate_shot, select_memory, uses_identity
from ..memento_core.memory import SCHEMES
from ..memento_core.memory.memento_policy import STORYMEM_MODE_SPACING
from ..memento_core.memory.positions import STORYMEM_SPACING
from ..memento_core.preview import camera_map, contact_sheet
from ..memento_core.sampling import SOLVERS, SamplingCancelled, StepInfo
from ..memento_core.shot import MEMORY_NOISE, NOISE_SOURCES, ShotSettings, ShotText
from .backbone_nodes import compute_device, experts_on_device, require_backbone
from .comfy_adapters import ComfyTextEncoder, ComfyVideoVAE, conditioning_tensor, raw_latent, video_to_image
from .errors import check_image, node_errors
from .memory_nodes import preview_decoder, selection_sheet_rows
from .progress import StepProgress
from .released_inputs import idt_back_mode_input, kfq_precision_input, memory_noise_input, noise_input
from .types import (
    CameraTrajectorySocket,
    MementoBackboneSocket,
    MemoryBankSocket,
    MemorySelection,
    MemorySelectionSocket,
    camera_targets,
    require_bank,
    require_camera,
    require_selection,
)

CATEGORY = "Memento"

MI2V_CHOICE = "last frame (MI2V)"
#: position_scheme value meaning "the memory policy's own scheme".
POLICY_SCHEME = "policy"
#: Memento's --storymem_mode: the storymem scheme at 20 latent frames apart.
STORYMEM_MODE_SCHEME = "storymem (20 apart, Memento's --storymem_mode)"
#: position_scheme widget -> (scheme, spacing) (None: the policy's).
SCHEME_CHOICES: dict[str, tuple[str, int] | None] = {
    POLICY_SCHEME: None,
    **{name: (name, STORYMEM_SPACING) for name in SCHEMES},
    STORYMEM_MODE_SCHEME: ("storymem", STORYMEM_MODE_SPACING),
}
#: Generate Shot's continue_with widget -> memento_core shot mode.
CONTINUE_WITH: dict[str, str] = {MI2V_CHOICE: "mi2v", "last 5 frames (MM2V)": "mm2v"}


def check_text_width(t: torch.Tensor, expected: int, name: str, node: str) -> None:
    if t.shape[-1] != expected:
        raise ValueError(
            f"{node}: the '{name}' text encoding is {t.shape[-1]} wide but the backbone expects {expected} "
            "(umT5-XXL). Load the text encoder with Load CLIP, type 'wan' (umt5_xxl)."
        )


class MementoKeyframeRetrieve(io.ComfyNode):
    """Choose a shot's memory with each expert's KeyframeQuery (Memento's dual query)."""

    NODE = "Keyframe Query Retrieve"

    @classmethod
    def define_schema(cls) -> io.Schema:
        """Backbone, bank, CLIP, prompt, global caption; optional VAE for the preview."""
        return io.Schema(
            node_id="MementoKeyframeRetrieve",
            display_name="Keyframe Query Retrieve",
            category=CATEGORY,
            description="Selects the memory frames of the next shot with the bank's policy (Memento: 6 "
            "local + 2 global per expert when a pool is over capacity; StoryMem: the whole bank) and "
            "previews them.",
            inputs=[
                MementoBackboneSocket.Input("backbone"),
                io.MultiType.Input("memory_bank", types=[MemoryBankSocket, MemorySelectionSocket]),
                io.Clip.Input("clip", tooltip="The umT5 'wan' text encoder (Load CLIP, type wan)."),
                io.String.Input("prompt", multiline=True, default="", tooltip="The shot's full prompt."),
                io.String.Input(
                    "global_caption",
                    multiline=True,
                    default="",
                    tooltip="Text for the global (identity) queries; empty: taken from the prompt's "
                    "'global caption: ...; shot caption:' part.",
                ),
                io.Vae.Input(
                    "vae", optional=True, tooltip="Decode the preview properly (else rough colours)."
                ),
                io.Int.Input(
                    "fix",
                    default=-1,
                    min=-1,
                    max=64,
                    optional=True,
                    tooltip="Keep the first N memory frames (Memento's --fix N: in the local quota; "
                    "StoryMem's sink); -1: the policy's default.",
                ),
                kfq_precision_input(),
                CameraTrajectorySocket.Input(
                    "camera",
                    optional=True,
                    tooltip="The shot's camera (Camera Trajectory): the camera policies (fov, memento+fov) "
                    "recall the frames whose view overlaps it.",
                ),
            ],
            outputs=[
                MemorySelectionSocket.Output("selection", display_name="selection"),
                MemoryBankSocket.Output("selected_bank", display_name="selected_bank"),
                io.Image.Output("preview", display_name="preview"),
                io.Image.Output("camera_map", display_name="camera_map"),
            ],
        )

    @classmethod
    def execute(
        cls,
        backbone: Any,
        memory_bank: Any,
        clip: Any,
        prompt: str,
        global_caption: str = "",
        vae: Any = None,
        fix: int = -1,
        kfq_precision: str = "auto",
        camera: Any = None,
    ) -> io.NodeOutput:
        """Select; the input bank is unchanged."""
        node = cls.NODE
        loaded = require_backbone(backbone, node)
        bank = require_bank(memory_bank, "memory_bank", node)
        if kfq_precision not in KFQ_PRECISIONS:
            raise ValueError(
                f"{node}: kfq_precision '{kfq_precision}' is not one of {', '.join(KFQ_PRECISIONS)}."
            )
        policy = bank.policy_object()
        if int(fix) >= 0 and policy.fix_option is not None:
            policy = replace(policy, **{policy.fix_option: int(fix)})
        if not (prompt or "").strip():
            raise ValueError(
                f"{node}: 'prompt' is empty; give the shot's prompt (the memory is chosen for it)."
            )
        glob = (global_caption or "").strip() or split_global_caption(prompt)
        targets = camera_targets(require_camera(camera, "camera", node))
        selected, selection = bank, None
        if bank.frames():
            text = ComfyTextEncoder(clip, node)
            prompt_t5, global_t5 = text.encode(prompt), text.encode(glob)
            check_text_width(prompt_t5, loaded.text_dim, "prompt", node)
            with node_errors(node), experts_on_device(loaded) as ensure:
                selected, selection = select_memory(
                    loaded.backbone, bank, prompt_t5, global_t5, policy=policy, before_pool=ensure,
                    kfq_precision=kfq_precision, targets=targets,
                )  # fmt: skip
        result = MemorySelection(selected, bank, selection, prompt, glob)
        sheet = contact_sheet(selection_sheet_rows(result, preview_decoder(vae, node)), tile_height=120)
        overlap = {} if selection is None else selection.pool("high").overlap
        cameras = camera_map(bank.frames(), targets or [], selected.frame_ids("high"), overlap)
        return io.NodeOutput(result, selected, sheet[None], cameras[None])


class MementoGenerateShot(io.ComfyNode):
    """Sample one memory-conditioned shot with both experts; outputs its LATENT (not decoded)."""

    NODE = "Memento Generate Shot"

    @classmethod
    def define_schema(cls) -> io.Schema:
        """Backbone, selection, texts, VAE, size, sampler settings, optional first frame."""
        return io.Schema(
            node_id="MementoGenerateShot",
            display_name="Memento Generate Shot",
            category=CATEGORY,
            description="Renders one shot conditioned on the selected memory (Memento M2V), with an "
            "optional identity slot (reconstruct caption) and continuation from a first frame.",
            inputs=[
                MementoBackboneSocket.Input("backbone"),
                MemorySelectionSocket.Input("selection", tooltip="From Keyframe Query Retrieve."),
                io.Clip.Input("clip", tooltip="umT5 'wan' text encoder, for the reconstruct caption."),
                io.Conditioning.Input("positive", tooltip="CLIP Text Encode of the shot prompt."),
                io.Conditioning.Input("negative", tooltip="CLIP Text Encode of the negative prompt."),
                io.Vae.Input("vae", tooltip="Wan 2.1 VAE."),
                io.String.Input(
                    "reconstruct",
                    multiline=True,
                    default="",
                    tooltip="Identity caption ('[Person A] description' lines); empty: no identity slot.",
                ),
                io.Int.Input("width", default=832, min=16, max=4096, step=16),
                io.Int.Input("height", default=480, min=16, max=4096, step=16),
                io.Int.Input("frames", default=81, min=1, max=1025, step=4, tooltip="4n+1 pixel frames."),
                io.Int.Input("steps", default=40, min=1, max=1000),
                io.Float.Input("shift", default=5.0, min=0.01, max=100.0, step=0.1),
                io.Float.Input("cfg_high", default=3.5, min=0.0, max=30.0, step=0.1),
                io.Float.Input("cfg_low", default=3.5, min=0.0, max=30.0, step=0.1),
                io.Float.Input(
                    "boundary",
                    default=0.9,
                    min=0.0,
                    max=1.0,
                    step=0.005,
                    tooltip="High-noise expert while t >= boundary*1000.",
                ),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True),
                io.Combo.Input(
                    "position_scheme",
                    options=list(SCHEME_CHOICES),
                    default=POLICY_SCHEME,
                    tooltip="policy: the memory policy's (memento: time-aware negative RoPE + identity "
                    "slot; storymem: sequential, as StoryMem's released model); memento; storymem: the "
                    "paper's fixed negative spacing; sequential: memory 0..M-1, target after it.",
                ),
                io.Combo.Input("solver", options=list(SOLVERS), default="unipc"),
                io.Boolean.Input(
                    "cut",
                    default=False,
                    optional=True,
                    tooltip="A hard cut: ignore first_frame and render from memory alone (M2V). Connect "
                    "Load Story Script's 'cut' so the script decides.",
                ),
                io.Float.Input(
                    "cut_cfg_boost",
                    default=0.0,
                    optional=True,
                    min=0.0,
                    max=30.0,
                    step=0.1,
                    tooltip="Added to cfg_high and cfg_low on a hard cut (no first frame used). Memento's "
                    "story runner uses 1.5 (CFG 3.5 -> 5.0 after a cut).",
                ),
                io.Combo.Input(
                    "continue_with",
                    options=list(CONTINUE_WITH),
                    default=MI2V_CHOICE,
                    optional=True,
                    tooltip="How first_frame continues the previous shot: its last image (MI2V) or its "
                    "last 5 images as motion frames (StoryMem's MM2V).",
                ),
                io.Image.Input(
                    "first_frame",
                    optional=True,
                    tooltip="Continue from this frame (its last image): MI2V, unless 'cut' is on. "
                    "Unconnected: a hard cut.",
                ),
                noise_input(),
                memory_noise_input(),
                idt_back_mode_input(),
            ],
            outputs=[
                io.Latent.Output("latent", display_name="latent"),
                io.Image.Output("identity", display_name="identity"),
            ],
        )

    @classmethod
    def execute(
        cls,
        backbone: Any,
        selection: Any,
        clip: Any,
        positive: Any,
        negative: Any,
        vae: Any,
        reconstruct: str,
        width: int,
        height: int,
        frames: int,
        steps: int,
        shift: float,
        cfg_high: float,
        cfg_low: float,
        boundary: float,
        seed: int,
        position_scheme: str,
        solver: str,
        cut: bool = False,
        cut_cfg_boost: float = 0.0,
        continue_with: str = MI2V_CHOICE,
        first_frame: torch.Tensor | None = None,
        noise: str = "cpu",
        memory_noise: str = "released",
        idt_back_mode: bool = False,
    ) -> io.NodeOutput:
        """Validate, build the texts, sample with progress and interruption; nothing is mutated."""
        node = cls.NODE
        loaded = require_backbone(backbone, node)
        sel = require_selection(selection, node)
        width, height, frames = int(width), int(height), int(frames)
        _check_settings(node, width, height, frames, position_scheme, solver)
        if noise not in NOISE_SOURCES or memory_noise not in MEMORY_NOISE:
            raise ValueError(
                f"{node}: noise must be one of {NOISE_SOURCES}, memory_noise one of {MEMORY_NOISE}."
            )
        with node_errors(node):
            sampler = sel.bank.policy_object().sampler
        request_sampler = sampler
        if (chosen := SCHEME_CHOICES[position_scheme]) is not None:
            request_sampler = replace(sampler, scheme=chosen[0], spacing=chosen[1])
        request_sampler = replace(request_sampler, identity_back=bool(idt_back_mode))
        res = sel.bank.resolution
        if res is not None and res != (height // 8, width // 8):
            raise ValueError(
                f"{node}: the memory bank holds frames of about {res[1] * 8}x{res[0] * 8} px but the shot is "
                f"{width}x{height}; render every shot of a story at one size (or start a new memory bank)."
            )
        adapter = ComfyVideoVAE(vae, node)
        if not cut_cfg_boost >= 0.0:
            raise ValueError(f"{node}: 'cut_cfg_boost' must be 0 or more, got {cut_cfg_boost}.")
        if continue_with not in CONTINUE_WITH:
            raise ValueError(
                f"{node}: continue_with '{continue_with}' is not one of {', '.join(CONTINUE_WITH)}."
            )
        continue_mode = CONTINUE_WITH[continue_with]
        need = continuation_frames(continue_mode)
        continuation = None
        if first_frame is not None and not cut:
            check_image(first_frame, "first_frame", node, frame_size=False)
            if tuple(first_frame.shape[1:3]) != (height, width):
                raise ValueError(
                    f"{node}: 'first_frame' is {first_frame.shape[2]}x{first_frame.shape[1]} but the shot is "
                    f"{width}x{height}; resize the frame or change width/height."
                )
            if first_frame.shape[0] < need:
                raise ValueError(
                    f"{node}: {continue_mode.upper()} continues from the last {need} frames, but "
                    f"'first_frame' has {first_frame.shape[0]}; connect the previous shot's decoded video."
                )
            continuation = (first_frame[-need:].detach().float().cpu() * 2 - 1).permute(3, 0, 1, 2)
        caption = (reconstruct or "").strip() or None
        boost = float(cut_cfg_boost) if continuation is None else 0.0
        request = ShotRequest(
            prompt="",
            width=width,
            height=height,
            frames=frames,
            mode=continue_mode if continuation is not None else "cut",
            reconstruct=caption,
            settings=ShotSettings(
                steps=int(steps),
                shift=float(shift),
                boundary=float(boundary),
                guidance_high=float(cfg_high) + boost,
                guidance_low=float(cfg_low) + boost,
                solver=solver,
                seed=int(seed),
                # The policy decides: Memento re-noises the memory slots every step; StoryMem leaves
                # them as noise (SPEC 5).
                renoise_memory=sampler.renoise_memory,
                memory_noise=memory_noise,
                noise=noise,
            ),
        ).with_sampler(request_sampler)
        pos = conditioning_tensor(positive, "positive", node)
        neg = conditioning_tensor(negative, "negative", node)
        check_text_width(pos, loaded.text_dim, "positive", node)
        check_text_width(neg, loaded.text_dim, "negative", node)
        identity_t5 = identity_neg = None
        if uses_identity(request):
            text = ComfyTextEncoder(clip, node)
            identity_t5, identity_neg = text.encode(caption or ""), text.encode("")
        shot_text = ShotText(prompt=pos, negative=neg, identity=identity_t5, identity_negative=identity_neg)

        progress = StepProgress(int(steps))

        def on_step(info: StepInfo) -> None:
            progress.update(info.step + 1, info.total)

        try:
            with node_errors(node), experts_on_device(loaded):
                shot = generate_shot(
                    loaded.backbone,
                    sel.bank,
                    request,
                    adapter,
                    shot_text,
                    continuation=continuation,
                    device=compute_device(),
                    callback=on_step,
                    cancel=comfy.model_management.processing_interrupted,
                )
        except SamplingCancelled as exc:
            comfy.model_management.throw_exception_if_processing_interrupted()
            raise comfy.model_management.InterruptProcessingException() from exc
        if shot.identity is not None:
            identity_image = video_to_image(adapter.decode(shot.identity))
        else:
            identity_image = torch.full((1, height, width, 3), 0.5)
        return io.NodeOutput({"samples": raw_latent(shot.latent)}, identity_image)


def _check_settings(node: str, width: int, height: int, frames: int, scheme: str, solver: str) -> None:
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise ValueError(f"{node}: width and height must be positive multiples of 16, got {width}x{height}.")
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"{node}: frames must be of the form 4n+1 (e.g. 81, 49, 17), got {frames}.")
    if scheme not in SCHEME_CHOICES:
        raise ValueError(f"{node}: position_scheme '{scheme}' is not one of {', '.join(SCHEME_CHOICES)}.")
    if solver not in SOLVERS:
        raise ValueError(f"{node}: solver '{solver}' is not one of {', '.join(SOLVERS)}.")


NODES: list[type[io.ComfyNode]] = [MementoKeyframeRetrieve, MementoGenerateShot]
