"""StoryMem's memory, as its released code runs it (SPEC 5; Kevin-thu/StoryMem, December 2025).

- Sampler (``wan/configs/wan_m2v_A14B.py``, ``pipeline.py``): shift 4.0, boundary 0.9 (13 high + 27 low
  steps at 40), CFG 3.5 on every shot (no boost on cuts; the T2V first shot too), sequential RoPE over
  ``[memory | target]`` (the released model code; the paper's negative spacing is ``scheme="storymem"``),
  memory slots start as noise and are not re-noised, no identity slot, one pool for both experts.
- A shot is conditioned on the whole bank as it stood after the previous shot (at most ``capacity``).
- Update (``extract_keyframes.py``): a continuation's first 1 (MI2V) or 5 (MM2V) frames repeat the
  previous shot and are dropped (from the saved shot too); CLIP keyframes of the rest
  (:func:`memento_core.keyframes.storymem_keyframes`: threshold from 0.9 down by 0.01 until at most 3,
  scan from frame 2, duplicates > 0.9 of any keyframe ever stored dropped, an optional aesthetic
  filter); each keyframe is VAE-encoded alone with its embedding.
- Retention: the first ``sink`` frames ever stored (references first; pinned frames count) plus the most
  recent, up to ``capacity`` (10: the README and the authors' training; the code's default is 8). Frames
  that fall out move to the bank's archive, so the duplicate check still sees every keyframe ever stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..adapters import encode_frames
from ..conditioning import continuation_frames
from ..errors import MementoError
from .bank import MemoryBank
from .frames import POOLS, MemoryBankError, MemoryFrame, sort_frames
from .policy import FinishedShot, MemoryPolicy, MemoryTools, Remembered, SamplerDefaults
from .positions import PositionScheme
from .registry import register_policy
from .selection import Selection, SelectionInputs, pool_record

__all__ = ["StoryMemPolicy"]

#: StoryMem's permanent sink: the first 3 keyframes ever stored (``--fix 3``).
STORYMEM_SINK = 3


@register_policy
@dataclass(frozen=True)
class StoryMemPolicy(MemoryPolicy):
    """StoryMem: CLIP keyframes, a permanent sink and the most recent (see the module docstring).

    capacity: frames a shot is conditioned on, sink included (10); sink: first frames kept forever (3);
    max_keyframes .. aesthetic_min: the keyframe rule's parameters; scheme: "sequential" (released
    code) or "storymem" (the paper's fixed negative spacing).
    """

    name: ClassVar[str] = "storymem"
    menu_order: ClassVar[int] = 1
    shared_pool: ClassVar[bool] = True
    needs_embedder: ClassVar[bool] = True
    summary: ClassVar[str] = "one pool: CLIP keyframes, the first 3 kept + the most recent (10 in all)"
    fix_option: ClassVar[str | None] = "sink"

    capacity: int = 10
    sink: int = STORYMEM_SINK
    max_keyframes: int = 3
    start_threshold: float = 0.9
    threshold_step: float = 0.01
    duplicate_threshold: float = 0.9
    aesthetic_min: float = 3.0
    scheme: PositionScheme = "sequential"

    def __post_init__(self) -> None:
        if self.scheme not in ("sequential", "storymem"):
            raise MementoError(
                f"storymem policy: scheme must be 'sequential' or 'storymem', got {self.scheme!r}"
            )
        if not 0 <= self.sink <= self.capacity:
            raise MementoError(
                f"storymem policy: sink must lie in [0, capacity={self.capacity}], got {self.sink}"
            )

    @property
    def sampler(self) -> SamplerDefaults:
        return SamplerDefaults(
            shift=4.0,
            boundary=0.9,
            guidance=3.5,
            cut_guidance=3.5,
            scheme=self.scheme,
            renoise_memory=False,
            identity_slot=False,
            t2v_guidance=3.5,
        )

    def retain(self, bank: MemoryBank) -> MemoryBank:
        """Pinned + the first ``sink - pinned`` unpinned frames + the most recent, up to the capacity."""
        frames = bank.pool("high")
        kept = retained_frames(frames, bank.capacity, self.sink)
        if len(kept) == len(frames):
            return bank
        kept_ids = {f.frame_id for f in kept}
        archive = sort_frames([*bank.archive, *(f for f in frames if f.frame_id not in kept_ids)])
        return bank.with_pools(kept, archive=archive)

    def select(
        self, bank: MemoryBank, inputs: SelectionInputs = SelectionInputs()
    ) -> tuple[MemoryBank, Selection]:
        """The whole bank as it stood after the last update (retention already applied)."""
        chosen = self.retain(bank)
        kept = chosen.pool("high")
        pinned = [f for f in kept if f.pinned]
        records = tuple(
            pool_record(name, "storymem", kept, bank.pool("high"), pinned, kept) for name in POOLS
        )
        return chosen, Selection(bank.policy, bank.current_time, records)

    def kept_frames(self, video, mode: str):  # type: ignore[no-untyped-def]
        """Without the frames a continuation repeats from the previous shot: 1 (MI2V) or 5 (MM2V)."""
        drop = continuation_frames(mode) if mode in ("mi2v", "mm2v") else 0
        return video[:, drop:]

    def remember(self, bank: MemoryBank, shot: FinishedShot, tools: MemoryTools) -> Remembered:
        """CLIP keyframes of the kept frames, encoded one by one, then sink + recent."""
        from ..keyframes import storymem_keyframes

        if tools.embedder is None:
            raise MemoryBankError(
                "the storymem policy picks keyframes with CLIP image embeddings: give it an image embedder "
                "(a CLIP ViT-B/32 file in the model config, or a CLIP_VISION input in ComfyUI)"
            )
        video = self.kept_frames(shot.video, shot.mode)
        frames01 = ((video.float() + 1.0) / 2.0).clamp(0.0, 1.0).permute(1, 0, 2, 3)  # [F, 3, H, W]
        indices, embeddings = storymem_keyframes(
            frames01,
            tools.embedder,
            stored=bank.all_clip_embeddings(),
            scorer=tools.scorer,
            aesthetic_min=self.aesthetic_min,
            max_keyframes=self.max_keyframes,
            start_threshold=self.start_threshold,
            threshold_step=self.threshold_step,
            duplicate_threshold=self.duplicate_threshold,
        )
        if indices:
            new = bank.with_shot(
                encode_frames(tools.vae, video, indices),
                frame_indices=indices,
                prompt=shot.prompt,
                shot_index=shot.shot_index,
                cameras=shot.cameras(video, indices),
                clip_embeddings=embeddings.float().contiguous(),
                frames_per_shot=video.shape[1],
            )
        else:
            new = bank.with_time_advanced(video.shape[1])
        return Remembered(new, video, {"keyframes": list(indices), "bank_ids": new.frame_ids("high")})


def retained_frames(frames: tuple[MemoryFrame, ...], capacity: int, sink: int) -> tuple[MemoryFrame, ...]:
    """StoryMem retention of frames in story order: pinned frames, the first ``sink - pinned`` unpinned
    ones (the sink) and the most recent, ``capacity`` in all (``keyframes.storymem_retain``)."""
    from ..keyframes import storymem_retain

    pinned = [f for f in frames if f.pinned]
    rest = [f for f in frames if not f.pinned]
    free = capacity - len(pinned)
    if len(rest) <= free:
        return frames
    keep: list[int] = []
    if free > 0:
        own_sink = min(max(0, sink - len(pinned)), free)
        keep = [int(i) for i in storymem_retain(len(rest), sink=own_sink, max_frames=free)]
        if len(set(keep)) != len(keep) or len(keep) > free or any(not 0 <= i < len(rest) for i in keep):
            raise MemoryBankError(f"storymem_retain returned {keep} for {len(rest)} frames, max {free}")
    return sort_frames([*pinned, *(rest[i] for i in keep)])
