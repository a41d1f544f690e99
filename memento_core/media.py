"""Video files: write a clip as H.264 mp4, read one back, join shots into one story video.

PyAV (``av``, a ComfyUI dependency) does the encoding; imported lazily so the rest of memento_core works
without it. Clips are [3, F, H, W] in [-1, 1] (the VAE's convention); files are yuv420p H.264, so odd
sizes are padded to even by repeating the last row/column.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["FPS", "join_mp4", "probe_frames", "read_mp4", "rgb_to_yuv420p", "to_uint8_frames", "write_mp4"]

#: Wan2.2 and Memento sample at 16 frames per second.
FPS = 16


def _av() -> Any:
    try:
        import av
    except ImportError as exc:  # pragma: no cover - av ships with ComfyUI and requirements.txt
        raise ImportError("writing mp4 files needs PyAV: pip install av") from exc
    return av


def to_uint8_frames(video: Tensor) -> Tensor:
    """[3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8 (what video files and PNGs hold)."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a clip [3, F, H, W], got {list(video.shape)}")
    frames = ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).contiguous()


def _even(frames: Tensor) -> Tensor:
    _, h, w, _ = frames.shape
    if h % 2:
        frames = torch.cat([frames, frames[:, -1:]], 1)
    if w % 2:
        frames = torch.cat([frames, frames[:, :, -1:]], 2)
    return frames


#: BT.601 limited-range RGB -> YCbCr (what FFmpeg's swscale assumes for untagged SD video).
_YCBCR = torch.tensor(
    [
        [0.256788235, 0.504129412, 0.097905882],
        [-0.148223529, -0.290992157, 0.439215686],
        [0.439215686, -0.367788235, -0.071427451],
    ],
    dtype=torch.float64,
)
_YCBCR_OFFSET = torch.tensor([16.0, 128.0, 128.0], dtype=torch.float64)
_RGB_FROM_YCBCR = torch.linalg.inv(_YCBCR)


