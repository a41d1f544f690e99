"""Memory banks on disk: one ``.safetensors`` file with versioned JSON metadata, written atomically.

``save_bank`` writes every unique frame's latent and CLIP embedding once (pools and the archive refer
to frame ids) with the metadata in the safetensors header, through a temp file in the same folder,
fsync and ``os.replace``. ``load_bank`` validates the file. Never pickle.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from torch import Tensor

from ..errors import MementoError
from ..loading import safetensors_header_size
from .bank import MemoryBank
from .frames import POOLS, MemoryBankError, MemoryFrame

if TYPE_CHECKING:
    from ..fov import CameraPose

__all__ = ["BANK_FORMAT", "BANK_VERSION", "bank_to_dict", "load_bank", "save_bank"]

BANK_FORMAT = "memento-memory-bank"
BANK_VERSION = 1
_METADATA_KEY = "memento_bank"


def _bank_header(bank: MemoryBank) -> dict[str, Any]:
    """The scalar fields every serialisation of a bank starts with."""
    return {
        "format": BANK_FORMAT,
        "version": BANK_VERSION,
        "policy": bank.policy,
        "capacity": bank.capacity,
        "current_time": bank.current_time,
        "shots_done": bank.shots_done,
    }


def bank_to_dict(bank: MemoryBank) -> dict[str, Any]:
    """A JSON-able summary of a bank for logs and previews (no tensors)."""
    res = bank.resolution
    return {
        **_bank_header(bank),
        "resolution": None if res is None else list(res),
        "pools": {name: [f.summary() for f in bank.pool(name)] for name in POOLS},
        "archive": [f.frame_id for f in bank.archive],
    }


# -------------------------------------------------------------------------------------- persistence


def _bank_payload(bank: MemoryBank) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, metadata) of a bank: each unique frame's tensors once, pools as id lists."""
    tensors: dict[str, Tensor] = {}
    frames = []
    for n, f in enumerate(bank.frames()):
        latent_key = f"latent.{n}"
        tensors[latent_key] = f.latent.detach().cpu().contiguous().clone()
        clip_key = None
        if f.clip_embedding is not None:
            clip_key = f"clip.{n}"
            tensors[clip_key] = f.clip_embedding.detach().cpu().contiguous().clone()
        entry = {key: v for key, v in f.summary().items() if key != "has_clip"}
        frames.append({**entry, "latent": latent_key, "clip": clip_key})
    meta = {
        **_bank_header(bank),
        "frames": frames,
        "pools": {name: bank.frame_ids(name) for name in POOLS},
        "archive": [f.frame_id for f in bank.archive],
    }
    return tensors, meta


def _write_bytes(fh: BinaryIO, data: bytes) -> None:
    """Write all of ``data`` (a seam for tests that simulate a crash mid-write)."""
    fh.write(data)


def save_bank(bank: MemoryBank, path: str | os.PathLike[str]) -> Path:
    """Write ``bank`` to one ``.safetensors`` file, atomically -> the path written.

    The bytes go to a temp file in the same folder, are fsynced, then ``os.replace`` moves it over
    ``path``. On any error (or interrupt) the temp file is removed and an existing ``path`` is untouched.
    """
    from safetensors.torch import save

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors, meta = _bank_payload(bank)
    data = save(
        tensors, metadata={"format": BANK_FORMAT, _METADATA_KEY: json.dumps(meta, ensure_ascii=False)}
    )
    mode = target.stat().st_mode & 0o777 if target.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            _write_bytes(fh, data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)
    return target


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_bank(path: str | os.PathLike[str]) -> MemoryBank:
    """Read a bank written by ``save_bank``.

    Readable ``MemoryBankError`` for a missing file, a non-safetensors or truncated file, a safetensors
    file that is not a bank, a newer format version, or missing tensors.
    """
    from safetensors import safe_open

    source = Path(path)
    if not source.is_file():
        raise MemoryBankError(f"memory bank file {source} does not exist (or is not a file)")
    try:
        safetensors_header_size(source)
    except MementoError as exc:
        raise MemoryBankError(
            f"memory bank file {source} is not a readable .safetensors file (truncated or another "
            f"format): {str(exc).removeprefix(f'{source}: ')}"
        ) from exc
    try:
        with safe_open(str(source), framework="pt", device="cpu") as fh:
            header = fh.metadata() or {}
            meta = _parse_metadata(header, source)
            keys = set(fh.keys())
            needed = _needed_tensors(meta, source)
            missing = sorted(set(needed) - keys)
            if missing:
                raise MemoryBankError(
                    f"memory bank file {source} is incomplete: frame {needed[missing[0]]!r} needs tensor "
                    f"{missing[0]!r}, which the file lacks ({len(missing)} tensors missing)"
                )
            tensors = {key: fh.get_tensor(key).clone() for key in needed}
    except MementoError:
        raise
    except Exception as exc:  # safetensors raises its own error type for a bad header / truncated file
        raise MemoryBankError(
            f"memory bank file {source} is not a readable .safetensors file (truncated or another "
            f"format): {exc}"
        ) from exc
    try:
        return _bank_from_payload(meta, tensors)
    except MementoError as exc:
        raise type(exc)(f"memory bank file {source}: {exc}") from exc
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MemoryBankError(f"memory bank file {source} has malformed metadata: {exc!r}") from exc


