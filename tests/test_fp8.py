"""fp8 block weights: exactly a bf16 model with the dequantised weights; close to the original."""

from __future__ import annotations

import copy

import pytest
import torch

from memento_core.errors import MementoError
from memento_core.fp8 import FP8_MAX, Fp8Linear, is_fp8, quantize_fp8
from memento_core.lora import LoraError, merge_lora, parse_lora
from memento_core.tiny import tiny_dit


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 3, 4, 8, generator=g)
    y = torch.randn(1, 20, 3, 4, 8, generator=g)
    ctx = torch.randn(1, 7, 64, generator=g)
    return x, torch.tensor([500.0]), ctx, y


@pytest.fixture(scope="module")
def models():
    bf16 = tiny_dit("i2v", seed=3).to(torch.bfloat16)
    return bf16, quantize_fp8(copy.deepcopy(bf16))


def test_every_block_projection_is_fp8_and_memory_halves(models):
    bf16, fp8 = models
    linears = [m for b in fp8.blocks for m in b.modules() if isinstance(m, Fp8Linear)]
    assert len(linears) == 10 * len(fp8.blocks)  # self q,k,v,o, cross q,k,v,o, ffn.0, ffn.2
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in linears)
    assert is_fp8(fp8) and not is_fp8(bf16) and fp8.weight_dtype == torch.bfloat16
    size = lambda m: sum(p.numel() * p.element_size() for p in m.blocks.parameters())  # noqa: E731
    assert size(fp8) < 0.56 * size(bf16)
    for m in linears:  # per-row scale: the largest weight of each row maps to the fp8 maximum
        assert torch.equal(m.weight.float().abs().amax(1), torch.full((m.out_features,), FP8_MAX))


def test_equals_bf16_model_with_dequantised_weights(models):
    """Independent expectation: a plain bf16 model whose weights are q·scale (computed in float64)."""
    bf16, fp8 = models
    expected_model = copy.deepcopy(bf16)
    for (name, _), (_, q) in zip(bf16.blocks.named_modules(), fp8.blocks.named_modules(), strict=True):
        if isinstance(q, Fp8Linear):
            target = expected_model.blocks.get_submodule(name)
            target.weight.data = (q.weight.double() * q.scale.double()[:, None]).to(torch.bfloat16)
    with torch.no_grad():
        got, want, orig = fp8(*inputs()), expected_model(*inputs()), bf16(*inputs())
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    rel = (got - orig).norm() / orig.norm()
    assert rel < 0.1, rel  # fp8 e4m3 keeps 3 mantissa bits: a few percent of change in the output


def test_misuse_is_refused(models):
    fp8 = models[1]
    with pytest.raises(MementoError, match="already fp8"):
        quantize_fp8(fp8)
    with pytest.raises(MementoError, match="bf16 or fp16"):
        quantize_fp8(tiny_dit("i2v"))
    a = torch.zeros(4, 256)
    b = torch.zeros(256, 4)
    lora = parse_lora({"blocks.0.self_attn.q.lora_A.weight": a, "blocks.0.self_attn.q.lora_B.weight": b})
    with pytest.raises(LoraError, match="float8"):
        merge_lora(fp8, lora)
