"""Policies that choose memory by what the next shot looks at (Context-as-Memory, SPEC 6), or by hand.

The camera policies keep the whole history (selection never evicts: frames left out wait in the bank's
archive, up to ``history`` frames, the oldest unpinned dropped first), so a place left for several shots
can still be recalled. Their positions, re-noising, sampler settings and memory update are those of
their ``base`` policy (Memento by default); a remembered frame keeps the camera pose of its frame.

- ``fov`` (Context-as-Memory): the candidates whose view overlaps the next shot's camera (SPEC 6's sector
  intersection, or the paper's edge rays with ``rule="rays"``; a trajectory counts its start, middle and
  end poses); each run of hits that are consecutive frames of one shot collapses to its middle frame; the
  most recent ``k`` (default: the capacity) are kept with the pinned frames. No overlap: an empty memory.
- ``memento+fov``: the overlapping candidates first; each expert's KeyframeQuery picks 6 local + 2 global
  among them; when fewer overlap than the capacity, all of them are kept and the KeyframeQuery fills the
  remaining slots from the other candidates (the record says which frames came from which rule).
- ``manual``: the pinned frames plus the frames listed by id.

A shot without a camera is given the most recent frames (``fov``) or the KeyframeQuery's picks among all
candidates (``memento+fov``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

from ..fov import collapse_runs, overlaps
from .bank import MemoryBank
from .frames import POOLS, MemoryBankError, MemoryFrame, sort_frames
from .policy import FinishedShot, MemoryPolicy, MemoryTools, Remembered, SamplerDefaults
from .registry import get_policy, register_policy
from .selection import Selection, SelectionInputs, checked_picks, pool_record, selector_for

__all__ = ["FovPolicy", "ManualPolicy", "MementoFovPolicy"]

#: Context-as-Memory keeps every earlier frame; this many at most (SPEC 6).
HISTORY = 256


@dataclass(frozen=True)
class _FollowsBase(MemoryPolicy):
    """A policy whose sampler settings, kept frames and memory update are its ``base`` policy's."""

    capacity: int = 8
    base: str = "memento"

    @property
    def sampler(self) -> SamplerDefaults:
        return get_policy(self.base).sampler

    def kept_frames(self, video, mode: str):  # type: ignore[no-untyped-def]
        return get_policy(self.base).kept_frames(video, mode)

    def remember(self, bank: MemoryBank, shot: FinishedShot, tools: MemoryTools) -> Remembered:
        """The base policy's update, onto this bank."""
        return get_policy(self.base, capacity=bank.capacity).remember(bank, shot, tools)


@dataclass(frozen=True)
class _HistoryPolicy(_FollowsBase):
    """Keeps the history (at most ``history`` frames); otherwise the base policy's behaviour."""

    history: int = HISTORY

    def retain(self, bank: MemoryBank) -> MemoryBank:
        """At most ``history`` unpinned frames: the oldest go first."""
        unpinned = [f for f in bank.frames() if not f.pinned]
        if len(unpinned) <= self.history:
            return bank
        return bank.without_frames(f.frame_id for f in unpinned[: len(unpinned) - self.history])

    def _overlap(self, frames: Sequence[MemoryFrame], inputs: SelectionInputs) -> dict[str, bool] | None:
        """Candidate id -> overlaps the target camera(s); None without a target camera."""
        targets = inputs.targets
        if targets is None:
            return None
        target_list = [targets] if hasattr(targets, "yaw") else list(targets)  # type: ignore[arg-type]
        if not target_list:
            return None
        opts = dict(inputs.options)
        hits = overlaps(
            [f.camera for f in frames],
            target_list,
            str(opts.get("rule", "sector")),
            float(opts.get("near", 0.1)),
            float(opts.get("far", 30.0)),
        )
        return {f.frame_id: hit for f, hit in zip(frames, hits, strict=True)}

    def _with_history(
        self, bank: MemoryBank, high: Sequence[MemoryFrame], low: Sequence[MemoryFrame]
    ) -> MemoryBank:
        """Pools as chosen; every other frame of the history waits in the archive."""
        kept = {f.frame_id for f in (*high, *low)}
        archive = [f for f in bank.frames() if f.frame_id not in kept]
        return bank.with_pools(sort_frames(high), sort_frames(low), archive)


