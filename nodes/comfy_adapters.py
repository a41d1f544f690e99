"""ComfyUI objects behind memento_core's protocols, and conversions between ComfyUI and core tensors.

Conventions (the numerics matter):

* ComfyUI IMAGE: ``[F, H, W, 3]`` float in [0, 1]; memento_core video: ``[3, F, H, W]`` in [-1, 1].
* ComfyUI's ``VAE.encode`` takes an IMAGE and returns RAW Wan latents ``[1, 16, T, h, w]``; its
  ``decode`` takes raw latents and returns ``[1, F, H, W, 3]`` in [0, 1]. Wan's DiT and memento_core
  work on NORMALISED latents ``(z - mean) / std`` (``comfy.latent_formats.Wan21.process_in``), so
  :class:`ComfyVideoVAE` normalises after encoding and de-normalises before decoding. A LATENT that
  leaves a Memento node is raw (``process_out``), as KSampler's output, ready for ``VAEDecode``.
* ComfyUI's umT5 "wan" text encoder gives CONDITIONING ``[[cond [1, 512, 4096], {...}]]`` with the
  padded positions zeroed; the DiT zero-pads its context to 512 itself, so the padded tensor is used
  as it is (identical result). :class:`ComfyTextEncoder` encodes like ``CLIPTextEncode`` does
  (``clip.encode_from_tokens_scheduled(clip.tokenize(text))``) and caches per text.
"""

from __future__ import annotations

from typing import Any

import comfy.latent_formats
import comfy.model_management
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ComfyImageEmbedder",
    "ComfyTextEncoder",
    "ComfyVideoVAE",
    "approx_decode",
    "conditioning_tensor",
    "image_to_video",
    "raw_latent",
    "video_to_image",
]

_WAN21 = comfy.latent_formats.Wan21()


def image_to_video(image: Tensor) -> Tensor:
    """ComfyUI IMAGE [F, H, W, 3] in [0, 1] -> video [3, F, H, W] float32 in [-1, 1] (CPU)."""
    return (image.detach().float().cpu() * 2.0 - 1.0).permute(3, 0, 1, 2).contiguous()


def video_to_image(video: Tensor) -> Tensor:
    """Video [3, F, H, W] in [-1, 1] -> ComfyUI IMAGE [F, H, W, 3] float32 in [0, 1] (CPU)."""
    return ((video.detach().float().cpu() + 1.0) / 2.0).clamp(0, 1).permute(1, 2, 3, 0).contiguous()


def raw_latent(latent: Tensor) -> Tensor:
    """Normalised core latent [16, T, h, w] -> ComfyUI LATENT samples [1, 16, T, h, w] (raw Wan latents)."""
    return _WAN21.process_out(latent.detach().float().cpu()[None])


def normalised_latent(samples: Tensor) -> Tensor:
    """ComfyUI LATENT samples [1, 16, T, h, w] (raw) -> normalised core latent [16, T, h, w]."""
    return _WAN21.process_in(samples.detach().float().cpu())[0]


def approx_decode(latent: Tensor) -> Tensor:
    """A cheap preview without a VAE: Wan 2.1's latent -> RGB factors, 8x nearest upscale.

    latent: normalised [16, T, h, w] -> video [3, T, 8h, 8w] in [-1, 1] (colours only roughly right).
    """
    raw = raw_latent(latent)[0]  # [16, T, h, w]
    factors = torch.tensor(_WAN21.latent_rgb_factors, dtype=torch.float32)  # [16, 3]
    bias = torch.tensor(_WAN21.latent_rgb_factors_bias, dtype=torch.float32)
    rgb = torch.einsum("cthw,cr->rthw", raw, factors) + bias[:, None, None, None]
    rgb = F.interpolate(rgb.permute(1, 0, 2, 3), scale_factor=8, mode="nearest").permute(1, 0, 2, 3)
    return rgb.clamp(-1, 1)


def conditioning_tensor(conditioning: Any, name: str, node: str) -> Tensor:
    """The text-encoder output [1, L, D] (float32, CPU) inside a CONDITIONING from CLIP Text Encode.

    Raises a readable ValueError naming ``node`` and the input ``name`` for anything else (an empty or
    combined conditioning, a batch of prompts).
    """
    ok = isinstance(conditioning, list) and len(conditioning) >= 1
    if ok:
        entry = conditioning[0]
        ok = isinstance(entry, list | tuple) and len(entry) >= 1 and isinstance(entry[0], Tensor)
    if not ok:
        raise ValueError(
            f"{node}: the '{name}' input is not a CONDITIONING from CLIP Text Encode (with the umT5 'wan' "
            "text encoder)."
        )
    if len(conditioning) != 1:
        raise ValueError(
            f"{node}: the '{name}' input holds {len(conditioning)} combined conditionings; Memento takes "
            "one prompt: connect a single CLIP Text Encode."
        )
    cond = conditioning[0][0]
    if cond.ndim != 3 or cond.shape[0] != 1:
        raise ValueError(
            f"{node}: the '{name}' conditioning has shape {list(cond.shape)}; expected one prompt "
            "[1, tokens, width] from CLIP Text Encode."
        )
    return cond.detach().float().cpu()


