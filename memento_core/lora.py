"""LoRA files for Wan DiT experts: parsing every common layout, the scale rules, and merging.

Layouts (each possibly behind ``low_noise_model.`` / ``high_noise_model.`` / ``diffusion_model.`` /
``model.diffusion_model.`` / ``base_model.model.`` / ``transformer.``):

- PEFT (Memento, StoryMem): ``base_model.model.blocks.N.self_attn.q.lora_A[.default].weight`` / ``lora_B``.
- ComfyUI: ``diffusion_model.blocks.N.self_attn.q.lora_down.weight`` / ``lora_up.weight`` / ``.alpha``,
  plus full-weight differences ``.diff`` (weight) and ``.diff_b`` (bias) as step-distillation LoRAs carry.
- kohya: ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` (underscored module names).
- diffusers: ``transformer.blocks.N.attn1.to_q.lora_A.weight`` (``attn1`` -> ``self_attn``, ``to_out.0``
  -> ``o``, ``ffn.net.0.proj`` -> ``ffn.0``, ...).

Every module is normalised to its official Wan path (``blocks.N.self_attn.q``). The update of a weight
``W [out, in]`` is ``W += strength · scale · up @ down`` with ``down [r, in]``, ``up [out, r]`` and

- PEFT rules when an ``adapter_config.json`` (or a ``config.json`` with LoRA fields) lies beside the
  file: ``scale = lora_alpha / sqrt(r)`` with ``use_rslora`` (Memento / StoryMem: r = alpha = 128 ->
  11.3137), else ``lora_alpha / r``;
- a PEFT-layout file without a config: Memento's convention (alpha = r, rsLoRA), noted in the report;
- per-module ``.alpha`` keys (ComfyUI / kohya): ``alpha / r``; no alpha at all: 1.0.

Files are read through :func:`memento_core.loading.open_checkpoint` (safetensors only, header first,
tensors one at a time). Merging runs one layer at a time on the weight's device in float32 and casts
back to the weight dtype, in place on a model the caller owns.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import CheckpointError
from .loading import open_checkpoint, strip_prefixes

__all__ = [
    "LoraEntry",
    "LoraError",
    "LoraModule",
    "LoraWeights",
    "MergePlan",
    "MergeReport",
    "MergeStep",
    "ScaleRule",
    "find_adapter_config",
    "load_lora",
    "lora_scale",
    "merge_lora",
    "normalize_lora_key",
    "parse_lora",
    "plan_merge",
    "strip_wrapper_prefixes",
]

PathLike = str | os.PathLike

#: Prefixes that wrap the official module path: Memento's training wrapper, ComfyUI, PEFT, diffusers.
WRAPPER_PREFIXES = (
    "low_noise_model.",
    "high_noise_model.",
    "model.diffusion_model.",
    "diffusion_model.",
    "base_model.model.",
    "transformer.",
)
#: kohya / lycoris prefixes of underscored module names (``lora_unet__`` is the Wan-Fun spelling).
KOHYA_PREFIXES = ("lora_unet__", "lora_unet_", "lora_transformer_", "lycoris_")
#: Key endings -> which part of a LoRA module the tensor is.
PART_SUFFIXES = (
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".alpha", "alpha"),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
)
#: Names whose underscores are part of the name when undoing kohya's ``.`` -> ``_`` (longest first).
_KOHYA_TOKENS = tuple(
    sorted(
        (
            "self_attn", "cross_attn", "norm_q", "norm_k", "patch_embedding", "text_embedding",
            "time_embedding", "time_projection", "to_q", "to_k", "to_v", "to_out", "add_k_proj",
            "add_v_proj", "norm_added_k", "norm_added_q", "proj_out", "condition_embedder",
            "time_embedder", "text_embedder", "image_embedder", "time_proj", "linear_1", "linear_2",
            "scale_shift_table", "norm_out",
        ),
        key=len,
        reverse=True,
    )
)  # fmt: skip


def _diffusers_block_map() -> dict[str, str]:
    out = {
        "ffn.net.0.proj": "ffn.0",
        "ffn.net.2": "ffn.2",
        "norm2": "norm3",
        "scale_shift_table": "modulation",
    }
    for src, dst in (("attn1", "self_attn"), ("attn2", "cross_attn")):
        for a, b in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o")):
            out[f"{src}.{a}"] = f"{dst}.{b}"
        for norm in ("norm_q", "norm_k"):
            out[f"{src}.{norm}"] = f"{dst}.{norm}"
    return out


#: diffusers ``WanTransformer3DModel`` module paths -> official Wan paths.
_DIFFUSERS_BLOCK = _diffusers_block_map()
_DIFFUSERS_TOP = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
}
#: Substrings that only diffusers names have (dotted or kohya-underscored).
_DIFFUSERS_MARKERS = ("attn1", "attn2", "ffn.net.", "ffn_net_", "condition_embedder", "proj_out")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


class LoraError(CheckpointError):
    """A LoRA file does not fit the model: no key matches, shapes differ, or its parts are inconsistent."""


# ------------------------------------------------------------------------------------------------
# Scale rules


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """``alpha / sqrt(rank)`` (rsLoRA) or ``alpha / rank``: r = alpha = 128 gives 11.3137 or 1.0."""
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass(frozen=True)
class ScaleRule:
    """How a file's modules get their alpha and scale.

    Per module with rank r (from the shapes): alpha = ``alpha`` when ``force_alpha``, else the module's
    own ``.alpha`` key, else the first ``alpha_pattern`` entry matching the module path, else ``alpha``,
    else r when ``alpha_is_rank`` (PEFT default), else none (scale 1.0). scale = :func:`lora_scale`.
    """

    alpha: float | None = None
    use_rslora: bool = False
    alpha_is_rank: bool = False
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    force_alpha: bool = False
    source: str = "no alpha (scale 1.0)"

    def module_alpha(self, name: str, rank: int, file_alpha: float | None) -> float | None:
        """The alpha of module ``name`` (official path) of rank ``rank``; None means scale 1.0."""
        if self.force_alpha and self.alpha is not None:
            return self.alpha
        if file_alpha is not None:
            return file_alpha
        for pattern, value in self.alpha_pattern:
            if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", name):
                return value
        if self.alpha is not None:
            return self.alpha
        return float(rank) if self.alpha_is_rank else None

    def module_scale(self, name: str, rank: int, file_alpha: float | None) -> float:
        alpha = self.module_alpha(name, rank, file_alpha)
        return 1.0 if alpha is None else lora_scale(alpha, rank, self.use_rslora)

    def describe(self) -> str:
        kind = "rsLoRA alpha/sqrt(r)" if self.use_rslora else "alpha/r"
        if self.alpha is not None:
            alpha = f"alpha = {self.alpha:g}"
        elif self.alpha_is_rank:
            alpha = "alpha = r"
        else:
            alpha = "alpha from the file's .alpha keys, else scale 1.0"
        return f"{kind}, {alpha} ({self.source})"


_PEFT_FIELDS = ("lora_alpha", "r", "use_rslora")


def find_adapter_config(path: PathLike) -> tuple[Path, dict] | None:
    """The PEFT LoRA config beside a LoRA file (or inside a PEFT folder), if any.

    Looks for ``adapter_config.json``, ``<stem>.json`` and ``config.json``; a json counts only when it
    holds PEFT LoRA fields (``lora_alpha``, ``r``, ``use_rslora``). A broken ``adapter_config.json``
    raises :class:`LoraError`; other unrelated or broken json files are ignored.
    """
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    candidates = [folder / "adapter_config.json"]
    if not p.is_dir():
        candidates.append(p.with_suffix(".json"))
    candidates.append(folder / "config.json")
    for cand in dict.fromkeys(candidates):
        if not cand.is_file():
            continue
        try:
            data = json.loads(cand.read_text())
        except (OSError, ValueError) as exc:
            if cand.name == "adapter_config.json":
                raise LoraError(f"{cand}: not a valid JSON adapter config ({exc})") from exc
            continue
        if isinstance(data, dict) and any(k in data for k in _PEFT_FIELDS):
            return cand, data
    return None


def _rule_from_config(cfg_path: Path, cfg: dict, default_rs: bool) -> ScaleRule:
    """PEFT semantics: ``lora_alpha`` (default 8), ``use_rslora`` (default False in adapter_config.json)."""
    if "use_rslora" in cfg:
        use_rs = bool(cfg["use_rslora"])
    else:
        use_rs = False if cfg_path.name == "adapter_config.json" else default_rs
    alpha = cfg.get("lora_alpha", 8 if cfg_path.name == "adapter_config.json" else None)
    pattern = cfg.get("alpha_pattern") or {}
    try:
        alpha_f = None if alpha is None else float(alpha)
        pattern_t = tuple((str(k), float(v)) for k, v in pattern.items())
    except (TypeError, ValueError, AttributeError) as exc:
        raise LoraError(f"{cfg_path}: lora_alpha / alpha_pattern are not numbers ({exc})") from exc
    return ScaleRule(
        alpha=alpha_f,
        use_rslora=use_rs,
        alpha_is_rank=alpha_f is None,
        alpha_pattern=pattern_t,
        source=f"from {cfg_path}",
    )


def _default_rule(layout: str, has_alpha_keys: bool) -> ScaleRule:
    if layout == "peft" and not has_alpha_keys:
        return ScaleRule(
            use_rslora=True,
            alpha_is_rank=True,
            source="no adapter config beside the file: Memento/StoryMem convention (r = alpha, rsLoRA)",
        )
    if has_alpha_keys:
        return ScaleRule(source="per-module .alpha keys")
    return ScaleRule(source="no alpha keys and no adapter config: scale 1.0")


# ------------------------------------------------------------------------------------------------
# Key normalisation


def strip_wrapper_prefixes(key: str) -> str:
    """Remove every wrapper prefix of :data:`WRAPPER_PREFIXES`, in any order and repeated."""
    return strip_prefixes(key, WRAPPER_PREFIXES)


def _unkohya(name: str) -> str:
    """``blocks_0_self_attn_q`` -> ``blocks.0.self_attn.q`` (underscores inside known names are kept)."""
    for i, token in enumerate(_KOHYA_TOKENS):
        name = re.sub(rf"(?<![a-z]){token}(?![a-z])", f"\0{i}\0", name)
    name = name.replace("_", ".")
    return re.sub(r"\0(\d+)\0", lambda m: _KOHYA_TOKENS[int(m.group(1))], name)


def _diffusers_to_official(path: str) -> str:
    m = _BLOCK_RE.match(path)
    if m:
        return f"blocks.{m.group(1)}.{_DIFFUSERS_BLOCK.get(m.group(2), m.group(2))}"
    return _DIFFUSERS_TOP.get(path, path)


def normalize_lora_key(key: str, diffusers: bool = False) -> tuple[str, str | None]:
    """Split a LoRA file key into (official module path, part).

    part is ``"down"``, ``"up"``, ``"alpha"``, ``"diff"``, ``"diff_b"`` or None for a tensor that is
    not part of a LoRA (then the path is the whole key with wrapper prefixes removed, e.g.
    ``keyframe_query.queries``). diffusers: map diffusers module names to official ones.
    """
    for prefix in KOHYA_PREFIXES:
        if key.startswith(prefix):
            head, dot, tail = key[len(prefix) :].partition(".")
            key = _unkohya(head) + dot + tail
            break
    key = strip_wrapper_prefixes(key)
    for suffix, part in PART_SUFFIXES:
        if key.endswith(suffix):
            path = key[: -len(suffix)]
            return (_diffusers_to_official(path) if diffusers else path), part
    return key, None


def _detect_layout(keys: Sequence[str]) -> str:
    if any(k.startswith(KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if any("base_model.model." in k or ".default.weight" in k for k in keys):
        return "peft"
    if any(any(mark in k for mark in _DIFFUSERS_MARKERS) for k in keys):
        return "diffusers"
    return "comfy"


# ------------------------------------------------------------------------------------------------
# Value objects


@dataclass(frozen=True)
class LoraEntry:
    """The file keys of one target module (no tensors); ``alpha`` read from its ``.alpha`` key if any."""

    name: str
    down_key: str | None = None
    up_key: str | None = None
    alpha: float | None = None
    alpha_key: str | None = None
    diff_key: str | None = None
    diff_b_key: str | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        found = (self.down_key, self.up_key, self.alpha_key, self.diff_key, self.diff_b_key)
        return tuple(k for k in found if k is not None)

    @property
    def has_low_rank(self) -> bool:
        return self.down_key is not None and self.up_key is not None


@dataclass(frozen=True)
class LoraModule:
    """One low-rank update ``ΔW = scale · up @ down`` of the module ``name`` (official path).

    down [r, in] and up [out, r] (conv LoRAs: trailing kernel dims, flattened for the product);
    alpha: the resolved alpha, None when the scale is 1.0 for want of one.
    """

    name: str
    down: Tensor
    up: Tensor
    alpha: float | None
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> Tensor:
        """``scale · up @ down`` in float32, shaped [out, prod(in dims)]."""
        return self.scale * (self.up.float().flatten(1) @ self.down.float().flatten(1))


@dataclass(frozen=True)
class LoraWeights:
    """A parsed LoRA: entries by official module path, tensors read on demand through ``reader``.

    ``other`` maps the normalised names of tensors that are not LoRA parts (e.g. Memento's
    ``keyframe_query.*``) to their file keys; ``incomplete`` lists keys of modules missing a half.
    """

    source: str
    layout: str
    entries: Mapping[str, LoraEntry]
    shapes: Mapping[str, tuple[int, ...]]
    rule: ScaleRule
    reader: Callable[[str], Tensor] = field(repr=False, compare=False)
    other: Mapping[str, str] = field(default_factory=dict)
    incomplete: tuple[str, ...] = ()

    def read(self, key: str) -> Tensor:
        """One tensor by file key, in its stored dtype on the CPU (or wherever the mapping holds it)."""
        return self.reader(key)

    def rank(self, name: str) -> int:
        return int(self.shapes[self.entries[name].down_key][0])

    def scale(self, name: str) -> float:
        """The resolved scale of module ``name`` (without strength)."""
        entry = self.entries[name]
        return self.rule.module_scale(name, self.rank(name), entry.alpha)

    def module(self, name: str) -> LoraModule:
        """Read module ``name``'s down/up tensors (low-rank entries only)."""
        entry = self.entries[name]
        if not entry.has_low_rank:
            raise KeyError(f"{self.source}: '{name}' has no low-rank pair")
        rank = self.rank(name)
        return LoraModule(
            name=name,
            down=self.read(entry.down_key),
            up=self.read(entry.up_key),
            alpha=self.rule.module_alpha(name, rank, entry.alpha),
            scale=self.rule.module_scale(name, rank, entry.alpha),
        )

    def modules(self) -> Iterator[LoraModule]:
        """Every low-rank module, read one at a time."""
        for name, entry in self.entries.items():
            if entry.has_low_rank:
                yield self.module(name)

    def other_tensors(self, prefix: str) -> dict[str, Tensor]:
        """Read the non-LoRA tensors whose normalised name starts with ``prefix`` (prefix removed)."""
        return {n[len(prefix) :]: self.read(k) for n, k in self.other.items() if n.startswith(prefix)}

    @property
    def num_tensors(self) -> int:
        return len(self.shapes)

    def with_scale(self, alpha: float | None = None, use_rslora: bool | None = None) -> LoraWeights:
        """A copy whose every module uses ``alpha`` and/or ``use_rslora`` (None keeps the file's rule)."""
        return replace(self, rule=_override(self.rule, alpha, use_rslora))


