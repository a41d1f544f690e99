"""A CUDA-free memory tracker: the peak bytes of live tensor storages created inside a ``with`` block.

It validates :mod:`memento_core.plan`'s activation estimate on a CPU-only machine. Every tensor an aten
op returns inside the block is seen through a :class:`~torch.utils._python_dispatch.TorchDispatchMode`;
each storage is counted once (by its data pointer, so views cost nothing) from its creation until it is
freed (a weakref finalizer on the storage). Storages that existed before the block (weights, inputs)
are the baseline and are not counted. Buffers a kernel allocates internally and frees before it
returns (for example SDPA's tiles) are invisible, as they would be to ``torch.cuda.max_memory_allocated``
only when they are small; the CUDA attention kernels this models keep no L x L matrix either.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["MemoryTracker"]


class MemoryTracker(TorchDispatchMode):
    """``with MemoryTracker() as mt: model(...)`` -> ``mt.peak`` (bytes above the baseline).

    live: bytes of counted storages alive now; peak: the largest ``live`` seen; allocations: how many
    storages were counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.allocations = 0
        self._seen: dict[int, int] = {}  # data_ptr -> bytes

    def _free(self, ptr: int) -> None:
        self.live -= self._seen.pop(ptr, 0)

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or ptr in self._seen or ptr in inputs:  # a view of (or in place on) an input
            return
        self._seen[ptr] = size
        self.allocations += 1
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, ptr)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        inputs = {
            leaf.untyped_storage().data_ptr()
            for leaf in tree_leaves((args, kwargs))
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta"
        }
        out = func(*args, **kwargs)
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf, inputs)
        return out
