"""Story Consistency: how alike a story's shots are (``memento_core.evaluate``), as a heatmap and text.

The shots come from a run folder (Memento Render Story's ``folder`` output, or a folder name inside
ComfyUI's output folder: the report is also written there) or from a story VIDEO split into shots of
``frames_per_shot`` frames. Frames are embedded with the connected CLIP vision model (StoryMem measures
with ViCLIP; image CLIP on frames approximates it). CLIP vision has no text tower here, so prompt
following is not measured in ComfyUI (the command line measures it with an open_clip file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..memento_core.evaluate import consistency, evaluate_run, heatmap, shot_embeddings
from .comfy_adapters import ComfyImageEmbedder
from .errors import check_text_path, node_errors

CATEGORY = "Memento"
NODE = "Story Consistency"


def _run_folder(folder: str) -> Path:
    text = check_text_path((folder or "").strip().strip('"'), "folder", NODE)
    path = Path(text)
    if not path.is_absolute():
        path = Path(folder_paths.get_output_directory()) / path
    if not (path / "story_log.json").is_file():
        raise ValueError(
            f"{NODE}: 'folder' {folder!r} is not a story run folder (no story_log.json in {path})."
        )
    return path


class MementoStoryConsistency(io.ComfyNode):
    """Cross-shot consistency of a story (StoryMem's measure) as a labelled heatmap and a summary."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        """CLIP vision; a run folder or a story VIDEO (+ frames per shot)."""
        return io.Schema(
            node_id="MementoStoryConsistency",
            display_name="Story Consistency",
            category=CATEGORY,
            description="Measures how alike the shots of a story are: per shot, evenly spaced frames "
            "embedded with CLIP vision; the shot-by-shot similarity matrix, the mean over all pairs and "
            "over the 10 most similar, within and across scenes.",
            is_output_node=True,
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="Load CLIP Vision (embeds the frames)."),
                io.String.Input(
                    "folder",
                    default="",
                    optional=True,
                    tooltip="A run folder (Memento Render Story's 'folder' output, or a name inside the "
                    "output folder); the report is also saved there as consistency.json / .png.",
                ),
                io.Video.Input(
                    "story", optional=True, tooltip="Or a story video, split every frames_per_shot."
                ),
                io.Int.Input(
                    "frames_per_shot",
                    default=81,
                    min=2,
                    max=10000,
                    optional=True,
                    tooltip="With 'story': the frames of each shot (81 for Memento's shots).",
                ),
            ],
            outputs=[
                io.Image.Output("heatmap", display_name="heatmap"),
                io.String.Output("report", display_name="report"),
            ],
        )

    @classmethod
    def execute(
        cls, clip_vision: Any, folder: str = "", story: Any = None, frames_per_shot: int = 81
    ) -> io.NodeOutput:
        """Embed, compare, draw."""
        embedder = ComfyImageEmbedder(clip_vision, NODE)
        name = f"ComfyUI CLIP vision ({type(getattr(clip_vision, 'model', clip_vision)).__name__})"
        with node_errors(NODE):
            if (folder or "").strip():
                report = evaluate_run(_run_folder(folder), embedder, name)
            elif story is not None:
                frames = _video_frames(story)
                shots = [
                    frames[i : i + int(frames_per_shot)]
                    for i in range(0, frames.shape[0], int(frames_per_shot))
                ]
                labels = [f"shot {k + 1}" for k in range(len(shots))]
                report = consistency(shot_embeddings(shots, embedder), labels, embedder=name)
            else:
                raise ValueError(f"{NODE}: connect a 'story' video or give a run 'folder'.")
        text = report.summary()
        return io.NodeOutput(heatmap(report)[None], text, ui=ui.PreviewText(text))


def _video_frames(video: Any) -> torch.Tensor:
    """A ComfyUI VIDEO -> frames [F, 3, H, W] in [0, 1]."""
    try:
        images = video.get_components().images
    except AttributeError as exc:
        raise ValueError(f"{NODE}: the 'story' input is not a VIDEO.") from exc
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"{NODE}: the 'story' video has no frames.")
    return images.float().permute(0, 3, 1, 2).clamp(0, 1)


NODES: list[type[io.ComfyNode]] = [MementoStoryConsistency]
