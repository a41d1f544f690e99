"""Story consistency: how alike the shots of a finished run are, and how well they follow their prompts.

StoryMem's paper measures cross-shot consistency as the mean similarity over all pairs of shots (and
over the 10 most similar pairs) of ViCLIP video embeddings, and prompt following as text-video
similarity. Here, per shot, ``frames_per_shot`` evenly spaced frames are embedded with an image CLIP
(image CLIP on frames approximates ViCLIP, which is a video model), averaged and L2-normalised, so every
shot has one unit embedding and the matrix diagonal is exactly 1:

- ``matrix``: cosine similarity of every pair of shots [S, S];
- ``cross_shot_mean``: the mean over all pairs i < j; ``top10_mean``: over the min(10, pairs) largest;
- ``within_scene_mean`` / ``across_scene_mean``: over the pairs in one scene / in different scenes
  (null when there are none);
- ``prompt_following``: per shot, the mean cosine similarity of its frames to its prompt (the shot
  caption of Memento's ``global caption: ...; shot caption: ...``), when a CLIP text tower is available.

``python -m memento_core.evaluate RUN_DIR [--clip WEIGHTS] [--json OUT] [--compare RUN_B]`` writes
``consistency.json`` and ``consistency.png`` (a heatmap with the shots' labels) into ``RUN_DIR``;
``--compare`` puts two runs of one story side by side (``consistency_compare.png``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import MementoError
from .memory import ImageEmbedder, memento_sample_indices

__all__ = [
    "ConsistencyReport",
    "EvaluateError",
    "RunVideos",
    "clip_text_scorer",
    "consistency",
    "evaluate_run",
    "heatmap",
    "main",
    "read_run",
    "shot_embeddings",
]

#: Frames embedded per shot (evenly spaced, as Memento samples its memory).
FRAMES_PER_SHOT = 8
TOP_PAIRS = 10
#: The heatmap stays within this many pixels a side whatever the number of shots.
MAX_HEATMAP = 1400


class EvaluateError(MementoError):
    """A run folder cannot be evaluated (missing log or shot files, no embedder); the message names it."""


@dataclass(frozen=True)
class ConsistencyReport:
    """The report (see the module docstring); ``embedder`` names the model the embeddings came from."""

    embedder: str
    shots: list[str]
    matrix: list[list[float]]
    cross_shot_mean: float
    top10_mean: float
    within_scene_mean: float | None
    across_scene_mean: float | None
    prompt_following: list[float] | None

    def to_json(self) -> dict[str, Any]:
        """The ``consistency.json`` object (SPEC 8 keys)."""
        return {
            "embedder": self.embedder,
            "shots": self.shots,
            "matrix": self.matrix,
            "cross_shot_mean": self.cross_shot_mean,
            "top10_mean": self.top10_mean,
            "within_scene_mean": self.within_scene_mean,
            "across_scene_mean": self.across_scene_mean,
            "prompt_following": self.prompt_following,
        }

    def summary(self) -> str:
        """A few readable lines."""
        lines = [
            f"embedder: {self.embedder}",
            f"{len(self.shots)} shots; cross-shot consistency {self.cross_shot_mean:.4f}, "
            f"top-{TOP_PAIRS} pairs {self.top10_mean:.4f}",
        ]
        if self.within_scene_mean is not None or self.across_scene_mean is not None:
            lines.append(
                f"within scenes {_fmt(self.within_scene_mean)}, across scenes {_fmt(self.across_scene_mean)}"
            )
        if self.prompt_following is not None:
            mean = sum(self.prompt_following) / len(self.prompt_following)
            lines.append(f"prompt following (CLIP text-image) mean {mean:.4f}")
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def shot_embeddings(
    shots: Sequence[Tensor], embedder: ImageEmbedder, frames: int = FRAMES_PER_SHOT
) -> Tensor:
    """One unit embedding per shot -> [S, D]: ``frames`` evenly spaced frames of each shot [F, 3, H, W]
    in [0, 1] embedded, averaged, L2-normalised."""
    rows = []
    for i, video in enumerate(shots):
        if video.ndim != 4 or video.shape[1] != 3 or video.shape[0] < 1:
            raise EvaluateError(f"shot {i}: expected frames [F, 3, H, W], got {list(video.shape)}")
        picks = memento_sample_indices(min(frames, video.shape[0]), last=video.shape[0] - 1)
        emb = embedder(video[sorted(set(picks))].float())
        rows.append(F.normalize(emb.float().mean(0), dim=0))
    return torch.stack(rows)


def consistency(
    embeddings: Tensor,
    labels: Sequence[str],
    scenes: Sequence[int] | None = None,
    *,
    embedder: str = "",
    prompt_following: Sequence[float] | None = None,
) -> ConsistencyReport:
    """The report for unit shot embeddings [S, D] (rows are normalised here again; the diagonal is set
    to exactly 1). ``scenes``: each shot's scene, for the within / across means."""
    if embeddings.ndim != 2 or embeddings.shape[0] != len(labels):
        raise EvaluateError(f"embeddings: expected [{len(labels)}, D], got {list(embeddings.shape)}")
    unit = F.normalize(embeddings.double(), dim=-1)
    matrix = unit @ unit.T
    matrix.fill_diagonal_(1.0)
    n = len(labels)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    values = [float(matrix[i, j]) for i, j in pairs]
    top = sorted(values, reverse=True)[:TOP_PAIRS]

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    within = across = None
    if scenes is not None:
        within = mean([v for (i, j), v in zip(pairs, values, strict=True) if scenes[i] == scenes[j]])
        across = mean([v for (i, j), v in zip(pairs, values, strict=True) if scenes[i] != scenes[j]])
    return ConsistencyReport(
        embedder=embedder,
        shots=list(labels),
        matrix=[[float(x) for x in row] for row in matrix],
        cross_shot_mean=mean(values) if values else 1.0,
        top10_mean=mean(top) if top else 1.0,
        within_scene_mean=within,
        across_scene_mean=across,
        prompt_following=None if prompt_following is None else [float(x) for x in prompt_following],
    )


