"""The visual memory of a story: immutable ``MemoryBank`` values, their policies, positions and persistence.

A memory frame is ONE latent frame ``[16, h, w]`` (each memory image is VAE-encoded alone as a 1-frame
clip, SPEC 4.1) that remembers ``abs_frame``, its pixel-frame index in story time (SPEC 4.3).

Pools (SPEC 4.6, 5): a bank has a ``high`` and a ``low`` pool, one per Wan2.2 expert.

- ``memento``: each pool is selected by its own expert's KeyframeQuery, so the pools may diverge.
- ``storymem``, ``fov``, ``manual``: one shared pool used by both experts (``high is low``).

``bank.pool("high")`` and ``bank.pool("low")`` work in every policy.

Life of a bank over a story (``current_time`` counts pixel frames generated so far)::

    bank = MemoryBank.empty("memento")                      # current_time 0
    bank = bank.with_shot(latents_8, prompt=p1, shot_index=1)  # abs 0..80, current_time 81
    bank, sel = bank.select_for_shot({"high": sel_h, "low": sel_l})  # 8 <= capacity: kept as is
    ...shot 2 renders with bank.latents("high") / bank.latents("low")...
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
any other memory frame (shot 2 sees them at -21, -23, ... just before shot 1's frames at -20 .. -1).

Pinned frames (references by default) are never evicted and count toward ``capacity``: with ``P``
pinned frames in a pool, a selection keeps the ``P`` pinned frames plus ``capacity - P`` picked ones. In
the memento policy the pins come out of the local quota first (as Memento's ``fix`` option does):
``k_global = min(n_global, capacity - P)``, ``k_local = capacity - P - k_global`` (8 slots, 2 pinned
references: 4 local + 2 global picks). A pool never holds more pinned frames than its capacity.

Persistence: ``save_bank`` writes ONE ``.safetensors`` file (every unique frame's latent and CLIP
embedding stored once; pools reference frame ids) with versioned JSON metadata in its header, atomically
(temp file in the same folder, fsync, ``os.replace``). ``load_bank`` validates it. Never pickle.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, Protocol

import torch
from torch import Tensor

from .errors import MementoError, ShapeError

if TYPE_CHECKING:
    from .fov import CameraPose

__all__ = [
    "BANK_FORMAT",
    "BANK_VERSION",
    "FRAMES_PER_SHOT",
    "LATENT_CHANNELS",
    "MemoryBank",
    "MemoryBankError",
    "MemoryFrame",
    "PoolSelection",
    "Selection",
    "Selector",
    "bank_to_dict",
    "frame_positions",
    "kfq_selector",
    "load_bank",
    "memento_sample_indices",
    "memory_positions",
    "recency_selector",
    "save_bank",
    "sequential_positions",
    "stack_latents",
    "storymem_positions",
]

Policy = Literal["memento", "storymem", "fov", "manual"]
PoolName = Literal["high", "low"]
Source = Literal["shot", "reference"]
PositionScheme = Literal["memento", "storymem", "sequential"]

POLICIES: tuple[str, ...] = ("memento", "storymem", "fov", "manual")
#: Policies whose two experts share one pool (``bank.high is bank.low``).
SHARED_POLICIES: tuple[str, ...] = ("storymem", "fov", "manual")
POOLS: tuple[str, ...] = ("high", "low")
SOURCES: tuple[str, ...] = ("shot", "reference")
SCHEMES: tuple[str, ...] = ("memento", "storymem", "sequential")

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
#: StoryMem's permanent sink: the first 3 keyframes ever stored.
STORYMEM_SINK = 3
#: StoryMem's fixed RoPE spacing S between memory frames.
STORYMEM_SPACING = 5

BANK_FORMAT = "memento-memory-bank"
BANK_VERSION = 1
_METADATA_KEY = "memento_bank"
_REF_ID = re.compile(r"^ref(\d+)$")


class MemoryBankError(MementoError):
    """A memory bank was misused (unknown frame id, empty pool, bad selector) or a bank file is bad."""


# ------------------------------------------------------------------------------------------ positions


def memento_sample_indices(n: int = 8, last: int = FRAMES_PER_SHOT - 1) -> list[int]:
    """Pixel-frame indices of ``n`` evenly spaced frames of a shot: ``round(i·last/(n-1))`` (SPEC 4.6).

    ``n=8, last=80`` gives 0, 11, 23, 34, 46, 57, 69, 80 (Python ``round``, as the reference). ``n=1``
    gives ``[last]``, the most recent frame.
    """
    if n < 1 or last < 0:
        raise ValueError(f"memento_sample_indices: need n >= 1 and last >= 0, got n={n}, last={last}")
    if n == 1:
        return [last]
    return [round(i * last / (n - 1)) for i in range(n)]


def memory_positions(abs_frames: Sequence[int], current_time: int) -> list[int]:
    """Memento's time-aware RoPE positions of memory frames (SPEC 4.3).

    ``max(min(abs // 4 - current_time // 4, -1), -512)`` for each ``abs`` (floor division, so a
    reference at abs -1 is at latent -1). Shot 2 (current_time 81) with shot 1's frames
    0, 11, 23, 34, 46, 57, 69, 80 gives -20, -18, -15, -12, -9, -6, -3, -1.
    """
    base = int(current_time) // TEMPORAL_STRIDE
    return [max(min(int(a) // TEMPORAL_STRIDE - base, -1), MIN_POSITION) for a in abs_frames]


def storymem_positions(m: int, spacing: int = STORYMEM_SPACING) -> list[int]:
    """StoryMem's fixed spacing: memory ``j`` of ``m`` at ``-(m-j)·spacing`` (5 frames: -25 .. -5)."""
    return [max(-(m - j) * spacing, MIN_POSITION) for j in range(m)]


def sequential_positions(m: int) -> list[int]:
    """Legacy sequential positions (Dec-2025 StoryMem release): memory ``0 .. m-1``."""
    return list(range(m))


def frame_positions(
    scheme: PositionScheme,
    abs_frames: Sequence[int],
    current_time: int,
    n_target: int = 21,
    identity: bool = False,
    spacing: int = STORYMEM_SPACING,
) -> Tensor:
    """Time positions of a shot ``[identity | memory | target]`` -> LongTensor [n_identity + M + n_target].

    memento: identity -512, memory from ``memory_positions``, target ``k`` at ``k``.
    storymem: memory ``-(M-j)·spacing``, target ``k`` at ``k``. sequential: memory ``0..M-1``, target
    ``k`` at ``M + k``. The identity slot exists in the memento scheme only. ``abs_frames`` (M entries,
    in slot order) only count the memory frames in the storymem and sequential schemes.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"frame_positions: scheme must be one of {SCHEMES}, got {scheme!r}")
    if identity and scheme != "memento":
        raise ValueError(
            f"frame_positions: the identity slot exists only in the memento scheme, not {scheme!r}"
        )
    if n_target < 0:
        raise ValueError(f"frame_positions: n_target must be >= 0, got {n_target}")
    m = len(abs_frames)
    if scheme == "memento":
        memory = memory_positions(abs_frames, current_time)
        target = list(range(n_target))
    elif scheme == "storymem":
        memory = storymem_positions(m, spacing)
        target = list(range(n_target))
    else:
        memory = sequential_positions(m)
        target = [m + k for k in range(n_target)]
    head = [MIN_POSITION] if identity else []
    return torch.tensor(head + memory + target, dtype=torch.long)


# ------------------------------------------------------------------------------------------- frames


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
        _check_latent(self.latent, f"memory frame {self.frame_id}")
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
            "camera": _camera_tuple(self.camera),
            "has_clip": self.clip_embedding is not None,
        }


def _check_latent(latent: object, what: str) -> None:
    """A stored latent must be a float32 CPU tensor [16, h, w] with finite values."""
    if not isinstance(latent, Tensor):
        raise ShapeError(f"{what}: latent must be a torch.Tensor [16, h, w], got {type(latent).__name__}")
    if latent.ndim != 3 or latent.shape[0] != LATENT_CHANNELS:
        raise ShapeError(f"{what}: expected one latent frame [16, h, w], got {list(latent.shape)}")
    if latent.dtype != torch.float32 or latent.device.type != "cpu":
        raise ShapeError(
            f"{what}: stored latents are float32 on the CPU, got {latent.dtype} on {latent.device}"
        )


def _owned(t: Tensor) -> Tensor:
    """A float32 CPU contiguous copy that shares no memory with ``t``."""
    return t.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous()


def _camera_tuple(camera: object | None) -> list[float] | None:
    if camera is None:
        return None
    return [float(camera.x), float(camera.z), float(camera.yaw)]  # type: ignore[attr-defined]


def stack_latents(frames: Sequence[MemoryFrame]) -> Tensor:
    """Latents of ``frames`` in order -> [16, M, h, w] float32 (a new tensor, never a view)."""
    if not frames:
        raise MemoryBankError("stack_latents: no memory frames to stack")
    return torch.stack([f.latent for f in frames], dim=1)


def _sort_frames(frames: Iterable[MemoryFrame]) -> tuple[MemoryFrame, ...]:
    """Frames ordered by ``abs_frame`` (stable: ties keep insertion order)."""
    return tuple(sorted(frames, key=lambda f: f.abs_frame))


# ----------------------------------------------------------------------------------------- selection


class Selector(Protocol):
    """Chooses which candidates a memento pool keeps (built from an expert's KFQ + the NEXT shot's prompt).

    frames: the unpinned candidates, ordered by abs_frame; current_time: story time of the next shot.
    Returns (local_idx, global_idx): exactly ``k_local`` and ``k_global`` distinct indices into
    ``frames`` (``KeyframeQuery.select`` semantics).
    """

    def __call__(
        self, frames: tuple[MemoryFrame, ...], current_time: int, *, k_local: int, k_global: int
    ) -> tuple[Sequence[int], Sequence[int]]: ...


@dataclass(frozen=True)
class PoolSelection:
    """What a selection did to one pool (for logs and previews).

    method: "kfq" (KeyframeQuery picks), "all" (no more than capacity: kept as is), "storymem" (sink +
    recent), "fov" (camera retrieval) or "manual" (user list). frame_ids: the pool after selection,
    ordered by abs_frame; chosen_ids: the unpinned frames kept; local_ids / global_ids: KFQ's picks
    (kfq only); pinned_ids: pinned frames (always kept); evicted_ids: frames that left the pool
    (dropped in memento/storymem, moved to the bank's archive in fov/manual).
    """

    pool: str
    method: str
    frame_ids: tuple[str, ...]
    chosen_ids: tuple[str, ...] = ()
    local_ids: tuple[str, ...] = ()
    global_ids: tuple[str, ...] = ()
    pinned_ids: tuple[str, ...] = ()
    evicted_ids: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "method": self.method,
            "frame_ids": list(self.frame_ids),
            "chosen_ids": list(self.chosen_ids),
            "local_ids": list(self.local_ids),
            "global_ids": list(self.global_ids),
            "pinned_ids": list(self.pinned_ids),
            "evicted_ids": list(self.evicted_ids),
        }


@dataclass(frozen=True)
class Selection:
    """The outcome of ``MemoryBank.select_for_shot``: one ``PoolSelection`` per pool ("high", "low")."""

    policy: str
    current_time: int
    pools: tuple[PoolSelection, ...]

    def pool(self, name: str) -> PoolSelection:
        for p in self.pools:
            if p.pool == name:
                return p
        raise MemoryBankError(f"selection: no pool {name!r}; pools are {[p.pool for p in self.pools]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "current_time": self.current_time,
            "pools": {p.pool: p.to_dict() for p in self.pools},
        }


def recency_selector(
    frames: tuple[MemoryFrame, ...], current_time: int, *, k_local: int, k_global: int
) -> tuple[list[int], list[int]]:
    """A KFQ-free fallback ``Selector``: the ``k_local`` most recent frames and the ``k_global`` oldest."""
    n = len(frames)
    local = list(range(max(0, n - k_local), n))
    rest = [i for i in range(n) if i not in set(local)]
    return local, rest[:k_global]


def kfq_selector(kfq: Any, ctx: Tensor, ctx_global: Tensor) -> Selector:
    """A ``Selector`` from an expert's ``KeyframeQuery`` and the NEXT shot's embedded prompts.

    ctx, ctx_global: [1, 512, dim], already passed through the expert's ``text_embedding`` (SPEC 4.7).
    Candidates are stacked to [16, F, h, w] with positions ``keyframe_query.candidate_positions``.
    """

    def select(
        frames: tuple[MemoryFrame, ...], current_time: int, *, k_local: int, k_global: int
    ) -> tuple[Sequence[int], Sequence[int]]:
        from .keyframe_query import candidate_positions

        param = next(iter(kfq.parameters()), None) if hasattr(kfq, "parameters") else None
        device = param.device if param is not None else torch.device("cpu")
        latents = stack_latents(frames).to(device=device)  # float32: the KFQ scores in float32
        rel = [f.abs_frame - current_time for f in frames]
        pos = candidate_positions(rel, current_time).to(device)
        return kfq.select(latents, pos, ctx, ctx_global, k_local=k_local, k_global=k_global)

    return select


def _checked_picks(
    picks: tuple[Sequence[int], Sequence[int]], n: int, k_local: int, k_global: int, pool: str
) -> tuple[list[int], list[int]]:
    """Validate a selector's (local, global) answer: exactly k_local + k_global distinct indices < n."""
    try:
        local, glob = ([int(i) for i in part] for part in picks)
    except (TypeError, ValueError) as exc:
        raise MemoryBankError(
            f"memory selector for pool {pool!r} must return (local_idx, global_idx) lists of ints"
        ) from exc
    every = local + glob
    ok = len(local) == k_local and len(glob) == k_global and len(set(every)) == len(every)
    if not ok or any(not 0 <= i < n for i in every):
        raise MemoryBankError(
            f"memory selector for pool {pool!r} returned local={local}, global={glob}; expected exactly "
            f"{k_local} local + {k_global} global distinct indices into the {n} candidates"
        )
    return local, glob


# --------------------------------------------------------------------------------------------- bank


@dataclass(frozen=True, eq=False)
class MemoryBank:
    """An immutable memory bank. Every method that "updates" returns a new bank.

    high, low: the pools (tuples of ``MemoryFrame`` ordered by abs_frame); the same tuple in shared
    policies. archive: frames outside the pools that stay retrieval candidates (fov, manual).
    current_time: pixel frames generated before the next shot; shots_done: shots added so far.
    """

    policy: Policy = "memento"
    capacity: int = 8
    current_time: int = 0
    shots_done: int = 0
    high: tuple[MemoryFrame, ...] = ()
    low: tuple[MemoryFrame, ...] = ()
    archive: tuple[MemoryFrame, ...] = ()

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise MemoryBankError(f"memory bank: policy must be one of {POLICIES}, got {self.policy!r}")
        if not isinstance(self.capacity, int) or self.capacity < 1:
            raise MemoryBankError(f"memory bank: capacity must be an int >= 1, got {self.capacity!r}")
        high, low = _sort_frames(self.high), _sort_frames(self.low)
        if self.policy in SHARED_POLICIES:
            if [f.frame_id for f in high] != [f.frame_id for f in low]:
                raise MemoryBankError(
                    f"memory bank: the {self.policy} policy shares one pool, but high != low"
                )
            low = high
        object.__setattr__(self, "high", high)
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "archive", _sort_frames(self.archive))
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
    def empty(cls, policy: Policy = "memento", capacity: int = 8) -> MemoryBank:
        """An empty bank at story time 0."""
        return cls(policy=policy, capacity=capacity)

    # ---------------------------------------------------------------------------------------- access

    @property
    def shared(self) -> bool:
        """True when both experts use one pool (storymem, fov, manual)."""
        return self.policy in SHARED_POLICIES

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
        self, pool: str, scheme: PositionScheme = "memento", n_target: int = 21, identity: bool = False
    ) -> Tensor:
        """``frame_positions`` of this pool for the next shot -> LongTensor [n_identity + M + n_target]."""
        return frame_positions(scheme, self.abs_frames(pool), self.current_time, n_target, identity)

    def clip_embeddings(self, pool: str = "low") -> Tensor | None:
        """Stored CLIP embeddings of a pool's frames that have one -> [K, D], or None (StoryMem dedup)."""
        embs = [f.clip_embedding for f in self.pool(pool) if f.clip_embedding is not None]
        return torch.stack(embs) if embs else None

    def frames(self) -> tuple[MemoryFrame, ...]:
        """Every unique frame held (pools and archive), ordered by abs_frame."""
        seen: dict[str, MemoryFrame] = {}
        for f in (*self.high, *self.low, *self.archive):
            seen.setdefault(f.frame_id, f)
        return _sort_frames(seen.values())

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
                latent=_owned(lat[i]),
                abs_frame=self.current_time - 1 - spacing * (n - 1 - i),
                source="reference",
                caption=str(caps[i]),
                pinned=bool(pinned),
                camera=cams[i],
                clip_embedding=None if embs is None else _owned(embs[i]),
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
        sink: int = STORYMEM_SINK,
    ) -> MemoryBank:
        """Add a finished shot's memory frames, then advance story time -> new bank.

        latents: [N, 16, h, w] (or [N, 16, 1, h, w]): the decoded-then-re-encoded frames, each encoded
        alone; frame_indices: their pixel-frame index within the shot (default
        ``memento_sample_indices()``, for N = 8); prompt: the shot prompt (caption of each frame);
        shot_index: 1-based story shot number used in the ids ``s<shot>f<index>`` (default
        ``shots_done + 1``); cameras: N poses (fov); clip_embeddings: [N, D] (storymem).

        Frames get ``abs_frame = current_time + index`` and join every pool; then ``current_time +=
        frames_per_shot`` and ``shots_done += 1``. The storymem policy (the caller passes only the CLIP
        keyframes) then keeps the sink plus the most recent frames (``keyframes.storymem_retain``).
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
                latent=_owned(lat[i]),
                abs_frame=self.current_time + idx,
                source="shot",
                caption=str(prompt),
                pinned=False,
                shot=shot,
                camera=cams[i],
                clip_embedding=None if embs is None else _owned(embs[i]),
            )
            for i, idx in enumerate(indices)
        ]
        bank = self._appended(new, sink=sink)
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

    # ------------------------------------------------------------------------------------- selection

    def select_for_shot(
        self,
        selectors: Selector | Mapping[str, Selector] | None = None,
        *,
        targets: CameraPose | Sequence[CameraPose] | None = None,
        keep_ids: Sequence[str] | None = None,
        fov_deg: float | None = None,
        near: float | None = None,
        far: float | None = None,
        k: int | None = None,
        n_global: int = 2,
    ) -> tuple[MemoryBank, Selection]:
        """Choose the memory of the NEXT shot -> (new bank, Selection).

        memento: per pool with more than ``capacity`` frames, that pool's ``Selector`` (``selectors``:
        {"high": s_h, "low": s_l}, or one selector for both) picks ``k_local`` + ``k_global`` of the
        unpinned frames (``n_global`` 2; pins reduce the local quota first); the rest are evicted.
        Pools within capacity are kept as they are (shot 2 uses shot 1's 8 frames).
        storymem: sink + recent (already applied by ``with_shot``; re-applied here, normally a no-op).
        fov: ``fov.retrieve_by_fov`` of the unpinned pool and archive frames for ``targets``, at most
        ``min(k, capacity) - pinned`` of them (fov_deg, near, far forwarded when given).
        manual: the pinned frames plus the frames listed in ``keep_ids`` (from the pool or archive).
        Pinned frames are always kept; frames are ordered by abs_frame.
        """
        if self.policy == "memento":
            return self._select_memento(selectors, n_global)
        if self.policy == "storymem":
            return self._select_storymem()
        if self.policy == "fov":
            if targets is None:
                raise MemoryBankError(
                    "select_for_shot: the fov policy needs targets= (the next shot's camera(s))"
                )
            options = {"fov_deg": fov_deg, "near": near, "far": far}
            return self._select_fov(targets, k, {key: v for key, v in options.items() if v is not None})
        if keep_ids is None:
            raise MemoryBankError("select_for_shot: the manual policy needs keep_ids= (frame ids to keep)")
        return self._select_manual(keep_ids)

    def _select_memento(
        self, selectors: Selector | Mapping[str, Selector] | None, n_global: int
    ) -> tuple[MemoryBank, Selection]:
        results = {name: self._select_memento_pool(name, selectors, n_global) for name in POOLS}
        bank = replace(self, high=results["high"][0], low=results["low"][0])
        records = tuple(record for _, record in results.values())
        return bank, Selection(self.policy, self.current_time, records)

    def _select_memento_pool(
        self, name: str, selectors: Selector | Mapping[str, Selector] | None, n_global: int
    ) -> tuple[tuple[MemoryFrame, ...], PoolSelection]:
        """One pool: keep it within capacity as is, else pinned + the selector's local and global picks."""
        frames = self.pool(name)
        pinned = [f for f in frames if f.pinned]
        candidates = tuple(f for f in frames if not f.pinned)
        free = self.capacity - len(pinned)
        if len(candidates) <= free:
            return frames, _record(name, "all", frames, frames, pinned, frames)
        k_global = min(max(n_global, 0), free)
        k_local = free - k_global
        local: list[int] = []
        glob: list[int] = []
        if free > 0:
            picks = _selector_for(selectors, name)(
                candidates, self.current_time, k_local=k_local, k_global=k_global
            )
            local, glob = _checked_picks(picks, len(candidates), k_local, k_global, name)
        local_frames = [candidates[i] for i in local]
        global_frames = [candidates[i] for i in glob]
        chosen = [*local_frames, *global_frames]
        kept = _sort_frames([*pinned, *chosen])
        record = _record(name, "kfq", kept, frames, pinned, chosen, local=local_frames, glob=global_frames)
        return kept, record

    def _select_storymem(self) -> tuple[MemoryBank, Selection]:
        kept = _storymem_trim(self.high, self.capacity, STORYMEM_SINK)
        pinned = [f for f in kept if f.pinned]
        records = tuple(_record(name, "storymem", kept, self.high, pinned, kept) for name in POOLS)
        return replace(self, high=kept, low=kept), Selection(self.policy, self.current_time, records)

    def _select_fov(
        self, targets: CameraPose | Sequence[CameraPose], k: int | None, options: dict[str, float]
    ) -> tuple[MemoryBank, Selection]:
        from .fov import retrieve_by_fov

        target_list = [targets] if hasattr(targets, "yaw") else list(targets)  # type: ignore[arg-type]
        if not target_list:
            raise MemoryBankError("select_for_shot: targets= is empty; give the next shot's camera pose(s)")
        pinned = [f for f in self.high if f.pinned]
        candidates = _sort_frames([f for f in (*self.high, *self.archive) if not f.pinned])
        budget = min(self.capacity if k is None else int(k), self.capacity) - len(pinned)
        chosen: list[MemoryFrame] = []
        if budget > 0 and candidates:
            cams = [f.camera for f in candidates]
            picked = [int(i) for i in retrieve_by_fov(cams, target_list, k=budget, **options)]
            if len(set(picked)) != len(picked) or len(picked) > budget:
                raise MemoryBankError(
                    f"fov retrieval returned {picked}; expected at most {budget} distinct picks"
                )
            chosen = [candidates[i] for i in picked]
        return self._shared_choice("fov", pinned, chosen)

    def _select_manual(self, keep_ids: Sequence[str]) -> tuple[MemoryBank, Selection]:
        wanted = list(dict.fromkeys(keep_ids))
        available = {f.frame_id: f for f in (*self.high, *self.archive)}
        unknown = [i for i in wanted if i not in available]
        if unknown:
            raise MemoryBankError(
                f"select_for_shot: frame ids {unknown} are not in the memory bank; "
                f"available: {sorted(available)}"
            )
        pinned = [f for f in self.high if f.pinned]
        chosen = [available[i] for i in wanted if not available[i].pinned]
        if len(pinned) + len(chosen) > self.capacity:
            raise MemoryBankError(
                f"select_for_shot: {len(chosen)} listed + {len(pinned)} pinned frames exceed the memory "
                f"capacity {self.capacity}"
            )
        return self._shared_choice("manual", pinned, chosen)

    def _shared_choice(
        self, method: str, pinned: list[MemoryFrame], chosen: list[MemoryFrame]
    ) -> tuple[MemoryBank, Selection]:
        """Shared-pool result: pool = pinned + chosen; every other frame goes to (or stays in) the archive."""
        kept = _sort_frames([*pinned, *chosen])
        kept_ids = {f.frame_id for f in kept}
        archive = [f for f in (*self.high, *self.archive) if f.frame_id not in kept_ids]
        records = tuple(_record(name, method, kept, self.high, pinned, chosen) for name in POOLS)
        bank = replace(self, high=kept, low=kept, archive=tuple(archive))
        return bank, Selection(self.policy, self.current_time, records)

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

    def _appended(self, new: list[MemoryFrame], sink: int = STORYMEM_SINK) -> MemoryBank:
        """A bank with ``new`` frames in every pool (storymem: then trimmed to sink + recent)."""
        taken = {f.frame_id for f in self.frames()}
        clash = sorted(taken.intersection(f.frame_id for f in new))
        if clash:
            raise MemoryBankError(
                f"memory bank: frame ids {clash} are already in the bank (was this shot added twice? pass a "
                "distinct shot_index)"
            )
        high = _sort_frames([*self.high, *new])
        low = high if self.shared else _sort_frames([*self.low, *new])
        if self.policy == "storymem":
            high = low = _storymem_trim(high, self.capacity, sink)
        return replace(self, high=high, low=low)

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


def _record(
    pool: str,
    method: str,
    kept: Sequence[MemoryFrame],
    before: Sequence[MemoryFrame],
    pinned: Sequence[MemoryFrame],
    chosen: Sequence[MemoryFrame],
    local: Sequence[MemoryFrame] = (),
    glob: Sequence[MemoryFrame] = (),
) -> PoolSelection:
    kept_ids = {f.frame_id for f in kept}
    return PoolSelection(
        pool=pool,
        method=method,
        frame_ids=_ids(kept),
        chosen_ids=_ids(_sort_frames(f for f in chosen if not f.pinned)),
        local_ids=_ids(_sort_frames(local)),
        global_ids=_ids(_sort_frames(glob)),
        pinned_ids=_ids(pinned),
        evicted_ids=tuple(f.frame_id for f in before if f.frame_id not in kept_ids),
    )


def _ids(frames: Iterable[MemoryFrame]) -> tuple[str, ...]:
    return tuple(f.frame_id for f in frames)


def _selector_for(selectors: Selector | Mapping[str, Selector] | None, pool: str) -> Selector:
    if isinstance(selectors, Mapping):
        selector = selectors.get(pool)
    else:
        selector = selectors
    if selector is None:
        raise MemoryBankError(
            f"select_for_shot: the memento pool {pool!r} holds more frames than its capacity and needs a "
            f"selector (the {pool}-noise expert's KeyframeQuery with the next shot's prompt: kfq_selector)"
        )
    return selector


def _storymem_trim(frames: tuple[MemoryFrame, ...], capacity: int, sink: int) -> tuple[MemoryFrame, ...]:
    """StoryMem retention: pinned frames + the first ``sink - pinned`` unpinned (sink) + the most recent."""
    pinned = [f for f in frames if f.pinned]
    rest = [f for f in frames if not f.pinned]
    free = capacity - len(pinned)
    if len(rest) <= free:
        return frames
    keep: list[int] = []
    if free > 0:
        from .keyframes import storymem_retain

        own_sink = min(max(0, sink - len(pinned)), free)
        keep = [int(i) for i in storymem_retain(len(rest), sink=own_sink, max_frames=free)]
        if len(set(keep)) != len(keep) or len(keep) > free or any(not 0 <= i < len(rest) for i in keep):
            raise MemoryBankError(f"storymem_retain returned {keep} for {len(rest)} frames, max {free}")
    return _sort_frames([*pinned, *(rest[i] for i in keep)])


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


# ------------------------------------------------------------------------------------------ summary


def _bank_header(bank: MemoryBank) -> dict[str, Any]:
    """The scalar fields every serialisation of a bank starts with."""
    return {
        "format": BANK_FORMAT,
        "version": BANK_VERSION,
        "policy": bank.policy,
        "capacity": bank.capacity,
        "current_time": bank.current_time,
        "shots_done": bank.shots_done,
    }


def bank_to_dict(bank: MemoryBank) -> dict[str, Any]:
    """A JSON-able summary of a bank for logs and previews (no tensors)."""
    res = bank.resolution
    return {
        **_bank_header(bank),
        "resolution": None if res is None else list(res),
        "pools": {name: [f.summary() for f in bank.pool(name)] for name in POOLS},
        "archive": [f.frame_id for f in bank.archive],
    }


# -------------------------------------------------------------------------------------- persistence


def _bank_payload(bank: MemoryBank) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, metadata) of a bank: each unique frame's tensors once, pools as id lists."""
    tensors: dict[str, Tensor] = {}
    frames = []
    for n, f in enumerate(bank.frames()):
        latent_key = f"latent.{n}"
        tensors[latent_key] = f.latent.detach().cpu().contiguous().clone()
        clip_key = None
        if f.clip_embedding is not None:
            clip_key = f"clip.{n}"
            tensors[clip_key] = f.clip_embedding.detach().cpu().contiguous().clone()
        entry = {key: v for key, v in f.summary().items() if key != "has_clip"}
        frames.append({**entry, "latent": latent_key, "clip": clip_key})
    meta = {
        **_bank_header(bank),
        "frames": frames,
        "pools": {name: bank.frame_ids(name) for name in POOLS},
        "archive": [f.frame_id for f in bank.archive],
    }
    return tensors, meta


