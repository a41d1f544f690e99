"""The story runner: render a whole story script shot by shot, with memory, resumable.

Shot order and rules follow Memento's reference pipeline (``pipeline_learnable_acce.py``):

- shot 1 of the story: plain Wan2.2-T2V (shift 12, boundary 0.875, CFG 3.5; ``first_shot="t2v"``), or
  memory-to-video from an empty memory (``"empty"``) or from reference images (``"references"``, MR2V);
- later shots: memory-to-video with KeyframeQuery selection; ``cut: true`` is a hard cut with CFG 5.0
  (3.5 + 1.5), ``cut: false`` continues from the previous shot's last frame (MI2V) with CFG 3.5, or with
  ``continuation="mm2v"`` from its last 5 frames (MM2V; CFG 5.0, as the reference's ``--mm2v`` alone);
- seed of a shot: ``seed + index_in_scene``; the identity slot reads the script's ``reconstruct_target``;
- after each shot its 8 evenly spaced frames join the memory bank (SPEC 4.6).

Everything a later shot depends on (the bank and the previous shot's last frames) is saved after each
shot under ``<out>/state/``, so ``resume=True`` continues after the last finished shot and produces
exactly the frames of an uninterrupted run. Outputs (one folder)::

    shots/SS_NN.mp4        each shot, 16 fps            story.mp4            all shots joined
    memory/SS_NN.png       the memory frames the shot used, per expert (local / global marked)
    identity/SS_NN.png     what the identity slot reconstructed (shots with an identity slot)
    memory_bank.safetensors  the bank after the last shot   story_log.json   settings, selections, timings
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor

from .adapters import TextEncoder, TinyTextEncoder, TinyVAE, VideoVAE
from .conditioning import MOTION_FRAMES, latent_frames
from .dit import WanDiT
from .errors import MementoError, ShapeError
from .fp8 import quantize_fp8
from .keyframe_query import KeyframeQuery
from .loading import load_dit
from .m2v import WAN_NEGATIVE_PROMPT, Backbone, ShotRequest, remember_shot, render_shot
from .media import FPS, join_mp4, write_mp4
from .memory import MemoryBank, load_bank, save_bank
from .offload import ExpertSwap
from .preview import SheetTile, contact_sheet, save_png, selection_rows
from .sampling import StepInfo
from .shot import ShotSettings, ShotText, sample_t2v_shot
from .story import Story, StoryShot, load_story
from .tiny import tiny_dit

__all__ = [
    "ModelSet",
    "RunFolderError",
    "RunSettings",
    "RunnerError",
    "cli",
    "load_t2v_experts",
    "render_story",
    "tiny_models",
]

STATE_VERSION = 1
FIRST_SHOT_MODES = ("t2v", "empty", "references")
CONTINUATIONS = ("mi2v", "mm2v")


class RunnerError(MementoError):
    """A story run cannot start or continue (bad settings, a folder from another run, missing state)."""


class RunFolderError(RunnerError):
    """The output folder holds a run that may not be continued: ``differs`` names the inputs that differ
    (resume refused), or is empty when resuming was not asked for (nothing is overwritten silently)."""

    def __init__(self, message: str, folder: Path, differs: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.folder, self.differs = folder, list(differs)


@dataclass(frozen=True)
class RunSettings:
    """How to render a story. Defaults are Memento's (832x480, 81 frames, 40 steps)."""

    width: int = 832
    height: int = 480
    frames: int = 81
    steps: int = 40
    seed: int = 0
    shift: float = 5.0
    boundary: float = 0.9
    guidance: float = 3.5
    cut_guidance: float = 5.0
    t2v_shift: float = 12.0
    t2v_boundary: float = 0.875
    solver: str = "unipc"
    first_shot: str = "t2v"
    continuation: str = "mi2v"
    references: tuple[str, ...] = ()
    identity: bool = True
    max_shots: int | None = None
    negative: str = WAN_NEGATIVE_PROMPT

    def check(self) -> None:
        """Raise a readable error for impossible values."""
        latent_frames(self.frames)
        if self.width % 16 or self.height % 16 or self.width <= 0 or self.height <= 0:
            raise ShapeError(
                f"size: width and height must be positive multiples of 16, got {self.width}x{self.height}"
            )
        if self.steps < 1:
            raise RunnerError(f"steps: must be >= 1, got {self.steps}")
        if self.first_shot not in FIRST_SHOT_MODES:
            raise RunnerError(f"first_shot: expected one of {FIRST_SHOT_MODES}, got {self.first_shot!r}")
        if self.continuation not in CONTINUATIONS:
            raise RunnerError(f"continuation: expected one of {CONTINUATIONS}, got {self.continuation!r}")
        if self.first_shot == "references" and not self.references:
            raise RunnerError("first_shot 'references' needs at least one reference image (--reference FILE)")
        for path in self.references:
            if not Path(path).is_file():
                raise RunnerError(f"reference image {path}: no such file")
        if self.max_shots is not None and self.max_shots < 1:
            raise RunnerError(f"max_shots: must be >= 1, got {self.max_shots}")
        if self.frames < 9:  # 8 distinct evenly spaced frames go to memory after each shot
            raise ShapeError(f"frames: need at least 9 frames per shot (8 go to memory), got {self.frames}")


