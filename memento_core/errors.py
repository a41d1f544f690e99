"""Errors that reach users: each names the input and what was expected."""

from __future__ import annotations


class MementoError(ValueError):
    """Base class of the readable input errors raised by memento_core."""


class CheckpointError(MementoError):
    """A checkpoint file is missing, unreadable, truncated, or not the expected kind of model."""


class ShapeError(MementoError):
    """A tensor given to a model or sampler has the wrong shape (resolution, frame count, channels)."""
