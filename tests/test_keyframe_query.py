"""KeyframeQuery (SPEC 4.7): scores and selection against a slow, direct re-computation.

The expectation below is written from SPEC 4.7 and the released reference's rules, independently of
the module: explicit loops over tokens / heads / queries / frames, explicit einsum attention in
float64, and a RoPE table built from complex numbers (``torch.polar``) like Wan's ``rope_params``
(time positions -512..511 at rows 0..1023, height / width positions 0..1023).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from memento_core.keyframe_query import (
    KFQ_TENSOR_NAMES,
    KeyframeQuery,
    candidate_positions,
    dual_topk,
    split_global_caption,
)
from memento_core.tiny import tiny_dit

DIM, HEADS, N_LOCAL, N_GLOBAL, C = 256, 2, 10, 2, 16
STORIES = Path(__file__).resolve().parents[2] / "shared" / "stories"
HARRY_PROMPT = (
    "global caption: [Person A]: teenage male wizard with messy black hair and round glasses wearing "
    "Gryffindor robe holding a wooden wand; shot caption: [Person A] walks quietly through a dim stone "
    "corridor at midnight, holding his wand as floating candles drift above the walkway. He takes "
    "careful, measured steps, while warm candlelight casts soft shadows across the walls and floor."
)


# ------------------------------------------------------------------------------------------------
# Fixtures: a random state dict with the released names


def released_state_dict(
    seed: int = 0, dim: int = DIM, n_local: int = N_LOCAL, n_global: int = N_GLOBAL
) -> dict[str, torch.Tensor]:
    """Random KFQ tensors under the released keys (``keyframe_query.<name>``), float32."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "queries": rnd(n_local, dim, scale=1.0),
        "queries_global": rnd(n_global, dim, scale=1.0),
        "memory_patcher.weight": rnd(dim, C, 1, 2, 2, scale=1 / math.sqrt(4 * C)),
        "memory_patcher.bias": rnd(dim, scale=0.02),
    }
    for attn in ("query_to_text", "query_to_visual"):
        for proj in "qkvo":
            sd[f"{attn}.{proj}.weight"] = rnd(dim, dim, scale=1 / math.sqrt(dim))
            sd[f"{attn}.{proj}.bias"] = rnd(dim, scale=0.02)
        sd[f"{attn}.norm_q.weight"] = 1 + rnd(dim, scale=0.1)
        sd[f"{attn}.norm_k.weight"] = 1 + rnd(dim, scale=0.1)
    return {f"keyframe_query.{k}": v for k, v in sd.items()}


@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    return released_state_dict()


@pytest.fixture(scope="module")
def kfq(sd: dict[str, torch.Tensor]) -> KeyframeQuery:
    return KeyframeQuery.from_state_dict(sd)


# ------------------------------------------------------------------------------------------------
# The slow reference (float64)


