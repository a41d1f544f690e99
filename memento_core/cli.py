"""``python -m memento_core.story``: render a story script from the command line.

Parses the options, builds the models (a model config for real weights, else the built-in tiny models),
and runs :func:`memento_core.runner.render_story`. This is the top of the import graph: it imports the
runner, the model set and the real-model adapters; nothing imports it.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .adapters import TinyImageEmbedder
from .attention import ATTENTION_CHOICES
from .errors import MementoError
from .evaluate import EvaluateError, evaluate_run
from .m2v import KFQ_PRECISIONS
from .memory import policy_class
from .models import tiny_models
from .real_models import load_model_config, real_models
from .runner import CONTINUATIONS, FIRST_SHOT_MODES, RUNNER_POLICIES, Progress, RunSettings, render_story
from .sampling import SOLVERS
from .shot import MEMORY_NOISE, NOISE_SOURCES
from .story import load_story

__all__ = ["cli", "main"]

#: Defaults used with the tiny models (small enough for a 3-shot story in well under 2 minutes on CPU).
TINY_DEFAULTS = {"width": 256, "height": 160, "frames": 33, "steps": 12}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m memento_core.story",
        description="Render a story script shot by shot with memory (Memento's or StoryMem's). "
        "Without a model config "
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
    p.add_argument(
        "--policy",
        choices=RUNNER_POLICIES,
        help="memory policy (default: the backbone's family: memento for Memento files, storymem for "
        "StoryMem files; the tiny models are Memento's). "
        + "; ".join(f"{name}: {policy_class(name).summary}" for name in RUNNER_POLICIES),
    )
    p.add_argument(
        "--memory-capacity",
        type=int,
        help="memory frames a shot is conditioned on (default: the policy's: memento 8, storymem 10)",
    )
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
    p.add_argument(
        "--solver",
        choices=SOLVERS,
        help="unipc (the released default), dpm++ (Wan's DPM-Solver++ on its own schedule) or euler",
    )
    released = p.add_argument_group("options of the released pipelines (each as the reference defines it)")
    released.add_argument(
        "--fix",
        type=int,
        help="keep the first N memory frames: Memento's --fix N (in the local quota), StoryMem's sink "
        "(default: the policy's: memento 0, storymem 3)",
    )
    released.add_argument(
        "--idt-back-mode",
        action="store_true",
        help="Memento's --idt_back_mode: the identity slot after the memory frames",
    )
    released.add_argument(
        "--storymem-mode",
        action="store_true",
        help="Memento's --storymem_mode: memory positions 20 latent frames apart",
    )
    released.add_argument(
        "--memory-noise",
        choices=MEMORY_NOISE,
        help="the noise memory slots are re-noised with after step 0: released (the step-0 re-noised "
        "memory, as the released sampler) or fixed (the initial noise, SPEC 4.5's idealised form)",
    )
    released.add_argument(
        "--noise",
        choices=NOISE_SOURCES,
        help="initial noise from a CPU generator (the same on every device) or from one on the compute "
        "device (as the released pipelines: a GPU reproduces their videos seed for seed)",
    )
    released.add_argument(
        "--kfq-precision",
        choices=KFQ_PRECISIONS,
        help="KeyframeQuery scoring: auto (bf16 autocast when the backbone computes in bf16, as released), "
        "fp32 or bf16",
    )
    fast = p.add_argument_group("GPU fast paths (each checked against the safe path on the GPU first)")
    fast.add_argument(
        "--attention",
        choices=ATTENTION_CHOICES,
        help="attention backend (default: the model config's, else auto: SageAttention or flash-attn "
        "when installed and agreeing with SDPA, else SDPA)",
    )
    fast.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p.add_argument("--verbose", "-v", action="store_true", help="show the traceback of an error")
    p.add_argument(
        "--evaluate",
        action="store_true",
        help="at the end, write the story consistency report (consistency.json / .png, see "
        "python -m memento_core.evaluate); real models need 'clip' in the model config",
    )
    return p


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m memento_core.story``: parse arguments, pick the models, render. Returns the exit code."""
    args = _parser().parse_args(argv)
    config = None if args.tiny else (args.models or os.environ.get("MEMENTO_MODELS") or None)
    try:
        story = load_story(args.story)
        if config:
            model_config = load_model_config(config)
            models = real_models(model_config, args.width, args.height, args.frames)
            defaults: dict[str, Any] = dict(model_config.run_settings())
        else:
            models, defaults = tiny_models(), dict(TINY_DEFAULTS)
        if args.attention or args.compile:
            models.fast_paths = replace(
                models.fast_paths,
                attention=args.attention or models.fast_paths.attention,
                compile=args.compile or models.fast_paths.compile,
            )
        # every given value is validated, never replaced: 0 is an error, not "the default"
        given = {
            k: getattr(args, k)
            for k in ("width", "height", "frames", "steps")
            if getattr(args, k) is not None
        }
        # the released pipelines' options: the command line over the model config's "run" over defaults
        options = {
            "solver": args.solver,
            "fix": args.fix,
            "memory_noise": args.memory_noise,
            "noise": args.noise,
            "kfq_precision": args.kfq_precision,
            "identity_back": args.idt_back_mode or None,
            "storymem_mode": args.storymem_mode or None,
            "policy": args.policy,
        }
        given |= {k: v for k, v in options.items() if v is not None}
        settings = replace(
            RunSettings(),
            **{**defaults, **given},
            seed=args.seed,
            first_shot="references" if args.reference and args.first_shot == "t2v" else args.first_shot,
            references=tuple(args.reference),
            continuation=args.continuation,
            identity=not args.no_identity,
            max_shots=args.shots,
            capacity=args.memory_capacity,
        )
        out = Path(args.out) if args.out is not None else Path("output") / Path(args.story).stem
        progress = Progress(min(len(story.shots), args.shots or len(story.shots)), enabled=not args.quiet)
        for warning in story.warnings:
            progress.message(f"warning: {warning}")
        evaluator = _evaluator(models) if args.evaluate else None  # refused before rendering when impossible
        render_story(
            story, models, settings, out, resume=args.resume, overwrite=args.overwrite, progress=progress
        )
        if evaluator is not None:
            progress.message(evaluate_run(out, *evaluator).summary())
    except KeyboardInterrupt:
        print(
            "\ninterrupted; finished shots are kept. Run the same command with --resume to go on.",
            file=sys.stderr,
        )
        return 130
    except Exception as exc:  # the boundary: one line that names the input; -v shows the traceback
        if args.verbose:
            traceback.print_exc()
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return 2
    return 0


