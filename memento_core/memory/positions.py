"""Temporal RoPE positions of memory frames (SPEC 4.3, 5) and the frames a Memento shot remembers.

Three schemes place a shot ``[identity | memory | target]`` on the time axis:

- ``memento``: time-aware negative positions from each frame's story time; identity at -512.
- ``storymem``: StoryMem's paper, fixed negative spacing: memory ``j`` of ``M`` at ``-(M-j)·S``
  (S = 5; Memento's ``--storymem_mode`` uses S = 20 latent frames, with its identity slot at -512).
- ``sequential``: StoryMem's released model code: memory ``0..M-1``, target ``M..M+T-1``.

Memento's ``--idt_back_mode`` places the identity slot after the memory, at the last memory position
+ 5 (clamped to [-512, 511]). A frame without a story time (the zero placeholder of a first shot from
an empty memory) is treated as lying ``PLACEHOLDER_OFFSET`` pixel frames before the shot: memento
position -2, the spacing the released code falls back to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from .frames import FRAMES_PER_SHOT, MAX_POSITION, MIN_POSITION, TEMPORAL_STRIDE

__all__ = [
    "PLACEHOLDER_OFFSET",
    "SCHEMES",
    "STORYMEM_SPACING",
    "PositionScheme",
    "frame_positions",
    "memento_sample_indices",
    "memory_positions",
    "memory_slot_positions",
    "sequential_positions",
    "storymem_positions",
]

PositionScheme = Literal["memento", "storymem", "sequential"]
SCHEMES: tuple[str, ...] = ("memento", "storymem", "sequential")
#: StoryMem's fixed RoPE spacing S between memory frames.
STORYMEM_SPACING = 5
#: Story time of a memory frame that has none, relative to the shot (2 latent frames before it).
PLACEHOLDER_OFFSET = -8
#: Memento's idt_back_mode: the identity slot sits this many positions after the last memory frame.
IDENTITY_BACK_STEP = 5


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


def memory_slot_positions(
    positions: Sequence[int], n_memory: int, identity: bool, identity_back: bool = False
) -> list[int]:
    """The memory frames' entries of a shot's ``frame_positions`` (slot order), leaving out the identity
    slot (first, or after the memory with ``identity_back``) and the target."""
    start = 1 if identity and not identity_back else 0
    return [int(p) for p in positions[start : start + n_memory]]


def frame_positions(
    scheme: PositionScheme,
    abs_frames: Sequence[int],
    current_time: int,
    n_target: int = 21,
    identity: bool = False,
    spacing: int = STORYMEM_SPACING,
    identity_back: bool = False,
) -> Tensor:
    """Time positions of a shot ``[identity | memory | target]`` -> LongTensor [n_identity + M + n_target].

    memento: identity -512, memory from ``memory_positions``, target ``k`` at ``k``.
    storymem: memory ``-(M-j)·spacing``, target ``k`` at ``k`` (identity -512 when present).
    sequential: memory ``0..M-1``, target ``k`` at ``M + k`` (no identity slot). ``abs_frames`` (M
    entries, in slot order) only count the memory frames in the storymem and sequential schemes.
    identity_back: the order is ``[memory | identity | target]`` and the identity sits at the last
    memory position + 5 (0 + 5 without memory), clamped to [-512, 511] (Memento's idt_back_mode).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"frame_positions: scheme must be one of {SCHEMES}, got {scheme!r}")
    if identity and scheme == "sequential":
        raise ValueError("frame_positions: the sequential scheme has no identity slot")
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
    if not identity:
        return torch.tensor(memory + target, dtype=torch.long)
    if identity_back:
        last = memory[-1] if memory else 0
        back = min(max(last + IDENTITY_BACK_STEP, MIN_POSITION), MAX_POSITION)
        return torch.tensor([*memory, back, *target], dtype=torch.long)
    return torch.tensor([MIN_POSITION, *memory, *target], dtype=torch.long)
