"""LoRA parsing and merging: parity with PEFT (rsLoRA and plain), ComfyUI / kohya / diffusers layouts,
strength, unmatched keys, readable errors, bf16 weights."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file

from memento_core.errors import CheckpointError, MementoError
from memento_core.lora import (
    LoraError,
    load_lora,
    lora_scale,
    merge_lora,
    normalize_lora_key,
    parse_lora,
)
from memento_core.tiny import tiny_dit

TARGETS = [
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
    "ffn.0", "ffn.2",
]  # fmt: skip


@pytest.fixture(scope="module")
def base():
    return tiny_dit("i2v", seed=3)


@pytest.fixture(scope="module")
def inputs(base):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    y = torch.randn(1, 20, 2, 4, 4, generator=g)
    ctx = torch.randn(1, 7, base.config.text_dim, generator=g)
    return x, torch.tensor([600.0]), ctx, y


def forward(model, inputs):
    x, t, ctx, y = inputs
    with torch.no_grad():
        return model(x, t, ctx, y=y)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def peft_model(base, r: int, alpha: float, rs: bool, seed: int = 0):
    """A PEFT-wrapped copy of ``base`` with random (non-zero) A and B of a realistic size."""
    cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rs, target_modules=TARGETS, init_lora_weights=False)
    pm = get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 / math.sqrt(p.shape[1]) / cfg.lora_alpha)
    return pm.eval()


def write_peft(folder: Path, pm, *, variant: str = "plain", config: bool = True) -> Path:
    """The PEFT layout: ``base_model.model.…lora_{A,B}.weight`` (+ ``adapter_config.json``)."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = get_peft_model_state_dict(pm)
    if variant == "default":
        sd = {k.replace(".weight", ".default.weight"): v for k, v in sd.items()}
    elif variant == "low_noise":
        sd = {f"low_noise_model.{k}": v for k, v in sd.items()}
    path = folder / "lora.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    if config:
        cfg = pm.peft_config["default"]
        data = {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "use_rslora": cfg.use_rslora, "peft_type": "LORA"}
        (folder / "adapter_config.json").write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------------------------------------
# Parity with PEFT


@pytest.mark.parametrize("variant", ["plain", "default", "low_noise"])
def test_merge_matches_peft_rslora(tmp_path, base, inputs, variant):
    pm = peft_model(base, r=8, alpha=16, rs=True)
    path = write_peft(tmp_path, pm, variant=variant)
    ours = copy.deepcopy(base)
    report = merge_lora(ours, path)
    assert report.layout == "peft"
    assert report.num_matched == len(TARGETS) * base.config.num_layers
    assert report.unmatched_keys == ()
    assert set(report.scales.values()) == {16 / math.sqrt(8)}
    err_fwd = rel_err(forward(ours, inputs), forward(pm, inputs))
    merged = copy.deepcopy(pm).merge_and_unload().state_dict()
    err_w = max(rel_err(v, merged[k]) for k, v in ours.state_dict().items())
    print(f"\n[{variant}] PEFT parity (rsLoRA r=8 a=16): forward {err_fwd:.2e}, weights {err_w:.2e}")
    assert err_fwd < 1e-5
    assert err_w < 1e-6


def test_merge_matches_peft_without_rslora(tmp_path, base, inputs):
    pm = peft_model(base, r=8, alpha=16, rs=False, seed=1)
    path = write_peft(tmp_path, pm)
    ours = copy.deepcopy(base)
    report = merge_lora(ours, path)
    assert set(report.scales.values()) == {2.0}  # alpha / r
    assert "alpha/r" in report.scale_rule and "adapter_config.json" in report.scale_rule
    err_fwd = rel_err(forward(ours, inputs), forward(pm, inputs))
    print(f"\n[no rsLoRA] PEFT parity forward {err_fwd:.2e}")
    assert err_fwd < 1e-5


def test_peft_file_without_config_uses_memento_convention(tmp_path, base, inputs):
    """No adapter config: alpha = r (from the shapes) and rsLoRA, as Memento / StoryMem train."""
    pm = peft_model(base, r=8, alpha=8, rs=True, seed=2)
    path = write_peft(tmp_path, pm, config=False)
    lora = load_lora(path)
    assert lora.rule.use_rslora and lora.rule.alpha_is_rank
    assert "Memento" in lora.rule.describe()
    ours = copy.deepcopy(base)
    report = merge_lora(ours, lora)
    assert set(report.scales.values()) == {8 / math.sqrt(8)}
    assert rel_err(forward(ours, inputs), forward(pm, inputs)) < 1e-5


def test_rslora_scale_rank128():
    assert lora_scale(128, 128, use_rslora=True) == 128 / math.sqrt(128)
    assert lora_scale(128, 128, use_rslora=True) == pytest.approx(11.3137, abs=5e-5)
    assert lora_scale(128, 128, use_rslora=False) == 1.0