@register_policy
@dataclass(frozen=True)
class FovPolicy(_HistoryPolicy):
    """Context-as-Memory retrieval by camera field-of-view overlap (see the module docstring).

    k: at most this many retrieved frames (None: the capacity); rule: "sector" (SPEC 6) or "rays" (the
    paper's edge-ray test); near, far: the view depth in metres.
    """

    name: ClassVar[str] = "fov"
    menu_order: ClassVar[int] = 2
    shared_pool: ClassVar[bool] = True
    summary: ClassVar[str] = (
        "one pool: the frames whose camera view overlaps the next shot's (Context-as-Memory)"
    )

    k: int | None = None
    rule: str = "sector"
    near: float = 0.1
    far: float = 30.0

    def select(
        self, bank: MemoryBank, inputs: SelectionInputs = SelectionInputs()
    ) -> tuple[MemoryBank, Selection]:
        """``inputs.targets``: the next shot's pose(s) (None: the most recent frames)."""
        frames = bank.frames()
        pinned = [f for f in frames if f.pinned]
        candidates = [f for f in frames if not f.pinned]
        k = inputs.options.get("k", self.k)
        budget = max(0, min(bank.capacity if k is None else int(k), bank.capacity) - len(pinned))
        options = {"rule": self.rule, "near": self.near, "far": self.far, **inputs.options}
        overlap = self._overlap(candidates, SelectionInputs(targets=inputs.targets, options=options))
        if overlap is None:  # no camera: the most recent frames
            chosen = candidates[len(candidates) - budget :] if budget else []
            method, fov_ids = "fov (no camera: most recent)", ()
        else:
            hits = [i for i, f in enumerate(candidates) if overlap[f.frame_id]]
            picks = collapse_runs(hits, [f.shot for f in candidates])
            chosen = [candidates[i] for i in (picks[len(picks) - budget :] if budget else [])]
            method, fov_ids = "fov", tuple(f.frame_id for f in sort_frames(chosen))
        kept = sort_frames([*pinned, *chosen])
        record = pool_record("high", method, kept, bank.high, pinned, chosen)
        records = tuple(replace(record, pool=name, fov_ids=fov_ids, overlap=overlap or {}) for name in POOLS)
        return self._with_history(bank, kept, kept), Selection(bank.policy, bank.current_time, records)


