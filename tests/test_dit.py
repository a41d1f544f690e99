"""WanDiT against independent references (diffusers' WanTransformer3DModel) and invariants.

fp32, tiny configs with the real key layout and head size 128, random weights.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

from memento_core import DiTConfig, ShapeError, WanDiT
from memento_core.dit import rope_cos_sin, sinusoidal_embedding
from memento_core.tiny import random_state_dict, tiny_config, tiny_dit

TOL = 1e-4  # max abs difference, relative to the output's max magnitude (fp32)


def diffusers_reference(model: WanDiT) -> WanTransformer3DModel:
    """diffusers' Wan transformer holding the same weights (converted by diffusers' own mapping)."""
    cfg = model.config
    ref = WanTransformer3DModel(
        patch_size=cfg.patch_size,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
    )
    official = {k: v.clone() for k, v in model.state_dict().items()}
    ref.load_state_dict(convert_wan_transformer_to_diffusers(official), strict=True)
    return ref.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def inputs(cfg: DiTConfig, b: int, f: int, h: int, w: int, seed: int = 1, text_tokens: int = 512):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, f, h, w, generator=g)
    y = torch.randn(b, cfg.cond_dim, f, h, w, generator=g) if cfg.cond_dim else None
    t = torch.tensor([999.0, 113.0, 500.0, 0.0][:b])
    ctx = torch.randn(b, text_tokens, cfg.text_dim, generator=g)
    return x, y, t, ctx


@pytest.fixture(scope="module", params=["t2v", "i2v"])
def model_pair(request):
    model = tiny_dit(request.param, seed=3)
    return model, diffusers_reference(model)


@pytest.mark.parametrize("frames,h,w", [(1, 4, 6), (3, 6, 10), (5, 8, 4)])
def test_matches_diffusers(model_pair, frames, h, w):
    model, ref = model_pair
    x, y, t, ctx = inputs(model.config, 2, frames, h, w)
    with torch.no_grad():
        ours = model(x, t, ctx, y=y)
        inp = x if y is None else torch.cat([x, y], 1)
        theirs = ref(inp, t, ctx, return_dict=False)[0]
    assert ours.shape == (2, 16, frames, h, w) and ours.dtype == torch.float32
    assert rel_err(ours, theirs) <= TOL


def test_short_context_is_zero_padded_like_the_reference(model_pair):
    """Cross-attention sees all 512 positions: a 7-token prompt equals the same prompt zero-padded."""
    model, ref = model_pair
    x, y, t, ctx = inputs(model.config, 2, 3, 4, 6, text_tokens=7)
    padded = torch.nn.functional.pad(ctx, (0, 0, 0, 505))
    with torch.no_grad():
        short = model(x, t, ctx, y=y)
        full = model(x, t, padded, y=y)
        theirs = ref(x if y is None else torch.cat([x, y], 1), t, padded, return_dict=False)[0]
    assert torch.equal(short, full)
    assert rel_err(short, theirs) <= TOL


def test_default_positions_equal_explicit_arange():
    model = tiny_dit("i2v")
    x, y, t, ctx = inputs(model.config, 1, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(model(x, t[:1], ctx, y=y), model(x, t[:1], ctx, y=y, frame_pos=torch.arange(4)))


def test_negative_positions_are_relative():
    """RoPE only sees differences: shifting every frame down to -512 leaves the output unchanged,
    while moving one frame alone changes it."""
    model = tiny_dit("i2v")
    x, y, t, ctx = inputs(model.config, 1, 4, 4, 4)
    pos = torch.tensor([0, 3, 4, 5])
    with torch.no_grad():
        base = model(x, t[:1], ctx, y=y, frame_pos=pos)
        shifted = model(x, t[:1], ctx, y=y, frame_pos=pos - 512)
        moved = model(x, t[:1], ctx, y=y, frame_pos=torch.tensor([-20, 3, 4, 5]))
    assert rel_err(shifted, base) < 1e-5
    assert rel_err(moved, base) > 1e-3


def test_rope_table_matches_wan_complex_formulation():
    """Against Wan's own construction: complex polar table per axis, split 22/21/21 for head 128."""
    pos = torch.tensor([-512, -20, -1, 0, 7])
    h, w, d = 3, 5, 128
    cos, sin = rope_cos_sin(pos, h, w, d)

    def axis(p, dim):
        return torch.polar(
            torch.ones(len(p), dim // 2, dtype=torch.float64),
            torch.outer(p.double(), 1.0 / 10000 ** (torch.arange(0, dim, 2).double() / dim)),
        )

    table = torch.cat(
        [
            axis(pos, 44)[:, None, None].expand(5, h, w, 22),
            axis(torch.arange(h), 42)[None, :, None].expand(5, h, w, 21),
            axis(torch.arange(w), 42)[None, None, :].expand(5, h, w, 21),
        ],
        -1,
    ).reshape(-1, 64)
    assert torch.allclose(cos.double(), table.real, atol=1e-7)
    assert torch.allclose(sin.double(), table.imag, atol=1e-7)


def test_time_embedding_is_float64_sinusoid():
    t = torch.tensor([999.0, 0.0])
    emb = sinusoidal_embedding(t, 256)
    freqs = 10000 ** (-torch.arange(128, dtype=torch.float64) / 128)
    expected = torch.cat([torch.cos(999.0 * freqs), torch.sin(999.0 * freqs)])
    assert torch.allclose(emb[0].double(), expected, atol=1e-7)
    assert torch.equal(emb[1, :128], torch.ones(128)) and torch.equal(emb[1, 128:], torch.zeros(128))


def test_state_dict_has_official_keys():
    cfg = tiny_config("i2v")
    keys = set(WanDiT(cfg).state_dict())
    expected = {
        "patch_embedding.weight", "text_embedding.0.weight", "text_embedding.2.bias",
        "time_embedding.0.weight", "time_embedding.2.weight", "time_projection.1.weight",
        "blocks.1.modulation", "blocks.0.self_attn.norm_q.weight", "blocks.0.norm3.bias",
        "blocks.0.cross_attn.norm_k.weight", "blocks.0.ffn.2.weight", "head.modulation", "head.head.bias",
    }  # fmt: skip
    assert expected <= keys
    assert len(keys) == 5 + 2 + 2 + 2 + 4 + cfg.num_layers * (1 + 10 + 2 + 10 + 4)
    assert set(random_state_dict(cfg)) == keys


@pytest.mark.parametrize(
    "case,match",
    [
        ("no_y", "I2V model"),
        ("bad_frames", "frame_pos"),
        ("odd_size", "not divisible"),
        ("too_low", ">= -512"),
        ("long_text", "exceed text_len"),
    ],
)
def test_readable_shape_errors(case, match):
    model = tiny_dit("i2v")
    x, y, t, ctx = inputs(model.config, 1, 3, 4, 4)
    kwargs = {"y": y}
    if case == "no_y":
        kwargs = {}
    elif case == "bad_frames":
        kwargs["frame_pos"] = torch.arange(2)
    elif case == "odd_size":
        x, kwargs["y"] = x[..., :3], y[..., :3]
    elif case == "too_low":
        kwargs["frame_pos"] = torch.tensor([-513, 0, 1])
    elif case == "long_text":
        ctx = torch.randn(1, 513, model.config.text_dim)
    with pytest.raises(ShapeError, match=match):
        model(x, t[:1], ctx, **kwargs)