@pytest.mark.parametrize("config", [None, {"r": 128, "lora_alpha": 128, "use_rslora": True}])
def test_rank128_file_scale(tmp_path, base, config):
    """A rank-128 PEFT file (the released shape) gets 11.3137 with or without its config."""
    down, up = low_rank(base.config.dim, base.config.dim, 128, seed=3)
    sd = {
        "base_model.model.blocks.0.self_attn.q.lora_A.weight": down,
        "base_model.model.blocks.0.self_attn.q.lora_B.weight": up,
    }
    save_file(sd, tmp_path / "backbone_low_noise.safetensors")
    if config:
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    lora = load_lora(tmp_path / "backbone_low_noise.safetensors")
    assert lora.scale("blocks.0.self_attn.q") == pytest.approx(11.3137, abs=5e-5)
    model = copy.deepcopy(base)
    w0 = model.blocks[0].self_attn.q.weight.clone()
    merge_lora(model, lora)
    expect = w0.double() + (128 / math.sqrt(128)) * (up.double() @ down.double())
    assert rel_err(model.blocks[0].self_attn.q.weight, expect) < 1e-6


def test_config_json_without_lora_fields_is_ignored(tmp_path, base):
    """Memento ships a config.json beside the weights; only PEFT LoRA fields in it count."""
    pm = peft_model(base, r=4, alpha=4, rs=True)
    path = write_peft(tmp_path, pm, config=False)
    (tmp_path / "config.json").write_text(json.dumps({"dim": 5120, "num_layers": 40}))
    assert load_lora(path).rule.alpha_is_rank
    (tmp_path / "config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    rule = load_lora(path).rule
    assert rule.alpha == 8 and rule.use_rslora  # no use_rslora field in a plain config.json: keep rsLoRA


def test_peft_save_pretrained_folder(tmp_path, base, inputs):
    pm = peft_model(base, r=4, alpha=8, rs=True, seed=4)
    pm.save_pretrained(tmp_path / "adapter")
    ours = copy.deepcopy(base)
    report = merge_lora(ours, load_lora(tmp_path / "adapter"))
    assert set(report.scales.values()) == {8 / 2}
    assert rel_err(forward(ours, inputs), forward(pm, inputs)) < 1e-5


# ------------------------------------------------------------------------------------------------
# Other layouts


def low_rank(out: int, inp: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, inp, generator=g) * 0.1, torch.randn(out, r, generator=g) * 0.1


@pytest.mark.parametrize("layout", ["comfy", "kohya", "comfy_lora_ab"])
def test_alpha_layouts_match_hand_merge(base, layout):
    dim, ffn = base.config.dim, base.config.ffn_dim
    mods = {
        "blocks.0.self_attn.q": (dim, dim),
        "blocks.1.cross_attn.o": (dim, dim),
        "blocks.1.ffn.0": (ffn, dim),
    }
    sd, expected = {}, {}
    params = dict(base.named_parameters())
    for i, (name, (out, inp)) in enumerate(mods.items()):
        down, up = low_rank(out, inp, 4, seed=i)
        alpha = 2.0 + i
        if layout == "kohya":
            stem = "lora_unet_" + name.replace(".", "_")
        else:
            stem = f"diffusion_model.{name}"
        a, b = ("lora_A", "lora_B") if layout == "comfy_lora_ab" else ("lora_down", "lora_up")
        sd[f"{stem}.{a}.weight"], sd[f"{stem}.{b}.weight"] = down, up
        sd[f"{stem}.alpha"] = torch.tensor(alpha)
        expected[name] = params[f"{name}.weight"].double() + (alpha / 4) * (up.double() @ down.double())
    lora = parse_lora(sd)
    assert lora.layout == ("kohya" if layout == "kohya" else "comfy")
    model = copy.deepcopy(base)
    report = merge_lora(model, lora)
    assert set(report.matched) == set(mods)
    got = dict(model.named_parameters())
    for name, want in expected.items():
        assert rel_err(got[f"{name}.weight"], want) < 1e-6, name
    assert report.scales["blocks.0.self_attn.q"] == 2.0 / 4


def test_no_alpha_comfy_is_scale_one_and_strength(base):
    dim = base.config.dim
    down, up = low_rank(dim, dim, 8, seed=9)
    sd = {
        "diffusion_model.blocks.0.self_attn.k.lora_down.weight": down,
        "diffusion_model.blocks.0.self_attn.k.lora_up.weight": up,
    }
    model = copy.deepcopy(base)
    w0 = model.blocks[0].self_attn.k.weight.double().clone()
    report = merge_lora(model, sd, strength=0.5)
    assert report.scales == {"blocks.0.self_attn.k": 1.0}
    assert rel_err(model.blocks[0].self_attn.k.weight, w0 + 0.5 * up.double() @ down.double()) < 1e-6


def test_strength_half_on_rslora_file(tmp_path, base):
    pm = peft_model(base, r=8, alpha=8, rs=True, seed=5)
    path = write_peft(tmp_path, pm)
    full, half = copy.deepcopy(base), copy.deepcopy(base)
    merge_lora(full, path, 1.0)
    merge_lora(half, path, 0.5)
    w0 = base.blocks[1].ffn[2].weight.double()
    d_full = full.blocks[1].ffn[2].weight.double() - w0
    d_half = half.blocks[1].ffn[2].weight.double() - w0
    assert rel_err(2 * d_half, d_full) < 1e-5


@pytest.mark.parametrize("style", ["dotted", "kohya"])
def test_diffusers_layout(base, style):
    dim, ffn = base.config.dim, base.config.ffn_dim
    names = {
        "transformer.blocks.0.attn1.to_out.0": ("blocks.0.self_attn.o", dim, dim),
        "transformer.blocks.1.attn2.to_k": ("blocks.1.cross_attn.k", dim, dim),
        "transformer.blocks.0.ffn.net.0.proj": ("blocks.0.ffn.0", ffn, dim),
        "transformer.blocks.1.ffn.net.2": ("blocks.1.ffn.2", dim, ffn),
    }
    sd = {}
    for i, (src, (_, out, inp)) in enumerate(names.items()):
        down, up = low_rank(out, inp, 2, seed=i)
        if style == "kohya":  # lora_transformer_blocks_0_attn1_to_out_0.lora_down.weight
            stem = "lora_" + src.replace(".", "_")
            sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = down, up
        else:
            sd[f"{src}.lora_A.weight"], sd[f"{src}.lora_B.weight"] = down, up
    model = copy.deepcopy(base)
    report = merge_lora(model, sd)
    assert report.layout == ("diffusers" if style == "dotted" else "kohya")
    assert report.unmatched_keys == ()
    assert set(report.matched) == {v[0] for v in names.values()}


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("base_model.model.blocks.3.cross_attn.v.lora_A.weight", ("blocks.3.cross_attn.v", "down")),
        ("high_noise_model.base_model.model.blocks.0.ffn.2.lora_B.default.weight", ("blocks.0.ffn.2", "up")),
        ("model.diffusion_model.blocks.1.self_attn.o.lora_up.weight", ("blocks.1.self_attn.o", "up")),
        ("lora_unet_blocks_12_cross_attn_k.alpha", ("blocks.12.cross_attn.k", "alpha")),
        ("lora_unet__blocks_0_self_attn_norm_q.diff", ("blocks.0.self_attn.norm_q", "diff")),
        ("lora_unet_time_projection_1.diff_b", ("time_projection.1", "diff_b")),
        (
            "base_model.model.keyframe_query.query_to_text.q.weight",
            ("keyframe_query.query_to_text.q.weight", None),
        ),
    ],
)
def test_normalize_keys(key, expected):
    assert normalize_lora_key(key) == expected


