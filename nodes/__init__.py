"""ComfyUI node classes of the Memento pack (V3 API).

Importing this package needs a running ComfyUI (it imports ``comfy_api.latest`` and ``folder_paths``);
the pack's ``comfy_entrypoint`` imports it lazily.
"""

from __future__ import annotations

from comfy_api.latest import io

from .backbone_nodes import NODES as BACKBONE_NODES
from .camera_nodes import NODES as CAMERA_NODES
from .dit_nodes import NODES as DIT_NODES
from .evaluate_nodes import NODES as EVALUATE_NODES
from .memory_nodes import NODES as MEMORY_NODES
from .shot_nodes import NODES as SHOT_NODES
from .story_nodes import NODES as STORY_NODES


def all_nodes() -> list[type[io.ComfyNode]]:
    """Every node class the pack registers, in menu order."""
    return [
        *BACKBONE_NODES,
        *MEMORY_NODES,
        *SHOT_NODES,
        *CAMERA_NODES,
        *STORY_NODES,
        *EVALUATE_NODES,
        *DIT_NODES,
    ]


__all__ = ["all_nodes"]