def _write_bytes(fh: BinaryIO, data: bytes) -> None:
    """Write all of ``data`` (a seam for tests that simulate a crash mid-write)."""
    fh.write(data)


def save_bank(bank: MemoryBank, path: str | os.PathLike[str]) -> Path:
    """Write ``bank`` to one ``.safetensors`` file, atomically -> the path written.

    The bytes go to a temp file in the same folder, are fsynced, then ``os.replace`` moves it over
    ``path``. On any error (or interrupt) the temp file is removed and an existing ``path`` is untouched.
    """
    from safetensors.torch import save

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors, meta = _bank_payload(bank)
    data = save(
        tensors, metadata={"format": BANK_FORMAT, _METADATA_KEY: json.dumps(meta, ensure_ascii=False)}
    )
    mode = target.stat().st_mode & 0o777 if target.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            _write_bytes(fh, data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)
    return target


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_bank(path: str | os.PathLike[str]) -> MemoryBank:
    """Read a bank written by ``save_bank``.

    Readable ``MemoryBankError`` for a missing file, a non-safetensors or truncated file, a safetensors
    file that is not a bank, a newer format version, or missing tensors.
    """
    from safetensors import safe_open

    source = Path(path)
    if not source.is_file():
        raise MemoryBankError(f"memory bank file {source} does not exist (or is not a file)")
    try:
        with safe_open(str(source), framework="pt", device="cpu") as fh:
            header = fh.metadata() or {}
            meta = _parse_metadata(header, source)
            keys = set(fh.keys())
            needed = _needed_tensors(meta, source)
            missing = sorted(set(needed) - keys)
            if missing:
                raise MemoryBankError(
                    f"memory bank file {source} is incomplete: frame {needed[missing[0]]!r} needs tensor "
                    f"{missing[0]!r}, which the file lacks ({len(missing)} tensors missing)"
                )
            tensors = {key: fh.get_tensor(key).clone() for key in needed}
    except MementoError:
        raise
    except Exception as exc:  # safetensors raises its own error type for a bad header / truncated file
        raise MemoryBankError(
            f"memory bank file {source} is not a readable .safetensors file (truncated or another "
            f"format): {exc}"
        ) from exc
    try:
        return _bank_from_payload(meta, tensors)
    except MementoError as exc:
        raise type(exc)(f"memory bank file {source}: {exc}") from exc
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MemoryBankError(f"memory bank file {source} has malformed metadata: {exc!r}") from exc


