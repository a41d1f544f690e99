"""The memory forward of WanDiT (SPEC 4.3, 4.4) and the shot builder / shot sampler (SPEC 4.2, 4.5)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from memento_core.conditioning import build_shot, condition_clip, latent_frames, target_mask
from memento_core.dit import _split_attention
from memento_core.errors import ShapeError
from memento_core.sampling import wan_schedule
from memento_core.shot import ShotSettings, ShotText, initial_noise, sample_shot
from memento_core.tiny import tiny_dit


def shot_inputs(model, f=6, h=4, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(1, 16, f, h, w, generator=g)
    y = torch.randn(1, cfg.cond_dim, f, h, w, generator=g)
    ctx = torch.randn(1, 12, cfg.text_dim, generator=g)
    ctx_id = torch.randn(1, 5, cfg.text_dim, generator=g)
    return x, y, torch.tensor([640.0]), ctx, ctx_id


def test_no_identity_equals_plain_forward_exactly():
    model = tiny_dit("i2v", seed=1)
    x, y, t, ctx, ctx_id = shot_inputs(model)
    with torch.no_grad():
        plain = model(x, t, ctx, y=y)
        memory = model(x, t, ctx, y=y, frame_pos=torch.arange(6), n_memory=3, context_identity=ctx_id)
    assert torch.equal(plain, memory)


def reference_split_attention(q, k, v, n_id, n_mem):
    """Explicit softmax attention with block masks: SA1 = [identity+memory] only, SA2 = [memory+target]
    only; identity <- SA1, target <- SA2, memory <- mean of both. q, k, v: [B, L, H, D]."""
    length = q.shape[1]
    idx = torch.arange(length)
    in1 = idx < n_id + n_mem
    in2 = idx >= n_id
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(q.shape[-1])

    def masked(allowed_keys):
        lg = logits.masked_fill(~allowed_keys[None, None, None, :], float("-inf"))
        return torch.einsum("bhqk,bkhd->bqhd", lg.softmax(-1), v.double())

    sa1, sa2 = masked(in1), masked(in2)
    out = torch.empty_like(sa1)
    out[:, :n_id] = sa1[:, :n_id]
    out[:, n_id : n_id + n_mem] = 0.5 * sa1[:, n_id : n_id + n_mem] + 0.5 * sa2[:, n_id : n_id + n_mem]
    out[:, n_id + n_mem :] = sa2[:, n_id + n_mem :]
    return out.float()


@pytest.mark.parametrize("n_id,n_mem,n_tgt", [(16, 48, 80), (8, 8, 8), (4, 0, 12)])
def test_split_attention_against_block_masked_full_attention(n_id, n_mem, n_tgt):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n_id + n_mem + n_tgt, 2, 128, generator=g) for _ in range(3))
    ours = _split_attention(q, k, v, n_id, n_mem)
    assert torch.allclose(ours, reference_split_attention(q, k, v, n_id, n_mem), atol=1e-5)


def test_identity_and_target_never_see_each_other_in_one_block():
    """One block: identity outputs ignore the target latents and vice versa; the identity caption only
    reaches the identity tokens."""
    model = tiny_dit("i2v", seed=2, num_layers=1)
    x, y, t, ctx, ctx_id = shot_inputs(model, f=6)
    kw = {"frame_pos": torch.tensor([-512, -9, -3, 0, 1, 2]), "n_identity": 1, "n_memory": 2}
    x2 = x.clone()
    x2[:, :, 3:] += torch.randn_like(x2[:, :, 3:])  # new target
    x3 = x.clone()
    x3[:, :, :1] += torch.randn_like(x3[:, :, :1])  # new identity
    with torch.no_grad():
        base = model(x, t, ctx, y=y, context_identity=ctx_id, **kw)
        new_target = model(x2, t, ctx, y=y, context_identity=ctx_id, **kw)
        new_identity = model(x3, t, ctx, y=y, context_identity=ctx_id, **kw)
        new_caption = model(x, t, ctx, y=y, context_identity=ctx_id * -2.0, **kw)
    assert torch.equal(base[:, :, :1], new_target[:, :, :1])
    assert not torch.equal(base[:, :, 1:3], new_target[:, :, 1:3])  # memory does see the target
    assert torch.equal(base[:, :, 3:], new_identity[:, :, 3:])
    assert torch.equal(base[:, :, 1:], new_caption[:, :, 1:])
    assert not torch.allclose(base[:, :, :1], new_caption[:, :, :1])


def test_identity_needs_its_caption():
    model = tiny_dit("i2v")
    x, y, t, ctx, _ = shot_inputs(model)
    with pytest.raises(ShapeError, match="context_identity"):
        model(x, t, ctx, y=y, n_identity=1, n_memory=2)


# ------------------------------------------------------------------------------------------------
# Shot builder


def test_latent_frames_rule():
    assert latent_frames(81) == 21 and latent_frames(1) == 1 and latent_frames(5) == 2
    with pytest.raises(ShapeError, match="4n\\+1"):
        latent_frames(80)


def test_target_masks():
    assert target_mask(21, "cut").sum() == 0
    m = target_mask(21, "mi2v")
    assert m[:, 0].eq(1).all() and m[:, 1:].eq(0).all()
    m = target_mask(21, "mm2v")
    assert m[:, :2].eq(1).all() and m[:, 2:].eq(0).all()


def test_condition_clips():
    first = torch.rand(3, 1, 32, 48) * 2 - 1
    clip = condition_clip("mi2v", first, 81, 32, 48)
    assert clip.shape == (3, 81, 32, 48) and torch.equal(clip[:, :1], first) and clip[:, 1:].eq(0).all()
    assert condition_clip("cut", None, 81, 32, 48).eq(0).all()
    motion = torch.rand(3, 5, 32, 48)
    assert torch.equal(condition_clip("mm2v", motion, 81, 32, 48)[:, :5], motion)
    with pytest.raises(ShapeError, match="mi2v"):
        condition_clip("mi2v", None, 81, 32, 48)
    with pytest.raises(ShapeError, match="shot is"):
        condition_clip("mi2v", torch.zeros(3, 1, 16, 16), 81, 32, 48)


@pytest.mark.parametrize("identity", [False, True])
@pytest.mark.parametrize("mode", ["cut", "mi2v", "mm2v"])
def test_build_shot_layout(identity, mode):
    g = torch.Generator().manual_seed(0)
    memory = torch.randn(16, 8, 6, 10, generator=g)
    target = torch.randn(16, 21, 6, 10, generator=g)
    gray = torch.randn(16, 1, 6, 10, generator=g) if identity else None
    n_id = int(identity)
    pos = torch.arange(n_id + 8 + 21)
    shot = build_shot(memory, pos, target, mode, gray)
    assert shot.y.shape == (20, n_id + 29, 6, 10) and shot.frames == n_id + 29
    mask, lat = shot.y[:4], shot.y[4:]
    if identity:
        assert mask[:, 0].eq(0).all() and torch.equal(lat[:, :1], gray)
    assert mask[:, shot.memory_slice].eq(1).all() and torch.equal(lat[:, shot.memory_slice], memory)
    assert torch.equal(lat[:, shot.target_slice], target)
    given = {"cut": 0, "mi2v": 1, "mm2v": 2}[mode]
    tmask = mask[:, shot.target_slice]
    assert tmask[:, :given].eq(1).all() and tmask[:, given:].eq(0).all()


def test_build_shot_rejects_memory_of_another_resolution():
    with pytest.raises(ShapeError, match="another resolution"):
        build_shot(torch.zeros(16, 2, 4, 4), torch.arange(23), torch.zeros(16, 21, 6, 10), "cut")


# ------------------------------------------------------------------------------------------------
# Shot sampler


class RecordingDiT(nn.Module):
    """A stand-in expert: records every call and returns a simple velocity of x."""

    def __init__(self, name, log):
        super().__init__()
        self.name, self.log = name, log
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x, t, context, y=None, frame_pos=None, n_identity=0, n_memory=0, context_identity=None):
        self.log.append(
            {
                "expert": self.name,
                "t": float(t[0]),
                "x": x.clone(),
                "y": y.clone(),
                "pos": frame_pos.clone(),
                "ctx": context.clone(),
                "ctx_id": None if context_identity is None else context_identity.clone(),
            }
        )
        return 0.1 * x + context.mean() + (0 if context_identity is None else context_identity.sum())


def pools():
    g = torch.Generator().manual_seed(5)
    mem_high = torch.randn(16, 3, 4, 4, generator=g)
    mem_low = torch.randn(16, 3, 4, 4, generator=g)
    target = torch.randn(16, 5, 4, 4, generator=g)
    gray = torch.randn(16, 1, 4, 4, generator=g)
    pos = torch.tensor([-512, -9, -5, -1, 0, 1, 2, 3, 4])
    return (
        build_shot(mem_high, pos, target, "mi2v", gray),
        build_shot(mem_low, pos, target, "mi2v", gray),
    )


def text():
    return ShotText(
        prompt=torch.full((1, 3, 8), 1.0),
        negative=torch.full((1, 3, 8), -1.0),
        identity=torch.full((1, 2, 8), 0.5),
        identity_negative=torch.zeros((1, 0, 8)),
    )


def test_memento_renoises_memory_every_step_with_its_pool():
    """memory_noise "fixed" (SPEC 4.5's idealised form): the initial noise at every step."""
    log = []
    c_high, c_low = pools()
    settings = ShotSettings(
        steps=10, shift=5.0, boundary=0.9, guidance_high=3.5, guidance_low=2.0, seed=7, memory_noise="fixed"
    )
    result = sample_shot(RecordingDiT("high", log), RecordingDiT("low", log), c_high, c_low, text(), settings)
    noise = initial_noise(7, (1, 16, 9, 4, 4))
    schedule = wan_schedule(10, 5.0)
    assert len(log) == 20  # cond + uncond at every step
    for i, t in enumerate(schedule.timesteps.tolist()):
        cond, uncond = log[2 * i], log[2 * i + 1]
        expert = "high" if t >= 900 else "low"
        pool = (c_high if expert == "high" else c_low).memory
        s = t / 1000.0
        expected = (1 - s) * pool + s * noise[0, :, 1:4]
        for call in (cond, uncond):
            assert call["expert"] == expert and call["t"] == t
            assert torch.allclose(call["x"][0, :, 1:4], expected, atol=1e-6)
            assert torch.equal(call["y"][0], (c_high if expert == "high" else c_low).y)
        # CFG: the prompt and the reconstruct caption, then the negative prompt and ""
        assert cond["ctx"].eq(1).all() and cond["ctx_id"].eq(0.5).all()
        assert uncond["ctx"].eq(-1).all() and uncond["ctx_id"].shape[1] == 0
    assert log[0]["x"][0, :, 0].equal(noise[0, :, 0])  # identity and target start from the same noise
    assert result.target.shape == (16, 5, 4, 4) and result.identity.shape == (16, 1, 4, 4)
    assert torch.isfinite(result.target).all()


def test_released_renoising_uses_the_step0_renoised_memory_as_noise():
    """As released: the sampler's latent is its noise tensor and step 0 writes the re-noised memory into
    it, so later steps re-noise with ``(1 - s0)·clean_high + s0·noise`` (step 0 runs the high expert)."""
    log = []
    c_high, c_low = pools()
    settings = ShotSettings(steps=10, shift=5.0, boundary=0.9, guidance_high=3.5, guidance_low=2.0, seed=7)
    assert settings.memory_noise == "released"  # the default
    sample_shot(RecordingDiT("high", log), RecordingDiT("low", log), c_high, c_low, text(), settings)
    noise = initial_noise(7, (1, 16, 9, 4, 4))[0, :, 1:4]
    timesteps = wan_schedule(10, 5.0).timesteps.tolist()
    s0 = timesteps[0] / 1000.0
    noise_after_step0 = (1 - s0) * c_high.memory + s0 * noise
    for i, t in enumerate(timesteps):
        pool = (c_high if t >= 900 else c_low).memory
        s = t / 1000.0
        expected = (1 - s) * pool + s * (noise if i == 0 else noise_after_step0)
        assert torch.allclose(log[2 * i]["x"][0, :, 1:4], expected, atol=1e-6), i


def test_released_renoising_equals_the_reference_loop_with_its_aliased_noise():
    """The reference's loop written out: ``latent = noise``; every step writes the re-noised memory into
    ``latent`` in place (at step 0 that IS ``noise``), then the solver returns a new latent."""
    from memento_core.sampling import guided_velocity, make_solver
    from memento_core.shot import Expert

    c_high, c_low = pools()
    settings = ShotSettings(steps=6, shift=5.0, boundary=0.9, seed=3)
    result = sample_shot(RecordingDiT("high", []), RecordingDiT("low", []), c_high, c_low, text(), settings)
    t = text()
    schedule = wan_schedule(6, 5.0)
    solver = make_solver("unipc", schedule.sigmas)
    noise = initial_noise(3, (1, 16, 9, 4, 4))
    latent = noise  # the same tensor, as released
    for i, step_t in enumerate(schedule.timesteps.tolist()):
        cond = c_high if step_t >= 900 else c_low
        sigma = step_t / 1000.0
        latent[:, :, 1:4] = (1 - sigma) * cond.memory + sigma * noise[:, :, 1:4]
        model = RecordingDiT("x", [])

        def call(x, tt, ctx, cond=cond, model=model):
            return model(x, tt.reshape(1), ctx[0], y=cond.y[None], frame_pos=cond.frame_pos,
                         n_identity=1, n_memory=3, context_identity=ctx[1])  # fmt: skip

        velocity = guided_velocity(
            Expert(call, 3.5), (t.prompt, t.identity), (t.negative, t.identity_negative)
        )
        latent = solver.step(latent, velocity(latent, torch.tensor(float(step_t))), i)
    torch.testing.assert_close(result.target, latent[0, :, 4:], rtol=0, atol=1e-6)


def test_storymem_does_not_renoise_and_seed_is_deterministic():
    log = []
    c_high, _ = pools()
    settings = ShotSettings(steps=4, renoise_memory=False, seed=3)
    dit = RecordingDiT("x", log)
    first = sample_shot(dit, dit, c_high, c_high, text(), settings)
    noise = initial_noise(3, (1, 16, 9, 4, 4))
    assert torch.equal(log[0]["x"], noise)  # memory slots start as plain noise
    again = sample_shot(dit, dit, c_high, c_high, text(), settings)
    assert torch.equal(first.target, again.target) and torch.equal(first.identity, again.identity)
    other = sample_shot(dit, dit, c_high, c_high, text(), ShotSettings(steps=4, renoise_memory=False, seed=4))
    assert not torch.equal(first.target, other.target)


def test_shot_on_tiny_experts_runs_and_is_deterministic():
    high, low = tiny_dit("i2v", seed=1), tiny_dit("i2v", seed=2)
    c_high, c_low = pools()
    g = torch.Generator().manual_seed(0)
    txt = ShotText(
        prompt=torch.randn(1, 7, 64, generator=g),
        negative=torch.randn(1, 9, 64, generator=g),
        identity=torch.randn(1, 4, 64, generator=g),
        identity_negative=torch.zeros(1, 0, 64),
    )
    settings = ShotSettings(steps=3, seed=11)
    a = sample_shot(high, low, c_high, c_low, txt, settings)
    b = sample_shot(high, low, c_high, c_low, txt, settings)
    assert torch.equal(a.target, b.target) and torch.isfinite(a.target).all()


def test_t2v_shot_on_tiny_experts():
    """Shot 1 by plain T2V: the sampler's result for the same seed is reproducible and noise-shaped."""
    from memento_core.shot import sample_t2v_shot

    high, low = tiny_dit("t2v", seed=1), tiny_dit("t2v", seed=2)
    g = torch.Generator().manual_seed(0)
    txt = ShotText(prompt=torch.randn(1, 7, 64, generator=g), negative=torch.randn(1, 9, 64, generator=g))
    settings = ShotSettings(steps=3, shift=12.0, boundary=0.875, seed=5)
    a = sample_t2v_shot(high, low, txt, (5, 4, 6), settings)
    b = sample_t2v_shot(high, low, txt, (5, 4, 6), settings)
    assert a.target.shape == (16, 5, 4, 6) and a.identity is None
    assert torch.equal(a.target, b.target) and torch.isfinite(a.target).all()
