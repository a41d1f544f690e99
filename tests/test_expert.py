"""load_memento_expert: base I2V expert + released-style Memento file (PEFT LoRA + KeyframeQuery)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_comfy_models import kfq_tensors

from memento_core.errors import CheckpointError
from memento_core.expert import MementoExpert, load_memento_expert, load_memento_expert_report
from memento_core.lora import LoraError
from memento_core.tiny import random_state_dict, tiny_config

RANK = 16
TARGETS = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
    "ffn.0", "ffn.2",
)  # fmt: skip


def lora_tensors(cfg, seed: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module path -> (A [r, in], B [out, r]) for every target of every block."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"ffn.0": (cfg.ffn_dim, cfg.dim), "ffn.2": (cfg.dim, cfg.ffn_dim)}
    out = {}
    for n in range(cfg.num_layers):
        for t in TARGETS:
            o, i = shapes.get(t, (cfg.dim, cfg.dim))
            a = torch.randn(RANK, i, generator=g) / math.sqrt(i)
            b = torch.randn(o, RANK, generator=g) * 0.05 / math.sqrt(RANK)
            out[f"blocks.{n}.{t}"] = (a, b)
    return out


def write_memento(path: Path, lora, kfq, *, wrapper: str = "", kfq_prefix: str = "base_model.model.") -> Path:
    sd = {}
    for name, (a, b) in lora.items():
        sd[f"{wrapper}base_model.model.{name}.lora_A.weight"] = a
        sd[f"{wrapper}base_model.model.{name}.lora_B.weight"] = b
    for name, t in (kfq or {}).items():
        sd[f"{wrapper}{kfq_prefix}keyframe_query.{name}"] = t
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, path)  # released in bf16
    return path


def hand_merge(base_sd, loras, dtype=torch.float32):
    """Independent reference: W' = W + Σ strength · scale · B @ A (float64), then the weight dtype."""
    out = {k: v.to(dtype).double() for k, v in base_sd.items()}
    for lora, scale, strength in loras:
        for name, (a, b) in lora.items():
            out[f"{name}.weight"] += strength * scale * (b.double() @ a.double())
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("expert")
    cfg = tiny_config("i2v")
    base_sd = random_state_dict(cfg, seed=11)
    save_file({f"model.diffusion_model.{k}": v for k, v in base_sd.items()}, root / "i2v.safetensors")
    t2v_sd = random_state_dict(tiny_config("t2v"), seed=12)
    save_file({f"model.diffusion_model.{k}": v for k, v in t2v_sd.items()}, root / "t2v.safetensors")
    # what the file holds after the bf16 round trip
    lora = {k: (a.bfloat16().float(), b.bfloat16().float()) for k, (a, b) in lora_tensors(cfg).items()}
    kfq = {k: v.bfloat16().float() for k, v in kfq_tensors(cfg.dim).items()}
    (root / "rel").mkdir()
    memento = write_memento(root / "rel" / "backbone_low_noise.safetensors", lora, kfq)
    return {"root": root, "cfg": cfg, "base_sd": base_sd, "lora": lora, "kfq": kfq, "memento": memento}


def max_rel(model, expected) -> float:
    sd = model.state_dict()
    return max(float((sd[k].double() - v).abs().max() / v.abs().max()) for k, v in expected.items())


def test_loads_base_plus_merged_lora_and_kfq(files):
    dit, kfq = load_memento_expert(files["root"] / "i2v.safetensors", files["memento"])
    expected = hand_merge(files["base_sd"], [(files["lora"], RANK / math.sqrt(RANK), 1.0)])
    assert max_rel(dit, expected) < 1e-6
    assert kfq is not None
    state = kfq.state_dict()
    assert set(state) == set(files["kfq"])
    for name, t in files["kfq"].items():
        assert torch.equal(state[name], t), name
    assert kfq.num_heads == dit.config.num_heads
    assert not any(p.requires_grad for p in dit.parameters())


@pytest.mark.parametrize(
    ("wrapper", "kfq_prefix"), [("low_noise_model.", "base_model.model."), ("high_noise_model.", "")]
)
def test_prefix_variants(files, tmp_path, wrapper, kfq_prefix):
    path = write_memento(
        tmp_path / "m.safetensors", files["lora"], files["kfq"], wrapper=wrapper, kfq_prefix=kfq_prefix
    )
    expert = load_memento_expert_report(files["root"] / "i2v.safetensors", path, lora_strength=0.5)
    assert isinstance(expert, MementoExpert)
    expected = hand_merge(files["base_sd"], [(files["lora"], RANK / math.sqrt(RANK), 0.5)])
    assert max_rel(expert.dit, expected) < 1e-6
    assert expert.keyframe_query is not None
    assert expert.lora.num_matched == len(TARGETS) * files["cfg"].num_layers
    assert expert.lora.unmatched_keys == ()
    assert expert.lora.layout == "peft"
    assert set(expert.lora.scales.values()) == {RANK / math.sqrt(RANK)}
    assert "KeyframeQuery: 10 local + 2 global" in expert.summary()


