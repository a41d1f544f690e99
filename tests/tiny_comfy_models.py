"""Tiny model files for running Memento graphs in a real ComfyUI (tests only, random weights).

* :func:`write_tiny_wan_vae`: a Wan 2.1 VAE with ComfyUI's real key layout (``comfy.ldm.wan.vae.WanVAE``
  with a small ``dim``); ``VAELoader`` detects it as the Wan 2.1 VAE (16 latent channels).
* :func:`write_tiny_umt5` + :func:`patch_tiny_umt5`: ComfyUI's "wan" text encoder has a fixed umT5-XXL
  config (4096 wide, 24 layers) and recognises it by a 24th block 4096 wide. The patch (test-only,
  idempotent, reversible: it returns an undo function) makes ``CLIPLoader(type="wan")`` accept the tiny
  file and build a umT5 with :data:`TINY_UMT5_CONFIG` (64 wide = ``memento_core.tiny``'s text_dim),
  through ComfyUI's own ``<name>_model_config`` override of the text-model config. The tiny file holds a
  small SentencePiece model (``spiece_model``, trained here, deterministic) as the real one does.
* :func:`write_tiny_experts`: Wan2.2-I2V-style tiny experts (ComfyUI key prefix), a T2V one, and the two
  Memento files (PEFT LoRA rank 16 + the 24 KeyframeQuery tensors, bf16 like the release).

Importable on its own once ComfyUI is on ``sys.path`` (a server subprocess can call
``patch_tiny_umt5()`` before loading nodes); importing this module does not import ComfyUI.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

__all__ = [
    "TINY_FILES",
    "TINY_UMT5_CONFIG",
    "TINY_VOCAB_CORPUS",
    "backbone_inputs",
    "install_tiny_models",
    "loader_nodes",
    "patch_tiny_clip_vision",
    "patch_tiny_umt5",
    "tiny_spiece_model",
    "write_tiny_clip_vision",
    "write_tiny_experts",
    "write_tiny_memento",
    "write_tiny_umt5",
    "write_tiny_wan_vae",
]

#: The tiny umT5's config (ComfyUI's T5 reads these keys); d_model = memento_core.tiny's text_dim.
TINY_UMT5_CONFIG: dict[str, Any] = {
    "d_ff": 128,
    "d_kv": 16,
    "d_model": 64,
    "num_heads": 4,
    "num_layers": 2,
    "vocab_size": 160,
    "model_type": "umt5",
    "is_gated_act": True,
    "dense_act_fn": "gelu_pytorch_tanh",
    "relative_attention_num_buckets": 32,
    "layer_norm_epsilon": 1e-6,
    "eos_token_id": 1,
    "pad_token_id": 0,
}

#: Text the tiny SentencePiece model is trained on (English words of the test prompts).
TINY_VOCAB_CORPUS = (
    "global caption: [Person A]: a red-haired sailor in a blue coat; shot caption: [Person A] walks along "
    "the harbour at dawn. stops and looks at the ships. climbs aboard a small boat. the quick brown fox "
    "jumps over the lazy dog. a cat sits on a mat near the window at night. Person B, Person C, rain, sun."
)

_PATCH_FLAG = "_memento_tiny_umt5_undo"


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------- VAE


def write_tiny_wan_vae(path: str | Path, dim: int = 8, seed: int = 0) -> Path:
    """A Wan 2.1 VAE (``comfy.ldm.wan.vae.WanVAE``, z_dim 16) with ``dim`` base channels and seeded
    random weights -> ``path`` (.safetensors). Needs ComfyUI importable."""
    from comfy.ldm.wan.vae import WanVAE

    with torch.device("meta"):
        model = WanVAE(
            dim=dim,
            z_dim=16,
            dim_mult=[1, 2, 4, 4],
            num_res_blocks=2,
            attn_scales=[],
            temperal_downsample=[False, True, True],
            dropout=0.0,
        )
    # ComfyUI builds it with disable_weight_init ops (uninitialised memory): draw every tensor here.
    gen = _seeded(seed)
    sd = {}
    for key, value in sorted(model.state_dict().items()):
        noise = torch.randn(value.shape, generator=gen)
        if key.endswith("gamma"):
            sd[key] = 1.0 + 0.05 * noise
        elif key.endswith("bias") or value.ndim < 2:
            sd[key] = 0.02 * noise
        else:
            sd[key] = noise / math.sqrt(math.prod(value.shape[1:]))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, out)
    return out


# ----------------------------------------------------------------------------------------------- umT5


def tiny_spiece_model(vocab_size: int = 128) -> bytes:
    """A small BPE SentencePiece model (pad 0, eos 1, unk 2, as umT5) as serialized bytes."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([TINY_VOCAB_CORPUS] * 8),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
        character_coverage=1.0,
    )
    return buf.getvalue()


