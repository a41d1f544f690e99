"""Tests of memento_core.sampling: Wan2.2's schedule, UniPC against diffusers, Euler against a hand loop,
the dual-expert driver, and the hooks (callback, cancel, prepare)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
from torch import Tensor

from memento_core.sampling import (
    Expert,
    SamplingCancelled,
    StepInfo,
    dpm_schedule,
    guided_velocity,
    sample,
    sample_experts,
    split_steps,
    wan_schedule,
)

SHAPE = (2, 16, 3, 4, 6)

# Timesteps of Wan2.2's FlowUniPCMultistepScheduler for 40 steps at shift 5 (from the design doc).
WAN_T_40_SHIFT_5 = [
    999, 994, 989, 983, 978, 972, 965, 959, 952, 944, 937, 929, 920, 911, 902, 892, 882, 870, 859, 846,
    833, 818, 803, 786, 768, 749, 728, 706, 681, 654, 624, 591, 555, 514, 468, 416, 356, 288, 208, 113,
]  # fmt: skip


def _noise(seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _nonlinear_velocity(seed: int = 1) -> Callable[[Tensor, Tensor], Tensor]:
    """``v = tanh(A·x) + 0.1·(t/1000)·x`` with a fixed random channel-mixing matrix ``A`` [16, 16]."""
    a = torch.randn(16, 16, generator=torch.Generator().manual_seed(seed)) / 4.0

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        return torch.tanh(torch.einsum("ij,bj...->bi...", a.to(x.dtype), x)) + 0.1 * t / 1000 * x

    return velocity


# ------------------------------------------------------------------------------------------- schedule


def test_schedule_matches_wan_literal_timesteps() -> None:
    schedule = wan_schedule(40, 5.0)
    assert schedule.timesteps.dtype == torch.int64
    assert schedule.timesteps.tolist() == WAN_T_40_SHIFT_5
    assert schedule.sigmas.dtype == torch.float32
    assert schedule.sigmas.shape == (41,)
    assert schedule.sigmas[-1].item() == 0.0
    assert schedule.steps == 40
    # First sigma: shift 5 applied to float32(0.999) read back as a python float.
    smax = 0.9990000128746033
    assert schedule.sigmas[0].item() == np.float32(5 * smax / (1 + 4 * smax))


def test_diffusers_flow_sigmas_are_not_wans_schedule() -> None:
    """Finding: diffusers' own ``use_flow_sigmas`` schedule starts from ``linspace(1, 1/1000, n+1)``
    (then nudges sigma 1 down by 1e-6), Wan from ``linspace(float32(0.999), 0, n+1)``. At 40 steps, shift 5
    the truncated timesteps differ at index 3: diffusers 984 (s=0.925075 -> 0.98406), Wan 983
    (s=0.924075 -> 0.98383). That is why the comparison tests overwrite the scheduler's sigmas/timesteps."""
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0
    )
    scheduler.set_timesteps(40)
    theirs = scheduler.timesteps.tolist()
    ours = wan_schedule(40, 5.0).timesteps.tolist()
    assert theirs[3] == 984
    assert ours[3] == 983
    assert theirs != ours


# ------------------------------------------------------------------------------- UniPC against diffusers


def _diffusers_unipc(
    velocity: Callable[[Tensor, Tensor], Tensor], noise: Tensor, steps: int, shift: float
) -> Tensor:
    """Drive diffusers' UniPC with Wan's schedule, the way Wan2.2's pipeline drives its copy of it."""
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        solver_order=2,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
    )
    scheduler.set_timesteps(steps)  # resets model_outputs, lower_order_nums, last_sample, step/begin index
    schedule = wan_schedule(steps, shift)
    scheduler.sigmas = schedule.sigmas.clone()
    scheduler.timesteps = schedule.timesteps.clone()
    assert scheduler.num_inference_steps == steps
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(velocity(x, t.to(torch.float32)), t, x).prev_sample
    return x


@pytest.mark.parametrize(("steps", "shift"), [(40, 5.0), (10, 3.0), (40, 12.0), (2, 5.0), (1, 5.0)])
def test_unipc_matches_diffusers(steps: int, shift: float) -> None:
    velocity, noise = _nonlinear_velocity(), _noise()
    ours = sample(velocity, noise, steps=steps, shift=shift, solver="unipc")
    ref = _diffusers_unipc(velocity, noise, steps, shift)
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= 1e-5 * scale