@register_policy
@dataclass(frozen=True)
class MementoFovPolicy(_HistoryPolicy):
    """The overlap filter, then each expert's KeyframeQuery (see the module docstring)."""

    name: ClassVar[str] = "memento+fov"
    menu_order: ClassVar[int] = 3
    shared_pool: ClassVar[bool] = False
    summary: ClassVar[str] = "a pool per expert: the overlapping frames first, then its KeyframeQuery's picks"

    n_global: int = 2
    rule: str = "sector"
    near: float = 0.1
    far: float = 30.0

    def select(
        self, bank: MemoryBank, inputs: SelectionInputs = SelectionInputs()
    ) -> tuple[MemoryBank, Selection]:
        frames = bank.frames()
        pinned = [f for f in frames if f.pinned]
        candidates = tuple(f for f in frames if not f.pinned)
        options = {"rule": self.rule, "near": self.near, "far": self.far, **inputs.options}
        overlap = self._overlap(candidates, SelectionInputs(targets=inputs.targets, options=options))
        survivors = tuple(f for f in candidates if overlap and overlap[f.frame_id])
        rest = tuple(f for f in candidates if not (overlap and overlap[f.frame_id]))
        free = max(0, bank.capacity - len(pinned))
        pools, records = {}, []
        for name in POOLS:
            if len(survivors) > free:  # more overlap than fits: the KeyframeQuery picks among them
                local, glob = self._picks(survivors, free, bank, name, inputs)
                fov_kept: list[MemoryFrame] = []
            else:  # all of them, and the KeyframeQuery fills the rest from the other candidates
                local, glob = self._picks(rest, free - len(survivors), bank, name, inputs)
                fov_kept = list(survivors)
            chosen = [*fov_kept, *local, *glob]
            kept = sort_frames([*pinned, *chosen])
            record = pool_record(name, self.name, kept, bank.pool(name), pinned, chosen, local, glob)
            fov_ids = tuple(f.frame_id for f in sort_frames(fov_kept))
            records.append(replace(record, fov_ids=fov_ids, overlap=overlap or {}))
            pools[name] = kept
        chosen_bank = self._with_history(bank, pools["high"], pools["low"])
        return chosen_bank, Selection(bank.policy, bank.current_time, tuple(records))

    def _picks(
        self,
        frames: tuple[MemoryFrame, ...],
        slots: int,
        bank: MemoryBank,
        pool: str,
        inputs: SelectionInputs,
    ) -> tuple[list[MemoryFrame], list[MemoryFrame]]:
        """``slots`` frames of ``frames`` by the pool's KeyframeQuery (all of them when they fit)."""
        if slots <= 0 or not frames:
            return [], []
        if len(frames) <= slots:
            return list(frames), []
        k_global = min(max(self.n_global, 0), slots)
        k_local = slots - k_global
        picks = selector_for(inputs.selectors, pool)(
            frames, bank.current_time, k_local=k_local, k_global=k_global
        )
        local, glob = checked_picks(picks, len(frames), k_local, k_global, pool)
        return [frames[i] for i in local], [frames[i] for i in glob]


@register_policy
@dataclass(frozen=True)
class ManualPolicy(_FollowsBase):
    """The pinned frames plus the frames listed in ``inputs.keep_ids`` (from the pool or the archive)."""

    name: ClassVar[str] = "manual"
    menu_order: ClassVar[int] = 9
    shared_pool: ClassVar[bool] = True
    summary: ClassVar[str] = "one pool: the frames listed by id"
    requires: ClassVar[tuple[str, ...]] = ("keep_ids",)

    def select(
        self, bank: MemoryBank, inputs: SelectionInputs = SelectionInputs()
    ) -> tuple[MemoryBank, Selection]:
        keep_ids: Sequence[str] | None = inputs.keep_ids
        if keep_ids is None:
            raise MemoryBankError("select_for_shot: the manual policy needs keep_ids= (frame ids to keep)")
        wanted = list(dict.fromkeys(keep_ids))
        available = {f.frame_id: f for f in (*bank.high, *bank.archive)}
        unknown = [i for i in wanted if i not in available]
        if unknown:
            raise MemoryBankError(
                f"select_for_shot: frame ids {unknown} are not in the memory bank; "
                f"available: {sorted(available)}"
            )
        pinned = [f for f in bank.high if f.pinned]
        chosen = [available[i] for i in wanted if not available[i].pinned]
        if len(pinned) + len(chosen) > bank.capacity:
            raise MemoryBankError(
                f"select_for_shot: {len(chosen)} listed + {len(pinned)} pinned frames exceed the memory "
                f"capacity {bank.capacity}"
            )
        kept = sort_frames([*pinned, *chosen])
        kept_ids = {f.frame_id for f in kept}
        archive = [f for f in (*bank.high, *bank.archive) if f.frame_id not in kept_ids]
        records = tuple(pool_record(name, "manual", kept, bank.high, pinned, chosen) for name in POOLS)
        return bank.with_pools(kept, archive=archive), Selection(bank.policy, bank.current_time, records)
