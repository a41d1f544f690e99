"""Socket types the Memento nodes pass between each other, and the values they carry.

* ``MEMENTO_BACKBONE`` -> :class:`LoadedBackbone`: the two experts (LoRA merged) + KeyframeQuerys, the
  ComfyUI ``ModelPatcher`` of each expert and the offload mode.
* ``MEMORY_BANK`` -> :class:`memento_core.memory.MemoryBank` (an immutable value).
* ``MEMORY_SELECTION`` -> :class:`MemorySelection`: the bank AFTER a shot's selection (evicted frames
  gone; what the shot is conditioned on and what Update Memory extends), the bank before it, and the
  selection record.

All three are immutable: nodes build new values and never modify an input (ComfyUI caches outputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from comfy_api.latest import io

from ..memento_core.m2v import Backbone
from ..memento_core.memory import MemoryBank, Selection

__all__ = [
    "CameraTrajectorySocket",
    "LoadedBackbone",
    "MementoBackboneSocket",
    "MemoryBankSocket",
    "MemorySelection",
    "MemorySelectionSocket",
    "require_bank",
    "require_selection",
]

MementoBackboneSocket = io.Custom("MEMENTO_BACKBONE")
MemoryBankSocket = io.Custom("MEMORY_BANK")
MemorySelectionSocket = io.Custom("MEMORY_SELECTION")
#: -> :class:`memento_core.camera.CameraPath` (a shot's camera: one pose or keyframes along its frames).
CameraTrajectorySocket = io.Custom("CAMERA_TRAJECTORY")


@dataclass(frozen=True)
class LoadedBackbone:
    """What Load Memento Backbone outputs.

    backbone: the experts and KeyframeQuerys; patchers: "high"/"low" -> ``comfy.model_patcher.ModelPatcher``
    over the parts of the expert that live on the device (all of it unless block swap); offload: "none",
    "swap_experts" or "block_swap"; swap_blocks: blocks kept on the CPU per expert (block_swap);
    summary: readable description; files: full paths of the base experts; facts: JSON-ready description
    of the weights (file names, Memento strength, dtype, extra LoRAs; not the offload mode, which does not
    change results), used to recognise the same backbone when a story render is resumed.
    """

    backbone: Backbone
    patchers: dict[str, Any]
    offload: str = "none"
    swap_blocks: int = 0
    summary: str = ""
    files: dict[str, str] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def text_dim(self) -> int:
        """Width of the text-encoder output the experts take (4096 for umT5-XXL)."""
        return self.backbone.high.config.text_dim


@dataclass(frozen=True)
class MemorySelection:
    """A shot's memory: ``bank`` (after selection: the shot's memory, and what Update Memory extends),
    ``source`` (the bank before selection), ``selection`` (None when the bank was empty), and the texts
    the selection was made for."""

    bank: MemoryBank
    source: MemoryBank
    selection: Selection | None
    prompt: str = ""
    global_caption: str = ""


def require_bank(value: Any, name: str, node: str) -> MemoryBank:
    """``value`` as a MemoryBank (a MemorySelection gives its selected bank), or a readable ValueError."""
    if isinstance(value, MemorySelection):
        return value.bank
    if isinstance(value, MemoryBank):
        return value
    raise ValueError(
        f"{node}: the '{name}' input is not a memory bank; connect Memento Memory Bank, Load Memory Bank, "
        "Update Memory or Keyframe Query Retrieve."
    )


def require_selection(value: Any, node: str) -> MemorySelection:
    """``value`` as a MemorySelection, or a readable ValueError."""
    if not isinstance(value, MemorySelection):
        raise ValueError(
            f"{node}: the 'selection' input is not a memory selection; connect the 'selection' output of "
            "Keyframe Query Retrieve."
        )
    return value


def require_camera(value: Any, name: str, node: str) -> Any:
    """``value`` as a CameraPath (or None when not connected), or a readable ValueError."""
    from ..memento_core.camera import CameraPath

    if value is None or isinstance(value, CameraPath):
        return value
    raise ValueError(f"{node}: the '{name}' input is not a camera; connect Camera Trajectory.")


def camera_targets(path: Any) -> list[Any] | None:
    """The poses a shot with camera ``path`` is retrieved for (start, middle, end of its keyed frames)."""
    return None if path is None else path.targets(path.keys[-1][0] + 1)