def test_extra_lora_stacked_with_strength(files, tmp_path):
    cfg = files["cfg"]
    g = torch.Generator().manual_seed(5)
    extra = {
        "blocks.0.cross_attn.k": (
            torch.randn(4, cfg.dim, generator=g) * 0.1,
            torch.randn(cfg.dim, 4, generator=g) * 0.1,
        ),
        "blocks.1.ffn.2": (
            torch.randn(4, cfg.ffn_dim, generator=g) * 0.1,
            torch.randn(cfg.dim, 4, generator=g) * 0.1,
        ),
    }
    sd = {}
    for name, (a, b) in extra.items():
        sd[f"diffusion_model.{name}.lora_down.weight"] = a
        sd[f"diffusion_model.{name}.lora_up.weight"] = b
        sd[f"diffusion_model.{name}.alpha"] = torch.tensor(2.0)
    save_file(sd, tmp_path / "distill.safetensors")
    expert = load_memento_expert_report(
        files["root"] / "i2v.safetensors",
        files["memento"],
        extra_loras=[(tmp_path / "distill.safetensors", 0.7)],
    )
    expected = hand_merge(
        files["base_sd"], [(files["lora"], RANK / math.sqrt(RANK), 1.0), (extra, 2.0 / 4, 0.7)]
    )
    assert max_rel(expert.dit, expected) < 1e-6
    (report,) = expert.extra
    assert report.strength == 0.7 and set(report.matched) == set(extra)
    assert set(report.scales.values()) == {0.5}


def test_bf16(files):
    dit, kfq = load_memento_expert(
        files["root"] / "i2v.safetensors", files["memento"], dtype=torch.bfloat16, device="cpu"
    )
    assert all(p.dtype == torch.bfloat16 for p in dit.parameters())
    assert all(p.dtype == torch.bfloat16 for p in kfq.parameters())
    expected = hand_merge(
        files["base_sd"], [(files["lora"], RANK / math.sqrt(RANK), 1.0)], dtype=torch.bfloat16
    )
    assert max_rel(dit, expected) < 2**-8  # one bf16 rounding of the merged weight
    for name, t in files["kfq"].items():
        assert torch.equal(kfq.state_dict()[name], t.bfloat16()), name


def test_t2v_base_is_rejected(files):
    with pytest.raises(CheckpointError, match=r"T2V.*in_dim 16.*I2V.*in_dim 36") as info:
        load_memento_expert(files["root"] / "t2v.safetensors", files["memento"])
    assert "t2v.safetensors" in str(info.value)


def test_memento_file_matching_nothing(files, tmp_path):
    path = tmp_path / "other_arch.safetensors"
    save_file(
        {
            "base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64),
            "base_model.model.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4),
        },
        path,
    )
    with pytest.raises(LoraError, match="another architecture") as info:
        load_memento_expert(files["root"] / "i2v.safetensors", path)
    assert str(path) in str(info.value)


def test_memento_file_without_kfq(files, tmp_path):
    path = write_memento(tmp_path / "lora_only.safetensors", files["lora"], None)
    dit, kfq = load_memento_expert(files["root"] / "i2v.safetensors", path)
    assert kfq is None
    assert len(dit.blocks) == files["cfg"].num_layers


def test_swapped_inputs_give_readable_errors(files):
    with pytest.raises(CheckpointError, match="LoRA file, not a Wan DiT"):
        load_memento_expert(files["memento"], files["memento"])
    with pytest.raises(LoraError, match="no LoRA tensors"):
        load_memento_expert(files["root"] / "i2v.safetensors", files["root"] / "i2v.safetensors")


def test_scale_override_and_unknown_kfq_tensors(files, tmp_path):
    kfq = dict(files["kfq"], extra_buffer=torch.zeros(3))
    path = write_memento(tmp_path / "m.safetensors", files["lora"], kfq)
    expert = load_memento_expert_report(files["root"] / "i2v.safetensors", path, use_rslora=False)
    assert set(expert.lora.scales.values()) == {1.0}  # alpha = r, alpha / r
    assert expert.kfq_unused == ("base_model.model.keyframe_query.extra_buffer",)
    assert expert.lora.unmatched_keys == ()
    assert "unknown tensors ignored" in expert.summary()


def test_incomplete_kfq_fails_before_loading_the_base(files, tmp_path):
    kfq = {k: v for k, v in files["kfq"].items() if k != "queries_global"}
    path = write_memento(tmp_path / "m.safetensors", files["lora"], kfq)
    with pytest.raises(CheckpointError, match="queries_global") as info:
        load_memento_expert(files["root"] / "i2v.safetensors", path)
    assert str(path) in str(info.value)
