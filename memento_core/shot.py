"""Sampling one shot with memory (SPEC 4.5) on top of the dual-expert driver.

* The initial noise is drawn once, for all slots, from ``seed``: with a CPU generator (``noise="cpu"``,
  the default: the same on every device) or, as the released pipelines do, with a generator on the
  compute device (``noise="device"``: a GPU reproduces the reference's videos seed for seed).
* Memento re-noises the memory slots at the start of EVERY step: ``x[memory] = (1 - s)·clean +
  s·noise_memory``, ``s = t/1000`` from the integer timestep. As released (``memory_noise="released"``,
  the default), the sampler's latent IS its noise tensor and step 0 writes the re-noised memory into it,
  so from step 1 on ``noise_memory`` is ``(1 - s0)·clean_0 + s0·noise`` (``clean_0``: the pool of step
  0's expert); ``memory_noise="fixed"`` keeps the original noise (SPEC 4.5's idealised form). StoryMem
  does not re-noise (its memory slots start as noise and their outputs are discarded).
* Each expert has its own memory pool (``ShotCondition``): high-noise steps use the high pool's clean
  latents, in the re-noising and in ``y``; low-noise steps the low pool's.
* CFG: the negative prompt for the shot tokens, the empty caption "" for the identity slot; both passes
  see the same ``y``, memory and positions.
* Output: the target latents, and the identity latent for inspection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .conditioning import ShotCondition
from .dit import WanDiT
from .errors import MementoError, ShapeError
from .sampling import Expert, StepInfo, sample_experts

__all__ = [
    "MEMORY_NOISE",
    "NOISE_SOURCES",
    "ShotResult",
    "ShotSettings",
    "ShotText",
    "initial_noise",
    "sample_shot",
    "sample_t2v_shot",
]

#: Where the initial noise is drawn: a CPU generator (portable) or one on the compute device (as released).
NOISE_SOURCES = ("cpu", "device")
#: The noise memory slots are re-noised with after step 0: as released, or the original noise.
MEMORY_NOISE = ("released", "fixed")


@dataclass(frozen=True)
class ShotText:
    """Text-encoder outputs for one shot, each [1, L, text_dim] (L <= 512, zero-padded by the DiT).

    identity / identity_negative: the reconstruct caption and "" (only with an identity slot).
    """

    prompt: Tensor
    negative: Tensor
    identity: Tensor | None = None
    identity_negative: Tensor | None = None


@dataclass(frozen=True)
class ShotSettings:
    """Sampler settings of a shot. Memento: 40 steps, shift 5, boundary 0.9, CFG 3.5 (5.0 on a cut).

    renoise_memory: re-noise the memory slots every step (Memento); memory_noise: "released" or
    "fixed" (see the module docstring); noise: "cpu" or "device" generator for the initial noise.
    """

    steps: int = 40
    shift: float = 5.0
    boundary: float = 0.9
    guidance_high: float = 3.5
    guidance_low: float = 3.5
    solver: str = "unipc"
    seed: int = 0
    renoise_memory: bool = True
    memory_noise: str = "released"
    noise: str = "cpu"

    def __post_init__(self) -> None:
        if self.memory_noise not in MEMORY_NOISE:
            raise MementoError(f"memory_noise: expected one of {MEMORY_NOISE}, got {self.memory_noise!r}")
        if self.noise not in NOISE_SOURCES:
            raise MementoError(f"noise: expected one of {NOISE_SOURCES}, got {self.noise!r}")


@dataclass(frozen=True)
class ShotResult:
    """target: [16, T, h, w] denoised target latents; identity: [16, 1, h, w] or None."""

    target: Tensor
    identity: Tensor | None


def initial_noise(
    seed: int, shape: tuple[int, ...], device: torch.device | str = "cpu", source: str = "cpu"
) -> Tensor:
    """Standard normal noise seeded with ``seed`` -> ``shape`` float32 on ``device``.

    source "cpu": a CPU generator (device-independent; the default); "device": a generator on
    ``device``, as Wan's and Memento's pipelines draw it (``torch.Generator(device=...)``; the same
    values as the reference for the same device, seed and number of elements).
    """
    if source == "device":
        gen = torch.Generator(device=device).manual_seed(int(seed))
        return torch.randn(shape, generator=gen, device=device)
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(shape, generator=gen).to(device)


def _expert_call(model: WanDiT, cond: ShotCondition) -> Callable[[Tensor, Tensor, tuple], Tensor]:
    y = cond.y[None]

    def run(x: Tensor, t: Tensor, text: tuple[Tensor, Tensor | None]) -> Tensor:
        context, context_identity = text
        return model(
            x,
            t.reshape(1).expand(x.shape[0]),
            context,
            y=y.to(x.device),
            frame_pos=cond.frame_pos.to(x.device),
            n_identity=cond.n_identity,
            n_memory=cond.n_memory,
            context_identity=context_identity,
        )

    return run


def _sample(
    noise: Tensor,
    high: Expert,
    low: Expert,
    cond: object,
    uncond: object,
    settings: ShotSettings,
    *,
    callback: Callable[[StepInfo], None] | None,
    cancel: Callable[[], bool] | None,
    prepare: Callable[[Tensor, StepInfo], Tensor] | None = None,
) -> Tensor:
    """``sample_experts`` with a shot's settings; noise [1, 16, F, h, w] -> latent [16, F, h, w]."""
    return sample_experts(
        noise,
        high=high,
        low=low,
        cond=cond,
        uncond=uncond,
        steps=settings.steps,
        shift=settings.shift,
        boundary=settings.boundary,
        solver=settings.solver,
        callback=callback,
        cancel=cancel,
        prepare=prepare,
    )[0]


