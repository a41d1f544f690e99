"""Flow-matching samplers exactly as Wan2.2 runs them (pure PyTorch, no ComfyUI).

Wan2.2 is a rectified-flow model: the network predicts a velocity ``v`` and a latent at noise level
``sigma`` is ``x = (1 - sigma)·x0 + sigma·noise``, so ``x0 = x - sigma·v``. Sampling walks ``sigma`` from
just below 1 down to 0 along Wan's shifted schedule (``wan_schedule``) with one of two solvers:

* ``"unipc"``: multistep UniPC (order 2, B(h) = e^h - 1 "bh2", data prediction, UniC corrector after every
  step but the first, first and last steps at order 1), the solver Wan2.2 ships. It reproduces diffusers'
  ``UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, solver_order=2,
  solver_type="bh2", predict_x0=True, lower_order_final=True)`` driven with Wan's schedule.
* ``"euler"``: ``x += (sigma_next - sigma)·v``.
* ``"dpm++"``: multistep DPM-Solver++ (order 2, midpoint, data prediction, first order on the first
  and last steps), Wan's ``FlowDPMSolverMultistepScheduler`` on its own schedule (``dpm_schedule``:
  ``linspace(1, 0)``, not ``0.999``); it reproduces diffusers' ``DPMSolverMultistepScheduler(
  prediction_type="flow_prediction", use_flow_sigmas=True, algorithm_type="dpmsolver++")`` driven with
  that schedule. Its coefficients are computed in float32 tensors, as Wan's are.

Public entry points: ``sample`` (one velocity function) and ``sample_experts`` (Wan2.2-A14B's high-noise /
low-noise expert pair with classifier-free guidance). Both run through the same stepping loop.

Shapes: latents are any shape, typically ``[B, C, F, H, W]``; the solver works in float32 whatever the
latent dtype and casts back at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from .errors import MementoError

__all__ = [
    "SOLVERS",
    "Cond",
    "DPMSolverPP",
    "EulerSolver",
    "Expert",
    "SamplingCancelled",
    "Schedule",
    "Solver",
    "StepInfo",
    "UniPCSolver",
    "dpm_schedule",
    "guided_velocity",
    "make_solver",
    "sample",
    "sample_experts",
    "schedule_for",
    "split_steps",
    "wan_schedule",
]

Cond = Any
"""Opaque conditioning object (text embeddings, image latents, ...) handed unchanged to an expert model."""

Velocity = Callable[[Tensor, Tensor], Tensor]
"""``velocity(x, t) -> v``: ``x`` float32 latent, ``t`` 0-dim float32 tensor holding the integer timestep."""

SOLVERS = ("unipc", "euler", "dpm++")
NUM_TRAIN_TIMESTEPS = 1000
# Wan's sigma_max is the first training sigma, 1 - 1/1000, stored as float32 and read back with .item().
SIGMA_MAX = float(np.float32(0.999))


class SamplingCancelled(RuntimeError):
    """Raised when the ``cancel`` callback asks to stop; the caller's ``noise`` tensor is untouched."""


# --------------------------------------------------------------------------------------------- schedule


@dataclass(frozen=True, eq=False)
class Schedule:
    """Wan's sampling schedule.

    ``timesteps``: int64 ``[steps]``, the integer timesteps the model sees (strictly decreasing in practice).
    ``sigmas``: float32 ``[steps + 1]``, the solver's noise levels; ``sigmas[i]`` belongs to ``timesteps[i]``
    and the last one is 0.
    """

    timesteps: Tensor
    sigmas: Tensor

    @property
    def steps(self) -> int:
        """Number of solver steps (= model evaluations per expert pass)."""
        return int(self.timesteps.shape[0])