@dataclass
class ModelSet:
    """The models a story needs. The backbone is loaded on first use and kept; the T2V experts (shot 1
    only) are loaded when needed and released right after, as the reference pipeline does.

    kind: "tiny", "real" or "comfyui"; description: JSON-ready facts for the log and for resume checks;
    device: where sampling runs; swap_experts: the loaders leave the experts on the CPU and only the
    expert being sampled is moved to ``device`` (``memento_core.offload.ExpertSwap``), so one GPU holds
    one 14B expert at a time. placement: when given, it places the backbone's experts for a memory shot
    instead (a context manager yielding ``ensure(pool)``, called before a pool's KeyframeQuery runs);
    the ComfyUI node passes ComfyUI's model management here.
    """

    kind: str
    description: dict[str, Any]
    vae: VideoVAE
    text_encoder: TextEncoder
    load_backbone: Callable[[], Backbone]
    load_t2v: Callable[[], tuple[WanDiT, WanDiT]] | None = None
    device: str = "cpu"
    swap_experts: bool = False
    placement: Callable[[Backbone], AbstractContextManager[Callable[[str], None] | None]] | None = None
    _backbone: Backbone | None = field(default=None, repr=False)

    def backbone(self) -> Backbone:
        if self._backbone is None:
            self._backbone = self.load_backbone()
        return self._backbone


def _tiny_kfq(seed: int) -> KeyframeQuery:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return KeyframeQuery(dim=256, num_heads=2).eval().requires_grad_(False)


def load_t2v_experts(
    high: Any, low: Any, dtype: torch.dtype, device: str | torch.device = "cpu", fp8: bool = False
) -> tuple[WanDiT, WanDiT]:
    """The two Wan2.2 T2V experts for shot 1 (anything ``load_dit`` takes; refused unless T2V), with
    their block weights stored in fp8 (``memento_core.fp8``) when ``fp8``."""
    experts = [load_dit(path, dtype=dtype, device=device, expect="t2v") for path in (high, low)]
    if fp8:
        experts = [quantize_fp8(expert) for expert in experts]
    return experts[0], experts[1]


def tiny_models(seed: int = 0) -> ModelSet:
    """The embedded tiny system: real architecture (2-layer, 256-wide experts with the official keys and
    KeyframeQuery modules), deterministic random weights, TinyVAE and TinyTextEncoder. It shows the
    pipeline working end to end; its videos are noise-like patterns, not a story."""

    def backbone() -> Backbone:
        return Backbone(
            tiny_dit("i2v", seed=seed + 1),
            tiny_dit("i2v", seed=seed + 2),
            _tiny_kfq(seed + 3),
            _tiny_kfq(seed + 4),
        )

    return ModelSet(
        kind="tiny",
        description={"kind": "tiny", "seed": seed, "dit": "2 layers, dim 256, text_dim 64"},
        vae=TinyVAE(seed),
        text_encoder=TinyTextEncoder(64),
        load_backbone=backbone,
        load_t2v=lambda: (tiny_dit("t2v", seed=seed + 5), tiny_dit("t2v", seed=seed + 6)),
    )


