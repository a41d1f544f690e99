"""An automatic GPU memory plan: ``python -m memento_core.plan --vram-gb G --width W --height H --frames F``.

One estimator of the peak GPU memory of a Memento shot (SPEC 9), and the fastest offload mode
(:mod:`memento_core.offload`) whose peak fits. Units: bytes inside, GB = 10^9 bytes in the output.

Peak = max(sampling, VAE decode) · (1 + ``MARGIN_FRACTION``) + ``MARGIN_BYTES``, with

* sampling = resident weights + activations of one forward (batch 1; CFG runs its two forwards one
  after the other) + text context + latents;
* VAE decode = resident weights (the command line leaves the active expert, or its resident part, on
  the GPU while it decodes) + VAE weights (fp32) + decode working memory + the decoded video.

Resident weights: ``none`` both experts (+ both KeyframeQuerys), ``swap_experts`` one, ``block_swap``
one minus its ``n`` swapped blocks plus ``min(n, 2)`` block buffers (the running block and the
prefetched one). fp8: block Linear weights 1 byte + a float32 scale per output row, the rest bf16.

Activations (what ``memento_core.dit`` allocates, L tokens, d = dim, r = ffn_dim / dim, in units of
L·d bytes, compute dtype bf16): the caller's block input (fp32, 4) + the block's new residual (fp32, 4)
+ the normed input h (fp32, 4) and its bf16 copy (2) + a query/key projection through RMSNorm (bf16
2, fp32 copy 4, fp32 normed 4, two bf16 casts 2+2): 28 in the cross-attention; self-attention 26;
FFN 12 + 4r (hidden and GELU output, bf16). Plus per forward: the patch-embedding input (in_dim
channels fp32), the RoPE table (cos + sin, fp32 [L, head_dim/2]) and the embedded text (512 x d bf16,
twice with an identity slot). fp8 (dequantise path): a projection's bf16 copy is made twice over
(``w.to(bf16)`` then ``· scale``) while that projection's inputs are live.

The text encoder (umT5-XXL, 11 GB bf16) runs before sampling and is not part of the sampling peak: on
the GPU when it fits there alone (then released), otherwise on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .dit import DiTConfig

__all__ = [
    "Plan",
    "activation_bytes",
    "expert_weight_bytes",
    "main",
    "make_plan",
    "peak_bytes",
    "shot_tokens",
]

GB = 1e9
#: Allocator / CUDA overhead: the CUDA context and cuBLAS workspaces (fixed) plus fragmentation of the
#: caching allocator (a fraction of what is allocated).
MARGIN_BYTES = 1.0 * GB
MARGIN_FRACTION = 0.05
#: umT5-XXL in bf16 (SPEC 9).
TEXT_ENCODER_BYTES = 11.0 * GB
#: Wan 2.1 VAE: ~127M parameters, run in float32 by the command line.
VAE_PARAMS = 127_000_000
VAE_BYTES_PER = 4
#: VAE decode working memory, an assumption (not measured here): the decoder runs one latent frame
#: (4 video frames) at a time, with about this many live 96-channel full-resolution fp32 tensors.
VAE_LIVE_TENSORS = 8
VAE_CHANNELS = 96
ACT = 2  # bytes of the compute dtype (bf16)
MODES = ("none", "swap_experts", "block_swap")
DTYPE_CHOICES = ("bf16", "fp8")


def latent_frames(frames: int) -> int:
    """Video frames (4n+1) -> latent frames ``(F-1)/4 + 1``."""
    return (frames - 1) // 4 + 1


def shot_tokens(
    width: int, height: int, frames: int, memory_frames: int = 8, identity: bool = True, patch: int = 16
) -> int:
    """Tokens of one shot: ``(identity + memory + target latent frames) · (H/16)·(W/16)``.

    832x480x81 with 8 memory frames and the identity slot: (1 + 8 + 21) · 1560 = 46,800.
    """
    return (int(identity) + memory_frames + latent_frames(frames)) * (height // patch) * (width // patch)


def _linear_params(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def expert_weight_bytes(cfg: DiTConfig, dtype: str = "bf16") -> tuple[int, int]:
    """Bytes of one expert's parameters -> (everything but the blocks, one block).

    bf16: every parameter 2 bytes. fp8 (:func:`memento_core.fp8.quantize_fp8`): each block Linear
    weight [out, in] 1 byte plus a float32 scale [out]; biases, norms, modulation and all non-block
    parameters stay bf16.
    """
    d, f, p = cfg.dim, cfg.ffn_dim, math.prod(cfg.patch_size)
    other = (
        cfg.in_dim * d * p + d  # patch embedding (Conv3d)
        + _linear_params(cfg.text_dim, d) + _linear_params(d, d)  # text embedding
        + _linear_params(cfg.freq_dim, d) + _linear_params(d, d)  # time embedding
        + _linear_params(d, 6 * d)  # time projection
        + _linear_params(d, cfg.out_dim * p) + 2 * d  # head + its modulation
    )  # fmt: skip
    # (weight shape, out) of every block Linear: self/cross q, k, v, o and the FFN pair
    linears = [(d * d, d)] * 8 + [(d * f, f), (f * d, d)]
    small = 2 * 2 * d + 2 * d + 6 * d  # attention norms (x2 layers), norm3 (w + b), modulation
    biases = sum(out for _, out in linears)
    if dtype == "bf16":
        block = 2 * (sum(w for w, _ in linears) + biases + small)
    elif dtype == "fp8":
        block = sum(w + 4 * out for w, out in linears) + 2 * (biases + small)
    else:
        raise ValueError(f"dtype: expected one of {DTYPE_CHOICES}, got {dtype!r}")
    return 2 * other, block


def kfq_bytes(cfg: DiTConfig) -> int:
    """Bytes of one Memento KeyframeQuery (bf16; never quantised), from its meta-device shapes."""
    import torch

    from .keyframe_query import KeyframeQuery

    with torch.device("meta"):
        kfq = KeyframeQuery(cfg.dim, cfg.num_heads)
    return 2 * sum(p.numel() for p in kfq.parameters())


def activation_bytes(
    cfg: DiTConfig, tokens: int, latent_volume: int, dtype: str = "bf16", identity: bool = True
) -> int:
    """Peak bytes one ``WanDiT.forward`` (batch 1) allocates above its inputs and weights.

    tokens: L; latent_volume: F·H·W of the latent input (L · prod(patch)). See the module docstring.
    """
    d, f = cfg.dim, cfg.ffn_dim
    ld = tokens * d
    r = f / d
    moments = [
        26 * ld,  # self-attention: key RMSNorm with the query done
        28 * ld,  # cross-attention: query RMSNorm, next to the block's input and new residual
        (12 + 4 * r) * ld,  # FFN: hidden and its GELU
    ]
    if dtype == "fp8":  # twice a projection's bf16 weight, next to what is live at that projection
        moments += [20 * ld + 4 * d * d, 14 * ld + 4 * d * f, (12 + 2 * r) * ld + 4 * d * f]
    per_forward = (
        cfg.in_dim * latent_volume * 4 * (cfg.cond_dim > 0)  # the I2V input cat([x, y]), fp32
        + 4 * tokens * cfg.head_dim  # RoPE cos + sin, fp32 [L, head_dim/2] each
        + (1 + int(identity)) * cfg.text_len * d * ACT  # embedded text (and the identity caption's)
        + 4 * 7 * d  # time embedding e, e0
    )
    return int(max(moments) + per_forward)


@dataclass(frozen=True)
class Plan:
    """A memory plan. Sizes in GB (10^9 bytes). breakdown_gb: the parts of the peak phase."""

    mode: str
    swap_blocks: int
    dtype: str
    predicted_peak_gb: float
    fits: bool
    vram_gb: float
    tokens: int
    peak_phase: str
    text_encoder: str
    breakdown_gb: dict[str, float] = field(default_factory=dict)
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        """The ``plan --json`` object (SPEC 8) plus the extra keys."""
        return asdict(self)

    def describe(self) -> str:
        """A short readable plan."""
        blocks = f", {self.swap_blocks} blocks swapped to the CPU" if self.mode == "block_swap" else ""
        parts = ", ".join(f"{k} {v:.2f}" for k, v in self.breakdown_gb.items())
        lines = [
            f"mode: {self.mode}{blocks} ({self.dtype}, {self.tokens:,} tokens)",
            f"predicted peak: {self.predicted_peak_gb:.2f} GB of {self.vram_gb:g} GB "
            f"({self.peak_phase}: {parts})",
            f"text encoder: {self.text_encoder}",
            f"fits: {'yes' if self.fits else 'no'}",
        ]
        return "\n".join(lines + ([self.message] if self.message else []))


def peak_bytes(
    cfg: DiTConfig,
    width: int,
    height: int,
    frames: int,
    dtype: str = "bf16",
    mode: str = "none",
    swap_blocks: int = 0,
    memory_frames: int = 8,
    identity: bool = True,
) -> tuple[int, str, dict[str, int]]:
    """-> (predicted peak bytes with the margin, the peak phase, its parts in bytes)."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if not 0 <= swap_blocks <= cfg.num_layers:
        raise ValueError(f"swap_blocks: expected 0..{cfg.num_layers}, got {swap_blocks}")
    other, block = expert_weight_bytes(cfg, dtype)
    expert = other + cfg.num_layers * block
    kfq = kfq_bytes(cfg) if identity or memory_frames else 0
    if mode == "none":
        weights = 2 * (expert + kfq)
    else:
        n = swap_blocks if mode == "block_swap" else 0
        weights = expert + kfq - n * block
    buffers = min(swap_blocks, 2) * block if mode == "block_swap" else 0
    tokens = shot_tokens(width, height, frames, memory_frames, identity, 8 * cfg.patch_size[1])
    volume = tokens * math.prod(cfg.patch_size)
    latents = (cfg.in_dim + 6 * cfg.out_dim) * volume * 4  # x, y, model outputs, solver history
    sampling = {
        "weights": weights,
        "block_buffers": buffers,
        "activations": activation_bytes(cfg, tokens, volume, dtype, identity),
        "text_context": 3 * cfg.text_len * cfg.text_dim * 4,  # positive, negative, identity (fp32)
        "latents": latents,
    }
    video = 3 * frames * height * width * 4
    decode = {
        "weights": weights,
        "vae_weights": VAE_PARAMS * VAE_BYTES_PER,
        "vae_decode": VAE_LIVE_TENSORS * VAE_CHANNELS * 4 * height * width * VAE_BYTES_PER + 3 * video,
        "latents": latents,
    }
    phase, parts = max(("sampling", sampling), ("vae_decode", decode), key=lambda p: sum(p[1].values()))
    total = sum(parts.values())
    margin = int(MARGIN_BYTES + MARGIN_FRACTION * total)
    return total + margin, phase, {**parts, "margin": margin}