def _check_pair(high: ShotCondition, low: ShotCondition) -> None:
    a = (high.n_identity, high.n_memory, high.n_target, high.identity_back)
    b = (low.n_identity, low.n_memory, low.n_target, low.identity_back)
    if a != b or high.y.shape != low.y.shape:
        raise ShapeError(
            f"memory pools: the high and low experts must condition the same layout, got {a} vs {b}"
        )


def sample_shot(
    high: WanDiT,
    low: WanDiT,
    cond_high: ShotCondition,
    cond_low: ShotCondition,
    text: ShotText,
    settings: ShotSettings = ShotSettings(),
    *,
    device: torch.device | str | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> ShotResult:
    """Sample one memory-to-video shot with the two I2V experts (the same model may serve both).

    Deterministic for a seed. Raises ``SamplingCancelled`` (nothing returned, nothing mutated) when
    ``cancel()`` turns true.
    """
    _check_pair(cond_high, cond_low)
    if cond_high.n_identity and text.identity is None:
        raise ShapeError("identity slot: the reconstruct caption's encoding (text.identity) is missing")
    device = device or next(high.parameters()).device
    f = cond_high.frames
    h, w = cond_high.y.shape[-2:]
    noise = initial_noise(settings.seed, (1, 16, f, h, w), device, settings.noise)
    mem = cond_high.memory_slice
    pools = {"high": cond_high.memory.to(device), "low": cond_low.memory.to(device)}
    state = {"noise_memory": noise[:, :, mem]}

    def prepare(x: Tensor, info: StepInfo) -> Tensor:
        if not settings.renoise_memory or cond_high.n_memory == 0:
            return x
        s = info.timestep / 1000.0
        renoised = (1.0 - s) * pools[info.expert][None] + s * state["noise_memory"]
        if info.step == 0 and settings.memory_noise == "released":
            state["noise_memory"] = renoised  # the released latent is its noise tensor: step 0 wrote into it
        x = x.clone()
        x[:, :, mem] = renoised
        return x

    identity_uncond = text.identity_negative if text.identity_negative is not None else text.identity
    latent = _sample(
        noise,
        Expert(_expert_call(high, cond_high), settings.guidance_high),
        Expert(_expert_call(low, cond_low), settings.guidance_low),
        (text.prompt.to(device), None if text.identity is None else text.identity.to(device)),
        (text.negative.to(device), None if identity_uncond is None else identity_uncond.to(device)),
        settings,
        callback=callback,
        cancel=cancel,
        prepare=prepare,
    )
    identity = latent[:, cond_high.identity_slice] if cond_high.n_identity else None
    return ShotResult(target=latent[:, cond_high.target_slice], identity=identity)


def sample_t2v_shot(
    high: WanDiT,
    low: WanDiT,
    text: ShotText,
    latent_size: tuple[int, int, int],
    settings: ShotSettings = ShotSettings(shift=12.0, boundary=0.875),
    *,
    device: torch.device | str | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> ShotResult:
    """Shot 1 by plain Wan2.2-T2V-A14B (shift 12, boundary 0.875, CFG 3.5). latent_size: (T, h, w)."""
    device = device or next(high.parameters()).device
    noise = initial_noise(settings.seed, (1, 16, *latent_size), device, settings.noise)

    def call(model: WanDiT) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        return lambda x, t, context: model(x, t.reshape(1).expand(x.shape[0]), context)

    latent = _sample(
        noise,
        Expert(call(high), settings.guidance_high),
        Expert(call(low), settings.guidance_low),
        text.prompt.to(device),
        text.negative.to(device),
        settings,
        callback=callback,
        cancel=cancel,
    )
    return ShotResult(target=latent, identity=None)
