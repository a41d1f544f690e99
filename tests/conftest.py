"""Shared pytest fixtures.

``tests/`` is put on ``sys.path`` so helper modules here (``comfy_host``, ``torchvision_cpu``) import
as top-level modules: ``tests`` itself cannot be a package name, ComfyUI ships a ``tests`` package.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

TESTS_DIR = str(Path(__file__).resolve().parent)
if TESTS_DIR not in sys.path:
    sys.path.append(TESTS_DIR)

pytest_plugins = ["conftest_server"]  # the session's real ComfyUI server fixture (tests/conftest_server.py)

if TYPE_CHECKING:
    from comfy_host import ComfyHost


@pytest.fixture(scope="session")
def comfy_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyHost]:
    """A real ComfyUI (0.3.75, or ``$COMFYUI_PATH``) started in this process (CPU) with this pack, once.

    Imported lazily: tests that do not ask for it never import ComfyUI. Errors with a message naming
    ``make setup`` when no ComfyUI tree is found (``$COMFYUI_PATH`` or ``<repo>/.comfyui``).
    Use ``comfy_host.model_dir("diffusion_models")`` for test checkpoints and ``comfy_host.run(prompt)``
    to execute an API-format prompt (see ``tests/comfy_host.py``).
    """
    from comfy_host import start_comfy_host

    host = start_comfy_host(tmp_path_factory.mktemp("comfy_host"))
    yield host
    host.close()


@pytest.fixture(scope="module")
def tiny(comfy_host: ComfyHost) -> Iterator[dict[str, Path]]:
    """Tiny experts, Memento files, VAE, umT5 and CLIP vision installed in the host's model folders, and
    ComfyUI's wan text encoder and CLIP vision loader patched to accept the tiny files for the module
    (``tests/tiny_comfy_models.py``)."""
    from tiny_comfy_models import install_tiny_models, patch_tiny_clip_vision, patch_tiny_umt5

    paths = install_tiny_models(comfy_host)
    undo, undo_cv = patch_tiny_umt5(), patch_tiny_clip_vision()
    yield paths
    undo_cv()
    undo()
