"""Memory frames: one remembered image as a single latent frame, and the constants of story time.

A memory frame is ONE latent frame ``[16, h, w]`` (each memory image is VAE-encoded alone as a 1-frame
clip, SPEC 4.1) that remembers ``abs_frame``, its pixel-frame index in story time (SPEC 4.3).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from ..errors import MementoError, ShapeError

if TYPE_CHECKING:
    from ..fov import CameraPose

__all__ = [
    "FRAMES_PER_SHOT",
    "LATENT_CHANNELS",
    "MAX_POSITION",
    "MIN_POSITION",
    "POOLS",
    "REFERENCE_SPACING",
    "SPATIAL_STRIDE",
    "TEMPORAL_STRIDE",
    "MemoryBankError",
    "MemoryFrame",
    "sort_frames",
    "stack_latents",
]

PoolName = Literal["high", "low"]
Source = Literal["shot", "reference"]

POOLS: tuple[str, ...] = ("high", "low")
SOURCES: tuple[str, ...] = ("shot", "reference")

LATENT_CHANNELS = 16
#: Pixel frames per shot (81 = 4·20 + 1 -> 21 latent frames).
FRAMES_PER_SHOT = 81
#: Temporal stride of the Wan VAE: pixel frames per latent frame.
TEMPORAL_STRIDE = 4
#: Spatial stride of the Wan VAE (pixels per latent cell), only used in messages.
SPATIAL_STRIDE = 8
#: RoPE time positions live in [-512, 511]; the identity frame sits at -512.
MIN_POSITION = -512
MAX_POSITION = 511
#: Pixel frames between two reference images added together (2 latent frames).
REFERENCE_SPACING = 8


class MemoryBankError(MementoError):
    """A memory bank was misused (unknown frame id, empty pool, bad selector) or a bank file is bad."""


@dataclass(frozen=True, eq=False)
class MemoryFrame:
    """One memory image: a single latent frame and its bookkeeping.

    latent: [16, h, w] float32 CPU (one VAE-encoded image); abs_frame: its pixel-frame index in story
    time; clip_embedding: [D] float32 CPU or None (StoryMem's CLIP ViT-B/32 image embedding); camera:
    a ``fov.CameraPose`` (x, z, yaw) or None. Frames compare by identity; treat ``latent`` as read-only.
    """

    frame_id: str
    latent: Tensor = field(repr=False)
    abs_frame: int
    source: Source = "shot"
    caption: str = ""
    pinned: bool = False
    shot: int | None = None
    camera: CameraPose | None = None
    clip_embedding: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.frame_id, str) or not self.frame_id:
            raise MemoryBankError(f"memory frame: frame_id must be a non-empty string, got {self.frame_id!r}")
        if not isinstance(self.abs_frame, int) or isinstance(self.abs_frame, bool):
            raise MemoryBankError(
                f"memory frame {self.frame_id}: abs_frame must be an int, got {self.abs_frame!r}"
            )
        if self.source not in SOURCES:
            raise MemoryBankError(f"memory frame {self.frame_id}: source must be one of {SOURCES}")
        check_latent(self.latent, f"memory frame {self.frame_id}")
        if self.clip_embedding is not None:
            emb = self.clip_embedding
            if (
                not isinstance(emb, Tensor)
                or emb.ndim != 1
                or emb.dtype != torch.float32
                or emb.device.type != "cpu"
            ):
                raise ShapeError(
                    f"memory frame {self.frame_id}: clip_embedding must be a float32 CPU [D] tensor"
                )
            if not bool(torch.isfinite(emb).all()):
                raise MemoryBankError(
                    f"memory frame {self.frame_id}: clip_embedding holds NaN or infinite values"
                )

    @property
    def size(self) -> tuple[int, int]:
        """(h, w) of the latent."""
        return (int(self.latent.shape[1]), int(self.latent.shape[2]))

    def with_pinned(self, pinned: bool) -> MemoryFrame:
        """A copy with ``pinned`` set (the latent is shared, not copied)."""
        return self if self.pinned == pinned else replace(self, pinned=pinned)

    def summary(self) -> dict[str, Any]:
        """JSON-able description (no tensors)."""
        return {
            "id": self.frame_id,
            "abs_frame": self.abs_frame,
            "source": self.source,
            "caption": self.caption,
            "pinned": self.pinned,
            "shot": self.shot,
            "camera": camera_tuple(self.camera),
            "has_clip": self.clip_embedding is not None,
        }


def check_latent(latent: object, what: str) -> None:
    """A stored latent must be a float32 CPU tensor [16, h, w] with finite values."""
    if not isinstance(latent, Tensor):
        raise ShapeError(f"{what}: latent must be a torch.Tensor [16, h, w], got {type(latent).__name__}")
    if latent.ndim != 3 or latent.shape[0] != LATENT_CHANNELS:
        raise ShapeError(f"{what}: expected one latent frame [16, h, w], got {list(latent.shape)}")
    if latent.dtype != torch.float32 or latent.device.type != "cpu":
        raise ShapeError(
            f"{what}: stored latents are float32 on the CPU, got {latent.dtype} on {latent.device}"
        )
    if not bool(torch.isfinite(latent).all()):
        raise MemoryBankError(
            f"{what}: the latent holds NaN or infinite values (a damaged bank or a failed encode)"
        )


def owned_latent(t: Tensor) -> Tensor:
    """A float32 CPU contiguous copy that shares no memory with ``t``."""
    return t.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()


def camera_tuple(camera: object | None) -> list[float] | None:
    if camera is None:
        return None
    fov = float(getattr(camera, "fov", 60.0))
    return [float(camera.x), float(camera.z), float(camera.yaw), fov]  # type: ignore[attr-defined]


def stack_latents(frames: Sequence[MemoryFrame]) -> Tensor:
    """Latents of ``frames`` in order -> [16, M, h, w] float32 (a new tensor, never a view)."""
    if not frames:
        raise MemoryBankError("stack_latents: no memory frames to stack")
    return torch.stack([f.latent for f in frames], dim=1)


def sort_frames(frames: Iterable[MemoryFrame]) -> tuple[MemoryFrame, ...]:
    """Frames ordered by ``abs_frame`` (stable: ties keep insertion order)."""
    return tuple(sorted(frames, key=lambda f: f.abs_frame))


def frame_ids(frames: Iterable[MemoryFrame]) -> tuple[str, ...]:
    """The ids of ``frames`` in order."""
    return tuple(f.frame_id for f in frames)
