"""Cost of a memory forward (identity + memory + target, split attention) against a plain forward of
the same token count, on CPU with a tiny-width model. SPEC 9: the memory path costs only its tokens.

Run: ``.venv/bin/python bench/bench_memory_forward.py``. Prints per-forward medians and their ratio,
measured interleaved in one run.
"""

from __future__ import annotations

import statistics
import time

import torch

from memento_core.tiny import tiny_dit


def main(frames: int = 30, h: int = 16, w: int = 16, repeats: int = 7) -> None:
    torch.manual_seed(0)
    model = tiny_dit("i2v", seed=0, dim=512, num_layers=4, text_dim=64)
    x = torch.randn(1, 16, frames, h, w)
    y = torch.randn(1, 20, frames, h, w)
    t = torch.tensor([500.0])
    ctx, ctx_id = torch.randn(1, 40, 64), torch.randn(1, 12, 64)
    pos = torch.tensor([-512, -20, -18, -15, -12, -9, -6, -3, -1, *range(frames - 9)])
    runs = {
        "plain": lambda: model(x, t, ctx, y=y),
        "memory": lambda: model(
            x, t, ctx, y=y, frame_pos=pos, n_identity=1, n_memory=8, context_identity=ctx_id
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(repeats):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    tokens = frames * (h // 2) * (w // 2)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"tokens {tokens} (1 identity + 8 memory + {frames - 9} target frames), dim 512, 4 blocks, CPU")
    for name, m in med.items():
        print(f"{name:7s}: median {m * 1000:.1f} ms over {repeats} runs")
    print(f"memory / plain = {med['memory'] / med['plain']:.3f}")


if __name__ == "__main__":
    main()