def make_plan(
    vram_gb: float,
    width: int,
    height: int,
    frames: int,
    dtype: str = "bf16",
    cfg: DiTConfig | None = None,
    memory_frames: int = 8,
    identity: bool = True,
) -> Plan:
    """The fastest mode that fits ``vram_gb``: none, else swap_experts, else block_swap with the fewest
    swapped blocks; if nothing fits, block_swap with every block swapped and ``fits=False``."""
    cfg = cfg or DiTConfig()
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype: expected one of {DTYPE_CHOICES}, got {dtype!r}")
    budget = vram_gb * GB
    tries = [("none", 0), ("swap_experts", 0)] + [("block_swap", n) for n in range(1, cfg.num_layers + 1)]
    for mode, n in tries:
        peak, phase, parts = peak_bytes(cfg, width, height, frames, dtype, mode, n, memory_frames, identity)
        if peak <= budget:
            break
    fits = peak <= budget
    message = "" if fits else _what_fits(vram_gb, width, height, frames, dtype, cfg, memory_frames, identity)
    text_alone = TEXT_ENCODER_BYTES * (1 + MARGIN_FRACTION) + MARGIN_BYTES
    return Plan(
        mode=mode,
        swap_blocks=n,
        dtype=dtype,
        predicted_peak_gb=round(peak / GB, 2),
        fits=fits,
        vram_gb=vram_gb,
        tokens=shot_tokens(width, height, frames, memory_frames, identity, 8 * cfg.patch_size[1]),
        peak_phase=phase,
        text_encoder="gpu (released before sampling)" if text_alone <= budget else "cpu",
        breakdown_gb={k: round(v / GB, 3) for k, v in parts.items()},
        message=message,
    )


