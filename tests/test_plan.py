"""The memory plan (``python -m memento_core.plan``): its estimator against real forwards measured by
``memento_core.memtrack`` on the CPU, exact weight bytes, the A14B numbers and the command line."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from memento_core.dit import DiTConfig, WanDiT
from memento_core.fp8 import quantize_fp8
from memento_core.memtrack import MemoryTracker
from memento_core.plan import (
    MARGIN_BYTES,
    MARGIN_FRACTION,
    activation_bytes,
    expert_weight_bytes,
    kfq_bytes,
    main,
    make_plan,
    shot_tokens,
)
from memento_core.tiny import random_state_dict, tiny_dit

#: The estimator's activation peak must be within this of the measured one.
TOLERANCE = 0.05
ARGS = ["--vram-gb", "24", "--width", "832", "--height", "480", "--frames", "81"]
RANK = {"none": 0, "swap_experts": 1, "block_swap": 2}


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def custom_dit(ffn_mult: int) -> WanDiT:
    cfg = DiTConfig(dim=256, ffn_dim=ffn_mult * 256, num_heads=2, num_layers=2, in_dim=36, text_dim=64)
    model = WanDiT(cfg)
    model.load_state_dict(random_state_dict(cfg, seed=3))
    return model.eval()


def measure(model: WanDiT, f: int, h: int, w: int, n_id: int, n_mem: int) -> tuple[int, int]:
    """-> (tokens, peak bytes one forward allocated above its inputs and weights)."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, f, h, w, generator=g)
    y = torch.randn(1, cfg.cond_dim, f, h, w, generator=g)
    ctx = torch.randn(1, 20, cfg.text_dim, generator=g)
    ctx_id = torch.randn(1, 7, cfg.text_dim, generator=g)
    with torch.no_grad(), MemoryTracker() as tracker:
        out = model(
            x, torch.tensor([700.0]), ctx, y=y, n_identity=n_id, n_memory=n_mem, context_identity=ctx_id
        )
    assert torch.isfinite(out).all()
    return f * h * w // 4, tracker.peak


def test_tracker_counts_storages_once_and_frees_them():
    with MemoryTracker() as t:
        a = torch.empty(1000)  # 4000 bytes
        _ = a.view(10, 100)  # a view: no new bytes
        b = torch.empty(500, dtype=torch.int32)  # 2000
        del b
        c = torch.empty(2000, dtype=torch.float64)  # 16000
    assert (t.peak, t.live) == (20000, 20000)
    del a, c


@functools.lru_cache(maxsize=1)
def _models() -> dict[str, WanDiT]:
    bf16 = tiny_dit("i2v", dim=256, num_layers=2, seed=1).to(torch.bfloat16)
    return {
        "bf16": bf16,
        "fp8": quantize_fp8(tiny_dit("i2v", dim=512, num_layers=2, seed=2).to(torch.bfloat16)),
        "bf16_ffn8x": custom_dit(8).to(torch.bfloat16),
    }


@pytest.mark.parametrize("name", ["bf16", "fp8", "bf16_ffn8x"])
@pytest.mark.parametrize(
    "shape,segments", [((6, 32, 32), (0, 0)), ((6, 64, 64), (1, 2)), ((10, 64, 64), (1, 4))]
)
def test_activation_estimate_matches_a_measured_forward(name, shape, segments):
    model = _models()[name]
    tokens, measured = measure(model, *shape, *segments)
    volume = shape[0] * shape[1] * shape[2]
    dtype = "fp8" if name == "fp8" else "bf16"
    estimate = activation_bytes(model.config, tokens, volume, dtype, identity=segments[0] > 0)
    print(f"{name} L={tokens} measured={measured} estimated={estimate} ({estimate / measured - 1:+.2%})")
    assert abs(estimate - measured) <= TOLERANCE * measured, (name, tokens, measured, estimate)