# ------------------------------------------------------------------------------------------------
# Parsing


def parse_lora(
    tensors: Mapping[str, Tensor] | None = None,
    *,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    reader: Callable[[str], Tensor] | None = None,
    source: str = "LoRA state dict",
    config: tuple[Path, dict] | None = None,
    alpha: float | None = None,
    use_rslora: bool | None = None,
) -> LoraWeights:
    """Parse a LoRA given as a state dict (``tensors``) or as ``shapes`` + a ``reader`` of file keys.

    config: a (path, PEFT adapter config) pair as from :func:`find_adapter_config`. alpha / use_rslora:
    explicit overrides of every alpha in the file and of the rsLoRA choice.
    """
    if tensors is not None:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        reader = tensors.__getitem__
    if shapes is None or reader is None:
        raise ValueError("parse_lora: pass tensors, or shapes and reader")
    keys = list(shapes)
    layout = _detect_layout(keys)
    parts, other = _group_keys(keys, source)
    entries, incomplete = _build_entries(parts, shapes, reader, source)
    has_alpha = any(e.alpha is not None for e in entries.values())
    rule = (
        _rule_from_config(*config, default_rs=layout == "peft")
        if config
        else _default_rule(layout, has_alpha)
    )
    rule = _override(rule, alpha, use_rslora)
    return LoraWeights(source, layout, entries, dict(shapes), rule, reader, other, incomplete)


