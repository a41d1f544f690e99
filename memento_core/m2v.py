"""One memory-to-video shot end to end: select memory, build the shot, sample, decode, update memory.

This composes the pieces (memory bank, KeyframeQuery, shot builder, shot sampler, VAE and text
encoder protocols) the way Memento renders a story, one call per shot. The story runner and the
ComfyUI nodes call it; it holds no state between shots: the memory bank goes in and a new one comes
out, so an interrupted shot leaves the caller's bank untouched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .adapters import TextEncoder, VideoVAE
from .conditioning import (
    MOTION_FRAMES,
    ShotMode,
    build_shot,
    condition_clip,
    identity_image,
    latent_frames,
)
from .dit import WanDiT
from .errors import ShapeError
from .keyframe_query import KeyframeQuery, split_global_caption
from .memory import MemoryBank, Selection, kfq_selector, memento_sample_indices, recency_selector
from .sampling import StepInfo
from .shot import ShotSettings, ShotText, sample_shot

__all__ = ["Backbone", "ShotRecord", "ShotRequest", "encode_frames", "render_shot"]

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


@dataclass(frozen=True)
class ShotRequest:
    """What to render. mode: "cut" (hard cut), "mi2v" (continue from the last frame), "mm2v" (from the
    last 5 frames). reconstruct: the identity caption (turns on the identity slot) or None."""

    prompt: str
    width: int = 832
    height: int = 480
    frames: int = 81
    mode: ShotMode = "cut"
    reconstruct: str | None = None
    negative: str = WAN_NEGATIVE_PROMPT
    scheme: str = "memento"
    settings: ShotSettings = field(default_factory=ShotSettings)


@dataclass(frozen=True)
class ShotRecord:
    """A rendered shot. latent: [16, T, h, w]; video: [3, F, H, W] in [-1, 1]; identity: [16, 1, h, w]
    or None; positions: per pool, the frame positions used; memory_ids: per pool, the frame ids used."""

    latent: Tensor
    video: Tensor
    identity: Tensor | None
    selection: Selection | None
    positions: dict[str, list[int]]
    memory_ids: dict[str, list[str]]
    seconds: dict[str, float]

    def log(self) -> dict[str, Any]:
        """JSON-ready summary (no tensors)."""
        return {
            "positions": self.positions,
            "memory_ids": self.memory_ids,
            "selection": None if self.selection is None else self.selection.to_dict(),
            "seconds": self.seconds,
        }


def encode_frames(vae: VideoVAE, video: Tensor, indices: list[int]) -> Tensor:
    """VAE-encode each chosen frame ALONE as a 1-frame clip (never as a video) -> [N, 16, h, w]."""
    return torch.stack([vae.encode(video[:, i : i + 1])[:, 0] for i in indices])


def _check_request(req: ShotRequest) -> int:
    n_target = latent_frames(req.frames)
    if req.width % 16 or req.height % 16 or req.width <= 0 or req.height <= 0:
        raise ShapeError(
            f"size: width and height must be positive multiples of 16, got {req.width}x{req.height}"
        )
    return n_target


def _continuation(req: ShotRequest, previous: Tensor | None) -> Tensor | None:
    if req.mode == "cut":
        return None
    if previous is None:
        raise ShapeError(f"mode {req.mode!r} continues the previous shot, but no previous shot was given")
    need = 1 if req.mode == "mi2v" else MOTION_FRAMES
    return previous[:, -need:]


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
) -> tuple[ShotRecord, MemoryBank]:
    """Render one shot with memory and return it with the updated bank (the input bank is unchanged).

    The bank's frames for the shot are selected first (KeyframeQuery per expert, given THIS shot's
    prompt), then the shot is sampled, decoded, and its 8 evenly spaced frames are re-encoded one by
    one into the bank (SPEC 4.6). previous_video: [3, F, H, W] of the previous shot, for mi2v/mm2v.
    """
    n_target = _check_request(request)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    device = device or next(backbone.high.parameters()).device

    prompt_t5 = text_encoder.encode(request.prompt)
    identity = request.reconstruct is not None and request.scheme == "memento"
    text = ShotText(
        prompt=prompt_t5,
        negative=text_encoder.encode(request.negative),
        identity=text_encoder.encode(request.reconstruct) if identity else None,
        identity_negative=text_encoder.encode("") if identity else None,
    )

    selection = None
    if len(bank.pool("high")) or len(bank.pool("low")):
        selectors = _selectors(backbone, prompt_t5, text_encoder.encode(split_global_caption(request.prompt)))
        bank_for_shot, selection = bank.select_for_shot(selectors)
    else:
        bank_for_shot = bank
    timings["select"] = time.perf_counter() - t0

    size = (request.height, request.width)
    clip = condition_clip(request.mode, _continuation(request, previous_video), request.frames, *size)
    target_condition = vae.encode(clip)
    identity_condition = vae.encode(identity_image(*size)) if identity else None
    conds, positions, memory_ids = {}, {}, {}
    for pool in ("high", "low"):
        frames = bank_for_shot.pool(pool)
        memory = bank_for_shot.latents(pool) if frames else torch.zeros(16, 0, *target_condition.shape[2:])
        pos = bank_for_shot.frame_positions(pool, request.scheme, n_target, identity)  # type: ignore[arg-type]
        conds[pool] = build_shot(memory, pos, target_condition, request.mode, identity_condition)
        positions[pool] = pos.tolist()
        memory_ids[pool] = bank_for_shot.frame_ids(pool)
    timings["condition"] = time.perf_counter() - t0 - timings["select"]

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
    timings["sample"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    video = vae.decode(result.target)
    indices = memento_sample_indices(last=video.shape[1] - 1)
    new_bank = bank_for_shot.with_shot(
        encode_frames(vae, video, indices),
        frame_indices=indices,
        prompt=request.prompt,
        shot_index=shot_index,
        frames_per_shot=video.shape[1],
    )
    timings["decode_update"] = time.perf_counter() - t2
    record = ShotRecord(
        latent=result.target,
        video=video,
        identity=result.identity,
        selection=selection,
        positions=positions,
        memory_ids=memory_ids,
        seconds=timings,
    )
    return record, new_bank


def _selectors(backbone: Backbone, prompt_t5: Tensor, global_t5: Tensor) -> dict[str, Any] | None:
    """Per-pool KFQ selectors using each expert's own text embedding; the most recent frames without KFQs."""
    if backbone.kfq_high is None or backbone.kfq_low is None:
        return {"high": recency_selector, "low": recency_selector}
    out = {}
    for pool, dit, kfq in (
        ("high", backbone.high, backbone.kfq_high),
        ("low", backbone.low, backbone.kfq_low),
    ):
        device = next(dit.parameters()).device
        with torch.no_grad():
            ctx = dit.embed_text(prompt_t5.to(device)).float()
            ctx_g = dit.embed_text(global_t5.to(device)).float()
        out[pool] = kfq_selector(kfq, ctx, ctx_g)
    return out