def ref_rope_tables(head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Complex RoPE tables like Wan's rope_params: time rows = positions -512..511, h/w rows = 0..1023."""

    def params(pos: torch.Tensor, d: int) -> torch.Tensor:
        inv = 1.0 / torch.pow(10000.0, torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = torch.outer(pos.to(torch.float64), inv)
        return torch.polar(torch.ones_like(ang), ang)

    d_space = 2 * (head_dim // 6)
    d_time = head_dim - 2 * d_space
    return (
        params(torch.arange(-512, 512), d_time),
        params(torch.arange(1024), d_space),
        params(torch.arange(1024), d_space),
    )


def ref_rope(k: torch.Tensor, pos: list[int], h: int, w: int) -> torch.Tensor:
    """Rotate keys k [F·h·w, heads, head_dim] with per-token complex factors (token loop)."""
    t_tab, h_tab, w_tab = ref_rope_tables(k.shape[-1])
    factors = []
    for p in pos:
        row = min(max(p + 512, 0), 1023)
        for y in range(h):
            for x in range(w):
                factors.append(torch.cat([t_tab[row], h_tab[y], w_tab[x]]))
    freqs = torch.stack(factors)[:, None, :]
    kc = torch.view_as_complex(k.reshape(*k.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(kc * freqs).reshape(k.shape)


def ref_linear(x: torch.Tensor, p: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return torch.einsum("...i,oi->...o", x, p[f"{name}.weight"]) + p[f"{name}.bias"]


def ref_rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * weight


def ref_patcher(lat: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """Conv3d kernel = stride = (1, 2, 2) by explicit patches. lat [C, F, H, W] -> [F·h·w, dim]."""
    weight, bias = p["memory_patcher.weight"][:, :, 0], p["memory_patcher.bias"]
    tokens = []
    for f in range(lat.shape[1]):
        for y in range(lat.shape[2] // 2):
            for x in range(lat.shape[3] // 2):
                patch = lat[:, f, 2 * y : 2 * y + 2, 2 * x : 2 * x + 2]
                tokens.append(torch.einsum("ocij,cij->o", weight, patch) + bias)
    return torch.stack(tokens)


def ref_cross(x, ctx, p, name, heads, rope_fn=None):
    """Wan cross-attention of x [n, dim] onto ctx [L, dim], one head at a time."""
    q = ref_rms(ref_linear(x, p, f"{name}.q"), p[f"{name}.norm_q.weight"]).unflatten(-1, (heads, -1))
    k = ref_rms(ref_linear(ctx, p, f"{name}.k"), p[f"{name}.norm_k.weight"]).unflatten(-1, (heads, -1))
    v = ref_linear(ctx, p, f"{name}.v").unflatten(-1, (heads, -1))
    if rope_fn is not None:
        k = rope_fn(k)
    outs = []
    for hh in range(heads):
        logits = torch.einsum("qd,kd->qk", q[:, hh], k[:, hh]) / math.sqrt(q.shape[-1])
        outs.append(torch.einsum("qk,kd->qd", torch.softmax(logits, dim=-1), v[:, hh]))
    return ref_linear(torch.cat(outs, dim=-1), p, f"{name}.o")


def ref_scores(sd, lat, pos, ctx, ctx_g, heads=HEADS):
    """SPEC 4.7 steps 1-6 in float64 with loops. Returns (local [F], global [F])."""
    p = {k.removeprefix("keyframe_query."): v.double() for k, v in sd.items()}
    lat, ctx, ctx_g = lat.double(), ctx[0].double(), ctx_g[0].double()
    n_frames, h, w = lat.shape[1], lat.shape[2] // 2, lat.shape[3] // 2
    tokens = ref_patcher(lat, p)

    def rope_fn(k):
        return ref_rope(k, pos, h, w)

    ql = p["queries"] + ref_cross(p["queries"], ctx, p, "query_to_text", heads)
    qg = p["queries_global"] + ref_cross(p["queries_global"], ctx_g, p, "query_to_text", heads)
    queries = torch.cat([ql, qg])
    queries = queries + ref_cross(queries, tokens, p, "query_to_visual", heads, rope_fn)
    q = ref_linear(queries, p, "query_to_visual.q").unflatten(-1, (heads, -1))
    k = rope_fn(ref_linear(tokens, p, "query_to_visual.k").unflatten(-1, (heads, -1)))
    hw, d = h * w, q.shape[-1]
    table = torch.zeros(q.shape[0], n_frames, dtype=torch.float64)
    for qi in range(q.shape[0]):
        for f in range(n_frames):
            per_head = []
            for hh in range(heads):
                logits = torch.einsum("d,kd->k", q[qi, hh], k[f * hw : (f + 1) * hw, hh]) / math.sqrt(d)
                per_head.append(logits)
            table[qi, f] = torch.stack(per_head).mean(0).mean()
    n_local = p["queries"].shape[0]
    return table[:n_local].mean(0), table[n_local:].mean(0)


def ref_select(local, glob, k_local=6, k_global=2):
    """The reference's rule: topk local; -inf mask; topk global; inference drops duplicates."""
    k_l = min(k_local, local.numel())
    chosen = torch.topk(local, k_l).indices.tolist()
    masked = glob.clone()
    masked[chosen] = float("-inf")
    k_g = min(k_global, max(1, local.numel() - k_l))
    picked = [i for i in torch.topk(masked, k_g).indices.tolist() if i not in chosen]
    return sorted(chosen), sorted(picked)


def random_inputs(n_frames: int, seed: int, h: int = 4, w: int = 6):
    g = torch.Generator().manual_seed(1000 + seed)
    lat = torch.randn(C, n_frames, h, w, generator=g)
    pos = torch.randint(-512, 40, (n_frames,), generator=g)
    pos[0] = -512
    ctx = torch.randn(1, 512, DIM, generator=g)
    ctx_g = torch.randn(1, 512, DIM, generator=g)
    return lat, pos, ctx, ctx_g


# ------------------------------------------------------------------------------------------------
# 1. scores() and select() against the slow re-computation


@pytest.mark.parametrize(("n_frames", "seed"), [(3, 0), (8, 1), (16, 2), (16, 3)])
def test_scores_and_select_match_slow_reference(sd, kfq, n_frames, seed):
    lat, pos, ctx, ctx_g = random_inputs(n_frames, seed)
    exp_local, exp_global = ref_scores(sd, lat, pos.tolist(), ctx, ctx_g)
    local, glob = kfq.scores(lat, pos, ctx, ctx_g)
    assert local.dtype == torch.float32 and local.shape == (n_frames,) and glob.shape == (n_frames,)
    scale = float(torch.cat([exp_local, exp_global]).abs().max())
    torch.testing.assert_close(local.double(), exp_local, atol=2e-5 * scale, rtol=0)
    torch.testing.assert_close(glob.double(), exp_global, atol=2e-5 * scale, rtol=0)
    # the scores are informative: frames differ and local / global rows differ
    assert float(exp_local.std()) > 1e-3 * scale or n_frames < 4
    got = kfq.select(lat, pos, ctx, ctx_g)
    assert got == ref_select(exp_local, exp_global)
    assert len(got[0]) == min(6, n_frames)


def test_positions_matter_and_out_of_range_positions_clamp(sd, kfq):
    lat, pos, ctx, ctx_g = random_inputs(5, 7)
    base = kfq.scores(lat, pos, ctx, ctx_g)
    shifted = kfq.scores(lat, pos - 3, ctx, ctx_g)
    assert not torch.allclose(base[0], shifted[0])  # keys get RoPE, queries none: absolute positions count
    far = torch.tensor([-900, -513, -512, 511, 700])
    exp = ref_scores(sd, lat, [-512, -512, -512, 511, 511], ctx, ctx_g)
    got = kfq.scores(lat, far, ctx, ctx_g)
    scale = float(torch.cat(exp).abs().max())
    torch.testing.assert_close(got[0].double(), exp[0], atol=2e-5 * scale, rtol=0)
    torch.testing.assert_close(got[1].double(), exp[1], atol=2e-5 * scale, rtol=0)


def test_bf16_weights_and_float64_inputs_run_in_float32(sd):
    sd16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    kfq16 = KeyframeQuery.from_state_dict(sd16)
    assert kfq16.queries.dtype == torch.bfloat16  # assigned as stored
    lat, pos, ctx, ctx_g = random_inputs(16, 4)
    exp = ref_scores({k: v.float() for k, v in sd16.items()}, lat, pos.tolist(), ctx, ctx_g)
    got = kfq16.scores(lat.double(), pos.int(), ctx.double(), ctx_g.bfloat16().float())
    assert got[0].dtype == torch.float32
    scale = float(torch.cat(exp).abs().max())
    torch.testing.assert_close(got[0].double(), exp[0], atol=2e-5 * scale, rtol=0)
    assert kfq16.select(lat, pos, ctx, ctx_g) == ref_select(*exp)


def test_select_with_contexts_from_the_experts_text_embedding(kfq):
    dit = tiny_dit("i2v", seed=3, dim=DIM)
    t5 = torch.randn(1, 9, dit.config.text_dim, generator=torch.Generator().manual_seed(5))
    ctx = dit.embed_text(t5)
    ctx_g = dit.embed_text(t5[:, :4])
    assert ctx.shape == (1, 512, DIM)
    lat = torch.randn(C, 16, 4, 6, generator=torch.Generator().manual_seed(6))
    pos = candidate_positions(torch.arange(16) * 10 - 170, 162)
    local, glob = kfq.select(lat, pos, ctx, ctx_g)
    assert len(local) == 6 and len(glob) == 2 and not set(local) & set(glob)


def test_bad_inputs_name_the_argument(kfq):
    lat, pos, ctx, ctx_g = random_inputs(4, 0)
    with pytest.raises(ValueError, match="latents"):
        kfq.select(lat[:4], pos, ctx, ctx_g)
    with pytest.raises(ValueError, match="latents"):
        kfq.select(lat[..., :5], pos, ctx, ctx_g)
    with pytest.raises(ValueError, match="frame_pos"):
        kfq.select(lat, pos[:3], ctx, ctx_g)
    with pytest.raises(ValueError, match="ctx_global"):
        kfq.select(lat, pos, ctx, ctx_g[..., :64])


# ------------------------------------------------------------------------------------------------
# 2. The exact top-k rule (chosen scores)


def _patched(monkeypatch, kfq, local, glob):
    local, glob = torch.tensor(local, dtype=torch.float32), torch.tensor(glob, dtype=torch.float32)
    monkeypatch.setattr(kfq, "scores", lambda *args, **kwargs: (local, glob))
    n = local.numel()
    return kfq.select(torch.zeros(C, n, 2, 2), torch.zeros(n, dtype=torch.long), None, None)


def test_rule_locals_are_masked_before_global_picks(monkeypatch, kfq):
    local = [0.0] * 16
    for rank, frame in enumerate([15, 3, 9, 0, 12, 7]):
        local[frame] = 10.0 - rank
    glob = [float(i) for i in range(16)]  # global favourites 15, 14, 13, 12 ...; 15 and 12 are local
    assert _patched(monkeypatch, kfq, local, glob) == ([0, 3, 7, 9, 12, 15], [13, 14])


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (16, ([10, 11, 12, 13, 14, 15], [0, 1])),
        (9, ([3, 4, 5, 6, 7, 8], [0, 1])),
        (8, ([2, 3, 4, 5, 6, 7], [0, 1])),  # everything selected
        (7, ([1, 2, 3, 4, 5, 6], [0])),  # min(2, max(1, 7 - 6)) = 1
        (6, ([0, 1, 2, 3, 4, 5], [])),  # the reference's masked pick is a duplicate, dropped
        (3, ([0, 1, 2], [])),
        (1, ([0], [])),
    ],
)
def test_rule_counts_for_small_pools(monkeypatch, kfq, n, expected):
    local = [float(i) for i in range(n)]  # locals prefer late frames
    glob = [float(-i) for i in range(n)]  # globals prefer early frames
    assert _patched(monkeypatch, kfq, local, glob) == expected


def test_rule_ties_take_the_lower_index(monkeypatch, kfq):
    assert _patched(monkeypatch, kfq, [0.0] * 16, [0.0] * 16) == ([0, 1, 2, 3, 4, 5], [6, 7])
    local = [5.0, 4.0, 4.0, 4.0, 4.0, 4.0, 1.0, 4.0, 4.0, 0.0]  # 8 frames tie at 4.0 for 5 slots
    glob = [9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0]
    assert _patched(monkeypatch, kfq, local, glob) == ([0, 1, 2, 3, 4, 5], [6, 7])


def test_rule_custom_k_and_errors():
    local = torch.tensor([3.0, 1.0, 2.0, 0.0, 5.0])
    glob = torch.tensor([0.0, 9.0, 1.0, 8.0, 7.0])
    assert dual_topk(local, glob, k_local=0, k_global=2) == ([], [1, 3])
    assert dual_topk(local, glob, k_local=2, k_global=1) == ([0, 4], [1])
    assert dual_topk(local, glob, k_local=2, k_global=5) == ([0, 4], [1, 2, 3])
    with pytest.raises(ValueError, match="not finite"):
        dual_topk(torch.tensor([0.0, float("nan")]), torch.zeros(2))
    with pytest.raises(ValueError):
        dual_topk(local, glob, k_local=-1)


def test_rule_matches_torch_topk_on_random_distinct_scores():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = 1 + trial % 20
        local, glob = torch.randn(n, generator=g), torch.randn(n, generator=g)
        assert dual_topk(local, glob) == ref_select(local, glob)


# ------------------------------------------------------------------------------------------------
# 3. Loading


PREFIXES = [
    "",
    "keyframe_query.",
    "base_model.model.keyframe_query.",
    "diffusion_model.keyframe_query.",
    "model.diffusion_model.keyframe_query.",
    "high_noise_model.keyframe_query.",
    "low_noise_model.base_model.model.keyframe_query.",
]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_from_state_dict_round_trip_with_prefixes(sd, prefix):
    bare = {k.removeprefix("keyframe_query."): v for k, v in sd.items()}
    keyed = {prefix + k: v for k, v in bare.items()}
    keyed["base_model.model.blocks.0.self_attn.q.lora_A.weight"] = torch.zeros(128, DIM)  # ignored
    kfq = KeyframeQuery.from_state_dict(keyed)
    got = kfq.state_dict()
    assert set(got) == set(bare) and len(got) == 24
    for k, v in bare.items():
        assert torch.equal(got[k], v), k
    assert not kfq.training and not any(p.requires_grad for p in kfq.parameters())


def test_module_layout_is_the_released_one():
    kfq = KeyframeQuery(DIM, HEADS)
    shapes = {k: tuple(v.shape) for k, v in kfq.state_dict().items()}
    assert len(shapes) == 24 and set(shapes) == set(KFQ_TENSOR_NAMES)
    assert shapes["queries"] == (10, DIM) and shapes["queries_global"] == (2, DIM)
    assert shapes["memory_patcher.weight"] == (DIM, 16, 1, 2, 2)
    assert shapes["query_to_visual.k.weight"] == (DIM, DIM) and shapes["query_to_text.norm_k.weight"] == (
        DIM,
    )
    bare = {k.removeprefix("keyframe_query."): v for k, v in released_state_dict(1).items()}
    assert not kfq.load_state_dict(bare, strict=True).missing_keys


def test_shape_inference_and_heads():
    kfq = KeyframeQuery.from_state_dict(released_state_dict(2, dim=384, n_local=4, n_global=3))
    assert (kfq.dim, kfq.n_local, kfq.n_global, kfq.latent_channels) == (384, 4, 3, 16)
    assert kfq.num_heads == 3 and kfq.head_dim == 128
    assert KeyframeQuery.from_state_dict(released_state_dict(2), num_heads=4).num_heads == 4
    kfq = KeyframeQuery.from_state_dict(released_state_dict(0))
    assert (kfq.dim, kfq.n_local, kfq.n_global, kfq.num_heads) == (DIM, 10, 2, 2)


def test_missing_or_duplicate_tensors_raise_readable_errors(sd):
    broken = {k: v for k, v in sd.items() if not k.endswith("query_to_visual.norm_k.weight")}
    broken.pop("keyframe_query.queries_global")
    with pytest.raises(ValueError, match=r"2 of 24 .*queries_global.*query_to_visual\.norm_k\.weight"):
        KeyframeQuery.from_state_dict(broken)
    with pytest.raises(ValueError, match="missing"):
        KeyframeQuery.from_state_dict({"patch_embedding.weight": torch.zeros(1)})
    both = {
        **{"high_noise_model." + k: v for k, v in sd.items()},
        **{"low_noise_model." + k: v for k, v in sd.items()},
    }
    with pytest.raises(ValueError, match="two tensors"):
        KeyframeQuery.from_state_dict(both)
    bad = dict(sd)
    bad["keyframe_query.query_to_text.q.weight"] = torch.zeros(DIM, DIM + 1)
    with pytest.raises(ValueError, match="do not fit"):
        KeyframeQuery.from_state_dict(bad)


# ------------------------------------------------------------------------------------------------
# 4. Positions and captions


def test_candidate_positions_spec_example():
    abs_frames = [0, 11, 23, 34, 46, 57, 69, 80]  # shot 1's samples, seen from shot 2 (current_time 81)
    rel = [a - 81 for a in abs_frames]
    assert candidate_positions(rel, 81).tolist() == [-20, -18, -15, -12, -9, -6, -3, 0]
    # the DiT memory positions of the same frames keep a -1 clamp; the KFQ ones do not
    dit_pos = [min(a // 4 - 81 // 4, -1) for a in abs_frames]
    assert dit_pos == [-20, -18, -15, -12, -9, -6, -3, -1]
    # shot 3 (current_time 162): 16 candidates from shots 1 and 2
    both = abs_frames + [81 + a for a in abs_frames]
    expected = [-40, -38, -35, -32, -29, -26, -23, -20, -20, -17, -14, -12, -9, -6, -3, 0]
    got = candidate_positions(torch.tensor(both) - 162, 162)
    assert got.dtype == torch.long and got.tolist() == expected


def test_candidate_positions_floor_and_clamp():
    # a//4 - b//4, not (a - b)//4: they differ by one here
    assert candidate_positions([-1], 83).tolist() == [0]
    assert candidate_positions([-2], 81).tolist() == [-1]
    assert candidate_positions([-4000, 3000, 0], 4000).tolist() == [-512, 511, 0]
    with pytest.raises(ValueError, match="current_time"):
        candidate_positions([0], -1)


def test_split_global_caption_real_prompt():
    expected = (
        "[Person A]: teenage male wizard with messy black hair and round glasses wearing Gryffindor robe "
        "holding a wooden wand"
    )
    assert split_global_caption(HARRY_PROMPT) == expected
    plain = "  A cat sleeps on a sunny windowsill.; "
    assert split_global_caption(plain) == plain  # no markers: the whole prompt, untouched
    assert split_global_caption("global caption: a dog walks") == "global caption: a dog walks"
    assert split_global_caption("global caption:  [A]: a dog ;; shot caption: it runs") == "[A]: a dog"


def test_split_global_caption_on_story_files():
    path = STORIES / "14_harry.json"
    if not path.exists():
        pytest.skip(f"{path} not present")
    story = json.loads(path.read_text())
    prompts = [p for scene in story["scenes"] for p in scene["video_prompts"]]
    assert prompts[0] == HARRY_PROMPT
    captions = {split_global_caption(p) for p in prompts}
    for caption in captions:
        assert caption and "caption:" not in caption and not caption.endswith(";")
    assert split_global_caption(prompts[0]) in captions