@pytest.mark.parametrize("dim,layers", [(256, 2), (512, 3)])
def test_weight_bytes_are_the_parameter_bytes(dim, layers):
    model = tiny_dit("i2v", dim=dim, num_layers=layers).to(torch.bfloat16)
    other, block = expert_weight_bytes(model.config, "bf16")
    assert other + layers * block == param_bytes(model)
    assert block == param_bytes(model.blocks[0])
    other, block = expert_weight_bytes(model.config, "fp8")
    quantize_fp8(model)
    assert other + layers * block == param_bytes(model) and block == param_bytes(model.blocks[0])


def test_a14b_sizes_from_meta_shapes():
    with torch.device("meta"):
        model = WanDiT(DiTConfig()).to(torch.bfloat16)
    real_bf16 = param_bytes(model)
    other, block = expert_weight_bytes(DiTConfig(), "bf16")
    assert other + 40 * block == real_bf16 and 28.5e9 < real_bf16 < 28.7e9
    quantize_fp8(model)
    other, block = expert_weight_bytes(DiTConfig(), "fp8")
    assert other + 40 * block == param_bytes(model) and 14.3e9 < param_bytes(model) < 15.0e9
    assert shot_tokens(832, 480, 81) == 46_800
    assert shot_tokens(832, 480, 81, memory_frames=0, identity=False) == 32_760


def test_a14b_modes_by_hand():
    """832x480x81 Memento shot (L = 46,800) by hand: the cross-attention moment 28·L·d bytes is the
    activation peak; sampling, not the VAE decode, is the peak phase."""
    cfg = DiTConfig()
    tokens = 46_800
    act = 28 * tokens * 5120 + 36 * 4 * tokens * 4 + 4 * tokens * 128 + 2 * 512 * 5120 * 2 + 4 * 7 * 5120
    assert activation_bytes(cfg, tokens, 4 * tokens) == act
    other, block = expert_weight_bytes(cfg, "bf16")
    expert = other + 40 * block + kfq_bytes(cfg)
    rest = act + 3 * 512 * 4096 * 4 + (36 + 96) * 4 * tokens * 4  # text context, latents

    def peak(weights: int) -> float:
        total = weights + rest
        return (total + MARGIN_BYTES + MARGIN_FRACTION * total) / 1e9

    none = peak(2 * expert)  # 57.996 + 6.770 + 0.126 + margin 4.245 = 69.14
    assert 69.0 < none < 69.3
    plan = make_plan(80, 832, 480, 81)
    assert (plan.mode, plan.swap_blocks, plan.fits) == ("none", 0, True)
    assert plan.predicted_peak_gb == round(none, 2) and plan.peak_phase == "sampling"
    plan = make_plan(48, 832, 480, 81)
    assert (plan.mode, plan.predicted_peak_gb) == ("swap_experts", round(peak(expert), 2))  # 38.69
    # 24 GB bf16: the smallest n with expert - n·block + 2·block fitting
    n = next(n for n in range(3, 41) if peak(expert - (n - 2) * block) <= 24)
    plan = make_plan(24, 832, 480, 81)
    assert (plan.mode, plan.swap_blocks, plan.fits) == ("block_swap", n, True) and n == 22
    assert make_plan(24, 832, 480, 81, "fp8").mode == "swap_experts"
    assert make_plan(48, 832, 480, 81, "fp8").mode == "none"
    small = make_plan(10, 832, 480, 81)  # all blocks swapped: 10.65 GB in bf16, 9.9 in fp8
    assert (small.mode, small.swap_blocks, small.fits) == ("block_swap", 40, False) and "fp8" in small.message
    assert "with 21 frames would" in make_plan(8, 832, 480, 81).message


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_more_vram_never_plans_slower(dtype):
    previous, previous_fits = None, False
    for vram in range(4, 161, 2):
        plan = make_plan(vram, 832, 480, 81, dtype)
        key = (RANK[plan.mode], plan.swap_blocks)
        if previous is not None:
            assert key[0] <= previous[0] and (key[0] < previous[0] or key[1] <= previous[1]), vram
            assert plan.fits or not previous_fits
        previous, previous_fits = key, plan.fits


