"""Tests of memento_core.memory: positions, bank bookkeeping over shots, policies, immutability, persistence.

Expected values are written out by hand from SPEC 4.3 / 4.6 / 5 (not recomputed with the code under
test). The modules ``keyframes`` (storymem_retain), ``fov`` (CameraPose, retrieve_by_fov) and
``keyframe_query`` (candidate_positions) are replaced by small fakes with known answers, so these tests
check the bank alone.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from memento_core import memory
from memento_core.errors import MementoError, ShapeError
from memento_core.memory import (
    MemoryBank,
    MemoryBankError,
    MemoryFrame,
    bank_to_dict,
    frame_positions,
    kfq_selector,
    load_bank,
    memento_sample_indices,
    memory_positions,
    recency_selector,
    save_bank,
    sequential_positions,
    storymem_positions,
)

H, W = 4, 6
SHOT_1_ABS = [0, 11, 23, 34, 46, 57, 69, 80]
SHOT_2_ABS = [81, 92, 104, 115, 127, 138, 150, 161]  # 81 + the sample indices


def latents(n: int, base: float = 0.0, h: int = H, w: int = W) -> torch.Tensor:
    """[n, 16, h, w] whose frame i is filled with ``base + i`` plus a ramp (distinct, easy to trace)."""
    ramp = torch.arange(16 * h * w, dtype=torch.float32).reshape(16, h, w) / 1000
    return torch.stack([ramp + base + i for i in range(n)])


def patch_module(monkeypatch: pytest.MonkeyPatch, name: str, **attrs: Any) -> None:
    """Set ``attrs`` on module ``name``: the real one when importable, else a fake in ``sys.modules``."""
    try:
        module = importlib.import_module(name)
    except Exception:
        module = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, module)
    for key, value in attrs.items():
        monkeypatch.setattr(module, key, value, raising=False)


class FakePose(NamedTuple):
    x: float
    z: float
    yaw: float
    fov: float = 60.0


def fake_storymem_retain(n_frames: int, sink: int = 3, max_frames: int = 8) -> list[int]:
    """Sink (first ``sink``) + the most recent ``max_frames - sink`` (SPEC 5)."""
    if n_frames <= max_frames:
        return list(range(n_frames))
    return list(range(sink)) + list(range(n_frames - (max_frames - sink), n_frames))


class FakeSelector:
    """Returns fixed (local, global) picks and records every call."""

    def __init__(self, local: Sequence[int], glob: Sequence[int]) -> None:
        self.local, self.glob = list(local), list(glob)
        self.calls: list[dict[str, Any]] = []

    def __call__(
        self, frames: tuple[MemoryFrame, ...], current_time: int, *, k_local: int, k_global: int
    ) -> tuple[list[int], list[int]]:
        self.calls.append(
            {"ids": [f.frame_id for f in frames], "t": current_time, "k_local": k_local, "k_global": k_global}
        )
        return self.local, self.glob


def never(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("selector must not be called when the pool is within capacity")


# ------------------------------------------------------------------------------------------ positions


def test_sample_indices_match_spec() -> None:
    assert memento_sample_indices() == [0, 11, 23, 34, 46, 57, 69, 80]
    assert memento_sample_indices(10, 80) == [0, 9, 18, 27, 36, 44, 53, 62, 71, 80]
    assert memento_sample_indices(1) == [80]


def test_memento_positions_spec_worked_example() -> None:
    assert memory_positions(SHOT_1_ABS, 81) == [-20, -18, -15, -12, -9, -6, -3, -1]
    pos = frame_positions("memento", SHOT_1_ABS, 81, n_target=21, identity=True)
    assert pos.dtype == torch.long
    assert pos.tolist() == [-512, -20, -18, -15, -12, -9, -6, -3, -1, *range(21)]
    assert frame_positions("memento", SHOT_1_ABS, 81).tolist()[:8] == [-20, -18, -15, -12, -9, -6, -3, -1]


def test_memento_positions_clamp_and_floor() -> None:
    # Far past: 0//4 - 4050//4 = -1012 -> clamped at -512. Negative abs (references) floor: -9//4 = -3.
    assert memory_positions([0, 4049], 4050) == [-512, -1]
    assert memory_positions([-17, -9, -1], 0) == [-5, -3, -1]


def test_storymem_and_sequential_positions() -> None:
    assert storymem_positions(5) == [-25, -20, -15, -10, -5]
    assert storymem_positions(2, spacing=3) == [-6, -3]
    assert sequential_positions(3) == [0, 1, 2]
    abs5 = [0, 10, 20, 30, 40]
    assert frame_positions("storymem", abs5, 999, n_target=3).tolist() == [-25, -20, -15, -10, -5, 0, 1, 2]
    assert frame_positions("sequential", abs5[:3], 999, n_target=4).tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert frame_positions("memento", [], 0, n_target=2, identity=True).tolist() == [-512, 0, 1]
    with pytest.raises(ValueError, match="identity"):
        frame_positions("sequential", abs5, 0, identity=True)
    # Memento's --storymem_mode: spacing 20 latent frames, its identity slot still at -512
    assert frame_positions("storymem", abs5[:2], 0, 2, identity=True, spacing=20).tolist() == [
        -512, -40, -20, 0, 1,
    ]  # fmt: skip
    # Memento's --idt_back_mode: [memory | identity | target], identity at the last memory position + 5
    assert frame_positions("memento", [0, 80], 81, 2, identity=True, identity_back=True).tolist() == [
        -20, -1, 4, 0, 1,
    ]  # fmt: skip
    assert frame_positions("memento", [], 0, 1, identity=True, identity_back=True).tolist() == [5, 0]
    assert frame_positions("memento", [-4000], 0, 1, identity=True, identity_back=True).tolist() == [
        -512, -507, 0,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="scheme"):
        frame_positions("rope", abs5, 0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------- bookkeeping


def test_three_shot_memento_bookkeeping() -> None:
    empty = MemoryBank.empty()
    assert (empty.policy, empty.capacity, empty.current_time, len(empty)) == ("memento", 8, 0, 0)
    assert empty.resolution is None

    shot1 = latents(8, base=100)
    b1 = empty.with_shot(shot1, prompt="p1", shot_index=1)
    assert b1.current_time == 81 and b1.shots_done == 1
    assert b1.frame_ids("high") == [f"s1f{i}" for i in SHOT_1_ABS] == b1.frame_ids("low")
    assert b1.abs_frames("high") == SHOT_1_ABS
    assert b1.resolution == (H, W) and len(b1) == 8
    assert all(f.caption == "p1" and f.shot == 1 and f.source == "shot" for f in b1.high)

    # Shot 2 uses shot 1's 8 frames as they are: no selector call, nothing evicted.
    b1s, sel1 = b1.select_for_shot({"high": never, "low": never})
    assert b1s.frame_ids("high") == b1.frame_ids("high") and b1s.frame_ids("low") == b1.frame_ids("low")
    assert sel1.pool("high").method == "all" and sel1.pool("high").evicted_ids == ()
    assert b1s.frame_positions("high").tolist()[:8] == [-20, -18, -15, -12, -9, -6, -3, -1]
    assert torch.equal(b1s.latents("low"), shot1.permute(1, 0, 2, 3))

    b2 = b1s.with_shot(latents(8, base=200), prompt="p2", shot_index=2)
    assert b2.current_time == 162 and b2.shots_done == 2
    assert b2.abs_frames("high") == SHOT_1_ABS + SHOT_2_ABS
    assert len(b2.high) == len(b2.low) == 16 and len(b2) == 16

    # Different picks per expert: candidates 0..7 are shot 1, 8..15 shot 2 (abs order).
    sel_high = FakeSelector(local=[15, 14, 13, 12, 11, 10], glob=[3, 0])
    sel_low = FakeSelector(local=[8, 9, 10, 11, 12, 13], glob=[1, 2])
    b2s, sel2 = b2.select_for_shot({"high": sel_high, "low": sel_low})
    assert sel_high.calls == [
        {"ids": b2.frame_ids("high"), "t": 162, "k_local": 6, "k_global": 2},
    ]
    expected_high = ["s1f0", "s1f34", "s2f23", "s2f34", "s2f46", "s2f57", "s2f69", "s2f80"]
    expected_low = ["s1f11", "s1f23", "s2f0", "s2f11", "s2f23", "s2f34", "s2f46", "s2f57"]
    assert b2s.frame_ids("high") == expected_high
    assert b2s.frame_ids("low") == expected_low
    assert b2s.abs_frames("high") == [0, 34, 104, 115, 127, 138, 150, 161]
    assert b2s.current_time == 162 and b2s.shots_done == 2
    # Positions for shot 3 (current_time 162, 162//4 = 40), by hand.
    assert b2s.frame_positions("high").tolist()[:8] == [-40, -32, -14, -12, -9, -6, -3, -1]
    high = sel2.pool("high")
    assert high.method == "kfq" and high.frame_ids == tuple(expected_high)
    assert sel2.pool("low").frame_ids == tuple(expected_low) and sel2.pool("low").chosen_ids == tuple(
        expected_low
    )
    assert high.local_ids == ("s2f23", "s2f34", "s2f46", "s2f57", "s2f69", "s2f80")
    assert high.global_ids == ("s1f0", "s1f34")
    assert set(high.evicted_ids) == {"s1f11", "s1f23", "s1f46", "s1f57", "s1f69", "s1f80", "s2f0", "s2f11"}
    assert set(sel2.pool("low").evicted_ids) == set(b2.frame_ids("low")) - set(expected_low)
    assert len(b2s) == len(set(expected_high) | set(expected_low))
    # Stored latents travel with their frames (frame s2f23 is frame 2 of shot 2's input: base 202).
    assert torch.equal(b2s.latents("high")[:, 2], latents(8, base=200)[2])
    # Shared frames are the same objects in both pools.
    assert b2s.high[2] is b2s.low[4]

    b3 = b2s.with_shot(latents(8, base=300), prompt="p3", shot_index=3)
    assert b3.current_time == 243 and b3.shots_done == 3
    assert len(b3.high) == len(b3.low) == 16
    assert b3.frame_ids("high")[:8] == expected_high and b3.frame_ids("low")[:8] == expected_low
    assert b3.abs_frames("high")[8:] == [162 + i for i in SHOT_1_ABS]
    b3s, _ = b3.select_for_shot(recency_selector)
    assert b3s.frame_ids("high") == ["s1f0", "s1f34", *(f"s3f{i}" for i in SHOT_1_ABS[2:])]


def test_selector_contract_errors() -> None:
    bank = MemoryBank.empty().with_shot(latents(8), shot_index=1).with_shot(latents(8), shot_index=2)
    with pytest.raises(MemoryBankError, match="needs a selector"):
        bank.select_for_shot(None)
    with pytest.raises(MemoryBankError, match="exactly 6 local"):
        bank.select_for_shot(FakeSelector(local=[0, 1, 2, 3, 4], glob=[5, 6]))
    with pytest.raises(MemoryBankError, match="distinct"):
        bank.select_for_shot(FakeSelector(local=[0, 1, 2, 3, 4, 5], glob=[5, 6]))
    with pytest.raises(MemoryBankError, match="distinct"):
        bank.select_for_shot(FakeSelector(local=[0, 1, 2, 3, 4, 5], glob=[6, 16]))


def test_with_shot_input_errors() -> None:
    bank = MemoryBank.empty().with_shot(latents(8), shot_index=1)
    with pytest.raises(MemoryBankError, match="frame indices"):
        bank.with_shot(latents(3), shot_index=2)
    with pytest.raises(MemoryBankError, match="already in the bank"):
        bank.with_shot(latents(8), shot_index=1)
    with pytest.raises(MemoryBankError, match=r"\[0, 81\)"):
        bank.with_shot(latents(2), frame_indices=[0, 81], shot_index=2)
    bad = latents(8)
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(MemoryBankError, match="finite"):
        bank.with_shot(bad, shot_index=2)
    with pytest.raises(MemoryBankError, match="empty"):
        MemoryBank.empty().latents("high")
    with pytest.raises(MemoryBankError, match="'high' or 'low'"):
        bank.pool("mid")
    # A 1-frame-clip encode [N, 16, 1, h, w] is accepted and squeezed.
    b = MemoryBank.empty().with_shot(latents(2).unsqueeze(2), frame_indices=[0, 80], shot_index=1)
    assert b.latents("low").shape == (16, 2, H, W)


def test_resolution_mismatch_is_a_readable_shape_error() -> None:
    bank = MemoryBank.empty().with_shot(latents(8), shot_index=1)
    with pytest.raises(ShapeError, match="another resolution") as err:
        bank.with_shot(latents(8, h=H * 2), shot_index=2)
    assert f"{H}x{W}" in str(err.value) and f"{2 * H}x{W}" in str(err.value)
    with pytest.raises(ShapeError, match="another resolution"):
        bank.with_references(latents(1, w=W + 2))
    with pytest.raises(ShapeError, match=r"\[N, 16, h, w\]"):
        bank.with_shot(torch.zeros(8, 4, H, W), shot_index=2)
    assert isinstance(err.value, MementoError)


# ---------------------------------------------------------------------------------------- immutability


def _snapshot(bank: MemoryBank) -> tuple[Any, ...]:
    pools = (bank.high, bank.low, bank.archive)
    values = [f.latent.clone() for f in bank.frames()]
    return pools, [list(p) for p in pools], values, bank.current_time, bank.shots_done, bank.policy


def _assert_unchanged(bank: MemoryBank, snap: tuple[Any, ...]) -> None:
    pools, members, values, current_time, shots_done, policy = snap
    assert (bank.high, bank.low, bank.archive) == pools and all(
        a is b for a, b in zip((bank.high, bank.low, bank.archive), pools, strict=True)
    )
    assert [list(p) for p in (bank.high, bank.low, bank.archive)] == members
    assert all(torch.equal(f.latent, v) for f, v in zip(bank.frames(), values, strict=True))
    assert (bank.current_time, bank.shots_done, bank.policy) == (current_time, shots_done, policy)


def test_updates_never_mutate_their_input(monkeypatch: pytest.MonkeyPatch) -> None:
    patch_module(monkeypatch, "memento_core.keyframes", storymem_retain=fake_storymem_retain)
    bank = (
        MemoryBank.empty().with_references(latents(1, base=-5), ["hero"]).with_shot(latents(8), shot_index=1)
    )
    bank = bank.with_shot(latents(8, base=50), shot_index=2)
    snap = _snapshot(bank)
    bank.with_shot(latents(8, base=90), shot_index=3)
    _assert_unchanged(bank, snap)
    bank.with_references(latents(2, base=-9), ["a", "b"])
    bank.select_for_shot(FakeSelector(local=[0, 1, 2, 3, 4], glob=[5, 6]))
    bank.with_pinned(["s1f0"])
    bank.with_pinned(["ref0"], pinned=False)
    bank.without_frames(["s2f80"])
    _assert_unchanged(bank, snap)
    assert bank.get("ref0").pinned is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        bank.current_time = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        bank.high[0].abs_frame = 5  # type: ignore[misc]

    # Shared-pool policies too.
    story = MemoryBank.empty("storymem").with_shot(latents(3), frame_indices=[0, 40, 80], shot_index=1)
    snap = _snapshot(story)
    for i in range(2, 5):
        story.with_shot(latents(3), frame_indices=[0, 40, 80], shot_index=i)
    story.select_for_shot()
    _assert_unchanged(story, snap)


def test_latents_are_cloned_on_insert_and_copied_on_read() -> None:
    source = latents(8, base=7)
    keep = source.clone()
    bank = MemoryBank.empty().with_shot(source, shot_index=1)
    source.add_(1000)  # the caller reuses its buffer
    assert torch.equal(bank.latents("high"), keep.permute(1, 0, 2, 3))
    out = bank.latents("high")
    out.zero_()  # the caller edits what it read
    assert torch.equal(bank.latents("low"), keep.permute(1, 0, 2, 3))
    half = latents(2).half()  # other dtypes are stored as float32 copies
    b = MemoryBank.empty().with_shot(half, frame_indices=[0, 1], shot_index=1)
    assert b.high[0].latent.dtype == torch.float32
    assert b.high[0].latent.data_ptr() != half.data_ptr()


# ------------------------------------------------------------------------------------ references, pins


def test_references_sit_before_the_first_shot_and_survive_selection() -> None:
    bank = MemoryBank.empty().with_references(latents(2, base=-10), ["[Person A] woman", "[Person B] dog"])
    assert bank.frame_ids("high") == ["ref0", "ref1"]
    assert bank.abs_frames("low") == [-9, -1]
    assert [f.pinned for f in bank.high] == [True, True]
    assert [f.source for f in bank.high] == ["reference", "reference"]
    assert bank.frame_positions("high", identity=True).tolist()[:3] == [-512, -3, -1]

    b1 = bank.with_shot(latents(8), shot_index=1)
    assert len(b1.high) == 10  # 2 pinned + 8 > capacity 8: selection needed for shot 2
    selector = FakeSelector(local=[4, 5, 6, 7], glob=[0, 1])
    b1s, sel = b1.select_for_shot(selector)
    # 2 pins take 2 of the 8 slots from the local quota: 4 local + 2 global among the 8 unpinned.
    assert selector.calls[0]["k_local"] == 4 and selector.calls[0]["k_global"] == 2
    assert selector.calls[0]["ids"] == [f"s1f{i}" for i in SHOT_1_ABS]
    assert b1s.frame_ids("high") == ["ref0", "ref1", "s1f0", "s1f11", "s1f46", "s1f57", "s1f69", "s1f80"]
    assert sel.pool("low").pinned_ids == ("ref0", "ref1")
    assert set(sel.pool("low").evicted_ids) == {"s1f23", "s1f34"}
    # For shot 2 the references recede with the story: -9//4 - 20 = -23, -1//4 - 20 = -21.
    assert b1s.frame_positions("high").tolist()[:2] == [-23, -21]

    # Numbering continues; new references sit just before the next shot.
    b2 = b1s.with_references(latents(1, base=-20), "[Person C]", pinned=False)
    assert b2.get("ref2").abs_frame == 80 and b2.get("ref2").pinned is False
    with pytest.raises(MemoryBankError, match="pinned"):
        MemoryBank.empty().with_references(latents(9))
    with pytest.raises(MemoryBankError, match="captions"):
        MemoryBank.empty().with_references(latents(2), ["only one"])


def test_capacity_full_of_pins_evicts_every_other_frame() -> None:
    bank = MemoryBank.empty(capacity=2).with_references(latents(2)).with_shot(latents(8), shot_index=1)
    out, sel = bank.select_for_shot(never)
    assert out.frame_ids("high") == ["ref0", "ref1"]
    assert len(sel.pool("high").evicted_ids) == 8


# ------------------------------------------------------------------------------------------ policies


def test_storymem_keeps_sink_and_recent_in_one_shared_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    patch_module(monkeypatch, "memento_core.keyframes", storymem_retain=fake_storymem_retain)
    bank = MemoryBank.empty("storymem", capacity=8)
    for shot in range(1, 5):  # 3 keyframes per shot: 12 in all
        bank = bank.with_shot(latents(3), frame_indices=[0, 40, 80], prompt=f"p{shot}", shot_index=shot)
        assert bank.pool("high") is bank.pool("low")
    assert bank.current_time == 4 * 81
    assert bank.frame_ids("high") == ["s1f0", "s1f40", "s1f80", "s3f40", "s3f80", "s4f0", "s4f40", "s4f80"]
    same, sel = bank.select_for_shot()
    assert same.frame_ids("low") == bank.frame_ids("low") and sel.pool("high").evicted_ids == ()
    assert bank.frame_positions("low", scheme="storymem", n_target=1).tolist() == [
        -40, -35, -30, -25, -20, -15, -10, -5, 0,
    ]  # fmt: skip

    # MR2V: 2 pinned references occupy 2 sink slots: then 1 first keyframe + the 5 most recent.
    refs = MemoryBank.empty("storymem", capacity=8).with_references(latents(2), ["a", "b"])
    for shot in range(1, 5):
        refs = refs.with_shot(latents(3), frame_indices=[0, 40, 80], shot_index=shot)
    assert refs.frame_ids("high") == ["ref0", "ref1", "s1f0", "s3f40", "s3f80", "s4f0", "s4f40", "s4f80"]


def test_storymem_clip_embeddings_are_kept_per_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    patch_module(monkeypatch, "memento_core.keyframes", storymem_retain=fake_storymem_retain)
    emb = torch.randn(3, 5)
    bank = MemoryBank.empty("storymem").with_shot(latents(3), [0, 40, 80], shot_index=1, clip_embeddings=emb)
    stored = bank.clip_embeddings()
    assert stored is not None and torch.equal(stored, emb)
    assert MemoryBank.empty().clip_embeddings() is None


def test_fov_retrieves_from_pool_and_archive() -> None:
    """Hand geometry (FOV 60, views 0.1-30 m): a frame at the target's own pose overlaps, one looking the
    other way does not; hits that are not neighbours stay apart; the most recent fill the budget."""
    from memento_core.fov import CameraPose

    looks_z, looks_back = CameraPose(0, 0, 0), CameraPose(0, 0, 180)
    cams = [looks_z, looks_back, CameraPose(1, 0, 0), CameraPose(0, -5, 180)]
    bank = MemoryBank.empty("fov", capacity=3).with_references(latents(1), ["hero"])
    bank = bank.with_shot(latents(4), frame_indices=[0, 20, 40, 60], shot_index=1, cameras=cams)
    b1, sel = bank.select_for_shot(targets=looks_z)
    # s1f0 (same pose) and s1f40 (1 m to the side, same heading) overlap; 2 slots beside the pinned ref
    assert b1.frame_ids("high") == ["ref0", "s1f0", "s1f40"] and b1.pool("low") is b1.pool("high")
    assert [f.frame_id for f in b1.archive] == ["s1f20", "s1f60"]  # kept: selection never evicts
    record = sel.pool("high")
    assert record.overlap == {"s1f0": True, "s1f20": False, "s1f40": True, "s1f60": False}
    assert record.fov_ids == ("s1f0", "s1f40") and record.pinned_ids == ("ref0",) and len(b1) == 3

    # Archived frames stay candidates: looking -z recalls the frames that looked -z. s1f60 and s2f0 are
    # neighbours in time but of different shots, so both stay; the 2 most recent hits are kept.
    b2 = b1.with_shot(latents(1), frame_indices=[0], shot_index=2, cameras=[CameraPose(0, -5, 180)])
    b2s, sel2 = b2.select_for_shot(targets=[looks_back])
    assert [k for k, v in sel2.pool("high").overlap.items() if v] == ["s1f20", "s1f60", "s2f0"]
    assert b2s.frame_ids("high") == ["ref0", "s1f60", "s2f0"]
    assert [f.frame_id for f in b2s.archive] == ["s1f0", "s1f20", "s1f40"]
    # without a camera: the most recent frames
    b3, sel3 = b2.select_for_shot()
    assert b3.frame_ids("high") == ["ref0", "s1f60", "s2f0"] and sel3.pool("high").method.startswith(
        "fov (no camera"
    )


def test_manual_keeps_listed_frames() -> None:
    bank = MemoryBank.empty("manual").with_shot(latents(8), shot_index=1)
    b1, sel = bank.select_for_shot(keep_ids=["s1f80", "s1f11"])
    assert b1.frame_ids("high") == ["s1f11", "s1f80"] == b1.frame_ids("low")
    assert sel.pool("low").method == "manual" and sel.pool("low").chosen_ids == ("s1f11", "s1f80")
    b2, _ = b1.select_for_shot(keep_ids=["s1f0"])  # back from the archive
    assert b2.frame_ids("high") == ["s1f0"]
    with pytest.raises(MemoryBankError, match="not in the memory bank"):
        b1.select_for_shot(keep_ids=["s9f0"])
    with pytest.raises(MemoryBankError, match="capacity"):
        MemoryBank.empty("manual", capacity=1).with_shot(latents(8), shot_index=1).select_for_shot(
            keep_ids=["s1f0", "s1f11"]
        )


def test_kfq_selector_stacks_candidates_with_their_positions(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_positions(rel_frames: Sequence[int], current_time: int) -> torch.Tensor:
        return torch.tensor(
            [max(-512, min(511, (current_time + r) // 4 - current_time // 4)) for r in rel_frames],
            dtype=torch.long,
        )

    patch_module(monkeypatch, "memento_core.keyframe_query", candidate_positions=fake_positions)

    class FakeKFQ(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: dict[str, Any] = {}

        def select(
            self, lat: torch.Tensor, pos: torch.Tensor, ctx: Any, ctx_g: Any, *, k_local: int, k_global: int
        ):
            self.seen = {"lat": lat, "pos": pos, "ctx": ctx, "ctx_g": ctx_g, "k": (k_local, k_global)}
            return list(range(k_local)), list(range(k_local, k_local + k_global))

    kfq = FakeKFQ()
    ctx, ctx_g = torch.zeros(1, 512, 8), torch.ones(1, 512, 8)
    bank = MemoryBank.empty().with_shot(latents(8), shot_index=1).with_shot(latents(8, base=10), shot_index=2)
    out, _ = bank.select_for_shot(kfq_selector(kfq, ctx, ctx_g))
    assert kfq.seen["lat"].shape == (16, 16, H, W) and kfq.seen["k"] == (6, 2)
    assert torch.equal(kfq.seen["lat"], bank.latents("high"))
    # No -1 clamp here (SPEC 4.7): abs 161 -> 40 - 40 = 0.
    assert kfq.seen["pos"].tolist() == [
        -40,
        -38,
        -35,
        -32,
        -29,
        -26,
        -23,
        -20,
        -20,
        -17,
        -14,
        -12,
        -9,
        -6,
        -3,
        0,
    ]
    assert kfq.seen["ctx"] is ctx and kfq.seen["ctx_g"] is ctx_g
    assert out.frame_ids("high") == bank.frame_ids("high")[:8]


# ---------------------------------------------------------------------------------------- persistence


def _rich_bank(monkeypatch: pytest.MonkeyPatch) -> MemoryBank:
    patch_module(monkeypatch, "memento_core.fov", CameraPose=FakePose)
    bank = MemoryBank.empty().with_references(
        latents(1, base=-3),
        ["[Person A] 你好"],
        cameras=[FakePose(1.0, 2.0, 0.5)],
        clip_embeddings=torch.randn(1, 4),
    )
    bank = bank.with_shot(torch.randn(8, 16, H, W), prompt="p1", shot_index=1)
    bank = bank.with_shot(torch.randn(8, 16, H, W), prompt="p2", shot_index=2)
    bank, _ = bank.select_for_shot(
        {"high": FakeSelector([9, 10, 11, 12, 13], [0, 1]), "low": FakeSelector([0, 1, 2, 3, 4], [14, 15])}
    )
    return bank


def _tensor_keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as fh:
        return list(fh.keys())


def test_save_load_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bank = _rich_bank(monkeypatch)
    assert bank.frame_ids("high") != bank.frame_ids("low")
    path = save_bank(bank, tmp_path / "story" / "bank.safetensors")
    loaded = load_bank(path)
    assert bank_to_dict(loaded) == bank_to_dict(bank)
    for pool in ("high", "low"):
        assert torch.equal(loaded.latents(pool), bank.latents(pool))
        assert loaded.frame_ids(pool) == bank.frame_ids(pool)
        assert loaded.abs_frames(pool) == bank.abs_frames(pool)
    ref = loaded.get("ref0")
    assert ref.camera == FakePose(1.0, 2.0, 0.5) and ref.caption == "[Person A] 你好" and ref.pinned
    assert ref.clip_embedding is not None and torch.equal(ref.clip_embedding, bank.get("ref0").clip_embedding)
    # Each unique frame once: ref0 + the union of both pools, plus one clip embedding.
    unique = set(bank.frame_ids("high")) | set(bank.frame_ids("low"))
    assert len(_tensor_keys(path)) == len(unique) + 1 < len(bank.high) + len(bank.low) + 1
    shared = set(bank.frame_ids("high")) & set(bank.frame_ids("low"))
    assert shared and all(loaded.high[loaded.frame_ids("high").index(i)] is loaded.get(i) for i in shared)
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["memento_bank"])
    assert meta["format"] == "memento-memory-bank" and meta["version"] == 1
    # Policies with an archive and an empty bank round-trip too.
    empty = load_bank(save_bank(MemoryBank.empty("manual", capacity=3), tmp_path / "empty.safetensors"))
    assert (empty.policy, empty.capacity, len(empty)) == ("manual", 3, 0)
    manual, _ = (
        MemoryBank.empty("manual").with_shot(latents(8), shot_index=1).select_for_shot(keep_ids=["s1f0"])
    )
    again = load_bank(save_bank(manual, tmp_path / "manual.safetensors"))
    assert bank_to_dict(again) == bank_to_dict(manual) and again.pool("high") is again.pool("low")


@pytest.mark.parametrize("crash", [OSError("No space left on device"), KeyboardInterrupt()])
def test_interrupted_write_leaves_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash: BaseException
) -> None:
    path = tmp_path / "bank.safetensors"
    old = MemoryBank.empty().with_shot(latents(8), shot_index=1)
    save_bank(old, path)
    before = path.read_bytes()

    def crashing_write(fh: Any, data: bytes) -> None:
        fh.write(data[: len(data) // 2])
        raise crash

    monkeypatch.setattr(memory.persistence, "_write_bytes", crashing_write)
    new = old.with_shot(latents(8, base=5), shot_index=2)
    with pytest.raises(type(crash)):
        save_bank(new, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.safetensors"]
    assert load_bank(path).frame_ids("high") == old.frame_ids("high")


def test_load_rejects_other_files_with_readable_errors(tmp_path: Path) -> None:
    model = tmp_path / "model.safetensors"
    save_file({"blocks.0.ffn.0.weight": torch.zeros(2, 2)}, str(model))
    with pytest.raises(MemoryBankError, match="not a Memento memory bank"):
        load_bank(model)

    garbage = tmp_path / "notes.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(MemoryBankError, match=r"not a readable \.safetensors"):
        load_bank(garbage)

    with pytest.raises(MemoryBankError, match="does not exist"):
        load_bank(tmp_path / "missing.safetensors")

    good = save_bank(MemoryBank.empty().with_shot(latents(8), shot_index=1), tmp_path / "bank.safetensors")
    with safe_open(str(good), framework="pt") as fh:
        header = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    meta = json.loads(header["memento_bank"])

    newer = tmp_path / "newer.safetensors"
    save_file(tensors, str(newer), metadata={**header, "memento_bank": json.dumps({**meta, "version": 2})})
    with pytest.raises(MemoryBankError, match="version 2, newer"):
        load_bank(newer)

    other = tmp_path / "other.safetensors"
    save_file(tensors, str(other), metadata={**header, "memento_bank": json.dumps({**meta, "format": "x"})})
    with pytest.raises(MemoryBankError, match="not a memory bank"):
        load_bank(other)

    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in tensors.items() if k != "latent.3"}, str(partial), metadata=header)
    with pytest.raises(MemoryBankError, match=r"incomplete.*latent\.3"):
        load_bank(partial)


def test_bank_to_dict_is_json() -> None:
    bank = MemoryBank.empty().with_references(latents(1), ["hero"]).with_shot(latents(8), shot_index=1)
    summary = bank_to_dict(bank)
    text = json.dumps(summary)
    assert "tensor" not in text.lower()
    assert summary["current_time"] == 81 and summary["resolution"] == [H, W]
    assert [f["id"] for f in summary["pools"]["high"]][:2] == ["ref0", "s1f0"]
    assert "ref0" in repr(bank) and "tensor" not in repr(bank)


# ------------------------------------------------------------------------------ with the real modules


def test_memento_selection_with_a_real_keyframe_query() -> None:
    kq = pytest.importorskip("memento_core.keyframe_query")
    torch.manual_seed(0)
    kfq = kq.KeyframeQuery(dim=32, num_heads=2)
    ctx, ctx_g = torch.randn(1, 512, 32), torch.randn(1, 512, 32)
    bank = MemoryBank.empty().with_shot(torch.randn(8, 16, H, W), shot_index=1)
    bank = bank.with_shot(torch.randn(8, 16, H, W), shot_index=2)
    out, sel = bank.select_for_shot({"high": kfq_selector(kfq, ctx, ctx_g), "low": recency_selector})
    # Independent call of the KFQ on the same candidates and positions.
    pos = kq.candidate_positions([a - 162 for a in bank.abs_frames("high")], 162)
    local, glob = kfq.select(bank.latents("high"), pos, ctx, ctx_g, k_local=6, k_global=2)
    ids = bank.frame_ids("high")
    assert sel.pool("high").local_ids == tuple(ids[i] for i in local)
    assert sel.pool("high").global_ids == tuple(ids[i] for i in glob)
    assert out.frame_ids("high") == [ids[i] for i in sorted(local + glob)]
    assert out.frame_ids("low") == ["s1f0", "s1f11", *(f"s2f{i}" for i in SHOT_1_ABS[2:])]


def test_storymem_and_fov_with_the_real_helpers(tmp_path: Path) -> None:
    pytest.importorskip("memento_core.keyframes")
    fov = pytest.importorskip("memento_core.fov")
    bank = MemoryBank.empty("storymem", capacity=8)
    for shot in range(1, 5):
        bank = bank.with_shot(latents(3), frame_indices=[0, 40, 80], shot_index=shot)
    assert bank.frame_ids("high") == ["s1f0", "s1f40", "s1f80", "s3f40", "s3f80", "s4f0", "s4f40", "s4f80"]

    cams = [fov.CameraPose(x=float(i), z=0.0, yaw=float(30 * i)) for i in range(8)]
    views = MemoryBank.empty("fov", capacity=4).with_shot(latents(8), shot_index=1, cameras=cams)
    out, sel = views.select_for_shot(targets=[fov.CameraPose(x=0.0, z=-3.0, yaw=0.0)], fov_deg=90.0)
    assert len(out.high) <= 4 and out.pool("low") is out.pool("high")
    assert sel.pool("high").method == "fov" and len(out.high) >= 1
    assert sorted(out.frame_ids("high") + [f.frame_id for f in out.archive]) == sorted(
        views.frame_ids("high")
    )
    again = load_bank(save_bank(out, tmp_path / "fov.safetensors"))
    assert [f.camera for f in again.high] == [f.camera for f in out.high]