def _parse_metadata(header: Mapping[str, str], source: Path) -> dict[str, Any]:
    raw = header.get(_METADATA_KEY)
    if raw is None:
        raise MemoryBankError(
            f"{source} is a .safetensors file but not a Memento memory bank (no {_METADATA_KEY!r} metadata); "
            "is it a model or LoRA checkpoint?"
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise MemoryBankError(f"memory bank file {source}: its metadata is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != BANK_FORMAT:
        kind = meta.get("format") if isinstance(meta, dict) else None
        raise MemoryBankError(f"{source} is not a memory bank: format {kind!r}, expected {BANK_FORMAT!r}")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise MemoryBankError(f"memory bank file {source}: invalid format version {version!r}")
    if version > BANK_VERSION:
        raise MemoryBankError(
            f"memory bank file {source} has format version {version}, newer than this ComfyUI-Memento reads "
            f"(up to {BANK_VERSION}); update the node pack to load it"
        )
    return meta


def _needed_tensors(meta: Mapping[str, Any], source: Path) -> dict[str, str]:
    """tensor key -> frame id, for every tensor the metadata refers to."""
    needed: dict[str, str] = {}
    try:
        for entry in meta["frames"]:
            needed[str(entry["latent"])] = str(entry["id"])
            if entry.get("clip") is not None:
                needed[str(entry["clip"])] = str(entry["id"])
    except (KeyError, TypeError) as exc:
        raise MemoryBankError(f"memory bank file {source} has malformed frame metadata: {exc!r}") from exc
    return needed


def _bank_from_payload(meta: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> MemoryBank:
    frames: dict[str, MemoryFrame] = {}
    for entry in meta["frames"]:
        clip_key = entry.get("clip")
        frames[str(entry["id"])] = MemoryFrame(
            frame_id=str(entry["id"]),
            latent=tensors[str(entry["latent"])],
            abs_frame=int(entry["abs_frame"]),
            source=entry["source"],
            caption=str(entry.get("caption", "")),
            pinned=bool(entry.get("pinned", False)),
            shot=None if entry.get("shot") is None else int(entry["shot"]),
            camera=_camera_from(entry.get("camera")),
            clip_embedding=None if clip_key is None else tensors[str(clip_key)],
        )

    def resolve(ids: Sequence[str], where: str) -> tuple[MemoryFrame, ...]:
        unknown = [i for i in ids if i not in frames]
        if unknown:
            raise MemoryBankError(f"{where} refers to frames {unknown} that the file does not describe")
        return tuple(frames[i] for i in ids)

    pools = meta["pools"]
    return MemoryBank(
        policy=meta["policy"],
        capacity=int(meta["capacity"]),
        current_time=int(meta["current_time"]),
        shots_done=int(meta["shots_done"]),
        high=resolve(pools["high"], "pool 'high'"),
        low=resolve(pools["low"], "pool 'low'"),
        archive=resolve(meta.get("archive", []), "the archive"),
    )


def _camera_from(value: Sequence[float] | None) -> CameraPose | None:
    if value is None:
        return None
    x, z, yaw = (float(v) for v in value)
    if not all(math.isfinite(v) for v in (x, z, yaw)):
        raise MemoryBankError(f"camera pose {list(value)} is not finite")
    from .fov import CameraPose

    return CameraPose(x=x, z=z, yaw=yaw)