def test_json_is_one_object(capsys):
    assert main([*ARGS, "--json"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    assert out.strip().count("\n") == 0 and isinstance(data["swap_blocks"], int)
    assert {"mode", "swap_blocks", "dtype", "predicted_peak_gb", "fits"} <= set(data)
    assert data["mode"] == "block_swap" and data["dtype"] == "bf16" and data["fits"] is True
    assert main([*ARGS, "--dtype", "fp8"]) == 0
    text = capsys.readouterr().out
    assert "mode: swap_experts" in text and "text encoder:" in text and "fits: yes" in text


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--vram-gb", "0"], "--vram-gb"),
        (["--vram-gb", "nan"], "--vram-gb"),
        (["--width", "830"], "multiples of 16"),
        (["--height", "-16"], "multiples of 16"),
        (["--frames", "80"], "4n+1"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(args, needle, capsys):
    base = {"--vram-gb": "24", "--width": "832", "--height": "480", "--frames": "81"}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    assert main([s for kv in base.items() for s in kv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err
    assert main([*ARGS, "--dtype", "fp4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "fp4" in err


def test_block_swap_in_the_runner_moves_blocks_and_changes_nothing(tmp_path):
    """models.swap_blocks = 1: the last block of the active expert is moved in for its forward and back
    after it (the mover is recorded); the latents equal those of a plain run."""
    from pathlib import Path

    from safetensors.torch import load_file

    from memento_core.models import tiny_models
    from memento_core.offload import BlockSwap
    from memento_core.runner import Progress, RunSettings, render_story
    from memento_core.story import load_story

    story = load_story(Path(__file__).resolve().parents[1] / "example_stories" / "lighthouse_keeper.json")
    settings = RunSettings(width=64, height=32, frames=17, steps=2, seed=7, first_shot="empty", max_shots=1)
    moves: list[str] = []
    original = BlockSwap.__init__

    def recording(self, blocks, device, offload_device, mover=None, prefetch=True):
        def mover_(module, dev):
            moves.append(str(dev))
            module.to(dev)

        original(self, blocks, device, offload_device, mover_, prefetch)

    models = tiny_models()
    models.swap_experts, models.swap_blocks = True, 1
    BlockSwap.__init__ = recording
    try:
        render_story(story, models, settings, tmp_path / "swap", progress=Progress(1, enabled=False))
    finally:
        BlockSwap.__init__ = original
    # (on the CPU test machine device and offload device are both "cpu"): one in, one out per forward
    assert moves and len(moves) % 2 == 0
    render_story(story, tiny_models(), settings, tmp_path / "plain", progress=Progress(1, enabled=False))
    a = load_file(str(tmp_path / "swap" / "state" / "shot_01_01.safetensors"))["latent"]
    b = load_file(str(tmp_path / "plain" / "state" / "shot_01_01.safetensors"))["latent"]
    assert torch.equal(a, b)


def test_offload_fields_of_the_model_config(tmp_path):
    from memento_core.real_models import ModelConfig, ModelConfigError, load_model_config, resolve_offload

    paths = {k: str(tmp_path) for k in ("i2v_high", "i2v_low", "memento_high", "memento_low")}
    paths.update({k: str(tmp_path) for k in ("text_encoder", "tokenizer", "vae")})
    for extra, needle in [
        ({"offload": "block_swap"}, "swap_blocks"),
        ({"offload": "block_swap", "swap_blocks": 0}, "swap_blocks"),
        ({"offload": "swap_experts", "swap_blocks": 3}, "only with offload 'block_swap'"),
        ({"offload": "sometimes"}, "auto"),
    ]:
        (tmp_path / "m.json").write_text(json.dumps({**paths, **extra}))
        with pytest.raises(ModelConfigError, match=needle):
            load_model_config(tmp_path / "m.json")
    (tmp_path / "m.json").write_text(json.dumps({**paths, "offload": "block_swap", "swap_blocks": 12}))
    config = load_model_config(tmp_path / "m.json")
    assert resolve_offload(config) == ("block_swap", 12, "cuda")
    assert "swap_blocks" not in ModelConfig(**paths).describe()
    cpu = ModelConfig(**paths, device="cpu", offload="auto")
    assert resolve_offload(cpu, 832, 480, 81) == ("none", 0, "cpu")  # no GPU: auto means none