class ComfyTextEncoder:
    """memento_core ``TextEncoder`` over a ComfyUI CLIP object (umT5 "wan"): text -> [1, 512, D]."""

    def __init__(self, clip: Any, node: str = "Memento") -> None:
        if clip is None or not hasattr(clip, "tokenize") or not hasattr(clip, "encode_from_tokens_scheduled"):
            raise ValueError(
                f"{node}: the 'clip' input is not a text encoder; connect Load CLIP with type 'wan' "
                "(umt5_xxl)."
            )
        self.clip = clip
        self.node = node
        self._cache: dict[str, Tensor] = {}

    def encode(self, text: str) -> Tensor:
        """Encode ``text`` exactly as CLIP Text Encode does -> float32 [1, L, D] on the CPU."""
        if text not in self._cache:
            cond = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))
            self._cache[text] = conditioning_tensor(cond, "clip", self.node)
        return self._cache[text]


class ComfyVideoVAE:
    """memento_core ``VideoVAE`` over a ComfyUI VAE object holding the Wan 2.1 VAE.

    encode: video [3, F, H, W] in [-1, 1] -> normalised latents [16, T, H/8, W/8] (float32, CPU);
    decode: normalised latents [16, T, h, w] -> video [3, 1 + 4(T-1), 8h, 8w] in [-1, 1];
    decode_raw: ComfyUI LATENT samples [1, 16, T, h, w] (raw) -> the same video.
    """

    def __init__(self, vae: Any, node: str = "Memento") -> None:
        if vae is None or not hasattr(vae, "encode") or not hasattr(vae, "decode"):
            raise ValueError(f"{node}: the 'vae' input is not a VAE; connect Load VAE (wan_2.1_vae).")
        channels = getattr(vae, "latent_channels", None)
        if channels != 16 or getattr(vae, "latent_dim", None) != 3:
            raise ValueError(
                f"{node}: the 'vae' input is not the Wan 2.1 video VAE (16 latent channels); it has "
                f"{channels} latent channels. Load wan_2.1_vae.safetensors (the Wan2.2 5B VAE does not fit "
                "the A14B experts)."
            )
        self.vae = vae

    def encode(self, video: Tensor) -> Tensor:
        """[3, F, H, W] in [-1, 1] -> normalised [16, T, h, w]."""
        raw = self.vae.encode(video_to_image(video))
        return normalised_latent(raw)

    def decode(self, latent: Tensor) -> Tensor:
        """Normalised [16, T, h, w] -> [3, F, H, W] in [-1, 1]."""
        return self.decode_raw(raw_latent(latent))

    def decode_raw(self, samples: Tensor) -> Tensor:
        """Raw LATENT samples [1, 16, T, h, w] -> [3, F, H, W] in [-1, 1]."""
        images = self.vae.decode(samples)
        images = images.reshape(-1, *images.shape[-3:])  # [F, H, W, 3], as VAEDecode does
        return image_to_video(images)


class ComfyImageEmbedder:
    """memento_core ``ImageEmbedder`` over a ComfyUI CLIP_VISION (Load CLIP Vision): frames [N, 3, H, W]
    in [0, 1] -> unit image embeddings [N, D] float32 on the CPU, for StoryMem's keyframes.

    The frames are prepared as StoryMem prepares them (squashed to the model's input size, bilinear, no
    crop: ``memento_core.keyframes.clip_preprocess``), not with ComfyUI's crop; the embedding is the
    model's projected ``image_embeds``. StoryMem's thresholds were set on CLIP ViT-B/32, which ComfyUI's
    CLIP vision loader does not read; any CLIP vision model it loads works (ViT-L/14 is common).
    """

    def __init__(self, clip_vision: Any, node: str = "Memento", batch_size: int = 16) -> None:
        if clip_vision is None or not all(
            hasattr(clip_vision, a) for a in ("model", "patcher", "load_device")
        ):
            raise ValueError(
                f"{node}: the 'clip_vision' input is not a CLIP vision model; connect Load CLIP Vision."
            )
        self.clip_vision, self.node, self.batch_size = clip_vision, node, batch_size

    @torch.no_grad()
    def __call__(self, frames: Tensor) -> Tensor:
        from ..memento_core.keyframes import clip_preprocess

        cv = self.clip_vision
        comfy.model_management.load_model_gpu(cv.patcher)
        size = int(getattr(cv, "image_size", 224))
        mean = tuple(getattr(cv, "image_mean", (0.48145466, 0.4578275, 0.40821073)))
        std = tuple(getattr(cv, "image_std", (0.26862954, 0.26130258, 0.27577711)))
        out = []
        for chunk in frames.split(self.batch_size):
            pixels = clip_preprocess(chunk.float(), size, mean, std).to(cv.load_device)
            embeds = cv.model(pixel_values=pixels, intermediate_output=-2)[2]
            out.append(F.normalize(embeds.float(), dim=-1).cpu())
        return torch.cat(out)
