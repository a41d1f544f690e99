"""Text-encoder and VAE protocols, and tiny built-in stand-ins.

The shot and story code talks to a text encoder and a VAE only through these protocols, so the same
code runs with ComfyUI's CLIP/VAE objects (inside ComfyUI, wrapped in ``nodes/``), with diffusers'
``AutoencoderKLWan`` + transformers' ``UMT5EncoderModel`` (command line, real weights), and with the
tiny deterministic stand-ins below (tests and the embedded demo).
"""

from __future__ import annotations

import re
import zlib
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ShapeError

__all__ = [
    "LATENT_CHANNELS",
    "TextEncoder",
    "TinyImageEmbedder",
    "TinyTextEncoder",
    "TinyVAE",
    "VideoVAE",
    "encode_frames",
]

LATENT_CHANNELS = 16


@runtime_checkable
class TextEncoder(Protocol):
    """Encodes a prompt to umT5 hidden states, [1, L, text_dim] with L <= 512 (no padding needed)."""

    def encode(self, text: str) -> Tensor: ...


@runtime_checkable
class VideoVAE(Protocol):
    """The Wan 2.1 VAE interface: 8x spatial and causal 4x temporal compression to 16 channels.

    encode: [3, F, H, W] in [-1, 1] (F = 4n+1) -> [16, 1 + (F-1)/4, H/8, W/8]
    decode: [16, T, h, w] -> [3, 1 + 4(T-1), 8h, 8w] in [-1, 1]
    """

    def encode(self, video: Tensor) -> Tensor: ...

    def decode(self, latent: Tensor) -> Tensor: ...


class TinyTextEncoder:
    """Deterministic word-hash embeddings: each word maps to a fixed random vector (crc32-seeded).

    Not a language model; it gives different prompts different, stable encodings. "" -> [1, 0, D].
    """

    def __init__(self, text_dim: int = 64) -> None:
        self.text_dim = text_dim

    def encode(self, text: str) -> Tensor:
        words = re.findall(r"\w+|[^\w\s]", text.lower())[:512]
        rows = [
            torch.randn(self.text_dim, generator=torch.Generator().manual_seed(zlib.crc32(w.encode())))
            for w in words
        ]
        out = torch.stack(rows) if rows else torch.zeros(0, self.text_dim)
        return out[None]


class TinyVAE:
    """A linear stand-in for the Wan VAE with the real shapes and causal temporal grouping.

    Latent frame 0 is pixel frame 0; latent k > 0 averages pixel frames 4k-3..4k. Spatially each 8x8x3
    patch (192 values) maps to 16 channels through a fixed orthonormal projection; decode applies the
    transpose and repeats each latent frame over its pixel frames.
    """

    def __init__(self, seed: int = 0) -> None:
        q, _ = torch.linalg.qr(
            torch.randn(192, LATENT_CHANNELS, generator=torch.Generator().manual_seed(seed))
        )
        self.proj = q.T.contiguous()  # [16, 192], orthonormal rows

    def encode(self, video: Tensor) -> Tensor:
        if video.ndim != 4 or video.shape[0] != 3:
            raise ShapeError(f"VAE encode: expected a clip [3, F, H, W], got {list(video.shape)}")
        _, f, h, w = video.shape
        if (f - 1) % 4 or h % 8 or w % 8:
            raise ShapeError(f"VAE encode: expected F = 4n+1 and H, W divisible by 8, got {f}x{h}x{w}")
        v = video.float()
        groups = [v[:, :1]] + [v[:, 1 + 4 * k : 5 + 4 * k].mean(1, keepdim=True) for k in range((f - 1) // 4)]
        frames = torch.cat(groups, 1).permute(1, 0, 2, 3)  # [T, 3, H, W]
        patches = F.pixel_unshuffle(frames, 8)  # [T, 192, h, w]
        latent = torch.einsum("oc,tchw->othw", self.proj.to(v.device), patches)
        return latent * 4.0  # roughly unit variance for inputs in [-1, 1]

    def decode(self, latent: Tensor) -> Tensor:
        if latent.ndim != 4 or latent.shape[0] != LATENT_CHANNELS:
            raise ShapeError(f"VAE decode: expected latents [16, T, h, w], got {list(latent.shape)}")
        patches = torch.einsum("oc,othw->tchw", self.proj.to(latent.device), latent.float() / 4.0)
        frames = F.pixel_shuffle(patches, 8)  # [T, 3, H, W]
        repeats = torch.tensor([1] + [4] * (latent.shape[1] - 1), device=latent.device)
        video = torch.repeat_interleave(frames, repeats, dim=0)
        return video.permute(1, 0, 2, 3).clamp(-1, 1)


def encode_frames(vae: VideoVAE, video: Tensor, indices: list[int]) -> Tensor:
    """VAE-encode each chosen frame of ``video`` [3, F, H, W] ALONE as a 1-frame clip (never as a video)
    -> [N, 16, h, w] (SPEC 4.1: every memory image is one latent frame)."""
    return torch.stack([vae.encode(video[:, i : i + 1])[:, 0] for i in indices])


class TinyImageEmbedder:
    """A deterministic stand-in for CLIP image embeddings (tests and the tiny demo).

    frames [N, 3, H, W] in [0, 1] -> [N, dim] unit rows: each frame is area-resized to 16x16, centred by
    0.5 and projected by a fixed seeded Gaussian matrix. Similar frames give similar embeddings; it is
    not a semantic model.
    """

    def __init__(self, dim: int = 64, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(3 * 16 * 16, dim, generator=gen) / (3 * 16 * 16) ** 0.5

    def __call__(self, frames: Tensor) -> Tensor:
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ShapeError(f"image embedder: expected frames [N, 3, H, W], got {list(frames.shape)}")
        small = F.adaptive_avg_pool2d(frames.detach().float().cpu(), 16) - 0.5
        return F.normalize(small.flatten(1) @ self.proj, dim=-1)
