"""fp8 weight storage for the experts' transformer blocks (half the memory of bf16).

Every projection inside the blocks (self/cross-attention q, k, v, o and the FFN, 97% of an A14B
expert's weights) is stored as float8_e4m3fn with one float32 scale per output channel
(``scale = max|w| / 448`` over the row). At run time :class:`Fp8Linear` dequantises its weight to the
compute dtype (bf16) and runs an ordinary bf16 projection, so activations, attention and the
modulation arithmetic are exactly those of a bf16 model whose weights are the dequantised ones.
Embeddings, norms, modulation and the head stay in their own dtypes.

Quantise AFTER merging LoRAs (Memento's and any extra ones): a merge needs full-precision weights, so
:func:`memento_core.lora.merge_lora` refuses fp8 layers. A 14B expert goes from 28.6 GB (bf16) to
about 15 GB; the dequantised copy of one projection at a time is transient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dit import WanDiT
from .errors import MementoError

__all__ = ["FP8_MAX", "Fp8Linear", "is_fp8", "quantize_fp8"]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


class Fp8Linear(nn.Module):
    """A Linear whose weight [out, in] is float8_e4m3fn with per-row scales [out] (float32).

    forward: x [..., in] -> [..., out] in ``compute_dtype``; weight used = (w_fp8 · scale) in compute dtype.
    """

    def __init__(
        self, weight: Tensor, scale: Tensor, bias: Tensor | None, compute_dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.compute_dtype = compute_dtype

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> Fp8Linear:
        """Quantise ``layer`` (its weight dtype becomes the compute dtype)."""
        w = layer.weight.detach()
        scale = w.float().abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX
        q = (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        bias = None if layer.bias is None else layer.bias.detach()
        return cls(q, scale, bias, w.dtype)

    def dequantized(self) -> Tensor:
        """The weight the projection uses, [out, in] in the compute dtype."""
        return self.weight.to(self.compute_dtype) * self.scale.to(self.compute_dtype)[:, None]

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), self.dequantized(), bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fp8 e4m3fn -> {self.compute_dtype}"


def is_fp8(model: nn.Module) -> bool:
    """True if any projection of ``model`` is stored in fp8."""
    return any(isinstance(m, Fp8Linear) for m in model.modules())


def quantize_fp8(dit: WanDiT) -> WanDiT:
    """Replace every nn.Linear inside ``dit.blocks`` by an :class:`Fp8Linear`, in place, one layer at a
    time (peak extra memory: one layer) -> ``dit``. The compute dtype is the layers' current dtype."""
    if is_fp8(dit):
        raise MementoError("quantize_fp8: the model is already fp8")
    dtype = dit.weight_dtype
    if dtype not in (torch.bfloat16, torch.float16):
        raise MementoError(f"quantize_fp8: load the model in bf16 or fp16 first (it is {dtype})")
    for block in dit.blocks:
        for name, module in list(block.named_modules()):
            if isinstance(module, nn.Linear):
                parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
                setattr(parent, name.rpartition(".")[2], Fp8Linear.from_linear(module))
    return dit
