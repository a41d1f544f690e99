"""A 3-shot Memento story on tiny models, end to end in memento_core (no ComfyUI).

Shot 1: empty memory + identity slot (hard cut). Shot 2: shot 1's 8 frames as they are (continuing,
MI2V). Shot 3: 16 candidates -> each expert's KeyframeQuery picks 6 local + 2 global. Selections and
positions are logged (JSON, printed with -s) and checked against the rules of SPEC 4.3 / 4.6.
"""

from __future__ import annotations

import json

import pytest
import torch

from memento_core.adapters import TinyTextEncoder, TinyVAE
from memento_core.keyframe_query import KeyframeQuery
from memento_core.m2v import Backbone, ShotRequest, render_shot
from memento_core.memory import MemoryBank, memento_sample_indices, memory_positions
from memento_core.sampling import SamplingCancelled
from memento_core.shot import ShotSettings
from memento_core.tiny import tiny_dit

FRAMES = 17  # 4n+1 pixel frames -> 5 latent frames
GLOBAL = "global caption: [Person A]: a red-haired sailor in a blue coat; shot caption: "
PROMPTS = [
    GLOBAL + "[Person A] walks along the harbour at dawn.",
    GLOBAL + "[Person A] stops and looks at the ships.",
    GLOBAL + "[Person A] climbs aboard a small boat.",
]
RECONSTRUCT = "[Person A] a red-haired sailor in a blue coat"


def kfq(seed: int) -> KeyframeQuery:
    torch.manual_seed(seed)
    return KeyframeQuery(dim=256, num_heads=2).eval()


@pytest.fixture(scope="module")
def story():
    backbone = Backbone(tiny_dit("i2v", seed=1), tiny_dit("i2v", seed=2), kfq(3), kfq(4))
    vae, text = TinyVAE(), TinyTextEncoder(64)
    bank = MemoryBank.empty("memento")
    banks, records, videos = [bank], [], [None]
    for i, prompt in enumerate(PROMPTS):
        request = ShotRequest(
            prompt=prompt,
            width=64,
            height=32,
            frames=FRAMES,
            mode="cut" if i == 0 else "mi2v",
            reconstruct=RECONSTRUCT,
            settings=ShotSettings(steps=4, seed=100 + i),
        )
        record, bank = render_shot(
            backbone, bank, request, vae, text, previous_video=videos[-1], shot_index=i + 1
        )
        banks.append(bank)
        records.append(record)
        videos.append(record.video)
    log = [r.log() for r in records]
    print(json.dumps(log, indent=1))
    return backbone, banks, records, log


def test_shapes_and_bookkeeping(story):
    _, banks, records, _ = story
    for r in records:
        assert r.latent.shape == (16, 5, 4, 8) and r.video.shape == (3, FRAMES, 32, 64)
        assert r.identity.shape == (16, 1, 4, 8) and torch.isfinite(r.latent).all()
    assert [b.current_time for b in banks] == [0, FRAMES, 2 * FRAMES, 3 * FRAMES]
    idx = memento_sample_indices(last=FRAMES - 1)
    assert banks[1].abs_frames("high") == idx
    assert len(banks[2].pool("high")) == 16  # shot 1's 8 + shot 2's 8 before selection


def test_positions_follow_the_time_aware_rule(story):
    _, banks, records, _ = story
    # shot 1: identity + target only
    assert records[0].positions["high"] == [-512, 0, 1, 2, 3, 4]
    # shot 2: shot 1's frames as they are, positions min(abs//4 - current//4, -1)
    expected = [-512, *memory_positions(banks[1].abs_frames("high"), FRAMES), 0, 1, 2, 3, 4]
    assert records[1].positions["high"] == expected == records[1].positions["low"]
    assert records[1].selection.pool("high").method == "all"
    for pool in ("high", "low"):
        pos = records[2].positions[pool]
        assert pos[0] == -512 and pos[-5:] == [0, 1, 2, 3, 4]
        mem = pos[1:-5]
        assert len(mem) == 8 and mem == sorted(mem) and all(-512 <= p <= -1 for p in mem)


