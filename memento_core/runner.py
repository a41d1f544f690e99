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
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor

from .adapters import TextEncoder
from .conditioning import MOTION_FRAMES, latent_frames
from .dit import WanDiT
from .errors import MementoError, ShapeError
from .m2v import KFQ_PRECISIONS, WAN_NEGATIVE_PROMPT, ShotRequest, remember_shot, render_shot
from .media import FPS, join_mp4, write_mp4
from .memory import (
    MemoryBank,
    MemoryPolicy,
    MemoryTools,
    SamplerDefaults,
    load_bank,
    policy_class,
    policy_names,
    save_bank,
)
from .models import ModelSet
from .offload import ExpertSwap
from .preview import SheetTile, contact_sheet, save_png, selection_rows
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
FIRST_SHOT_MODES = ("t2v", "empty", "references")
CONTINUATIONS = ("mi2v", "mm2v")
#: The policies a story run can use: their selection needs nothing beyond the KeyframeQuerys (camera
#: poses in scripts come with the camera-policy work).
RUNNER_POLICIES = policy_names(without=("targets", "keep_ids"))
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


@dataclass(frozen=True)
class _Finished:
    """What a finished shot leaves for the next: the bank after it and its last frames [3, k, H, W]."""

    bank: MemoryBank
    tail: Tensor


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
    policy = settings.memory_policy(models.family)
    settings = settings.resolved(policy)
    tools = _memory_tools(policy, models)
    out = Path(out)
    state_dir = out / "state"
    shots = story.shots[: settings.max_shots] if settings.max_shots else story.shots
    progress = progress or Progress(len(shots))
    fingerprint = _fingerprint(story, settings, models, policy)
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
        _atomic_json(log, log_path)
    save_bank(bank, out / "memory_bank.safetensors")
    t0 = time.perf_counter()
    join_mp4([out / "shots" / f"{s.label}.mp4" for s in shots], out / "story.mp4")
    log["joined_seconds"] = round(time.perf_counter() - t0, 3)
    log["outputs"] = {"story": "story.mp4", "bank": "memory_bank.safetensors"}
    _atomic_json(log, log_path)
    progress.message(f"done: {out / 'story.mp4'} ({len(shots)} shots)")
    return log


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
            bank, models.vae, video, shot.prompt, shot.number + 1, mode=mode, policy=policy, tools=tools
        )
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
            )  # fmt: skip
        latent, identity, kept = record.latent, record.identity, record.kept
        used, selection, positions = record.memory_ids, record.selection, record.positions
        entry.update(record.log())
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
    _save_state(out / "state", shot, new_bank, kept, latent)
    entry["files"] = files
    entry["seconds_total"] = round(time.perf_counter() - t0, 3)
    progress.message(f"{shot.label} done in {entry['seconds_total']:.1f}s -> {files['video']}")
    return entry, new_bank, kept[:, -MOTION_FRAMES:]


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
