"""memento_core: Memento / StoryMem / Context-as-Memory on Wan2.2-A14B, in pure PyTorch.

Never imports ComfyUI. The public API (SPEC section 8) is re-exported here.
"""

from .dit import DiTConfig, WanDiT
from .errors import CheckpointError, MementoError, ShapeError
from .expert import load_memento_expert
from .keyframe_query import KeyframeQuery
from .loading import load_dit
from .memory import MemoryBank, MemoryFrame, Selection, load_bank, save_bank
from .sampling import sample

__all__ = [
    "CheckpointError",
    "DiTConfig",
    "KeyframeQuery",
    "MementoError",
    "MemoryBank",
    "MemoryFrame",
    "Selection",
    "ShapeError",
    "Story",
    "StoryError",
    "StoryShot",
    "WanDiT",
    "load_bank",
    "load_dit",
    "load_memento_expert",
    "load_story",
    "sample",
    "save_bank",
]

#: Names served from memento_core.story on first access. Importing that module here would make
#: ``python -m memento_core.story`` (the story runner's CLI) warn that the module is already loaded.
_STORY_NAMES = ("Story", "StoryError", "StoryShot", "load_story")


def __getattr__(name: str) -> object:
    if name in _STORY_NAMES:
        from . import story

        return getattr(story, name)
    raise AttributeError(f"module 'memento_core' has no attribute {name!r}")
