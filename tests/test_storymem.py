"""StoryMem as its released code runs it (SPEC 5), through the ``storymem`` memory policy.

Independent expectations:

- keyframe selection against a literal, slow re-statement of the reference's loops
  (``extract_keyframes.py``: rescan with the threshold lowered by 0.01 while more than 3 remain, scan from
  frame 2, then drop candidates > 0.9 similar to any stored keyframe) on controlled embeddings;
- the bank over 6 shots against ids written out by hand (sink of the first 3 + the most recent, 10 in
  all; duplicates of evicted keyframes still dropped);
- continuation trimming against the frames a continuation repeats (1 for MI2V, 5 for MM2V);
- the sampler against SPEC 5's numbers (13 high + 27 low steps at 40, shift 4, CFG 3.5);
- a 4-shot ``--policy storymem`` command-line run against the rules recomputed from its own log.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memento_core.adapters import TinyImageEmbedder, TinyVAE
from memento_core.cli import cli
from memento_core.keyframes import select_keyframes
from memento_core.media import read_mp4
from memento_core.memory import (
    FinishedShot,
    MemoryBank,
    MemoryBankError,
    MemoryTools,
    StoryMemPolicy,
    get_policy,
    load_bank,
    policy_names,
    save_bank,
)
from memento_core.runner import RUNNER_POLICIES, RunnerError, RunSettings
from memento_core.sampling import split_steps, wan_schedule
from memento_core.story import parse_story

# ------------------------------------------------------------------------------------------ keyframes


def reference_keyframes(emb: torch.Tensor, stored: torch.Tensor | None) -> list[int]:
    """The reference's keyframe loops, written out literally (no shortcuts): cosine similarity of unit
    embeddings; the first frame is a keyframe; frames 2.. become keyframes below the threshold relative
    to the last keyframe; the threshold drops by 0.01 while more than 3 remain; then candidates more
    than 0.9 similar to any stored keyframe are dropped."""
    unit = torch.nn.functional.normalize(emb.double(), dim=-1)
    threshold = 0.9
    while True:
        keys, last = [0], 0
        for i in range(2, unit.shape[0]):
            if float(unit[last] @ unit[i]) < threshold:
                keys.append(i)
                last = i
        if len(keys) > 3:
            threshold -= 0.01
        else:
            break
    if stored is None:
        return keys
    bank = torch.nn.functional.normalize(stored.double(), dim=-1)
    return [k for k in keys if not any(float(unit[k] @ b) > 0.9 for b in bank)]


def scene_embeddings(gen: torch.Generator, lengths: list[int], dim: int, noise: float) -> torch.Tensor:
    """Frames in scenes: each scene a random direction, each frame that direction plus small noise
    (near duplicates within a scene, scene changes between them)."""
    rows = []
    for n in lengths:
        base = torch.randn(dim, generator=gen)
        rows += [base + noise * torch.randn(dim, generator=gen) for _ in range(n)]
    return torch.stack(rows)


@pytest.mark.parametrize("seed", range(40))
def test_keyframes_match_a_literal_simulation_of_the_reference(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    scenes = int(torch.randint(1, 7, (1,), generator=gen))
    lengths = [int(torch.randint(1, 9, (1,), generator=gen)) for _ in range(scenes)]
    noise = [0.05, 0.3, 0.6, 1.0][seed % 4]  # from near duplicates to drifting frames
    emb = scene_embeddings(gen, lengths, 16, noise)
    stored = None
    if seed % 3 == 0:  # some stored keyframes, one of them a near duplicate of a frame of this shot
        stored = torch.cat([torch.randn(2, 16, generator=gen), emb[-1:] + 0.01])
    want = reference_keyframes(emb, stored)
    assert select_keyframes(emb, stored) == want


def test_threshold_descent_is_needed_and_followed() -> None:
    # Six well separated scenes: the 0.9 scan finds 6 keyframes; only a much lower threshold keeps 3.
    gen = torch.Generator().manual_seed(7)
    emb = scene_embeddings(gen, [3, 3, 3, 3, 3, 3], 32, 0.02)
    assert len(reference_keyframes(emb[:2], None)) <= 3
    got = select_keyframes(emb)
    assert got == reference_keyframes(emb, None) and len(got) <= 3


# ----------------------------------------------------------------------------------- the policy's bank

D = 64  # embedding size of the scene-coded frames
H, W = 16, 32


def scene_video(scenes: list[int], lengths: list[int]) -> torch.Tensor:
    """A video [3, F, H, W] in [-1, 1] whose frames carry their scene id as a flat grey level."""
    frames = []
    for scene, n in zip(scenes, lengths, strict=True):
        frames += [torch.full((3, H, W), 2 * scene / D - 1)] * n
    return torch.stack(frames, 1)


class SceneEmbedder:
    """Image embedder for scene-coded frames: the one-hot vector of the frame's scene id."""

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        ids = (frames.mean(dim=(1, 2, 3)) * D).round().long().clamp(0, D - 1)
        return torch.nn.functional.one_hot(ids, D).float()