def _group_keys(keys: Sequence[str], source: str) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """({module path: {part: file key}}, {normalised name of a non-LoRA tensor: file key})."""
    experts = {p for k in keys for p in ("low_noise_model.", "high_noise_model.") if k.startswith(p)}
    if len(experts) > 1:
        raise LoraError(
            f"{source}: holds both experts (low_noise_model.* and high_noise_model.* keys); "
            "pass one expert's file (backbone_low_noise / backbone_high_noise)"
        )
    diffusers = any(mark in k for k in keys for mark in _DIFFUSERS_MARKERS)
    parts: dict[str, dict[str, str]] = {}
    other: dict[str, str] = {}
    for key in keys:
        path, part = normalize_lora_key(key, diffusers=diffusers)
        slot, name = (other, path) if part is None else (parts.setdefault(path, {}), part)
        if name in slot:
            what = f"tensor '{path}'" if part is None else f"the {part} of module '{path}'"
            raise LoraError(f"{source}: '{slot[name]}' and '{key}' are both {what}")
        slot[name] = key
    return parts, other


def _override(rule: ScaleRule, alpha: float | None, use_rslora: bool | None) -> ScaleRule:
    if alpha is None and use_rslora is None:
        return rule
    return ScaleRule(
        alpha=rule.alpha if alpha is None else float(alpha),
        use_rslora=rule.use_rslora if use_rslora is None else bool(use_rslora),
        alpha_is_rank=rule.alpha_is_rank,
        alpha_pattern=rule.alpha_pattern,
        force_alpha=alpha is not None,
        source=f"{rule.source}; overridden by the caller",
    )


