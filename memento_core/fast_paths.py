"""The optional GPU fast paths of an expert, chosen together (SPEC 9, "GPU fast paths").

:class:`FastPaths` is the value the model config (``"attention"``, ``"fp8_compute"``, ``"compile"``),
the command line (``--attention``, ``--compile``) and the ComfyUI backbone loader hold;
:func:`apply_fast_paths` puts it on an expert and returns the notices of what could not be honoured
(each a single line: the safe path runs instead and says so).

* attention: ``memento_core.attention`` (auto | sdpa | sage | flash), checked against SDPA.
* fp8_compute: ``memento_core.fp8`` (auto | dequant | scaled_mm), for experts stored in fp8.
* compile: ``torch.compile`` of each transformer block's ``forward`` (not of its hooks, so block swap
  keeps working). Compiled and eager blocks give equal outputs (tests compare them on CPU).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .attention import ATTENTION_CHOICES, resolve_attention
from .dit import WanDiT
from .errors import MementoError
from .fp8 import FP8_COMPUTE_CHOICES, set_fp8_compute

__all__ = [
    "FastPaths",
    "apply_fast_paths",
    "apply_to_experts",
    "compile_blocks",
    "is_compiled",
    "uncompile_blocks",
]

log = logging.getLogger("memento")
_LOGGED: set[str] = set()


@dataclass(frozen=True)
class FastPaths:
    """attention: a :data:`memento_core.attention.ATTENTION_CHOICES` value; fp8_compute: a
    :data:`memento_core.fp8.FP8_COMPUTE_CHOICES` value; compile: torch.compile the blocks."""

    attention: str = "auto"
    fp8_compute: str = "auto"
    compile: bool = False

    @classmethod
    def from_config(cls, data: dict, where: str) -> FastPaths:
        """From a model config's ``attention``, ``fp8_compute`` and ``compile`` fields (all optional);
        errors name ``where`` and the field."""
        try:
            return cls(
                attention=data.get("attention", "auto"),
                fp8_compute=data.get("fp8_compute", "auto"),
                compile=data.get("compile", False),
            )
        except MementoError as exc:
            field = str(exc).split(":", 1)[0]
            raise MementoError(f"{where}: field '{field}': {str(exc).split(': ', 1)[1]}") from None

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_CHOICES:
            raise MementoError(
                f"attention: expected one of {', '.join(ATTENTION_CHOICES)}, got {self.attention!r}"
            )
        if self.fp8_compute not in FP8_COMPUTE_CHOICES:
            raise MementoError(
                f"fp8_compute: expected one of {', '.join(FP8_COMPUTE_CHOICES)}, got {self.fp8_compute!r}"
            )
        if not isinstance(self.compile, bool):
            raise MementoError(f"compile: expected true or false, got {self.compile!r}")


def compile_blocks(dit: WanDiT, *, backend: str = "inductor", mode: str | None = None) -> WanDiT:
    """``torch.compile`` every block's forward in place (hooks stay eager) -> ``dit``. Idempotent.

    Shapes change between shots (memory frame counts), so compilation marks them dynamic after the first
    recompile (torch's default ``dynamic=None``)."""
    for block in dit.blocks:
        if "forward" not in block.__dict__:
            block.forward = torch.compile(block.forward, backend=backend, mode=mode)
    return dit


def uncompile_blocks(dit: WanDiT) -> WanDiT:
    """Undo :func:`compile_blocks` -> ``dit``."""
    for block in dit.blocks:
        block.__dict__.pop("forward", None)
    return dit


def is_compiled(dit: WanDiT) -> bool:
    """True when :func:`compile_blocks` is in effect."""
    return any("forward" in block.__dict__ for block in dit.blocks)


def apply_fast_paths(dit: WanDiT, paths: FastPaths, device: torch.device | str | None = None) -> list[str]:
    """Put ``paths`` on ``dit`` (which computes on ``device``; default where its weights are) ->
    notices, one line each, for what runs on the safe path instead of what was asked."""
    device = torch.device(device) if device is not None else next(dit.parameters()).device
    notices = []
    backend, notice = resolve_attention(paths.attention, device, dit.weight_dtype)
    dit.set_attention(backend)
    if notice:
        notices.append(notice)
    notice = set_fp8_compute(dit, paths.fp8_compute, device)
    if notice:
        notices.append(notice)
    if paths.compile:
        compile_blocks(dit)
    else:
        uncompile_blocks(dit)
    for notice in notices:
        if notice not in _LOGGED:  # once per process: the same notice for the other expert is noise
            _LOGGED.add(notice)
            log.warning(notice)
    return notices


def apply_to_experts(
    experts: Iterable[WanDiT], paths: FastPaths, device: torch.device | str | None = None
) -> list[str]:
    """:func:`apply_fast_paths` on each distinct expert (one model serving both pools is done once) ->
    the notices, each once."""
    notices: list[str] = []
    seen: set[int] = set()
    for expert in experts:
        if id(expert) in seen:
            continue
        seen.add(id(expert))
        notices += [n for n in apply_fast_paths(expert, paths, device) if n not in notices]
    return notices