def test_diff_keys_update_norms_and_biases(base):
    dim = base.config.dim
    g = torch.Generator().manual_seed(0)
    d_norm, d_bias = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    d_mod = torch.randn(1, 6, dim, generator=g)
    sd = {
        "diffusion_model.blocks.0.norm3.diff": d_norm,
        "diffusion_model.blocks.0.self_attn.q.diff_b": d_bias,
        "diffusion_model.blocks.1.modulation.diff": d_mod,
    }
    model = copy.deepcopy(base)
    report = merge_lora(model, sd, strength=0.25)
    assert set(report.matched) == {"blocks.0.norm3", "blocks.0.self_attn.q", "blocks.1.modulation"}
    assert torch.allclose(model.blocks[0].norm3.weight, base.blocks[0].norm3.weight + 0.25 * d_norm)
    assert torch.allclose(model.blocks[0].self_attn.q.bias, base.blocks[0].self_attn.q.bias + 0.25 * d_bias)
    assert torch.allclose(model.blocks[1].modulation, base.blocks[1].modulation + 0.25 * d_mod)


# ------------------------------------------------------------------------------------------------
# Reports and errors


def test_unmatched_keys_are_reported(tmp_path, base):
    pm = peft_model(base, r=4, alpha=4, rs=True)
    sd = dict(get_peft_model_state_dict(pm))
    dim = base.config.dim
    extra = {
        "base_model.model.blocks.7.self_attn.q.lora_A.weight": torch.zeros(4, dim),  # no block 7
        "base_model.model.blocks.7.self_attn.q.lora_B.weight": torch.zeros(dim, 4),
        "base_model.model.blocks.0.self_attn.q.lora_magnitude_vector": torch.zeros(dim),  # DoRA: unsupported
    }
    sd.update(extra)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "l.safetensors")
    model = copy.deepcopy(base)
    report = merge_lora(model, tmp_path / "l.safetensors")
    assert report.num_matched == len(TARGETS) * base.config.num_layers
    assert set(extra) <= set(report.unmatched_keys)
    assert "matched nothing" in report.summary()