def _build_entries(
    parts: dict[str, dict[str, str]],
    shapes: Mapping[str, tuple[int, ...]],
    reader: Callable[[str], Tensor],
    source: str,
) -> tuple[dict[str, LoraEntry], tuple[str, ...]]:
    """One entry per module; a down without an up (or the reverse) is set aside as incomplete."""
    entries: dict[str, LoraEntry] = {}
    incomplete: list[str] = []
    for path, slot in parts.items():
        if ("down" in slot) != ("up" in slot):
            incomplete.extend(slot[p] for p in ("down", "up", "alpha") if p in slot)
            slot = {p: k for p, k in slot.items() if p in ("diff", "diff_b")}
        elif "alpha" in slot and "down" not in slot:
            incomplete.append(slot.pop("alpha"))
        if not slot:
            continue
        for p in ("down", "up"):
            if p in slot and len(shapes[slot[p]]) < 2:
                raise LoraError(
                    f"{source}: LoRA tensor '{slot[p]}' has shape {list(shapes[slot[p]])}; need 2+ dims"
                )
        alpha = _read_alpha(reader(slot["alpha"]), slot["alpha"], source) if "alpha" in slot else None
        entries[path] = LoraEntry(
            name=path,
            down_key=slot.get("down"),
            up_key=slot.get("up"),
            alpha=alpha,
            alpha_key=slot.get("alpha"),
            diff_key=slot.get("diff"),
            diff_b_key=slot.get("diff_b"),
        )
    return entries, tuple(incomplete)


