"""memento_core: Memento / StoryMem / Context-as-Memory on Wan2.2-A14B, in pure PyTorch.

Never imports ComfyUI. The public API (SPEC section 8) is re-exported here.
"""

from .dit import DiTConfig, WanDiT
from .errors import CheckpointError, MementoError, ShapeError
from .loading import load_dit
from .sampling import sample

__all__ = ["CheckpointError", "DiTConfig", "MementoError", "ShapeError", "WanDiT", "load_dit", "sample"]
