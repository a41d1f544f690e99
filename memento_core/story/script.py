"""Story scripts (SPEC 7): parsing and validation.

A script is JSON::

    {"story_name": str, "story_overview": str (optional), "reconstruct_target": str (optional),
     "scenes": [{"scene_num": int, "video_prompts": [str, ...], "cut": [bool, ...],
                 "first_frame_prompt": [str, ...] (optional, unused)}, ...]}

:func:`load_story` turns it into a :class:`Story` whose ``shots`` list every shot in story order.
Malformed input raises :class:`StoryError`, naming the file and the field (``scenes[1].cut[2]``).
The shot-by-shot renderer lives in :mod:`memento_core.runner`, its command line in
:mod:`memento_core.cli` (``python -m memento_core.story``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..camera import CameraError, CameraPath, parse_camera
from ..errors import MementoError
from ..keyframe_query import split_global_caption

__all__ = ["Story", "StoryError", "StoryShot", "load_story", "parse_story"]

#: The largest scene number (scene numbers name the shots' files: SS_NN).
MAX_SCENE = 9999
#: The only strings read as cut flags: StoryMem's prompt template writes them (with a warning).
_CUT_STRINGS = {"True": True, "False": False}


class StoryError(MementoError):
    """A story script is missing, not JSON, or has a malformed field (the message names both)."""


@dataclass(frozen=True)
class StoryShot:
    """One shot of a story.

    scene: the scene's ``scene_num``; index_in_scene: 0-based position within the scene (Memento seeds
    a shot with ``seed + index_in_scene``); number: 0-based position in the whole story; cut: True for a
    hard cut, False to continue from the previous shot's last frame; global_caption: the text the
    KeyframeQuery's global queries read (SPEC 4.7 rule); camera: the shot's camera (SPEC 6) or None.
    """

    scene: int
    index_in_scene: int
    number: int
    prompt: str
    global_caption: str
    cut: bool
    first_frame_prompt: str | None = None
    camera: CameraPath | None = None

    @property
    def label(self) -> str:
        """``SS_NN`` with 1-based scene and shot numbers, as the reference names its files (01_02)."""
        return f"{self.scene:02d}_{self.index_in_scene + 1:02d}"


@dataclass(frozen=True)
class Story:
    """A parsed story script. shots: every shot in story order; source: where it was read from;
    warnings: what was tolerated while parsing (for example a ``cut`` list shorter than the prompts)."""

    name: str
    overview: str | None
    reconstruct_target: str | None
    shots: tuple[StoryShot, ...]
    source: str = "<text>"
    warnings: tuple[str, ...] = ()

    @property
    def scenes(self) -> list[int]:
        """The scene numbers in story order."""
        return list(dict.fromkeys(s.scene for s in self.shots))

    def to_dict(self) -> dict[str, Any]:
        """The script back in SPEC 7 form (JSON-ready)."""
        scenes: dict[int, dict[str, Any]] = {}
        for s in self.shots:
            scene = scenes.setdefault(s.scene, {"scene_num": s.scene, "video_prompts": [], "cut": []})
            scene["video_prompts"].append(s.prompt)
            scene["cut"].append(s.cut)
            if any(o.camera is not None for o in self.shots if o.scene == s.scene):
                scene.setdefault("camera", []).append(None if s.camera is None else s.camera.to_json())
        out: dict[str, Any] = {"story_name": self.name}
        if self.overview is not None:
            out["story_overview"] = self.overview
        if self.reconstruct_target is not None:
            out["reconstruct_target"] = self.reconstruct_target
        out["scenes"] = list(scenes.values())
        return out


def load_story(path: str | os.PathLike[str]) -> Story:
    """Read and validate a story script file -> :class:`Story` (errors name the file and the field)."""
    source = Path(path)
    if not source.is_file():
        raise StoryError(f"story script {source}: no such file")
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StoryError(f"story script {source}: cannot be read as UTF-8 text ({exc})") from exc
    return parse_story(text, source=str(source))


def parse_story(data: str | Mapping[str, Any], source: str = "<text>") -> Story:
    """Validate a story script given as JSON text or an already-parsed mapping -> :class:`Story`."""
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as exc:
            raise StoryError(
                f"story script {source}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
            ) from exc
        except RecursionError as exc:
            raise StoryError(f"story script {source}: nested too deeply to be a story script") from exc
        except ValueError as exc:  # e.g. an integer with more digits than Python converts
            raise StoryError(f"story script {source}: not a readable story script ({exc})") from exc
    if not isinstance(data, Mapping):
        raise StoryError(f"story script {source}: expected a JSON object at the top, got {_kind(data)}")

    def fail(field: str, expected: str, value: Any) -> StoryError:
        return StoryError(f"story script {source}: field '{field}': expected {expected}, got {_kind(value)}")

    name = data.get("story_name")
    if not isinstance(name, str) or not name.strip():
        raise fail("story_name", "a non-empty string", name)
    overview = data.get("story_overview")
    if overview is not None and not isinstance(overview, str):
        raise fail("story_overview", "a string", overview)
    target = data.get("reconstruct_target")
    if isinstance(target, list) and all(isinstance(t, str) for t in target):
        target = "\n".join(target)  # one "[Person X] description" line per subject
    if target is not None and not isinstance(target, str):
        raise fail("reconstruct_target", "a string (one '[Person X] description' line per subject)", target)
    if isinstance(target, str) and not target.strip():
        target = None

    scenes = data.get("scenes")
    if not isinstance(scenes, list) or not scenes:
        raise fail("scenes", "a non-empty list of scenes", scenes)
    shots: list[StoryShot] = []
    warnings: list[str] = []
    seen: dict[int, int] = {}
    for i, scene in enumerate(scenes):
        where = f"scenes[{i}]"
        if not isinstance(scene, Mapping):
            raise fail(where, "an object with scene_num, video_prompts and cut", scene)
        num = scene.get("scene_num")
        if isinstance(num, bool) or not isinstance(num, int) or not 0 <= num <= MAX_SCENE:
            raise fail(f"{where}.scene_num", f"an integer from 0 to {MAX_SCENE}", num)
        if num in seen:
            raise StoryError(
                f"story script {source}: field '{where}.scene_num': scene {num} is already "
                f"scenes[{seen[num]}]"
            )
        seen[num] = i
        prompts = _strings(scene.get("video_prompts"), f"{where}.video_prompts", fail)
        if not prompts:
            raise fail(f"{where}.video_prompts", "a non-empty list of prompts", prompts)
        cuts = scene.get("cut")
        if not isinstance(cuts, list):
            raise fail(f"{where}.cut", f"a list of {len(prompts)} booleans (one per video prompt)", cuts)
        cuts = list(cuts)
        for j, c in enumerate(cuts):
            if isinstance(c, str) and c in _CUT_STRINGS:
                # StoryMem's prompt template writes the flags as the strings "True" / "False".
                warnings.append(
                    f"{where}.cut[{j}] is the string {c!r}; read as {str(_CUT_STRINGS[c]).lower()}"
                )
                cuts[j] = _CUT_STRINGS[c]
            elif not isinstance(c, bool):
                raise fail(f"{where}.cut[{j}]", "true or false", c)
        if len(cuts) > len(prompts):
            raise StoryError(
                f"story script {source}: field '{where}.cut': has {len(cuts)} entries but "
                f"{where}.video_prompts has {len(prompts)}; give one true/false per prompt"
            )
        if len(cuts) < len(prompts):
            # A real script (6_santa.json, scene 4) lists fewer flags than prompts. A missing flag is
            # a hard cut: the shot then stands on its own instead of continuing a frame nobody asked for.
            warnings.append(
                f"{where}.cut has {len(cuts)} entries for {len(prompts)} prompts; "
                f"shots {len(cuts) + 1}..{len(prompts)} of scene {num} are treated as hard cuts"
            )
            cuts = [*cuts, *[True] * (len(prompts) - len(cuts))]
        first = scene.get("first_frame_prompt")
        firsts = [] if first is None else _strings(first, f"{where}.first_frame_prompt", fail)
        cameras = _cameras(scene.get("camera"), f"{where}.camera", len(prompts), source, fail)
        for j, (prompt, cut) in enumerate(zip(prompts, cuts, strict=True)):
            shots.append(
                StoryShot(
                    scene=num,
                    index_in_scene=j,
                    number=len(shots),
                    prompt=prompt,
                    global_caption=split_global_caption(prompt),
                    cut=cut,
                    first_frame_prompt=firsts[j] if j < len(firsts) else None,
                    camera=cameras[j],
                )
            )
    return Story(
        name=name.strip(),
        overview=overview,
        reconstruct_target=target,
        shots=tuple(shots),
        source=source,
        warnings=tuple(warnings),
    )


def _cameras(value: Any, field: str, n: int, source: str, fail: Any) -> list[CameraPath | None]:
    """``scenes[i].camera``: a list aligned with the prompts (null entries: no camera); shorter lists
    leave the remaining shots without a camera."""
    if value is None:
        return [None] * n
    if not isinstance(value, list):
        raise fail(field, f"a list of up to {n} cameras (one per video prompt; null for none)", value)
    if len(value) > n:
        raise StoryError(
            f"story script {source}: field '{field}': has {len(value)} entries but there are {n} video "
            "prompts"
        )
    try:
        cameras = [parse_camera(entry, f"{field}[{j}]") for j, entry in enumerate(value)]
    except CameraError as exc:
        where, _, what = str(exc).partition(": ")
        raise StoryError(f"story script {source}: field '{where}': {what}") from exc
    return cameras + [None] * (n - len(cameras))


def _strings(value: Any, field: str, fail: Any) -> list[str]:
    if not isinstance(value, list):
        raise fail(field, "a list of strings", value)
    for j, v in enumerate(value):
        if not isinstance(v, str) or not v.strip():
            raise fail(f"{field}[{j}]", "a non-empty string", v)
    return [v.strip() for v in value]


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (missing or null)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, Sequence):
        return f"a list of {len(value)}"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__
