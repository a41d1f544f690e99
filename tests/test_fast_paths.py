"""The GPU fast paths, checked on CPU: attention backends behind one switch (self-checked against
SDPA), fp8 matmuls (torch._scaled_mm) against the dequantise path and a float64 hand computation, and
torch.compile of the blocks against eager."""

from __future__ import annotations

import pytest
import torch

from memento_core import attention, fast_paths
from memento_core.attention import SDPA, resolve_attention, sdpa_attention
from memento_core.errors import MementoError
from memento_core.fast_paths import FastPaths, apply_fast_paths, compile_blocks, is_compiled, uncompile_blocks
from memento_core.fp8 import FP8_MAX, Fp8Linear, quantize_fp8, set_fp8_compute
from memento_core.offload import BlockSwap
from memento_core.tiny import tiny_dit


def naive_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v written out, in float32. [B, L, H, D] layout."""
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(qf @ kf.transpose(-1, -2) / qf.shape[-1] ** 0.5, dim=-1)
    return (weights @ vf).transpose(1, 2).to(q.dtype)


class Recorder:
    """A kernel that counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, q, k, v):
        self.calls += 1
        return self.fn(q, k, v)


@pytest.fixture
def loaders(monkeypatch):
    """Replace the backend loaders; every test starts with an empty resolution cache and log."""
    attention.clear_cache()
    monkeypatch.setattr(fast_paths, "_LOGGED", set())
    table = {}

    def missing():
        raise ImportError("No module named 'x'")

    for name in attention.LOADERS:
        table[name] = missing
    monkeypatch.setattr(attention, "LOADERS", table)
    yield table
    attention.clear_cache()


def memento_inputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 4, 4, 6, generator=g)
    y = torch.randn(1, model.config.cond_dim, 4, 4, 6, generator=g)
    ctx = torch.randn(2, 1, 20, model.config.text_dim, generator=g)
    kw = {
        "frame_pos": torch.tensor([-512, -9, 0, 1]),
        "n_identity": 1,
        "n_memory": 1,
        "context_identity": ctx[1],
    }
    return (x, torch.tensor([700.0]), ctx[0]), {"y": y, **kw}


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


# --- attention backends ----------------------------------------------------------------------------


def test_sdpa_layout_matches_naive_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 16, generator=g) for n in (7, 5, 5))
    assert torch.allclose(sdpa_attention(q, k, v), naive_attention(q, k, v), atol=1e-5)


def test_explicit_sdpa_has_no_notice(loaders):
    assert resolve_attention("sdpa") == (SDPA, None)


def test_missing_backend_falls_back_with_one_line_notice(loaders):
    backend, notice = resolve_attention("sage")
    assert backend is SDPA
    assert (
        notice.startswith("attention sage: using SDPA") and "not installed" in notice and "\n" not in notice
    )


def test_auto_without_fast_backends_is_silent_sdpa(loaders):
    assert resolve_attention("auto") == (SDPA, None)


def test_good_backend_is_used_everywhere_including_split_attention(loaders):
    kernel = Recorder(naive_attention)
    loaders["flash"] = lambda: kernel
    backend, notice = resolve_attention("auto", "cpu", torch.bfloat16)
    assert backend.name == "flash" and notice is None
    check_calls = kernel.calls
    model = tiny_dit("i2v", num_layers=2).to(torch.bfloat16)
    args, kw = memento_inputs(model)
    with torch.no_grad():
        reference = model(*args, **kw)
        model.set_attention(backend)
        assert model.attention is backend
        fast = model(*args, **kw)
    # identity present: self-attention runs SA1 and SA2, cross-attention two halves -> 4 per block
    assert kernel.calls - check_calls == 4 * len(model.blocks)
    assert rel(fast, reference) < 0.02


def test_float32_models_never_reach_a_half_precision_kernel(loaders):
    kernel = Recorder(naive_attention)
    loaders["sage"] = lambda: kernel
    backend, _ = resolve_attention("sage", "cpu", torch.bfloat16)
    model = tiny_dit("i2v")
    args, kw = memento_inputs(model)
    with torch.no_grad():
        reference = model(*args, **kw)
        model.set_attention(backend)
        calls = kernel.calls
        assert torch.equal(model(*args, **kw), reference)
    assert kernel.calls == calls


