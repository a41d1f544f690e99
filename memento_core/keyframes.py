"""StoryMem memory policy: CLIP keyframe selection from a finished shot, and which stored frames a bank keeps.

Behaviour follows the StoryMem reference (``extract_keyframes.py`` and ``pipeline.py`` of
Kevin-thu/StoryMem), re-implemented here (the reference code is not copied):

- Keyframes (:func:`select_keyframes`): frames with an aesthetic score below ``aesthetic_min`` are never
  keyframes (StoryMem: HPSv3 < 3.0). The first kept frame is a keyframe. Then frames are scanned in
  order and a frame becomes a keyframe when its cosine similarity to the LAST keyframe is strictly below
  the threshold. The whole scan is redone with the threshold lowered by ``threshold_step`` until at most
  ``max_keyframes`` remain (no lower bound: it always ends, at worst with the first keyframe alone).
  Quirk kept from the reference: the scan starts at frame index 2, so frame 1 is a keyframe only when it
  is the first kept frame (``scan_start``). Finally a keyframe whose similarity to any stored keyframe is
  strictly above ``duplicate_threshold`` (a constant 0.9, not the lowered threshold) is dropped; the
  selection is not redone after that, so fewer keyframes may remain.
- Embeddings (:class:`ClipEmbedder`): OpenAI CLIP ViT-B/32 (QuickGELU), run in fp32, input squashed to
  224x224 with bilinear interpolation (no crop, no antialias) and normalised with CLIP's mean/std.
  For the selection scan StoryMem first resizes the frames to :func:`storymem_analysis_size` (antialiased
  bilinear, e.g. 480x832 -> 336x588) and scores aesthetics on those; the duplicate check embeds the
  full-size keyframes and the stored keyframe images directly. :func:`storymem_keyframes` wires that up.
- Bank (:func:`storymem_retain`): keep the first ``sink`` frames ever stored plus the most recent
  ``max_frames - sink``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from .errors import CheckpointError, MementoError, ShapeError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "AestheticScorer",
    "ClipEmbedder",
    "clip_preprocess",
    "drop_stored_duplicates",
    "select_keyframes",
    "storymem_analysis_size",
    "storymem_keyframes",
    "storymem_presize",
    "storymem_retain",
]

#: OpenAI CLIP normalisation constants (the values StoryMem hard-codes).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# StoryMem's analysis resolution: a multiple of 28 per side, area within [48, 256] * 28 * 28 pixels.
_FACTOR = 28
_MIN_PIXELS = 48 * _FACTOR * _FACTOR
_MAX_PIXELS = 256 * _FACTOR * _FACTOR
_MAX_RATIO = 200
_CPU = torch.device("cpu")


@runtime_checkable
class AestheticScorer(Protocol):
    """Scores frames for quality; frames scoring below ``aesthetic_min`` are never keyframes.

    ``frames``: float [N, 3, H, W] in [0, 1] -> float [N]. StoryMem uses HPSv3 with an empty prompt on
    the frames resized to :func:`storymem_analysis_size` (threshold 3.0). Optional: ``None`` skips the
    filter.
    """

    def __call__(self, frames: torch.Tensor) -> torch.Tensor: ...


def _unit_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """L2-normalise the rows of a [N, D] tensor, computed in at least float32."""
    if x.ndim != 2:
        raise ShapeError(f"{name}: expected a [N, D] tensor of embeddings, got shape {tuple(x.shape)}")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return F.normalize(x.detach().to(dtype), dim=-1)


def drop_stored_duplicates(
    embeddings: torch.Tensor, stored: torch.Tensor | None, threshold: float = 0.9
) -> list[int]:
    """Rows of ``embeddings`` [M, D] whose cosine similarity to every ``stored`` [K, D] row is <= threshold.

    Returns the kept row indices in order. ``stored`` None or empty keeps everything. StoryMem compares
    against every keyframe image ever saved for the story (reference images included), not only the
    frames the bank currently retains.
    """
    candidates = _unit_rows(embeddings, "embeddings")
    if stored is None or stored.numel() == 0:
        return list(range(candidates.shape[0]))
    bank = _unit_rows(stored, "stored").to(candidates.device, candidates.dtype)
    if bank.shape[1] != candidates.shape[1]:
        raise ShapeError(
            f"stored: embedding size {bank.shape[1]} does not match the frames' embedding size "
            f"{candidates.shape[1]} (embed both with the same CLIP model)"
        )
    sims = (candidates @ bank.T).tolist()
    return [i for i, row in enumerate(sims) if not any(s > threshold for s in row)]


def _scan(
    sims: list[list[float]], kept: list[bool], first: int, scan_start: int, threshold: float
) -> tuple[list[int], float]:
    """One pass of the StoryMem scan at one threshold.

    Returns the keyframes and the largest similarity that was accepted (below the threshold); the
    outcome is the same for every threshold in (that value, threshold].
    """
    keys = [first]
    last = first
    accepted_max = -math.inf
    for i in range(max(scan_start, first + 1), len(kept)):
        if not kept[i]:
            continue
        sim = sims[last][i]
        if sim < threshold:
            keys.append(i)
            last = i
            accepted_max = max(accepted_max, sim)
    return keys, accepted_max


def select_keyframes(
    embeddings: torch.Tensor,
    stored: torch.Tensor | None = None,
    aesthetic: torch.Tensor | None = None,
    *,
    aesthetic_min: float = 3.0,
    max_keyframes: int = 3,
    start_threshold: float = 0.9,
    threshold_step: float = 0.01,
    duplicate_threshold: float = 0.9,
    scan_start: int = 2,
) -> list[int]:
    """StoryMem keyframe selection over the frames of one shot (see the module docstring).

    Args:
        embeddings: [N, D] image embeddings of the shot's frames in time order (L2-normalised here).
        stored: [K, D] embeddings of the keyframes already stored, or None.
        aesthetic: [N] quality scores, or None to skip the filter; frames scoring < aesthetic_min are
            dropped (a score equal to aesthetic_min is kept).
        max_keyframes: the threshold drops until at most this many keyframes remain (>= 1).
        start_threshold, threshold_step: the similarity threshold starts here and is lowered by repeated
            subtraction of the step (Python floats, exactly as the reference computes it).
        duplicate_threshold: a keyframe with similarity > this to any stored keyframe is dropped.
        scan_start: first frame index the similarity scan looks at (2 in StoryMem; 1 scans every frame).

    Returns:
        Sorted frame indices of the new keyframes; empty when no frame passes the aesthetic filter.
    """
    if max_keyframes < 1:
        raise MementoError(f"max_keyframes: expected an integer >= 1, got {max_keyframes}")
    if not threshold_step > 0:
        raise MementoError(f"threshold_step: expected a positive number, got {threshold_step}")
    if scan_start < 1:
        raise MementoError(f"scan_start: expected an integer >= 1, got {scan_start}")
    unit = _unit_rows(embeddings, "embeddings")
    n = unit.shape[0]
    kept = [True] * n
    if aesthetic is not None:
        scores = aesthetic.detach().reshape(-1)
        if scores.numel() != n:
            raise ShapeError(f"aesthetic: expected {n} scores (one per frame), got {scores.numel()}")
        kept = [float(s) >= aesthetic_min for s in scores.tolist()]
    if not any(kept):
        return []
    first = kept.index(True)
    sims = (unit @ unit.T).tolist()

    threshold = float(start_threshold)
    while True:
        keys, accepted_max = _scan(sims, kept, first, scan_start, threshold)
        if len(keys) <= max_keyframes:
            break
        # Thresholds above accepted_max give this same outcome: step past them without rescanning.
        while threshold > accepted_max:
            threshold -= threshold_step

    survivors = drop_stored_duplicates(unit[keys], stored, duplicate_threshold)
    return [keys[j] for j in survivors]


def storymem_retain(n_frames: int, sink: int = 3, max_frames: int = 8) -> list[int]:
    """Indices (in storage order) of the stored frames a StoryMem bank conditions the next shot on.

    With more than ``max_frames`` stored: the first ``sink`` ever stored plus the most recent
    ``max_frames - sink``; otherwise all of them. StoryMem's order is its sorted file names
    (``{scene:02d}_{shot:02d}_keyframe{i}.jpg``), i.e. story order. MR2V reference images are stored
    first (``00_00_keyframe{j}.jpg``), so they are the sink; references beyond the first ``sink`` age out
    like any keyframe (pass ``sink=max(3, n_references)`` to pin them all). With ``sink == max_frames`` the
    reference's slicing (``bank[:sink] + bank[-0:]``) returns the sink plus the whole bank again (a bug);
    here exactly the sink is kept.
    """
    if n_frames < 0:
        raise MementoError(f"n_frames: expected an integer >= 0, got {n_frames}")
    if max_frames < 1:
        raise MementoError(f"max_frames: expected an integer >= 1, got {max_frames}")
    if not 0 <= sink <= max_frames:
        raise MementoError(f"sink: expected an integer in [0, max_frames={max_frames}], got {sink}")
    if n_frames <= max_frames:
        return list(range(n_frames))
    return list(range(sink)) + list(range(n_frames - (max_frames - sink), n_frames))


def storymem_analysis_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) StoryMem resizes a shot's frames to before keyframe selection.

    Each side rounded to a multiple of 28, then scaled (keeping the aspect ratio, floor / ceil to
    multiples of 28) so the area lies within [48, 256] * 28 * 28 pixels. 480x832 -> 336x588.
    """
    if height < 1 or width < 1:
        raise ShapeError(f"frame size: expected positive height and width, got {height}x{width}")
    if max(height, width) / min(height, width) > _MAX_RATIO:
        raise ShapeError(f"frame size {height}x{width}: aspect ratio above {_MAX_RATIO} is not supported")
    h = max(_FACTOR, round(height / _FACTOR) * _FACTOR)
    w = max(_FACTOR, round(width / _FACTOR) * _FACTOR)
    if h * w > _MAX_PIXELS:
        beta = math.sqrt(height * width / _MAX_PIXELS)
        h = math.floor(height / beta / _FACTOR) * _FACTOR
        w = math.floor(width / beta / _FACTOR) * _FACTOR
    elif h * w < _MIN_PIXELS:
        beta = math.sqrt(_MIN_PIXELS / (height * width))
        h = math.ceil(height * beta / _FACTOR) * _FACTOR
        w = math.ceil(width * beta / _FACTOR) * _FACTOR
    return max(h, _FACTOR), max(w, _FACTOR)


