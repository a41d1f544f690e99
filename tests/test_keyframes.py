"""Tests of memento_core.keyframes: StoryMem's keyframe scan on hand-built embeddings with known cosine
similarities, the CLIP embedder (random-weight ViT-B-32) and the sink + recent bank policy."""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from memento_core.errors import CheckpointError, MementoError, ShapeError
from memento_core.keyframes import (
    AestheticScorer,
    ClipEmbedder,
    clip_preprocess,
    drop_stored_duplicates,
    select_keyframes,
    storymem_analysis_size,
    storymem_keyframes,
    storymem_presize,
    storymem_retain,
)

OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def _at_angles(degrees: list[float], scale: list[float] | None = None) -> torch.Tensor:
    """Vectors in the x-y plane of R^3 at the given angles: cos-similarity of i, j = cos(angle_i - angle_j).

    Optional per-row magnitudes check that embeddings are normalised inside.
    """
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180.0
    v = torch.stack([torch.cos(rad), torch.sin(rad), torch.zeros_like(rad)], dim=1)
    if scale is not None:
        v = v * torch.tensor(scale, dtype=torch.float64)[:, None]
    return v.float()


# ---------------------------------------------------------------------------------------------------
# select_keyframes


def test_threshold_drops_until_at_most_three() -> None:
    # Angles: 0, 40 (frame 1: never scanned), 10, 30, 60, 90, 120.
    # Threshold 0.9 accepts gaps > 25.84 deg: keys 0, 3 (30), 4 (60), 5 (90), 6 (120) -> 5 > 3.
    # 30-deg gaps (cos 30 = 0.8660) stop being accepted once the threshold is <= 0.866 (0.86 after 4 steps);
    # then: 0 -> 4 (gap 60) -> 6 (gap 60) = 3 keyframes.
    emb = _at_angles([0, 40, 10, 30, 60, 90, 120], scale=[1, 2, 3, 0.5, 7, 1, 4])
    assert select_keyframes(emb) == [0, 4, 6]
    # At most one keyframe: only the first frame survives the drop.
    assert select_keyframes(emb, max_keyframes=1) == [0]
    # Enough room: no drop needed at 0.9.
    assert select_keyframes(emb, max_keyframes=5) == [0, 3, 4, 5, 6]


def test_scan_starts_at_frame_two_like_the_reference() -> None:
    emb = _at_angles([0, 60, 5])
    # Frame 1 is never compared (StoryMem's loop starts at index 2); frame 2 is 5 deg from frame 0.
    assert select_keyframes(emb) == [0]
    # Scanning from frame 1: 0 -> 1 (gap 60) -> 2 (gap 55).
    assert select_keyframes(emb, scan_start=1) == [0, 1, 2]


def test_similarity_must_be_strictly_below_threshold() -> None:
    # Orthogonal frames have similarity exactly 0: a threshold of 0 rejects them, anything above accepts.
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert select_keyframes(emb, start_threshold=0.0) == [0]
    assert select_keyframes(emb, start_threshold=1e-6) == [0, 2]


def test_aesthetic_filter() -> None:
    emb = _at_angles([0, 90, 45, 100, 10])
    # Frame 0 scores below 3.0; frame 1 scores exactly 3.0 (kept) and is the first keyframe.
    # Scan from 2: 45 (gap 45 from 90) yes; frame 3 low quality; 10 (gap 35 from 45, cos 0.819) yes.
    scores = torch.tensor([2.0, 3.0, 5.0, 1.0, 5.0])
    assert select_keyframes(emb, aesthetic=scores) == [1, 2, 4]
    # Without scores frame 0 starts: 0 -> 45 -> 100 (55 from 45) -> 10 (90 from 100) = 4 keyframes; at a
    # threshold <= cos 45 = 0.7071 the 45-deg step is refused: 0 -> 100 -> 10 (gap 90).
    assert select_keyframes(emb) == [0, 3, 4]
    # A low-quality frame is skipped by the scan and never becomes the reference "last keyframe".
    assert select_keyframes(_at_angles([0, 0, 50, 55]), aesthetic=torch.tensor([5.0, 5, 0, 5])) == [0, 3]
    assert select_keyframes(emb, aesthetic=torch.zeros(5)) == []
    assert select_keyframes(emb, aesthetic=scores, aesthetic_min=6.0) == []