def _check_steps_shift(steps: int, shift: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise MementoError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(shift, bool) or not isinstance(shift, (int, float, np.floating)):
        raise MementoError(f"shift must be a number > 0, got {shift!r}")
    if not math.isfinite(shift) or shift <= 0:
        raise MementoError(f"shift must be a finite number > 0, got {shift!r}")


def wan_schedule(steps: int, shift: float) -> Schedule:
    """Build Wan2.2's schedule: ``s = linspace(0.999, 0, steps + 1)[:-1]`` (float64),
    ``s' = shift·s / (1 + (shift - 1)·s)``, ``timesteps = int64(s'·1000)`` (truncated),
    ``sigmas = float32([s', 0])``.

    This is not diffusers' ``use_flow_sigmas`` schedule, which starts from ``linspace(1, 1/1000, ...)``:
    for 40 steps at shift 5 the two disagree at step 3 (983 here, 984 there).
    """
    _check_steps_shift(steps, shift)
    s = np.linspace(SIGMA_MAX, 0.0, int(steps) + 1, dtype=np.float64)[:-1]
    shifted = shift * s / (1.0 + (shift - 1.0) * s)
    timesteps = (shifted * NUM_TRAIN_TIMESTEPS).astype(np.int64)
    sigmas = np.concatenate([shifted, [0.0]]).astype(np.float32)
    return Schedule(timesteps=torch.from_numpy(timesteps), sigmas=torch.from_numpy(sigmas))


def dpm_schedule(steps: int, shift: float) -> Schedule:
    """Wan's schedule for its DPM-Solver++ (``get_sampling_sigmas``): ``s = linspace(1, 0, steps + 1)
    [:steps]`` (float64), shifted as in ``wan_schedule``, ``timesteps = int64(s'·1000)`` (so the first
    is 1000), ``sigmas = float32([s', 0])``."""
    _check_steps_shift(steps, shift)
    s = np.linspace(1.0, 0.0, int(steps) + 1, dtype=np.float64)[: int(steps)]
    shifted = shift * s / (1.0 + (shift - 1.0) * s)
    timesteps = (shifted * NUM_TRAIN_TIMESTEPS).astype(np.int64)
    sigmas = np.concatenate([shifted, [0.0]]).astype(np.float32)
    return Schedule(timesteps=torch.from_numpy(timesteps), sigmas=torch.from_numpy(sigmas))


def schedule_for(solver: str, steps: int, shift: float) -> Schedule:
    """The schedule a solver is run on in Wan2.2: ``dpm_schedule`` for "dpm++", else ``wan_schedule``."""
    return dpm_schedule(steps, shift) if solver == "dpm++" else wan_schedule(steps, shift)


def split_steps(schedule: Schedule, boundary: float) -> int:
    """Number of high-noise-expert steps: those whose integer timestep is ``>= boundary·1000``.

    Wan2.2 switches experts once, so these are the first ``split_steps(...)`` steps of the schedule.
    """
    _check_boundary(boundary)
    return int((schedule.timesteps >= boundary * NUM_TRAIN_TIMESTEPS).sum())


def _check_boundary(boundary: float) -> None:
    if isinstance(boundary, bool) or not isinstance(boundary, (int, float, np.floating)):
        raise MementoError(f"boundary must be a number in [0, 1], got {boundary!r}")
    if not 0.0 <= boundary <= 1.0:
        raise MementoError(f"boundary must be in [0, 1], got {boundary!r}")


# ---------------------------------------------------------------------------------------------- solvers


class Solver(Protocol):
    """A stateful one-pass solver: call ``step(x, v, i)`` for ``i = 0, 1, ..., steps - 1`` in order.

    ``x``: float32 latent at ``sigmas[i]``; ``v``: float32 velocity at ``(x, timesteps[i])``, same shape.
    Returns the float32 latent at ``sigmas[i + 1]``. Never modifies its inputs in place.
    """

    def step(self, x: Tensor, v: Tensor, i: int) -> Tensor: ...


class EulerSolver:
    """First-order flow Euler: ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i)·v_i``."""

    def __init__(self, sigmas: Tensor) -> None:
        self._sigmas = [float(s) for s in sigmas]

    def step(self, x: Tensor, v: Tensor, i: int) -> Tensor:
        return x + (self._sigmas[i + 1] - self._sigmas[i]) * v


def _lam(sigma: float) -> float:
    """Half log-SNR of the flow path, ``log(alpha) - log(sigma)`` with ``alpha = 1 - sigma``; +inf at 0."""
    return math.inf if sigma == 0.0 else math.log(1.0 - sigma) - math.log(sigma)


def _bh2_update(x: Tensor, sigma_s: float, sigma_t: float, m0: Tensor, delta: Tensor | float) -> Tensor:
    """Shared UniP/UniC data-prediction update from ``sigma_s`` to ``sigma_t`` (B(h) = e^h - 1):

    ``x_t = (sigma_t/sigma_s)·x + alpha_t·(1 - e^{-h})·(m0 + delta)``, ``h = lam_t - lam_s``.

    ``m0``: x0 prediction at ``sigma_s``; ``delta``: the higher-order correction ``sum_k rho_k·D_k``.
    At ``sigma_t = 0``, ``h = +inf`` and this is exactly ``m0 + delta`` (diffusers gets the same through
    ``log(0) = -inf``, ``expm1(-inf) = -1``).
    """
    phi = -math.expm1(-(_lam(sigma_t) - _lam(sigma_s)))  # 1 - e^{-h}
    return (sigma_t / sigma_s) * x + ((1.0 - sigma_t) * phi) * (m0 + delta)


def _unic2_rhos(h: float, r: float) -> tuple[float, float]:
    """Order-2 UniC weights for bh2 and data prediction: solve ``[[1, 1], [r, 1]]·rho = b``.

    With ``hh = -h``, ``B = e^hh - 1``, ``g1 = B/hh - 1`` and ``g2 = g1/hh - 1/2`` (UniPC's ``h·phi_k``
    recursion), ``b = (g1/B, 2·g2/B)``. ``r`` is the older node's log-SNR gap ratio; returns
    ``(rho_old, rho_new)``: the weights of the older difference and of the new model evaluation.
    """
    hh = -h
    b_h = math.expm1(hh)
    g1 = b_h / hh - 1.0
    g2 = g1 / hh - 0.5
    b1, b2 = g1 / b_h, 2.0 * g2 / b_h
    rho_old = (b1 - b2) / (1.0 - r)
    return rho_old, b1 - rho_old


class UniPCSolver:
    """Multistep UniPC-2 (bh2, data prediction) with the UniC corrector, for flow sigmas.

    Per step ``i`` (model already evaluated at the predicted ``x_i``):

    1. ``m_i = x_i - sigma_i·v_i`` (x0 prediction).
    2. For ``i > 0``, UniC replaces ``x_i`` by a corrected value recomputed from the previous corrected
       sample ``x_{i-1}`` and ``m_{i-2}, m_{i-1}, m_i`` (order = the previous predictor's order).
    3. UniP predicts ``x_{i+1}`` from the corrected ``x_i`` and ``m_{i-1}, m_i``; order 1 on the first step
       (no history) and on the last (``lower_order_final``; ``sigma = 0`` there), order 2 otherwise.

    Matches diffusers' simplifications: the order-2 predictor uses ``rho = 1/2`` and the order-1 corrector
    uses ``rho = 1/2``. Coefficients are computed in float64 from the float32 sigmas; tensor arithmetic is
    in the tensors' dtype (float32 in this module).
    """

    order = 2

    def __init__(self, sigmas: Tensor) -> None:
        self._sigmas = [float(s) for s in sigmas]
        if self._sigmas[0] >= 1.0:
            raise MementoError(
                "shift is too large: the first sigma rounds to 1.0 in float32 (UniPC needs < 1.0)"
            )
        self._lams = [_lam(s) for s in self._sigmas]
        self._steps = len(self._sigmas) - 1
        self._m: list[Tensor] = []  # x0 predictions, newest last, at most `order` kept
        self._last_x: Tensor | None = None  # corrected sample of the previous step
        self._last_order = 0
        self._next_i = 0

    def step(self, x: Tensor, v: Tensor, i: int) -> Tensor:
        if i != self._next_i:
            raise RuntimeError(f"UniPCSolver steps must run in order: expected step {self._next_i}, got {i}")
        self._next_i += 1
        m = x - self._sigmas[i] * v
        if i > 0 and self._last_x is not None:
            x = self._correct(i, m)
        order = min(self.order, self._steps - i, len(self._m) + 1)
        self._m = [*self._m, m][-self.order :]
        self._last_x = x
        self._last_order = order
        return self._predict(x, i, order)

    def _r(self, older: int, s: int, t: int) -> float:
        """Ratio ``(lam_older - lam_s) / (lam_t - lam_s)`` of log-SNR gaps."""
        return (self._lams[older] - self._lams[s]) / (self._lams[t] - self._lams[s])

    def _predict(self, x: Tensor, i: int, order: int) -> Tensor:
        """UniP from ``sigma_i`` to ``sigma_{i+1}``; ``self._m[-1]`` is ``m_i``."""
        m0 = self._m[-1]
        delta: Tensor | float = 0.0
        if order == 2:
            delta = 0.5 * (self._m[-2] - m0) / self._r(i - 1, i, i + 1)
        return _bh2_update(x, self._sigmas[i], self._sigmas[i + 1], m0, delta)

    def _correct(self, i: int, m_t: Tensor) -> Tensor:
        """UniC at step ``i``: redo the step ``sigma_{i-1} -> sigma_i`` from the previous corrected sample,
        now also using ``m_t = m_i``. ``self._m`` still ends with ``m_{i-1}``."""
        assert self._last_x is not None
        m0 = self._m[-1]
        if self._last_order == 1:
            delta = 0.5 * (m_t - m0)
        else:
            h = self._lams[i] - self._lams[i - 1]
            r = self._r(i - 2, i - 1, i)
            rho_old, rho_new = _unic2_rhos(h, r)
            delta = (rho_old / r) * (self._m[-2] - m0) + rho_new * (m_t - m0)
        return _bh2_update(self._last_x, self._sigmas[i - 1], self._sigmas[i], m0, delta)


class DPMSolverPP:
    """Multistep DPM-Solver++(2M) for flow sigmas (``alpha = 1 - sigma``), midpoint, data prediction.

    Per step ``i``: ``m_i = x_i - sigma_i·v_i``; with ``lam = log(alpha) - log(sigma)`` and
    ``h = lam_{i+1} - lam_i``, first order (the first step, and the last, whose sigma is 0)
    ``x_{i+1} = (sigma_{i+1}/sigma_i)·x_i - alpha_{i+1}·(e^{-h} - 1)·m_i``; second order adds the midpoint
    term ``-0.5·alpha_{i+1}·(e^{-h} - 1)·D1`` with ``D1 = (m_i - m_{i-1})/r``, ``r = (lam_i - lam_{i-1})/h``.
    As Wan computes them: float32 scalar tensors (``sigma = 1`` gives ``lam = -inf`` and ``e^{-h} = 0``).
    """

    order = 2

    def __init__(self, sigmas: Tensor) -> None:
        self._sigmas = sigmas.detach().to(dtype=torch.float32, device="cpu")
        self._steps = int(self._sigmas.shape[0]) - 1
        self._m: list[Tensor] = []
        self._next_i = 0

    def _lam(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        sigma = self._sigmas[i]
        alpha = 1 - sigma
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)

    def step(self, x: Tensor, v: Tensor, i: int) -> Tensor:
        if i != self._next_i:
            raise RuntimeError(f"DPMSolverPP steps must run in order: expected step {self._next_i}, got {i}")
        self._next_i += 1
        sigma_s = self._sigmas[i]
        m0 = x - sigma_s.to(x.device) * v
        self._m = [*self._m, m0][-self.order :]
        alpha_t, sigma_t, lam_t = self._lam(i + 1)
        _, sigma_s, lam_s = self._lam(i)
        h = lam_t - lam_s
        coeff = (alpha_t * (torch.exp(-h) - 1.0)).to(x.device)
        ratio = (sigma_t / sigma_s).to(x.device)
        if len(self._m) < 2 or i == self._steps - 1:
            return ratio * x - coeff * m0
        _, _, lam_s1 = self._lam(i - 1)
        r0 = ((lam_s - lam_s1) / h).to(x.device)
        d1 = (1.0 / r0) * (m0 - self._m[-2])
        return ratio * x - coeff * m0 - 0.5 * coeff * d1


def make_solver(name: str, sigmas: Tensor) -> Solver:
    """A fresh solver ``"unipc"``, ``"euler"`` or ``"dpm++"`` for float32 ``sigmas`` ``[steps + 1]``."""
    if name == "unipc":
        return UniPCSolver(sigmas)
    if name == "euler":
        return EulerSolver(sigmas)
    if name == "dpm++":
        return DPMSolverPP(sigmas)
    raise MementoError(f"solver must be one of {SOLVERS}, got {name!r}")


# ----------------------------------------------------------------------------------------- stepping loop


@dataclass(frozen=True, eq=False)
class StepInfo:
    """What a step hook sees.

    ``step``: 0-based step index; ``total``: number of steps; ``timestep``: the integer timestep the model
    sees at this step; ``sigma``: the noise level at this step (``sigmas[step]``); ``x``: float32 latent
    (for ``callback``: after the step, i.e. at ``sigmas[step + 1]``; for ``prepare``: before the step, the
    tensor being prepared); ``expert``: ``"high"``/``"low"`` in ``sample_experts``, ``None`` in ``sample``.
    ``x`` is the sampler's own tensor: read it, do not modify it in place.
    """

    step: int
    total: int
    timestep: int
    sigma: float
    x: Tensor
    expert: str | None = None


Route = Callable[[int], tuple[str | None, Velocity]]
"""``route(timestep) -> (expert name or None, velocity function)`` for one step."""


def _check_hooks(**hooks: object) -> None:
    for name, hook in hooks.items():
        if hook is not None and not callable(hook):
            raise MementoError(f"{name} must be callable or None, got {type(hook).__name__}")


def _check_noise(noise: object) -> None:
    if not isinstance(noise, Tensor) or not noise.is_floating_point():
        raise MementoError(f"noise must be a floating-point torch.Tensor, got {type(noise).__name__}")


@torch.no_grad()
def _run(
    noise: Tensor,
    schedule: Schedule,
    solver: Solver,
    route: Route,
    *,
    callback: Callable[[StepInfo], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    prepare: Callable[[Tensor, StepInfo], Tensor] | None = None,
) -> Tensor:
    """The one stepping loop behind ``sample`` and ``sample_experts``.

    ``noise``: any shape, any float dtype; returns the final latent with ``noise``'s shape and dtype.
    """
    x = noise.detach().to(torch.float32, copy=True)
    total = schedule.steps
    for i in range(total):
        if cancel is not None and cancel():
            raise SamplingCancelled(f"sampling cancelled before step {i + 1} of {total}")
        timestep = int(schedule.timesteps[i])
        sigma = float(schedule.sigmas[i])
        expert, velocity = route(timestep)
        if prepare is not None:
            x = prepare(x, StepInfo(i, total, timestep, sigma, x, expert)).to(torch.float32)
        t = torch.tensor(float(timestep), dtype=torch.float32, device=x.device)
        v = velocity(x, t).to(torch.float32)
        x = solver.step(x, v, i)
        if callback is not None:
            callback(StepInfo(i, total, timestep, sigma, x, expert))
    return x.to(noise.dtype)


def sample(
    velocity: Velocity,
    noise: Tensor,
    steps: int = 40,
    shift: float = 5.0,
    solver: str = "unipc",
    *,
    callback: Callable[[StepInfo], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Tensor:
    """Integrate ``velocity`` from pure ``noise`` to a clean latent along Wan's schedule.

    ``velocity(x, t) -> v``: ``x`` float32 with ``noise``'s shape, ``t`` a 0-dim float32 tensor on
    ``noise.device`` holding the integer timestep (e.g. ``tensor(999.)``); ``v`` same shape as ``x``.
    ``noise``: e.g. ``[B, C, F, H, W]``, never modified. Returns the final latent, same shape/dtype as
    ``noise``. ``callback(StepInfo)`` runs after every step; ``cancel()`` runs before every step and a
    true result raises ``SamplingCancelled``.
    """
    _check_noise(noise)
    if not callable(velocity):
        raise MementoError(f"velocity must be callable, got {type(velocity).__name__}")
    _check_hooks(callback=callback, cancel=cancel)
    schedule = schedule_for(solver, steps, shift)
    solver_ = make_solver(solver, schedule.sigmas)
    return _run(noise, schedule, solver_, lambda _t: (None, velocity), callback=callback, cancel=cancel)


# ------------------------------------------------------------------------------------ dual-expert driver


@dataclass(frozen=True)
class Expert:
    """One Wan2.2-A14B expert: ``model(x, t, cond) -> v`` (shapes as ``sample``'s velocity; ``cond`` is
    passed through untouched) and its classifier-free ``guidance`` scale (1.0 = no uncond pass)."""

    model: Callable[[Tensor, Tensor, Cond], Tensor]
    guidance: float


def guided_velocity(expert: Expert, cond: Cond, uncond: Cond) -> Velocity:
    """``v = model(x, t, uncond) + g·(model(x, t, cond) - model(x, t, uncond))`` in float32.

    The conditional pass runs first (as in Wan); with ``g == 1`` the unconditional pass is skipped.
    """

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        v_cond = expert.model(x, t, cond).to(torch.float32)
        if expert.guidance == 1.0:
            return v_cond
        v_uncond = expert.model(x, t, uncond).to(torch.float32)
        return v_uncond + expert.guidance * (v_cond - v_uncond)

    return velocity


def _check_expert(name: str, expert: object) -> None:
    if not isinstance(expert, Expert):
        raise MementoError(f"{name} must be an Expert, got {type(expert).__name__}")
    if not callable(expert.model):
        raise MementoError(f"{name}.model must be callable")
    g = expert.guidance
    if isinstance(g, bool) or not isinstance(g, (int, float, np.floating)) or not math.isfinite(g):
        raise MementoError(f"{name}.guidance must be a finite number, got {g!r}")


def sample_experts(
    noise: Tensor,
    *,
    high: Expert,
    low: Expert,
    cond: Cond,
    uncond: Cond,
    steps: int = 40,
    shift: float = 5.0,
    boundary: float = 0.9,
    solver: str = "unipc",
    callback: Callable[[StepInfo], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    prepare: Callable[[Tensor, StepInfo], Tensor] | None = None,
) -> Tensor:
    """Wan2.2-A14B sampling: the ``high`` expert while ``timestep >= boundary·1000``, ``low`` after,
    each with its own CFG scale (see ``guided_velocity``). One solver runs across the switch.

    ``noise``: ``[B, C, F, H, W]`` (any shape), never modified; returns the final latent with its
    shape/dtype. ``callback``/``cancel`` as in ``sample``; ``StepInfo.expert`` says which expert ran.

    ``prepare(x, info) -> x``: optional hook called at the start of every step, before the model, with the
    current float32 latent (``info.x is x``, ``info.sigma``/``info.timestep`` the step's noise level). What
    it returns is what the model sees and what the solver treats as this step's sample, so it can pin
    regions (e.g. overwrite memory slots with clean latents re-noised to ``info.sigma``). Return a new
    tensor rather than writing into ``x``. Note that UniPC's corrector rebuilds the current sample from the
    previous one, so a pinned region drifts after the step; ``prepare`` re-pins it at every step.
    """
    _check_noise(noise)
    _check_expert("high", high)
    _check_expert("low", low)
    _check_hooks(callback=callback, cancel=cancel, prepare=prepare)
    _check_boundary(boundary)
    schedule = schedule_for(solver, steps, shift)
    threshold = boundary * NUM_TRAIN_TIMESTEPS
    v_high = guided_velocity(high, cond, uncond)
    v_low = guided_velocity(low, cond, uncond)

    def route(timestep: int) -> tuple[str, Velocity]:
        return ("high", v_high) if timestep >= threshold else ("low", v_low)

    solver_ = make_solver(solver, schedule.sigmas)
    return _run(noise, schedule, solver_, route, callback=callback, cancel=cancel, prepare=prepare)
