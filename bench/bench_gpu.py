"""One GPU benchmark of an A14B expert at real shapes: attention backends, bf16 vs fp8, torch.compile,
MFU, memory/plain cost per token, peak memory under a 24 GB cap and block-swap overlap.

Run on a CUDA GPU (H100/H200: about 4-6 minutes; random bf16 weights are made on the GPU, no files):

    PYTHONPATH=. python bench/bench_gpu.py [--json results.json] [--skip-compile]

``--tiny`` runs every section with the same code on the CPU at tiny sizes in seconds (a test runs it).

Sections (each prints its numbers as it finishes; ratios are measured side by side in this run):
1. matmul peak: a bf16 [n x n] @ [n x n] matmul's FLOP/s, the denominator of MFU.
2. forwards: seconds per forward of a plain shot (21 latent frames; 32,760 tokens at 832x480x81) and a
   Memento shot (identity + 8 memory + 21 target frames; 46,800 tokens) for every attention backend that
   passes its check; MFU = analytic FLOPs / time / matmul peak; memory/plain cost per token.
3. compile: the best backend with the blocks compiled (first call, i.e. compile time, reported apart).
4. memory: peak GPU memory of a Memento forward with the expert resident, and the plan's prediction
   (``memento_core.plan``) for every offload mode.
5. block swap under a 24 GB cap (``torch.cuda.set_per_process_memory_fraction``): the plan's number of
   swapped blocks, the measured peak, time with swap / time without, for the streamed transfer (pinned
   memory, side stream) and the synchronous one.
6. fp8: the expert stored in fp8, with fp8 matmuls (``torch._scaled_mm``, where the GPU has them) and
   with the dequantise path, against bf16.
Targets (issue 14): Memento forward >= 65% MFU with the best backend; memory/plain cost per token <= 1.05;
a shot within 24 GB with block swap at <= 1.3x the unconstrained time.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from memento_core import plan as planner
from memento_core.attention import resolve_attention
from memento_core.dit import DiTConfig, WanDiT
from memento_core.fast_paths import compile_blocks, uncompile_blocks
from memento_core.fp8 import fp8_compute_supported, quantize_fp8, set_fp8_compute, uses_scaled_mm
from memento_core.memtrack import MemoryTracker
from memento_core.offload import BlockSwap, MoverTransfer, StreamedTransfer, swapped_blocks

GB = 1e9
CAP_GB = 24.0


@dataclass(frozen=True)
class Scale:
    """Sizes of a run: the expert config, the latent grid of a shot, and repetitions."""

    cfg: DiTConfig
    target_frames: int  # latent frames of a shot (81 frames -> 21)
    grid: tuple[int, int]  # latent height, width (480x832 -> 60x104)
    memory_frames: int
    matmul_n: int
    repeats: int
    width: int
    height: int
    frames: int


REAL = Scale(DiTConfig(), 21, (60, 104), 8, 8192, 2, 832, 480, 81)
TINY = Scale(
    DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=4, text_dim=64),
    5,
    (12, 16),
    2,
    256,
    1,
    128,
    96,
    17,
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_expert(cfg: DiTConfig, device: torch.device, seed: int = 0) -> WanDiT:
    """An expert with random bf16 weights made directly on ``device`` (weights ~ N(0, 1/fan_in), norm
    gains 1, modulation ~ N(0, 1/dim): activations keep their scale through 40 blocks)."""
    with torch.device("meta"):
        dit = WanDiT(cfg).to(torch.bfloat16)
    dit = dit.to_empty(device=device).eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if name.endswith("modulation"):
                p.normal_(0, 1 / math.sqrt(cfg.dim), generator=gen)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.normal_(0, 0.02, generator=gen)
            else:
                p.normal_(0, 1 / math.sqrt(max(1, p[0].numel())), generator=gen)
    return dit


def shot_inputs(scale: Scale, device: torch.device, memento: bool) -> tuple[tuple, dict]:
    """Inputs of one forward: plain (target frames only) or Memento (identity + memory + target)."""
    cfg = scale.cfg
    extra = 1 + scale.memory_frames if memento else 0
    frames = scale.target_frames + extra
    h, w = scale.grid
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, 16, frames, h, w, generator=gen).to(device)
    y = torch.randn(1, cfg.in_dim - 16, frames, h, w, generator=gen).to(device)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen).to(device)
    kw: dict[str, Any] = {"y": y}
    if memento:
        memory_pos = [-4 * (scale.memory_frames - i) for i in range(scale.memory_frames)]
        kw |= {
            "frame_pos": torch.tensor([-512, *memory_pos, *range(scale.target_frames)], device=device),
            "n_identity": 1,
            "n_memory": scale.memory_frames,
            "context_identity": ctx.clone(),
        }
    return (x, torch.tensor([700.0], device=device), ctx), kw


def forward_flops(scale: Scale, memento: bool) -> float:
    """Analytic FLOPs of one forward (2 per multiply-add): block projections, self-attention (split into
    SA1 [identity + memory] and SA2 [memory + target] for a Memento shot), cross-attention over 512 text
    tokens, the patch embedding and the head."""
    cfg = scale.cfg
    per_frame = scale.grid[0] * scale.grid[1] // 4
    n_id, n_mem = (1, scale.memory_frames) if memento else (0, 0)
    tokens = (n_id + n_mem + scale.target_frames) * per_frame
    d, f, text = cfg.dim, cfg.ffn_dim, cfg.text_len
    proj = 2 * tokens * (6 * d * d + 2 * d * f) + 2 * text * 2 * d * d
    if memento:
        pairs = ((n_id + n_mem) * per_frame) ** 2 + ((n_mem + scale.target_frames) * per_frame) ** 2
    else:
        pairs = tokens**2
    attn = 4 * d * pairs + 4 * d * tokens * text
    patch = 2 * tokens * cfg.in_dim * 4 * d + 2 * tokens * d * cfg.out_dim * 4
    return cfg.num_layers * (proj + attn) + patch


def seconds_per_call(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def matmul_peak(device: torch.device, n: int) -> float:
    """FLOP/s of a bf16 n x n x n matmul (best of 10 after warm-up)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = min(seconds_per_call(lambda: a @ b, device, 3) for _ in range(3))
    return 2 * n**3 / best


