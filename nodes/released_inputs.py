"""Widgets for the released pipelines' options that several nodes offer (Generate Shot, Keyframe Query
Retrieve, Render Story): one definition each, so names, choices, defaults and tooltips never drift."""

from __future__ import annotations

from comfy_api.latest import io

from ..memento_core.m2v import KFQ_PRECISIONS
from ..memento_core.shot import MEMORY_NOISE, NOISE_SOURCES

__all__ = ["idt_back_mode_input", "kfq_precision_input", "memory_noise_input", "noise_input"]


def noise_input() -> io.Combo.Input:
    """``noise``: where the initial noise is drawn (cpu | device)."""
    return io.Combo.Input(
        "noise",
        options=list(NOISE_SOURCES),
        default="cpu",
        optional=True,
        tooltip="cpu: the same noise on every device; device: drawn on the GPU as the released "
        "pipelines do (reproduces their videos seed for seed on that GPU).",
    )


def memory_noise_input() -> io.Combo.Input:
    """``memory_noise``: the noise memory slots are re-noised with after step 0 (released | fixed)."""
    return io.Combo.Input(
        "memory_noise",
        options=list(MEMORY_NOISE),
        default="released",
        optional=True,
        tooltip="Re-noising noise of the memory slots after step 0: released (the step-0 "
        "re-noised memory, as the released sampler) or fixed (the initial noise).",
    )


def idt_back_mode_input() -> io.Boolean.Input:
    """``idt_back_mode``: Memento's --idt_back_mode."""
    return io.Boolean.Input(
        "idt_back_mode",
        default=False,
        optional=True,
        tooltip="Memento's --idt_back_mode: the identity slot after the memory frames.",
    )


def kfq_precision_input() -> io.Combo.Input:
    """``kfq_precision``: KeyframeQuery scoring precision (auto | fp32 | bf16)."""
    return io.Combo.Input(
        "kfq_precision",
        options=list(KFQ_PRECISIONS),
        default="auto",
        optional=True,
        tooltip="KeyframeQuery scoring: auto (bf16 autocast when the backbone computes in bf16, "
        "as released), fp32 or bf16 (near-tied picks can differ).",
    )
