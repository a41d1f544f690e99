"""Memento's memory (SPEC 4.3-4.6): a pool per expert, each selected by its own KeyframeQuery.

- Sampler: shift 5, boundary 0.9, CFG 3.5 (5.0 without a first frame: the reference adds 1.5), the
  time-aware negative RoPE positions, the memory slots re-noised at every step, the identity slot.
- Selection: a pool holding more than ``capacity`` frames keeps its pinned frames plus ``k_local`` +
  ``k_global`` picks of its expert's KeyframeQuery for the NEXT shot's prompt (6 local + 2 global; pins
  take slots from the local quota first); the rest are evicted. A pool within capacity is kept as is.
- Update: 8 evenly spaced frames of the finished shot (``round(i·(F-1)/7)``), each VAE-encoded alone,
  join both pools with their story time; the whole shot is kept.
- An empty memory is one zero latent frame (mask 1, position -2), as the released ``--m2v_first_shot``.

Options of the released pipeline (``pipeline_learnable_acce.py``), each as it defines them:

- ``fix`` (``--fix N``): over capacity, the first N frames of the pool (story order; pinned frames too)
  are kept in the local quota; the KeyframeQuery's 6 local picks (over all frames) that are not fixed
  fill the rest of the 6 in story order (earliest first), short lists are filled with the earliest
  other frames, and its 2 global picks that are not already kept are added.
- ``identity_back`` (``--idt_back_mode``): the identity slot after the memory (see ``conditioning``).
- ``storymem_mode`` (``--storymem_mode``): memory positions at a fixed spacing of 20 latent frames.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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
    empty_memory="zero_frame",
)
#: Memento's --storymem_mode spacing between memory frames, in latent frames.
STORYMEM_MODE_SPACING = 20
#: Memento's local picks (selected_local_num).
LOCAL_PICKS = 6


@register_policy
@dataclass(frozen=True)
class MementoPolicy(MemoryPolicy):
    """Memento: KeyframeQuery selection per expert (see the module docstring).

    capacity: memory frames per pool (8); n_global: global (identity) picks (2); frames_remembered:
    frames of each finished shot added to the bank (8); fix, identity_back, storymem_mode: the released
    pipeline's options (module docstring).
    """

    name: ClassVar[str] = "memento"
    menu_order: ClassVar[int] = 0
    shared_pool: ClassVar[bool] = False
    summary: ClassVar[str] = "a pool per expert, chosen by its KeyframeQuery (6 local + 2 global)"
    fix_option: ClassVar[str | None] = "fix"

    capacity: int = 8
    n_global: int = 2
    frames_remembered: int = 8
    fix: int = 0
    identity_back: bool = False
    storymem_mode: bool = False

    @property
    def sampler(self) -> SamplerDefaults:
        if not (self.identity_back or self.storymem_mode):
            return MEMENTO_SAMPLER
        scheme = "storymem" if self.storymem_mode else "memento"
        return replace(
            MEMENTO_SAMPLER, scheme=scheme, spacing=STORYMEM_MODE_SPACING, identity_back=self.identity_back
        )

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
        if self.fix > 0 and len(bank.pool(name)) > bank.capacity:
            return self._select_pool_fixed(bank, name, inputs)
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

    def _select_pool_fixed(
        self, bank: MemoryBank, name: str, inputs: SelectionInputs
    ) -> tuple[tuple[MemoryFrame, ...], PoolSelection]:
        """``--fix N`` as the released ``filter_memory_by_query`` applies it (module docstring)."""
        frames = bank.pool(name)
        n = len(frames)
        pinned = [f for f in frames if f.pinned]
        locked = sorted(set(range(min(self.fix, n))) | {i for i, f in enumerate(frames) if f.pinned})
        k_local = min(LOCAL_PICKS, n)
        k_global = min(self.n_global, max(1, n - k_local))
        picks = selector_for(inputs.selectors, name)(
            frames, bank.current_time, k_local=k_local, k_global=k_global
        )
        local, glob = checked_picks(picks, n, k_local, k_global, name)
        budget = LOCAL_PICKS
        remaining = sorted(i for i in set(local) if i not in locked)[: max(0, budget - len(locked))]
        selected = [*locked, *remaining]
        if len(selected) < budget:  # the released force-fill: local picks first, then story order
            rest = [i for i in range(n) if i not in selected]
            rest.sort(key=lambda i: i not in set(local))
            selected += rest[: budget - len(selected)]
        kept_set = set(selected)
        extra = [g for g in dict.fromkeys(glob) if g not in kept_set][: self.n_global]
        local_frames = [frames[i] for i in selected if i not in set(locked)]
        global_frames = [frames[i] for i in extra]
        kept = sort_frames([frames[i] for i in (*selected, *extra)])
        chosen = [*local_frames, *global_frames]
        record = pool_record(name, "kfq+fix", kept, frames, pinned, chosen, local_frames, global_frames)
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
            cameras=shot.cameras(video, indices),
            frames_per_shot=video.shape[1],
        )
        return Remembered(new, video, {})
