"""Tiny Wan DiT experts with the real architecture and key layout, and deterministic random weights.

They stand in for the 14B experts in tests and in the embedded demo: same code paths, a few MB.
Heads are 128 wide as in the real model (so RoPE splits 44/42/42), only fewer and narrower layers.
"""

from __future__ import annotations

import math

import torch

from .dit import DiTConfig, WanDiT

__all__ = ["random_state_dict", "tiny_config", "tiny_dit"]


def tiny_config(kind: str = "i2v", *, dim: int = 256, num_layers: int = 2, text_dim: int = 64) -> DiTConfig:
    """A small config of the given kind (``"i2v"``: in_dim 36, ``"t2v"``: in_dim 16)."""
    if kind not in ("i2v", "t2v"):
        raise ValueError(f"kind: expected 'i2v' or 't2v', got {kind!r}")
    return DiTConfig(
        dim=dim,
        ffn_dim=2 * dim,
        num_heads=dim // 128,
        num_layers=num_layers,
        in_dim=36 if kind == "i2v" else 16,
        out_dim=16,
        text_dim=text_dim,
        freq_dim=256,
    )


def random_state_dict(cfg: DiTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random weights (official keys, float32) for ``cfg``, independent of torch's RNG.

    Weights ~ N(0, 1/fan_in), biases ~ N(0, 0.02²), norm gains ~ 1 + N(0, 0.1²), modulations
    ~ N(0, 1/dim), so activations keep a useful scale through the layers.
    """
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanDiT(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(shapes):
        shape = shapes[key]
        noise = torch.randn(shape, generator=gen)
        if key.endswith("modulation"):
            out[key] = noise / math.sqrt(cfg.dim)
        elif "norm" in key and key.endswith(".weight"):
            out[key] = 1.0 + 0.1 * noise
        elif key.endswith(".bias"):
            out[key] = 0.02 * noise
        else:
            out[key] = noise / math.sqrt(math.prod(shape[1:]))
    return out


def tiny_dit(kind: str = "i2v", seed: int = 0, **config: int) -> WanDiT:
    """A tiny :class:`WanDiT` of ``kind`` with :func:`random_state_dict` weights, in eval mode."""
    cfg = tiny_config(kind, **config)
    with torch.device("meta"):
        model = WanDiT(cfg)
    model.load_state_dict(random_state_dict(cfg, seed), assign=True)
    return model.eval().requires_grad_(False)
