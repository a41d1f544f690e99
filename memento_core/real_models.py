"""Real weights for the command line: a JSON model config, and diffusers / transformers adapters.

The story runner talks to a VAE and a text encoder through memento_core's protocols
(:mod:`memento_core.adapters`). Outside ComfyUI the real ones are diffusers' ``AutoencoderKLWan`` (the
Wan 2.1 VAE) and transformers' ``UMT5EncoderModel`` (umT5-XXL), both read from local folders in the
Hugging Face layout (``config.json`` + ``*.safetensors``; pickles are refused). Both libraries are
optional: they are imported only here, with a clear message when missing.

Model config (JSON; relative paths are relative to the config file)::

    {
      "i2v_high": "Wan2.2-I2V-A14B/high_noise_model",      # base experts: file, shard folder, or list
      "i2v_low": "Wan2.2-I2V-A14B/low_noise_model",
      "memento_high": "Memento/backbone_high_noise.safetensors",
      "memento_low": "Memento/backbone_low_noise.safetensors",
      "t2v_high": "Wan2.2-T2V-A14B/high_noise_model",      # optional: shot 1 by T2V
      "t2v_low": "Wan2.2-T2V-A14B/low_noise_model",
      "text_encoder": "Wan2.2-T2V-A14B-Diffusers/text_encoder",
      "tokenizer": "Wan2.2-T2V-A14B-Diffusers/tokenizer",
      "vae": "Wan2.2-T2V-A14B-Diffusers/vae",
      "dtype": "bf16", "device": "cuda", "lora_strength": 1.0,
      "text_device": "cpu",                                 # optional: umT5-XXL (11 GB) off the GPU
      "offload": "swap_experts",                            # optional: none|swap_experts|block_swap|auto
      "swap_blocks": 20,                                    # with block_swap: blocks kept on the CPU
      "attention": "auto", "fp8_compute": "auto",           # optional: GPU fast paths (self-checked)
      "compile": false,                                     # optional: torch.compile the blocks
      "clip": "open_clip/ViT-B-32.safetensors",             # optional: StoryMem's keyframe CLIP
      "run": {"noise": "device", "kfq_precision": "auto"}  # optional: the released pipelines' options
    }

``memento_high`` / ``memento_low`` take Memento's files (LoRA + KeyframeQuery) or StoryMem's
(``Wan2.2-MI2V-A14B`` / ``Wan2.2-MM2V-A14B`` ``backbone_*_noise.safetensors``: LoRA only); which family
they are picks the default memory policy. ``clip``: an open_clip ViT-B-32 (OpenAI, QuickGELU) weights
file in open_clip's layout, for the storymem policy's keyframes (never downloaded at run time).

``offload``: ``none`` (both experts on the device), ``swap_experts`` (one at a time), ``block_swap``
(one at a time, its last ``swap_blocks`` blocks brought in from the CPU one by one) or ``auto``: the
memory plan (:mod:`memento_core.plan`) for the GPU's total memory at the run's width/height/frames
(832x480x81 when the caller does not say), and, unless ``text_device`` is set, umT5-XXL on the CPU
when it would not fit on the GPU next to the plan's peak. On a CPU device ``auto`` means ``none``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .adapters import LATENT_CHANNELS
from .errors import MementoError, ShapeError
from .expert import load_memento_expert, lora_family
from .fast_paths import FastPaths
from .fp8 import quantize_fp8
from .m2v import Backbone
from .models import ModelSet, load_t2v_experts
from .plan import GB, TEXT_ENCODER_BYTES, make_plan

__all__ = [
    "DiffusersWanVAE",
    "ModelConfig",
    "ModelConfigError",
    "UMT5TextEncoder",
    "load_model_config",
    "real_models",
]

#: Config dtype -> load dtype ("fp8": loaded and merged in bf16, then block weights stored in fp8).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.bfloat16}
TEXT_LEN = 512
FAST_PATH_FIELDS = ("attention", "fp8_compute", "compile")
OFFLOAD_CHOICES = ("none", "swap_experts", "block_swap", "auto")
#: Options of the released pipelines a model config may set under "run" -> RunSettings field.
RUN_OPTIONS = {
    "policy": "policy",
    "solver": "solver",
    "fix": "fix",
    "idt_back_mode": "identity_back",
    "storymem_mode": "storymem_mode",
    "memory_noise": "memory_noise",
    "noise": "noise",
    "kfq_precision": "kfq_precision",
}


class ModelConfigError(MementoError):
    """The model config is malformed or names files that are not there (the message names the field)."""


@dataclass(frozen=True)
class ModelConfig:
    """Where the real weights are (see the module docstring). t2v_*: optional (shot 1 by T2V)."""

    i2v_high: str
    i2v_low: str
    memento_high: str
    memento_low: str
    text_encoder: str
    tokenizer: str
    vae: str
    t2v_high: str | None = None
    t2v_low: str | None = None
    dtype: str = "bf16"
    device: str = "cuda"
    text_device: str | None = None
    offload: str = "none"
    swap_blocks: int | None = None
    attention: str = "auto"
    fp8_compute: str = "auto"
    compile: bool = False
    lora_strength: float = 1.0
    clip: str | None = None
    run: dict[str, Any] = field(default_factory=dict)
    source: str = "<config>"

    @property
    def fast_paths(self) -> FastPaths:
        """The GPU fast paths (``memento_core.fast_paths``) this config asks for."""
        return FastPaths(attention=self.attention, fp8_compute=self.fp8_compute, compile=self.compile)

    def run_settings(self) -> dict[str, Any]:
        """The ``run`` options as ``RunSettings`` fields (``idt_back_mode`` is ``identity_back``)."""
        return {RUN_OPTIONS[k]: v for k, v in self.run.items()}

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts for logs and resume checks (file names, not contents; the run options are
        recorded with the settings)."""
        # the fast paths change speed, not the model: a run may resume with others
        skip = ("source", "run", *FAST_PATH_FIELDS)
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        if out["swap_blocks"] is None:  # as before block_swap existed (resume checks compare these)
            del out["swap_blocks"]
        return {"kind": "real", **out}