def _check_frames(frames: torch.Tensor) -> torch.Tensor:
    if frames.ndim != 4 or frames.shape[1] not in (1, 3):
        raise ShapeError(f"frames: expected [N, 3, H, W] (RGB in [0, 1]), got shape {tuple(frames.shape)}")
    x = frames.detach()
    if not x.is_floating_point():
        raise ShapeError(f"frames: expected a float tensor in [0, 1], got dtype {x.dtype}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.clamp(0.0, 1.0)


def storymem_presize(frames: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> [N, 3, h, w] at :func:`storymem_analysis_size` (antialiased bilinear).

    StoryMem resizes uint8 frames read back from the saved mp4; here the frames stay float.
    """
    x = _check_frames(frames)
    size = storymem_analysis_size(x.shape[-2], x.shape[-1])
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=True).clamp(
        0.0, 1.0
    )


def clip_preprocess(
    frames: torch.Tensor,
    size: int | tuple[int, int] = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """StoryMem's CLIP input: [N, 3, H, W] in [0, 1] -> [N, 3, size, size] float32.

    Squash resize (bilinear, align_corners=False, no antialias, no crop, aspect ratio not kept), then
    ``(x - mean) / std`` per channel. One-channel frames are repeated to RGB; values are clamped to [0, 1].
    """
    x = _check_frames(frames).float()
    hw = (size, size) if isinstance(size, int) else tuple(size)
    x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - exercised through monkeypatching sys.modules
        raise ImportError(
            "ClipEmbedder needs the open_clip package for CLIP image embeddings: pip install open_clip_torch"
        ) from exc
    return open_clip


@dataclass(frozen=True, eq=False)
class ClipEmbedder:
    """L2-normalised CLIP image embeddings with StoryMem's preprocessing (:func:`clip_preprocess`).

    ``model`` is an open_clip model (anything with ``encode_image``). Build one with :meth:`create`.
    """

    model: Any
    image_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    device: torch.device = _CPU
    dtype: torch.dtype = torch.float32
    batch_size: int = 32

    @classmethod
    def create(
        cls,
        model_name: str = "ViT-B-32",
        pretrained: str | None = None,
        device: str | torch.device = "cpu",
        *,
        quick_gelu: bool | None = None,
        dtype: torch.dtype = torch.float32,
        cache_dir: str | None = None,
        batch_size: int = 32,
    ) -> ClipEmbedder:
        """Build an open_clip image encoder.

        Args:
            model_name: an open_clip architecture name ("ViT-B-32" is StoryMem's ViT-B/32).
            pretrained: None (random weights, for tests), an open_clip pretrained tag (e.g. "openai",
                downloaded by open_clip into ``cache_dir``), or a local ``.safetensors`` file in open_clip's
                key layout. Other local files (pickles) are refused.
            quick_gelu: activation of the towers. None picks the tag's setting for a tag, and True
                otherwise (OpenAI's CLIP, the model StoryMem uses, was trained with QuickGELU).
            dtype: weight and compute dtype (StoryMem runs CLIP in float32 on the CPU).
        """
        open_clip = _import_open_clip()
        kwargs: dict[str, Any] = {}
        checkpoint: str | None = None
        if pretrained is not None:
            tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
            path = Path(pretrained).expanduser()
            if tag_cfg:
                checkpoint = pretrained
                if quick_gelu is None:
                    quick_gelu = bool(tag_cfg.get("quick_gelu", False))
                kwargs["cache_dir"] = cache_dir
            elif path.is_file():
                if path.suffix.lower() != ".safetensors":
                    raise CheckpointError(
                        f"CLIP weights {path}: only .safetensors files are loaded (pickle checkpoints such "
                        "as .bin/.pt/.pth are never opened); convert the file to safetensors first"
                    )
                checkpoint = str(path)
            else:
                tags = open_clip.list_pretrained_tags_by_model(model_name)
                raise CheckpointError(
                    f"CLIP pretrained={pretrained!r}: no such file, and not an open_clip tag of "
                    f"{model_name!r} (tags: {', '.join(tags) or 'none'})"
                )
        if quick_gelu is None:
            quick_gelu = True
        if quick_gelu:
            kwargs["force_quick_gelu"] = True
        else:
            kwargs["quick_gelu"] = False
        model = open_clip.create_model(model_name, pretrained=checkpoint, device=device, **kwargs)
        model = model.to(dtype=dtype).eval().requires_grad_(False)
        cfg = getattr(model.visual, "preprocess_cfg", None) or {}
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        return cls(
            model=model,
            image_size=size,
            mean=tuple(cfg.get("mean", CLIP_MEAN)),
            std=tuple(cfg.get("std", CLIP_STD)),
            device=torch.device(device),
            dtype=dtype,
            batch_size=batch_size,
        )

    @torch.inference_mode()
    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] float in [0, 1] -> [N, D] float32 unit-norm embeddings on the CPU."""
        x = _check_frames(frames)
        if x.shape[0] == 0:
            raise ShapeError("frames: expected at least one frame, got 0")
        out = []
        for chunk in x.split(max(1, self.batch_size)):
            pixels = clip_preprocess(chunk.to(self.device), self.image_size, self.mean, self.std)
            z = self.model.encode_image(pixels.to(self.dtype))
            out.append(F.normalize(z.float(), dim=-1).cpu())
        return torch.cat(out)


def storymem_keyframes(
    frames: torch.Tensor,
    embedder: ClipEmbedder,
    *,
    stored: torch.Tensor | None = None,
    scorer: AestheticScorer | None = None,
    aesthetic_min: float = 3.0,
    max_keyframes: int = 3,
    start_threshold: float = 0.9,
    threshold_step: float = 0.01,
    duplicate_threshold: float = 0.9,
) -> tuple[list[int], torch.Tensor]:
    """StoryMem's keyframe extraction for one finished shot, end to end.

    Selection runs on :func:`storymem_presize` frames (CLIP embeddings and aesthetic scores); the
    duplicate check embeds the chosen full-size frames, as StoryMem does.

    Args:
        frames: [N, 3, H, W] decoded frames of the shot in [0, 1], time order.
        stored: [K, D] embeddings of every keyframe stored so far (full-size frames, ``embedder(frames)``).
    Returns:
        (sorted frame indices, their [len, D] full-size embeddings to add to ``stored``).
    """
    small = storymem_presize(frames)
    scores = scorer(small) if scorer is not None else None
    candidates = select_keyframes(
        embedder(small),
        None,
        scores,
        aesthetic_min=aesthetic_min,
        max_keyframes=max_keyframes,
        start_threshold=start_threshold,
        threshold_step=threshold_step,
    )
    if not candidates:
        return [], torch.zeros(0, 0)
    full = embedder(frames[candidates])
    keep = drop_stored_duplicates(full, stored, duplicate_threshold)
    return [candidates[j] for j in keep], full[keep]