# ------------------------------------------------------------------------------------------ run folder


@dataclass(frozen=True)
class RunVideos:
    """A finished run: per shot its label, scene, prompt and frames [F, 3, H, W] in [0, 1]."""

    labels: list[str]
    scenes: list[int]
    prompts: list[str]
    videos: list[Tensor]
    tiny: bool


def read_run(run: str | Path) -> RunVideos:
    """Read a run folder written by the story runner (``story_log.json`` and ``shots/*.mp4``)."""
    from .media import read_mp4

    folder = Path(run)
    log_path = folder / "story_log.json"
    try:
        log = json.loads(log_path.read_text(encoding="utf-8"))
        shots = log["shots"]
        entries = [
            (s["label"], int(s["scene"]), str(s.get("prompt", "")), s["files"]["video"]) for s in shots
        ]
    except FileNotFoundError as exc:
        raise EvaluateError(
            f"{folder}: no story_log.json; is it a run folder of python -m memento_core.story?"
        ) from exc
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise EvaluateError(f"{log_path}: not a readable run log ({type(exc).__name__}: {exc})") from exc
    if not entries:
        raise EvaluateError(f"{log_path}: the run has no finished shots")
    videos = []
    for label, _, _, file in entries:
        try:
            frames = read_mp4(folder / file)
        except Exception as exc:  # PyAV raises its own errors for damaged files
            raise EvaluateError(f"{folder / file}: shot {label} cannot be read ({exc})") from exc
        videos.append(frames.permute(0, 3, 1, 2).float() / 255.0)
    return RunVideos(
        labels=[e[0] for e in entries],
        scenes=[e[1] for e in entries],
        prompts=[e[2] for e in entries],
        videos=videos,
        tiny=log.get("models", {}).get("kind") == "tiny",
    )


def shot_caption(prompt: str) -> str:
    """The text a shot is scored against: the shot caption of a Memento prompt, else the prompt."""
    marker = "shot caption:"
    return prompt.split(marker, 1)[1].strip() if marker in prompt else prompt.strip()


def evaluate_run(
    run: str | Path,
    embedder: ImageEmbedder,
    name: str,
    text_scorer: Callable[[Tensor, str], float] | None = None,
    *,
    write: bool = True,
) -> ConsistencyReport:
    """The report of a run folder; with ``write``, ``consistency.json`` and ``consistency.png`` go into it.

    text_scorer(frames [F, 3, H, W], text) -> mean cosine similarity (a CLIP text tower), or None.
    """
    data = read_run(run)
    emb = shot_embeddings(data.videos, embedder)
    following = None
    if text_scorer is not None:
        following = [
            text_scorer(_spaced(video), shot_caption(prompt))
            for video, prompt in zip(data.videos, data.prompts, strict=True)
        ]
    report = consistency(emb, data.labels, data.scenes, embedder=name, prompt_following=following)
    if write:
        folder = Path(run)
        (folder / "consistency.json").write_text(
            json.dumps(report.to_json(), indent=1) + "\n", encoding="utf-8"
        )
        from .preview import save_png

        save_png(heatmap(report), folder / "consistency.png")
    return report