def _read_alpha(t: Tensor, key: str, source: str) -> float:
    if t.numel() != 1:
        raise LoraError(f"{source}: '{key}' should be a scalar alpha, got shape {list(t.shape)}")
    return float(t.float().reshape(()).item())


def load_lora(
    path: PathLike | Sequence[PathLike],
    *,
    alpha: float | None = None,
    use_rslora: bool | None = None,
    config: PathLike | None = None,
) -> LoraWeights:
    """Index a LoRA file (safetensors; a PEFT folder or a list of shards too) without reading weights.

    The PEFT adapter config is looked up beside the file (:func:`find_adapter_config`) unless
    ``config`` names one. Raises :class:`CheckpointError` naming the file for missing, pickle,
    non-safetensors or truncated files.
    """
    index = open_checkpoint(path)
    infos = index.tensors_info
    by_file_key = {info.key: name for name, info in infos.items()}
    shapes = {info.key: info.shape for info in infos.values()}
    if not shapes:
        raise LoraError(f"{index.source}: the file holds no tensors; expected a LoRA")
    cfg = _explicit_config(config) if config is not None else None
    if cfg is None and config is None and isinstance(path, (str, os.PathLike)):
        cfg = find_adapter_config(path)
    return parse_lora(
        shapes=shapes,
        reader=lambda key: index.read(by_file_key[key]),
        source=index.source,
        config=cfg,
        alpha=alpha,
        use_rslora=use_rslora,
    )


