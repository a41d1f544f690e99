"""Convert a pickle checkpoint (``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt``) into a ``.safetensors`` file.

The loaders of :mod:`memento_core` never open pickles: unpickling can run code. Some LoRAs are only
published as ``torch.save`` files (StoryMem's, for one); this converter turns such a file into
safetensors once, safely::

    python -m memento_core.convert IN.pth OUT.safetensors [--overwrite]

- The input is read with PyTorch's restricted unpickler (``torch.load(weights_only=True)``), which
  rebuilds tensors and plain containers only and refuses any other global: no code in the file runs.
  Zip-format files are memory-mapped; old (pre-1.6, non-zip) files are read without a map.
- Only a flat mapping of names to tensors is accepted. A wrapper holding exactly one entry whose value
  is a mapping (``{"state_dict": {...}}``, ``{"model": {...}}``) is unwrapped, and the report says so.
  Anything else (a non-tensor value, a nested structure, a list) is refused, naming the key.
- The output is written atomically: a temp file in the target folder, fsync, ``os.replace``. A refused
  or failed conversion leaves no output behind; an existing output is replaced only with
  ``--overwrite``. Tensors that share memory, are non-contiguous or view a larger storage are copied
  to compact contiguous tensors first (safetensors stores each tensor's own bytes once).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
import zipfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .errors import CheckpointError
from .lora import normalize_lora_key

__all__ = ["ConversionReport", "convert_pickle", "describe_content", "main"]

PathLike = str | os.PathLike
#: Marks the KeyframeQuery tensors of a Memento file.
_KFQ_MARK = "keyframe_query."
#: Longest piece of a library error message quoted in a one-line error.
_DETAIL_CHARS = 240


@dataclass(frozen=True)
class ConversionReport:
    """What :func:`convert_pickle` wrote.

    path: the ``.safetensors`` file; n_tensors / bytes: tensor count and payload size; dtypes: the
    dtype names present (``"float32"``, ``"bfloat16"``, ...); kind: a hint of the content (Memento,
    StoryMem-style LoRA, other LoRA, plain weights); unwrapped: the wrapper key taken off
    (``"state_dict"``), None when the file held the tensors at its top level.
    """

    path: Path
    n_tensors: int
    bytes: int
    dtypes: tuple[str, ...]
    kind: str
    unwrapped: str | None = None

    def summary(self) -> str:
        """Readable lines for the command line."""
        lines = [
            f"wrote {self.path}: {self.n_tensors} tensors, {self.bytes / 1e6:.1f} MB, "
            f"dtypes: {', '.join(self.dtypes)}",
            f"content: {self.kind}",
        ]
        if self.unwrapped is not None:
            lines.append(f"note: the tensors were taken from the file's single entry '{self.unwrapped}'")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Reading


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def _load_error(src: Path, exc: Exception) -> CheckpointError:
    """A one-line error for a file the restricted unpickler refused or could not read."""
    text = str(exc)
    if "Weights only load failed" in text:
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please|\n|$)", text) or re.search(
            r"^(.*\bGLOBAL\b.*?)\.?$", text, re.MULTILINE
        )
        detail = _one_line(found.group(1)) if found else "content outside tensors and plain containers"
        return CheckpointError(
            f"{src}: refused by PyTorch's restricted unpickler ({detail}): the file holds more than "
            "tensors and plain containers (it may carry code) or is damaged; nothing in it ran"
        )
    return CheckpointError(
        f"{src}: not a readable torch.save checkpoint ({type(exc).__name__}: {_one_line(text)})"
    )


def _check_format(src: Path) -> None:
    """Refuse files that are neither a zip archive (torch >= 1.6) nor a pickle stream (older torch)."""
    with open(src, "rb") as fh:
        head = fh.read(9)
    if not head:
        raise CheckpointError(f"{src}: the file is empty; expected a torch.save checkpoint")
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000:
        raise CheckpointError(f"{src}: already a safetensors file (despite its name); rename it instead")
    if not head.startswith(b"PK") and not head.startswith(b"\x80"):
        raise CheckpointError(
            f"{src}: not a torch.save checkpoint (it starts with neither a zip header nor a pickle marker)"
        )


def _load(src: Path) -> Any:
    """``torch.load`` with the restricted unpickler: memory-mapped, or without a map for old files."""
    _check_format(src)
    try:
        return torch.load(src, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        if zipfile.is_zipfile(src):  # a map was possible: the error is about the content
            raise _load_error(src, exc) from exc
    try:  # the legacy (non-zip) torch.save format cannot be memory-mapped
        return torch.load(src, map_location="cpu", weights_only=True, mmap=False)
    except Exception as exc:
        raise _load_error(src, exc) from exc


def _a(value: Any) -> str:
    """``"a str"``, ``"an int"``, ``"a dict (nested structure)"``."""
    name = type(value).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    nested = " (nested structure)" if isinstance(value, (Mapping, list, tuple, set)) else ""
    return f"{article} {name}{nested}"


def _flat_tensors(obj: Any, src: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The file's name -> tensor mapping, and the wrapper key taken off (if any); else a refusal."""
    expected = "only a flat mapping of names to tensors is converted"
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{src}: holds {_a(obj)}, not a mapping of names to tensors; {expected}")
    unwrapped = None
    if len(obj) == 1:
        ((key, value),) = obj.items()
        if isinstance(key, str) and isinstance(value, Mapping):
            obj, unwrapped = value, key
    where = "" if unwrapped is None else f"{unwrapped}."
    if not obj:
        raise CheckpointError(f"{src}: holds no tensors (an empty mapping); {expected}")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{src}: key {key!r} is {_a(key)}, not a string; {expected}")
        name = f"'{where}{key}'"
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{src}: key {name} holds {_a(value)}, not a tensor; {expected}")
        if key == "__metadata__":
            raise CheckpointError(f"{src}: key {name} is reserved by the safetensors format")
        if value.layout != torch.strided or value.is_quantized:
            what = "a quantized" if value.is_quantized else f"a {value.layout}"
            raise CheckpointError(f"{src}: key {name} holds {what} tensor; safetensors stores dense tensors")
        out[key] = value.detach()
    return out, unwrapped


