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

How a block moves is a transfer object. On a CUDA device :class:`StreamedTransfer` keeps the swapped
blocks' weights in pinned host memory, copies the next block in on a side CUDA stream while the current
block computes (the compute stream waits on an event only right before that block's forward), and
"moves back" by dropping the device copy: weights do not change during sampling, so nothing is copied
device -> host. Elsewhere (and for any custom ``mover``) :class:`MoverTransfer` calls
``mover(module, device)`` synchronously, which lets CPU tests record where every weight is.

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
    "MoverTransfer",
    "StreamedTransfer",
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


class MoverTransfer:
    """Synchronous moves through ``mover(module, device)`` (default :func:`move_module`)."""

    def __init__(
        self, device: torch.device | str, offload_device: torch.device | str, mover: Mover | None = None
    ):
        self.device, self.offload_device = device, offload_device
        self.mover = mover or move_module

    def prepare(self, blocks: Sequence[nn.Module]) -> None:
        """Nothing to prepare: blocks are wherever the caller left them (the offload device)."""

    def bring(self, block: nn.Module) -> None:
        self.mover(block, self.device)

    def ready(self, block: nn.Module) -> None:
        """Nothing to wait for: :meth:`bring` was synchronous."""

    def send_back(self, block: nn.Module) -> None:
        self.mover(block, self.offload_device)

    def restore(self) -> None:
        """Nothing to restore."""


class StreamedTransfer:
    """Pinned host weights, host -> device copies on a side stream, device copies dropped on the way back.

    prepare(blocks): each parameter/buffer of the blocks is made a pinned host tensor (pinning only when
    CUDA is present, once: the pinned tensor replaces the pageable one for the model's lifetime, so the
    host never holds two copies) and remembered as the block's host copy. bring(block): on the side
    stream, allocate device tensors, copy in (non-blocking), record an event. ready(block): the compute
    stream waits for that event, and the tensors are marked used by it, so the allocator never hands
    their memory to the next copy too early. send_back(block): ``.data`` is the host copy again.
    Without CUDA (``device`` on the CPU) the same bookkeeping runs with synchronous copies.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._host: dict[int, torch.Tensor] = {}  # id(parameter or buffer) -> its (pinned) host tensor
        self._events: dict[int, Any] = {}

    def _tensors(self, block: nn.Module) -> list[torch.Tensor]:
        return [*block.parameters(), *block.buffers()]

    def prepare(self, blocks: Sequence[nn.Module]) -> None:
        pin = torch.cuda.is_available()
        for block in blocks:
            for t in self._tensors(block):
                host = t.data.to("cpu")
                if pin and not host.is_pinned():
                    host = host.pin_memory()
                self._host[id(t)] = host
                t.data = host

    def bring(self, block: nn.Module) -> None:
        if self.stream is None:
            for t in self._tensors(block):
                t.data = self._host[id(t)].to(self.device, copy=True)
            return
        with torch.cuda.stream(self.stream):
            for t in self._tensors(block):
                t.data = self._host[id(t)].to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self._events[id(block)] = event

    def ready(self, block: nn.Module) -> None:
        event = self._events.pop(id(block), None)
        if event is None:
            return
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(event)
        for t in self._tensors(block):
            t.data.record_stream(compute)

    def send_back(self, block: nn.Module) -> None:
        for t in self._tensors(block):
            t.data = self._host[id(t)]

    def restore(self) -> None:
        """Forget the shot's copies; the blocks keep their (pinned) host tensors."""
        self._host.clear()
        self._events.clear()


class BlockSwap:
    """Keep ``blocks`` on ``offload_device`` and bring each onto ``device`` only for its forward.

    Pre-hook of block i: bring it (unless prefetched), wait until it is there, then start bringing
    block i+1 (prefetch); post-hook: send block i back. ``transfer`` does the moves: by default
    :class:`StreamedTransfer` on a CUDA device, else :class:`MoverTransfer` with ``mover`` (default
    :func:`move_module`); a given ``mover`` always means :class:`MoverTransfer`.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        device: torch.device | str,
        offload_device: torch.device | str,
        mover: Mover | None = None,
        prefetch: bool = True,
        transfer: MoverTransfer | StreamedTransfer | None = None,
    ) -> None:
        self.blocks = list(blocks)
        self.device = device
        self.offload_device = offload_device
        self.prefetch = prefetch
        if transfer is None:
            if mover is None and torch.device(device).type == "cuda":
                transfer = StreamedTransfer(device)
            else:
                transfer = MoverTransfer(device, offload_device, mover)
        self.transfer = transfer
        self._on_device: set[int] = set()

    def _bring(self, i: int) -> None:
        if i not in self._on_device:
            self.transfer.bring(self.blocks[i])
            self._on_device.add(i)

    def _send_back(self, i: int) -> None:
        if i in self._on_device:
            self.transfer.send_back(self.blocks[i])
            self._on_device.discard(i)

    @contextmanager
    def attached(self) -> Iterator[BlockSwap]:
        """Hooks on the blocks for the duration of the ``with`` block; every block is offloaded on exit."""
        handles: list[Any] = []
        self.transfer.prepare(self.blocks)
        for i, block in enumerate(self.blocks):

            def pre(_module: nn.Module, _args: Any, i: int = i) -> None:
                self._bring(i)
                self.transfer.ready(self.blocks[i])
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
            self.transfer.restore()


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