def _explicit_config(config: PathLike) -> tuple[Path, dict]:
    p = Path(config)
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise LoraError(f"{p}: cannot read the LoRA adapter config ({exc})") from exc
    if not isinstance(data, dict):
        raise LoraError(f"{p}: expected a JSON object with lora_alpha / r / use_rslora")
    return p, data


# ------------------------------------------------------------------------------------------------
# Planning (shapes only) and merging


@dataclass(frozen=True)
class MergeStep:
    """One parameter update of a merge.

    ``kind``: ``"lora"`` (up @ down), ``"diff"`` (whole weight) or ``"diff_b"`` (bias); ``keys``: the
    file keys it consumes.
    """

    module: str
    param: str
    kind: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class MergePlan:
    """Which parameters a LoRA updates in a model, and which file keys match nothing."""

    steps: tuple[MergeStep, ...]
    unmatched_keys: tuple[str, ...]

    @property
    def matched(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.module for s in self.steps))


def _lora_shape_error(entry: LoraEntry, lora: LoraWeights, target: tuple[int, ...], param: str) -> str | None:
    down = lora.shapes[entry.down_key]
    up = lora.shapes[entry.up_key]
    r = down[0]
    fan_in = math.prod(down[1:])
    if len(target) < 2 or up[0] != target[0] or math.prod(up[1:]) != r or fan_in != math.prod(target[1:]):
        return f"{param} {list(target)} vs up {list(up)} @ down {list(down)}"
    return None


