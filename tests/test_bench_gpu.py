"""bench/bench_gpu.py: its --tiny run goes through every section on the CPU, and its FLOP count
agrees with SPEC 9's hand numbers for the real shapes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module
    spec.loader.exec_module(module)
    return module


def test_flops_match_spec_sizes(bench):
    real = bench.REAL
    # SPEC 9: a Memento shot ~2.9 PFLOP (attention ~1.8, projections ~1.1), a plain shot ~1.7 PFLOP
    assert bench.forward_flops(real, memento=True) == pytest.approx(2.9e15, rel=0.03)
    assert bench.forward_flops(real, memento=False) == pytest.approx(1.7e15, rel=0.05)
    # the same arithmetic by hand for one block of the plain shot: 2·L·(6d² + 2d·f) + 4·d·L² + ...
    L, d, f = 32760, 5120, 13824
    block = 2 * L * (6 * d * d + 2 * d * f) + 2 * 512 * 2 * d * d + 4 * d * L * L + 4 * d * L * 512
    patch = 2 * L * 36 * 4 * d + 2 * L * d * 16 * 4
    assert bench.forward_flops(real, memento=False) == 40 * block + patch


def test_tiny_run_covers_every_section(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for title in (
        "1. matmul peak",
        "2. forwards",
        "3. torch.compile",
        "4. peak memory",
        "5. block swap",
        "6. fp8",
    ):
        assert f"== {title}" in text
    results = json.loads(out.read_text())
    assert results["best_backend"] == "sdpa"
    assert set(results["forwards"]["sdpa"]["seconds"]) == {"plain", "memento"}
    assert results["compile"]["seconds"] > 0
    swap = results["block_swap"]
    assert isinstance(swap["swap_blocks"], int) and swap["swap_blocks"] >= 1
    assert {"streamed", "synchronous"} <= set(swap)
    assert set(results["fp8"]["seconds"]) == {"dequant", "scaled_mm"}
    assert results["activation_peak_gb"] > 0
    planned = results["planned_peak_gb"]
    assert planned["block_swap"] < planned["swap_experts"] < planned["none"]


def test_without_a_gpu_the_full_run_says_to_use_tiny(bench, capsys):
    if bench.torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert bench.main([]) == 2
    assert "--tiny" in capsys.readouterr().err