def remember(policy, bank, scenes, mode="cut", shot=None, lengths=(6, 6, 5)):
    video = scene_video(scenes, list(lengths))
    tools = MemoryTools(TinyVAE(0), SceneEmbedder())
    return policy.remember(bank, FinishedShot(video, mode, f"shot {shot}", shot), tools)


def test_sink_and_most_recent_over_six_shots() -> None:
    policy = StoryMemPolicy()  # capacity 10 with a sink of 3 (SPEC 5)
    bank = policy.empty_bank()
    per_shot = {k: [3 * k, 3 * k + 1, 3 * k + 2] for k in range(1, 7)}  # three new scenes a shot
    per_shot[5] = [6, 30, 31]  # shot 5 opens on shot 2's first scene, whose keyframe left the pool
    history = []
    for k in range(1, 7):
        out = remember(policy, bank, per_shot[k], shot=k)
        bank = out.bank
        # frames 0, 6, 12 start the three scenes: the first frame, then each scene change
        keys = [0, 6, 12] if k != 5 else [6, 12]
        assert out.log["keyframes"] == keys
        history += [f"s{k}f{i}" for i in keys]
        assert out.log["bank_ids"] == bank.frame_ids("high")
    # 17 keyframes ever stored: the first 3 stay (the sink), then the 7 most recent.
    assert history[:3] == ["s1f0", "s1f6", "s1f12"]
    assert bank.frame_ids("high") == [*history[:3], *history[-7:]] == bank.frame_ids("low")
    assert bank.frame_ids("high") == [
        "s1f0", "s1f6", "s1f12", "s4f6", "s4f12", "s5f6", "s5f12", "s6f0", "s6f6", "s6f12",
    ]  # fmt: skip
    # Evicted keyframes stay in the archive with their embeddings: shot 5's duplicate check saw s2f0.
    assert [f.frame_id for f in bank.archive] == [i for i in history if i not in bank.frame_ids("high")]
    assert bank.all_clip_embeddings().shape == (17, D)
    # The next shot is conditioned on the whole bank as it stands.
    chosen, sel = policy.select(bank)
    assert chosen.frame_ids("high") == bank.frame_ids("high") and sel.pool("high").method == "storymem"
    # Story time counts the kept frames.
    assert (bank.current_time, bank.shots_done) == (6 * 17, 6)


def test_references_are_the_sink_and_count_as_stored_keyframes() -> None:
    policy = StoryMemPolicy(capacity=4)
    refs = scene_video([40, 41], [1, 1])
    tools = MemoryTools(TinyVAE(0), SceneEmbedder())
    latents = torch.stack([tools.vae.encode(refs[:, i : i + 1])[:, 0] for i in range(2)])
    embeddings = SceneEmbedder()(((refs + 1) / 2).permute(1, 0, 2, 3))
    bank = policy.empty_bank().with_references(latents, clip_embeddings=embeddings)
    out = remember(policy, bank, [40, 5, 6], shot=1)  # opens on reference 0's scene: a duplicate
    assert out.log["keyframes"] == [6, 12]
    out = remember(policy, out.bank, [7, 8, 9], shot=2)
    # 2 pinned references fill 2 of the 3 sink slots: then the first keyframe ever stored, then 1 recent.
    assert out.bank.frame_ids("high") == ["ref0", "ref1", "s1f6", "s2f12"]


