"""The immutable ``MemoryBank``: the remembered frames of a story, in one pool per Wan2.2 expert.

Pools (SPEC 4.6, 5): a bank has a ``high`` and a ``low`` pool, one per expert. Policies whose two experts
share one pool (StoryMem, the camera policies) keep ``high is low``; Memento selects each pool with its
own expert's KeyframeQuery, so its pools may diverge. ``bank.pool("high")`` works in every policy. The
``archive`` holds frames outside the pools that a policy still keeps (StoryMem's evicted keyframes, whose
embeddings its duplicate check reads; camera retrieval candidates).

The bank is policy-agnostic: it records its policy's name and asks that policy (``.registry``) what to
retain after an addition and how to select (``select_for_shot``). Life of a Memento bank::

    bank = MemoryBank.empty("memento")                      # current_time 0
    bank = bank.with_shot(latents_8, prompt=p1, shot_index=1)  # abs 0..80, current_time 81
    bank, sel = bank.select_for_shot({"high": sel_h, "low": sel_l})  # 8 <= capacity: kept as is
    bank = bank.with_shot(latents_8, prompt=p2, shot_index=2)  # 16 candidates, current_time 162
    bank, sel = bank.select_for_shot({"high": sel_h, "low": sel_l})  # KFQ: 16 -> 6 local + 2 global

Immutability: every update returns a new bank and never touches its input. Latents are cloned (float32,
CPU, contiguous) when they enter a bank, so the caller's tensors never alias stored ones; ``latents()``
returns a freshly stacked tensor. Banks derived from one another share their ``MemoryFrame`` objects
(structural sharing), so ``frame.latent`` itself must be treated as read-only: never modify it in place.

Reference images (MR2V, ``with_references``): reference ``i`` of ``N`` gets
``abs_frame = current_time - 1 - spacing·(N-1-i)`` (``spacing`` 8 pixel frames = 2 latent frames by
default). The last reference therefore sits on the pixel frame just before the next shot (memory
position -1 for that shot), earlier ones 2 latent frames apart (-3, -5, ...), the spacing Memento's
reference code falls back to for memory frames without a time. As the story moves on they recede like
any other memory frame. Pinned frames (references by default) are never evicted and count toward
``capacity``; a pool never holds more pinned frames than its capacity.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import ShapeError
from .frames import (
    FRAMES_PER_SHOT,
    LATENT_CHANNELS,
    REFERENCE_SPACING,
    SPATIAL_STRIDE,
    MemoryBankError,
    MemoryFrame,
    owned_latent,
    sort_frames,
    stack_latents,
)
from .positions import STORYMEM_SPACING, PositionScheme, frame_positions, memento_sample_indices
from .registry import get_policy, policy_class
from .selection import Selection, SelectionInputs, Selector

if TYPE_CHECKING:
    from ..fov import CameraPose
    from .policy import MemoryPolicy

__all__ = ["MemoryBank"]

_REF_ID = re.compile(r"^ref(\d+)$")


@dataclass(frozen=True, eq=False)
class MemoryBank:
    """An immutable memory bank. Every method that "updates" returns a new bank.

    high, low: the pools (tuples of ``MemoryFrame`` ordered by abs_frame); the same tuple in shared
    policies. archive: frames outside the pools that stay retrieval candidates (fov, manual).
    current_time: pixel frames generated before the next shot; shots_done: shots added so far.
    """

    policy: str = "memento"
    capacity: int = 8
    current_time: int = 0
    shots_done: int = 0
    high: tuple[MemoryFrame, ...] = ()
    low: tuple[MemoryFrame, ...] = ()
    archive: tuple[MemoryFrame, ...] = ()

    def __post_init__(self) -> None:
        policy_class(self.policy)  # a readable error for an unknown policy name
        if not isinstance(self.capacity, int) or self.capacity < 1:
            raise MemoryBankError(f"memory bank: capacity must be an int >= 1, got {self.capacity!r}")
        high, low = sort_frames(self.high), sort_frames(self.low)
        if self.shared:
            if [f.frame_id for f in high] != [f.frame_id for f in low]:
                raise MemoryBankError(
                    f"memory bank: the {self.policy} policy shares one pool, but high != low"
                )
            low = high
        object.__setattr__(self, "high", high)
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "archive", sort_frames(self.archive))
        self._validate_frames()

    def _validate_frames(self) -> None:
        """Unique ids per pool, one frame object per id, one latent resolution, pins within capacity."""
        by_id: dict[str, MemoryFrame] = {}
        archived = {f.frame_id for f in self.archive}
        for name, frames in (("high", self.high), ("low", self.low), ("archive", self.archive)):
            ids = [f.frame_id for f in frames]
            if len(set(ids)) != len(ids):
                raise MemoryBankError(f"memory bank: pool {name!r} holds a frame id twice: {ids}")
            if name != "archive" and archived.intersection(ids):
                raise MemoryBankError(
                    f"memory bank: frames {sorted(archived.intersection(ids))} are in "
                    f"pool {name!r} and in the archive"
                )
            pinned = sum(f.pinned for f in frames)
            if name != "archive" and pinned > self.capacity:
                raise MemoryBankError(
                    f"memory bank: pool {name!r} has {pinned} pinned frames but capacity {self.capacity}; "
                    "unpin some (pinned=False) or raise the capacity"
                )
            for f in frames:
                if by_id.setdefault(f.frame_id, f) is not f:
                    raise MemoryBankError(f"memory bank: two different frames share the id {f.frame_id!r}")
        shapes = {tuple(f.latent.shape): f.frame_id for f in by_id.values()}
        if len(shapes) > 1:
            raise ShapeError(
                f"memory latents of different resolutions in one bank: {_describe_shapes(shapes)}"
            )

    # ---------------------------------------------------------------------------------- construction

    @classmethod
    def empty(cls, policy: str = "memento", capacity: int | None = None) -> MemoryBank:
        """An empty bank at story time 0 (capacity: the policy's default when None)."""
        if capacity is None:
            capacity = get_policy(policy).capacity
        return cls(policy=policy, capacity=capacity)

    # ---------------------------------------------------------------------------------------- access

    @property
    def shared(self) -> bool:
        """True when both experts use one pool (storymem, fov, manual)."""
        return policy_class(self.policy).shared_pool

    def pool(self, name: str) -> tuple[MemoryFrame, ...]:
        """The frames of pool ``"high"`` or ``"low"``, ordered by abs_frame."""
        if name == "high":
            return self.high
        if name == "low":
            return self.low
        raise MemoryBankError(f"memory bank: pool must be 'high' or 'low', got {name!r}")

    def latents(self, pool: str) -> Tensor:
        """Latents of a pool in order -> [16, M, h, w] float32 (a fresh tensor). Errors on an empty pool."""
        frames = self.pool(pool)
        if not frames:
            raise MemoryBankError(
                f"the memory bank's {pool!r} pool is empty: add a shot or reference images before a shot "
                "that needs memory"
            )
        return stack_latents(frames)

    def abs_frames(self, pool: str) -> list[int]:
        return [f.abs_frame for f in self.pool(pool)]

    def frame_ids(self, pool: str) -> list[str]:
        return [f.frame_id for f in self.pool(pool)]

    def frame_positions(
        self,
        pool: str,
        scheme: PositionScheme = "memento",
        n_target: int = 21,
        identity: bool = False,
        spacing: int = STORYMEM_SPACING,
        identity_back: bool = False,
    ) -> Tensor:
        """``frame_positions`` of this pool for the next shot -> LongTensor [n_identity + M + n_target]."""
        return frame_positions(
            scheme, self.abs_frames(pool), self.current_time, n_target, identity, spacing, identity_back
        )

    def clip_embeddings(self, pool: str = "low") -> Tensor | None:
        """Stored CLIP embeddings of a pool's frames that have one -> [K, D], or None (StoryMem dedup)."""
        embs = [f.clip_embedding for f in self.pool(pool) if f.clip_embedding is not None]
        return torch.stack(embs) if embs else None

    def all_clip_embeddings(self) -> Tensor | None:
        """CLIP embeddings of every frame the bank holds, pools and archive -> [K, D], or None.
        StoryMem drops a new keyframe that duplicates any keyframe ever stored."""
        embs = [f.clip_embedding for f in self.frames() if f.clip_embedding is not None]
        return torch.stack(embs) if embs else None

    def frames(self) -> tuple[MemoryFrame, ...]:
        """Every unique frame held (pools and archive), ordered by abs_frame."""
        seen: dict[str, MemoryFrame] = {}
        for f in (*self.high, *self.low, *self.archive):
            seen.setdefault(f.frame_id, f)
        return sort_frames(seen.values())

    def get(self, frame_id: str) -> MemoryFrame:
        for f in self.frames():
            if f.frame_id == frame_id:
                return f
        raise MemoryBankError(
            f"memory bank: no frame {frame_id!r}; it holds {[f.frame_id for f in self.frames()]}"
        )

    @property
    def resolution(self) -> tuple[int, int] | None:
        """(h, w) of the stored latents, or None for an empty bank."""
        frames = self.frames()
        return frames[0].size if frames else None

    def __len__(self) -> int:
        """Unique frames in the pools (the archive not counted)."""
        return len({f.frame_id for f in (*self.high, *self.low)})

    def __repr__(self) -> str:
        return (
            f"MemoryBank(policy={self.policy!r}, capacity={self.capacity}, current_time={self.current_time}, "
            f"shots_done={self.shots_done}, high={self.frame_ids('high')}, low={self.frame_ids('low')}, "
            f"archive={len(self.archive)}, resolution={self.resolution})"
        )

    # --------------------------------------------------------------------------------------- updates

    def with_references(
        self,
        latents: Tensor,
        captions: Sequence[str] | str | None = None,
        pinned: bool = True,
        spacing: int = REFERENCE_SPACING,
        cameras: Sequence[CameraPose | None] | None = None,
        clip_embeddings: Tensor | None = None,
    ) -> MemoryBank:
        """Add reference images (MR2V) to every pool -> new bank.

        latents: [N, 16, h, w] (or [N, 16, 1, h, w] from 1-frame encodes, or one [16, h, w]); captions:
        N strings (or one for all); clip_embeddings: [N, D]. Reference ``i`` gets id ``ref<n>`` (numbering
        continues over earlier references) and ``abs_frame = current_time - 1 - spacing·(N-1-i)``.
        """
        if isinstance(latents, Tensor) and latents.ndim == 3:
            latents = latents.unsqueeze(0)
        lat = self._incoming(latents, "reference latents")
        n = lat.shape[0]
        caps = _per_frame(captions, n, "captions", default="")
        cams = _per_frame(cameras, n, "cameras", default=None)
        embs = _embeddings(clip_embeddings, n)
        if spacing < 0:
            raise MemoryBankError(f"with_references: spacing must be >= 0, got {spacing}")
        first = 1 + max(
            (int(m.group(1)) for f in self.frames() if (m := _REF_ID.match(f.frame_id))), default=-1
        )
        new = [
            MemoryFrame(
                frame_id=f"ref{first + i}",
                latent=owned_latent(lat[i]),
                abs_frame=self.current_time - 1 - spacing * (n - 1 - i),
                source="reference",
                caption=str(caps[i]),
                pinned=bool(pinned),
                camera=cams[i],
                clip_embedding=None if embs is None else owned_latent(embs[i]),
            )
            for i in range(n)
        ]
        return self._appended(new)

    def with_shot(
        self,
        latents: Tensor,
        frame_indices: Sequence[int] | None = None,
        prompt: str = "",
        shot_index: int | None = None,
        cameras: Sequence[CameraPose | None] | None = None,
        clip_embeddings: Tensor | None = None,
        frames_per_shot: int = FRAMES_PER_SHOT,
    ) -> MemoryBank:
        """Add a finished shot's memory frames, then advance story time -> new bank.

        latents: [N, 16, h, w] (or [N, 16, 1, h, w]): the decoded-then-re-encoded frames, each encoded
        alone; frame_indices: their pixel-frame index within the shot (default
        ``memento_sample_indices()``, for N = 8); prompt: the shot prompt (caption of each frame);
        shot_index: 1-based story shot number used in the ids ``s<shot>f<index>`` (default
        ``shots_done + 1``); cameras: N poses (fov); clip_embeddings: [N, D] (storymem).

        Frames get ``abs_frame = current_time + index`` and join every pool; then ``current_time +=
        frames_per_shot`` and ``shots_done += 1``. The policy's ``retain`` then decides what the pools keep
        (StoryMem: the sink plus the most recent frames).
        """
        lat = self._incoming(latents, "shot latents")
        n = lat.shape[0]
        indices = memento_sample_indices() if frame_indices is None else [int(i) for i in frame_indices]
        if len(indices) != n:
            raise MemoryBankError(
                f"with_shot: got {n} latents but {len(indices)} frame indices; pass frame_indices= with "
                "the pixel-frame index of each latent within the shot"
            )
        if frames_per_shot < 1 or any(not 0 <= i < frames_per_shot for i in indices):
            raise MemoryBankError(
                f"with_shot: frame indices {indices} must lie in [0, {frames_per_shot}) (frames_per_shot)"
            )
        if len(set(indices)) != n:
            raise MemoryBankError(f"with_shot: frame indices {indices} repeat a frame")
        shot = self.shots_done + 1 if shot_index is None else int(shot_index)
        cams = _per_frame(cameras, n, "cameras", default=None)
        embs = _embeddings(clip_embeddings, n)
        new = [
            MemoryFrame(
                frame_id=f"s{shot}f{idx}",
                latent=owned_latent(lat[i]),
                abs_frame=self.current_time + idx,
                source="shot",
                caption=str(prompt),
                pinned=False,
                shot=shot,
                camera=cams[i],
                clip_embedding=None if embs is None else owned_latent(embs[i]),
            )
            for i, idx in enumerate(indices)
        ]
        bank = self._appended(new)
        return replace(bank, current_time=self.current_time + frames_per_shot, shots_done=self.shots_done + 1)

    def with_pinned(self, frame_ids: Iterable[str], pinned: bool = True) -> MemoryBank:
        """Pin (or unpin) frames by id, in every pool and the archive -> new bank."""
        ids = set(frame_ids)
        self._require_ids(ids)

        def swap(frames: tuple[MemoryFrame, ...]) -> tuple[MemoryFrame, ...]:
            return tuple(f.with_pinned(pinned) if f.frame_id in ids else f for f in frames)

        return self._rebuilt(swap)

    def without_frames(self, frame_ids: Iterable[str]) -> MemoryBank:
        """Remove frames by id from every pool and the archive (e.g. to swap a reference) -> new bank."""
        ids = set(frame_ids)
        self._require_ids(ids)
        return self._rebuilt(lambda frames: tuple(f for f in frames if f.frame_id not in ids))

    def with_time_advanced(self, frames_per_shot: int = FRAMES_PER_SHOT) -> MemoryBank:
        """A shot that adds no frame (none passed a policy's filter): story time and shot count advance."""
        if frames_per_shot < 1:
            raise MemoryBankError(f"with_time_advanced: frames_per_shot must be >= 1, got {frames_per_shot}")
        return replace(self, current_time=self.current_time + frames_per_shot, shots_done=self.shots_done + 1)

    def with_pools(
        self,
        high: Iterable[MemoryFrame],
        low: Iterable[MemoryFrame] | None = None,
        archive: Iterable[MemoryFrame] | None = None,
    ) -> MemoryBank:
        """A bank holding these frames (a policy's selection or retention); low defaults to high in a
        shared pool, archive to the current archive. Every frame must already be in this bank."""
        high = tuple(high)
        low = high if low is None else tuple(low)
        archive = self.archive if archive is None else tuple(archive)
        self._require_ids({f.frame_id for f in (*high, *low, *archive)})
        return replace(self, high=high, low=low, archive=archive)

    def select_for_shot(
        self,
        selectors: Selector | Mapping[str, Selector] | None = None,
        *,
        targets: CameraPose | Sequence[CameraPose] | None = None,
        keep_ids: Sequence[str] | None = None,
        **options: float,
    ) -> tuple[MemoryBank, Selection]:
        """Choose the memory of the NEXT shot with this bank's policy -> (new bank, Selection).

        A shorthand for ``get_policy(bank.policy).select(bank, SelectionInputs(...))`` with the
        policy's default options; see each policy's ``select``.
        """
        inputs = SelectionInputs(selectors, targets, keep_ids, options)
        return self.policy_object().select(self, inputs)

    def policy_object(self) -> MemoryPolicy:
        """The policy this bank was made for, with its default options."""
        return get_policy(self.policy)

    # ------------------------------------------------------------------------------------- internals

    def _incoming(self, latents: Tensor, what: str) -> Tensor:
        """Check new latents [N, 16, h, w] ([N, 16, 1, h, w] is squeezed) against the bank's resolution."""
        if not isinstance(latents, Tensor):
            raise ShapeError(f"{what}: expected a tensor [N, 16, h, w], got {type(latents).__name__}")
        if latents.ndim == 5 and latents.shape[2] == 1:
            latents = latents[:, :, 0]
        if latents.ndim != 4 or latents.shape[1] != LATENT_CHANNELS or latents.shape[0] < 1:
            raise ShapeError(
                f"{what}: expected [N, 16, h, w] (one latent frame per memory image), "
                f"got {list(latents.shape)}"
            )
        if not latents.is_floating_point() or not bool(torch.isfinite(latents).all()):
            raise MemoryBankError(
                f"{what}: memory latents must be finite floating-point values (NaN/inf found?)"
            )
        size = (int(latents.shape[2]), int(latents.shape[3]))
        have = self.resolution
        if have is not None and size != have:
            raise ShapeError(
                f"{what}: memory latents of another resolution: the bank holds {have[0]}x{have[1]} latents "
                f"(about {have[1] * SPATIAL_STRIDE}x{have[0] * SPATIAL_STRIDE} px) but these are "
                f"{size[0]}x{size[1]} (about {size[1] * SPATIAL_STRIDE}x{size[0] * SPATIAL_STRIDE} px); "
                "render every shot at one resolution or start a new memory bank"
            )
        return latents

    def _appended(self, new: list[MemoryFrame]) -> MemoryBank:
        """A bank with ``new`` frames in every pool, then what the policy retains of it."""
        taken = {f.frame_id for f in self.frames()}
        clash = sorted(taken.intersection(f.frame_id for f in new))
        if clash:
            raise MemoryBankError(
                f"memory bank: frame ids {clash} are already in the bank (was this shot added twice? pass a "
                "distinct shot_index)"
            )
        high = sort_frames([*self.high, *new])
        low = high if self.shared else sort_frames([*self.low, *new])
        return self.policy_object().retain(replace(self, high=high, low=low))

    def _rebuilt(self, fn: Callable[[tuple[MemoryFrame, ...]], tuple[MemoryFrame, ...]]) -> MemoryBank:
        """A bank with ``fn`` applied to every pool and the archive, keeping one object per frame id."""
        cache: dict[str, MemoryFrame] = {}

        def mapped(frames: tuple[MemoryFrame, ...]) -> tuple[MemoryFrame, ...]:
            return tuple(cache.setdefault(f.frame_id, f) for f in fn(frames))

        high = mapped(self.high)
        low = high if self.shared else mapped(self.low)
        return replace(self, high=high, low=low, archive=mapped(self.archive))

    def _require_ids(self, ids: set[str]) -> None:
        known = {f.frame_id for f in self.frames()}
        unknown = sorted(ids - known)
        if unknown:
            raise MemoryBankError(f"memory bank: no frames {unknown}; it holds {sorted(known)}")


def _per_frame(values: Sequence[Any] | str | None, n: int, what: str, default: Any) -> list[Any]:
    """``values`` as a list of n entries (None -> n defaults; one string -> n copies)."""
    if values is None:
        return [default] * n
    if isinstance(values, str):
        return [values] * n
    out = list(values)
    if len(out) != n:
        raise MemoryBankError(f"memory bank: {what} has {len(out)} entries but there are {n} latents")
    return out


def _embeddings(embs: Tensor | None, n: int) -> Tensor | None:
    if embs is None:
        return None
    if not isinstance(embs, Tensor) or embs.ndim != 2 or embs.shape[0] != n:
        shape = list(embs.shape) if isinstance(embs, Tensor) else type(embs).__name__
        raise ShapeError(f"clip_embeddings: expected [{n}, D] (one per latent), got {shape}")
    return embs


def _describe_shapes(shapes: Mapping[tuple[int, ...], str]) -> str:
    return ", ".join(f"{list(shape)} (e.g. frame {fid})" for shape, fid in shapes.items())
