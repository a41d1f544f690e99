"""LoRA merge time for a 40-block tiny-width expert (dim 256) at Memento's rank 128, on CPU.

Run: ``.venv/bin/python bench/bench_lora_merge.py``. Prints medians over repeated merges into fresh
copies of the model, for fp32 and bf16 weights, and from a safetensors file (parse + read + merge).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from memento_core.lora import load_lora, merge_lora, parse_lora
from memento_core.tiny import tiny_dit

TARGETS = [f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"] + ["ffn.0", "ffn.2"]


def peft_lora(model: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """A PEFT-layout LoRA (base_model.model.blocks.N.<module>.lora_{A,B}.weight) for every target."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, mod in model.named_modules():
        parts = name.split(".", 2)
        if parts[0] == "blocks" and len(parts) == 3 and parts[2] in TARGETS:
            out[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=gen)
            out[f"base_model.model.{name}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=gen)
    return {k: v.to(torch.bfloat16) for k, v in out.items()}


def median_ms(fn, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    base = tiny_dit("i2v", seed=0, num_layers=40)
    sd = peft_lora(base, 128)
    lora = parse_lora(sd)
    print(f"40 blocks, dim 256, rank 128: {len(sd) // 2} modules")
    for dtype in (torch.float32, torch.bfloat16):
        models = [copy.deepcopy(base).to(dtype) for _ in range(7)]
        ms = median_ms(lambda models=models: merge_lora(models.pop(), lora))
        print(f"merge into {dtype!s:15s}: median {ms:.0f} ms")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lora.safetensors"
        save_file(sd, path)
        models = [copy.deepcopy(base) for _ in range(7)]
        ms = median_ms(lambda: merge_lora(models.pop(), load_lora(path)))
        print(f"from file (parse + read + merge, fp32): median {ms:.0f} ms")


if __name__ == "__main__":
    main()