@pytest.mark.parametrize(
    "kernel,why",
    [
        (lambda q, k, v: v[:, : q.shape[1]] if v.shape[1] >= q.shape[1] else q, "disagrees with SDPA"),
        (lambda q, k, v: naive_attention(q, k, v)[:, :-1], "failed its check"),
        (lambda q, k, v: (_ for _ in ()).throw(RuntimeError("no kernel image for sm_75")), "sm_75"),
        (lambda q, k, v: naive_attention(q, k, v) * float("nan"), "disagrees with SDPA"),
    ],
)
def test_a_backend_that_fails_its_check_is_not_used(loaders, kernel, why):
    loaders["sage"] = lambda: kernel
    backend, notice = resolve_attention("sage", "cpu", torch.bfloat16)
    assert backend is SDPA and why in notice


def test_auto_prefers_sage_then_flash(loaders):
    loaders["sage"] = lambda: naive_attention
    loaders["flash"] = lambda: naive_attention
    assert resolve_attention("auto", "cpu", torch.bfloat16)[0].name == "sage"
    attention.clear_cache()
    loaders["sage"] = lambda: lambda q, k, v: q  # wrong
    backend, notice = resolve_attention("auto", "cpu", torch.bfloat16)
    assert backend.name == "flash" and notice is None  # a working backend was found: nothing to say


def test_the_check_runs_once_per_device_and_dtype(loaders):
    loads = []
    loaders["flash"] = lambda: loads.append(1) or naive_attention
    for _ in range(3):
        resolve_attention("flash", "cpu", torch.bfloat16)
    resolve_attention("flash", "cpu", torch.float16)
    assert len(loads) == 2


def test_unknown_choice_is_an_error(loaders):
    with pytest.raises(MementoError, match="attention: expected one of auto, sdpa, sage, flash"):
        resolve_attention("xformers")


# --- fp8 matmuls -----------------------------------------------------------------------------------


def fp8_layer(seed=0, n_in=256, n_out=384):
    g = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(n_in, n_out).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n_out, n_in, generator=g) / n_in**0.5)
        linear.bias.copy_(0.1 * torch.randn(n_out, generator=g))
    return Fp8Linear.from_linear(linear)


def test_scaled_mm_computes_per_token_fp8_products():
    layer = fp8_layer()
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    layer.scaled_mm = True
    out = layer(x)
    # by hand, in float64: each token's row quantised with max|row| / 448, times the stored weight
    rows = x.reshape(-1, 256).double()
    s = rows.abs().amax(1, keepdim=True) / FP8_MAX
    x_q = (rows / s).to(torch.float8_e4m3fn).double() * s
    w = layer.weight.double() * layer.scale.double()[:, None]
    expected = (x_q @ w.T + layer.bias.double()).reshape(3, 5, 384)
    assert out.shape == (3, 5, 384) and out.dtype == torch.bfloat16
    assert rel(out, expected) < 5e-3  # bf16 output rounding only
    layer.scaled_mm = False
    dequant = layer(x)
    assert 1e-3 < rel(out, dequant) < 0.06  # the activation quantisation is real, and small


def test_fp8_model_with_scaled_mm_tracks_the_bf16_model():
    bf16 = tiny_dit("i2v", num_layers=2).to(torch.bfloat16)
    fp8 = quantize_fp8(tiny_dit("i2v", num_layers=2).to(torch.bfloat16))
    args, kw = memento_inputs(bf16)
    with torch.no_grad():
        reference = bf16(*args, **kw)
        assert set_fp8_compute(fp8, "dequant") is None
        dequant = fp8(*args, **kw)
        assert set_fp8_compute(fp8, "scaled_mm") is None
        assert all(m.scaled_mm for m in fp8.modules() if isinstance(m, Fp8Linear))
        fast = fp8(*args, **kw)
    assert rel(dequant, reference) < 0.08
    assert rel(fast, reference) < 0.1
    assert rel(fast, dequant) < 0.06


def test_auto_fp8_compute_keeps_dequantising_without_fp8_tensor_cores():
    fp8 = quantize_fp8(tiny_dit("i2v").to(torch.bfloat16))
    assert set_fp8_compute(fp8, "auto") is None
    assert not any(m.scaled_mm for m in fp8.modules() if isinstance(m, Fp8Linear))
    with pytest.raises(MementoError, match="fp8_compute: expected one of"):
        set_fp8_compute(fp8, "int8")


# --- torch.compile ---------------------------------------------------------------------------------