class Peak:
    """Peak memory above the start of the ``with`` block: CUDA allocator stats, or on CPU the
    CUDA-free tracker (live tensor storages created inside)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.bytes, self.total = device, 0, 0

    def __enter__(self) -> Peak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._tracker = MemoryTracker().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.total = torch.cuda.max_memory_allocated(self.device)
            self.bytes = self.total - self._start
        else:
            self._tracker.__exit__(*exc)
            self.bytes = self._tracker.peak
            self.total = self.bytes


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run(scale: Scale, device: torch.device, compile_check: bool = True) -> dict[str, Any]:
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    }
    tokens = {
        kind: (n + scale.target_frames) * scale.grid[0] * scale.grid[1] // 4
        for kind, n in (("plain", 0), ("memento", 1 + scale.memory_frames))
    }
    print(f"device: {results['device']}; torch {torch.__version__}; tokens: {tokens}")

    section("1. matmul peak")
    peak = matmul_peak(device, scale.matmul_n)
    results["matmul_peak_tflops"] = peak / 1e12
    print(f"bf16 {scale.matmul_n}^3 matmul: {peak / 1e12:.1f} TFLOP/s")

    t0 = time.perf_counter()
    dit = random_expert(scale.cfg, device)
    sync(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in dit.parameters())
    print(f"expert built on {device} in {time.perf_counter() - t0:.1f} s: {weight_bytes / GB:.2f} GB bf16")
    inputs = {kind: shot_inputs(scale, device, kind == "memento") for kind in tokens}
    flops = {kind: forward_flops(scale, kind == "memento") for kind in tokens}

    def forward(kind: str) -> Callable[[], Any]:
        args, kw = inputs[kind]
        return lambda: dit(*args, **kw)

    section("2. forwards per attention backend (bf16)")
    timing: dict[str, dict[str, float]] = {}
    for name in ("sdpa", "sage", "flash"):
        backend, notice = resolve_attention(name, device, torch.bfloat16)
        if backend.name != name:
            print(f"{name}: skipped ({notice})")
            continue
        dit.set_attention(backend)
        with torch.inference_mode():
            timing[name] = {kind: seconds_per_call(forward(kind), device, scale.repeats) for kind in tokens}
        row = timing[name]
        mfu = {kind: flops[kind] / row[kind] / peak for kind in tokens}
        per_token = (row["memento"] / tokens["memento"]) / (row["plain"] / tokens["plain"])
        print(
            f"{name}: plain {row['plain']:.3f} s ({mfu['plain']:.0%} MFU), memento {row['memento']:.3f} s "
            f"({mfu['memento']:.0%} MFU, {flops['memento'] / 1e15:.2f} PFLOP); memory/plain per token "
            f"{per_token:.3f}"
        )
        results.setdefault("forwards", {})[name] = {
            "seconds": row,
            "mfu": mfu,
            "memory_over_plain_per_token": per_token,
        }
    best = min(timing, key=lambda n: timing[n]["memento"])
    best_backend, _ = resolve_attention(best, device, torch.bfloat16)
    dit.set_attention(best_backend)
    base = timing[best]["memento"]
    results["best_backend"] = best
    print(f"best backend: {best} ({base:.3f} s per Memento forward)")

    if compile_check:
        section("3. torch.compile (best backend, Memento forward)")
        compile_blocks(dit)
        t0 = time.perf_counter()
        with torch.inference_mode():
            forward("memento")()
            sync(device)
            first = time.perf_counter() - t0
            compiled = seconds_per_call(forward("memento"), device, scale.repeats)
        uncompile_blocks(dit)
        torch._dynamo.reset()
        results["compile"] = {"first_call_s": first, "seconds": compiled, "speedup": base / compiled}
        print(
            f"first call (compiling) {first:.1f} s; then {compiled:.3f} s per forward: "
            f"{base / compiled:.2f}x eager"
        )

    section("4. peak memory of a Memento forward, measured and planned")
    with torch.inference_mode(), Peak(device) as measured:
        forward("memento")()
    results["activation_peak_gb"] = measured.bytes / GB
    planned = {}
    for mode in ("none", "swap_experts", "block_swap"):
        n = scale.cfg.num_layers // 2 if mode == "block_swap" else 0
        planned[mode] = planner.peak_bytes(
            scale.cfg, scale.width, scale.height, scale.frames, "bf16", mode, n, scale.memory_frames
        )[0]
    volume = tokens["memento"] * 4  # latent F·H·W (patch 1x2x2)
    predicted_act = planner.activation_bytes(scale.cfg, tokens["memento"], volume)
    results["planned_peak_gb"] = {k: v / GB for k, v in planned.items()}
    print(
        f"measured: {measured.bytes / GB:.3f} GB above the resident weights "
        f"({weight_bytes / GB:.2f} GB); estimator's activations: {predicted_act / GB:.3f} GB "
        f"(estimate / measured {predicted_act / max(measured.bytes, 1):.2f})"
    )
    for mode, total in planned.items():
        extra = f" ({scale.cfg.num_layers // 2} blocks swapped)" if mode == "block_swap" else ""
        print(f"plan {mode}{extra}: {total / GB:.2f} GB predicted peak (margin included)")

    section(f"5. block swap under a {CAP_GB:g} GB cap")
    # on the CPU (--tiny) there is no cap: plan for a budget between the two swap modes instead
    vram = CAP_GB if device.type == "cuda" else (planned["swap_experts"] + planned["block_swap"]) / 2 / GB
    chosen = planner.make_plan(
        vram,
        scale.width,
        scale.height,
        scale.frames,
        "bf16",
        cfg=scale.cfg,
        memory_frames=scale.memory_frames,
    )
    n_swap = chosen.swap_blocks if chosen.mode == "block_swap" else 0
    print(
        f"plan for {vram:.2f} GB: {chosen.mode}, {n_swap} blocks swapped, {chosen.predicted_peak_gb:.2f} GB"
    )
    blocks = swapped_blocks(dit, n_swap)
    for block in blocks:
        block.to("cpu")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(
            CAP_GB * GB / torch.cuda.get_device_properties(device).total_memory
        )
    swap_results = {}
    try:
        for label, transfer in (
            ("streamed", StreamedTransfer(device)),
            ("synchronous", MoverTransfer(device, "cpu")),
        ):
            swap = BlockSwap(blocks, device, "cpu", transfer=transfer)
            with torch.inference_mode(), swap.attached():
                seconds = seconds_per_call(forward("memento"), device, scale.repeats)
                with Peak(device) as capped:
                    forward("memento")()
            swap_results[label] = {"seconds": seconds, "ratio": seconds / base, "peak_gb": capped.total / GB}
            print(
                f"{label}: {seconds:.3f} s per forward = {seconds / base:.2f}x unswapped; peak "
                f"{capped.total / GB:.2f} GB (plan {chosen.predicted_peak_gb:.2f} GB)"
            )
    except torch.OutOfMemoryError as exc:
        print(f"out of memory under the cap: {str(exc).splitlines()[0]}")
        swap_results["error"] = "out of memory"
    finally:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
        for block in blocks:
            block.to(device)
    results["block_swap"] = {"swap_blocks": n_swap, "plan_peak_gb": chosen.predicted_peak_gb, **swap_results}

    section("6. fp8 weights (best backend, Memento forward)")
    quantize_fp8(dit)
    gc.collect()
    fp8: dict[str, float] = {}
    paths = ["dequant"] + (["scaled_mm"] if fp8_compute_supported(device) or device.type == "cpu" else [])
    for path in paths:
        set_fp8_compute(dit, path)
        with torch.inference_mode():
            fp8[path] = seconds_per_call(forward("memento"), device, scale.repeats)
        print(f"fp8 {path}: {fp8[path]:.3f} s per forward = {base / fp8[path]:.2f}x bf16 speed")
    notice = set_fp8_compute(dit, "auto")
    chosen_path = "scaled_mm" if uses_scaled_mm(dit) else "dequant"
    print(f"fp8 auto chooses: {chosen_path}" + (f" ({notice})" if notice else ""))
    fp8_bytes = sum(p.numel() * p.element_size() for p in dit.parameters())
    results["fp8"] = {"seconds": fp8, "weight_gb": fp8_bytes / GB}
    print(f"fp8 expert: {fp8_bytes / GB:.2f} GB")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (seconds)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--skip-compile", action="store_true", help="skip the torch.compile section")
    args = parser.parse_args(argv)
    logging.getLogger("memento").setLevel(logging.ERROR)  # the notices are printed per section here
    if args.tiny:
        scale, device = TINY, torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("bench_gpu: no CUDA GPU here; use --tiny for the CPU run of the same code", file=sys.stderr)
            return 2
        scale, device = REAL, torch.device("cuda")
    t0 = time.perf_counter()
    results = run(scale, device, compile_check=not args.skip_compile)
    results["wall_s"] = time.perf_counter() - t0
    print(f"\ntotal {results['wall_s']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