@pytest.mark.parametrize(("mode", "dropped"), [("cut", 0), ("mi2v", 1), ("mm2v", 5)])
def test_a_continuation_drops_the_frames_it_repeats(mode: str, dropped: int) -> None:
    policy = StoryMemPolicy()
    video = scene_video([1, 2, 3], [8, 6, 6])  # 20 frames; a continuation's head is still scene 1
    out = policy.remember(
        policy.empty_bank(), FinishedShot(video, mode, "p", 1), MemoryTools(TinyVAE(0), SceneEmbedder())
    )
    assert torch.equal(out.video, video[:, dropped:])
    # keyframes are indices into the kept frames: scene 2 starts at 8 - dropped, scene 3 at 14 - dropped
    assert out.log["keyframes"] == [0, 8 - dropped, 14 - dropped]
    assert out.bank.current_time == 20 - dropped
    # Each keyframe is the kept frame's own 1-frame encode.
    for frame in out.bank.frames():
        k = int(frame.frame_id.split("f")[-1])
        assert torch.allclose(frame.latent, TinyVAE(0).encode(video[:, dropped + k : dropped + k + 1])[:, 0])
    assert get_policy("memento").kept_frames(video, mode) is video  # Memento keeps every frame


def test_no_embedder_is_a_readable_error() -> None:
    policy = StoryMemPolicy()
    with pytest.raises(MemoryBankError, match="CLIP image embeddings"):
        policy.remember(
            policy.empty_bank(), FinishedShot(scene_video([1], [9]), "cut"), MemoryTools(TinyVAE(0))
        )


def test_bank_with_archive_survives_save_and_load(tmp_path: Path) -> None:
    policy = StoryMemPolicy(capacity=4)
    bank = policy.empty_bank()
    for k in range(1, 4):
        bank = remember(policy, bank, [3 * k, 3 * k + 1, 3 * k + 2], shot=k).bank
    again = load_bank(save_bank(bank, tmp_path / "bank.safetensors"))
    assert again.frame_ids("high") == bank.frame_ids("high") and again.shared
    assert [f.frame_id for f in again.archive] == [f.frame_id for f in bank.archive]
    assert torch.equal(again.all_clip_embeddings(), bank.all_clip_embeddings())


# ------------------------------------------------------------------------------------- the sampler


def test_sampler_defaults_are_the_released_ones() -> None:
    memento, storymem = get_policy("memento").sampler, get_policy("storymem").sampler
    assert (storymem.shift, storymem.boundary, storymem.scheme) == (4.0, 0.9, "sequential")
    assert not storymem.renoise_memory and not storymem.identity_slot
    # SPEC 5: 13 high-noise + 27 low-noise steps at 40 steps (Memento at shift 5: 15 + 25).
    assert split_steps(wan_schedule(40, storymem.shift), storymem.boundary) == 13
    assert split_steps(wan_schedule(40, memento.shift), memento.boundary) == 15
    modes = ("t2v", "empty", "references", "cut", "mi2v", "mm2v")
    assert [storymem.guidance_for(m) for m in modes] == [3.5] * 6
    assert [memento.guidance_for(m) for m in modes] == [3.5, 5.0, 5.0, 5.0, 3.5, 5.0]
    assert StoryMemPolicy(scheme="storymem").sampler.scheme == "storymem"  # the paper's negative spacing


def test_policy_registry() -> None:
    assert set(policy_names()) >= {"memento", "storymem", "fov", "manual"}
    assert RUNNER_POLICIES == ("memento", "storymem", "fov", "memento+fov")  # manual needs frame ids
    assert get_policy("storymem").capacity == 10 and get_policy("memento").capacity == 8
    assert MemoryBank.empty("storymem").capacity == 10 and MemoryBank.empty("storymem").shared
    with pytest.raises(MemoryBankError, match="unknown memory policy 'nope'"):
        MemoryBank.empty("nope")
    with pytest.raises(RunnerError, match="policy: expected one of memento, storymem, fov, memento"):
        RunSettings(policy="manual").memory_policy()


def test_run_settings_take_the_policy_defaults_unless_given() -> None:
    policy = RunSettings(policy="storymem").memory_policy("memento")
    resolved = RunSettings(policy="storymem", guidance=4.0).resolved(policy)
    assert (resolved.policy, resolved.capacity, resolved.shift, resolved.boundary) == (
        "storymem",
        10,
        4.0,
        0.9,
    )
    assert (resolved.guidance, resolved.cut_guidance) == (4.0, 3.5)
    assert RunSettings(capacity=5).memory_policy("storymem").capacity == 5  # the family decides