def _compact(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor with its own contiguous storage of exactly its size (copies only where needed)."""
    users = Counter(t.untyped_storage().data_ptr() for t in tensors.values() if t.numel())
    out = {}
    for key, t in tensors.items():
        own = (
            t.numel() > 0
            and users[t.untyped_storage().data_ptr()] == 1
            and t.is_contiguous()
            and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        )
        out[key] = t if own else t.clone(memory_format=torch.contiguous_format)
    return out


# ------------------------------------------------------------------------------------------------
# Content hint


def describe_content(keys: Sequence[str]) -> str:
    """A hint of what a state dict holds, from its keys alone.

    PEFT ``lora_A`` / ``lora_B`` keys plus ``keyframe_query.*``: a Memento file; PEFT keys alone: a
    StoryMem-style LoRA; other LoRA layouts (``lora_down`` / ``lora_up``, kohya): a LoRA.
    """
    layers = {path for path, part in map(normalize_lora_key, keys) if part == "down"}
    n_kfq = sum(_KFQ_MARK in k for k in keys)
    lora = f"LoRA ({len(layers)} layer{'' if len(layers) == 1 else 's'})"
    peft = any(".lora_A." in k or ".lora_B." in k for k in keys)
    if layers and n_kfq:
        return f"Memento (LoRA + KeyframeQuery): {lora}, {n_kfq} KeyframeQuery tensors"
    if layers and peft:
        return f"StoryMem-style LoRA (no KeyframeQuery): {lora}"
    if layers:
        return lora
    if n_kfq:
        return f"KeyframeQuery only ({n_kfq} tensors, no LoRA)"
    return "weights without LoRA or KeyframeQuery keys"


# ------------------------------------------------------------------------------------------------
# Writing


def _check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    if not src.is_file():
        raise CheckpointError(f"{src}: no such file")
    if dst.suffix.lower() != ".safetensors":
        raise CheckpointError(f"{dst}: the output name must end in .safetensors")
    if not dst.parent.is_dir():
        raise CheckpointError(f"{dst}: the output folder {dst.parent} does not exist")
    if dst.exists() and (dst.is_dir() or src.resolve() == dst.resolve()):
        raise CheckpointError(f"{dst}: is a folder or the input itself; choose another output name")
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst}: already exists; pass --overwrite (overwrite=True) to replace it")


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable where the platform allows opening a folder."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(tensors: dict[str, torch.Tensor], dst: Path, src: Path, overwrite: bool) -> None:
    mode = dst.stat().st_mode & 0o777 if dst.exists() else 0o644
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            save_file(tensors, tmp, metadata={"format": "pt", "converted_from": src.name})
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, mode)
        except (OSError, RuntimeError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{dst}: could not write the safetensors file ({_one_line(str(exc))})"
            ) from exc
        if dst.exists() and not overwrite:  # appeared while converting
            raise CheckpointError(f"{dst}: already exists; pass --overwrite (overwrite=True) to replace it")
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_folder(dst.parent)


def convert_pickle(src: PathLike, dst: PathLike, *, overwrite: bool = False) -> ConversionReport:
    """Convert the torch.save file ``src`` into the safetensors file ``dst``; see the module docstring.

    Raises :class:`~memento_core.errors.CheckpointError` naming the file for a missing input, a file
    the restricted unpickler refuses (it would need code) or cannot read, content that is not a flat
    mapping of names to tensors, an existing ``dst`` without ``overwrite``, or a failed write; then no
    output file is left behind (an existing ``dst`` is left untouched).
    """
    src, dst = Path(src), Path(dst)
    _check_paths(src, dst, overwrite)
    flat, unwrapped = _flat_tensors(_load(src), src)
    tensors = _compact(flat)
    del flat
    _write_atomic(tensors, dst, src, overwrite)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    return ConversionReport(
        path=dst,
        n_tensors=len(tensors),
        bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
        dtypes=tuple(dtypes),
        kind=describe_content(list(tensors)),
        unwrapped=unwrapped,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m memento_core.convert IN.pth OUT.safetensors [--overwrite]``.

    Returns 0 after printing what was written, 2 with ``error: ...`` on stderr for a refused or bad
    input (or bad arguments).
    """
    parser = argparse.ArgumentParser(
        prog="python -m memento_core.convert",
        description="Convert a torch.save checkpoint holding only tensors into a .safetensors file. "
        "Read with PyTorch's restricted unpickler (weights_only): no code in the file runs.",
    )
    parser.add_argument("src", metavar="IN.pth", help="pickle checkpoint (.pth / .pt / .bin / .ckpt)")
    parser.add_argument("dst", metavar="OUT.safetensors", help="safetensors file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or bad arguments (2, usage already printed)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        report = convert_pickle(args.src, args.dst, overwrite=args.overwrite)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
