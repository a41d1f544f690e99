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
from .story import Story, StoryError, StoryShot, load_story

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
