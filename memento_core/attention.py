"""Attention backends for the experts' self- and cross-attention (SPEC 3, SPEC 9).

One switch, ``attention: auto | sdpa | sage | flash``:

* ``sdpa``: PyTorch ``scaled_dot_product_attention`` (always available; the reference).
* ``sage``: SageAttention (``sageattention.sageattn``, 8-bit QK), ``flash``: flash-attn 2/3
  (``flash_attn_func``). Each is used only when importable AND when a one-time numerical check against
  SDPA on the running device, in the model's dtype, passes; otherwise SDPA runs and a one-line notice
  says why (once per process for each choice, device and dtype).
* ``auto``: the first of sage, flash that passes, else SDPA (no notice when neither is installed).

Every backend takes and returns the Wan layout: q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].
Split attention (the identity slot, SPEC 4.4) calls the same backend for both halves. Inputs a fast
kernel cannot take (float32, head dim over 256) go to SDPA call by call, so a backend never changes what
a float32 test computes. Nothing here imports ComfyUI.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import MementoError

__all__ = [
    "ATTENTION_CHOICES",
    "SDPA",
    "AttentionBackend",
    "check_against_sdpa",
    "resolve_attention",
    "sdpa_attention",
]

ATTENTION_CHOICES: tuple[str, ...] = ("auto", "sdpa", "sage", "flash")
#: The fast backends ``auto`` tries, in order.
AUTO_ORDER: tuple[str, ...] = ("sage", "flash")
#: Relative L2 error against SDPA (float32 reference) a backend must stay under, in bf16/fp16.
#: SDPA itself in bf16 is ~0.4%; SageAttention's 8-bit QK is ~1-2%.
CHECK_TOLERANCE = 0.03

Attend = Callable[[Tensor, Tensor, Tensor], Tensor]


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """PyTorch SDPA. q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> [B, Lq, H, D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


@dataclass(frozen=True)
class AttentionBackend:
    """A named attention function in the Wan layout ([B, L, H, D]); calling it attends.

    ``kernel`` takes half-precision inputs only; anything else goes to SDPA.
    """

    name: str
    kernel: Attend

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if (
            self.kernel is sdpa_attention
            or q.dtype not in (torch.bfloat16, torch.float16)
            or q.shape[-1] > 256
        ):
            return sdpa_attention(q, k, v)
        return self.kernel(q, k, v)


SDPA = AttentionBackend("sdpa", sdpa_attention)


def _sage() -> Attend:
    sageattn = importlib.import_module("sageattention").sageattn

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)

    return attend


def _flash() -> Attend:
    try:
        flash_attn_func = importlib.import_module("flash_attn_interface").flash_attn_func  # FA3
    except ImportError:
        flash_attn_func = importlib.import_module("flash_attn").flash_attn_func  # FA2

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out

    return attend


#: Backend name -> loader (raises ImportError when the package is not installed).
LOADERS: dict[str, Callable[[], Attend]] = {"sage": _sage, "flash": _flash}


def check_against_sdpa(
    kernel: Attend, device: torch.device | str, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> float:
    """Relative L2 error of ``kernel`` against float32 SDPA on random inputs shaped like Wan's
    (40 heads of 128 are scaled down to 2 heads; self-attention 300 tokens, cross-attention 300 -> 77).
    Returns the worst error; raises whatever the kernel raises."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    worst = 0.0
    for lq, lk in ((300, 300), (300, 77)):
        q, k, v = (torch.randn(1, n, 2, 128, generator=gen).to(device) for n in (lq, lk, lk))
        ref = sdpa_attention(q.float(), k.float(), v.float())
        out = kernel(q.to(dtype), k.to(dtype), v.to(dtype)).float()
        if out.shape != ref.shape:
            raise MementoError(f"returned shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
        err = float((out - ref).norm() / ref.norm())
        worst = max(worst, err if err == err else float("inf"))
    return worst


_RESOLVED: dict[tuple[str, str, torch.dtype], tuple[AttentionBackend, str | None]] = {}


def _try(name: str, device: torch.device, dtype: torch.dtype) -> tuple[AttentionBackend | None, str]:
    """(backend, "") when ``name`` loads and passes the check, else (None, why)."""
    try:
        kernel = LOADERS[name]()
    except ImportError as exc:
        return None, f"{name} is not installed ({exc})"
    try:
        err = check_against_sdpa(kernel, device, dtype)
    except Exception as exc:  # any kernel failure means "not usable here"
        return None, f"{name} failed its check on {device} ({type(exc).__name__}: {exc})"
    if not err <= CHECK_TOLERANCE:
        return None, f"{name} disagrees with SDPA on {device} (relative error {err:.3g} > {CHECK_TOLERANCE})"
    return AttentionBackend(name, kernel), ""


def resolve_attention(
    choice: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16
) -> tuple[AttentionBackend, str | None]:
    """The backend for ``choice`` on ``device`` in ``dtype`` -> (backend, notice or None).

    The check runs once per (choice, device, dtype) per process; the notice (why SDPA runs instead of
    what was asked) is returned every time so callers can show it (:func:`memento_core.fast_paths.
    apply_fast_paths` logs each notice once).
    """
    if choice not in ATTENTION_CHOICES:
        raise MementoError(f"attention: expected one of {', '.join(ATTENTION_CHOICES)}, got {choice!r}")
    device = torch.device(device)
    key = (choice, str(device), dtype)
    if key in _RESOLVED:
        return _RESOLVED[key]
    notice: str | None = None
    backend = SDPA
    if choice != "sdpa":
        reasons = []
        for name in AUTO_ORDER if choice == "auto" else (choice,):
            found, why = _try(name, device, dtype)
            if found is not None:
                backend = found
                break
            reasons.append(why)
        else:
            installed = [r for r in reasons if "is not installed" not in r]
            if choice != "auto" or installed:
                notice = f"attention {choice}: using SDPA: " + "; ".join(
                    reasons if choice != "auto" else installed
                )
    _RESOLVED[key] = (backend, notice)
    return backend, notice


def clear_cache() -> None:
    """Forget resolved backends (tests; after installing a package in a running process)."""
    _RESOLVED.clear()