_PATH_FIELDS = ("i2v_high", "i2v_low", "memento_high", "memento_low", "text_encoder", "tokenizer", "vae")


def load_model_config(path: str | os.PathLike[str]) -> ModelConfig:
    """Read and check a model config file -> :class:`ModelConfig` with absolute paths."""
    source = Path(path)
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelConfigError(f"model config {source}: no such file") from exc
    except UnicodeDecodeError as exc:
        raise ModelConfigError(
            f"model config {source}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc
    except (OSError, ValueError, RecursionError) as exc:
        raise ModelConfigError(
            f"model config {source}: not readable JSON ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(data, dict):
        raise ModelConfigError(f"model config {source}: expected a JSON object")
    known = {f.name for f in fields(ModelConfig)} - {"source"}
    if unknown := sorted(set(data) - known):
        raise ModelConfigError(f"model config {source}: unknown field(s) {unknown}; known: {sorted(known)}")
    run = data.get("run", {})
    if not isinstance(run, dict):
        raise ModelConfigError(f"model config {source}: field 'run': expected an object of run options")
    if unknown_run := sorted(set(run) - set(RUN_OPTIONS)):
        raise ModelConfigError(
            f"model config {source}: field 'run': unknown option(s) {unknown_run}; "
            f"known: {sorted(RUN_OPTIONS)}"
        )
    if missing := [k for k in _PATH_FIELDS if not data.get(k)]:
        raise ModelConfigError(f"model config {source}: missing field(s) {missing}")
    if bool(data.get("t2v_high")) != bool(data.get("t2v_low")):
        raise ModelConfigError(f"model config {source}: give both t2v_high and t2v_low, or neither")
    if data.get("offload", "none") not in OFFLOAD_CHOICES:
        raise ModelConfigError(
            f"model config {source}: field 'offload': expected one of {', '.join(OFFLOAD_CHOICES)}"
        )
    blocks = data.get("swap_blocks")
    if data.get("offload") == "block_swap" and (
        not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1
    ):
        raise ModelConfigError(
            f"model config {source}: field 'swap_blocks': block_swap needs a positive integer, got {blocks!r}"
        )
    if blocks is not None and data.get("offload") != "block_swap":
        raise ModelConfigError(f"model config {source}: field 'swap_blocks': only with offload 'block_swap'")
    try:
        FastPaths.from_config(data, f"model config {source}")
    except MementoError as exc:
        raise ModelConfigError(str(exc)) from None
    if data.get("dtype", "bf16") not in DTYPES:
        raise ModelConfigError(f"model config {source}: field 'dtype': expected one of {list(DTYPES)}")
    base = source.parent
    resolved: dict[str, Any] = dict(data)
    for key in (*_PATH_FIELDS, "t2v_high", "t2v_low", "clip"):
        if not data.get(key):
            continue
        p = Path(data[key]).expanduser()
        p = p if p.is_absolute() else base / p
        if not p.exists():
            raise ModelConfigError(f"model config {source}: field '{key}': {p} does not exist")
        resolved[key] = str(p)
    return ModelConfig(**resolved, source=str(source))


def _require(module: str, pip: str) -> Any:
    try:
        return __import__(module)
    except ImportError as exc:
        raise ModelConfigError(f"real models on the command line need {module}: pip install {pip}") from exc


class DiffusersWanVAE:
    """The Wan 2.1 VAE through diffusers' ``AutoencoderKLWan``, in memento_core's convention.

    encode: [3, F, H, W] in [-1, 1] -> normalised latents ``(mu - mean) / std`` [16, T, h, w] float32
    (Wan's own ``WanVAE.encode`` uses the posterior mean, not a sample); decode: the inverse.
    """

    def __init__(self, path: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        diffusers = _require("diffusers", "diffusers")
        try:
            self.vae = diffusers.AutoencoderKLWan.from_pretrained(
                path, torch_dtype=dtype, use_safetensors=True
            )
        except (OSError, ValueError) as exc:
            raise ModelConfigError(f"vae {path}: not a diffusers AutoencoderKLWan folder ({exc})") from exc
        self.vae = self.vae.to(device).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        cfg = self.vae.config
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(-1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(-1, 1, 1, 1)

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        if video.ndim != 4 or video.shape[0] != 3:
            raise ShapeError(f"VAE encode: expected a clip [3, F, H, W], got {list(video.shape)}")
        x = video.to(self.device, self.dtype)[None]
        mu = self.vae.encode(x).latent_dist.mode()[0].float().cpu()
        return (mu - self.mean) / self.std

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        if latent.ndim != 4 or latent.shape[0] != LATENT_CHANNELS:
            raise ShapeError(f"VAE decode: expected latents [16, T, h, w], got {list(latent.shape)}")
        z = latent.float().cpu() * self.std + self.mean
        video = self.vae.decode(z.to(self.device, self.dtype)[None]).sample[0]
        return video.float().cpu().clamp(-1, 1)


def clean_prompt(text: str) -> str:
    """Wan's prompt clean-up before tokenising: ftfy (when installed), HTML unescape, collapsed spaces."""
    import html

    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


class UMT5TextEncoder:
    """umT5-XXL through transformers' ``UMT5EncoderModel`` -> hidden states [1, L, 4096] float32.

    As Wan: the cleaned prompt is tokenised to at most 512 tokens (with the end token), the encoder runs
    with the attention mask, and only the L real tokens are returned (the DiT zero-pads to 512).
    """

    def __init__(
        self, path: str, tokenizer: str, device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        transformers = _require("transformers", "transformers sentencepiece")
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer)
            self.model = transformers.UMT5EncoderModel.from_pretrained(
                path, torch_dtype=dtype, use_safetensors=True
            )
        except (OSError, ValueError) as exc:
            raise ModelConfigError(
                f"text encoder {path} / tokenizer {tokenizer}: cannot be loaded ({exc})"
            ) from exc
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, text: str) -> Tensor:
        tokens = self.tokenizer(
            [clean_prompt(text)],
            padding="max_length",
            max_length=TEXT_LEN,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.model(ids, attention_mask=mask).last_hidden_state
        length = int(mask[0].sum())
        return hidden[:, :length].float().cpu()


def resolve_offload(
    config: ModelConfig, width: int | None = None, height: int | None = None, frames: int | None = None
) -> tuple[str, int, str | None]:
    """-> (offload mode, swapped blocks, text encoder device) for ``config``; ``auto`` asks the memory
    plan for this GPU at width x height x frames (default 832x480x81)."""
    text_device = config.text_device or config.device
    if config.offload != "auto":
        return config.offload, config.swap_blocks or 0, text_device
    device = torch.device(config.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "none", 0, text_device
    if config.dtype == "fp32":
        raise ModelConfigError(
            f"model config {config.source}: offload 'auto' plans bf16, fp16 or fp8 weights, not fp32"
        )
    vram_gb = torch.cuda.get_device_properties(device).total_memory / GB
    dtype = "fp8" if config.dtype == "fp8" else "bf16"  # fp16 weighs as bf16
    plan = make_plan(vram_gb, width or 832, height or 480, frames or 81, dtype)
    if not plan.fits:
        print(f"offload auto: {plan.message}", file=sys.stderr)
    if config.text_device is None and (plan.predicted_peak_gb * GB + TEXT_ENCODER_BYTES > vram_gb * GB):
        text_device = "cpu"
    return plan.mode, plan.swap_blocks, text_device


def real_models(
    config: ModelConfig, width: int | None = None, height: int | None = None, frames: int | None = None
) -> ModelSet:
    """A :class:`memento_core.models.ModelSet` over the configured weights (experts load on first use).
    The family of the Memento / StoryMem files (read from their headers) picks the default policy.
    width, height, frames: the run's size, for ``offload: auto`` (default 832x480x81)."""
    dtype = DTYPES[config.dtype]
    device = config.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelConfigError(
            f"model config {config.source}: device {device!r} but no CUDA GPU is available"
        )
    offload, swap_blocks, text_device = resolve_offload(config, width, height, frames)
    swap = offload in ("swap_experts", "block_swap")
    load_to = "cpu" if swap else device  # with swapping, experts wait on the CPU until their turn

    def backbone() -> Backbone:
        high, kfq_high = load_memento_expert(
            config.i2v_high, config.memento_high, dtype, load_to, config.lora_strength
        )
        low, kfq_low = load_memento_expert(
            config.i2v_low, config.memento_low, dtype, load_to, config.lora_strength
        )
        if config.dtype == "fp8":
            quantize_fp8(high)
            quantize_fp8(low)
        return Backbone(high, low, kfq_high, kfq_low)

    def t2v() -> tuple[Any, Any]:
        return load_t2v_experts(config.t2v_high, config.t2v_low, dtype, load_to, fp8=config.dtype == "fp8")

    families = {lora_family(config.memento_high), lora_family(config.memento_low)}
    if len(families) != 1:
        raise ModelConfigError(
            f"model config {config.source}: memento_high and memento_low are of different families "
            f"({' and '.join(sorted(families))}); give both experts' files of one release"
        )

    def embedder() -> Any:
        from .keyframes import ClipEmbedder

        return ClipEmbedder.create("ViT-B-32", pretrained=config.clip)

    return ModelSet(
        kind="real",
        description=config.describe(),
        vae=DiffusersWanVAE(config.vae, device, torch.float32),
        text_encoder=UMT5TextEncoder(config.text_encoder, config.tokenizer, text_device, dtype),
        load_backbone=backbone,
        load_t2v=t2v if config.t2v_high else None,
        device=device,
        swap_experts=swap,
        swap_blocks=swap_blocks,
        fast_paths=config.fast_paths,
        family=families.pop(),
        load_embedder=embedder if config.clip else None,
    )
