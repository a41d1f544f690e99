"""What a memory policy is: the one object that owns how a system remembers.

A :class:`MemoryPolicy` holds a system's sampler defaults (:class:`SamplerDefaults`), how a shot's
memory is chosen from a bank (:meth:`~MemoryPolicy.select`), which frames of a finished shot are kept
and how they join the bank (:meth:`~MemoryPolicy.kept_frames`, :meth:`~MemoryPolicy.remember`), what
the bank retains after every addition (:meth:`~MemoryPolicy.retain`) and what it logs. The story
runner and the ComfyUI nodes hold a policy and call these; they never test a policy's name.

Policies: ``memento`` (:mod:`.memento_policy`), ``storymem`` (:mod:`.storymem_policy`), ``fov`` and
``manual`` (:mod:`.camera_policy`). A bank records its policy's name (:mod:`.registry` finds the class).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from torch import Tensor

from ..adapters import VideoVAE
from .bank import MemoryBank
from .positions import STORYMEM_SPACING, PositionScheme
from .selection import Selection, SelectionInputs

if TYPE_CHECKING:
    from ..camera import CameraPath
    from ..fov import CameraPose
    from ..keyframes import AestheticScorer

__all__ = [
    "FinishedShot",
    "ImageEmbedder",
    "MemoryPolicy",
    "MemoryTools",
    "Remembered",
    "SamplerDefaults",
    "SelectionInputs",
]

#: Shot modes without a first frame to continue from (the reference adds its cut boost to these).
_NO_FIRST_FRAME = ("cut", "mm2v", "empty", "references")


@dataclass(frozen=True)
class SamplerDefaults:
    """A policy's sampler settings.

    guidance: CFG of both experts on a shot continuing from the previous shot's last frame (MI2V);
    cut_guidance: on shots without a first frame (hard cuts, MM2V, a first shot from memory: the
    reference adds its cut boost whenever no first frame is given); t2v_*: shot 1 by Wan2.2-T2V;
    scheme: the temporal positions of the memory frames (spacing: of the "storymem" scheme);
    renoise_memory: re-noise the memory slots at every step (Memento) or leave them as noise (StoryMem);
    identity_slot: the subject-reconstruction slot is available (identity_back: placed after the
    memory, Memento's idt_back_mode); empty_memory: what a shot sees when the memory is empty: "none"
    (no memory frame) or "zero_frame" (one zero latent frame, mask 1, as Memento's --m2v_first_shot).
    """

    shift: float
    boundary: float
    guidance: float
    cut_guidance: float
    scheme: PositionScheme
    renoise_memory: bool
    identity_slot: bool
    t2v_shift: float = 12.0
    t2v_boundary: float = 0.875
    t2v_guidance: float = 3.5
    spacing: int = STORYMEM_SPACING
    identity_back: bool = False
    empty_memory: str = "none"

    def guidance_for(self, mode: str) -> float:
        """CFG of a shot of ``mode`` ("t2v", "mi2v", "mm2v", "cut", "empty", "references")."""
        if mode == "t2v":
            return self.t2v_guidance
        return self.cut_guidance if mode in _NO_FIRST_FRAME else self.guidance


class ImageEmbedder(Protocol):
    """Image embeddings for keyframe selection: frames [N, 3, H, W] in [0, 1] -> [N, D] float32, unit
    rows, on the CPU (``keyframes.ClipEmbedder``, ``adapters.TinyImageEmbedder``, ComfyUI's CLIP vision)."""

    def __call__(self, frames: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class MemoryTools:
    """The models a memory update may use: the VAE (memory frames are re-encoded one by one), an image
    embedder (StoryMem's CLIP keyframes) and an optional aesthetic scorer (StoryMem's HPSv3 filter)."""

    vae: VideoVAE
    embedder: ImageEmbedder | None = None
    scorer: AestheticScorer | None = None


@dataclass(frozen=True)
class FinishedShot:
    """A rendered shot for the memory update. video: [3, F, H, W] in [-1, 1], every decoded frame;
    mode: how it was made ("t2v", "cut", "mi2v", "mm2v", "empty", "references"); prompt: its prompt
    (the caption of its frames); shot_index: 1-based story shot number used in frame ids (None: next);
    camera: the shot's camera path (``camera.CameraPath``), so remembered frames keep their pose."""

    video: Tensor
    mode: str
    prompt: str = ""
    shot_index: int | None = None
    camera: CameraPath | None = None

    def cameras(self, kept: Tensor, indices: Sequence[int]) -> list[CameraPose] | None:
        """The camera pose of each remembered frame: ``indices`` into the ``kept`` frames (the policy may
        have dropped leading frames of ``video``), looked up along the shot's camera path."""
        if self.camera is None:
            return None
        dropped = self.video.shape[1] - kept.shape[1]
        return [self.camera.pose_at(dropped + int(i)) for i in indices]


@dataclass(frozen=True)
class Remembered:
    """The outcome of a memory update. bank: the new bank; video: the shot's frames as the policy keeps
    them ([3, F', H, W]: what is saved as the shot); log: the policy's fields for the run log."""

    bank: MemoryBank
    video: Tensor
    log: dict[str, Any]


@dataclass(frozen=True)
class MemoryPolicy(ABC):
    """A system's way of remembering (see the module docstring). Subclasses are frozen dataclasses whose
    fields are the policy's options; ``capacity`` is the memory of a shot (frames per pool)."""

    name: ClassVar[str]
    #: True when both experts share one pool (``bank.high is bank.low``).
    shared_pool: ClassVar[bool]
    #: True when :meth:`remember` needs ``MemoryTools.embedder``.
    needs_embedder: ClassVar[bool] = False
    #: A short description for menus and logs, and the place in menus (lowest first).
    summary: ClassVar[str] = ""
    menu_order: ClassVar[int] = 50
    #: The ``SelectionInputs`` fields :meth:`select` cannot do without ("targets": camera poses,
    #: "keep_ids": a list of frames); the story runner offers the policies that need none of these.
    requires: ClassVar[tuple[str, ...]] = ()
    #: The option that keeps the first N memory frames ("--fix N"): Memento's ``fix``, StoryMem's ``sink``.
    fix_option: ClassVar[str | None] = None

    capacity: int = 8

    @property
    @abstractmethod
    def sampler(self) -> SamplerDefaults:
        """The system's sampler settings."""

    def empty_bank(self) -> MemoryBank:
        """An empty bank of this policy at story time 0."""
        return MemoryBank.empty(self.name, self.capacity)

    def retain(self, bank: MemoryBank) -> MemoryBank:
        """What the bank keeps after frames were added (default: everything; selection evicts)."""
        return bank

    @abstractmethod
    def select(
        self, bank: MemoryBank, inputs: SelectionInputs = SelectionInputs()
    ) -> tuple[MemoryBank, Selection]:
        """Choose the memory of the NEXT shot -> (the bank the shot is conditioned on, the record)."""

    def kept_frames(self, video: Tensor, mode: str) -> Tensor:
        """The frames of a finished shot [3, F, H, W] that are kept (saved and remembered): all of them."""
        return video

    @abstractmethod
    def remember(self, bank: MemoryBank, shot: FinishedShot, tools: MemoryTools) -> Remembered:
        """Add a finished shot to ``bank`` (unchanged) -> the new bank, the kept frames, log fields."""

    def describe(self) -> dict[str, Any]:
        """JSON-ready name and options (for run logs and resume checks)."""
        return {"name": self.name, **asdict(self)}
