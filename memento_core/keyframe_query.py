"""Memento's KeyframeQuery (KFQ): the learned dual-query selection of memory frames (SPEC 4.7).

Each expert of a released Memento model carries its own KFQ (24 tensors, prefix ``keyframe_query.``).
Given the candidate memory latents of the next shot, its prompt and its global caption, the KFQ scores
every candidate frame twice: with the local queries (conditioned on the full shot prompt, for
short-range continuity) and with the global queries (conditioned on the global caption, for identity).
Selection takes the top local frames, then the top global frames among the rest.

Numerics follow the released reference (``wan/modules/model_memory.py``, ``KeyframeQuery`` and
``WanCrossAttention`` with ``visual_tokens=True``; ``wan/memory2video_learnable_rope_fine.py``,
``filter_memory_by_query``); everything here runs in float32 whatever the weight dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dit import AttentionLayout, _attention, apply_rope, rope_cos_sin
from .errors import CheckpointError, ShapeError
from .loading import strip_prefixes

__all__ = [
    "KFQ_PREFIX",
    "KFQ_TENSOR_NAMES",
    "KeyframeQuery",
    "candidate_positions",
    "dual_topk",
    "split_global_caption",
]

#: Prefix of the KFQ tensors inside a released ``backbone_{high,low}_noise.safetensors``.
KFQ_PREFIX = "keyframe_query."

#: The 24 tensor names of a KFQ (without :data:`KFQ_PREFIX`).
KFQ_TENSOR_NAMES: tuple[str, ...] = (
    "queries",
    "queries_global",
    "memory_patcher.weight",
    "memory_patcher.bias",
    *(
        f"{attn}.{part}"
        for attn in ("query_to_text", "query_to_visual")
        for part in (
            *(f"{proj}.{p}" for proj in ("q", "k", "v", "o") for p in ("weight", "bias")),
            "norm_q.weight",
            "norm_k.weight",
        )
    ),
)

#: Leading prefixes a KFQ key may carry in training / PEFT / ComfyUI files (stripped in any order).
_LEADING_PREFIXES = (
    "high_noise_model.",
    "low_noise_model.",
    "base_model.model.",
    "model.diffusion_model.",
    "diffusion_model.",
)

#: Patch of the memory patcher (time, height, width), as in the released model.
PATCH_SIZE = (1, 2, 2)

#: Range of temporal RoPE positions (the reference's 1024-row table centred at 512).
MIN_POS, MAX_POS = -512, 511

#: Pixel frames per latent frame (Wan VAE temporal stride).
_VAE_STRIDE_T = 4

_GLOBAL_MARK = "global caption:"
_SHOT_MARK = "shot caption:"


# ------------------------------------------------------------------------------------------------
# Small helpers


def candidate_positions(rel_frames: Sequence[int] | Tensor, current_time: int) -> Tensor:
    """Temporal RoPE positions of KFQ candidates (SPEC 4.7; reference ``filter_memory_by_query``).

    ``rel_frames[j] = abs_frame_j - current_time`` is the story-time offset of candidate j in pixel
    frames (negative: in the past), ``current_time`` the pixel frames generated before the next shot.
    ``p_j = clamp((current_time + rel_j) // 4 - current_time // 4, -512, 511)`` with floor division.
    Unlike the DiT memory positions (SPEC 4.3) there is no ``min(.., -1)`` here: a candidate in the
    same latent frame as the next shot's start gets position 0.

    rel_frames: [F] integers. Returns a LongTensor [F] (CPU).
    """
    if int(current_time) != current_time or current_time < 0:
        raise ValueError(f"current_time: expected a non-negative integer, got {current_time!r}")
    rel = torch.as_tensor(rel_frames, dtype=torch.long).reshape(-1)
    now = int(current_time)
    pos = torch.div(rel + now, _VAE_STRIDE_T, rounding_mode="floor") - now // _VAE_STRIDE_T
    return pos.clamp(MIN_POS, MAX_POS)


def split_global_caption(prompt: str) -> str:
    """The global caption of a Memento prompt (what the global queries are conditioned on).

    Rule of the reference inference (``filter_memory_by_query``): when the prompt contains both
    ``global caption:`` and ``shot caption:`` (case-sensitive), take the text before the first
    ``shot caption:``, delete every ``global caption:`` in it, strip whitespace, drop trailing
    ``;`` characters and strip again. Otherwise the whole prompt, unchanged.
    """
    if _GLOBAL_MARK not in prompt or _SHOT_MARK not in prompt:
        return prompt
    head, _, _ = prompt.partition(_SHOT_MARK)
    return head.replace(_GLOBAL_MARK, "").strip().rstrip(";").strip()


def _ranking(scores: Tensor) -> list[int]:
    """Frame indices by descending score; equal scores keep the lower index first. scores: [F]."""
    values = scores.detach().to("cpu", torch.float64).reshape(-1).tolist()
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def dual_topk(
    local_scores: Tensor, global_scores: Tensor, k_local: int = 6, k_global: int = 2
) -> tuple[list[int], list[int]]:
    """Memento's dual top-k over per-frame scores (SPEC 4.7 step 6, reference ``_forward_single_item``).

    Take the ``min(k_local, F)`` frames with the highest local score; mask them out; take the
    ``min(k_global, max(1, F - k_local'))`` highest global scores among the rest. When nothing is
    left (F <= k_local) the reference's global pick is a masked frame that its inference drops as a
    duplicate of a local one, so the global list is then empty. With F <= k_local + k_global every
    frame ends up selected, as the reference's filter (which keeps all frames) does.
    Ties: the lower frame index wins (explicit, device-independent; ``torch.topk`` leaves it open).

    local_scores, global_scores: [F]. Returns (local, global) sorted lists of frame indices.
    """
    if local_scores.shape != global_scores.shape or local_scores.ndim != 1:
        raise ShapeError(
            f"scores: expected two [F] tensors, got {list(local_scores.shape)} and "
            f"{list(global_scores.shape)}"
        )
    if k_local < 0 or k_global < 0:
        raise ValueError(f"k_local, k_global: expected >= 0, got {k_local}, {k_global}")
    if not (torch.isfinite(local_scores).all() and torch.isfinite(global_scores).all()):
        raise ValueError("KeyframeQuery scores are not finite (NaN/inf): check the weights and inputs")
    n = local_scores.numel()
    k_l = min(k_local, n)
    local = _ranking(local_scores)[:k_l]
    k_g = min(k_global, max(1, n - k_l))
    taken = set(local)
    rest = [i for i in _ranking(global_scores) if i not in taken]
    return sorted(local), sorted(rest[:k_g])


def _linear32(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` in float32 whatever the weight dtype. x: [..., in] -> [..., out] float32."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


# ------------------------------------------------------------------------------------------------
# Modules


class QueryAttention(AttentionLayout):
    """Cross-attention of a few queries onto a context, with Wan's ``WanCrossAttention`` layout.

    Parameters ``q, k, v, o`` (Linear dim -> dim with bias) and ``norm_q``, ``norm_k`` (RMSNorm over
    the whole width). Queries get no RoPE; the keys (after ``norm_k``) optionally get 3D RoPE (the
    reference's ``visual_tokens=True``). No mask: every context position is attended.
    """

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6) -> None:
        super().__init__(dim, num_heads, eps)

    def heads(self, x: Tensor) -> Tensor:
        """[B, L, dim] -> [B, L, heads, head_dim]."""
        return x.unflatten(-1, (self.num_heads, -1))

    def forward(self, x: Tensor, context: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x: [B, Lq, dim]; context: [B, Lk, dim]; rope: (cos, sin) each [Lk, head_dim/2] or None.

        Returns [B, Lq, dim] float32.
        """
        q = self.heads(self.norm_q(_linear32(self.q, x)))
        k = self.heads(self.norm_k(_linear32(self.k, context)))
        if rope is not None:
            k = apply_rope(k, *rope)
        v = self.heads(_linear32(self.v, context))
        return _linear32(self.o, _attention(q, k, v).flatten(2))


class KeyframeQuery(nn.Module):
    """Memento's KeyframeQuery of one expert (SPEC 4.7). Parameter names are the released ones.

    ``queries`` [n_local, dim], ``queries_global`` [n_global, dim], ``memory_patcher`` Conv3d
    (latent_channels -> dim, kernel = stride = (1, 2, 2)), ``query_to_text`` and ``query_to_visual``
    (:class:`QueryAttention`). ``load_state_dict`` takes the 24 released tensors with the
    ``keyframe_query.`` prefix stripped; :meth:`from_state_dict` strips prefixes itself.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        n_local: int = 10,
        n_global: int = 2,
        latent_channels: int = 16,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if n_local < 1 or n_global < 1:
            raise ValueError(f"KeyframeQuery: expected n_local, n_global >= 1, got {n_local}, {n_global}")
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"KeyframeQuery: dim {dim} / num_heads {num_heads} must be an even head_dim")
        self.dim = dim
        self.num_heads = num_heads
        self.n_local = n_local
        self.n_global = n_global
        self.latent_channels = latent_channels
        self.queries = nn.Parameter(torch.randn(n_local, dim) / dim**0.5)
        self.queries_global = nn.Parameter(torch.randn(n_global, dim) / dim**0.5)
        self.memory_patcher = nn.Conv3d(latent_channels, dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)
        self.query_to_text = QueryAttention(dim, num_heads, eps)
        self.query_to_visual = QueryAttention(dim, num_heads, eps)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor], num_heads: int | None = None) -> KeyframeQuery:
        """Build a KFQ from its 24 tensors (any other keys, e.g. LoRA ones, are ignored).

        Keys may carry ``keyframe_query.`` and before it any of ``high_noise_model.``,
        ``low_noise_model.``, ``base_model.model.``, ``model.diffusion_model.``, ``diffusion_model.``.
        dim, n_local, n_global and latent_channels come from the shapes; heads default to dim // 128.
        The tensors are assigned as they are (dtype and device kept); the module is in eval mode
        without gradients. Raises :class:`CheckpointError` (a ValueError) naming missing tensors.
        """
        tensors = _kfq_tensors(sd)
        missing = [name for name in KFQ_TENSOR_NAMES if name not in tensors]
        if missing:
            raise CheckpointError(
                f"KeyframeQuery: {len(missing)} of {len(KFQ_TENSOR_NAMES)} tensors missing "
                f"(expected keys '{KFQ_PREFIX}<name>'): {', '.join(missing)}"
            )
        dim, n_local, n_global, channels = _infer_shape(tensors)
        heads = num_heads if num_heads is not None else dim // 128
        if heads < 1 or dim % heads:
            raise CheckpointError(f"KeyframeQuery: cannot split dim {dim} into {heads} heads; pass num_heads")
        with torch.device("meta"):
            kfq = cls(dim, heads, n_local=n_local, n_global=n_global, latent_channels=channels)
        try:
            kfq.load_state_dict(tensors, strict=True, assign=True)
        except RuntimeError as err:
            raise CheckpointError(f"KeyframeQuery: tensors do not fit together: {err}") from err
        return kfq.eval().requires_grad_(False)

    # -- scoring ---------------------------------------------------------------------------------

    def scores(
        self, latents: Tensor, frame_pos: Tensor, ctx: Tensor, ctx_global: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Per-frame local and global scores of the candidates (SPEC 4.7 steps 1-6), float32.

        latents: [C, F, H, W] candidate latents (C = latent_channels, H and W even); frame_pos: [F]
        integer temporal positions (see :func:`candidate_positions`; clamped to [-512, 511] like the
        reference's table lookup); ctx, ctx_global: [1, L, dim] text contexts already embedded by
        the expert (``WanDiT.embed_text``, L = 512). Returns (local [F], global [F]) on the module's
        device. Differentiable; inputs are cast to float32 on the module's device.
        """
        device = self.queries.device
        lat, pos, ctx, ctx_global = self._check_inputs(latents, frame_pos, ctx, ctx_global, device)
        n_frames, h, w = lat.shape[1], lat.shape[2] // PATCH_SIZE[1], lat.shape[3] // PATCH_SIZE[2]
        tokens = self.patchify(lat)
        rope = rope_cos_sin(pos, h, w, self.head_dim)
        queries = self.text_queries(ctx, ctx_global)
        queries = queries + self.query_to_visual(queries, tokens, rope)
        per_frame = self._frame_scores(queries, tokens, rope, n_frames)
        return per_frame[: self.n_local].mean(0), per_frame[self.n_local :].mean(0)

    def patchify(self, latents: Tensor) -> Tensor:
        """Memory patcher tokens. latents: [C, F, H, W] -> [1, F·(H/2)·(W/2), dim] float32, frame-major."""
        conv = self.memory_patcher
        bias = None if conv.bias is None else conv.bias.float()
        x = F.conv3d(latents.float()[None], conv.weight.float(), bias, stride=conv.stride)
        return x.flatten(2).transpose(1, 2)

    def text_queries(self, ctx: Tensor, ctx_global: Tensor) -> Tensor:
        """``[Ql; Qg]`` with ``Ql = queries + query_to_text(queries, ctx)`` and the same for the global
        queries on ``ctx_global``. ctx, ctx_global: [1, L, dim] -> [1, n_local + n_global, dim] float32.
        """
        local = self.queries.float()[None]
        glob = self.queries_global.float()[None]
        local = local + self.query_to_text(local, ctx)
        glob = glob + self.query_to_text(glob, ctx_global)
        return torch.cat([local, glob], dim=1)

    def _frame_scores(
        self, queries: Tensor, tokens: Tensor, rope: tuple[Tensor, Tensor], n_frames: int
    ) -> Tensor:
        """Scaled q·k per head (no norms, RoPE on k only), mean over heads, mean over each frame's tokens.

        queries: [1, n_q, dim]; tokens: [1, F·h·w, dim] -> [n_q, F] float32.
        """
        att = self.query_to_visual
        q = att.heads(_linear32(att.q, queries))[0]
        k = apply_rope(att.heads(_linear32(att.k, tokens)), *rope)[0]
        logits = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(self.head_dim)
        return logits.mean(0).unflatten(1, (n_frames, -1)).mean(-1)

    def _check_inputs(
        self, latents: Tensor, frame_pos: Tensor, ctx: Tensor, ctx_global: Tensor, device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Validate shapes; return float32 latents / contexts and clamped long positions on ``device``."""
        if latents.ndim != 4 or latents.shape[0] != self.latent_channels:
            raise ShapeError(
                f"latents: expected [{self.latent_channels}, F, H, W] candidate latents, "
                f"got {list(latents.shape)}"
            )
        if latents.shape[1] < 1 or latents.shape[2] % 2 or latents.shape[3] % 2:
            raise ShapeError(f"latents: expected F >= 1 and even H, W, got {list(latents.shape)}")
        pos = torch.as_tensor(frame_pos).reshape(-1)
        if pos.numel() != latents.shape[1] or pos.is_floating_point():
            raise ShapeError(
                f"frame_pos: expected {latents.shape[1]} integer positions, got {pos.numel()} ({pos.dtype})"
            )
        for name, c in (("ctx", ctx), ("ctx_global", ctx_global)):
            if c.ndim != 3 or c.shape[0] != 1 or c.shape[-1] != self.dim:
                raise ShapeError(f"{name}: expected [1, L, {self.dim}] embedded text, got {list(c.shape)}")
        pos = pos.to(device=device, dtype=torch.long).clamp(MIN_POS, MAX_POS)
        as32 = {"device": device, "dtype": torch.float32}
        return latents.to(**as32), pos, ctx.to(**as32), ctx_global.to(**as32)

    # -- selection -------------------------------------------------------------------------------

    @torch.no_grad()
    def select(
        self,
        latents: Tensor,
        frame_pos: Tensor,
        ctx: Tensor,
        ctx_global: Tensor,
        k_local: int = 6,
        k_global: int = 2,
    ) -> tuple[list[int], list[int]]:
        """Pick memory frames: top ``k_local`` by local score, then top global among the rest.

        Arguments as :meth:`scores`; the rule (counts, masking, ties) is :func:`dual_topk`.
        Returns (local, global): two sorted, disjoint lists of frame indices into ``latents``.
        """
        local, glob = self.scores(latents, frame_pos, ctx, ctx_global)
        return dual_topk(local, glob, k_local, k_global)


def _strip_key(key: str) -> str:
    """Remove leading training / PEFT / ComfyUI prefixes, then ``keyframe_query.``."""
    key = strip_prefixes(key, _LEADING_PREFIXES)
    return key[len(KFQ_PREFIX) :] if key.startswith(KFQ_PREFIX) else key


def _kfq_tensors(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The KFQ tensors of ``sd`` under their bare names; raises on two keys for the same tensor."""
    found: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in sd.items():
        name = _strip_key(key)
        if name not in KFQ_TENSOR_NAMES:
            continue
        if name in found:
            raise CheckpointError(
                f"KeyframeQuery: two tensors for '{name}': '{origin[name]}' and '{key}' "
                "(pass the tensors of one expert only)"
            )
        found[name], origin[name] = value, key
    return found


def _infer_shape(tensors: Mapping[str, Tensor]) -> tuple[int, int, int, int]:
    """(dim, n_local, n_global, latent_channels) from the tensor shapes, with consistency checks."""
    queries, glob, patcher = tensors["queries"], tensors["queries_global"], tensors["memory_patcher.weight"]
    if queries.ndim != 2 or glob.ndim != 2 or glob.shape[1] != queries.shape[1]:
        raise CheckpointError(
            f"KeyframeQuery: queries {list(queries.shape)} and queries_global {list(glob.shape)} "
            "must both be [n, dim] with the same dim"
        )
    dim = queries.shape[1]
    if patcher.ndim != 5 or patcher.shape[0] != dim or tuple(patcher.shape[2:]) != PATCH_SIZE:
        raise CheckpointError(
            f"KeyframeQuery: memory_patcher.weight {list(patcher.shape)} is not "
            f"[{dim}, C, {', '.join(map(str, PATCH_SIZE))}]"
        )
    return dim, queries.shape[0], glob.shape[0], patcher.shape[1]