def test_shot_three_selects_six_local_and_two_global_per_expert(story):
    _, banks, records, _ = story
    sel = records[2].selection
    for pool in ("high", "low"):
        ps = sel.pool(pool)
        assert ps.method == "kfq"
        assert len(ps.local_ids) == 6 and len(ps.global_ids) == 2
        assert set(ps.chosen_ids) == set(ps.local_ids) | set(ps.global_ids)
        assert len(ps.evicted_ids) == 8
        used = records[2].memory_ids[pool]
        assert sorted(used, key=lambda i: banks[2].get(i).abs_frame) == used  # ordered by abs_frame
        assert set(used) == set(ps.chosen_ids)
        # after the shot the pool holds the 8 kept frames + the 8 new ones
        assert len(banks[3].pool(pool)) == 16


def test_kfq_selection_matches_direct_select(story):
    """The bank's choice equals KeyframeQuery.select on the same candidates and positions."""
    from memento_core.keyframe_query import candidate_positions, split_global_caption

    backbone, banks, records, _ = story
    text = TinyTextEncoder(64)
    bank = banks[2]
    for pool, dit, q in (("high", backbone.high, backbone.kfq_high), ("low", backbone.low, backbone.kfq_low)):
        frames = bank.pool(pool)
        lat = torch.stack([f.latent for f in frames], 1)
        pos = candidate_positions([f.abs_frame - bank.current_time for f in frames], bank.current_time)
        with torch.no_grad():
            ctx = dit.embed_text(text.encode(PROMPTS[2])).float()
            ctx_g = dit.embed_text(text.encode(split_global_caption(PROMPTS[2]))).float()
        local, glob = q.select(lat, pos, ctx, ctx_g)
        ps = records[2].selection.pool(pool)
        assert [frames[i].frame_id for i in local] == list(ps.local_ids)
        assert [frames[i].frame_id for i in glob] == list(ps.global_ids)


def test_same_seed_same_shot_and_banks_are_values(story):
    backbone, banks, records, _ = story
    request = ShotRequest(
        prompt=PROMPTS[2], width=64, height=32, frames=FRAMES, mode="mi2v", reconstruct=RECONSTRUCT,
        settings=ShotSettings(steps=4, seed=102),
    )  # fmt: skip
    before = [f.latent.clone() for f in banks[2].frames()]
    again, _ = render_shot(
        backbone,
        banks[2],
        request,
        TinyVAE(),
        TinyTextEncoder(64),
        previous_video=records[1].video,
        shot_index=3,
    )
    assert torch.equal(again.latent, records[2].latent)
    assert all(torch.equal(a, f.latent) for a, f in zip(before, banks[2].frames(), strict=True))


def test_interrupted_shot_leaves_the_bank_unchanged(story):
    backbone, banks, records, _ = story
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    request = ShotRequest(
        prompt=PROMPTS[2], width=64, height=32, frames=FRAMES, mode="mi2v", reconstruct=RECONSTRUCT,
        settings=ShotSettings(steps=4, seed=102),
    )  # fmt: skip
    ids = banks[2].frame_ids("high")
    with pytest.raises(SamplingCancelled):
        render_shot(
            backbone, banks[2], request, TinyVAE(), TinyTextEncoder(64), previous_video=records[1].video,
            cancel=cancel,
        )  # fmt: skip
    assert banks[2].frame_ids("high") == ids and banks[2].current_time == 2 * FRAMES


def test_continuing_needs_the_previous_shot(story):
    backbone, banks, _, _ = story
    from memento_core.errors import ShapeError

    with pytest.raises(ShapeError, match="previous shot"):
        render_shot(
            backbone, banks[1], ShotRequest(prompt="x", width=64, height=32, frames=FRAMES, mode="mi2v"),
            TinyVAE(), TinyTextEncoder(64),
        )  # fmt: skip
