"""The Wan2.2 diffusion transformer (one A14B expert), with explicit temporal positions and the
memory segments of Memento's memory-to-video shot.

One readable model file, in the spirit of diffusers' ``transformer_wan.py``. Parameter names are the
official Wan keys (``blocks.N.self_attn.q.weight``, ``head.modulation``, ...), so ``load_state_dict``
takes an official or ComfyUI checkpoint (prefix stripped) as it is.

Numerics follow the official model: the time embedding, every modulation (shift/scale/gate), the
residual stream and the output head run in float32; the projections, attention and FFN run in the
weight dtype (bf16 in production); 3D RoPE angles are computed in float64.

Token layout of a shot (SPEC 4.1): ``[identity (0|1 frame) | memory (M frames) | target]`` along
time, patchified to ``F·h·w`` tokens (``h = H/2``, ``w = W/2``), frame-major.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import SDPA, AttentionBackend, sdpa_attention
from .errors import ShapeError

__all__ = ["DiTConfig", "Segments", "WanDiT", "rope_cos_sin", "sinusoidal_embedding"]

#: Lowest temporal RoPE position a frame may take (Memento's identity slot sits there).
MIN_FRAME_POS = -512


@dataclass(frozen=True)
class DiTConfig:
    """Shape of one Wan DiT expert. Defaults are Wan2.2-I2V-A14B (T2V has ``in_dim=16``)."""

    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 36
    out_dim: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    text_len: int = 512

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if self.dim % self.num_heads:
            raise ValueError(f"DiTConfig: dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"DiTConfig: head_dim {self.head_dim} must be even and at least 6")
        if self.freq_dim % 2:
            raise ValueError(f"DiTConfig: freq_dim {self.freq_dim} must be even")
        if self.in_dim < self.out_dim:
            raise ValueError(f"DiTConfig: in_dim {self.in_dim} is smaller than out_dim {self.out_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def cond_dim(self) -> int:
        """Channels of the conditioning ``y`` (mask + condition latent): 0 for T2V, 20 for I2V."""
        return self.in_dim - self.out_dim

    @property
    def model_kind(self) -> str:
        """``"t2v"`` (noise only in) or ``"i2v"`` (noise + mask + condition latent in)."""
        return "t2v" if self.cond_dim == 0 else "i2v"

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Complex RoPE pairs per axis (time, height, width): 22/21/21 for head_dim 128."""
        c = self.head_dim // 2
        return (c - 2 * (c // 3), c // 3, c // 3)


@dataclass(frozen=True)
class Segments:
    """Leading token ranges of a shot: identity tokens, then memory tokens, then the target."""

    identity: int = 0
    memory: int = 0


# ------------------------------------------------------------------------------------------------
# Positional and time embeddings


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """Wan's timestep embedding: ``[cos, sin]`` of ``t·10000^(-i/half)`` in float64.

    t: [B] timesteps (any float/int dtype). Returns [B, dim] float32.
    """
    half = dim // 2
    pos = t.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    sinusoid = torch.outer(pos, freqs)
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1).float()


def _axis_angles(pos: Tensor, pairs: int, axis_dim: int) -> Tensor:
    """Angles ``pos / 10000^(2i/axis_dim)`` for i < pairs. pos: [N] -> [N, pairs] float64."""
    inv = 1.0 / torch.pow(10000, torch.arange(0, 2 * pairs, 2, dtype=torch.float64) / axis_dim)
    return torch.outer(pos.to(torch.float64), inv.to(pos.device))


def rope_cos_sin(frame_pos: Tensor, h: int, w: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """3D RoPE table for a ``[F, h, w]`` token grid with explicit (possibly negative) frame positions.

    Axis sizes as in Wan: time uses ``head_dim - 4·(head_dim//6)`` dims, height and width
    ``2·(head_dim//6)`` each (44/42/42 for 128). frame_pos: [F] integer positions.
    Returns (cos, sin), each [F·h·w, head_dim/2] float32, frame-major like the tokens.
    """
    c = head_dim // 2
    pairs = (c - 2 * (c // 3), c // 3, c // 3)
    dims = (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
    device = frame_pos.device
    f = frame_pos.numel()
    at = _axis_angles(frame_pos, pairs[0], dims[0])
    ah = _axis_angles(torch.arange(h, device=device), pairs[1], dims[1])
    aw = _axis_angles(torch.arange(w, device=device), pairs[2], dims[2])
    angles = torch.cat(
        [
            at[:, None, None, :].expand(f, h, w, -1),
            ah[None, :, None, :].expand(f, h, w, -1),
            aw[None, None, :, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, c)
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs ``(x[2i], x[2i+1])`` of each head, in float32.

    x: [B, L, heads, head_dim]; cos, sin: [L, head_dim/2]. Returns x's shape in x's dtype.
    """
    xf = x.float().unflatten(-1, (-1, 2))
    x1, x2 = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    """Wan's RMSNorm over the whole width (computed in float32, then scaled in the input dtype)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a projection computes in: its weight dtype (an fp8-stored layer says its own)."""
    return getattr(layer, "compute_dtype", None) or layer.weight.dtype


def _linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """Apply a projection in its weight dtype (what autocast does in the reference)."""
    return layer(x.to(compute_dtype(layer)))


def _linear_fp32(layer: nn.Linear, x: Tensor) -> Tensor:
    """Apply a small projection in float32 (time embedding, head), as Wan's fp32 autocast regions."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def _layer_norm(x: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps)


_attention = sdpa_attention  # q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> [B, Lq, H, D]


class AttentionLayout(nn.Module):
    """Wan's attention parameters: ``q, k, v, o`` (Linear dim -> dim) and ``norm_q``, ``norm_k``
    (RMSNorm over the whole width). Shared by self-, cross- and KeyframeQuery attention.

    ``attend`` is the attention backend (``memento_core.attention``; SDPA unless
    :meth:`WanDiT.set_attention` chose another). It is a plain attribute, not a parameter."""

    attend: AttentionBackend = SDPA

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)


class SelfAttention(AttentionLayout):
    """Self-attention with qk RMSNorm and 3D RoPE; split into SA1/SA2 when an identity slot exists."""

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], segments: Segments) -> Tensor:
        """x: [B, L, dim] (weight dtype) -> [B, L, dim]."""
        b, n = x.shape[0], x.shape[1]
        heads = (self.num_heads, -1)
        q = apply_rope(self.norm_q(self.q(x)).view(b, n, *heads), *rope)
        k = apply_rope(self.norm_k(self.k(x)).view(b, n, *heads), *rope)
        v = self.v(x).view(b, n, *heads)
        if segments.identity == 0:
            out = self.attend(q, k, v)
        else:
            out = _split_attention(q, k, v, segments.identity, segments.memory, self.attend)
        return self.o(out.flatten(2))


def _split_attention(
    q: Tensor, k: Tensor, v: Tensor, n_id: int, n_mem: int, attend: AttentionBackend = SDPA
) -> Tensor:
    """SPEC 4.4: SA1 over [identity + memory], SA2 over [memory + target].

    Identity tokens take SA1, target tokens SA2, memory tokens the mean of both, so identity and
    target never attend to each other directly. q, k, v: [B, L, H, D]; n_id, n_mem: token counts.
    """
    head = n_id + n_mem
    sa1 = attend(q[:, :head], k[:, :head], v[:, :head])
    sa2 = attend(q[:, n_id:], k[:, n_id:], v[:, n_id:])
    memory = 0.5 * sa1[:, n_id:] + 0.5 * sa2[:, :n_mem]
    return torch.cat([sa1[:, :n_id], memory, sa2[:, n_mem:]], dim=1)


class CrossAttention(AttentionLayout):
    """Text cross-attention (no RoPE, no mask: all 512 padded positions are attended)."""

    def _attend(self, q: Tensor, context: Tensor) -> Tensor:
        b = context.shape[0]
        k = self.norm_k(self.k(context)).view(b, context.shape[1], self.num_heads, -1)
        v = self.v(context).view(b, context.shape[1], self.num_heads, -1)
        return self.attend(q, k, v)

    def forward(self, x: Tensor, context: Tensor, context_identity: Tensor | None, n_id: int) -> Tensor:
        """x: [B, L, dim]; context, context_identity: [B, text_len, dim] (already embedded).

        The first ``n_id`` tokens (the identity slot) attend to ``context_identity``.
        """
        b, n = x.shape[0], x.shape[1]
        q = self.norm_q(self.q(x)).view(b, n, self.num_heads, -1)
        if n_id == 0:
            out = self._attend(q, context)
        else:
            out = torch.cat(
                [self._attend(q[:, :n_id], context_identity), self._attend(q[:, n_id:], context)], 1
            )
        return self.o(out.flatten(2))


class WanBlock(nn.Module):
    """One transformer block: modulated self-attention, cross-attention, modulated FFN."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = SelfAttention(cfg.dim, cfg.num_heads, cfg.eps)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(cfg.dim, cfg.num_heads, cfg.eps)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(
        self,
        x: Tensor,
        e0: Tensor,
        rope: tuple[Tensor, Tensor],
        context: Tensor,
        context_identity: Tensor | None,
        segments: Segments,
    ) -> Tensor:
        """x: [B, L, dim] float32 residual stream; e0: [B, 6, dim] float32 -> [B, L, dim] float32."""
        wdtype = compute_dtype(self.self_attn.q)
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e0).unsqueeze(2).unbind(1)
        h = _layer_norm(x, self.eps) * (1 + scale1) + shift1
        x = x + self.self_attn(h.to(wdtype), rope, segments).float() * gate1
        h = F.layer_norm(x, (x.shape[-1],), self.norm3.weight.float(), self.norm3.bias.float(), self.eps)
        x = x + self.cross_attn(h.to(wdtype), context, context_identity, segments.identity).float()
        h = _layer_norm(x, self.eps) * (1 + scale2) + shift2
        x = x + _linear(self.ffn[2], self.ffn[1](_linear(self.ffn[0], h))).float() * gate2
        return x


class Head(nn.Module):
    """Output head: modulated LayerNorm and a projection to ``out_dim·prod(patch)``, in float32."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """x: [B, L, dim] float32; e: [B, dim] float32 -> [B, L, out_dim·prod(patch)] float32."""
        shift, scale = (self.modulation.float() + e[:, None]).unsqueeze(2).unbind(1)
        return _linear_fp32(self.head, _layer_norm(x, self.eps) * (1 + scale) + shift)


# ------------------------------------------------------------------------------------------------
# The model


class WanDiT(nn.Module):
    """Wan2.2 DiT expert (T2V or I2V) with explicit frame positions and memory segments.

    ``forward(x, t, context, y=None, frame_pos=None, n_identity=0, n_memory=0, context_identity=None)``
    (see :meth:`forward`). Build on the meta device and load with ``load_state_dict(sd, assign=True)``
    to avoid allocating the weights twice (``memento_core.loading.load_dit`` does this).
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        self.patch_embedding = nn.Conv3d(
            cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Sequential(
            nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList([WanBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)

    # -- helpers ----------------------------------------------------------------------------------

    @property
    def weight_dtype(self) -> torch.dtype:
        return compute_dtype(self.blocks[0].self_attn.q) if len(self.blocks) else torch.float32

    @property
    def attention(self) -> AttentionBackend:
        """The attention backend of the self- and cross-attention layers (SDPA by default)."""
        return self.blocks[0].self_attn.attend if len(self.blocks) else SDPA

    def set_attention(self, backend: AttentionBackend) -> None:
        """Use ``backend`` (see :func:`memento_core.attention.resolve_attention`) in every block's self-
        and cross-attention, split attention included."""
        for module in self.modules():
            if isinstance(module, (SelfAttention, CrossAttention)):
                module.attend = backend

    def embed_text(self, context: Tensor) -> Tensor:
        """Zero-pad a T5 output to ``text_len`` tokens and embed it.

        context: [B, L, text_dim] with L <= text_len -> [B, text_len, dim] (weight dtype).
        """
        cfg = self.config
        if context.ndim != 3 or context.shape[-1] != cfg.text_dim:
            raise ShapeError(
                f"context: expected [B, L, {cfg.text_dim}] text-encoder output, got {list(context.shape)}"
            )
        if context.shape[1] > cfg.text_len:
            raise ShapeError(f"context: {context.shape[1]} tokens exceed text_len {cfg.text_len}")
        padded = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
        lin1, act, lin2 = self.text_embedding
        return _linear(lin2, act(_linear(lin1, padded)))

    def embed_time(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """t: [B] -> (e [B, dim], e0 [B, 6, dim]), both float32, computed once per sample."""
        lin1, act, lin2 = self.time_embedding
        e = _linear_fp32(lin2, act(_linear_fp32(lin1, sinusoidal_embedding(t, self.config.freq_dim))))
        e0 = _linear_fp32(self.time_projection[1], self.time_projection[0](e))
        return e, e0.unflatten(1, (6, self.config.dim))

    def _check_inputs(self, x: Tensor, y: Tensor | None, frame_pos: Tensor | None) -> Tensor:
        """Validate shapes; returns the input to the patch embedding, [B, in_dim, F, H, W]."""
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.out_dim:
            raise ShapeError(f"x: expected a latent [B, {cfg.out_dim}, F, H, W], got {list(x.shape)}")
        p = cfg.patch_size
        if x.shape[2] % p[0] or x.shape[3] % p[1] or x.shape[4] % p[2]:
            raise ShapeError(f"x: latent size {list(x.shape[2:])} is not divisible by the patch {list(p)}")
        if cfg.cond_dim == 0:
            if y is not None:
                raise ShapeError("y: this is a T2V model (in_dim 16); it takes no conditioning y")
            inp = x
        else:
            expected = [x.shape[0], cfg.cond_dim, *x.shape[2:]]
            if y is None or list(y.shape) != expected:
                got = None if y is None else list(y.shape)
                raise ShapeError(
                    f"y: this is an I2V model (in_dim {cfg.in_dim}); expected y {expected} (mask + "
                    f"condition latent), got {got}"
                )
            inp = torch.cat([x, y.to(x.dtype)], dim=1)
        if frame_pos is not None:
            frames = x.shape[2] // p[0]
            if frame_pos.ndim != 1 or frame_pos.numel() != frames:
                raise ShapeError(f"frame_pos: expected [{frames}] positions, got {list(frame_pos.shape)}")
            if int(frame_pos.min()) < MIN_FRAME_POS:
                raise ShapeError(
                    f"frame_pos: positions must be >= {MIN_FRAME_POS}, got {int(frame_pos.min())}"
                )
        return inp

    # -- forward ----------------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        y: Tensor | None = None,
        frame_pos: Tensor | None = None,
        n_identity: int = 0,
        n_memory: int = 0,
        context_identity: Tensor | None = None,
    ) -> Tensor:
        """Predict the flow velocity.

        x: [B, 16, F, H, W] noisy latent; t: [B] (or a scalar) timestep in [0, 1000];
        context: [B, L, text_dim] T5 output, L <= text_len (zero-padded inside);
        y: [B, in_dim-16, F, H, W] mask + condition latent (I2V) or None (T2V);
        frame_pos: [F] integer temporal RoPE positions (default ``arange(F)``), may be negative;
        n_identity, n_memory: leading segment lengths in (latent) frames; ``n_identity > 0`` turns on
        split attention (SPEC 4.4) and needs context_identity [B, L, text_dim].
        Returns [B, 16, F, H, W] float32.
        """
        cfg = self.config
        inp = self._check_inputs(x, y, frame_pos)
        b, _, f, hh, ww = x.shape
        p = cfg.patch_size
        grid = (f // p[0], hh // p[1], ww // p[2])
        if n_identity < 0 or n_memory < 0 or n_identity + n_memory > grid[0]:
            raise ShapeError(f"n_identity {n_identity} + n_memory {n_memory} exceed the {grid[0]} frames")
        if n_identity and context_identity is None:
            raise ShapeError("context_identity: required when n_identity > 0 (the reconstruct caption)")

        t = t.reshape(-1).expand(b) if t.numel() in (1, b) else t
        if t.shape != (b,):
            raise ShapeError(f"t: expected [{b}] timesteps, got {list(t.shape)}")
        e, e0 = self.embed_time(t)

        tokens = self.patch_embedding(inp.to(self.patch_embedding.weight.dtype))
        tokens = tokens.flatten(2).transpose(1, 2).float()  # [B, F·h·w, dim]

        ctx = self.embed_text(_batch(context, b, "context"))
        ctx_id = None
        if n_identity:
            ctx_id = self.embed_text(_batch(context_identity, b, "context_identity"))

        if frame_pos is None:
            frame_pos = torch.arange(grid[0], device=x.device)
        rope = rope_cos_sin(frame_pos.to(x.device), grid[1], grid[2], cfg.head_dim)
        per_frame = grid[1] * grid[2]
        segments = Segments(identity=n_identity * per_frame, memory=n_memory * per_frame)

        for block in self.blocks:
            tokens = block(tokens, e0, rope, ctx, ctx_id, segments)
        out = self.head(tokens, e)
        return self.unpatchify(out, grid)

    def unpatchify(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """x: [B, F·h·w, out_dim·prod(patch)] -> [B, out_dim, F·p0, h·p1, w·p2]."""
        b = x.shape[0]
        p, c = self.config.patch_size, self.config.out_dim
        u = x.view(b, *grid, *p, c)
        u = u.permute(0, 7, 1, 4, 2, 5, 3, 6)  # b c f p0 h p1 w p2
        return u.reshape(b, c, grid[0] * p[0], grid[1] * p[1], grid[2] * p[2])


def _batch(t: Tensor, b: int, name: str) -> Tensor:
    if t.shape[0] == b:
        return t
    if t.shape[0] == 1:
        return t.expand(b, *t.shape[1:])
    raise ShapeError(f"{name}: batch {t.shape[0]} does not match the latent batch {b}")