def test_compiled_blocks_give_the_eager_outputs():
    torch._dynamo.reset()
    model = tiny_dit("i2v", num_layers=1)
    args, kw = memento_inputs(model)
    with torch.no_grad():
        eager = model(*args, **kw)
        compile_blocks(model)
        assert is_compiled(model)
        compiled = model(*args, **kw)
        uncompile_blocks(model)
        assert not is_compiled(model)
        assert torch.equal(model(*args, **kw), eager)
    assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-5)
    assert set(model.state_dict()) == set(tiny_dit("i2v", num_layers=1).state_dict())


def test_compiled_blocks_keep_block_swap_hooks_working():
    torch._dynamo.reset()
    model = tiny_dit("i2v", num_layers=2)
    args, kw = memento_inputs(model)
    moves = []

    def mover(module, device):
        moves.append((list(model.blocks).index(module), str(device)))

    with torch.no_grad():
        eager = model(*args, **kw)
        compile_blocks(model, backend="eager")
        with BlockSwap(list(model.blocks), "cpu", "cpu", mover=mover, prefetch=False).attached():
            out = model(*args, **kw)
    assert moves == [(0, "cpu"), (0, "cpu"), (1, "cpu"), (1, "cpu")]
    assert torch.allclose(out, eager, atol=1e-6)


# --- the switch ------------------------------------------------------------------------------------


def test_fast_paths_validate_and_report(loaders):
    with pytest.raises(MementoError, match="fp8_compute"):
        FastPaths(fp8_compute="fast")
    with pytest.raises(MementoError, match="compile"):
        FastPaths(compile="yes")
    model = tiny_dit("i2v").to(torch.bfloat16)
    notices = apply_fast_paths(model, FastPaths(attention="flash", compile=False), "cpu")
    assert model.attention is SDPA and len(notices) == 1 and "flash" in notices[0]
    loaders["flash"] = lambda: naive_attention
    attention.clear_cache()
    assert apply_fast_paths(model, FastPaths(attention="flash"), "cpu") == []
    assert model.attention.name == "flash"


# --- model config and command line ---------------------------------------------------------------


def test_model_config_fast_path_fields(tmp_path):
    import json

    from memento_core.real_models import ModelConfig, ModelConfigError, load_model_config

    paths = {k: str(tmp_path) for k in ("i2v_high", "i2v_low", "memento_high", "memento_low")}
    paths |= {k: str(tmp_path) for k in ("text_encoder", "tokenizer", "vae")}
    for extra, needle in [
        ({"attention": "xformers"}, "field 'attention': expected one of auto, sdpa, sage, flash"),
        ({"fp8_compute": "int8"}, "field 'fp8_compute'"),
        ({"compile": "yes"}, "field 'compile': expected true or false"),
    ]:
        (tmp_path / "m.json").write_text(json.dumps(paths | extra))
        with pytest.raises(ModelConfigError, match=extra and needle):
            load_model_config(tmp_path / "m.json")
    (tmp_path / "m.json").write_text(json.dumps(paths | {"attention": "sage", "compile": True}))
    config = load_model_config(tmp_path / "m.json")
    assert config.fast_paths == FastPaths(attention="sage", fp8_compute="auto", compile=True)
    # speed options never block a resume: they are not in the facts resume checks compare
    assert config.describe() == ModelConfig(**paths, source=config.source).describe()


def test_command_line_attention_reaches_the_experts(tmp_path, caplog, loaders, monkeypatch):
    import json

    from memento_core import models as models_module
    from memento_core.cli import cli

    seen = []
    real_apply = models_module.apply_to_experts

    def spy(experts, paths, device=None):
        seen.append(paths)
        return real_apply(experts, paths, device)

    monkeypatch.setattr(models_module, "apply_to_experts", spy)
    story = tmp_path / "story.json"
    story.write_text(
        json.dumps(
            {
                "story_name": "s",
                "scenes": [{"scene_num": 1, "video_prompts": ["a", "b"], "cut": [True, True]}],
            }
        )
    )
    small = ["--width", "32", "--height", "32", "--frames", "9", "--steps", "2", "-q", "--tiny"]
    with caplog.at_level("WARNING", logger="memento"):
        assert cli([str(story), "--out", str(tmp_path / "run"), *small, "--attention", "flash"]) == 0
    assert seen and all(p.attention == "flash" and not p.compile for p in seen)
    assert "attention flash: using SDPA: flash is not installed" in caplog.text