def _what_fits(
    vram_gb: float, width: int, height: int, frames: int, dtype: str, cfg: DiTConfig, mem: int, ident: bool
) -> str:
    """A hint for a plan that does not fit: fp8, or fewer frames, or a smaller size."""

    def fits(w: int, h: int, f: int, dt: str) -> bool:
        peak = peak_bytes(cfg, w, h, f, dt, "block_swap", cfg.num_layers, mem, ident)[0]
        return peak <= vram_gb * GB

    if dtype == "bf16" and fits(width, height, frames, "fp8"):
        return "does not fit in bf16; --dtype fp8 would fit"
    for f in range(frames - 4, 0, -4):
        if fits(width, height, f, dtype):
            return f"does not fit; {width}x{height} with {f} frames would ({dtype}, all blocks swapped)"
    for scale in (0.75, 0.5, 0.25):
        w, h = max(16, int(width * scale) // 16 * 16), max(16, int(height * scale) // 16 * 16)
        if fits(w, h, frames, dtype):
            return f"does not fit; {w}x{h}x{frames} would ({dtype}, all blocks swapped)"
    return f"does not fit; even the expert's non-swappable parts need more than {vram_gb:g} GB"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, not the usage block
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m memento_core.plan --vram-gb G --width W --height H --frames F [--dtype bf16|fp8]
    [--json]``. Returns 0 after printing the plan, 2 with one ``error: ...`` line on stderr for bad
    input (argparse's own usage errors also exit 2)."""
    parser = _Parser(
        prog="python -m memento_core.plan",
        description="Pick the fastest offload mode whose predicted peak GPU memory fits (one Wan2.2-A14B "
        "expert pair, a Memento shot: identity + 8 memory latent frames + the target).",
    )
    parser.add_argument("--vram-gb", type=float, required=True, help="GPU memory in GB (10^9 bytes)")
    parser.add_argument("--width", type=int, required=True, help="video width, a multiple of 16")
    parser.add_argument("--height", type=int, required=True, help="video height, a multiple of 16")
    parser.add_argument("--frames", type=int, required=True, help="video frames, 4n+1")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="bf16", help="expert weights")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or bad arguments (2, usage already printed)
        return exc.code if isinstance(exc.code, int) else 2
    problem = None
    if not (args.vram_gb > 0 and math.isfinite(args.vram_gb)):
        problem = f"--vram-gb must be a positive number, got {args.vram_gb:g}"
    elif args.width <= 0 or args.width % 16 or args.height <= 0 or args.height % 16:
        problem = f"--width and --height must be positive multiples of 16, got {args.width}x{args.height}"
    elif args.frames <= 0 or args.frames % 4 != 1:
        problem = f"--frames must be 4n+1 (1, 5, ..., 81), got {args.frames}"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    plan = make_plan(args.vram_gb, args.width, args.height, args.frames, args.dtype)
    print(json.dumps(plan.to_json()) if args.json else plan.describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
