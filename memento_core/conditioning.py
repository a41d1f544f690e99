"""Building one memory-to-video shot: the conditioning ``y``, the frame positions and the segments.

Latent layout along time (SPEC 4.1): ``[identity (0|1) | memory (M) | target (21)]``.
Conditioning ``y`` = 4 mask channels + 16 condition-latent channels, per slot (SPEC 4.2):

============  ==========================================  ==========================================
slot          mask (all 4 channels)                       condition latent
============  ==========================================  ==========================================
identity      0                                           VAE encode of one mid-gray frame
memory        1                                           the clean memory latent
target        1 on latent 0 (MI2V) or 0 and 1 (MM2V),     VAE encode of [first frame(s), zeros] when
              else 0 (hard cut)                           continuing, else of 81 zero frames
============  ==========================================  ==========================================

The pixel-space clips to encode are built here too (``condition_clip``, ``identity_image``); the VAE
itself stays behind the adapters' protocol.

Memento's ``--idt_back_mode`` (``identity_back=True``) puts the identity slot after the memory:
latents ``[memory | identity | target]``, while the released code's mask stays ``[memory | target |
identity]`` (its identity mask is appended at the end, so mask and latents are offset by one frame over
the identity and target slots); the DiT still treats the FIRST frame's tokens as the identity segment.
All reproduced as released.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .errors import ShapeError

__all__ = [
    "MOTION_FRAMES",
    "ShotCondition",
    "ShotMode",
    "build_shot",
    "check_frame_size",
    "condition_clip",
    "continuation_frames",
    "identity_image",
    "latent_frames",
    "target_mask",
]

ShotMode = Literal["cut", "mi2v", "mm2v"]
PositionScheme = Literal["memento", "storymem", "sequential"]
#: StoryMem's MM2V continues from this many motion frames (latent frames 0 and 1).
MOTION_FRAMES = 5
_MODES = ("cut", "mi2v", "mm2v")


#: Frames (pixels) of a shot are multiples of this in width and height: the VAE's 8 x the DiT's patch 2.
SIZE_MULTIPLE = 16


def check_frame_size(width: int, height: int, what: str = "size") -> None:
    """The one size rule for every frame that becomes a latent (shots, references, remembered frames):
    positive multiples of 16 in both directions (a ShapeError naming ``what`` otherwise)."""
    if width <= 0 or height <= 0 or width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        raise ShapeError(
            f"{what}: width and height must be positive multiples of {SIZE_MULTIPLE}, got {width}x{height} "
            f"(resize to e.g. {max(SIZE_MULTIPLE, round(width / SIZE_MULTIPLE) * SIZE_MULTIPLE)}x"
            f"{max(SIZE_MULTIPLE, round(height / SIZE_MULTIPLE) * SIZE_MULTIPLE)})"
        )


def latent_frames(pixel_frames: int) -> int:
    """Latent frames of a ``4n+1``-frame clip under the Wan VAE (81 -> 21). Rejects other counts."""
    if pixel_frames < 1 or (pixel_frames - 1) % 4:
        raise ShapeError(f"frames: expected a count of the form 4n+1 (e.g. 81), got {pixel_frames}")
    return 1 + (pixel_frames - 1) // 4


def continuation_frames(mode: ShotMode) -> int:
    """Pixel frames a continuing shot takes from the previous one: 1 (mi2v) or 5 (mm2v); 0 for a cut."""
    if mode not in _MODES:
        raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
    return {"cut": 0, "mi2v": 1, "mm2v": MOTION_FRAMES}[mode]


def target_mask(n_target: int, mode: ShotMode) -> Tensor:
    """Mask of the target slot, [4, n_target] float32: 1 on latents given by the condition clip."""
    if mode not in _MODES:
        raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
    mask = torch.zeros(4, n_target)
    given = {"cut": 0, "mi2v": 1, "mm2v": 2}[mode]
    mask[:, : min(given, n_target)] = 1.0
    return mask


def condition_clip(mode: ShotMode, frames: Tensor | None, n_frames: int, height: int, width: int) -> Tensor:
    """The pixel clip whose VAE encoding is the target's condition latent, [3, n_frames, H, W] in [-1, 1].

    cut: all zeros; mi2v: ``frames`` [3, 1, H, W] (the previous shot's last frame) then zeros;
    mm2v: ``frames`` [3, 5, H, W] (its last five frames) then zeros.
    """
    latent_frames(n_frames)
    clip = torch.zeros(3, n_frames, height, width)
    if mode == "cut":
        return clip
    need = continuation_frames(mode)
    if frames is None or frames.ndim != 4 or frames.shape[0] != 3 or frames.shape[1] != need:
        got = None if frames is None else list(frames.shape)
        raise ShapeError(f"{mode}: expected {need} frame(s) [3, {need}, {height}, {width}], got {got}")
    if tuple(frames.shape[2:]) != (height, width):
        raise ShapeError(
            f"{mode}: the continuation frame is {tuple(frames.shape[2:])} but the shot is {(height, width)}"
        )
    clip[:, :need] = frames.float()
    return clip


def identity_image(height: int, width: int) -> Tensor:
    """One mid-gray frame (0 in [-1, 1]), [3, 1, H, W]: encoded, it conditions the identity slot."""
    return torch.zeros(3, 1, height, width)


@dataclass(frozen=True)
class ShotCondition:
    """Everything one expert needs for a shot, besides noise and text.

    y: [20, F, h, w] (mask + condition latent); frame_pos: LongTensor [F]; memory: clean memory latents
    [16, M, h, w] (re-noised into x every step by Memento); F = n_identity + n_memory + n_target;
    identity_back: the layout is ``[memory | identity | target]`` (Memento's ``--idt_back_mode``).
    """

    y: Tensor
    frame_pos: Tensor
    memory: Tensor
    n_identity: int
    n_memory: int
    n_target: int
    identity_back: bool = False

    @property
    def frames(self) -> int:
        return self.n_identity + self.n_memory + self.n_target

    @property
    def memory_slice(self) -> slice:
        start = 0 if self.identity_back else self.n_identity
        return slice(start, start + self.n_memory)

    @property
    def identity_slice(self) -> slice:
        start = self.n_memory if self.identity_back else 0
        return slice(start, start + self.n_identity)

    @property
    def target_slice(self) -> slice:
        return slice(self.n_identity + self.n_memory, self.frames)


def build_shot(
    memory: Tensor,
    frame_pos: Tensor,
    target_condition: Tensor,
    mode: ShotMode,
    identity_condition: Tensor | None = None,
    identity_back: bool = False,
) -> ShotCondition:
    """Assemble ``y`` for ``[identity | memory | target]`` (``identity_back``: ``[memory | identity |
    target]`` with the released mask ``[memory | target | identity]``, see the module docstring).

    memory: [16, M, h, w] clean memory latents (M may be 0); frame_pos: LongTensor
    [n_identity + M + n_target] from ``memory.frame_positions``; target_condition: [16, T, h, w] the
    encoded ``condition_clip``; identity_condition: [16, 1, h, w] the encoded ``identity_image`` or
    None for no identity slot.
    """
    if target_condition.ndim != 4 or target_condition.shape[0] != 16:
        raise ShapeError(f"target condition: expected [16, T, h, w], got {list(target_condition.shape)}")
    size = tuple(target_condition.shape[2:])
    if memory.ndim != 4 or memory.shape[0] != 16:
        raise ShapeError(f"memory: expected [16, M, h, w] latents, got {list(memory.shape)}")
    if memory.shape[1] and tuple(memory.shape[2:]) != size:
        raise ShapeError(
            f"memory latents are {tuple(memory.shape[2:])} but the shot's latents are {size}: the memory "
            "bank was made at another resolution"
        )
    n_id = 0 if identity_condition is None else 1
    if identity_condition is not None and tuple(identity_condition.shape) != (16, 1, *size):
        raise ShapeError(f"identity condition: expected [16, 1, {size[0]}, {size[1]}]")
    n_mem, n_target = memory.shape[1], target_condition.shape[1]
    total = n_id + n_mem + n_target
    if frame_pos.shape != (total,):
        raise ShapeError(f"frame_pos: expected {total} positions, got {list(frame_pos.shape)}")

    masks, latents = [], []
    if identity_condition is not None and not identity_back:
        masks.append(torch.zeros(4, 1))
        latents.append(identity_condition.float())
    masks.append(torch.ones(4, n_mem))
    latents.append(memory.float())
    if identity_condition is not None and identity_back:
        latents.append(identity_condition.float())
    masks.append(target_mask(n_target, mode))
    latents.append(target_condition.float())
    if identity_condition is not None and identity_back:
        masks.append(torch.zeros(4, 1))
    device = target_condition.device
    mask = torch.cat(masks, 1).to(device)[:, :, None, None].expand(4, total, *size)
    y = torch.cat([mask, torch.cat([t.to(device) for t in latents], 1)], 0)
    return ShotCondition(
        y=y,
        frame_pos=frame_pos.long(),
        memory=memory.float(),
        n_identity=n_id,
        n_memory=n_mem,
        n_target=n_target,
        identity_back=identity_back and n_id > 0,
    )
