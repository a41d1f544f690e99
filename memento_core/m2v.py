"""One memory-to-video shot end to end: select memory, build the shot, sample, decode, update memory.

This composes the pieces (memory bank, KeyframeQuery, shot builder, shot sampler, VAE and text
encoder protocols) the way Memento renders a story, one call per shot. The story runner and the
ComfyUI nodes call it; it holds no state between shots: the memory bank goes in and a new one comes
out, so an interrupted shot leaves the caller's bank untouched.

``render_shot`` is the composition of reusable steps, which the ComfyUI nodes call separately
(Keyframe Query Retrieve, Memento Generate Shot, Update Memory):
``encode_shot_text`` -> ``select_memory`` (KeyframeQuery per pool, on THIS shot's prompt) ->
``generate_shot`` (build y / positions, sample; nothing decoded) -> ``VideoVAE.decode`` ->
``remember_shot`` (the bank's memory policy adds the shot: Memento's 8 evenly spaced frames, StoryMem's
CLIP keyframes, each re-encoded one by one into the bank after selection).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .adapters import TextEncoder, VideoVAE, encode_frames
from .camera import CameraPath
from .conditioning import (
    ShotMode,
    build_shot,
    check_frame_size,
    condition_clip,
    continuation_frames,
    identity_image,
    latent_frames,
)
from .dit import WanDiT
from .errors import ShapeError
from .fov import CameraPose
from .fp8 import is_fp8
from .keyframe_query import KeyframeQuery, split_global_caption
from .memory import (
    FinishedShot,
    MemoryBank,
    MemoryPolicy,
    MemoryTools,
    Remembered,
    SamplerDefaults,
    Selection,
    SelectionInputs,
    frame_positions,
    kfq_selector,
    recency_selector,
)
from .memory.positions import PLACEHOLDER_OFFSET, STORYMEM_SPACING, memory_slot_positions
from .sampling import StepInfo
from .shot import ShotSettings, ShotText, sample_shot

__all__ = [
    "KFQ_PRECISIONS",
    "Backbone",
    "GeneratedShot",
    "ShotRecord",
    "ShotRequest",
    "encode_frames",
    "encode_shot_text",
    "generate_shot",
    "kfq_precision_for",
    "remember_shot",
    "render_shot",
    "select_memory",
    "uses_identity",
]

#: KeyframeQuery scoring precision: as the backbone computes ("auto"), or forced.
KFQ_PRECISIONS = ("auto", "fp32", "bf16")
#: Wan's default negative prompt (SPEC 4.5), used verbatim.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


@dataclass(frozen=True)
class Backbone:
    """The two I2V experts (LoRA merged) and their KeyframeQuery modules (None: no learned selection)."""

    high: WanDiT
    low: WanDiT
    kfq_high: KeyframeQuery | None = None
    kfq_low: KeyframeQuery | None = None

    @property
    def family(self) -> str:
        """Which released weights these are, and so the default memory policy: "memento" (LoRA +
        KeyframeQuery per expert) or "storymem" (LoRA only, no KeyframeQuery)."""
        return "memento" if self.kfq_high is not None and self.kfq_low is not None else "storymem"


@dataclass(frozen=True)
class ShotRequest:
    """What to render. mode: "cut" (hard cut), "mi2v" (continue from the last frame), "mm2v" (from the
    last 5 frames). reconstruct: the identity caption (turns on the identity slot) or None. scheme,
    spacing, identity_back: the memory positions and the identity slot's place
    (``memory.frame_positions``); empty_memory: "none" (an empty memory is no memory frame) or
    "zero_frame" (one zero latent frame at position -2, as Memento's --m2v_first_shot). A policy's
    ``SamplerDefaults`` give all four."""

    prompt: str
    width: int = 832
    height: int = 480
    frames: int = 81
    mode: ShotMode = "cut"
    reconstruct: str | None = None
    negative: str = WAN_NEGATIVE_PROMPT
    scheme: str = "memento"
    settings: ShotSettings = field(default_factory=ShotSettings)
    spacing: int = STORYMEM_SPACING
    identity_back: bool = False
    empty_memory: str = "none"

    def with_sampler(self, sampler: SamplerDefaults) -> ShotRequest:
        """This request with a policy's positions, identity placement and empty-memory rule."""
        return replace(
            self,
            scheme=sampler.scheme,
            spacing=sampler.spacing,
            identity_back=sampler.identity_back,
            empty_memory=sampler.empty_memory,
        )


@dataclass(frozen=True)
class ShotRecord:
    """A rendered shot. latent: [16, T, h, w]; video: [3, F, H, W] in [-1, 1]; identity: [16, 1, h, w]
    or None; positions: per pool, the frame positions used ([identity | memory | target] order);
    memory_positions: per pool, those of the memory frames only (one per memory id); memory_ids: per
    pool, the frame ids used; kept: the frames the memory policy keeps ([3, F', H, W]: saved as the
    shot; StoryMem drops the frames a continuation repeats); memory_log: the policy's update fields
    (StoryMem: keyframes, bank_ids)."""

    latent: Tensor
    video: Tensor
    identity: Tensor | None
    selection: Selection | None
    positions: dict[str, list[int]]
    memory_ids: dict[str, list[str]]
    seconds: dict[str, float]
    kept: Tensor | None = None
    memory_log: dict[str, Any] = field(default_factory=dict)
    placeholder: bool = False
    memory_positions: dict[str, list[int]] = field(default_factory=dict)

    def log(self) -> dict[str, Any]:
        """JSON-ready summary (no tensors): positions, memory ids, selection, the policy's update fields."""
        extra = {"memory_placeholder": "one zero latent frame (an empty memory)"} if self.placeholder else {}
        return {
            "positions": self.positions,
            "memory_ids": self.memory_ids,
            **extra,
            "selection": None if self.selection is None else self.selection.to_dict(),
            **self.memory_log,
            "seconds": self.seconds,
        }


def remember_shot(
    bank: MemoryBank,
    vae: VideoVAE,
    video: Tensor,
    prompt: str,
    shot_index: int | None = None,
    *,
    mode: str = "cut",
    policy: MemoryPolicy | None = None,
    tools: MemoryTools | None = None,
    camera: CameraPath | None = None,
) -> Remembered:
    """Add a finished shot to the memory with ``policy`` (default: the bank's own) -> :class:`Remembered`
    (the new bank, the frames kept as the shot, the policy's log fields); ``bank`` is unchanged.

    video: [3, F, H, W] every decoded frame; mode: how the shot was made ("cut", "mi2v", "mm2v", "t2v",
    ...); tools: the VAE (default ``vae``) and, for StoryMem, an image embedder; camera: the shot's camera
    path (remembered frames keep the pose of their frame). Memento encodes 8 evenly spaced frames one by
    one (SPEC 4.6); StoryMem its CLIP keyframes (SPEC 5).
    """
    policy = policy or bank.policy_object()
    tools = tools or MemoryTools(vae)
    return policy.remember(bank, FinishedShot(video, mode, prompt, shot_index, camera), tools)


def _check_request(req: ShotRequest) -> int:
    n_target = latent_frames(req.frames)
    check_frame_size(req.width, req.height)
    return n_target


def _continuation(req: ShotRequest, previous: Tensor | None) -> Tensor | None:
    if req.mode == "cut":
        return None
    if previous is None:
        raise ShapeError(f"mode {req.mode!r} continues the previous shot, but no previous shot was given")
    return previous[:, -continuation_frames(req.mode) :]


def uses_identity(request: ShotRequest) -> bool:
    """True when the shot has an identity slot: a reconstruct caption and a scheme with negative memory
    positions (memento, or storymem as Memento's --storymem_mode uses it)."""
    return request.reconstruct is not None and request.scheme != "sequential"


def encode_shot_text(request: ShotRequest, text_encoder: TextEncoder) -> ShotText:
    """Encode the prompt, the negative prompt and (identity slot only) the reconstruct caption and ""."""
    identity = uses_identity(request)
    return ShotText(
        prompt=text_encoder.encode(request.prompt),
        negative=text_encoder.encode(request.negative),
        identity=text_encoder.encode(request.reconstruct) if identity else None,  # type: ignore[arg-type]
        identity_negative=text_encoder.encode("") if identity else None,
    )


def select_memory(
    backbone: Backbone,
    bank: MemoryBank,
    prompt_t5: Tensor,
    global_t5: Tensor,
    *,
    policy: MemoryPolicy | None = None,
    before_pool: Callable[[str], None] | None = None,
    kfq_precision: str = "auto",
    targets: Sequence[CameraPose] | None = None,
) -> tuple[MemoryBank, Selection | None]:
    """Choose the memory of the next shot with ``policy`` (default: the bank's own) -> (bank for the
    shot, Selection or None for an empty bank).

    prompt_t5, global_t5: [1, L, text_dim] text-encoder outputs of the shot prompt and of its global
    caption (``split_global_caption``). Memento: each pool over capacity is selected by its own expert's
    KeyframeQuery (the most recent frames when the backbone has none); the input bank is unchanged.
    before_pool(pool) runs before a pool's expert is used (to bring that expert onto the device).
    """
    if not bank.frames():
        return bank, None
    policy = policy or bank.policy_object()
    selectors = _selectors(backbone, prompt_t5, global_t5, before_pool, kfq_precision)
    return policy.select(bank, SelectionInputs(selectors=selectors, targets=targets))


@dataclass(frozen=True)
class GeneratedShot:
    """A sampled (not decoded) shot. latent: [16, T, h, w] normalised target latents; identity:
    [16, 1, h, w] or None; positions / memory_ids: per pool, the frame positions and frame ids used;
    memory_positions: per pool, the memory frames' positions (``positions`` without identity and target);
    seconds: timings of the "condition" and "sample" phases; placeholder: the memory was empty and one
    zero latent frame stood in for it (``ShotRequest.empty_memory``)."""

    latent: Tensor
    identity: Tensor | None
    positions: dict[str, list[int]]
    memory_ids: dict[str, list[str]]
    seconds: dict[str, float]
    placeholder: bool = False
    memory_positions: dict[str, list[int]] = field(default_factory=dict)


def generate_shot(
    backbone: Backbone,
    bank_for_shot: MemoryBank,
    request: ShotRequest,
    vae: VideoVAE,
    text: ShotText,
    *,
    continuation: Tensor | None = None,
    device: torch.device | str | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> GeneratedShot:
    """Build and sample one shot on an already selected bank (``select_memory``); nothing is decoded.

    request: sizes, mode, scheme, settings and whether there is an identity slot (``request.prompt`` and
    ``request.negative`` are not read: ``text`` holds their encodings); continuation: [3, 1, H, W]
    (mi2v) or [3, 5, H, W] (mm2v) frames in [-1, 1] to continue from, None for a cut.
    Raises ``SamplingCancelled`` when ``cancel()`` turns true (nothing is returned or changed).
    """
    n_target = _check_request(request)
    t0 = time.perf_counter()
    device = device or next(backbone.high.parameters()).device
    identity = uses_identity(request)
    size = (request.height, request.width)
    clip = condition_clip(request.mode, continuation, request.frames, *size)
    target_condition = vae.encode(clip)
    identity_condition = vae.encode(identity_image(*size)) if identity else None
    conds, positions, memory_ids, memory_pos = {}, {}, {}, {}
    placeholder = False
    for pool in ("high", "low"):
        frames = bank_for_shot.pool(pool)
        abs_frames = bank_for_shot.abs_frames(pool)
        if frames:
            memory = bank_for_shot.latents(pool)
        elif request.empty_memory == "zero_frame":  # the released --m2v_first_shot: one zero latent
            memory = torch.zeros(16, 1, *target_condition.shape[2:])
            abs_frames = [bank_for_shot.current_time + PLACEHOLDER_OFFSET]
            placeholder = True
        else:
            memory = torch.zeros(16, 0, *target_condition.shape[2:])
        pos = frame_positions(
            request.scheme,  # type: ignore[arg-type]
            abs_frames,
            bank_for_shot.current_time,
            n_target,
            identity,
            request.spacing,
            request.identity_back,
        )
        conds[pool] = build_shot(
            memory, pos, target_condition, request.mode, identity_condition, request.identity_back
        )
        positions[pool] = pos.tolist()
        memory_ids[pool] = bank_for_shot.frame_ids(pool)
        memory_pos[pool] = memory_slot_positions(
            positions[pool], len(frames), identity, request.identity_back
        )
    t1 = time.perf_counter()
    result = sample_shot(
        backbone.high,
        backbone.low,
        conds["high"],
        conds["low"],
        text,
        request.settings,
        device=device,
        callback=callback,
        cancel=cancel,
    )
    seconds = {"condition": t1 - t0, "sample": time.perf_counter() - t1}
    return GeneratedShot(
        result.target, result.identity, positions, memory_ids, seconds, placeholder, memory_pos
    )


def render_shot(
    backbone: Backbone,
    bank: MemoryBank,
    request: ShotRequest,
    vae: VideoVAE,
    text_encoder: TextEncoder,
    *,
    previous_video: Tensor | None = None,
    shot_index: int | None = None,
    device: torch.device | str | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    before_pool: Callable[[str], None] | None = None,
    policy: MemoryPolicy | None = None,
    tools: MemoryTools | None = None,
    kfq_precision: str = "auto",
    camera: CameraPath | None = None,
) -> tuple[ShotRecord, MemoryBank]:
    """Render one shot with memory and return it with the updated bank (the input bank is unchanged).

    The bank's frames for the shot are selected first (KeyframeQuery per expert, given THIS shot's
    prompt), then the shot is sampled, decoded, and ``policy`` (default: the bank's own) adds it to the
    memory (Memento: its 8 evenly spaced frames re-encoded one by one, SPEC 4.6; StoryMem: its CLIP
    keyframes with ``tools.embedder``). previous_video: [3, F, H, W] of the previous shot, for mi2v/mm2v.
    before_pool(pool): see :func:`select_memory` (brings an expert onto the device before its selection).
    Composition: ``encode_shot_text`` -> ``select_memory`` -> ``generate_shot`` -> decode ->
    ``remember_shot``.
    """
    _check_request(request)
    t0 = time.perf_counter()
    text = encode_shot_text(request, text_encoder)
    bank_for_shot, selection = bank, None
    if bank.frames():
        global_t5 = text_encoder.encode(split_global_caption(request.prompt))
        bank_for_shot, selection = select_memory(
            backbone, bank, text.prompt, global_t5, policy=policy, before_pool=before_pool,
            kfq_precision=kfq_precision, targets=None if camera is None else camera.targets(request.frames),
        )  # fmt: skip
    timings: dict[str, float] = {"select": time.perf_counter() - t0}

    shot = generate_shot(
        backbone,
        bank_for_shot,
        request,
        vae,
        text,
        continuation=_continuation(request, previous_video),
        device=device,
        callback=callback,
        cancel=cancel,
    )
    timings.update(shot.seconds)

    t2 = time.perf_counter()
    video = vae.decode(shot.latent)
    remembered = remember_shot(
        bank_for_shot, vae, video, request.prompt, shot_index, mode=request.mode, policy=policy, tools=tools,
        camera=camera,
    )  # fmt: skip
    timings["decode_update"] = time.perf_counter() - t2
    record = ShotRecord(
        latent=shot.latent,
        video=video,
        identity=shot.identity,
        selection=selection,
        positions=shot.positions,
        memory_ids=shot.memory_ids,
        seconds=timings,
        kept=remembered.video,
        memory_log=remembered.log,
        placeholder=shot.placeholder,
        memory_positions=shot.memory_positions,
    )
    return record, remembered.bank


def kfq_precision_for(backbone: Backbone, setting: str = "auto") -> str:
    """The precision KeyframeQuery scores in: ``setting`` "fp32" or "bf16", or "auto": bf16 autocast when
    the backbone computes in bf16 (bf16 or fp8 weights: the released pipeline scores under its bf16
    autocast), fp32 when it computes in fp32 or fp16."""
    if setting not in KFQ_PRECISIONS:
        raise ShapeError(f"kfq_precision: expected one of {KFQ_PRECISIONS}, got {setting!r}")
    if setting != "auto":
        return setting
    bf16 = backbone.high.weight_dtype == torch.bfloat16 or is_fp8(backbone.high)
    return "bf16" if bf16 else "fp32"


def _selectors(
    backbone: Backbone,
    prompt_t5: Tensor,
    global_t5: Tensor,
    before_pool: Callable[[str], None] | None = None,
    kfq_precision: str = "auto",
) -> dict[str, Any]:
    """Per-pool KFQ selectors using each expert's own text embedding; the most recent frames without KFQs.

    The prompts are embedded when a pool actually needs a selection (on the expert's device then), and
    embedding and scoring run under bf16 autocast when ``kfq_precision_for`` says so."""
    if backbone.kfq_high is None or backbone.kfq_low is None:
        return {"high": recency_selector, "low": recency_selector}
    bf16 = kfq_precision_for(backbone, kfq_precision) == "bf16"

    def make(pool: str, dit: WanDiT, kfq: KeyframeQuery) -> Any:
        def select(frames: Any, current_time: int, *, k_local: int, k_global: int) -> Any:
            if before_pool is not None:
                before_pool(pool)
            device = dit.text_embedding[0].weight.device
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                ctx = dit.embed_text(prompt_t5.to(device)).float()
                ctx_g = dit.embed_text(global_t5.to(device)).float()
                pick = kfq_selector(kfq, ctx, ctx_g)
                return pick(frames, current_time, k_local=k_local, k_global=k_global)

        return select

    return {
        "high": make("high", backbone.high, backbone.kfq_high),
        "low": make("low", backbone.low, backbone.kfq_low),
    }