def plan_merge(
    lora: LoraWeights,
    param_shapes: Mapping[str, tuple[int, ...]],
    *,
    ignore_prefixes: Sequence[str] = (),
) -> MergePlan:
    """Match a LoRA against a model's parameter shapes (``name -> shape``, official names).

    Raises :class:`LoraError` when shapes do not fit (listing them) or when nothing matches (a LoRA
    for another architecture). Keys of modules absent from the model, unknown tensors and incomplete
    pairs go to ``unmatched_keys``; non-LoRA tensors whose name starts with ``ignore_prefixes`` do not.
    """
    steps: list[MergeStep] = []
    unmatched: list[str] = list(lora.incomplete)
    mismatches: list[str] = []
    for name, entry in lora.entries.items():
        found = _entry_steps(name, entry, lora, param_shapes, mismatches)
        steps.extend(found)
        used = {k for s in found for k in s.keys}
        unmatched.extend(k for k in entry.keys if k not in used)
    unmatched.extend(k for n, k in lora.other.items() if not n.startswith(tuple(ignore_prefixes)))
    if mismatches:
        more = f" (and {len(mismatches) - 5} more)" if len(mismatches) > 5 else ""
        raise LoraError(
            f"{lora.source}: LoRA shapes do not fit the model: {'; '.join(mismatches[:5])}{more}. "
            "Is this LoRA for another model size (e.g. Wan 5B vs 14B)?"
        )
    if not steps:
        raise LoraError(_nothing_matched(lora, param_shapes))
    return MergePlan(tuple(steps), tuple(unmatched))


def _entry_steps(
    name: str,
    entry: LoraEntry,
    lora: LoraWeights,
    param_shapes: Mapping[str, tuple[int, ...]],
    mismatches: list[str],
) -> list[MergeStep]:
    steps = []
    weight = f"{name}.weight"
    if entry.has_low_rank and weight in param_shapes:
        err = _lora_shape_error(entry, lora, param_shapes[weight], weight)
        if err:
            mismatches.append(err)
        keys = (entry.down_key, entry.up_key) + ((entry.alpha_key,) if entry.alpha_key else ())
        steps.append(MergeStep(name, weight, "lora", keys))
    if entry.diff_key is not None:
        param = weight if weight in param_shapes else name if name in param_shapes else None
        if param is not None:
            if tuple(lora.shapes[entry.diff_key]) != tuple(param_shapes[param]):
                mismatches.append(
                    f"{param} {list(param_shapes[param])} vs diff {list(lora.shapes[entry.diff_key])}"
                )
            steps.append(MergeStep(name, param, "diff", (entry.diff_key,)))
    bias = f"{name}.bias"
    if entry.diff_b_key is not None and bias in param_shapes:
        if tuple(lora.shapes[entry.diff_b_key]) != tuple(param_shapes[bias]):
            mismatches.append(
                f"{bias} {list(param_shapes[bias])} vs diff_b {list(lora.shapes[entry.diff_b_key])}"
            )
        steps.append(MergeStep(name, bias, "diff_b", (entry.diff_b_key,)))
    return steps


def _nothing_matched(lora: LoraWeights, param_shapes: Mapping[str, tuple[int, ...]]) -> str:
    file_keys = [k for e in lora.entries.values() for k in e.keys][:3] or list(lora.shapes)[:3]
    model_keys = [k for k in param_shapes if k.endswith(".weight")][:2]
    if not lora.entries:
        return (
            f"{lora.source}: no LoRA tensors found (expected keys ending in lora_A/lora_B, lora_down/lora_up,"
            f" .diff; found e.g. {file_keys}). Is this a full model rather than a LoRA?"
        )
    return (
        f"{lora.source}: none of its {len(lora.entries)} LoRA modules match this model (file keys e.g. "
        f"{file_keys}; model weights e.g. {model_keys}). Is it a LoRA for another architecture?"
    )