def test_unipc_last_step_lands_on_x0_prediction() -> None:
    """At sigma = 0 the (order 1) last step is exactly ``x0 = x - sigma·v``: one step from noise is
    ``noise - sigma_0·v(noise, 999)``."""
    velocity, noise = _nonlinear_velocity(), _noise()
    sigma0 = wan_schedule(1, 5.0).sigmas[0]
    expected = noise - sigma0 * velocity(noise, torch.tensor(999.0))
    torch.testing.assert_close(sample(velocity, noise, steps=1), expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- DPM++ against diffusers


def _diffusers_dpmpp(
    velocity: Callable[[Tensor, Tensor], Tensor], noise: Tensor, steps: int, shift: float
) -> Tensor:
    """Drive diffusers' DPM-Solver++ with Wan's dpm++ schedule (``get_sampling_sigmas``), as Wan2.2's
    pipelines drive their copy of it (``FlowDPMSolverMultistepScheduler``, defaults)."""
    scheduler = DPMSolverMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=shift,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(steps)
    # Wan's sigmas, written out independently: linspace(1, 0) shifted, then a final 0.
    s = np.linspace(1.0, 0.0, steps + 1)[:steps]
    s = shift * s / (1 + (shift - 1) * s)
    scheduler.sigmas = torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))
    scheduler.timesteps = torch.from_numpy((s * 1000).astype(np.int64))
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(velocity(x, t.to(torch.float32)), t, x).prev_sample
    return x


@pytest.mark.parametrize(("steps", "shift"), [(40, 5.0), (10, 3.0), (40, 12.0), (2, 5.0), (1, 5.0)])
def test_dpmpp_matches_diffusers(steps: int, shift: float) -> None:
    velocity, noise = _nonlinear_velocity(), _noise()
    ours = sample(velocity, noise, steps=steps, shift=shift, solver="dpm++")
    ref = _diffusers_dpmpp(velocity, noise, steps, shift)
    scale = ref.abs().max().item()
    assert torch.isfinite(ours).all() and (ours - ref).abs().max().item() <= 1e-5 * scale


