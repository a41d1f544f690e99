"""A Memento expert: a Wan2.2 I2V A14B expert + the released LoRA merged in + its KeyframeQuery.

Memento ships one file per expert, ``backbone_{high,low}_noise.safetensors``, holding the PEFT LoRA
(``base_model.model.blocks.N.<module>.lora_{A,B}.weight``, r = alpha = 128, rsLoRA) and the 24
KeyframeQuery tensors (``keyframe_query.*``, in the reference behind ``base_model.model.``), possibly
all behind ``low_noise_model.`` / ``high_noise_model.``. :func:`load_memento_expert` loads the base,
merges the LoRA (and any extra LoRAs, stacked after it) into its weights on the target device, and
builds the KeyframeQuery.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .dit import WanDiT
from .errors import CheckpointError
from .loading import infer_config, load_dit, open_checkpoint
from .lora import LoraWeights, MergeReport, load_lora, merge_lora, parse_lora, plan_merge

if TYPE_CHECKING:
    from .keyframe_query import KeyframeQuery

__all__ = [
    "FAMILY_NAMES",
    "KFQ_PREFIX",
    "MementoExpert",
    "load_memento_expert",
    "load_memento_expert_report",
    "lora_family",
]

PathLike = str | os.PathLike
#: Normalised name prefix of the KeyframeQuery tensors inside a Memento file.
KFQ_PREFIX = "keyframe_query."
LoraSource = LoraWeights | PathLike | Mapping[str, Tensor]
#: What each backbone family's files hold (the family picks the default memory policy).
FAMILY_NAMES = {
    "memento": "Memento (LoRA + KeyframeQuery)",
    "storymem": "StoryMem (LoRA only, no KeyframeQuery)",
}


def lora_family(source: LoraSource) -> str:
    """ "memento" when the file holds KeyframeQuery tensors, else "storymem" (reads the header only)."""
    weights = _as_weights(source)
    return "memento" if any(name.startswith(KFQ_PREFIX) for name in weights.other) else "storymem"


@dataclass(frozen=True)
class MementoExpert:
    """A loaded expert: the merged DiT, its KeyframeQuery (None if the file has none), and reports.

    ``kfq_unused``: file keys under ``keyframe_query.`` that are not one of the 24 KFQ tensors.
    """

    dit: WanDiT
    keyframe_query: KeyframeQuery | None
    lora: MergeReport
    extra: tuple[MergeReport, ...] = ()
    kfq_unused: tuple[str, ...] = ()

    @property
    def family(self) -> str:
        """ "memento" (the file held LoRA + KeyframeQuery) or "storymem" (LoRA only, as StoryMem ships)."""
        return "memento" if self.keyframe_query is not None else "storymem"

    def summary(self) -> str:
        """Readable lines for a node's text output (the family, one per merged file, then the KFQ)."""
        family = FAMILY_NAMES[self.family]
        lines = [f"family: {family}", self.lora.summary(), *(r.summary() for r in self.extra)]
        kfq = self.keyframe_query
        lines.append(
            "KeyframeQuery: none in the file"
            if kfq is None
            else f"KeyframeQuery: {kfq.n_local} local + {kfq.n_global} global queries"
        )
        if self.kfq_unused:
            lines.append(
                f"KeyframeQuery: {len(self.kfq_unused)} unknown tensors ignored: {self.kfq_unused[:5]}"
            )
        return "\n".join(lines)


def _as_weights(source: LoraSource) -> LoraWeights:
    if isinstance(source, LoraWeights):
        return source
    if isinstance(source, Mapping):
        return parse_lora(source)
    return load_lora(source)


def _check_before_loading(
    base: PathLike | Sequence[PathLike], memento: LoraWeights, extras: Sequence[LoraWeights]
) -> int:
    """Fail fast (before reading ~28 GB) when a LoRA does not fit the base's tensors; returns its heads."""
    index = open_checkpoint(base)
    shapes = index.shapes()
    cfg = infer_config(shapes, index.source)
    if cfg.model_kind == "i2v":  # else load_dit(expect="i2v") names the problem
        plan_merge(memento, shapes, ignore_prefixes=(KFQ_PREFIX,))
        for extra in extras:
            plan_merge(extra, shapes)
    return cfg.num_heads


