"""How bad input reaches the ComfyUI UI: as ValueErrors prefixed with the node (memento_core's readable
errors, and the checks every node applies where its inputs enter: IMAGE batches, finite values, frame
sizes, text that names a file)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..memento_core.conditioning import check_frame_size
from ..memento_core.errors import MementoError


@contextmanager
def node_errors(node: str) -> Iterator[None]:
    """Re-raise a :class:`MementoError` (file and field already named) as ``ValueError("<node>: ...")``."""
    try:
        yield
    except MementoError as exc:
        raise ValueError(f"{node}: {exc}") from exc


def check_image(image: Any, name: str, node: str, *, frame_size: bool = True) -> torch.Tensor:
    """``image`` as an IMAGE batch [N >= 1, H, W, 3] of finite values (H, W multiples of 16 when
    ``frame_size``: the one size rule of frames that become latents), or a ValueError naming the input."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] != 3:
        got = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{node}: the '{name}' input is not an IMAGE batch [frames, H, W, 3] (got {got}).")
    if image.shape[0] < 1:
        raise ValueError(
            f"{node}: the '{name}' input is an empty IMAGE batch (0 images); connect at least one."
        )
    check_finite(image, name, node)
    if frame_size:
        with node_errors(node):
            check_frame_size(int(image.shape[2]), int(image.shape[1]), f"the '{name}' input")
    return image


def check_finite(tensor: torch.Tensor, name: str, node: str) -> torch.Tensor:
    """A ValueError naming the input when ``tensor`` holds NaN or infinite values."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(
            f"{node}: the '{name}' input holds NaN or infinite values; check the node that made it."
        )
    return tensor


def check_text_path(value: str, name: str, node: str) -> str:
    """Text that names a file or folder: no NUL or other control characters (a ValueError naming it)."""
    if any(ord(ch) < 32 and ch not in "\t" for ch in value or ""):
        raise ValueError(f"{node}: '{name}' contains a control character (such as NUL); type a plain path.")
    return value
