"""Peak host memory of load_dit on a ~2 GB synthetic Wan DiT checkpoint, against its size.

Run: ``make bench`` (or ``.venv/bin/python bench/bench_load.py [--gb 2] [--keep DIR]``).
Each load runs in a fresh subprocess; we report its peak RSS above the RSS it had after importing
torch and memento_core, divided by the bytes of the loaded weights. The rule (SPEC 9) is ~1x.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import torch
import memento_core
from memento_core import load_dit

def rss_now():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
base = rss_now()
t0 = time.perf_counter()
model = load_dit(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
dt = time.perf_counter() - t0
weights = sum(p.numel() * p.element_size() for p in model.parameters())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"base": base, "peak": peak, "weights": weights, "seconds": dt, "after": rss_now()}))
"""


def make_checkpoint(path: Path, gigabytes: float) -> int:
    import torch
    from safetensors.torch import save_file

    from memento_core import DiTConfig
    from memento_core.dit import WanDiT

    dim, ffn = 2048, 8192
    per_block = 2 * (8 * dim * dim + 2 * dim * ffn)  # bf16 bytes of one block's big matrices
    layers = max(1, round(gigabytes * 1e9 / per_block))
    cfg = DiTConfig(dim=dim, ffn_dim=ffn, num_heads=dim // 128, num_layers=layers, in_dim=36)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanDiT(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, path)
    return layers


def measure(path: Path, dtype: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), dtype],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gb", type=float, default=2.0, help="checkpoint size in GB (bf16)")
    ap.add_argument("--keep", type=Path, help="folder to write the checkpoint to (default: a temp dir)")
    args = ap.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="memento-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "synthetic_wan_dit_bf16.safetensors"
    t0 = time.perf_counter()
    layers = make_checkpoint(path, args.gb)
    size = path.stat().st_size
    took = time.perf_counter() - t0
    print(f"checkpoint: {size / 1e9:.2f} GB, {layers} blocks of width 2048 (written in {took:.0f} s)")
    for dtype in ("bfloat16", "float32"):
        r = measure(path, dtype)
        extra = r["peak"] - r["base"]
        print(
            f"load as {dtype:8s}: weights {r['weights'] / 1e9:.2f} GB, peak RSS above baseline "
            f"{extra / 1e9:.2f} GB = {extra / r['weights']:.2f}x the loaded weights "
            f"({extra / size:.2f}x the file), {r['seconds']:.1f} s; RSS after load "
            f"{(r['after'] - r['base']) / 1e9:.2f} GB"
        )
    if not args.keep:
        path.unlink()


if __name__ == "__main__":
    main()