def _kfq_keys(memento: LoraWeights) -> tuple[dict[str, str], tuple[str, ...]]:
    """(bare KFQ tensor name -> file key, unknown file keys under ``keyframe_query.``)."""
    from .keyframe_query import KFQ_TENSOR_NAMES

    found, unknown = {}, []
    for name, key in memento.other.items():
        if name.startswith(KFQ_PREFIX):
            bare = name[len(KFQ_PREFIX) :]
            if bare in KFQ_TENSOR_NAMES:
                found[bare] = key
            else:
                unknown.append(key)
    return found, tuple(unknown)


def _build_kfq(
    memento: LoraWeights,
    keys: Mapping[str, str],
    dtype: torch.dtype,
    device: torch.device | str,
    num_heads: int,
) -> KeyframeQuery | None:
    """The KeyframeQuery from the file's ``keyframe_query.*`` tensors, in ``dtype`` on ``device``."""
    if not keys:
        return None
    from .keyframe_query import KeyframeQuery

    state = {KFQ_PREFIX + n: memento.read(k).to(device=device, dtype=dtype) for n, k in keys.items()}
    try:
        return KeyframeQuery.from_state_dict(state, num_heads=num_heads)
    except ValueError as exc:
        raise CheckpointError(f"{memento.source}: {exc}") from exc


def load_memento_expert_report(
    base: PathLike | Sequence[PathLike],
    memento: LoraSource,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    lora_strength: float = 1.0,
    extra_loras: Sequence[tuple[LoraSource, float]] = (),
    *,
    alpha: float | None = None,
    use_rslora: bool | None = None,
) -> MementoExpert:
    """Like :func:`load_memento_expert`, returning a :class:`MementoExpert` with the merge reports.

    alpha / use_rslora override the Memento file's scale rule (default: an adapter config beside the
    file, else Memento's r = alpha, rsLoRA). Errors (all :class:`~memento_core.errors.CheckpointError`,
    naming the file): bad or missing files, a T2V base, a Memento file whose LoRA matches nothing or
    does not fit, a malformed KeyframeQuery.
    """
    weights = _as_weights(memento).with_scale(alpha, use_rslora)
    extras = [(_as_weights(src), float(strength)) for src, strength in extra_loras]
    num_heads = _check_before_loading(base, weights, [w for w, _ in extras])
    kfq_keys, kfq_unused = _kfq_keys(weights)
    kfq = _build_kfq(weights, kfq_keys, dtype, device, num_heads)  # before the base: fail fast
    dit = load_dit(base, dtype=dtype, device=device, expect="i2v")
    report = merge_lora(dit, weights, lora_strength, ignore_prefixes=(KFQ_PREFIX,))
    extra_reports = tuple(merge_lora(dit, w, s) for w, s in extras)
    return MementoExpert(dit=dit, keyframe_query=kfq, lora=report, extra=extra_reports, kfq_unused=kfq_unused)


def load_memento_expert(
    base: PathLike | Sequence[PathLike],
    memento: LoraSource,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    lora_strength: float = 1.0,
    extra_loras: Sequence[tuple[LoraSource, float]] = (),
    *,
    alpha: float | None = None,
    use_rslora: bool | None = None,
) -> tuple[WanDiT, KeyframeQuery | None]:
    """Load a Memento expert: ``(dit, kfq)``.

    base: anything :func:`~memento_core.loading.load_dit` takes; must be a Wan2.2 I2V expert (in_dim
    36). memento: a released ``backbone_{high,low}_noise.safetensors`` (LoRA + KeyframeQuery), or a
    parsed :class:`~memento_core.lora.LoraWeights` / state dict. The LoRA is merged into the weights
    on ``device`` in ``dtype`` at the rsLoRA scale (alpha / sqrt(r) = 11.3137 for r = alpha = 128)
    times ``lora_strength``; ``extra_loras`` ((path, strength) pairs, any layout of
    :mod:`memento_core.lora`) are merged after it. The KeyframeQuery is built in ``dtype`` on
    ``device`` with the expert's head count; None if the file has none.
    """
    expert = load_memento_expert_report(
        base, memento, dtype, device, lora_strength, extra_loras, alpha=alpha, use_rslora=use_rslora
    )
    return expert.dit, expert.keyframe_query