def _t5_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of ComfyUI's T5 encoder (umT5: relative bias in every layer)."""
    d, ff, inner, heads = cfg["d_model"], cfg["d_ff"], cfg["d_kv"] * cfg["num_heads"], cfg["num_heads"]
    shapes: dict[str, tuple[int, ...]] = {"shared.weight": (cfg["vocab_size"], d)}
    for i in range(cfg["num_layers"]):
        a = f"encoder.block.{i}.layer.0."
        for p in "qkv":
            shapes[f"{a}SelfAttention.{p}.weight"] = (inner, d)
        shapes[f"{a}SelfAttention.o.weight"] = (d, inner)
        shapes[f"{a}SelfAttention.relative_attention_bias.weight"] = (
            cfg["relative_attention_num_buckets"],
            heads,
        )
        shapes[f"{a}layer_norm.weight"] = (d,)
        f = f"encoder.block.{i}.layer.1."
        shapes[f"{f}DenseReluDense.wi_0.weight"] = (ff, d)
        shapes[f"{f}DenseReluDense.wi_1.weight"] = (ff, d)
        shapes[f"{f}DenseReluDense.wo.weight"] = (d, ff)
        shapes[f"{f}layer_norm.weight"] = (d,)
    shapes["encoder.final_layer_norm.weight"] = (d,)
    return shapes


def write_tiny_umt5(path: str | Path, seed: int = 0, config: dict[str, Any] | None = None) -> Path:
    """A tiny umT5 encoder in ComfyUI's key layout + its ``spiece_model`` -> ``path`` (.safetensors)."""
    cfg = dict(config or TINY_UMT5_CONFIG)
    gen = _seeded(seed)
    sd: dict[str, torch.Tensor] = {}
    for key, shape in sorted(_t5_shapes(cfg).items()):
        noise = torch.randn(shape, generator=gen)
        if key.endswith("layer_norm.weight"):
            sd[key] = 1.0 + 0.1 * noise
        elif key == "shared.weight" or "relative_attention_bias" in key:
            sd[key] = noise
        else:
            sd[key] = noise / math.sqrt(shape[1])
    spiece = tiny_spiece_model(min(128, cfg["vocab_size"]))
    sd["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8).clone()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, out)
    return out


def _is_tiny_umt5(sd: dict[str, Any], cfg: dict[str, Any]) -> bool:
    shared = sd.get("shared.weight")
    wi = sd.get("encoder.block.0.layer.1.DenseReluDense.wi_1.weight")
    return (
        shared is not None
        and wi is not None
        and tuple(shared.shape) == (cfg["vocab_size"], cfg["d_model"])
        and "encoder.block.23.layer.1.DenseReluDense.wi_1.weight" not in sd
    )


def patch_tiny_umt5(config: dict[str, Any] | None = None) -> Callable[[], None]:
    """Test-only: make ``CLIPLoader(type="wan")`` load :func:`write_tiny_umt5` files -> undo function.

    Patches ``comfy.sd.detect_te_model`` (a tiny umT5 state dict is reported as T5-XXL) and
    ``comfy.text_encoders.wan.WanT5Model.__init__`` (adds ComfyUI's ``umt5xxl_model_config`` override
    with the tiny config). Idempotent: a second call returns the first call's undo. Real umT5-XXL files
    still load as before. Never used by product code.
    """
    import comfy.sd
    import comfy.text_encoders.wan as wan

    existing = getattr(comfy.sd, _PATCH_FLAG, None)
    if existing is not None:
        return existing
    cfg = dict(config or TINY_UMT5_CONFIG)
    original_detect = comfy.sd.detect_te_model
    original_init = wan.WanT5Model.__init__

    def detect_te_model(sd: dict[str, Any]) -> Any:
        if _is_tiny_umt5(sd, cfg):
            return comfy.sd.TEModel.T5_XXL
        return original_detect(sd)

    def init(
        self: Any, device: str = "cpu", dtype: Any = None, model_options: dict | None = None, **kw: Any
    ) -> None:
        options = dict(model_options or {})
        options.setdefault("umt5xxl_model_config", dict(cfg))
        original_init(self, device=device, dtype=dtype, model_options=options, **kw)

    comfy.sd.detect_te_model = detect_te_model
    wan.WanT5Model.__init__ = init

    def undo() -> None:
        if getattr(comfy.sd, _PATCH_FLAG, None) is not undo:
            return
        comfy.sd.detect_te_model = original_detect
        wan.WanT5Model.__init__ = original_init
        delattr(comfy.sd, _PATCH_FLAG)

    setattr(comfy.sd, _PATCH_FLAG, undo)
    return undo


# ---------------------------------------------------------------------------------------- CLIP vision

#: A tiny CLIP vision tower in ComfyUI's clip_vision config format (2 layers, 32 wide, 32 px input).
TINY_CLIP_VISION_CONFIG: dict[str, Any] = {
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "quick_gelu",
    "hidden_size": 32,
    "image_size": 32,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model",
    "num_attention_heads": 2,
    "num_channels": 3,
    "num_hidden_layers": 2,
    "patch_size": 8,
    "projection_dim": 16,
}
_CLIP_VISION_FLAG = "_memento_tiny_clip_vision_undo"


def _tiny_clip_vision_json() -> str:
    path = Path(tempfile.gettempdir()) / "memento_tiny_clip_vision.json"
    path.write_text(json.dumps(TINY_CLIP_VISION_CONFIG))
    return str(path)


def write_tiny_clip_vision(path: Path, seed: int = 0) -> Path:
    """A tiny CLIP vision safetensors file in ComfyUI's key layout (``vision_model.*``,
    ``visual_projection.weight``), random weights (needs ComfyUI importable)."""
    import comfy.clip_vision

    model = comfy.clip_vision.ClipVisionModel(_tiny_clip_vision_json())
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, value in model.get_sd().items():
        noise = torch.randn(value.shape, generator=gen)
        sd[key] = 1.0 + 0.1 * noise if "norm" in key and key.endswith("weight") else noise * 0.2
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def patch_tiny_clip_vision() -> Callable[[], None]:
    """Test-only: make ``CLIPVisionLoader`` accept :func:`write_tiny_clip_vision` files -> undo function.

    ComfyUI picks a CLIP vision config by layer count (ViT-L/H/G, SigLIP); a 2-layer, 32-wide tower is
    given the tiny config instead. Real files load as before. Never used by product code.
    """
    import comfy.clip_vision as cv

    existing = getattr(cv, _CLIP_VISION_FLAG, None)
    if existing is not None:
        return existing
    original = cv.load_clipvision_from_sd

    def load_clipvision_from_sd(sd: dict[str, Any], prefix: str = "", convert_keys: bool = False) -> Any:
        first = sd.get("vision_model.encoder.layers.0.layer_norm1.weight")
        tiny = first is not None and first.shape[0] == TINY_CLIP_VISION_CONFIG["hidden_size"]
        if tiny and "vision_model.encoder.layers.2.layer_norm1.weight" not in sd:
            model = cv.ClipVisionModel(_tiny_clip_vision_json())
            model.load_sd(sd)
            return model
        return original(sd, prefix, convert_keys)

    cv.load_clipvision_from_sd = load_clipvision_from_sd

    def undo() -> None:
        if getattr(cv, _CLIP_VISION_FLAG, None) is not undo:
            return
        cv.load_clipvision_from_sd = original
        delattr(cv, _CLIP_VISION_FLAG)

    setattr(cv, _CLIP_VISION_FLAG, undo)
    return undo


# -------------------------------------------------------------------------------------------- experts

LORA_RANK = 16
LORA_TARGETS = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
    "ffn.0", "ffn.2",
)  # fmt: skip


