"""Load Story Script: one shot of a SPEC 7 story script as widgets-ready values.

The script comes from ``text`` (JSON pasted into the node) when it is not empty, else from ``path``
(absolute, or relative to ComfyUI's input folder). ``shot_index`` is 0-based over the whole story.
Outputs the shot's prompt, its global caption (SPEC 4.7 rule), whether it is a hard cut (false:
continue from the previous shot's last frame), the story's reconstruct target ("" when none), the
number of shots, and the shot's 0-based index within its scene (Memento seeds a shot with
``seed + index_in_scene``). Malformed scripts give memento_core's StoryError text (file and field).
"""

from __future__ import annotations

import os
from typing import Any

import folder_paths
from comfy_api.latest import io

from ..memento_core.story import Story, load_story, parse_story
from .errors import node_errors

CATEGORY = "Memento"
NODE = "Load Story Script"


def _resolve(path: str) -> str:
    text = (path or "").strip().strip('"')
    if os.path.isabs(text):
        return text
    return os.path.join(folder_paths.get_input_directory(), text)


def read_story(path: str, text: str) -> Story:
    """The story from ``text`` when given, else from ``path``; readable ValueErrors."""
    with node_errors(NODE):
        if (text or "").strip():
            return parse_story(text, source="the 'text' input")
        if not (path or "").strip():
            raise ValueError(f"{NODE}: give a story script: a JSON file 'path' or the script as 'text'.")
        return load_story(_resolve(path))


class MementoLoadStoryScript(io.ComfyNode):
    """Read a story script and output one shot's texts and flags."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        """path or text, shot_index."""
        return io.Schema(
            node_id="MementoLoadStoryScript",
            display_name="Load Story Script",
            category=CATEGORY,
            description="Reads a story script (JSON: story_name, reconstruct_target, scenes with "
            "video_prompts and cut) and outputs one shot's prompt, global caption and cut flag.",
            inputs=[
                io.String.Input(
                    "path",
                    default="",
                    tooltip="Story JSON file: absolute, or relative to ComfyUI's input folder.",
                ),
                io.String.Input(
                    "text", multiline=True, default="", tooltip="Or the script itself (used when not empty)."
                ),
                io.Int.Input(
                    "shot_index",
                    default=0,
                    min=0,
                    max=9999,
                    tooltip="0-based shot number over the whole story.",
                ),
            ],
            outputs=[
                io.String.Output("prompt", display_name="prompt"),
                io.String.Output("global_caption", display_name="global_caption"),
                io.Boolean.Output("cut", display_name="cut"),
                io.String.Output("reconstruct_target", display_name="reconstruct_target"),
                io.Int.Output("shot_count", display_name="shot_count"),
                io.Int.Output("index_in_scene", display_name="index_in_scene"),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, path: str, text: str, shot_index: int) -> Any:
        """Re-run when the script file changes."""
        if (text or "").strip():
            return (text, shot_index)
        try:
            full = _resolve(path)
            return (full, os.path.getmtime(full), shot_index)
        except OSError:
            return (path, shot_index)

    @classmethod
    def execute(cls, path: str, text: str, shot_index: int) -> io.NodeOutput:
        """Parse and pick the shot."""
        story = read_story(path, text)
        n = len(story.shots)
        if not 0 <= int(shot_index) < n:
            raise ValueError(
                f"{NODE}: shot_index {shot_index} is out of range: the story '{story.name}' has {n} shots "
                f"(0..{n - 1})."
            )
        shot = story.shots[int(shot_index)]
        return io.NodeOutput(
            shot.prompt,
            shot.global_caption,
            bool(shot.cut),
            story.reconstruct_target or "",
            n,
            shot.index_in_scene,
        )


NODES: list[type[io.ComfyNode]] = [MementoLoadStoryScript]
