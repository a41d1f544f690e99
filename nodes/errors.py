"""How memento_core's readable errors reach the ComfyUI UI: as ValueErrors prefixed with the node."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..memento_core.errors import MementoError


@contextmanager
def node_errors(node: str) -> Iterator[None]:
    """Re-raise a :class:`MementoError` (file and field already named) as ``ValueError("<node>: ...")``."""
    try:
        yield
    except MementoError as exc:
        raise ValueError(f"{node}: {exc}") from exc
