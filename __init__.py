"""ComfyUI-Memento: long multi-shot videos with consistent characters on Wan2.2-A14B.

This folder is a ComfyUI custom node pack. ComfyUI imports it and calls :func:`comfy_entrypoint`
(the V3 extension API). The module deliberately defines no ``NODE_CLASS_MAPPINGS``: ComfyUI checks for
that name first and, when present, takes the legacy V1 path and never calls ``comfy_entrypoint``.

Everything ComfyUI-specific is imported inside the entry point, so importing this package outside
ComfyUI (tooling, packaging, plain ``import``) does not fail.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from comfy_api.latest import ComfyExtension

#: The pack's frontend extension (web/memento.js: node summaries on the canvas, labels on wired text
#: inputs); ComfyUI serves this folder to its frontend.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint() -> ComfyExtension:
    """Return the pack's ComfyExtension; ComfyUI awaits this when it loads custom nodes."""
    from comfy_api.latest import ComfyExtension, io

    from .nodes import all_nodes

    class MementoExtension(ComfyExtension):
        """The Memento node pack: DiT loading and, later, memory-conditioned sampling nodes."""

        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            """All Memento node classes."""
            return all_nodes()

    return MementoExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