def rgb_to_yuv420p(frames: Tensor) -> Tensor:
    """[F, H, W, 3] uint8 RGB (H, W even) -> [F, H·3/2, W] uint8 planar yuv420p (Y, then U, then V).

    Done here, in float64, rather than by FFmpeg's swscale, whose SIMD paths gave the encoder inputs that
    differed from one call to the next for the same frames; the encoded bytes of a clip must depend on
    its frames only (a resumed run gives the frames of an uninterrupted one). Chroma: the mean of each
    2x2 block."""
    f, h, w, _ = frames.shape
    ycc = frames.to(torch.float64) @ _YCBCR.T + _YCBCR_OFFSET  # [F, H, W, 3]
    y = ycc[..., 0]
    chroma = ycc[..., 1:].reshape(f, h // 2, 2, w // 2, 2, 2).mean(dim=(2, 4))  # [F, H/2, W/2, 2]
    planes = torch.cat([y.reshape(f, -1), chroma[..., 0].reshape(f, -1), chroma[..., 1].reshape(f, -1)], 1)
    return planes.round().clamp(0, 255).to(torch.uint8).reshape(f, h * 3 // 2, w).contiguous()


def yuv420p_to_rgb(planes: Tensor, height: int, width: int) -> Tensor:
    """[H·3/2, W] uint8 planar yuv420p -> [H, W, 3] uint8 RGB (BT.601 limited range, the inverse of
    :func:`rgb_to_yuv420p`'s matrix; each chroma sample covers its 2x2 block).

    Done here, in float64, for the same reason as the encoder's side: FFmpeg's swscale gave decoded RGB
    that differed between runs for the same file under load, and a resumed run's story must read back
    as the uninterrupted one's."""
    flat = planes.reshape(-1).to(torch.float64)
    n, c = height * width, (height // 2) * (width // 2)

    def upsampled(plane: Tensor) -> Tensor:  # [H/2·W/2] -> [H, W]
        return plane.reshape(height // 2, width // 2).repeat_interleave(2, 0).repeat_interleave(2, 1)

    y = flat[:n].reshape(height, width)
    ycc = torch.stack([y, upsampled(flat[n : n + c]), upsampled(flat[n + c :])], dim=-1) - _YCBCR_OFFSET
    rgb = ycc @ _RGB_FROM_YCBCR.T
    return rgb.round().clamp(0, 255).to(torch.uint8)


def _decoded_rgb(frame: Any) -> Tensor:
    """One decoded frame -> [H, W, 3] uint8: yuv420p (what write_mp4 makes) converted here, anything
    else through FFmpeg."""
    if frame.format.name == "yuv420p" and frame.height % 2 == 0 and frame.width % 2 == 0:
        planes = torch.from_numpy(frame.to_ndarray())
        if planes.shape == (frame.height * 3 // 2, frame.width):
            return yuv420p_to_rgb(planes, frame.height, frame.width)
    return torch.from_numpy(frame.to_ndarray(format="rgb24"))


def _encode(clips: Iterable[Tensor], path: Path, fps: int, crf: int) -> Path:
    """Encode clips [F, H, W, 3] uint8 one after another (each is read only when its turn comes)."""
    av = _av()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = None
        for clip in clips:
            clip = _even(clip)
            if stream is None:
                stream = container.add_stream("libx264", rate=Fraction(fps))
                stream.width, stream.height = clip.shape[2], clip.shape[1]
                stream.pix_fmt = "yuv420p"
                # One encoder thread: x264's frame threads make the bytes (and decoded frames) depend
                # on thread timing, and a resumed run must give the frames of an uninterrupted one.
                stream.options = {"crf": str(crf), "preset": "medium"}
            elif (clip.shape[2], clip.shape[1]) != (stream.width, stream.height):
                raise ValueError(
                    f"cannot join clips of different sizes: {clip.shape[2]}x{clip.shape[1]} after "
                    f"{stream.width}x{stream.height}"
                )
            for frame in rgb_to_yuv420p(clip).numpy():
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="yuv420p")))
        if stream is None:
            raise ValueError("no frames to write")
        container.mux(stream.encode(None))
    os.replace(tmp, path)
    return path


def write_mp4(video: Tensor, path: str | os.PathLike[str], fps: int = FPS, crf: int = 17) -> Path:
    """Write a clip [3, F, H, W] in [-1, 1] as an H.264 mp4 at ``fps`` (atomically) -> the path."""
    return _encode([to_uint8_frames(video)], Path(path), fps, crf)


def read_mp4(path: str | os.PathLike[str]) -> Tensor:
    """Every frame of a video file -> [F, H, W, 3] uint8."""
    av = _av()
    with av.open(str(path)) as container:
        frames = [_decoded_rgb(f) for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path}: no video frames")
    return torch.stack(frames)


def join_mp4(
    paths: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], fps: int = FPS, crf: int = 17
) -> Path:
    """Concatenate video files, shot after shot, into one mp4 -> the path.

    Files written by :func:`write_mp4` with the same size share their H.264 parameters, so their packets
    are copied as they are (no re-encoding: exact, fast, deterministic). Anything else is decoded and
    re-encoded at ``fps`` / ``crf``.
    """
    if not paths:
        raise ValueError("join_mp4: no shots to join")
    target = Path(out)
    if _same_stream_parameters(paths):
        return _remux(paths, target)
    return _encode((read_mp4(p) for p in paths), target, fps, crf)


def _same_stream_parameters(paths: Sequence[str | os.PathLike[str]]) -> bool:
    av = _av()
    seen = set()
    for p in paths:
        with av.open(str(p)) as container:
            if len(container.streams) != 1 or not container.streams.video:
                return False
            ctx = container.streams.video[0].codec_context
            seen.add((ctx.name, ctx.width, ctx.height, ctx.pix_fmt, bytes(ctx.extradata or b"")))
    return len(seen) == 1


def _remux(paths: Sequence[str | os.PathLike[str]], target: Path) -> Path:
    av = _av()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    offset = 0
    with av.open(str(tmp), mode="w", format="mp4") as output:
        stream = None
        for p in paths:
            with av.open(str(p)) as container:
                source = container.streams.video[0]
                if stream is None:
                    stream = output.add_stream_from_template(source)
                end = offset
                for packet in container.demux(source):
                    if packet.dts is None:  # the demuxer's final empty packet
                        continue
                    packet.pts += offset
                    packet.dts += offset
                    end = max(end, packet.pts + (packet.duration or 0))
                    packet.stream = stream
                    output.mux(packet)
                offset = end
    os.replace(tmp, target)
    return target


def probe_frames(path: str | os.PathLike[str]) -> int:
    """The number of video packets (frames) an mp4 holds, read without decoding; ``ValueError`` naming
    the file when it is missing, truncated or not a video."""
    av = _av()
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            return sum(1 for packet in container.demux(stream) if packet.size)
    except (OSError, IndexError, av.FFmpegError) as exc:
        raise ValueError(f"{path}: not a readable video file ({exc})") from exc