def test_duplicates_of_stored_keyframes_are_dropped() -> None:
    emb = _at_angles([0, 40, 10, 30, 60, 90, 120])
    # Stored at 62 deg: similarity to frame 4 (60 deg) is cos 2 = 0.9994 > 0.9 -> dropped. Stored at
    # 150 deg: similarity to frame 6 (120) is cos 30 = 0.866 -> kept. The selection is not redone.
    stored = _at_angles([62, 150], scale=[3, 0.2])
    assert select_keyframes(emb, stored) == [0, 6]
    # A stored vector orthogonal to the plane removes nothing; an empty bank neither.
    assert select_keyframes(emb, torch.tensor([[0.0, 0.0, 1.0]])) == [0, 4, 6]
    assert select_keyframes(emb, torch.zeros(0, 3)) == [0, 4, 6]
    # Strictly above the duplicate threshold: 25 deg apart (0.9063) drops at 0.9, not at 0.95.
    assert drop_stored_duplicates(_at_angles([0, 90]), _at_angles([25])) == [1]
    assert drop_stored_duplicates(_at_angles([0, 90]), _at_angles([25]), threshold=0.95) == [0, 1]


def test_select_keyframes_validates_inputs() -> None:
    emb = _at_angles([0, 10, 20])
    with pytest.raises(ShapeError, match="aesthetic"):
        select_keyframes(emb, aesthetic=torch.ones(2))
    with pytest.raises(ShapeError, match="embeddings"):
        select_keyframes(torch.ones(3))
    with pytest.raises(ShapeError, match="stored"):
        select_keyframes(emb, torch.ones(1, 5))
    with pytest.raises(MementoError, match="max_keyframes"):
        select_keyframes(emb, max_keyframes=0)
    with pytest.raises(MementoError, match="threshold_step"):
        select_keyframes(emb, threshold_step=0.0)
    assert select_keyframes(torch.zeros(0, 4)) == []


# ---------------------------------------------------------------------------------------------------
# preprocessing sizes


def test_storymem_analysis_size() -> None:
    # 480x832: rounded 476x840 is above 256*28*28 = 200704 px; beta = sqrt(480*832/200704) = 1.4106;
    # floor(340.3/28)*28 = 336, floor(589.8/28)*28 = 588.
    assert storymem_analysis_size(480, 832) == (336, 588)
    # 64x96: rounded 56x84 is below 48*28*28 = 37632 px; beta = sqrt(37632/6144) = 2.4749;
    # ceil(158.4/28)*28 = 168, ceil(237.6/28)*28 = 252.
    assert storymem_analysis_size(64, 96) == (168, 252)
    # 280x420 = 10x15 patches of 28, area 117600 within bounds: unchanged.
    assert storymem_analysis_size(280, 420) == (280, 420)
    frames = torch.rand(2, 3, 64, 96)
    assert storymem_presize(frames).shape == (2, 3, 168, 252)


def test_clip_preprocess_squashes_to_224() -> None:
    frames = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    manual = F.interpolate(frames, size=(224, 224), mode="bilinear", align_corners=False)
    manual = (manual - OPENAI_MEAN) / OPENAI_STD
    out = clip_preprocess(frames)
    assert out.shape == (2, 3, 224, 224)
    torch.testing.assert_close(out, manual, rtol=0, atol=1e-6)
    # Values outside [0, 1] are clamped first; a gray frame maps to (0.5 - mean) / std everywhere.
    gray = clip_preprocess(torch.full((1, 1, 10, 30), 0.5))
    torch.testing.assert_close(gray, ((0.5 - OPENAI_MEAN) / OPENAI_STD).expand(1, 3, 224, 224))
    torch.testing.assert_close(
        clip_preprocess(torch.full((1, 3, 8, 8), 7.0)), clip_preprocess(torch.ones(1, 3, 8, 8))
    )
    with pytest.raises(ShapeError, match="frames"):
        clip_preprocess(torch.rand(3, 64, 96))


# ---------------------------------------------------------------------------------------------------
# ClipEmbedder with a random-weight ViT-B-32


@pytest.fixture(scope="module")
def embedder() -> ClipEmbedder:
    torch.manual_seed(0)
    return ClipEmbedder.create("ViT-B-32", pretrained=None)


