"""The story runner: render a whole story script shot by shot, with memory, resumable.

The run follows the chosen memory policy (``memento_core.memory``: ``memento``, ``storymem``, ...),
which owns the sampler settings, how each shot's memory is chosen and what a finished shot leaves in
memory; the runner holds the policy and never tests its name. Shot order and rules follow the reference
pipelines (Memento's ``pipeline_learnable_acce.py``, StoryMem's ``pipeline.py``):

- shot 1 of the story: plain Wan2.2-T2V (shift 12, boundary 0.875, CFG 3.5; ``first_shot="t2v"``), or
  memory-to-video from an empty memory (``"empty"``) or from reference images (``"references"``, MR2V);
- later shots: memory-to-video; ``cut: true`` is a hard cut, ``cut: false`` continues from the previous
  shot's last frame (MI2V), or with ``continuation="mm2v"`` from its last 5 frames (MM2V). CFG by the
  policy: Memento 3.5, and 5.0 (3.5 + 1.5) on shots without a first frame (cuts, MM2V as the
  reference's ``--mm2v`` alone); StoryMem 3.5 on every shot;
- seed of a shot: ``seed + index_in_scene``; the identity slot (Memento) reads ``reconstruct_target``;
- after each shot the policy adds it to the memory bank (Memento: 8 evenly spaced frames, SPEC 4.6;
  StoryMem: CLIP keyframes, sink + recent, SPEC 5) and says which frames are kept as the shot.

Everything a later shot depends on (the bank and the previous shot's last frames) is saved after each
shot under ``<out>/state/``, so ``resume=True`` continues after the last finished shot and produces
exactly the frames of an uninterrupted run. Outputs (one folder)::

    shots/SS_NN.mp4        each shot, 16 fps            story.mp4            all shots joined
    memory/SS_NN.png       the memory frames the shot used, per expert (local / global marked)
    identity/SS_NN.png     what the identity slot reconstructed (shots with an identity slot)
    memory_bank.safetensors  the bank after the last shot   story_log.json   settings, selections, timings
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor

from .adapters import TextEncoder
from .conditioning import MOTION_FRAMES, check_frame_size, latent_frames
from .dit import WanDiT
from .errors import MementoError, ShapeError
from .m2v import KFQ_PRECISIONS, WAN_NEGATIVE_PROMPT, ShotRequest, remember_shot, render_shot
from .media import FPS, join_mp4, probe_frames, write_mp4
from .memory import (
    MemoryBank,
    MemoryPolicy,
    MemoryTools,
    SamplerDefaults,
    policy_class,
    policy_names,
    save_bank,
)
from .models import ModelSet
from .offload import BlockSwap, ExpertSwap, resident_modules, swapped_blocks
from .preview import SheetTile, camera_map, contact_sheet, save_png, selection_rows
from .run_folder import (
    Finished,
    RunFolderError,
    RunnerError,
    atomic_json,
    check_folder,
    clear_run,
    held_outputs,
    load_latent,
    load_state,
    read_json,
    run_lock,
    save_state,
)
from .sampling import SOLVERS, StepInfo
from .shot import MEMORY_NOISE, NOISE_SOURCES, ShotSettings, ShotText, sample_t2v_shot
from .story import Story, StoryShot

__all__ = [
    "CONTINUATIONS",
    "FIRST_SHOT_MODES",
    "RUNNER_POLICIES",
    "Progress",
    "RunFolderError",
    "RunSettings",
    "RunnerError",
    "render_story",
]

STATE_VERSION = 1
#: Bounds of a run: Wan's schedule has 1000 timesteps; sizes as the nodes' widgets allow.
MAX_STEPS = 1000
MAX_SIZE = 4096
MAX_FRAMES = 1025
#: The largest seed a generator takes (torch: 64 bits).
MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF
FIRST_SHOT_MODES = ("t2v", "empty", "references")
CONTINUATIONS = ("mi2v", "mm2v")
#: The policies a story run can use (the camera policies take each shot's camera from the script;
#: ``manual`` needs frame ids a script cannot give).
RUNNER_POLICIES = policy_names(without=("keep_ids",))
#: RunSettings fields that default to the policy's sampler settings (None: the policy decides).
SAMPLER_FIELDS = (
    "shift",
    "boundary",
    "guidance",
    "cut_guidance",
    "t2v_shift",
    "t2v_boundary",
    "t2v_guidance",
)


@dataclass(frozen=True)
class RunSettings:
    """How to render a story. Sizes default to the released models' (832x480, 81 frames, 40 steps).

    policy: the memory policy's name (None: the backbone's family, ``ModelSet.family``); capacity: its
    memory size (None: the policy's default, Memento 8, StoryMem 10); fix: keep the first N memory
    frames (Memento's ``--fix``, StoryMem's sink; None: the policy's default); identity_back,
    storymem_mode: Memento's ``--idt_back_mode`` and ``--storymem_mode``; shift .. t2v_guidance: None
    takes the policy's sampler settings (:meth:`sampler`), a number overrides them; identity: use the
    identity slot when the policy has one; memory_noise, noise: ``ShotSettings``; kfq_precision:
    KeyframeQuery scoring ("auto": as the backbone computes).
    """

    width: int = 832
    height: int = 480
    frames: int = 81
    steps: int = 40
    seed: int = 0
    policy: str | None = None
    capacity: int | None = None
    fix: int | None = None
    identity_back: bool = False
    storymem_mode: bool = False
    shift: float | None = None
    boundary: float | None = None
    guidance: float | None = None
    cut_guidance: float | None = None
    t2v_shift: float | None = None
    t2v_boundary: float | None = None
    t2v_guidance: float | None = None
    solver: str = "unipc"
    first_shot: str = "t2v"
    continuation: str = "mi2v"
    references: tuple[str, ...] = ()
    identity: bool = True
    max_shots: int | None = None
    negative: str = WAN_NEGATIVE_PROMPT
    memory_noise: str = "released"
    noise: str = "cpu"
    kfq_precision: str = "auto"

    def check(self) -> None:
        """Raise a readable error for impossible values."""
        latent_frames(self.frames)
        check_frame_size(self.width, self.height)
        if not 1 <= self.steps <= MAX_STEPS:
            raise RunnerError(
                f"steps: expected 1 to {MAX_STEPS} (the schedule has {MAX_STEPS} timesteps), got {self.steps}"
            )
        if max(self.width, self.height) > MAX_SIZE or self.frames > MAX_FRAMES:
            raise RunnerError(
                f"size: at most {MAX_SIZE}x{MAX_SIZE} px and {MAX_FRAMES} frames per shot, got "
                f"{self.width}x{self.height} and {self.frames} frames"
            )
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
        if self.capacity is not None and self.capacity < 1:
            raise RunnerError(f"capacity: must be >= 1, got {self.capacity}")
        if self.fix is not None and self.fix < 0:
            raise RunnerError(f"fix: must be >= 0, got {self.fix}")
        for name, allowed in (
            ("solver", SOLVERS),
            ("memory_noise", MEMORY_NOISE),
            ("noise", NOISE_SOURCES),
            ("kfq_precision", KFQ_PRECISIONS),
        ):
            if getattr(self, name) not in allowed:
                raise RunnerError(f"{name}: expected one of {allowed}, got {getattr(self, name)!r}")
        if self.frames < 9:  # 8 distinct evenly spaced frames go to memory after each shot
            raise ShapeError(f"frames: need at least 9 frames per shot (8 go to memory), got {self.frames}")

    def memory_policy(self, family: str = "memento") -> MemoryPolicy:
        """The policy object: ``policy`` (or ``family``) with ``capacity`` when given."""
        name = self.policy or family
        if name not in RUNNER_POLICIES:
            raise RunnerError(f"policy: expected one of {', '.join(RUNNER_POLICIES)}, got {name!r}")
        cls = policy_class(name)
        fields_of = {f.name for f in fields(cls)}
        options: dict[str, Any] = {} if self.capacity is None else {"capacity": self.capacity}
        if self.fix is not None:
            if cls.fix_option is None:
                raise RunnerError(f"fix: the {name} policy has no frames to keep fixed")
            options[cls.fix_option] = self.fix
        for flag in ("identity_back", "storymem_mode"):
            if getattr(self, flag):
                if flag not in fields_of:
                    raise RunnerError(f"{flag}: an option of Memento's pipeline; the {name} policy has none")
                options[flag] = True
        try:
            return cls(**options)
        except MementoError as exc:
            raise RunnerError(f"policy {name}: {exc}") from exc

    def sampler(self, policy: MemoryPolicy) -> SamplerDefaults:
        """The policy's sampler settings with the fields given here overriding them."""
        given = {name: getattr(self, name) for name in SAMPLER_FIELDS if getattr(self, name) is not None}
        return replace(policy.sampler, **given)

    def resolved(self, policy: MemoryPolicy) -> RunSettings:
        """These settings with the policy and every sampler setting written out (for logs and resume)."""
        sampler = self.sampler(policy)
        fix = getattr(policy, policy.fix_option) if policy.fix_option else None
        return replace(
            self,
            policy=policy.name,
            capacity=policy.capacity,
            fix=fix,
            **{name: getattr(sampler, name) for name in SAMPLER_FIELDS},
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


def _fingerprint(
    story: Story, settings: RunSettings, models: ModelSet, policy: MemoryPolicy
) -> dict[str, Any]:
    script = json.dumps(story.to_dict(), sort_keys=True, ensure_ascii=False)
    run = asdict(settings)
    run.pop("max_shots")  # rendering more (or fewer) shots of the same story is a valid resume
    run["references"] = [_file_digest(p) for p in settings.references]
    return {
        "version": STATE_VERSION,
        "story_sha256": hashlib.sha256(script.encode()).hexdigest(),
        "settings": run,
        "policy": policy.describe(),
        "models": models.description,
    }


def _file_digest(path: str) -> str:
    return f"{Path(path).name}:{hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]}"


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
    already holds a run (its outputs are removed first). Without either, a folder holding any run output
    is refused so nothing is lost. The folder is locked while the run renders.
    """
    settings.check()
    shots = story.shots[: settings.max_shots] if settings.max_shots else story.shots
    _check_seeds(shots, settings.seed)
    policy = settings.memory_policy(models.family)
    settings = settings.resolved(policy)
    tools = _memory_tools(policy, models)
    out = Path(out)
    check_folder(out)
    progress = progress or Progress(len(shots))
    if (held := held_outputs(out)) and not overwrite:  # refused before anything is written
        _refuse_unless_resumable(out, held, resume)
    with run_lock(out):
        return _render_story(story, shots, models, settings, policy, tools, out, resume, overwrite, progress)


def _check_seeds(shots: Sequence[StoryShot], seed: int) -> None:
    """Every shot's seed (``seed + index_in_scene``) must be a valid generator seed, checked up front."""
    last = max((s.index_in_scene for s in shots), default=0)
    if not 0 <= seed <= MAX_SEED - last:
        raise RunnerError(
            f"seed: {seed} is out of range for this story: a shot's seed is seed + its index in the scene "
            f"(up to +{last} here) and must lie in [0, {MAX_SEED}]; use a seed up to {MAX_SEED - last}"
        )


def _resume_point(
    out: Path, fingerprint: dict[str, Any], shots: Sequence[StoryShot], resume: bool, overwrite: bool
) -> tuple[list[dict[str, Any]], Finished | None, str]:
    """What an earlier run in ``out`` leaves: (finished log entries, the state after the last one, a
    message). Clears the folder for ``overwrite``; refuses a folder holding outputs otherwise."""
    state_dir, run_file, log_path = out / "state", out / "state" / "run.json", out / "story_log.json"
    held = held_outputs(out)
    if held and overwrite:
        clear_run(out)
        return [], None, f"overwriting the earlier run in {out}"
    if not held:
        return [], None, f"nothing to resume in {out}; starting from the first shot" if resume else ""
    _refuse_unless_resumable(out, held, resume)
    before = read_json(run_file, "the run's fingerprint")
    if differs := _diff(before, fingerprint):
        raise RunFolderError(
            f"--resume: {out} was rendered with different inputs ({', '.join(differs)}); "
            "use the same story, settings and models, or another folder",
            out,
            differs,
        )
    old_log = read_json(log_path, "the run log") if log_path.exists() else {"shots": []}
    entries = old_log.get("shots") if isinstance(old_log, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "label" in e for e in entries):
        raise RunFolderError(
            f"{log_path} (the run log) is damaged; rerun with --overwrite to start over", out
        )
    by_label = {entry["label"]: entry for entry in entries}
    done: list[dict[str, Any]] = []
    for shot in shots:
        if shot.label not in by_label or not (state_dir / f"shot_{shot.label}.safetensors").exists():
            break
        done.append(by_label[shot.label])
    finished = load_state(state_dir, shots[len(done) - 1].label) if done else None
    return done, finished, f"resuming after {len(done)} finished shot(s) of {len(shots)}"


def _refuse_unless_resumable(out: Path, held: list[str], resume: bool) -> None:
    """A folder holding run outputs is written into only to resume a run that has its state."""
    if not resume:
        raise RunFolderError(
            f"{out} already holds a story run ({', '.join(held)}); pass --resume to continue it or "
            "--overwrite to start over",
            out,
        )
    if not (out / "state" / "run.json").exists():
        raise RunFolderError(
            f"{out} holds a run's outputs ({', '.join(held)}) but no state/run.json to resume from; pass "
            "--overwrite to start over",
            out,
        )


def _render_story(
    story: Story,
    shots: Sequence[StoryShot],
    models: ModelSet,
    settings: RunSettings,
    policy: MemoryPolicy,
    tools: MemoryTools,
    out: Path,
    resume: bool,
    overwrite: bool,
    progress: Progress,
) -> dict[str, Any]:
    fingerprint = _fingerprint(story, settings, models, policy)
    log_path = out / "story_log.json"
    done, finished, message = _resume_point(out, fingerprint, shots, resume, overwrite)
    if message:
        progress.message(f"{story.name!r}: {message}")
    state_dir = out / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    atomic_json(fingerprint, state_dir / "run.json")

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
        "policy": policy.describe(),
        "shots": done,
    }
    bank = finished.bank if finished else policy.empty_bank()
    tail = finished.tail if finished else None
    for shot in shots[len(done) :]:
        mode = _shot_plan(shot, settings, models.load_t2v is not None)
        progress.shot(shot, mode)
        entry, bank, tail = _render_one(
            story, shot, mode, models, encoder, settings, policy, tools, bank, tail, out, progress
        )
        done.append(entry)
        atomic_json(log, log_path)
    save_bank(bank, out / "memory_bank.safetensors")
    for entry in done:  # a damaged finished shot file is rebuilt from its saved latent
        _ensure_shot_file(out, entry, models, policy, progress)
    t0 = time.perf_counter()
    join_mp4([out / "shots" / f"{s.label}.mp4" for s in shots], out / "story.mp4")
    log["joined_seconds"] = round(time.perf_counter() - t0, 3)
    log["outputs"] = {"story": "story.mp4", "bank": "memory_bank.safetensors"}
    atomic_json(log, log_path)
    progress.message(f"done: {out / 'story.mp4'} ({len(shots)} shots)")
    return log


def _ensure_shot_file(
    out: Path, entry: dict[str, Any], models: ModelSet, policy: MemoryPolicy, progress: Progress
) -> None:
    """Re-encode a finished shot's mp4 from its saved latent when the file is missing or unreadable."""
    path = out / "shots" / f"{entry['label']}.mp4"
    try:
        if probe_frames(path) > 0:
            return
    except (OSError, ValueError):
        pass
    progress.message(f"{path} is missing or damaged; rebuilding it from the saved state")
    video = models.vae.decode(load_latent(out / "state", entry["label"]))
    write_mp4(policy.kept_frames(video, entry.get("mode", "cut")), path, fps=FPS)


def _memory_tools(policy: MemoryPolicy, models: ModelSet) -> MemoryTools:
    """The VAE, and the image embedder when the policy picks keyframes (a readable error without one)."""
    embedder = models.embedder() if policy.needs_embedder else None
    if policy.needs_embedder and embedder is None:
        raise RunnerError(
            f"the {policy.name} policy picks keyframes with CLIP image embeddings: on the command line add "
            "\"clip\": an open_clip ViT-B-32 .safetensors file to the model config (README 'Real models'); "
            "in ComfyUI connect Load CLIP Vision to 'clip_vision'"
        )
    return MemoryTools(models.vae, embedder, models.scorer)


def _render_one(
    story: Story,
    shot: StoryShot,
    mode: str,
    models: ModelSet,
    encoder: TextEncoder,
    settings: RunSettings,
    policy: MemoryPolicy,
    tools: MemoryTools,
    bank: MemoryBank,
    tail: Tensor | None,
    out: Path,
    progress: Progress,
) -> tuple[dict[str, Any], MemoryBank, Tensor]:
    seed = settings.seed + shot.index_in_scene
    sampler = settings.sampler(policy)
    guidance = sampler.guidance_for(mode)
    t2v = mode == "t2v"
    shot_settings = ShotSettings(
        steps=settings.steps,
        shift=sampler.t2v_shift if t2v else sampler.shift,
        boundary=sampler.t2v_boundary if t2v else sampler.boundary,
        guidance_high=guidance,
        guidance_low=guidance,
        solver=settings.solver,
        seed=seed,
        renoise_memory=sampler.renoise_memory,
        memory_noise=settings.memory_noise,
        noise=settings.noise,
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
        "policy": policy.name,
    }
    if shot.number == 0 and not shot.cut:
        entry["note"] = "the first shot has cut: false but nothing to continue from; rendered as a cut"
    if t2v:
        high, low = models.load_t2v()  # type: ignore[misc]
        models.apply_fast_paths(high, low)
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
        remembered = remember_shot(
            bank, models.vae, video, shot.prompt, shot.number + 1, mode=mode, policy=policy, tools=tools,
            camera=shot.camera,
        )  # fmt: skip
        new_bank, kept = remembered.bank, remembered.video
        identity, used, selection = None, {}, None
        positions = {pool: list(range(size[0])) for pool in ("high", "low")}
        entry.update({"positions": positions, "memory_ids": {"high": [], "low": []}, **remembered.log})
    else:
        if mode == "references":
            latents, embeddings = _reference_memory(settings, tools)
            bank = bank.with_references(latents, clip_embeddings=embeddings)
        request = ShotRequest(
            prompt=shot.prompt,
            width=settings.width,
            height=settings.height,
            frames=settings.frames,
            mode=mode if mode in CONTINUATIONS else "cut",
            reconstruct=story.reconstruct_target if settings.identity and sampler.identity_slot else None,
            negative=settings.negative,
            settings=shot_settings,
        ).with_sampler(sampler)
        backbone = models.backbone()
        placement = models.placement or (lambda b: _residency(models, b.high, b.low))
        with placement(backbone) as ensure:
            record, new_bank = render_shot(
                backbone, bank, request, models.vae, encoder, previous_video=tail,
                shot_index=shot.number + 1, device=models.device, callback=progress.step,
                before_pool=ensure, policy=policy, tools=tools, kfq_precision=settings.kfq_precision,
                camera=shot.camera,
            )  # fmt: skip
        latent, identity, kept = record.latent, record.identity, record.kept
        used, selection, positions = record.memory_ids, record.selection, record.memory_positions
        entry.update(record.log())
    targets = [] if shot.camera is None else shot.camera.targets(settings.frames)
    if targets:
        entry["camera"] = [pose.to_json() for pose in targets]
    overlap = {} if selection is None else selection.pool("high").overlap
    if overlap:
        entry["overlap"] = overlap
    entry.update({"guidance": {"high": guidance, "low": guidance}, "shift": shot_settings.shift})
    entry["boundary"], entry["steps"] = shot_settings.boundary, shot_settings.steps

    files = {"video": f"shots/{shot.label}.mp4", "memory": f"memory/{shot.label}.png"}
    write_mp4(kept, out / files["video"], fps=FPS)
    if policy.shared_pool:  # one pool serves both experts: one row
        used, positions = {"high": used.get("high", [])}, {"high": positions.get("high", [])}
    rows = selection_rows(bank, used, selection, models.vae.decode, positions) if any(used.values()) else []
    if policy.shared_pool:
        rows = [("shared", tiles) for _, tiles in rows]
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
    if targets or any(f.camera is not None for f in bank.frames()):
        files["cameras"] = f"memory/{shot.label}_cameras.png"
        chosen = used.get("high", [])
        save_png(camera_map(bank.frames(), targets, chosen, overlap), out / files["cameras"])
    save_state(out / "state", shot.label, new_bank, kept, latent, MOTION_FRAMES)
    entry["files"] = files
    entry["seconds_total"] = round(time.perf_counter() - t0, 3)
    progress.message(f"{shot.label} done in {entry['seconds_total']:.1f}s -> {files['video']}")
    return entry, new_bank, kept[:, -MOTION_FRAMES:]


@contextmanager
def _residency(models: ModelSet, high: WanDiT, low: WanDiT) -> Iterator[None]:
    """With ``models.swap_experts``: move the expert about to run onto the device, the other off it;
    with ``models.swap_blocks`` n > 0 only its first blocks move, and its last n come in one at a time
    (``BlockSwap``, hooks removed when the expert is swapped out or the shot ends).
    (The KeyframeQuerys stay where they were loaded, so no ``ensure`` hook is needed: yields None.)"""
    if not models.swap_experts:
        yield None
        return
    experts = {"high": high, "low": low}
    n_swap = models.swap_blocks
    blocks: dict[str, ExitStack] = {}

    def activate(name: str) -> None:
        for other, model in experts.items():
            if other != name:
                if other in blocks:
                    blocks.pop(other).close()
                model.to("cpu")
        if n_swap <= 0:
            experts[name].to(models.device)
            return
        resident_modules(experts[name], n_swap).to(models.device)  # the last n blocks stay on the CPU
        stack = ExitStack()
        swap = BlockSwap(swapped_blocks(experts[name], n_swap), models.device, "cpu")
        stack.enter_context(swap.attached())
        blocks[name] = stack

    try:
        with ExpertSwap(experts, activate).attached():
            yield None
    finally:
        for stack in blocks.values():
            stack.close()


def _reference_memory(settings: RunSettings, tools: MemoryTools) -> tuple[Tensor, Tensor | None]:
    """The reference images as memory: each image fitted (cover + centre crop)
    to the shot size and encoded alone -> latents [N, 16, h, w], and their image embeddings [N, D] when
    the policy uses them (StoryMem compares new keyframes against every stored one, references included)."""
    from PIL import Image, ImageOps

    images = []
    for path in settings.references:
        try:
            img = Image.open(path).convert("RGB")
        except (OSError, ValueError) as exc:
            raise RunnerError(f"reference image {path}: cannot be read ({exc})") from exc
        img = ImageOps.fit(img, (settings.width, settings.height), Image.Resampling.LANCZOS)
        pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        images.append(pixels.view(settings.height, settings.width, 3).permute(2, 0, 1).float() / 127.5 - 1)
    video = torch.stack(images, 1)  # [3, N, H, W]
    latents = torch.stack([tools.vae.encode(video[:, i : i + 1])[:, 0] for i in range(video.shape[1])])
    embeddings = None
    if tools.embedder is not None:
        embeddings = tools.embedder(((video + 1) / 2).clamp(0, 1).permute(1, 0, 2, 3))
    return latents, embeddings
