"""The visual memory of a story: immutable banks, positions, persistence and the memory policies.

Files: :mod:`.frames` (a memory frame, story-time constants), :mod:`.positions` (temporal RoPE
positions), :mod:`.selection` (selector contract and selection records), :mod:`.bank` (the immutable
``MemoryBank``), :mod:`.persistence` (save / load), :mod:`.policy` (what a policy is),
:mod:`.registry` (policies by name) and one module per policy: :mod:`.memento_policy`,
:mod:`.storymem_policy`, :mod:`.camera_policy` (``fov``, ``manual``).
"""

from .bank import MemoryBank
from .camera_policy import FovPolicy, ManualPolicy, MementoFovPolicy
from .frames import (
    FRAMES_PER_SHOT,
    LATENT_CHANNELS,
    MAX_POSITION,
    MIN_POSITION,
    POOLS,
    REFERENCE_SPACING,
    SPATIAL_STRIDE,
    TEMPORAL_STRIDE,
    MemoryBankError,
    MemoryFrame,
    stack_latents,
)
from .memento_policy import MementoPolicy
from .persistence import BANK_FORMAT, BANK_VERSION, bank_to_dict, load_bank, save_bank
from .policy import FinishedShot, ImageEmbedder, MemoryPolicy, MemoryTools, Remembered, SamplerDefaults
from .positions import (
    SCHEMES,
    STORYMEM_SPACING,
    PositionScheme,
    frame_positions,
    memento_sample_indices,
    memory_positions,
    sequential_positions,
    storymem_positions,
)
from .registry import get_policy, policy_class, policy_names, register_policy
from .selection import PoolSelection, Selection, SelectionInputs, Selector, kfq_selector, recency_selector
from .storymem_policy import STORYMEM_SINK, StoryMemPolicy

__all__ = [
    "BANK_FORMAT",
    "BANK_VERSION",
    "FRAMES_PER_SHOT",
    "LATENT_CHANNELS",
    "MAX_POSITION",
    "MIN_POSITION",
    "POOLS",
    "REFERENCE_SPACING",
    "SCHEMES",
    "SPATIAL_STRIDE",
    "STORYMEM_SINK",
    "STORYMEM_SPACING",
    "TEMPORAL_STRIDE",
    "FinishedShot",
    "FovPolicy",
    "ImageEmbedder",
    "ManualPolicy",
    "MementoFovPolicy",
    "MementoPolicy",
    "MemoryBank",
    "MemoryBankError",
    "MemoryFrame",
    "MemoryPolicy",
    "MemoryTools",
    "PoolSelection",
    "PositionScheme",
    "Remembered",
    "SamplerDefaults",
    "Selection",
    "SelectionInputs",
    "Selector",
    "StoryMemPolicy",
    "bank_to_dict",
    "frame_positions",
    "get_policy",
    "kfq_selector",
    "load_bank",
    "memento_sample_indices",
    "memory_positions",
    "policy_class",
    "policy_names",
    "recency_selector",
    "register_policy",
    "save_bank",
    "sequential_positions",
    "stack_latents",
    "storymem_positions",
]