class CachedTextEncoder:
    """Memoises a text encoder (prompts, the negative prompt and "" repeat across shots)."""

    def __init__(self, inner: TextEncoder, size: int = 64) -> None:
        self.inner, self.size, self.cache = inner, size, {}

    def encode(self, text: str) -> Tensor:
        if text not in self.cache:
            if len(self.cache) >= self.size:
                self.cache.pop(next(iter(self.cache)))
            self.cache[text] = self.inner.encode(text)
        return self.cache[text]


# ----------------------------------------------------------------------------------------- progress


class Progress:
    """A text progress bar over shots and steps, on ``stream`` (stderr by default).

    On a terminal one line is redrawn in place; otherwise a line is printed every 25% of a shot's
    steps, so logs stay short.
    """

    def __init__(self, total_shots: int, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.total, self.stream, self.enabled = total_shots, stream or sys.stderr, enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.label, self.started, self.last_quarter = "", time.perf_counter(), -1

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def shot(self, shot: StoryShot, mode: str) -> None:
        self.label = f"shot {shot.number + 1}/{self.total} {shot.label} [{mode}]"
        self.started, self.last_quarter = time.perf_counter(), -1

    def step(self, info: StepInfo) -> None:
        if not self.enabled:
            return
        done = info.step + 1
        width = 24
        bar = "#" * (width * done // info.total) + "-" * (width - width * done // info.total)
        line = (
            f"{self.label} |{bar}| step {done}/{info.total} ({info.expert or 'dit'}) "
            f"{time.perf_counter() - self.started:.1f}s"
        )
        if self.tty:
            end = "\n" if done == info.total else ""
            print("\r" + line, end=end, file=self.stream, flush=True)
        elif (quarter := 4 * done // info.total) != self.last_quarter:
            self.last_quarter = quarter
            print(line, file=self.stream, flush=True)


# ------------------------------------------------------------------------------------------- state


@dataclass(frozen=True)
class _Finished:
    """What a finished shot leaves for the next: the bank after it and its last frames [3, k, H, W]."""

    bank: MemoryBank
    tail: Tensor


def _fingerprint(story: Story, settings: RunSettings, models: ModelSet) -> dict[str, Any]:
    script = json.dumps(story.to_dict(), sort_keys=True, ensure_ascii=False)
    run = asdict(settings)
    run.pop("max_shots")  # rendering more (or fewer) shots of the same story is a valid resume
    run["references"] = [_file_digest(p) for p in settings.references]
    return {
        "version": STATE_VERSION,
        "story_sha256": hashlib.sha256(script.encode()).hexdigest(),
        "settings": run,
        "models": models.description,
    }


def _file_digest(path: str) -> str:
    return f"{Path(path).name}:{hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]}"


def _atomic_json(data: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _save_state(state_dir: Path, shot: StoryShot, bank: MemoryBank, video: Tensor, latent: Tensor) -> None:
    from safetensors.torch import save_file

    save_bank(bank, state_dir / f"bank_{shot.label}.safetensors")
    tmp = state_dir / f"shot_{shot.label}.safetensors.part"
    tensors = {"tail": video[:, -MOTION_FRAMES:].contiguous().cpu(), "latent": latent.contiguous().cpu()}
    save_file(tensors, str(tmp))
    os.replace(tmp, state_dir / f"shot_{shot.label}.safetensors")


def _load_state(state_dir: Path, shot: StoryShot) -> _Finished:
    from safetensors.torch import load_file

    tensors = load_file(str(state_dir / f"shot_{shot.label}.safetensors"))
    return _Finished(load_bank(state_dir / f"bank_{shot.label}.safetensors"), tensors["tail"])


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


# ------------------------------------------------------------------------------------------ runner


def _shot_plan(shot: StoryShot, settings: RunSettings, has_t2v: bool) -> str:
    if shot.number == 0:
        return settings.first_shot if settings.first_shot != "t2v" or has_t2v else "empty"
    return "cut" if shot.cut else settings.continuation


def render_story(
    story: Story,
    models: ModelSet,
    settings: RunSettings,
    out: str | os.PathLike[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Render ``story`` into the folder ``out`` -> the run log (also written as story_log.json).

    resume: continue after the last finished shot of an earlier run of the same story, settings and
    models (anything else is refused, naming what differs). overwrite: start over in a folder that
    already holds a run. Without either, such a folder is refused so nothing is lost.
    """
    settings.check()
    out = Path(out)
    state_dir = out / "state"
    shots = story.shots[: settings.max_shots] if settings.max_shots else story.shots
    progress = progress or Progress(len(shots))
    fingerprint = _fingerprint(story, settings, models)
    log_path = out / "story_log.json"

    done: list[dict[str, Any]] = []
    finished: _Finished | None = None
    run_file = state_dir / "run.json"
    if run_file.exists() and not overwrite:
        if not resume:
            raise RunFolderError(
                f"{out} already holds a story run; pass --resume to continue it or --overwrite to start over",
                out,
            )
        before = json.loads(run_file.read_text(encoding="utf-8"))
        if differs := _diff(before, fingerprint):
            raise RunFolderError(
                f"--resume: {out} was rendered with different inputs ({', '.join(differs)}); "
                "use the same story, settings and models, or another folder",
                out,
                differs,
            )
        old_log = json.loads(log_path.read_text(encoding="utf-8")) if log_path.exists() else {"shots": []}
        by_label = {entry["label"]: entry for entry in old_log.get("shots", [])}
        for shot in shots:
            if shot.label not in by_label or not (state_dir / f"shot_{shot.label}.safetensors").exists():
                break
            done.append(by_label[shot.label])
        if done:
            finished = _load_state(state_dir, shots[len(done) - 1])
        progress.message(f"resuming {story.name!r} after {len(done)} finished shot(s) of {len(shots)}")
    elif resume and not run_file.exists():
        progress.message(f"nothing to resume in {out}; starting from the first shot")
    state_dir.mkdir(parents=True, exist_ok=True)
    _atomic_json(fingerprint, run_file)

    if models.kind == "tiny":
        progress.message(
            "No models configured: rendering with the built-in TINY models (real architecture, random "
            "weights). The result shows the pipeline working, not a real story. See README 'Real models'."
        )
    encoder = CachedTextEncoder(models.text_encoder)
    log: dict[str, Any] = {
        "story": {
            "name": story.name,
            "source": story.source,
            "shots": len(shots),
            "warnings": list(story.warnings),
        },
        "models": models.description,
        "settings": asdict(settings),
        "shots": done,
    }
    bank = finished.bank if finished else MemoryBank.empty("memento")
    tail = finished.tail if finished else None
    for shot in shots[len(done) :]:
        mode = _shot_plan(shot, settings, models.load_t2v is not None)
        progress.shot(shot, mode)
        entry, bank, tail = _render_one(
            story, shot, mode, models, encoder, settings, bank, tail, out, progress
        )
        done.append(entry)
        _atomic_json(log, log_path)
    save_bank(bank, out / "memory_bank.safetensors")
    t0 = time.perf_counter()
    join_mp4([out / "shots" / f"{s.label}.mp4" for s in shots], out / "story.mp4")
    log["joined_seconds"] = round(time.perf_counter() - t0, 3)
    log["outputs"] = {"story": "story.mp4", "bank": "memory_bank.safetensors"}
    _atomic_json(log, log_path)
    progress.message(f"done: {out / 'story.mp4'} ({len(shots)} shots)")
    return log


def _render_one(
    story: Story,
    shot: StoryShot,
    mode: str,
    models: ModelSet,
    encoder: TextEncoder,
    settings: RunSettings,
    bank: MemoryBank,
    tail: Tensor | None,
    out: Path,
    progress: Progress,
) -> tuple[dict[str, Any], MemoryBank, Tensor]:
    seed = settings.seed + shot.index_in_scene
    # T2V and MI2V shots use the base CFG; every other memory shot gets 5.0 (the reference adds 1.5
    # whenever no first frame is given: cuts, and MM2V shots under its --mm2v flag).
    guidance = settings.guidance if mode in ("t2v", "mi2v") else settings.cut_guidance
    t2v = mode == "t2v"
    shot_settings = ShotSettings(
        steps=settings.steps,
        shift=settings.t2v_shift if t2v else settings.shift,
        boundary=settings.t2v_boundary if t2v else settings.boundary,
        guidance_high=guidance,
        guidance_low=guidance,
        solver=settings.solver,
        seed=seed,
    )
    t0 = time.perf_counter()
    entry: dict[str, Any] = {
        "label": shot.label,
        "scene": shot.scene,
        "index_in_scene": shot.index_in_scene,
        "number": shot.number,
        "prompt": shot.prompt,
        "mode": mode,
        "seed": seed,
    }
    if shot.number == 0 and not shot.cut:
        entry["note"] = "the first shot has cut: false but nothing to continue from; rendered as a cut"
    if t2v:
        high, low = models.load_t2v()  # type: ignore[misc]
        text = ShotText(encoder.encode(shot.prompt), encoder.encode(settings.negative))
        size = (latent_frames(settings.frames), settings.height // 8, settings.width // 8)
        with _residency(models, high, low):
            result = sample_t2v_shot(
                high, low, text, size, shot_settings, device=models.device, callback=progress.step
            )
        del high, low
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        latent = result.target
        video = models.vae.decode(latent)
        new_bank = remember_shot(bank, models.vae, video, shot.prompt, shot.number + 1)
        identity, used, selection, positions = None, {}, None, {}
    else:
        if mode == "references":
            bank = bank.with_references(_reference_latents(settings, models.vae))
        request = ShotRequest(
            prompt=shot.prompt,
            width=settings.width,
            height=settings.height,
            frames=settings.frames,
            mode=mode if mode in CONTINUATIONS else "cut",
            reconstruct=story.reconstruct_target if settings.identity else None,
            negative=settings.negative,
            settings=shot_settings,
        )
        backbone = models.backbone()
        placement = models.placement or (lambda b: _residency(models, b.high, b.low))
        with placement(backbone) as ensure:
            record, new_bank = render_shot(
                backbone, bank, request, models.vae, encoder, previous_video=tail,
                shot_index=shot.number + 1, device=models.device, callback=progress.step,
                before_pool=ensure,
            )  # fmt: skip
        latent, video, identity = record.latent, record.video, record.identity
        used, selection, positions = record.memory_ids, record.selection, record.positions
        entry.update(record.log())
    entry.update({"guidance": {"high": guidance, "low": guidance}, "shift": shot_settings.shift})
    entry["boundary"], entry["steps"] = shot_settings.boundary, shot_settings.steps

    files = {"video": f"shots/{shot.label}.mp4", "memory": f"memory/{shot.label}.png"}
    write_mp4(video, out / files["video"], fps=FPS)
    rows = selection_rows(bank, used, selection, models.vae.decode, positions) if used else []
    if not any(tiles for _, tiles in rows):
        rows = [("none", [])]
    if identity is not None:
        files["identity"] = f"identity/{shot.label}.png"
        picture = models.vae.decode(identity)[:, 0]
        save_png(
            contact_sheet([("identity", [SheetTile(picture, "identity", "identity")])]),
            out / files["identity"],
        )
    save_png(contact_sheet(rows), out / files["memory"])
    _save_state(out / "state", shot, new_bank, video, latent)
    entry["files"] = files
    entry["seconds_total"] = round(time.perf_counter() - t0, 3)
    progress.message(f"{shot.label} done in {entry['seconds_total']:.1f}s -> {files['video']}")
    return entry, new_bank, video[:, -MOTION_FRAMES:]


@contextmanager
def _residency(models: ModelSet, high: WanDiT, low: WanDiT) -> Iterator[None]:
    """With ``models.swap_experts``: move the expert about to run onto the device, the other off it.
    (The KeyframeQuerys stay where they were loaded, so no ``ensure`` hook is needed: yields None.)"""
    if not models.swap_experts:
        yield None
        return
    experts = {"high": high, "low": low}

    def activate(name: str) -> None:
        for other, model in experts.items():
            if other != name:
                model.to("cpu")
        experts[name].to(models.device)

    with ExpertSwap(experts, activate).attached():
        yield None


def _reference_latents(settings: RunSettings, vae: VideoVAE) -> Tensor:
    """Each reference image, fitted (cover + centre crop) to the shot size, encoded alone -> [N, 16, h, w]."""
    from PIL import Image, ImageOps

    out = []
    for path in settings.references:
        try:
            img = Image.open(path).convert("RGB")
        except (OSError, ValueError) as exc:
            raise RunnerError(f"reference image {path}: cannot be read ({exc})") from exc
        img = ImageOps.fit(img, (settings.width, settings.height), Image.Resampling.LANCZOS)
        pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        pixels = pixels.view(settings.height, settings.width, 3).permute(2, 0, 1).float() / 127.5 - 1
        out.append(vae.encode(pixels[:, None])[:, 0])
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------ CLI

#: Defaults used with the tiny models (small enough for a 3-shot story in well under 2 minutes on CPU).
TINY_DEFAULTS = {"width": 256, "height": 160, "frames": 33, "steps": 12}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m memento_core.story",
        description="Render a Memento story script shot by shot with memory. Without a model config "
        "it runs the built-in tiny models (random weights) to show the pipeline.",
    )
    p.add_argument("story", help="story script (.json, SPEC 7)")
    p.add_argument("--out", "-o", help="output folder (default: output/<script name>)")
    p.add_argument("--resume", action="store_true", help="continue after the last finished shot")
    p.add_argument("--overwrite", action="store_true", help="start over in a folder holding a run")
    p.add_argument(
        "--models",
        help="JSON model config for real weights (default: $MEMENTO_MODELS; none: tiny models). "
        "See README 'Real models'.",
    )
    p.add_argument("--tiny", action="store_true", help="use the tiny models even if $MEMENTO_MODELS is set")
    p.add_argument("--shots", type=int, help="render only the first N shots")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--frames", type=int, help="pixel frames per shot, 4n+1 (Memento: 81)")
    p.add_argument("--steps", type=int, help="sampling steps (Memento: 40)")
    p.add_argument("--seed", type=int, default=0, help="base seed; a shot uses seed + its index in the scene")
    p.add_argument("--first-shot", choices=FIRST_SHOT_MODES, default="t2v")
    p.add_argument("--reference", action="append", default=[], help="reference image (MR2V), repeatable")
    p.add_argument(
        "--continue",
        dest="continuation",
        choices=CONTINUATIONS,
        default="mi2v",
        help="how 'cut: false' shots continue: from the last frame (mi2v) or the last 5 frames (mm2v)",
    )
    p.add_argument("--no-identity", action="store_true", help="no identity (subject reconstruction) slot")
    p.add_argument("--solver", choices=("unipc", "euler"), default="unipc")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    return p


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m memento_core.story``: parse arguments, pick the models, render. Returns the exit code."""
    args = _parser().parse_args(argv)
    config = None if args.tiny else (args.models or os.environ.get("MEMENTO_MODELS") or None)
    try:
        story = load_story(args.story)
        if config:
            from .real_models import load_model_config, real_models

            models = real_models(load_model_config(config))
            defaults: dict[str, Any] = {}
        else:
            models, defaults = tiny_models(), dict(TINY_DEFAULTS)
        given = {k: getattr(args, k) for k in ("width", "height", "frames", "steps") if getattr(args, k)}
        settings = replace(
            RunSettings(),
            **{**defaults, **given},
            seed=args.seed,
            solver=args.solver,
            first_shot="references" if args.reference and args.first_shot == "t2v" else args.first_shot,
            references=tuple(args.reference),
            continuation=args.continuation,
            identity=not args.no_identity,
            max_shots=args.shots,
        )
        out = Path(args.out) if args.out else Path("output") / Path(args.story).stem
        progress = Progress(min(len(story.shots), args.shots or len(story.shots)), enabled=not args.quiet)
        for warning in story.warnings:
            progress.message(f"warning: {warning}")
        render_story(
            story, models, settings, out, resume=args.resume, overwrite=args.overwrite, progress=progress
        )
    except MementoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\ninterrupted; finished shots are kept. Run the same command with --resume to go on.",
            file=sys.stderr,
        )
        return 130
    return 0