@dataclass(frozen=True)
class MergeReport:
    """What a merge did: modules updated, file keys that matched nothing, the scale rule used."""

    source: str
    layout: str
    strength: float
    scale_rule: str
    matched: tuple[str, ...]
    unmatched_keys: tuple[str, ...]
    scales: Mapping[str, float] = field(default_factory=dict)

    @property
    def num_matched(self) -> int:
        return len(self.matched)

    def summary(self) -> str:
        """One readable paragraph for a node's text output."""
        scales = ", ".join(f"{s:.4g}" for s in sorted(set(self.scales.values()))[:3]) or "-"
        text = (
            f"{Path(self.source).name}: {self.layout} LoRA, strength {self.strength:g}, "
            f"{self.num_matched} modules merged, scale {scales} [{self.scale_rule}]"
        )
        if self.unmatched_keys:
            shown = ", ".join(self.unmatched_keys[:5])
            text += f"; {len(self.unmatched_keys)} keys matched nothing (e.g. {shown})"
        return text


def merge_lora(
    model: nn.Module,
    lora: LoraWeights | PathLike | Mapping[str, Tensor],
    strength: float = 1.0,
    *,
    ignore_prefixes: Sequence[str] = (),
) -> MergeReport:
    """Merge a LoRA into ``model``'s weights in place: ``W += strength · scale · up @ down``.

    lora: parsed :class:`LoraWeights`, a file path (:func:`load_lora`) or a state dict
    (:func:`parse_lora`). Every shape is checked before any weight changes. Each layer is updated on
    its own device in float32 and cast back to its dtype (bf16 stays bf16); LoRA tensors are read one
    module at a time, so no copy of the model is ever made. Raises :class:`LoraError` when shapes do
    not fit or nothing matches; returns a :class:`MergeReport`.
    """
    weights = _as_weights(lora)
    params = dict(model.named_parameters())
    plan = plan_merge(
        weights, {k: tuple(v.shape) for k, v in params.items()}, ignore_prefixes=ignore_prefixes
    )
    for p in {s.param for s in plan.steps}:
        if not params[p].dtype.is_floating_point or params[p].element_size() < 2:
            raise LoraError(
                f"{weights.source}: cannot merge into '{p}' stored as {params[p].dtype}; load the model in "
                "bf16/fp16/fp32 (fp8 weights are dequantized by load_dit)"
            )
    scales: dict[str, float] = {}
    with torch.no_grad():
        for step in plan.steps:
            if step.kind == "lora":
                scales[step.module] = weights.scale(step.module)
                _apply_lora(params[step.param], weights, step.module, strength * scales[step.module])
            else:
                _apply_diff(params[step.param], weights.read(step.keys[0]), strength)
    return MergeReport(
        source=weights.source,
        layout=weights.layout,
        strength=float(strength),
        scale_rule=weights.rule.describe(),
        matched=plan.matched,
        unmatched_keys=plan.unmatched_keys,
        scales=scales,
    )


def _as_weights(lora: LoraWeights | PathLike | Mapping[str, Tensor]) -> LoraWeights:
    if isinstance(lora, LoraWeights):
        return lora
    if isinstance(lora, (str, os.PathLike)):
        return load_lora(lora)
    if isinstance(lora, Mapping):
        return parse_lora(lora)
    raise TypeError(f"lora: expected LoraWeights, a path or a state dict, got {type(lora).__name__}")


def _apply_lora(weight: Tensor, lora: LoraWeights, name: str, factor: float) -> None:
    """``weight += factor · up @ down`` in float32 on the weight's device; one temporary at most."""
    if factor == 0.0:
        return
    entry = lora.entries[name]
    down = lora.read(entry.down_key).to(device=weight.device, dtype=torch.float32).flatten(1)
    up = lora.read(entry.up_key).to(device=weight.device, dtype=torch.float32).flatten(1)
    acc = weight.float().contiguous()  # the weight itself when already contiguous float32
    acc.view(acc.shape[0], -1).addmm_(up, down, alpha=factor)
    if acc.data_ptr() != weight.data_ptr():
        weight.copy_(acc)


def _apply_diff(param: Tensor, diff: Tensor, strength: float) -> None:
    if strength == 0.0:
        return
    acc = param.float().contiguous()
    acc.add_(diff.to(device=param.device, dtype=torch.float32), alpha=strength)
    if acc.data_ptr() != param.data_ptr():
        param.copy_(acc)
