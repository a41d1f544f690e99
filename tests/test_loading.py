"""load_dit: every checkpoint layout and dtype loads to the same model; bad files give clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from memento_core import CheckpointError, load_dit
from memento_core.loading import open_checkpoint
from memento_core.tiny import random_state_dict, tiny_config, tiny_dit

FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def reference():
    """A tiny I2V model, its official state dict, and a fixed input with its output."""
    model = tiny_dit("i2v", seed=5)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 6, generator=g)
    y = torch.randn(1, 20, 2, 4, 6, generator=g)
    ctx = torch.randn(1, 9, model.config.text_dim, generator=g)
    args = (x, torch.tensor([700.0]), ctx)
    with torch.no_grad():
        out = model(*args, y=y)
    return model, sd, (args, y), out


def run(model, inputs):
    args, y = inputs
    with torch.no_grad():
        return model(*args, y=y)


def write_shards(folder: Path, sd: dict[str, torch.Tensor], n: int) -> None:
    """The official release layout: diffusion_pytorch_model-0000k-of-0000n + index json."""
    folder.mkdir()
    keys = sorted(sd)
    weight_map = {}
    for i in range(n):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::n]}
        save_file(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("layout", ["official", "comfy_prefix", "short_prefix", "shard_folder", "file_list"])
def test_every_layout_loads_to_identical_outputs(tmp_path, reference, layout):
    model, sd, inputs, out = reference
    if layout == "official":
        save_file(sd, tmp_path / "m.safetensors")
        path = tmp_path / "m.safetensors"
    elif layout == "comfy_prefix":
        save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, tmp_path / "m.safetensors")
        path = str(tmp_path / "m.safetensors")
    elif layout == "short_prefix":
        save_file({f"diffusion_model.{k}": v for k, v in sd.items()}, tmp_path / "m.safetensors")
        path = tmp_path / "m.safetensors"
    elif layout == "shard_folder":
        write_shards(tmp_path / "high_noise_model", sd, 3)
        path = tmp_path / "high_noise_model"
    else:
        keys = sorted(sd)
        save_file({k: sd[k] for k in keys[:10]}, tmp_path / "a.safetensors")
        save_file({k: sd[k] for k in keys[10:]}, tmp_path / "b.safetensors")
        path = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    loaded = load_dit(path)
    assert loaded.config == model.config
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    assert torch.equal(run(loaded, inputs), out)


@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float16])
def test_half_files_load_exactly(tmp_path, reference, file_dtype):
    _, sd, _, _ = reference
    save_file({k: v.to(file_dtype) for k, v in sd.items()}, tmp_path / "m.safetensors")
    loaded = load_dit(tmp_path / "m.safetensors", dtype=torch.float32)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k].to(file_dtype).float()), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weight_dtype_runs_close_to_fp32(tmp_path, reference, dtype):
    _, sd, inputs, out = reference
    save_file(sd, tmp_path / "m.safetensors")
    loaded = load_dit(tmp_path / "m.safetensors", dtype=dtype)
    assert loaded.blocks[0].self_attn.q.weight.dtype == dtype
    half = run(loaded, inputs)
    assert half.dtype == torch.float32
    assert ((half - out).abs().max() / out.abs().max()).item() < 0.05


def fp8_quantize(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    amax = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=False) if per_channel else w.abs().max()
    scale = (amax / 448.0).clamp(min=1e-12)
    divisor = scale.reshape(-1, *[1] * (w.ndim - 1)) if per_channel else scale
    q = (w / divisor).to(FP8)
    return q, scale.float()


def fp8_checkpoint(sd, spelling: str, per_channel: bool):
    """Quantize every 2D block weight like ComfyUI's / diffusers' scaled fp8 files; return the file
    dict and the exact dequantized weights a correct loader must produce."""
    out, expected = {}, {}
    for k, v in sd.items():
        if k.startswith("blocks.") and k.endswith(".weight") and v.ndim == 2:
            q, scale = fp8_quantize(v, per_channel)
            layer = k.removesuffix(".weight")
            out[k] = q
            out[f"{layer}.{spelling}"] = scale
            out[f"{layer}.scale_input" if spelling == "scale_weight" else f"{layer}.input_scale"] = (
                torch.ones(())
            )
            shape = (-1, 1) if per_channel else ()
            expected[k] = q.float() * scale.reshape(shape)
        else:
            out[k] = v
    if spelling == "scale_weight":
        out["scaled_fp8"] = torch.empty(0, dtype=FP8)
        out = {f"model.diffusion_model.{k}" if k != "scaled_fp8" else k: v for k, v in out.items()}
    return out, expected


@pytest.mark.parametrize(
    "spelling,per_channel", [("scale_weight", False), ("weight_scale", True), ("scale_weight", True)]
)
def test_fp8_scaled_files_are_dequantized(tmp_path, reference, spelling, per_channel):
    """The real weight is fp8.float() * scale. A loader ignoring the scale is ~1000x off: caught here."""
    _, sd, inputs, out = reference
    file_sd, expected = fp8_checkpoint(sd, spelling, per_channel)
    save_file(file_sd, tmp_path / "m_fp8_scaled.safetensors")
    loaded = load_dit(tmp_path / "m_fp8_scaled.safetensors", dtype=torch.float32).state_dict()
    assert set(loaded) == set(sd)
    for k, w in expected.items():
        assert torch.equal(loaded[k], w), k
        # within fp8 precision of the original weight (an unscaled load is 100-1000x larger)
        ratio = loaded[k].abs().max() / sd[k].abs().max()
        assert 0.9 < ratio < 1.1, k
    model = load_dit(tmp_path / "m_fp8_scaled.safetensors")
    assert ((run(model, inputs) - out).abs().max() / out.abs().max()).item() < 0.1


def test_plain_fp8_file_without_scales(tmp_path, reference):
    _, sd, _, _ = reference
    save_file({k: v.to(FP8) for k, v in sd.items()}, tmp_path / "m.safetensors")
    loaded = load_dit(tmp_path / "m.safetensors").state_dict()
    for k, v in loaded.items():
        assert torch.equal(v, sd[k].to(FP8).float()), k


# ------------------------------------------------------------------------------------------------
# Errors: each names the file and what was expected


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such checkpoint"):
        load_dit(tmp_path / "nope.safetensors")


def test_not_safetensors(tmp_path):
    bad = tmp_path / "notes.safetensors"
    bad.write_text("this is not a checkpoint at all, just some text that is long enough")
    with pytest.raises(CheckpointError, match=r"notes\.safetensors: not a safetensors file"):
        load_dit(bad)


def test_pickle_is_refused_without_opening(tmp_path):
    pt = tmp_path / "model.pt"
    torch.save({"x": torch.zeros(1)}, pt)
    with pytest.raises(CheckpointError, match=r"model\.pt: pickle checkpoints"):
        load_dit(pt)


def test_truncated_file(tmp_path, reference):
    _, sd, _, _ = reference
    full = tmp_path / "full.safetensors"
    save_file(sd, full)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: truncated"):
        load_dit(cut)


def test_not_a_wan_dit(tmp_path):
    save_file({"encoder.conv1.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match=r"vae\.safetensors: not a Wan DiT checkpoint"):
        load_dit(tmp_path / "vae.safetensors")


def test_lora_is_not_a_base_model(tmp_path):
    lora = {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 256)}
    save_file(lora, tmp_path / "lora.safetensors")
    with pytest.raises(CheckpointError, match="LoRA file, not a Wan DiT"):
        load_dit(tmp_path / "lora.safetensors")


def test_t2v_where_i2v_required(tmp_path):
    cfg = tiny_config("t2v")
    save_file(random_state_dict(cfg), tmp_path / "wan2.2_t2v_high_noise.safetensors")
    with pytest.raises(
        CheckpointError, match=r"t2v_high_noise\.safetensors: this is a T2V .*in_dim 16.*I2V.*36"
    ):
        load_dit(tmp_path / "wan2.2_t2v_high_noise.safetensors", expect="i2v")
    assert load_dit(tmp_path / "wan2.2_t2v_high_noise.safetensors", expect="t2v").config == cfg


def test_missing_shard(tmp_path, reference):
    _, sd, _, _ = reference
    write_shards(tmp_path / "low_noise_model", sd, 2)
    (tmp_path / "low_noise_model" / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing.*00002-of-00002"):
        load_dit(tmp_path / "low_noise_model")


def test_missing_tensor_is_reported(tmp_path, reference):
    _, sd, _, _ = reference
    partial = {k: v for k, v in sd.items() if k != "blocks.1.ffn.2.bias"}
    save_file(partial, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.ffn\.2\.bias"):
        load_dit(tmp_path / "m.safetensors")


def test_index_is_header_only(tmp_path, reference):
    """Config inference reads headers, not tensors: it works on the meta shapes alone."""
    _, sd, _, _ = reference
    save_file(sd, tmp_path / "m.safetensors")
    index = open_checkpoint(tmp_path / "m.safetensors")
    assert index.shapes()["patch_embedding.weight"] == (256, 36, 1, 2, 2)