def test_dpm_schedule_starts_at_one() -> None:
    sched = dpm_schedule(40, 5.0)
    # s = 1, 0.975, 0.95 -> 5s/(1 + 4s) = 1, 4.875/4.9, 4.75/4.8 -> 1000, 994.9.., 989.5..
    assert sched.timesteps[:3].tolist() == [1000, 994, 989] and float(sched.sigmas[0]) == 1.0
    assert float(sched.sigmas[-1]) == 0.0 and sched.steps == 40
    # the first step sees pure noise (sigma 1): x0 = x - v, and one step lands on it exactly
    velocity, noise = _nonlinear_velocity(), _noise()
    expected = noise - velocity(noise, torch.tensor(1000.0))
    torch.testing.assert_close(sample(velocity, noise, steps=1, solver="dpm++"), expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ Euler by hand


@pytest.mark.parametrize(("steps", "shift"), [(40, 5.0), (7, 12.0)])
def test_euler_matches_hand_loop(steps: int, shift: float) -> None:
    velocity, noise = _nonlinear_velocity(), _noise()
    # Wan's schedule from its literal formula, in float64 then float32 as Wan stores it.
    s = np.linspace(0.9990000128746033, 0.0, steps + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    timesteps = [int(v * 1000) for v in s]
    sigmas = [float(np.float32(v)) for v in s] + [0.0]
    x = noise.clone()
    for i in range(steps):
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, torch.tensor(float(timesteps[i])))
    seen: list[Tensor] = []

    def recording(x: Tensor, t: Tensor) -> Tensor:
        seen.append(t)
        return velocity(x, t)

    torch.testing.assert_close(sample(recording, noise, steps, shift, "euler"), x, rtol=0, atol=1e-6)
    assert [t.item() for t in seen] == timesteps
    assert all(t.dim() == 0 and t.dtype == torch.float32 for t in seen)


# ------------------------------------------------------------------------------------ dual-expert driver


def test_split_steps_counts() -> None:
    assert split_steps(wan_schedule(40, 5.0), 0.9) == 15  # Wan2.2 I2V-A14B
    assert split_steps(wan_schedule(40, 12.0), 0.875) == 26  # Wan2.2 T2V-A14B
    assert split_steps(wan_schedule(40, 5.0), 1.0) == 0
    assert split_steps(wan_schedule(40, 5.0), 0.0) == 40


def _linear_model(name: str, slope: float, calls: list[tuple[str, int, str]]) -> Callable[..., Tensor]:
    """Fake expert ``v = slope·x + cond`` (``cond`` a tagged scalar), recording ``(name, t, tag)``."""

    def model(x: Tensor, t: Tensor, cond: tuple[str, float]) -> Tensor:
        calls.append((name, int(t.item()), cond[0]))
        return slope * x + cond[1]

    return model


COND, UNCOND = ("cond", 0.5), ("uncond", -0.25)


@pytest.mark.parametrize(("shift", "boundary", "n_high"), [(5.0, 0.9, 15), (12.0, 0.875, 26)])
def test_dual_driver_routes_steps_to_experts(shift: float, boundary: float, n_high: int) -> None:
    calls: list[tuple[str, int, str]] = []
    high = Expert(_linear_model("high", 0.3, calls), guidance=3.5)
    low = Expert(_linear_model("low", -0.2, calls), guidance=3.0)
    infos: list[StepInfo] = []
    sample_experts(
        _noise(),
        high=high,
        low=low,
        cond=COND,
        uncond=UNCOND,
        shift=shift,
        boundary=boundary,
        callback=infos.append,
    )
    timesteps = wan_schedule(40, shift).timesteps.tolist()
    expected = ["high" if t >= boundary * 1000 else "low" for t in timesteps]
    assert expected.count("high") == n_high
    # Two passes per step (cond first, as Wan does), both by that step's expert at that step's timestep.
    assert calls == [
        (e, t, tag) for e, t in zip(expected, timesteps, strict=True) for tag in ("cond", "uncond")
    ]
    assert [i.expert for i in infos] == expected


def test_guided_velocity_is_cfg_combination() -> None:
    calls: list[tuple[str, int, str]] = []
    x, t = _noise(), torch.tensor(999.0)
    v = guided_velocity(Expert(_linear_model("e", 0.3, calls), guidance=3.5), COND, UNCOND)(x, t)
    v_cond, v_uncond = 0.3 * x + 0.5, 0.3 * x - 0.25
    torch.testing.assert_close(v, v_uncond + 3.5 * (v_cond - v_uncond))
    assert [c[2] for c in calls] == ["cond", "uncond"]


def test_dual_driver_matches_hand_cfg_euler() -> None:
    """Whole run with linear fake experts against Euler written out with the CFG formula by hand."""
    steps, shift, boundary = 12, 5.0, 0.9
    calls: list[tuple[str, int, str]] = []
    high = Expert(_linear_model("high", 0.3, calls), guidance=3.5)
    low = Expert(_linear_model("low", -0.2, calls), guidance=2.0)
    noise = _noise()
    out = sample_experts(
        noise,
        high=high,
        low=low,
        cond=COND,
        uncond=UNCOND,
        steps=steps,
        shift=shift,
        boundary=boundary,
        solver="euler",
    )
    schedule = wan_schedule(steps, shift)
    x = noise.clone()
    for i in range(steps):
        t, s, s_next = int(schedule.timesteps[i]), float(schedule.sigmas[i]), float(schedule.sigmas[i + 1])
        slope, g = (0.3, 3.5) if t >= 900 else (-0.2, 2.0)
        v_cond, v_uncond = slope * x + 0.5, slope * x - 0.25
        x = x + (s_next - s) * (v_uncond + g * (v_cond - v_uncond))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)


def test_guidance_one_skips_uncond() -> None:
    calls: list[tuple[str, int, str]] = []
    high = Expert(_linear_model("high", 0.3, calls), guidance=1.0)
    low = Expert(_linear_model("low", -0.2, calls), guidance=1.0)
    noise = _noise()
    out = sample_experts(noise, high=high, low=low, cond=COND, uncond=UNCOND, steps=6, solver="euler")
    assert len(calls) == 6 and all(tag == "cond" for _, _, tag in calls)
    # Same as a plain run of the conditional velocity.
    schedule = wan_schedule(6, 5.0)
    x = noise.clone()
    for i in range(6):
        slope = 0.3 if schedule.timesteps[i] >= 900 else -0.2
        x = x + float(schedule.sigmas[i + 1] - schedule.sigmas[i]) * (slope * x + 0.5)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)