def _spaced(video: Tensor, frames: int = FRAMES_PER_SHOT) -> Tensor:
    picks = memento_sample_indices(min(frames, video.shape[0]), last=video.shape[0] - 1)
    return video[sorted(set(picks))]


# -------------------------------------------------------------------------------------------- pictures


def _colour(value: float) -> tuple[int, int, int]:
    """A dark-blue -> yellow ramp over cosine similarity in [0, 1] (below 0 is clamped)."""
    t = min(max(value, 0.0), 1.0)
    stops = [(0.0, (20, 24, 82)), (0.5, (33, 145, 140)), (0.8, (120, 200, 80)), (1.0, (250, 230, 40))]
    for (a, ca), (b, cb) in itertools.pairwise(stops):
        if t <= b:
            u = (t - a) / (b - a)
            return tuple(round(x + u * (y - x)) for x, y in zip(ca, cb, strict=True))  # type: ignore[return-value]
    return stops[-1][1]


def heatmap(report: ConsistencyReport, title: str | None = None) -> Tensor:
    """The similarity matrix as a labelled heatmap -> image [H, W, 3] float in [0, 1], at most
    ``MAX_HEATMAP`` pixels a side (cells shrink for long stories; values are printed while they fit)."""
    from PIL import Image, ImageDraw

    n = len(report.shots)
    label_w, head = 64, 62
    cell = max(1, min(56, (MAX_HEATMAP - head - label_w) // max(n, 1)))
    lines = [
        title or "shot consistency",
        f"embedder: {report.embedder}"[:120],
        f"cross-shot {report.cross_shot_mean:.3f}   top-{TOP_PAIRS} {report.top10_mean:.3f}   "
        f"within {_fmt(report.within_scene_mean)}   across {_fmt(report.across_scene_mean)}",
    ]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(int(measure.textlength(line)) for line in lines) + 16
    size_w, size_h = min(MAX_HEATMAP, max(label_w + n * cell + 16, text_w)), head + n * cell + label_w
    img = Image.new("RGB", (size_w, size_h), (18, 18, 22))
    draw = ImageDraw.Draw(img)
    for k, line in enumerate(lines):
        draw.text((8, 4 + 18 * k), line, fill=(235, 235, 235) if k == 0 else (200, 200, 200))
    for i in range(n):
        for j in range(n):
            value = report.matrix[i][j]
            x0, y0 = label_w + j * cell, head + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=_colour(value))
            if cell >= 40:
                ink = (0, 0, 0) if value > 0.65 else (255, 255, 255)
                draw.text((x0 + 4, y0 + cell // 2 - 6), f"{value:.2f}", fill=ink)
    step = max(1, math.ceil(12 / cell))  # label every shot while the labels fit
    for i in range(0, n, step):
        draw.text((4, head + i * cell + max(0, cell // 2 - 6)), report.shots[i], fill=(235, 235, 235))
        _vertical_text(img, report.shots[i], label_w + i * cell + max(0, cell // 2 - 6), head + n * cell + 4)
    return torch.from_numpy(np.asarray(img).copy()).float() / 255


def _vertical_text(img: Any, text: str, x: int, y: int) -> None:
    from PIL import Image, ImageDraw

    tile = Image.new("RGB", (60, 14), (18, 18, 22))
    ImageDraw.Draw(tile).text((0, 0), text, fill=(235, 235, 235))
    img.paste(tile.rotate(90, expand=True), (x, y))


def compare_picture(a: ConsistencyReport, b: ConsistencyReport, names: tuple[str, str]) -> Tensor:
    """Two runs' heatmaps side by side under a table of their means -> [H, W, 3] in [0, 1]."""
    left, right = heatmap(a, f"A: {names[0]}"), heatmap(b, f"B: {names[1]}")
    h = max(left.shape[0], right.shape[0])
    canvas = torch.full((h, left.shape[1] + 12 + right.shape[1], 3), 0.07)
    canvas[: left.shape[0], : left.shape[1]] = left
    canvas[: right.shape[0], left.shape[1] + 12 :] = right
    return canvas


def compare_table(a: ConsistencyReport, b: ConsistencyReport, names: tuple[str, str]) -> str:
    """A plain-text table of the two runs' means."""
    rows = [
        ("cross-shot mean", a.cross_shot_mean, b.cross_shot_mean),
        (f"top-{TOP_PAIRS} pairs mean", a.top10_mean, b.top10_mean),
        ("within scenes", a.within_scene_mean, b.within_scene_mean),
        ("across scenes", a.across_scene_mean, b.across_scene_mean),
    ]
    if a.prompt_following is not None and b.prompt_following is not None:
        rows.append(
            (
                "prompt following",
                sum(a.prompt_following) / len(a.prompt_following),
                sum(b.prompt_following) / len(b.prompt_following),
            )
        )
    width = max(len(r[0]) for r in rows)
    lines = [
        f"{'':{width}}  {'A':>8}  {'B':>8}",
        *(f"{n:{width}}  {_fmt(x):>8}  {_fmt(y):>8}" for n, x, y in rows),
    ]
    lines.append(f"A: {names[0]}\nB: {names[1]}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI


def _embedder_for(
    run: RunVideos, clip: str | None
) -> tuple[ImageEmbedder, str, Callable[[Tensor, str], float] | None]:
    if clip:
        from .keyframes import ClipEmbedder

        try:
            embedder = ClipEmbedder.create("ViT-B-32", pretrained=clip)
        except ImportError as exc:
            raise EvaluateError(str(exc)) from exc
        return (
            embedder,
            f"CLIP ViT-B-32 ({Path(clip).name}; image CLIP on frames, an approximation of ViCLIP)",
            clip_text_scorer(embedder),
        )
    if run.tiny:
        from .adapters import TinyImageEmbedder

        return TinyImageEmbedder(), "tiny (deterministic stand-in: the run used the tiny models)", None
    raise EvaluateError(
        "this run used real models: give --clip WEIGHTS (an open_clip ViT-B-32 .safetensors file) to embed "
        "its frames"
    )


def clip_text_scorer(embedder: Any) -> Callable[[Tensor, str], float] | None:
    """Mean cosine similarity of frames to a text with the CLIP model's text tower, when it has one."""
    model = getattr(embedder, "model", None)
    if model is None or not hasattr(model, "encode_text"):
        return None
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-32")

    @torch.inference_mode()
    def score(frames: Tensor, text: str) -> float:
        images = embedder(frames)
        tokens = tokenizer([text]).to(embedder.device)
        words = F.normalize(model.encode_text(tokens).float(), dim=-1).cpu()
        return float((images @ words.T).mean())

    return score


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m memento_core.evaluate",
        description="Cross-shot consistency and prompt following of a finished story run (StoryMem's "
        "measures, with image CLIP on frames as an approximation of ViCLIP).",
    )
    p.add_argument("run", help="a run folder (python -m memento_core.story --out DIR)")
    p.add_argument("--clip", help="open_clip ViT-B-32 weights (.safetensors); needed for runs of real models")
    p.add_argument("--json", help="also write the report here (it always goes to RUN/consistency.json)")
    p.add_argument("--compare", metavar="RUN_B", help="another run of the same story, side by side")
    p.add_argument("--verbose", "-v", action="store_true", help="show the traceback of an error")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m memento_core.evaluate``."""
    args = _parser().parse_args(argv)
    try:
        run = read_run(args.run)
        embedder, name, scorer = _embedder_for(run, args.clip)
        report = evaluate_run(args.run, embedder, name, scorer)
        print(report.summary())
        if args.json:
            Path(args.json).write_text(json.dumps(report.to_json(), indent=1) + "\n", encoding="utf-8")
        print(f"wrote {Path(args.run) / 'consistency.json'} and {Path(args.run) / 'consistency.png'}")
        if args.compare:
            other = evaluate_run(args.compare, embedder, name, scorer)  # one embedder for both runs
            names = (str(args.run), str(args.compare))
            print(compare_table(report, other, names))
            from .preview import save_png

            path = save_png(compare_picture(report, other, names), Path(args.run) / "consistency_compare.png")
            print(f"wrote {path}")
    except (MementoError, OSError) as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