def _evaluator(models: Any) -> tuple[Any, str, Any]:
    """(image embedder, its name, text scorer or None) for the consistency report of a run of ``models``."""
    from .evaluate import clip_text_scorer

    if models.kind == "tiny":
        return TinyImageEmbedder(), "tiny (deterministic stand-in: the run used the tiny models)", None
    embedder = models.embedder()
    if embedder is None:
        raise EvaluateError(
            '--evaluate embeds the shots\' frames with CLIP: add "clip" (an open_clip ViT-B-32 .safetensors '
            "file) to the model config"
        )
    name = "CLIP ViT-B-32 (image CLIP on frames, an approximation of ViCLIP)"
    return embedder, name, clip_text_scorer(embedder)


def describe_error(exc: BaseException) -> str:
    """One line for an error at the command line's boundary, naming the file or option and what to do."""
    if isinstance(exc, MementoError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        hint = {
            errno.ENOSPC: "the disk is full; free space and rerun with --resume",
            errno.EACCES: "permission denied; pass another --out",
            errno.EROFS: "the file system is read-only; pass another --out",
            errno.ENOTDIR: "a path component is a file, not a folder",
        }.get(exc.errno or 0, "")
        return f"{where}{exc.strerror or exc}" + (f"; {hint}" if hint else "")
    if isinstance(exc, MemoryError):
        return "out of memory; try smaller --width/--height/--frames, or fp8 / offload in the model config"
    return f"unexpected {type(exc).__name__}: {exc} (run with -v for the traceback, and please report it)"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m memento_core.story``."""
    return cli(argv)
