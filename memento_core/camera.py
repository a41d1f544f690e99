"""Cameras of shots (SPEC 6): one pose, or keyframes along a shot's frames, and the presets of the nodes.

JSON (story scripts' ``scenes[].camera[i]`` and the Camera Trajectory node): ``null``, one pose
``{"x": m, "z": m, "yaw": deg, "fov": deg}`` (``fov`` optional, default 60, in (0, 180)), or a list of
poses each with a ``frame`` key (0 .. frames - 1) for a trajectory. Yaw 0 looks along +z, 90 along +x.
Between keys, x, z and fov are interpolated linearly and yaw along the shorter arc; frames before the first
key or after the last take the nearest key. A remembered frame stores the pose at its frame; a shot's
target for retrieval is its start, middle and end poses (SPEC 6).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import MementoError
from .fov import CameraPose

__all__ = ["PRESETS", "CameraError", "CameraPath", "parse_camera", "preset_path"]

_POSE_KEYS = ("x", "z", "yaw", "fov")


class CameraError(MementoError):
    """A camera description is malformed; the message names the field."""


@dataclass(frozen=True)
class CameraPath:
    """A shot's camera: ``keys`` ((frame, pose), ...) sorted by frame, at least one (a single key at frame
    0 is a static camera)."""

    keys: tuple[tuple[int, CameraPose], ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise CameraError("camera: a path needs at least one pose")
        frames = [f for f, _ in self.keys]
        if frames != sorted(frames) or len(set(frames)) != len(frames):
            raise CameraError(f"camera: key frames must be distinct and increasing, got {frames}")

    @classmethod
    def static(cls, pose: CameraPose) -> CameraPath:
        return cls(((0, pose),))

    @property
    def is_static(self) -> bool:
        return len(self.keys) == 1

    def pose_at(self, frame: int) -> CameraPose:
        """The pose at pixel frame ``frame`` of the shot (interpolated, nearest key outside the keys)."""
        first, last = self.keys[0], self.keys[-1]
        if frame <= first[0]:
            return first[1]
        if frame >= last[0]:
            return last[1]
        for (f0, p0), (f1, p1) in zip(self.keys, self.keys[1:], strict=False):
            if f0 <= frame <= f1:
                u = (frame - f0) / (f1 - f0)
                turn = (p1.yaw - p0.yaw + 180.0) % 360.0 - 180.0  # the shorter arc
                return CameraPose(
                    x=p0.x + u * (p1.x - p0.x),
                    z=p0.z + u * (p1.z - p0.z),
                    yaw=(p0.yaw + u * turn) % 360.0,
                    fov=p0.fov + u * (p1.fov - p0.fov),
                )
        return last[1]  # pragma: no cover - the keys cover every frame between first and last

    def targets(self, frames: int) -> list[CameraPose]:
        """The poses a shot of ``frames`` pixel frames is retrieved for: start, middle and end (one for a
        static camera)."""
        if self.is_static:
            return [self.keys[0][1]]
        picks = sorted({0, (frames - 1) // 2, frames - 1})
        return [self.pose_at(f) for f in picks]

    def to_json(self) -> dict[str, float] | list[dict[str, float]]:
        """One pose (static) or the keyed list, as in scripts."""
        if self.is_static and self.keys[0][0] == 0:
            return self.keys[0][1].to_json()
        return [{"frame": f, **p.to_json()} for f, p in self.keys]


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CameraError(f"{field}: expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise CameraError(f"{field}: expected a finite number, got {value!r}")
    return number


def _pose(data: Any, where: str) -> CameraPose:
    if not isinstance(data, Mapping):
        raise CameraError(f'{where}: expected a pose {{"x", "z", "yaw", "fov"}}, got {type(data).__name__}')
    unknown = sorted(set(data) - {*_POSE_KEYS, "frame"})
    if unknown:
        raise CameraError(f"{where}: unknown field(s) {unknown}; a pose has x, z, yaw, fov (and frame)")
    for key in ("x", "z", "yaw"):
        if key not in data:
            raise CameraError(f"{where}.{key}: missing (a pose needs x, z and yaw)")
    values = {key: _number(data[key], f"{where}.{key}") for key in _POSE_KEYS if key in data}
    if "fov" in values and not 0.0 < values["fov"] < 180.0:
        raise CameraError(f"{where}.fov: expected an angle in (0, 180) degrees, got {data['fov']!r}")
    return CameraPose(**values)


def parse_camera(data: Any, where: str = "camera", frames: int | None = None) -> CameraPath | None:
    """A script's camera entry -> :class:`CameraPath` (None for ``null``); errors name ``where``.

    frames: the shot's pixel frames, when known, to check key frames lie in 0 .. frames - 1.
    """
    if data is None:
        return None
    if isinstance(data, Mapping):
        if "frame" in data:
            raise CameraError(
                f"{where}.frame: a single pose has no frame; give a list of poses for a trajectory"
            )
        return CameraPath.static(_pose(data, where))
    if isinstance(data, Sequence) and not isinstance(data, str):
        if not data:
            raise CameraError(f"{where}: an empty list; give one pose, a list of poses with frames, or null")
        keys = []
        for i, entry in enumerate(data):
            at = f"{where}[{i}]"
            pose = _pose(entry, at)
            if "frame" not in entry:
                raise CameraError(f"{at}.frame: missing (each pose of a trajectory names its frame)")
            frame = entry["frame"]
            if isinstance(frame, bool) or not isinstance(frame, int) or frame < 0:
                raise CameraError(f"{at}.frame: expected a frame number >= 0, got {frame!r}")
            if frames is not None and frame >= frames:
                raise CameraError(f"{at}.frame: {frame} is past the shot's last frame ({frames - 1})")
            keys.append((frame, pose))
        keys.sort(key=lambda k: k[0])
        if len({f for f, _ in keys}) != len(keys):
            raise CameraError(f"{where}: two poses name the same frame")
        return CameraPath(tuple(keys))
    raise CameraError(f"{where}: expected a pose, a list of poses or null, got {type(data).__name__}")


#: The Camera Trajectory node's presets and what their parameters mean.
PRESETS = {
    "static": "stands at (x, z) looking along yaw",
    "pan": "turns in place from yaw by `amount` degrees",
    "orbit": "circles `amount` degrees around the point `distance` metres ahead, facing it",
    "dolly": "moves `amount` metres along its view direction",
}


def preset_path(
    kind: str,
    frames: int,
    x: float = 0.0,
    z: float = 0.0,
    yaw: float = 0.0,
    fov: float = 60.0,
    amount: float = 0.0,
    distance: float = 3.0,
) -> CameraPath:
    """A preset trajectory over a shot of ``frames`` frames (keys at the first and last frame)."""
    start = CameraPose(x, z, yaw, fov)
    last = max(frames - 1, 1)
    if kind == "static":
        return CameraPath.static(start)
    if kind == "pan":
        return CameraPath(((0, start), (last, CameraPose(x, z, yaw + amount, fov))))
    if kind == "dolly":
        dx, dz = start.direction()
        return CameraPath(((0, start), (last, CameraPose(x + amount * dx, z + amount * dz, yaw, fov))))
    if kind == "orbit":
        dx, dz = start.direction()
        cx, cz = x + distance * dx, z + distance * dz  # the point it circles, straight ahead
        keys = []
        steps = min(last, max(1, math.ceil(abs(amount) / 30.0)))  # a key every <= 30 degrees: round
        for i in range(steps + 1):
            a = math.radians(yaw + 180.0 + amount * i / steps)  # from the centre back to the camera
            px, pz = cx + distance * math.sin(a), cz + distance * math.cos(a)
            keys.append((round(last * i / steps), CameraPose(px, pz, math.degrees(a) + 180.0, fov)))
        return CameraPath(tuple(keys))
    raise CameraError(f"camera preset: expected one of {', '.join(PRESETS)}, got {kind!r}")