def kfq_tensors(dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The 24 released KeyframeQuery tensors (names without ``keyframe_query.``)."""
    g = _seeded(seed)
    out = {
        "queries": torch.randn(10, dim, generator=g),
        "queries_global": torch.randn(2, dim, generator=g),
        "memory_patcher.weight": torch.randn(dim, 16, 1, 2, 2, generator=g) * 0.1,
        "memory_patcher.bias": torch.randn(dim, generator=g) * 0.02,
    }
    for attn in ("query_to_text", "query_to_visual"):
        for p in "qkvo":
            out[f"{attn}.{p}.weight"] = torch.randn(dim, dim, generator=g) / math.sqrt(dim)
            out[f"{attn}.{p}.bias"] = torch.randn(dim, generator=g) * 0.02
        out[f"{attn}.norm_q.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
        out[f"{attn}.norm_k.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
    assert len(out) == 24
    return out


def write_tiny_memento(path: str | Path, cfg: Any, seed: int = 1, with_kfq: bool = True) -> Path:
    """A released-style Memento file for the tiny config ``cfg`` (``memento_core.DiTConfig``): PEFT LoRA
    ``base_model.model.blocks.N.<module>.lora_{A,B}.weight`` (rank 16) + ``base_model.model.keyframe_query.*``
    (24 tensors), stored in bf16 -> ``path``."""
    g = _seeded(seed)
    shapes = {"ffn.0": (cfg.ffn_dim, cfg.dim), "ffn.2": (cfg.dim, cfg.ffn_dim)}
    sd: dict[str, torch.Tensor] = {}
    for n in range(cfg.num_layers):
        for t in LORA_TARGETS:
            o, i = shapes.get(t, (cfg.dim, cfg.dim))
            sd[f"base_model.model.blocks.{n}.{t}.lora_A.weight"] = torch.randn(
                LORA_RANK, i, generator=g
            ) / math.sqrt(i)
            sd[f"base_model.model.blocks.{n}.{t}.lora_B.weight"] = (
                torch.randn(o, LORA_RANK, generator=g) * 0.02 / math.sqrt(LORA_RANK)
            )
    if with_kfq:
        for name, t in kfq_tensors(cfg.dim, seed + 100).items():
            sd[f"base_model.model.keyframe_query.{name}"] = t
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, out)
    return out


def write_tiny_experts(
    diffusion_dir: str | Path, memento_dir: str | Path, text_dim: int = 64
) -> dict[str, Path]:
    """Tiny I2V high/low experts + a T2V expert (ComfyUI ``model.diffusion_model.`` prefix) in
    ``diffusion_dir`` and the two Memento files in ``memento_dir`` -> name -> path."""
    from memento_core.tiny import random_state_dict, tiny_config

    d, m = Path(diffusion_dir), Path(memento_dir)
    d.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config("i2v", text_dim=text_dim)
    paths: dict[str, Path] = {}
    for name, kind, seed in (("high", "i2v", 1), ("low", "i2v", 2), ("t2v", "t2v", 3)):
        sd = random_state_dict(tiny_config(kind, text_dim=text_dim), seed=seed)
        paths[name] = d / f"tiny_{kind}_{name}.safetensors" if kind == "i2v" else d / "tiny_t2v.safetensors"
        save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, paths[name])
    paths["memento_high"] = write_tiny_memento(m / "backbone_high_noise.safetensors", cfg, seed=11)
    paths["memento_low"] = write_tiny_memento(m / "backbone_low_noise.safetensors", cfg, seed=12)
    return paths


#: File names :func:`install_tiny_models` writes into the ComfyUI model folders.
TINY_FILES = {
    "vae": "tiny_wan_vae.safetensors",
    "text_encoder": "tiny_umt5.safetensors",
    "high": "tiny_i2v_high.safetensors",
    "low": "tiny_i2v_low.safetensors",
    "t2v": "tiny_t2v.safetensors",
    "memento_high": "backbone_high_noise.safetensors",
    "memento_low": "backbone_low_noise.safetensors",
    "clip_vision": "tiny_clip_vision.safetensors",
}


def backbone_inputs(offload: str = "none", swap_blocks: int = 0, **over: Any) -> dict[str, Any]:
    """Load Memento Backbone's inputs for the tiny files (fp32, strength 1, no extra LoRA) + ``over``."""
    inputs: dict[str, Any] = {
        "high_noise_model": TINY_FILES["high"],
        "low_noise_model": TINY_FILES["low"],
        "memento_high": TINY_FILES["memento_high"],
        "memento_low": TINY_FILES["memento_low"],
        "weight_dtype": "fp32",
        "memento_strength": 1.0,
        "offload": offload,
        "swap_blocks": swap_blocks,
        "attention": "auto",
        "compile": False,
    }
    for n in (1, 2, 3):
        inputs |= {f"lora_{n}": "None", f"strength_{n}": 1.0, f"expert_{n}": "both"}
    return inputs | over


def loader_nodes() -> dict[str, dict[str, Any]]:
    """API-format CLIPLoader ("clip", the tiny umT5 as type wan) and VAELoader ("vae") nodes."""
    return {
        "clip": {
            "class_type": "CLIPLoader",
            "inputs": {"clip_name": TINY_FILES["text_encoder"], "type": "wan"},
        },
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": TINY_FILES["vae"]}},
    }


def install_tiny_models(host: Any) -> dict[str, Path]:
    """Write every tiny file into a ``tests/comfy_host.ComfyHost``'s model folders (once; Memento files
    into ``loras``) -> name -> path. Does not patch the text encoder (see :func:`patch_tiny_umt5`)."""
    vae = host.model_dir("vae") / TINY_FILES["vae"]
    if not vae.exists():
        write_tiny_wan_vae(vae, dim=4)
    te = host.model_dir("text_encoders") / TINY_FILES["text_encoder"]
    if not te.exists():
        write_tiny_umt5(te)
    cv = host.model_dir("clip_vision") / TINY_FILES["clip_vision"]
    if not cv.exists():
        write_tiny_clip_vision(cv)
    paths = {"vae": vae, "text_encoder": te, "clip_vision": cv}
    if not (host.model_dir("loras") / TINY_FILES["memento_low"]).exists():
        paths.update(write_tiny_experts(host.model_dir("diffusion_models"), host.model_dir("loras")))
    else:
        for key in ("high", "low", "t2v"):
            paths[key] = host.model_dir("diffusion_models") / TINY_FILES[key]
        for key in ("memento_high", "memento_low"):
            paths[key] = host.model_dir("loras") / TINY_FILES[key]
    host.refresh_model_lists()
    return paths
