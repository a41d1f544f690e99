"""Memento's memory (SPEC 4.3-4.6): a pool per expert, each selected by its own KeyframeQuery.

- Sampler: shift 5, boundary 0.9, CFG 3.5 (5.0 without a first frame: the reference adds 1.5), the
  time-aware negative RoPE positions, the memory slots re-noised at every step, the identity slot.
- Selection: a pool holding more than ``capacity`` frames keeps its pinned frames plus ``k_local`` +
  ``k_global`` picks of its expert's KeyframeQuery for the NEXT shot's prompt (6 local + 2 global; pins
  take slots from the local quota first); the rest are evicted. A pool within capacity is kept as is.
- Update: 8 evenly spaced frames of the finished shot (``round(i·(F-1)/7)``), each VAE-encoded alone,
  join both pools with their story time; the whole shot is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..adapters import encode_frames
from .bank import MemoryBank
from .frames import POOLS, MemoryFrame, sort_frames
from .policy import FinishedShot, MemoryPolicy, MemoryTools, Remembered, SamplerDefaults
from .positions import memento_sample_indices
from .registry import register_policy
from .selection import PoolSelection, Selection, SelectionInputs, checked_picks, pool_record, selector_for

__all__ = ["MementoPolicy"]

MEMENTO_SAMPLER = SamplerDefaults(
    shift=5.0,
    boundary=0.9,
    guidance=3.5,
    cut_guidance=5.0,
    scheme="memento",
    renoise_memory=True,
    identity_slot=True,
)


@register_policy
@dataclass(frozen=True)
class MementoPolicy(MemoryPolicy):
    """Memento: KeyframeQuery selection per expert (see the module docstring).

    capacity: memory frames per pool (8); n_global: global (identity) picks (2); frames_remembered:
    frames of each finished shot added to the bank (8).
    """

    name: ClassVar[str] = "memento"
    shared_pool: ClassVar[bool] = False
    summary: ClassVar[str] = "a pool per expert, chosen by its KeyframeQuery (6 local + 2 global)"

    capacity: int = 8
    n_global: int = 2
    frames_remembered: int = 8

    @property
    def sampler(self) -> SamplerDefaults:
        return MEMENTO_SAMPLER

    def select(
        self, bank: MemoryBank, inputs: SelectionInputs = SelectionInputs()
    ) -> tuple[MemoryBank, Selection]:
        """Per pool over capacity: pinned + that pool's selector's picks (``inputs.selectors``)."""
        results = {name: self._select_pool(bank, name, inputs) for name in POOLS}
        chosen = bank.with_pools(results["high"][0], results["low"][0])
        records = tuple(record for _, record in results.values())
        return chosen, Selection(bank.policy, bank.current_time, records)

    def _select_pool(
        self, bank: MemoryBank, name: str, inputs: SelectionInputs
    ) -> tuple[tuple[MemoryFrame, ...], PoolSelection]:
        frames = bank.pool(name)
        pinned = [f for f in frames if f.pinned]
        candidates = tuple(f for f in frames if not f.pinned)
        free = bank.capacity - len(pinned)
        if len(candidates) <= free:
            return frames, pool_record(name, "all", frames, frames, pinned, frames)
        k_global = min(max(self.n_global, 0), free)
        k_local = free - k_global
        local: list[int] = []
        glob: list[int] = []
        if free > 0:
            picks = selector_for(inputs.selectors, name)(
                candidates, bank.current_time, k_local=k_local, k_global=k_global
            )
            local, glob = checked_picks(picks, len(candidates), k_local, k_global, name)
        local_frames = [candidates[i] for i in local]
        global_frames = [candidates[i] for i in glob]
        chosen = [*local_frames, *global_frames]
        kept = sort_frames([*pinned, *chosen])
        record = pool_record(
            name, "kfq", kept, frames, pinned, chosen, local=local_frames, glob=global_frames
        )
        return kept, record

    def remember(self, bank: MemoryBank, shot: FinishedShot, tools: MemoryTools) -> Remembered:
        """Encode ``frames_remembered`` evenly spaced frames one by one and add them to both pools."""
        video = self.kept_frames(shot.video, shot.mode)
        indices = memento_sample_indices(self.frames_remembered, last=video.shape[1] - 1)
        new = bank.with_shot(
            encode_frames(tools.vae, video, indices),
            frame_indices=indices,
            prompt=shot.prompt,
            shot_index=shot.shot_index,
            frames_per_shot=video.shape[1],
        )
        return Remembered(new, video, {})
