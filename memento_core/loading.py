"""Loading Wan DiT checkpoints: official shards, ComfyUI single files, fp8 (scaled) files.

The model is built on the meta device and the weights are assigned tensor by tensor, each read with
a positioned read (no memory map) and converted to the target dtype and device at once, so peak host
memory stays about one copy of the loaded weights. Pickle checkpoints are never opened.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .dit import DiTConfig, WanDiT
from .errors import CheckpointError

__all__ = [
    "CheckpointIndex",
    "TensorInfo",
    "infer_config",
    "load_dit",
    "load_state_dict",
    "open_checkpoint",
    "strip_prefixes",
]

PathLike = str | os.PathLike
#: Key prefixes put in front of the official names by ComfyUI and other tools.
KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
#: Per-weight scales of fp8 "scaled" files: ComfyUI spelling, diffusers / newer tools spelling.
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
#: Metadata that fp8 files carry beside the weights; not model parameters.
IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
IGNORED_KEYS = ("scaled_fp8",)
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def strip_prefixes(key: str, prefixes: Sequence[str]) -> str:
    """Remove any of ``prefixes`` from the front of ``key``, repeatedly and in any order."""
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _strip_prefix(key: str) -> str:
    for prefix in KEY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: file, absolute byte range, stored dtype and shape."""

    path: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class CheckpointIndex:
    """Every tensor of a (possibly sharded) checkpoint, keyed by its official name (prefix stripped).

    Built from the safetensors headers alone; tensors are read on demand with plain positioned
    reads into buffers from torch's allocator (no memory map stays resident, buffers are aligned).
    """

    source: str
    tensors_info: dict[str, TensorInfo]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: info.shape for k, info in self.tensors_info.items()}

    def read(self, key: str) -> torch.Tensor:
        """Read one tensor (official key) into a new CPU tensor of its stored dtype."""
        info = self.tensors_info[key]
        buf = torch.empty(info.end - info.start, dtype=torch.uint8)
        with open(info.path, "rb") as fh:
            fh.seek(info.start)
            if fh.readinto(memoryview(buf.numpy())) != buf.numel():
                raise CheckpointError(f"{info.path}: truncated while reading '{info.key}'")
        return buf.view(info.dtype).reshape(info.shape)

    def tensors(self, keys: Sequence[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (official key, tensor) one at a time."""
        for key in self.tensors_info if keys is None else keys:
            yield key, self.read(key)


def _resolve_files(path: PathLike | Sequence[PathLike]) -> tuple[str, list[Path]]:
    """Expand a file, a folder of shards (with its index json) or a list of files."""
    if isinstance(path, (str, os.PathLike)):
        p = Path(path)
        if not p.exists():
            raise CheckpointError(f"{p}: no such checkpoint file or folder")
        if p.is_dir():
            return str(p), _folder_shards(p)
        return str(p), [p]
    files = [Path(p) for p in path]
    if not files:
        raise CheckpointError("checkpoint: an empty list of files was given")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: no such checkpoint file")
    return ", ".join(str(f) for f in files), files


def _folder_shards(folder: Path) -> list[Path]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        names = ", ".join(i.name for i in indexes)
        raise CheckpointError(f"{folder}: several shard indexes ({names}); pass the files explicitly")
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{indexes[0]}: not a valid shard index (expected a 'weight_map')") from exc
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{indexes[0]}: shard(s) listed in the index are missing: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no .safetensors files in this folder")
    return files


def open_checkpoint(path: PathLike | Sequence[PathLike]) -> CheckpointIndex:
    """Index the tensors of a checkpoint without reading them; validates every file's header.

    Raises :class:`CheckpointError` naming the file for a missing, pickle, non-safetensors or
    truncated file, and for a key present in two files.
    """
    source, paths = _resolve_files(path)
    infos: dict[str, TensorInfo] = {}
    for p in paths:
        if p.suffix.lower() in _PICKLE_SUFFIXES:
            raise CheckpointError(
                f"{p}: pickle checkpoints ({p.suffix}) are never loaded (they can run code); "
                "use the .safetensors release of this model, or convert this file once (tensors only, "
                f"no code runs): python -m memento_core.convert {p} {p.with_suffix('.safetensors')}"
            )
        for info in _read_header(p):
            name = _strip_prefix(info.key)
            if name in infos:
                raise CheckpointError(f"{p}: tensor '{name}' also appears in {infos[name].path}")
            infos[name] = info
    return CheckpointIndex(source=source, tensors_info=infos)


#: The largest safetensors header read. Real checkpoints' headers are far smaller (a 14B Wan expert's,
#: fp8 scales included, is under 1 MB); a bigger one is refused before it is read.
MAX_HEADER_BYTES = 16 * 1024 * 1024


def safetensors_header_size(p: Path) -> int:
    """The header length a safetensors file declares, checked against the file and ``MAX_HEADER_BYTES``
    (raises ``CheckpointError`` naming the file)."""
    size = p.stat().st_size
    expected = "expected a .safetensors file"
    with open(p, "rb") as fh:
        head = fh.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{p}: file is empty or truncated ({size} bytes); {expected}")
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES and n <= size - 8:
        raise CheckpointError(
            f"{p}: its header declares {n} bytes, more than any real checkpoint's (limit "
            f"{MAX_HEADER_BYTES} bytes); refused without reading it"
        )
    if n <= 1 or n > size - 8:
        raise CheckpointError(f"{p}: not a safetensors file (no valid header); {expected}")
    return n


def _read_header(p: Path) -> list[TensorInfo]:
    """Parse a safetensors header; check every entry (known dtype, a shape that fills its byte range
    exactly, in the file) before any tensor is read."""
    size = p.stat().st_size
    expected = "expected a .safetensors file"
    n = safetensors_header_size(p)
    with open(p, "rb") as fh:
        fh.seek(8)
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{p}: not a safetensors file (header is not JSON); {expected}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: not a safetensors file (header is not a table); {expected}")
    infos = []
    for key, v in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype_name = v["dtype"]
            begin, end = (int(x) for x in v["data_offsets"])
            shape = tuple(int(d) for d in v["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{p}: not a safetensors file (malformed header entry for tensor '{key}'); {expected}"
            ) from exc
        if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
            raise CheckpointError(
                f"{p}: tensor '{key}' has dtype {dtype_name!r}, which this loader does not read "
                f"(supported: {', '.join(_DTYPES)})"
            )
        dtype = _DTYPES[dtype_name]
        if any(d < 0 for d in shape) or not 0 <= begin <= end:
            raise CheckpointError(
                f"{p}: tensor '{key}' has a negative shape or byte range; the file is damaged"
            )
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes:
            raise CheckpointError(
                f"{p}: tensor '{key}' ({dtype_name} {list(shape)}) needs {nbytes} bytes but its byte range "
                f"holds {end - begin}; the file is damaged or not a safetensors file"
            )
        infos.append(TensorInfo(p, key, dtype, shape, 8 + n + begin, 8 + n + end))
    needed = max((i.end for i in infos), default=8 + n)
    if needed > size:
        raise CheckpointError(
            f"{p}: truncated: the header describes {needed} bytes but the file has {size} "
            "(incomplete download?)"
        )
    return infos


# ------------------------------------------------------------------------------------------------
# Config inference


_REQUIRED = (
    "patch_embedding.weight",
    "text_embedding.0.weight",
    "time_embedding.0.weight",
    "head.head.weight",
    "head.modulation",
    "blocks.0.ffn.0.weight",
)


def infer_config(shapes: dict[str, tuple[int, ...]], source: str = "checkpoint") -> DiTConfig:
    """Infer a :class:`DiTConfig` from official-key tensor shapes (heads = dim // 128)."""
    if any(".lora_" in k or k.endswith(".alpha") for k in shapes):
        raise CheckpointError(f"{source}: this is a LoRA file, not a Wan DiT base model")
    missing = [k for k in _REQUIRED if k not in shapes]
    if missing:
        sample = ", ".join(sorted(shapes)[:3]) or "no tensors"
        raise CheckpointError(f"{source}: not a Wan DiT checkpoint (missing {missing}; found e.g. {sample})")
    if any(k.startswith("img_emb.") for k in shapes):
        raise CheckpointError(
            f"{source}: a Wan2.1 I2V model with a CLIP image embedding; Memento needs a Wan2.2 A14B expert"
        )
    dim, in_dim, *patch = shapes["patch_embedding.weight"]
    num_layers = 1 + max(int(m.group(1)) for k in shapes if (m := _BLOCK_RE.match(k)))
    head_out = shapes["head.head.weight"][0]
    patch_size = tuple(patch)
    prod = patch_size[0] * patch_size[1] * patch_size[2]
    if head_out % prod:
        raise CheckpointError(f"{source}: head.head.weight rows {head_out} do not match patch {patch_size}")
    if dim % 128:
        raise CheckpointError(f"{source}: width {dim} is not a multiple of the Wan head size 128")
    return DiTConfig(
        dim=dim,
        ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
        num_heads=dim // 128,
        num_layers=num_layers,
        in_dim=in_dim,
        out_dim=head_out // prod,
        text_dim=shapes["text_embedding.0.weight"][1],
        freq_dim=shapes["time_embedding.0.weight"][1],
        patch_size=patch_size,
    )


# ------------------------------------------------------------------------------------------------
# Loading


def _scale_key(index: CheckpointIndex, weight_key: str) -> str | None:
    layer = weight_key.removesuffix(".weight")
    for suffix in SCALE_SUFFIXES:
        if layer + suffix in index.tensors_info:
            return layer + suffix
    return None


def _is_metadata(key: str) -> bool:
    return key in IGNORED_KEYS or key.endswith(IGNORED_SUFFIXES) or key.endswith(SCALE_SUFFIXES)


def _dequantize(weight: torch.Tensor, scale: torch.Tensor, key: str, source: str) -> torch.Tensor:
    """``fp8.float() * scale`` with a scalar or per-output-channel scale."""
    w = weight.float()
    s = scale.float()
    if s.numel() == 1:
        return w * s.reshape(())
    if s.numel() == w.shape[0]:
        return w * s.reshape(-1, *([1] * (w.ndim - 1)))
    raise CheckpointError(
        f"{source}: scale of '{key}' has shape {list(scale.shape)}; expected a scalar or one per "
        f"output channel ({w.shape[0]})"
    )


def load_state_dict(
    index: CheckpointIndex,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Read every model tensor of ``index`` as official keys, converted to ``dtype`` on ``device``.

    fp8 "scaled" weights are multiplied by their scale; scale and activation-hint tensors are not
    returned. Conversion happens tensor by tensor (peak host memory ~ one copy in ``dtype``).
    """
    keys = [k for k in index.tensors_info if not _is_metadata(k)]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in index.tensors(keys):
        scale_key = _scale_key(index, key) if key.endswith(".weight") else None
        if scale_key is not None:
            scale = index.read(scale_key)
            tensor = _dequantize(tensor, scale, key, index.source)
        out[key] = tensor.to(device=device, dtype=dtype)
        del tensor
    return out


def load_dit(
    path: PathLike | Sequence[PathLike],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    expect: str | None = None,
) -> WanDiT:
    """Load a Wan DiT expert; the config is inferred from the tensors.

    path: one .safetensors file (official keys, or with the ComfyUI ``model.diffusion_model.`` /
    ``diffusion_model.`` prefix), a folder of shards with its ``.safetensors.index.json``, or a list
    of files. dtype: the compute/weight dtype (float32, bfloat16 or float16); fp16/bf16/fp32 and fp8
    e4m3fn files (ComfyUI "scaled" ones included) are converted to it. expect: ``"i2v"`` or ``"t2v"``
    to require that kind (else :class:`CheckpointError`). Returns the model in eval mode.
    """
    if dtype not in COMPUTE_DTYPES:
        raise CheckpointError(f"dtype: expected one of {COMPUTE_DTYPES} for the weights, got {dtype}")
    if expect not in (None, "t2v", "i2v"):
        raise ValueError(f"expect: must be None, 't2v' or 'i2v', got {expect!r}")
    index = open_checkpoint(path)
    cfg = infer_config(index.shapes(), index.source)
    if expect is not None and cfg.model_kind != expect:
        want = 36 if expect == "i2v" else 16
        article = {"t2v": "a", "i2v": "an"}
        raise CheckpointError(
            f"{index.source}: this is {article[cfg.model_kind]} {cfg.model_kind.upper()} checkpoint "
            f"(in_dim {cfg.in_dim}) but {article[expect]} {expect.upper()} expert (in_dim {want}) is required"
        )
    with torch.device("meta"):
        model = WanDiT(cfg)
    state = load_state_dict(index, dtype=dtype, device=device)
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{index.source}: tensors do not fit a Wan DiT with {cfg}: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{index.source}: tensors do not match a Wan DiT with {cfg}: missing {result.missing_keys[:5]}"
            f" (of {len(result.missing_keys)}), unexpected {result.unexpected_keys[:5]}"
            f" (of {len(result.unexpected_keys)})"
        )
    return model.eval().requires_grad_(False)
