"""pytest fixtures for the real ComfyUI server (a subprocess on 127.0.0.1), registered by ``conftest.py``.

``comfy_server``: one server per test session, started on first use (about 6 s on 2 cores) and stopped
(its whole process group) at the end. Tests that never ask for it start nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from comfy_server import ComfyServer

#: Preload hooks for the session server (see ``comfy_server.start_comfy_server``): the test-only patch
#: that lets ComfyUI's Wan text encoder (CLIPLoader type wan) load the tiny umT5 (tests/test_server_nodes.py).
SERVER_PRELOAD: tuple[str, ...] = (
    "tests/tiny_comfy_models.py::patch_tiny_umt5",
    "tests/tiny_comfy_models.py::patch_tiny_clip_vision",
)


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    """A real ComfyUI server (0.3.75, or $COMFYUI_PATH; ``main.py --cpu``), this pack in custom_nodes.

    Its base folder is a session temp dir: put test models in ``comfy_server.model_dir("diffusion_models")``
    (listed by the next request). Use ``queue_prompt``/``wait_history``/``run``, ``object_info``,
    ``interrupt``, ``wait_executing`` (see ``tests/comfy_server.py``). Fails with the server log when
    ComfyUI is missing, the server does not start, or the pack does not import.
    """
    from comfy_server import start_comfy_server

    server = start_comfy_server(tmp_path_factory.mktemp("comfy_server"), preload=SERVER_PRELOAD)
    try:
        yield server
    finally:
        server.close()