# ------------------------------------------------------------------------------ command line, 4 shots

STORY = {
    "story_name": "two rooms",
    "story_overview": "a woman moves between two rooms",
    "reconstruct_target": "[Person A] a woman in a green coat",
    "scenes": [
        {"scene_num": 1, "video_prompts": ["a kitchen at dawn", "she pours tea"], "cut": [True, "False"]},
        {"scene_num": 2, "video_prompts": ["a library at night", "she opens a book"], "cut": [True, False]},
    ],
}


def retained(history: list[str], capacity: int, sink: int = 3) -> list[str]:
    return (
        history if len(history) <= capacity else history[:sink] + history[len(history) - (capacity - sink) :]
    )


@pytest.mark.parametrize("capacity", [None, 4])
def test_cli_storymem_run_follows_its_rules(tmp_path: Path, capacity: int | None) -> None:
    story = tmp_path / "story.json"
    story.write_text(json.dumps(STORY))
    out = tmp_path / "run"
    args = [str(story), "--out", str(out), "--policy", "storymem", "--width", "64", "--height", "32"]
    args += ["--frames", "17", "--steps", "3", "--seed", "5", "-q"]
    args += [] if capacity is None else ["--memory-capacity", str(capacity)]
    assert cli(args) == 0
    log = json.loads((out / "story_log.json").read_text())
    cap = capacity or 10
    assert log["settings"]["policy"] == "storymem" and log["settings"]["capacity"] == cap
    assert any(
        "'False'" in w for w in log["story"]["warnings"]
    )  # the string "False" was read, with a warning
    shots = log["shots"]
    assert [s["mode"] for s in shots] == ["t2v", "mi2v", "cut", "mi2v"]
    assert [s["seed"] for s in shots] == [5, 6, 5, 6]
    assert all(s["policy"] == "storymem" for s in shots)
    assert [s["guidance"] for s in shots] == [{"high": 3.5, "low": 3.5}] * 4  # no boost on cuts, T2V too
    assert [(s["shift"], s["boundary"]) for s in shots] == [(12.0, 0.875)] + [(4.0, 0.9)] * 3
    history: list[str] = []
    previous_bank: list[str] = []
    for n, s in enumerate(shots, start=1):
        assert len(s["keyframes"]) <= 3
        history += [f"s{n}f{i}" for i in s["keyframes"]]
        # conditioned on the bank as it stood after the previous shot, in one shared pool
        assert s["memory_ids"]["high"] == s["memory_ids"]["low"] == previous_bank
        m = len(previous_bank)
        assert s["positions"]["high"] == list(range(m + 5))  # sequential: memory 0..M-1, target after
        assert s["bank_ids"] == retained(history, cap)  # sink of 3 + the most recent
        previous_bank = s["bank_ids"]
    # continuations drop the frame they repeat from the saved shot
    frames = [read_mp4(out / s["files"]["video"]).shape[0] for s in shots]
    assert frames == [17, 16, 17, 16]
    assert read_mp4(out / "story.mp4").shape[0] == sum(frames)
    bank = load_bank(out / "memory_bank.safetensors")
    assert (
        bank.policy == "storymem" and bank.capacity == cap and bank.frame_ids("high") == shots[-1]["bank_ids"]
    )


def test_tiny_embedder_is_deterministic_and_unit() -> None:
    frames = torch.rand(4, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    a, b = TinyImageEmbedder()(frames), TinyImageEmbedder()(frames)
    assert torch.equal(a, b) and torch.allclose(a.norm(dim=-1), torch.ones(4))


def test_story_reads_storymem_cut_strings_and_refuses_others() -> None:
    story = parse_story(STORY)
    assert [s.cut for s in story.shots] == [True, False, True, False]
    assert story.warnings == ("scenes[0].cut[1] is the string 'False'; read as false",)
    bad = json.loads(json.dumps(STORY))
    bad["scenes"][0]["cut"][1] = "false"
    with pytest.raises(Exception, match=r"scenes\[0\].cut\[1\].*true or false"):
        parse_story(bad)
