"""Memory selection: the selector contract, what a selection did to each pool, and KFQ / recency selectors.

A policy (``policy.MemoryPolicy``) chooses a shot's memory from a bank and reports it as a
:class:`Selection` (one :class:`PoolSelection` per expert pool). Memento's selection needs a
:class:`Selector` per pool: the expert's KeyframeQuery with the NEXT shot's prompt (:func:`kfq_selector`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from .frames import MemoryBankError, MemoryFrame, frame_ids, sort_frames, stack_latents

if TYPE_CHECKING:
    from ..fov import CameraPose

__all__ = [
    "PoolSelection",
    "Selection",
    "SelectionInputs",
    "Selector",
    "checked_picks",
    "kfq_selector",
    "pool_record",
    "recency_selector",
    "selector_for",
]


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
    recent), "fov" (camera retrieval), "memento+fov" or "manual" (user list). frame_ids: the pool after
    selection,
    ordered by abs_frame; chosen_ids: the unpinned frames kept; local_ids / global_ids: KFQ's picks
    (kfq only); pinned_ids: pinned frames (always kept); evicted_ids: frames that left the pool
    (dropped in memento/storymem, moved to the bank's archive in fov/manual); fov_ids: frames kept because
    their view overlaps the shot's camera; overlap: every candidate's id -> whether it overlaps.
    """

    pool: str
    method: str
    frame_ids: tuple[str, ...]
    chosen_ids: tuple[str, ...] = ()
    local_ids: tuple[str, ...] = ()
    global_ids: tuple[str, ...] = ()
    pinned_ids: tuple[str, ...] = ()
    evicted_ids: tuple[str, ...] = ()
    fov_ids: tuple[str, ...] = ()
    overlap: dict[str, bool] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "pool": self.pool,
            "method": self.method,
            "frame_ids": list(self.frame_ids),
            "chosen_ids": list(self.chosen_ids),
            "local_ids": list(self.local_ids),
            "global_ids": list(self.global_ids),
            "pinned_ids": list(self.pinned_ids),
            "evicted_ids": list(self.evicted_ids),
        }
        if self.overlap or self.fov_ids:  # camera policies: which candidates overlap, which came from it
            out |= {"fov_ids": list(self.fov_ids), "overlap": dict(self.overlap)}
        return out


@dataclass(frozen=True)
class Selection:
    """The outcome of a policy's selection (``MemoryPolicy.select``): a ``PoolSelection`` per pool."""

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


@dataclass(frozen=True)
class SelectionInputs:
    """What a selection may use; each policy reads what it needs.

    selectors: per pool ("high"/"low") the expert's KeyframeQuery selector for the NEXT shot (memento),
    or one selector for both; targets: the next shot's camera pose(s) (camera policies); keep_ids: the
    frame ids to keep (manual); options: retrieval options (fov: ``fov_deg``, ``near``, ``far``, ``k``).
    """

    selectors: Selector | Mapping[str, Selector] | None = None
    targets: CameraPose | Sequence[CameraPose] | None = None
    keep_ids: Sequence[str] | None = None
    options: Mapping[str, float] = field(default_factory=dict)


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
        from ..keyframe_query import candidate_positions

        param = next(iter(kfq.parameters()), None) if hasattr(kfq, "parameters") else None
        device = param.device if param is not None else torch.device("cpu")
        latents = stack_latents(frames).to(device=device)  # float32: the KFQ scores in float32
        rel = [f.abs_frame - current_time for f in frames]
        pos = candidate_positions(rel, current_time).to(device)
        return kfq.select(latents, pos, ctx, ctx_global, k_local=k_local, k_global=k_global)

    return select


def checked_picks(
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


def pool_record(
    pool: str,
    method: str,
    kept: Sequence[MemoryFrame],
    before: Sequence[MemoryFrame],
    pinned: Sequence[MemoryFrame],
    chosen: Sequence[MemoryFrame],
    local: Sequence[MemoryFrame] = (),
    glob: Sequence[MemoryFrame] = (),
) -> PoolSelection:
    """The record of one pool's selection: ``kept`` from ``before``; ``chosen`` the frames picked."""
    kept_ids = {f.frame_id for f in kept}
    return PoolSelection(
        pool=pool,
        method=method,
        frame_ids=frame_ids(kept),
        chosen_ids=frame_ids(sort_frames(f for f in chosen if not f.pinned)),
        local_ids=frame_ids(sort_frames(local)),
        global_ids=frame_ids(sort_frames(glob)),
        pinned_ids=frame_ids(pinned),
        evicted_ids=tuple(f.frame_id for f in before if f.frame_id not in kept_ids),
    )


def selector_for(selectors: Selector | Mapping[str, Selector] | None, pool: str) -> Selector:
    """The selector of ``pool`` (one for both pools, or a mapping by pool name), or a readable error."""
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
