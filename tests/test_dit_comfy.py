"""WanDiT against ComfyUI 0.3.75's own Wan model (comfy.ldm.wan.model.WanModel), same weights, fp32."""

from __future__ import annotations

import pytest
import torch

from memento_core.tiny import tiny_dit

TOL = 1e-4  # max abs difference relative to the output's max magnitude


@pytest.fixture(scope="module")
def comfy_wan(comfy_host):
    import comfy.ldm.wan.model as wan
    import comfy.ops

    return wan.WanModel, comfy.ops.disable_weight_init


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
@pytest.mark.parametrize("frames,h,w", [(1, 4, 4), (3, 6, 10)])
def test_matches_comfyui_wan_model(comfy_wan, kind, frames, h, w):
    wan_model, ops = comfy_wan
    ours = tiny_dit(kind, seed=11)
    cfg = ours.config
    ref = wan_model(
        model_type="t2v",  # Wan2.2 A14B I2V has no CLIP branch: ComfyUI builds it as t2v with in_dim 36
        patch_size=cfg.patch_size,
        in_dim=cfg.in_dim,
        dim=cfg.dim,
        ffn_dim=cfg.ffn_dim,
        freq_dim=cfg.freq_dim,
        text_dim=cfg.text_dim,
        out_dim=cfg.out_dim,
        num_heads=cfg.num_heads,
        num_layers=cfg.num_layers,
        cross_attn_norm=True,
        eps=cfg.eps,
        device="cpu",
        dtype=torch.float32,
        operations=ops,
    )
    ref.load_state_dict(ours.state_dict(), strict=True)
    ref.eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, frames, h, w, generator=g)
    y = torch.randn(2, cfg.cond_dim, frames, h, w, generator=g) if cfg.cond_dim else None
    t = torch.tensor([999.0, 288.0])
    ctx = torch.randn(2, 512, cfg.text_dim, generator=g)
    with torch.no_grad():
        out = ours(x, t, ctx, y=y)
        theirs = ref(x if y is None else torch.cat([x, y], 1), t, ctx)
    err = ((out - theirs).abs().max() / theirs.abs().max()).item()
    print(f"{kind} {frames}x{h}x{w}: rel err vs ComfyUI {err:.2e}")
    assert err <= TOL, err
