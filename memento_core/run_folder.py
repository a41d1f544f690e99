"""A story run's folder: what marks it as a run, the lock held while rendering, resume state, clean-up.

A folder holds a run when any of the runner's outputs is there (``RUN_OUTPUTS``: ``state/``,
``shots/``, ``memory/``, ``identity/``, ``story.mp4``, ``story_log.json``, ``memory_bank.safetensors``).
Such a folder is never written into unless the caller asks to resume it (same inputs, readable state)
or to overwrite it, which first removes those outputs (and nothing else) so no old state or log can be
mixed into the new run. While a run renders, ``run.lock`` in the folder is locked (``flock`` / Windows
``msvcrt.locking``): a second process rendering into the same folder is refused at once.

State (``state/``): ``run.json`` (the run's fingerprint), and after each shot ``bank_<label>.safetensors``
(the bank after it) and ``shot_<label>.safetensors`` (its last frames ``tail`` [3, 5, H, W] and its
target ``latent``), everything the next shot depends on. Damaged state is reported by file, never as a
traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from .errors import MementoError
from .memory import MemoryBank, load_bank, save_bank

__all__ = [
    "RUN_OUTPUTS",
    "Finished",
    "RunFolderError",
    "RunnerError",
    "atomic_json",
    "clear_run",
    "held_outputs",
    "load_state",
    "read_json",
    "run_lock",
    "save_state",
]

#: What a story run writes into its folder (``references/`` is the Render Story node's input copies,
#: named by content, and stays).
RUN_OUTPUTS = (
    "state",
    "shots",
    "memory",
    "identity",
    "story.mp4",
    "story_log.json",
    "memory_bank.safetensors",
    "consistency.json",
    "consistency.png",
    "consistency_compare.png",
)
LOCK_NAME = "run.lock"


class RunnerError(MementoError):
    """A story run cannot start or continue (bad settings, a folder from another run, missing state)."""


class RunFolderError(RunnerError):
    """The output folder holds a run that may not be continued: ``differs`` names the inputs that differ
    (resume refused), or is empty when resuming was not asked for (nothing is overwritten silently)."""

    def __init__(self, message: str, folder: Path, differs: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.folder, self.differs = folder, list(differs)


@dataclass(frozen=True)
class Finished:
    """What a finished shot leaves for the next: the bank after it and its last frames [3, k, H, W]."""

    bank: MemoryBank
    tail: Tensor


def held_outputs(out: Path) -> list[str]:
    """The run outputs present in ``out`` (empty: not a run folder)."""
    return [name for name in RUN_OUTPUTS if (out / name).exists()]


def clear_run(out: Path) -> None:
    """Remove a previous run's outputs from ``out`` (only ``RUN_OUTPUTS``; other files stay)."""
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def check_folder(out: Path) -> None:
    """``out`` must be a folder (or not exist yet) that this process can write into."""
    if out.exists() and not out.is_dir():
        raise RunnerError(f"output folder {out} is a file, not a folder; pass another --out")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunnerError(f"output folder {out}: {probe} is not writable; pass another --out")


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``out/run.lock`` for a run; a folder another process is rendering into is refused."""
    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / LOCK_NAME, "a+b")
    try:
        try:
            _lock(fh)
        except OSError as exc:
            raise RunFolderError(
                f"{out} is being rendered by another process right now (its {LOCK_NAME} is locked); "
                "wait for it or pass another --out",
                out,
            ) from exc
        yield
    finally:
        with contextlib.suppress(OSError):
            _unlock(fh)
        fh.close()


def _lock(fh: Any) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _unlock(fh: Any) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def read_json(path: Path, what: str) -> Any:
    """A JSON file of the run folder, or a RunFolderError naming it when it is damaged."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise RunFolderError(
            f"{path} ({what}) is damaged or unreadable ({type(exc).__name__}: {exc}); rerun with --overwrite "
            "to start over",
            path.parent,
        ) from exc


def atomic_json(data: Any, path: Path) -> None:
    """Write ``data`` as JSON through a temp file and a rename."""
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_state(
    state_dir: Path, label: str, bank: MemoryBank, video: Tensor, latent: Tensor, tail_frames: int
) -> None:
    """After shot ``label``: the bank, the last ``tail_frames`` frames of ``video`` and its ``latent``."""
    from safetensors.torch import save_file

    save_bank(bank, state_dir / f"bank_{label}.safetensors")
    tmp = state_dir / f"shot_{label}.safetensors.part"
    tensors = {"tail": video[:, -tail_frames:].contiguous().cpu(), "latent": latent.contiguous().cpu()}
    save_file(tensors, str(tmp))
    os.replace(tmp, state_dir / f"shot_{label}.safetensors")


def load_state(state_dir: Path, label: str) -> Finished:
    """The state after shot ``label``, or a RunFolderError naming the damaged file."""
    from safetensors.torch import load_file

    path = state_dir / f"shot_{label}.safetensors"
    try:
        tensors = load_file(str(path))
        tail = tensors["tail"]
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise RunFolderError(
            f"{path} (the state after shot {label}) is damaged ({type(exc).__name__}); rerun with "
            "--overwrite to start over",
            state_dir.parent,
        ) from exc
    try:
        bank = load_bank(state_dir / f"bank_{label}.safetensors")
    except MementoError as exc:
        raise RunFolderError(f"{exc}; rerun with --overwrite to start over", state_dir.parent) from exc
    return Finished(bank, tail)


def load_latent(state_dir: Path, label: str) -> Tensor:
    """The target latent saved after shot ``label`` (to rebuild its video file)."""
    from safetensors.torch import load_file

    return load_file(str(state_dir / f"shot_{label}.safetensors"))["latent"]
