"""Video files: the RGB -> yuv420p conversion done before the encoder, and byte-stable encodes.

Expected values are BT.601 limited range written out by hand (white 235/128/128, black 16/128/128,
red 81/90/240), and the invariant a resume relies on: the same frames give the same file bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from memento_core.media import read_mp4, rgb_to_yuv420p, to_uint8_frames, write_mp4, yuv420p_to_rgb


def test_rgb_to_yuv420p_known_colours_and_layout() -> None:
    frames = torch.zeros(1, 4, 6, 3, dtype=torch.uint8)
    frames[0, :2] = 255  # white top half
    frames[0, 2:, :, 0] = 255  # red bottom half
    yuv = rgb_to_yuv420p(frames)[0]
    assert yuv.shape == (6, 6) and yuv.dtype == torch.uint8
    y = yuv[:4]
    assert y[:2].eq(235).all() and y[2:].eq(81).all()
    u, v = yuv[4:5].reshape(2, 3), yuv[5:6].reshape(2, 3)  # 2x3 chroma planes, row-major
    assert u[0].eq(128).all() and v[0].eq(128).all()  # white
    assert u[1].eq(90).all() and v[1].eq(240).all()  # red
    assert rgb_to_yuv420p(torch.zeros(1, 2, 2, 3, dtype=torch.uint8)).flatten().tolist() == [16] * 4 + [
        128,
        128,
    ]


def test_the_same_frames_give_the_same_bytes_and_close_colours(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    video = (torch.rand(3, 1, 1, 1, generator=g) * 2 - 1) + 0.3 * torch.nn.functional.interpolate(
        torch.randn(3, 9, 4, 6, generator=g), size=(32, 48)
    )
    video = video.clamp(-1, 1)
    digests = {
        hashlib.sha256(write_mp4(video, tmp_path / f"{i}.mp4").read_bytes()).digest() for i in range(5)
    }
    assert len(digests) == 1
    back = read_mp4(write_mp4(video, tmp_path / "hq.mp4", crf=1)).float()
    assert (back - to_uint8_frames(video).float()).abs().mean() < 6  # 4:2:0 chroma and H.264, near lossless


def test_yuv420p_to_rgb_inverts_the_encoder_conversion_and_agrees_with_ffmpeg(tmp_path: Path) -> None:
    """Hand values: BT.601 limited-range Y 235 / U 128 / V 128 is white, Y 16 black, (82, 90, 240) red.
    Flat 2x2 blocks survive rgb_to_yuv420p -> yuv420p_to_rgb within rounding; and read_mp4 (which now
    converts yuv420p itself) is within 4 levels of FFmpeg's own rgb24 conversion of the same file and
    at least as close to the frames that were encoded."""
    import av

    def planes(y: int, u: int, v: int) -> torch.Tensor:
        return torch.tensor([y] * 4 + [u, v], dtype=torch.uint8).reshape(3, 2)

    assert yuv420p_to_rgb(planes(235, 128, 128), 2, 2)[0, 0].tolist() == [255, 255, 255]
    assert yuv420p_to_rgb(planes(16, 128, 128), 2, 2)[0, 0].tolist() == [0, 0, 0]
    # G = 1.164·66 + 0.392·38 - 0.813·112 = 0.67: the rounded YUV of pure red reads back as (255, 1, 0)
    assert yuv420p_to_rgb(planes(82, 90, 240), 2, 2)[0, 0].tolist() == [255, 1, 0]
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (2, 4, 6, 3), generator=g, dtype=torch.uint8)
    frames = blocks.repeat_interleave(2, 1).repeat_interleave(2, 2)  # flat 2x2 blocks: chroma is exact
    back = torch.stack([yuv420p_to_rgb(p, 8, 12) for p in rgb_to_yuv420p(frames)])
    assert (back.int() - frames.int()).abs().max() <= 2
    video = torch.rand(3, 3, 32, 48, generator=g) * 2 - 1  # [3, F, H, W]
    path = write_mp4(video, tmp_path / "c.mp4", crf=1)
    with av.open(str(path)) as container:
        ffmpeg = torch.stack(
            [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
        )
    ours = read_mp4(path)
    assert ours.shape == ffmpeg.shape == (3, 32, 48, 3)
    assert (ours.int() - ffmpeg.int()).abs().max() <= 4  # swscale's integer path rounds down ~1 level
    source = to_uint8_frames(video).int()
    ours_err = (ours.int() - source).abs().float().mean()
    ffmpeg_err = (ffmpeg.int() - source).abs().float().mean()
    assert ours_err <= ffmpeg_err + 0.05, (ours_err, ffmpeg_err)  # at least as close to the frames
