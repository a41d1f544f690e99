"""Policies that choose memory by what the next shot looks at, or by hand, over one shared pool.

- ``fov`` (Context-as-Memory): the frames whose camera view overlaps the next shot's camera
  (:func:`memento_core.fov.retrieve_by_fov`), from the pool and the archive (frames left out stay
  candidates: the whole history is memory), at most ``k`` (default: the capacity) with the pinned ones.
- ``manual``: the pinned frames plus the frames listed by id.

Both keep the sampler settings and the memory update of their ``base`` policy (Memento by default):
Context-as-Memory's retrieval is model-agnostic and runs on our backbones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from .bank import MemoryBank
from .frames import POOLS, MemoryBankError, MemoryFrame, sort_frames
from .policy import FinishedShot, MemoryPolicy, MemoryTools, Remembered, SamplerDefaults
from .registry import get_policy, register_policy
from .selection import Selection, SelectionInputs, pool_record

__all__ = ["FovPolicy", "ManualPolicy"]


@dataclass(frozen=True)
class _SharedChoice(MemoryPolicy):
    """A shared pool chosen per shot; the rest of the history waits in the archive."""

    shared_pool: ClassVar[bool] = True

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

    def _choice(
        self, bank: MemoryBank, method: str, pinned: list[MemoryFrame], chosen: list[MemoryFrame]
    ) -> tuple[MemoryBank, Selection]:
        """Pool = pinned + chosen; every other frame goes to (or stays in) the archive."""
        kept = sort_frames([*pinned, *chosen])
        kept_ids = {f.frame_id for f in kept}
        archive = [f for f in (*bank.high, *bank.archive) if f.frame_id not in kept_ids]
        records = tuple(pool_record(name, method, kept, bank.high, pinned, chosen) for name in POOLS)
        return bank.with_pools(kept, archive=archive), Selection(bank.policy, bank.current_time, records)


@register_policy
@dataclass(frozen=True)
class FovPolicy(_SharedChoice):
    """Context-as-Memory retrieval by camera field-of-view overlap (see the module docstring)."""

    name: ClassVar[str] = "fov"
    requires: ClassVar[tuple[str, ...]] = ("targets",)
    summary: ClassVar[str] = "one pool: the frames whose camera view overlaps the next shot's"

    def select(
        self, bank: MemoryBank, inputs: SelectionInputs = SelectionInputs()
    ) -> tuple[MemoryBank, Selection]:
        """``inputs.targets``: the next shot's pose(s); options ``fov_deg``, ``near``, ``far``, ``k``."""
        from ..fov import retrieve_by_fov

        targets = inputs.targets
        if targets is None:
            raise MemoryBankError(
                "select_for_shot: the fov policy needs targets= (the next shot's camera(s))"
            )
        target_list = [targets] if hasattr(targets, "yaw") else list(targets)  # type: ignore[arg-type]
        if not target_list:
            raise MemoryBankError("select_for_shot: targets= is empty; give the next shot's camera pose(s)")
        options = {key: v for key, v in inputs.options.items() if key != "k" and v is not None}
        k = inputs.options.get("k")
        pinned = [f for f in bank.high if f.pinned]
        candidates = sort_frames([f for f in (*bank.high, *bank.archive) if not f.pinned])
        budget = min(bank.capacity if k is None else int(k), bank.capacity) - len(pinned)
        chosen: list[MemoryFrame] = []
        if budget > 0 and candidates:
            cams = [f.camera for f in candidates]
            picked = [int(i) for i in retrieve_by_fov(cams, target_list, k=budget, **options)]
            if len(set(picked)) != len(picked) or len(picked) > budget:
                raise MemoryBankError(
                    f"fov retrieval returned {picked}; expected at most {budget} distinct picks"
                )
            chosen = [candidates[i] for i in picked]
        return self._choice(bank, "fov", pinned, chosen)


@register_policy
@dataclass(frozen=True)
class ManualPolicy(_SharedChoice):
    """The pinned frames plus the frames listed in ``inputs.keep_ids`` (from the pool or the archive)."""

    name: ClassVar[str] = "manual"
    requires: ClassVar[tuple[str, ...]] = ("keep_ids",)
    summary: ClassVar[str] = "one pool: the frames listed by id"

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
        return self._choice(bank, "manual", pinned, chosen)