def test_prepare_runs_before_the_model_and_feeds_it() -> None:
    seen_by_model: list[Tensor] = []
    prepared: list[Tensor] = []
    infos: list[StepInfo] = []

    def model(x: Tensor, t: Tensor, cond: object) -> Tensor:
        seen_by_model.append(x.clone())
        return -0.1 * x

    def prepare(x: Tensor, info: StepInfo) -> Tensor:
        assert info.x is x
        infos.append(info)
        out = x.clone()
        out[:, :, 0] = info.sigma  # pin frame 0 to a value tied to this step's noise level
        prepared.append(out.clone())
        return out

    expert = Expert(model, guidance=1.0)
    sample_experts(_noise(), high=expert, low=expert, cond=None, uncond=None, steps=5, prepare=prepare)
    assert [i.step for i in infos] == list(range(5))
    assert [i.timestep for i in infos] == wan_schedule(5, 5.0).timesteps.tolist()
    for model_x, prep_x in zip(seen_by_model, prepared, strict=True):
        assert torch.equal(model_x, prep_x)


# -------------------------------------------------------------------------------- hooks and arguments


@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_callback_every_step(solver: str) -> None:
    infos: list[StepInfo] = []
    out = sample(_nonlinear_velocity(), _noise(), steps=9, shift=3.0, solver=solver, callback=infos.append)
    schedule = wan_schedule(9, 3.0)
    assert [i.step for i in infos] == list(range(9))
    assert all(i.total == 9 and i.expert is None for i in infos)
    assert [i.timestep for i in infos] == schedule.timesteps.tolist()
    assert [i.sigma for i in infos] == [float(s) for s in schedule.sigmas[:-1]]
    assert torch.equal(infos[-1].x, out)


@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_cancel_raises_and_leaves_noise_untouched(solver: str) -> None:
    noise = _noise()
    before = noise.clone()
    polls: list[int] = []
    model_calls: list[int] = []

    def cancel() -> bool:
        polls.append(len(polls))
        return len(polls) == 4  # cancel before the 4th step (index 3)

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        model_calls.append(int(t.item()))
        return _nonlinear_velocity()(x, t)

    with pytest.raises(SamplingCancelled, match="before step 4 of 10"):
        sample(velocity, noise, steps=10, solver=solver, cancel=cancel)
    assert len(model_calls) == 3
    assert torch.equal(noise, before)
    assert issubclass(SamplingCancelled, RuntimeError)


def test_noise_not_mutated_and_dtype_preserved() -> None:
    noise = _noise(dtype=torch.bfloat16)
    before = noise.clone()
    out = sample(_nonlinear_velocity(), noise, steps=4)
    assert out.dtype == torch.bfloat16 and out.shape == noise.shape
    assert torch.equal(noise, before)


@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_deterministic(solver: str) -> None:
    a = sample(_nonlinear_velocity(), _noise(), steps=12, solver=solver)
    b = sample(_nonlinear_velocity(), _noise(), steps=12, solver=solver)
    assert torch.equal(a, b)


def _identity_velocity(x: Tensor, t: Tensor) -> Tensor:
    return x


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps": 0},
        {"steps": -3},
        {"steps": 2.5},
        {"steps": True},
        {"shift": 0.0},
        {"shift": -1.0},
        {"shift": float("nan")},
        {"shift": float("inf")},
        {"shift": 1e6},  # first sigma rounds to 1.0 in float32: UniPC's log(1 - sigma) would be -inf
        {"solver": "ddim"},
        {"callback": 3},
    ],
)
def test_bad_sample_args_raise_value_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        sample(_identity_velocity, _noise(), **kwargs)  # type: ignore[arg-type]


def test_bad_inputs_raise_value_error() -> None:
    with pytest.raises(ValueError):
        sample(_identity_velocity, np.zeros(SHAPE))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        sample("not callable", _noise())  # type: ignore[arg-type]
    expert = Expert(lambda x, t, c: x, guidance=1.0)
    for bad in [{"boundary": 1.5}, {"boundary": -0.1}, {"solver": "heun"}, {"high": "x"}, {"steps": 0}]:
        kwargs: dict[str, object] = {"high": expert, "low": expert, "cond": None, "uncond": None, **bad}
        with pytest.raises(ValueError):
            sample_experts(_noise(), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        split_steps(wan_schedule(4, 5.0), 2.0)
