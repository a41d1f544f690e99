"""Memento's released pipeline (``pipeline_learnable_acce.py``, ``memory2video_learnable_rope_fine.py``):
the first shot from an empty memory, noise drawn on the compute device, KeyframeQuery precision, ``--fix``,
``--idt_back_mode`` and ``--storymem_mode``, each against an expectation written out by hand or a
literal re-statement of the reference's loop (the re-noising itself is in ``test_memory_forward``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from test_memory_forward import RecordingDiT

from memento_core.adapters import TinyVAE
from memento_core.cli import cli
from memento_core.conditioning import build_shot
from memento_core.keyframe_query import KeyframeQuery
from memento_core.m2v import Backbone, ShotRequest, generate_shot, kfq_precision_for, select_memory
from memento_core.memory import MementoPolicy, MemoryBank, SelectionInputs, get_policy
from memento_core.sampling import wan_schedule
from memento_core.shot import ShotSettings, ShotText, initial_noise, sample_shot
from memento_core.tiny import tiny_dit

H, W = 4, 4  # latent size of the hand-checked shots (32x32 px)


def text(identity: bool = True) -> ShotText:
    return ShotText(
        prompt=torch.full((1, 3, 8), 1.0),
        negative=torch.full((1, 3, 8), -1.0),
        identity=torch.full((1, 2, 8), 0.5) if identity else None,
        identity_negative=torch.zeros((1, 0, 8)) if identity else None,
    )


class RecordingBackbone:
    """A Backbone of two RecordingDiTs (they only record what they are fed)."""

    def __init__(self) -> None:
        self.log: list[dict] = []
        self.backbone = Backbone(RecordingDiT("high", self.log), RecordingDiT("low", self.log))


# ----------------------------------------------------------------------- 2. first shot, empty memory


def test_an_empty_memento_memory_is_one_zero_frame_at_minus_two() -> None:
    """--m2v_first_shot: ``memory_pool = zeros(16, 1, h, w)``, mask 1, position ``-(1 - 0)·2``, and it is
    re-noised like any memory frame: at step 0 ``(1 - s0)·0 + s0·noise``."""
    rec = RecordingBackbone()
    request = ShotRequest(
        "p", width=32, height=32, frames=9, reconstruct="[Person A]", settings=ShotSettings(steps=3, seed=4)
    ).with_sampler(get_policy("memento").sampler)
    shot = generate_shot(rec.backbone, MemoryBank.empty("memento"), request, TinyVAE(0), text())
    first = rec.log[0]
    # [identity | one memory frame | 3 target latents]
    assert first["pos"].tolist() == [-512, -2, 0, 1, 2] == shot.positions["high"]
    assert first["y"][0, :4, 1].eq(1).all() and first["y"][0, 4:, 1].eq(0).all()  # mask 1, zero latent
    s0 = wan_schedule(3, 5.0).timesteps[0].item() / 1000
    noise = initial_noise(4, (1, 16, 5, H, W))
    torch.testing.assert_close(first["x"][0, :, 1], s0 * noise[0, :, 1], rtol=0, atol=1e-6)
    assert shot.placeholder and shot.memory_ids == {"high": [], "low": []}
    # StoryMem's empty memory is no memory frame (its code would fail on an empty list).
    rec = RecordingBackbone()
    storymem = request.with_sampler(get_policy("storymem").sampler)
    generate_shot(rec.backbone, MemoryBank.empty("storymem"), storymem, TinyVAE(0), text(False))
    assert rec.log[0]["x"].shape[2] == 3 and rec.log[0]["pos"].tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------ 3. noise on the device


def test_device_noise_is_the_reference_draw() -> None:
    """The reference draws ``randn(16, lat_t, h, w, generator=Generator(device), device=device)``."""
    gen = torch.Generator(device="cpu").manual_seed(123)
    reference = torch.randn(16, 5, H, W, generator=gen, device="cpu")
    ours = initial_noise(123, (1, 16, 5, H, W), "cpu", source="device")
    assert torch.equal(ours[0], reference)
    with pytest.raises(Exception, match="noise"):
        ShotSettings(noise="gpu")


# ----------------------------------------------------------------------- 4. KeyframeQuery precision


def test_kfq_precision_follows_the_backbone_and_runs_under_bf16_autocast() -> None:
    fp32 = Backbone(tiny_dit("i2v", seed=1), tiny_dit("i2v", seed=2))
    bf16 = Backbone(tiny_dit("i2v", seed=1).to(torch.bfloat16), tiny_dit("i2v", seed=2).to(torch.bfloat16))
    assert kfq_precision_for(fp32) == "fp32" and kfq_precision_for(bf16) == "bf16"
    assert kfq_precision_for(fp32, "bf16") == "bf16" and kfq_precision_for(bf16, "fp32") == "fp32"

    torch.manual_seed(0)
    kfq_h, kfq_l = (KeyframeQuery(dim=256, num_heads=2).eval() for _ in range(2))
    backbone = Backbone(fp32.high, fp32.low, kfq_h, kfq_l)
    bank = MemoryBank.empty("memento")
    for shot in (1, 2):
        bank = bank.with_shot(torch.randn(8, 16, H, W), shot_index=shot)
    prompt, glob = torch.randn(1, 5, 64), torch.randn(1, 3, 64)
    _, selection = select_memory(backbone, bank, prompt, glob, kfq_precision="bf16")
    # The same selection by hand: embed and score inside the autocast the reference runs under.
    from memento_core.keyframe_query import candidate_positions

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ctx = fp32.high.embed_text(prompt).float()
        ctx_g = fp32.high.embed_text(glob).float()
        pos = candidate_positions([a - bank.current_time for a in bank.abs_frames("high")], bank.current_time)
        local, glob_idx = kfq_h.select(bank.latents("high"), pos, ctx, ctx_g, k_local=6, k_global=2)
    ids = bank.frame_ids("high")
    assert selection.pool("high").local_ids == tuple(ids[i] for i in local)
    assert selection.pool("high").global_ids == tuple(ids[i] for i in glob_idx)


# ----------------------------------------------------------------------------------------- 5a. --fix


def reference_filter(local: list[int], glob: list[int], fix: int, m_total: int) -> list[int]:
    """``filter_memory_by_query`` after the KeyframeQuery, line by line: per-query frames, the fixed
    frames, the query budget, the force-fill by attention score, the deduplicated global picks."""
    per_query_frames = list(local)
    selected_set = sorted(set(per_query_frames))
    actual_fix = min(fix, m_total)
    local_budget = 6
    if actual_fix > 0:
        fixed_indices = list(range(actual_fix))
        remaining = sorted([idx for idx in selected_set if idx >= actual_fix])
        query_budget = max(0, local_budget - actual_fix)
        selected_set = fixed_indices + remaining[:query_budget]
    else:
        selected_set = selected_set[:local_budget]
    if len(selected_set) < local_budget:
        scores = [1.0 if i in per_query_frames else 0.0 for i in range(m_total)]
        candidates = [(i, scores[i]) for i in range(m_total) if i not in set(selected_set)]
        candidates.sort(key=lambda x: x[1], reverse=True)
        selected_set = sorted(selected_set + [i for i, _ in candidates[: local_budget - len(selected_set)]])
    already_local = set(selected_set)
    global_deduped = list(dict.fromkeys(f for f in glob if f not in already_local))[:2]
    return sorted(selected_set) + global_deduped


class FixedPicks:
    def __init__(self, local: list[int], glob: list[int]) -> None:
        self.local, self.glob = local, glob

    def __call__(self, frames, current_time, *, k_local, k_global):
        assert (k_local, k_global) == (6, 2) and len(frames) == 16  # scored over ALL frames, as released
        return self.local, self.glob


@pytest.mark.parametrize("seed", range(12))
def test_fix_selects_as_the_released_filter(seed: int) -> None:
    rng = random.Random(seed)
    fix = [1, 2, 3, 5, 6, 7][seed % 6]
    picks = rng.sample(range(16), 8)
    local, glob = sorted(picks[:6]), sorted(picks[6:])
    bank = MemoryBank.empty("memento")
    for shot in (1, 2):
        bank = bank.with_shot(torch.randn(8, 16, H, W), shot_index=shot)
    chosen, sel = MementoPolicy(fix=fix).select(bank, SelectionInputs(selectors=FixedPicks(local, glob)))
    ids = bank.frame_ids("high")
    want = sorted(reference_filter(local, glob, fix, 16))
    assert chosen.frame_ids("high") == [ids[i] for i in want]
    assert sel.pool("high").method == "kfq+fix"
    assert all(ids[i] in chosen.frame_ids("high") for i in range(min(fix, 16)))  # the first N stay


# ----------------------------------------------------------------------------------- 5b. idt_back_mode


def test_identity_back_layout_mask_positions_and_segments() -> None:
    """idt_back_mode: latents [memory | identity | target], mask [memory | target | identity] (the
    released code appends the identity mask at the end), identity at the last memory position + 5; the
    DiT is still told ``n_identity=1`` at the front; re-noising covers frames [0, M)."""
    g = torch.Generator().manual_seed(2)
    mem, tgt, gray = (
        torch.randn(16, 2, H, W, generator=g),
        torch.randn(16, 3, H, W, generator=g),
        torch.randn(16, 1, H, W, generator=g),
    )
    pos = torch.tensor([-6, -1, 4, 0, 1, 2])
    cond = build_shot(mem, pos, tgt, "mi2v", gray, identity_back=True)
    assert (
        torch.equal(cond.y[4:, :2], mem)
        and torch.equal(cond.y[4:, 2:3], gray)
        and torch.equal(cond.y[4:, 3:], tgt)
    )
    assert cond.y[:4, :, 0, 0].T.tolist() == [
        [1.0] * 4,
        [1.0] * 4,
        [1.0] * 4,
        [0.0] * 4,
        [0.0] * 4,
        [0.0] * 4,
    ]
    assert (cond.memory_slice, cond.identity_slice, cond.target_slice) == (
        slice(0, 2),
        slice(2, 3),
        slice(3, 6),
    )
    log: list[dict] = []
    dit = RecordingDiT("x", log)
    out = sample_shot(dit, dit, cond, cond, text(), ShotSettings(steps=2, seed=1))
    s0 = wan_schedule(2, 5.0).timesteps[0].item() / 1000
    noise = initial_noise(1, (1, 16, 6, H, W))
    torch.testing.assert_close(
        log[0]["x"][0, :, :2], (1 - s0) * mem + s0 * noise[0, :, :2], rtol=0, atol=1e-6
    )
    assert torch.equal(log[0]["x"][0, :, 2], noise[0, :, 2])  # the identity slot is not re-noised
    assert out.identity.shape == (16, 1, H, W) and out.target.shape == (16, 3, H, W)


def test_identity_back_through_the_policy() -> None:
    rec = RecordingBackbone()
    policy = MementoPolicy(identity_back=True)
    bank = policy.empty_bank().with_shot(torch.randn(8, 16, H, W), shot_index=1, frames_per_shot=81)
    request = ShotRequest(
        "p", width=32, height=32, frames=9, reconstruct="[Person A]", settings=ShotSettings(steps=2)
    ).with_sampler(policy.sampler)
    shot = generate_shot(rec.backbone, bank, request, TinyVAE(0), text())
    # shot 1's frames at -20 .. -1, then the identity at -1 + 5 = 4, then the target
    assert shot.positions["high"] == [-20, -18, -15, -12, -9, -6, -3, -1, 4, 0, 1, 2]


# ---------------------------------------------------------------------------------- 5c. storymem_mode


def test_storymem_mode_spaces_memory_20_latent_frames_apart() -> None:
    rec = RecordingBackbone()
    policy = MementoPolicy(storymem_mode=True)
    bank = policy.empty_bank().with_shot(torch.randn(8, 16, H, W), shot_index=1, frames_per_shot=81)
    request = ShotRequest(
        "p", width=32, height=32, frames=9, reconstruct="[Person A]", settings=ShotSettings(steps=2)
    ).with_sampler(policy.sampler)
    shot = generate_shot(rec.backbone, bank, request, TinyVAE(0), text())
    # mem_lat_abs = target - (M - i)·20 -> -160, -140, ..., -20; the identity at -512 (position 0 abs)
    assert shot.positions["high"] == [-512, -160, -140, -120, -100, -80, -60, -40, -20, 0, 1, 2]


# ----------------------------------------------------------------------------------- command line


def test_command_line_options_reach_the_run(tmp_path: Path) -> None:
    story = {
        "story_name": "s",
        "reconstruct_target": "[Person A] a sailor",
        "scenes": [{"scene_num": 1, "video_prompts": ["a", "b", "c"], "cut": [True, True, True]}],
    }
    path = tmp_path / "story.json"
    path.write_text(json.dumps(story))
    out = tmp_path / "run"
    args = [str(path), "--out", str(out), "--width", "32", "--height", "32", "--frames", "9", "--steps", "2"]
    args += [
        "--first-shot",
        "empty",
        "--storymem-mode",
        "--fix",
        "2",
        "--solver",
        "dpm++",
        "--noise",
        "device",
    ]
    args += ["--memory-noise", "fixed", "--kfq-precision", "bf16", "-q"]
    assert cli(args) == 0
    log = json.loads((out / "story_log.json").read_text())
    settings = log["settings"]
    assert (settings["fix"], settings["storymem_mode"], settings["solver"]) == (2, True, "dpm++")
    assert (settings["noise"], settings["memory_noise"], settings["kfq_precision"]) == (
        "device",
        "fixed",
        "bf16",
    )
    assert log["policy"]["fix"] == 2 and log["policy"]["storymem_mode"] is True
    shots = log["shots"]
    assert shots[0]["positions"]["high"] == [-512, -20, 0, 1, 2]  # the zero frame, 20 apart
    assert shots[0]["memory_placeholder"]
    assert shots[1]["positions"]["high"][:2] == [-512, -160]  # shot 1's 8 frames, 20 apart
    with pytest.raises(SystemExit):
        cli([str(path), "--solver", "ddim"])
    assert (
        cli([str(path), "--out", str(tmp_path / "r2"), "--policy", "storymem", "--idt-back-mode", "-q"]) == 2
    )
