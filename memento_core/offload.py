"""Where the two experts' weights live during a shot: all on the device, one expert at a time, or
one expert at a time with some of its blocks swapped in from the CPU per forward (SPEC 9).

Modes (``OFFLOAD_MODES``):

* ``none``: both experts stay on the compute device for the whole shot (fastest; needs memory for two
  experts, 2 x 28 GB in bf16 for A14B).
* ``swap_experts``: only the active expert is on the device. The swap happens on the first forward
  of the other expert (the high -> low boundary), through :class:`ExpertSwap`.
* ``block_swap``: ``swap_experts`` plus, inside the active expert, the last ``n`` transformer blocks
  stay on the offload device and are moved in right before their forward and back right after
  (:class:`BlockSwap`); the next swapped block is prefetched when the current one starts.

Nothing here knows about ComfyUI: the actual moves go through callables (``activate`` for a whole
expert, ``mover`` for a block), so ComfyUI's model management can do them (``nodes/``), and tests can
record where every weight is at each step on a CPU-only machine. Hooks are attached only inside the
``attached()`` context managers and removed on exit (also on errors and interrupts), so a model shared
between cached graph outputs is never left modified.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .dit import WanDiT
from .errors import MementoError

__all__ = [
    "OFFLOAD_MODES",
    "BlockSwap",
    "ExpertSwap",
    "move_module",
    "resident_modules",
    "swapped_blocks",
]

OFFLOAD_MODES: tuple[str, ...] = ("none", "swap_experts", "block_swap")

Mover = Callable[[nn.Module, torch.device | str], None]


def move_module(module: nn.Module, device: torch.device | str) -> None:
    """Default mover: ``module.to(device)`` (non-blocking where the copy allows it)."""
    module.to(device, non_blocking=True)


def _check_swap_count(dit: WanDiT, n_swap: int) -> int:
    n_blocks = len(dit.blocks)
    if not isinstance(n_swap, int) or isinstance(n_swap, bool) or not 0 <= n_swap <= n_blocks:
        raise MementoError(
            f"block swap: the number of swapped blocks must be an integer in [0, {n_blocks}] "
            f"(the expert has {n_blocks} blocks), got {n_swap!r}"
        )
    return n_swap


def swapped_blocks(dit: WanDiT, n_swap: int) -> list[nn.Module]:
    """The last ``n_swap`` transformer blocks of ``dit`` (the ones kept off the device)."""
    n = _check_swap_count(dit, n_swap)
    return list(dit.blocks)[len(dit.blocks) - n :]


class _Resident(nn.Module):
    """A container of the parts of an expert that stay on the device (shares the modules, no copies)."""

    def __init__(self, parts: Mapping[str, nn.Module]) -> None:
        super().__init__()
        for name, module in parts.items():
            self.add_module(name, module)


def resident_modules(dit: WanDiT, n_swap: int = 0, extra: Mapping[str, nn.Module] | None = None) -> nn.Module:
    """A module holding every part of ``dit`` except its last ``n_swap`` blocks (plus ``extra``, e.g.
    the KeyframeQuery). It shares parameters with ``dit``: moving it moves those parts of ``dit``."""
    n = _check_swap_count(dit, n_swap)
    keep = len(dit.blocks) - n
    parts: dict[str, nn.Module] = {name: module for name, module in dit.named_children() if name != "blocks"}
    parts["resident_blocks"] = nn.ModuleList(list(dit.blocks)[:keep])
    for name, module in (extra or {}).items():
        if module is not None:
            parts[name] = module
    return _Resident(parts)


class BlockSwap:
    """Keep ``blocks`` on ``offload_device`` and bring each onto ``device`` only for its forward.

    Pre-hook of block i: move it (and prefetch block i+1) to ``device``; post-hook: move block i back.
    ``mover(module, device)`` does the moves (default :func:`move_module`).
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        device: torch.device | str,
        offload_device: torch.device | str,
        mover: Mover | None = None,
        prefetch: bool = True,
    ) -> None:
        self.blocks = list(blocks)
        self.device = device
        self.offload_device = offload_device
        self.mover = mover or move_module
        self.prefetch = prefetch
        self._on_device: set[int] = set()

    def _bring(self, i: int) -> None:
        if i not in self._on_device:
            self.mover(self.blocks[i], self.device)
            self._on_device.add(i)

    def _send_back(self, i: int) -> None:
        if i in self._on_device:
            self.mover(self.blocks[i], self.offload_device)
            self._on_device.discard(i)

    @contextmanager
    def attached(self) -> Iterator[BlockSwap]:
        """Hooks on the blocks for the duration of the ``with`` block; every block is offloaded on exit."""
        handles: list[Any] = []
        for i, block in enumerate(self.blocks):

            def pre(_module: nn.Module, _args: Any, i: int = i) -> None:
                self._bring(i)
                if self.prefetch and i + 1 < len(self.blocks):
                    self._bring(i + 1)

            def post(_module: nn.Module, _args: Any, _out: Any, i: int = i) -> None:
                self._send_back(i)

            handles.append(block.register_forward_pre_hook(pre))
            handles.append(block.register_forward_hook(post))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            for i in sorted(self._on_device):
                self._send_back(i)


class ExpertSwap:
    """Only one expert active at a time: the first forward of an expert calls ``activate(name)``.

    experts: name ("high" / "low") -> the expert's module (usually its :class:`WanDiT`). ``activate``
    must bring that expert onto the device and may send the other one away; :meth:`ensure` is also
    usable directly (e.g. before a KeyframeQuery selection).
    """

    def __init__(self, experts: Mapping[str, nn.Module], activate: Callable[[str], None]) -> None:
        self.experts = dict(experts)
        self.activate = activate
        self.active: str | None = None
        self.history: list[str] = []

    def ensure(self, name: str) -> None:
        """Make ``name`` the active expert (no-op when it already is)."""
        if name not in self.experts:
            raise MementoError(f"expert swap: unknown expert {name!r}; known: {sorted(self.experts)}")
        if self.active != name:
            self.activate(name)
            self.active = name
            self.history.append(name)

    @contextmanager
    def attached(self) -> Iterator[ExpertSwap]:
        """Forward pre-hooks on the experts for the duration of the ``with`` block."""
        handles = []
        seen: set[int] = set()
        for name, module in self.experts.items():
            if id(module) in seen:  # the same model serving both experts never needs a swap
                continue
            seen.add(id(module))
            handles.append(module.register_forward_pre_hook(lambda _m, _a, name=name: self.ensure(name)))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