def _parse_metadata(header: Mapping[str, str], source: Path) -> dict[str, Any]:
    raw = header.get(_METADATA_KEY)
    if raw is None:
        raise MemoryBankError(
            f"{source} is a .safetensors file but not a Memento memory bank (no {_METADATA_KEY!r} metadata); "
            "is it a model or LoRA checkpoint?"
        )
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise MemoryBankError(f"memory bank file {source}: its metadata is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != BANK_FORMAT:
        kind = meta.get("format") if isinstance(meta, dict) else None
        raise MemoryBankError(f"{source} is not a memory bank: format {kind!r}, expected {BANK_FORMAT!r}")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise MemoryBankError(f"memory bank file {source}: invalid format version {version!r}")
    if version > BANK_VERSION:
        raise MemoryBankError(
            f"memory bank file {source} has format version {version}, newer than this ComfyUI-Memento reads "
            f"(up to {BANK_VERSION}); update the node pack to load it"
        )
    return meta


def _needed_tensors(meta: Mapping[str, Any], source: Path) -> dict[str, str]:
    """tensor key -> frame id, for every tensor the metadata refers to."""
    needed: dict[str, str] = {}
    try:
        for entry in meta["frames"]:
            needed[str(entry["latent"])] = str(entry["id"])
            if entry.get("clip") is not None:
                needed[str(entry["clip"])] = str(entry["id"])
    except (KeyError, TypeError) as exc:
        raise MemoryBankError(f"memory bank file {source} has malformed frame metadata: {exc!r}") from exc
    return needed


def _bank_from_payload(meta: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> MemoryBank:
    frames: dict[str, MemoryFrame] = {}
    for entry in meta["frames"]:
        clip_key = entry.get("clip")
        frames[str(entry["id"])] = MemoryFrame(
            frame_id=str(entry["id"]),
            latent=tensors[str(entry["latent"])],
            abs_frame=int(entry["abs_frame"]),
            source=entry["source"],
            caption=str(entry.get("caption", "")),
            pinned=bool(entry.get("pinned", False)),
            shot=None if entry.get("shot") is None else int(entry["shot"]),
            camera=_camera_from(entry.get("camera")),
            clip_embedding=None if clip_key is None else tensors[str(clip_key)],
        )

    def resolve(ids: Sequence[str], where: str) -> tuple[MemoryFrame, ...]:
        unknown = [i for i in ids if i not in frames]
        if unknown:
            raise MemoryBankError(f"{where} refers to frames {unknown} that the file does not describe")
        return tuple(frames[i] for i in ids)

    pools = meta["pools"]
    return MemoryBank(
        policy=meta["policy"],
        capacity=int(meta["capacity"]),
        current_time=int(meta["current_time"]),
        shots_done=int(meta["shots_done"]),
        high=resolve(pools["high"], "pool 'high'"),
        low=resolve(pools["low"], "pool 'low'"),
        archive=resolve(meta.get("archive", []), "the archive"),
    )


def _camera_from(value: Sequence[float] | None) -> CameraPose | None:
    if value is None:
        return None
    numbers = [float(v) for v in value]
    if len(numbers) not in (3, 4) or not all(math.isfinite(v) for v in numbers):
        raise MemoryBankError(f"camera pose {list(value)}: expected finite [x, z, yaw(, fov)]")
    from ..fov import CameraPose

    return CameraPose(*numbers)  # banks written before poses kept their FOV: 60