def test_incomplete_pair_is_reported(base):
    dim = base.config.dim
    down, up = low_rank(dim, dim, 2, seed=0)
    sd = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": down,
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up,
        "diffusion_model.blocks.0.self_attn.k.lora_down.weight": down,  # its up is missing
    }
    report = merge_lora(copy.deepcopy(base), sd)
    assert report.matched == ("blocks.0.self_attn.q",)
    assert report.unmatched_keys == ("diffusion_model.blocks.0.self_attn.k.lora_down.weight",)


def test_lora_for_another_architecture_raises(tmp_path, base):
    sd = {
        "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
        "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4),
    }
    path = tmp_path / "flux_lora.safetensors"
    save_file(sd, path)
    model = copy.deepcopy(base)
    with pytest.raises(LoraError, match="another architecture") as info:
        merge_lora(model, path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, MementoError) and isinstance(info.value, CheckpointError)


def test_full_model_instead_of_lora_raises(tmp_path, base):
    save_file({k: v.contiguous() for k, v in list(base.state_dict().items())[:4]}, tmp_path / "m.safetensors")
    with pytest.raises(LoraError, match="no LoRA tensors"):
        merge_lora(copy.deepcopy(base), tmp_path / "m.safetensors")


def test_shape_mismatch_raises_and_changes_nothing(base):
    dim = base.config.dim
    sd = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(4, dim),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.ones(dim, 4),
        "diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.ones(4, dim + 1),
        "diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.ones(base.config.ffn_dim, 4),
    }
    model = copy.deepcopy(base)
    with pytest.raises(LoraError, match="do not fit") as info:
        merge_lora(model, sd)
    assert "blocks.0.ffn.0.weight" in str(info.value)
    assert torch.equal(model.blocks[0].self_attn.q.weight, base.blocks[0].self_attn.q.weight)


@pytest.mark.parametrize("kind", ["pickle", "truncated", "text"])
def test_bad_files_raise_readable_errors(tmp_path, kind):
    if kind == "pickle":
        path = tmp_path / "lora.pt"
        path.write_bytes(b"\x80\x04junk")
    elif kind == "truncated":
        path = tmp_path / "lora.safetensors"
        save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(4, 64)}, path)
        path.write_bytes(path.read_bytes()[:-100])
    else:
        path = tmp_path / "lora.safetensors"
        path.write_text("not a tensor file")
    with pytest.raises(CheckpointError) as info:
        load_lora(path)
    assert str(path) in str(info.value)


def test_merge_in_bf16_keeps_bf16(tmp_path, base, inputs):
    pm = peft_model(base, r=8, alpha=8, rs=True, seed=7)
    path = write_peft(tmp_path, pm)
    model = copy.deepcopy(base).to(torch.bfloat16)
    w0 = model.blocks[0].cross_attn.v.weight.clone()
    report = merge_lora(model, path)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    lora = load_lora(path)
    mod = lora.module("blocks.0.cross_attn.v")
    expect = w0.double() + mod.delta().double()
    got = model.blocks[0].cross_attn.v.weight.double()
    assert torch.all((got - expect).abs() <= expect.abs() * 2**-8 + 1e-30)  # rounded once to bf16
    assert report.scales["blocks.0.cross_attn.v"] == pytest.approx(math.sqrt(8))
    ref = copy.deepcopy(pm).merge_and_unload()
    err = rel_err(forward(model.float(), inputs), forward(ref, inputs))
    print(f"\n[bf16] forward vs PEFT fp32 merge: {err:.2e}")
    assert err < 3e-2


def test_explicit_scale_override(tmp_path, base):
    pm = peft_model(base, r=4, alpha=4, rs=True)
    lora = load_lora(write_peft(tmp_path, pm)).with_scale(alpha=2.0, use_rslora=False)
    assert lora.scale("blocks.0.ffn.0") == 0.5
    assert "overridden" in lora.rule.describe()
    assert load_lora(tmp_path / "lora.safetensors", use_rslora=False).scale("blocks.0.ffn.0") == 1.0


def test_file_with_both_experts_raises(base):
    dim = base.config.dim
    sd = {
        f"{e}.base_model.model.blocks.0.self_attn.q.lora_{p}.default.weight": torch.zeros(4, dim)
        for e in ("low_noise_model", "high_noise_model")
        for p in "AB"
    }
    with pytest.raises(LoraError, match="both experts"):
        parse_lora(sd)