def test_clip_embedder_shape_norm_and_preprocessing(embedder: ClipEmbedder) -> None:
    frames = torch.rand(3, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    frames[2] = frames[0]
    # Batches of 2 (chunks of 2 + 1 frames): batching must not change the result.
    z = ClipEmbedder(embedder.model, batch_size=2)(frames)
    assert z.shape == (3, 512) and z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    # Identical frames -> similarity 1.
    assert float(z[0] @ z[2]) == pytest.approx(1.0, abs=1e-5)
    # Same as encoding a manual squash resize (64x96 -> 224x224) + normalisation in one batch.
    manual = F.interpolate(frames, size=(224, 224), mode="bilinear", align_corners=False)
    manual = (manual - OPENAI_MEAN) / OPENAI_STD
    with torch.no_grad():
        ref = F.normalize(embedder.model.encode_image(manual), dim=-1)
    torch.testing.assert_close(z, ref, rtol=1e-4, atol=1e-5)
    # StoryMem's OpenAI ViT-B/32 uses QuickGELU: the default when no tag says otherwise.
    assert type(embedder.model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert embedder.image_size == (224, 224)


class _MeanColour(torch.nn.Module):
    """A stand-in image encoder: the mean normalised colour of the CLIP input, [N, 3]."""

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2:] == (224, 224)
        return x.mean(dim=(2, 3))


def test_storymem_keyframes_end_to_end() -> None:
    embedder = ClipEmbedder(_MeanColour())
    g = torch.Generator().manual_seed(2)
    # Dark and light frames: mean colours (x - mean) / std of opposite signs, cosine close to -1.
    a, b = 0.1 * torch.rand(3, 32, 48, generator=g), 1.0 - 0.1 * torch.rand(3, 32, 48, generator=g)
    frames = torch.stack([a, a, a, b, b])

    class Scorer:
        def __call__(self, frames: torch.Tensor) -> torch.Tensor:
            # Aesthetics are scored on the frames at StoryMem's analysis size.
            assert frames.shape == (5, 3, *storymem_analysis_size(32, 48))
            return torch.tensor([5.0, 5.0, 5.0, 5.0, 1.0])

    assert isinstance(Scorer(), AestheticScorer)
    idx, emb = storymem_keyframes(frames, embedder, scorer=Scorer())
    # Identical frames are never below the threshold; frame 3 is the first different one, frame 4 scores
    # below 3.0.
    assert idx == [0, 3]
    # The returned embeddings are those of the full-size frames (what the duplicate check compares).
    torch.testing.assert_close(emb, embedder(frames[[0, 3]]))
    # Against a bank already holding frame a: only b remains.
    idx2, emb2 = storymem_keyframes(frames, embedder, stored=embedder(a[None]))
    assert idx2 == [3]
    torch.testing.assert_close(emb2, embedder(b[None]))
    idx3, emb3 = storymem_keyframes(frames, embedder, scorer=lambda x: torch.zeros(x.shape[0]))
    assert idx3 == [] and emb3.shape[0] == 0


def test_clip_embedder_create_arguments(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import open_clip

    calls: list[tuple[str, str | None, dict]] = []

    class FakeModel(torch.nn.Module):
        visual = SimpleNamespace(preprocess_cfg={"size": 32, "mean": (0.5,) * 3, "std": (0.25,) * 3})

    def fake_create(name: str, pretrained: str | None = None, **kwargs):
        calls.append((name, pretrained, kwargs))
        return FakeModel()

    monkeypatch.setattr(open_clip, "create_model", fake_create)
    weights = tmp_path / "clip.safetensors"
    weights.write_bytes(b"")
    emb = ClipEmbedder.create(pretrained=str(weights))
    assert calls[-1][1] == str(weights) and calls[-1][2]["force_quick_gelu"] is True
    assert emb.image_size == (32, 32) and emb.mean == (0.5, 0.5, 0.5)
    # An open_clip tag: the tag's own activation (laion weights: GELU; openai: QuickGELU).
    ClipEmbedder.create(pretrained="laion2b_s34b_b79k")
    assert calls[-1][1] == "laion2b_s34b_b79k" and calls[-1][2]["quick_gelu"] is False
    ClipEmbedder.create(pretrained="openai")
    assert calls[-1][2]["force_quick_gelu"] is True
    # Pickles are refused before open_clip sees them; unknown names get a readable error.
    pickle = tmp_path / "clip.bin"
    pickle.write_bytes(b"")
    n = len(calls)
    with pytest.raises(CheckpointError, match="safetensors"):
        ClipEmbedder.create(pretrained=str(pickle))
    with pytest.raises(CheckpointError, match="no such file"):
        ClipEmbedder.create(pretrained=str(tmp_path / "missing.safetensors"))
    assert len(calls) == n


def test_missing_open_clip_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ImportError, match="pip install open_clip_torch"):
        ClipEmbedder.create()


# ---------------------------------------------------------------------------------------------------
# storymem_retain


def test_storymem_retain() -> None:
    assert storymem_retain(0) == []
    assert storymem_retain(5) == [0, 1, 2, 3, 4]
    assert storymem_retain(8) == list(range(8))
    # 9 stored, max 8: sink 0, 1, 2 + the 5 most recent (4..8).
    assert storymem_retain(9) == [0, 1, 2, 4, 5, 6, 7, 8]
    # run_example.sh's max 10: sink + 7 most recent of 15 (8..14).
    assert storymem_retain(15, max_frames=10) == [0, 1, 2, 8, 9, 10, 11, 12, 13, 14]
    assert storymem_retain(12, sink=0, max_frames=4) == [8, 9, 10, 11]
    assert storymem_retain(12, sink=4, max_frames=4) == [0, 1, 2, 3]
    with pytest.raises(MementoError, match="sink"):
        storymem_retain(12, sink=5, max_frames=4)
    with pytest.raises(MementoError, match="n_frames"):
        storymem_retain(-1)
