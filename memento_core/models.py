"""The models a story is rendered with: :class:`ModelSet`, the built-in tiny system, the T2V experts.

The story runner takes a ``ModelSet``; the command line builds one from a model config
(:mod:`memento_core.real_models`) or the tiny models (:func:`tiny_models`), the ComfyUI node from
ComfyUI's loaders. This module imports only downward (models, adapters, loading).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .adapters import TextEncoder, TinyImageEmbedder, TinyTextEncoder, TinyVAE, VideoVAE
from .dit import WanDiT
from .fast_paths import FastPaths, apply_to_experts
from .fp8 import quantize_fp8
from .keyframe_query import KeyframeQuery
from .loading import load_dit
from .m2v import Backbone
from .tiny import tiny_dit

if TYPE_CHECKING:
    from .keyframes import AestheticScorer
    from .memory import ImageEmbedder

__all__ = ["ModelSet", "load_t2v_experts", "tiny_models"]


@dataclass
class ModelSet:
    """The models a story needs. The backbone is loaded on first use and kept; the T2V experts (shot 1
    only) are loaded when needed and released right after, as the reference pipeline does.

    kind: "tiny", "real" or "comfyui"; description: JSON-ready facts for the log and for resume checks;
    family: the backbone's weights, "memento" (LoRA + KeyframeQuery) or "storymem" (LoRA only): it picks
    the default memory policy; load_embedder: builds the image embedder a keyframe policy (StoryMem)
    needs, None when none is configured; scorer: an optional aesthetic scorer for StoryMem's filter;
    device: where sampling runs; swap_experts: the loaders leave the experts on the CPU and only the
    expert being sampled is moved to ``device`` (``memento_core.offload.ExpertSwap``), so one GPU holds
    one 14B expert at a time; swap_blocks (with swap_experts): the last ``swap_blocks`` blocks of the
    active expert stay on the CPU and come in one at a time (``memento_core.offload.BlockSwap``).
    placement: when given, it places the backbone's experts for a memory shot
    instead (a context manager yielding ``ensure(pool)``, called before a pool's KeyframeQuery runs);
    the ComfyUI node passes ComfyUI's model management here. fast_paths: attention backend, fp8
    compute and torch.compile (``memento_core.fast_paths``), put on every expert when it is loaded;
    the notices of what fell back to the safe path are kept in ``notices``.
    """

    kind: str
    description: dict[str, Any]
    vae: VideoVAE
    text_encoder: TextEncoder
    load_backbone: Callable[[], Backbone]
    load_t2v: Callable[[], tuple[WanDiT, WanDiT]] | None = None
    device: str = "cpu"
    swap_experts: bool = False
    swap_blocks: int = 0
    placement: Callable[[Backbone], AbstractContextManager[Callable[[str], None] | None]] | None = None
    family: str = "memento"
    load_embedder: Callable[[], ImageEmbedder] | None = None
    scorer: AestheticScorer | None = None
    fast_paths: FastPaths = field(default_factory=FastPaths)
    notices: list[str] = field(default_factory=list)
    _backbone: Backbone | None = field(default=None, repr=False)
    _embedder: ImageEmbedder | None = field(default=None, repr=False)

    def backbone(self) -> Backbone:
        if self._backbone is None:
            backbone = self.load_backbone()
            self.apply_fast_paths(backbone.high, backbone.low)
            self._backbone = backbone
        return self._backbone

    def apply_fast_paths(self, *experts: WanDiT) -> None:
        """Put :attr:`fast_paths` on ``experts`` (checks run on :attr:`device`); notices are kept."""
        for notice in apply_to_experts(experts, self.fast_paths, self.device):
            if notice not in self.notices:
                self.notices.append(notice)

    def embedder(self) -> ImageEmbedder | None:
        """The image embedder (built on first use), or None when none is configured."""
        if self._embedder is None and self.load_embedder is not None:
            self._embedder = self.load_embedder()
        return self._embedder


def _tiny_kfq(seed: int) -> KeyframeQuery:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return KeyframeQuery(dim=256, num_heads=2).eval().requires_grad_(False)


def load_t2v_experts(
    high: Any, low: Any, dtype: torch.dtype, device: str | torch.device = "cpu", fp8: bool = False
) -> tuple[WanDiT, WanDiT]:
    """The two Wan2.2 T2V experts for shot 1 (anything ``load_dit`` takes; refused unless T2V), with
    their block weights stored in fp8 (``memento_core.fp8``) when ``fp8``."""
    experts = [load_dit(path, dtype=dtype, device=device, expect="t2v") for path in (high, low)]
    if fp8:
        experts = [quantize_fp8(expert) for expert in experts]
    return experts[0], experts[1]


def tiny_models(seed: int = 0) -> ModelSet:
    """The embedded tiny system: real architecture (2-layer, 256-wide experts with the official keys and
    KeyframeQuery modules), deterministic random weights, TinyVAE, TinyTextEncoder and TinyImageEmbedder
    (so every memory policy runs without files). It shows the
    pipeline working end to end; its videos are noise-like patterns, not a story."""

    def backbone() -> Backbone:
        return Backbone(
            tiny_dit("i2v", seed=seed + 1),
            tiny_dit("i2v", seed=seed + 2),
            _tiny_kfq(seed + 3),
            _tiny_kfq(seed + 4),
        )

    return ModelSet(
        kind="tiny",
        description={"kind": "tiny", "seed": seed, "dit": "2 layers, dim 256, text_dim 64"},
        vae=TinyVAE(seed),
        text_encoder=TinyTextEncoder(64),
        load_backbone=backbone,
        load_t2v=lambda: (tiny_dit("t2v", seed=seed + 5), tiny_dit("t2v", seed=seed + 6)),
        family="memento",
        load_embedder=lambda: TinyImageEmbedder(seed=seed),
    )
