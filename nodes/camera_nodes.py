"""Camera Trajectory: a shot's camera for the camera policies (Context-as-Memory), from JSON or a preset.

JSON (as in story scripts, SPEC 6): one pose ``{"x": m, "z": m, "yaw": deg, "fov": deg}`` or a list of
poses with a ``frame`` key. Presets: static, pan (turn by ``amount`` degrees), orbit (circle ``amount``
degrees around the point ``distance`` metres ahead), dolly (move ``amount`` metres forward), over
``frames`` frames, starting at (x, z) looking along yaw. Outputs the CAMERA_TRAJECTORY (for Keyframe
Query Retrieve and Update Memory), a top-down picture of it and its JSON.
"""

from __future__ import annotations

import json
from typing import Any

from comfy_api.latest import io, ui

from ..memento_core.camera import PRESETS, CameraError, parse_camera, preset_path
from ..memento_core.errors import MementoError
from ..memento_core.memory import MemoryFrame
from ..memento_core.preview import camera_map
from .types import CameraTrajectorySocket

CATEGORY = "Memento"
NODE = "Camera Trajectory"
JSON_CHOICE = "json"


class MementoCameraTrajectory(io.ComfyNode):
    """A shot's camera: JSON text or a preset with parameters."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        """Preset or JSON, the pose parameters, frames."""
        return io.Schema(
            node_id="MementoCameraTrajectory",
            display_name="Camera Trajectory",
            category=CATEGORY,
            description="A shot's camera on the ground plane (x, z in metres, yaw 0 = +z, 90 = +x): one pose "
            "or keyframes along the shot, for the camera memory policies (fov, memento+fov).",
            inputs=[
                io.Combo.Input(
                    "preset",
                    options=[JSON_CHOICE, *PRESETS],
                    default="static",
                    tooltip="json: the 'json' text; "
                    + "; ".join(f"{name}: {what}" for name, what in PRESETS.items()),
                ),
                io.Float.Input("x", default=0.0, min=-10000.0, max=10000.0, step=0.1, tooltip="Metres."),
                io.Float.Input("z", default=0.0, min=-10000.0, max=10000.0, step=0.1, tooltip="Metres."),
                io.Float.Input(
                    "yaw", default=0.0, min=-360.0, max=360.0, step=1.0, tooltip="Degrees; 0 = +z."
                ),
                io.Float.Input("fov", default=60.0, min=1.0, max=179.0, step=1.0, tooltip="Horizontal FOV."),
                io.Float.Input(
                    "amount",
                    default=30.0,
                    min=-3600.0,
                    max=3600.0,
                    step=1.0,
                    tooltip="pan / orbit: degrees; dolly: metres.",
                ),
                io.Float.Input(
                    "distance", default=3.0, min=0.1, max=1000.0, step=0.1, tooltip="orbit: radius."
                ),
                io.Int.Input("frames", default=81, min=1, max=1025, tooltip="The shot's frames."),
                io.String.Input(
                    "json",
                    multiline=True,
                    default="",
                    optional=True,
                    tooltip='With preset json: {"x": 0, "z": 0, "yaw": 0, "fov": 60}, or a list of such '
                    'poses each with a "frame".',
                ),
            ],
            outputs=[
                CameraTrajectorySocket.Output("camera", display_name="camera"),
                io.Image.Output("map", display_name="map"),
                io.String.Output("camera_json", display_name="camera_json"),
            ],
        )

    @classmethod
    def execute(
        cls,
        preset: str,
        x: float,
        z: float,
        yaw: float,
        fov: float,
        amount: float,
        distance: float,
        frames: int,
        json: str = "",
    ) -> io.NodeOutput:
        """Parse or build the path; draw it."""
        try:
            if preset == JSON_CHOICE:
                path = parse_camera(_json(json), "json", int(frames))
                if path is None:
                    raise ValueError(f"{NODE}: 'json' is empty or null; give a pose or a list of poses.")
            else:
                path = preset_path(preset, int(frames), x, z, yaw, fov, amount, distance)
        except (CameraError, MementoError) as exc:
            raise ValueError(f"{NODE}: {exc}") from exc
        text = _dumps(path.to_json())
        keys = path.keys
        frames_drawn = [_frame(f"k{i}", pose) for i, (_, pose) in enumerate(keys)]
        picture = camera_map(frames_drawn, path.targets(keys[-1][0] + 1))
        return io.NodeOutput(path, picture[None], text, ui=ui.PreviewText(text))


def _json(text: str) -> Any:
    try:
        return json.loads(text or "null")
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{NODE}: 'json' is not valid JSON ({exc}).") from exc


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=1)


def _frame(frame_id: str, pose: Any) -> MemoryFrame:
    """A placeholder memory frame that only carries a pose (to draw a path with camera_map)."""
    import torch

    return MemoryFrame(frame_id=frame_id, latent=torch.zeros(16, 1, 1), abs_frame=0, camera=pose)


NODES: list[type[io.ComfyNode]] = [MementoCameraTrajectory]
