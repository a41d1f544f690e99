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

fp8 compute (``fp8_compute``): on GPUs with fp8 tensor cores (compute capability 8.9+: Ada, Hopper,
Blackwell) the projections can instead run as fp8 matmuls, ``torch._scaled_mm`` with the weight's
per-row scales and per-token scales for the activations (each token's row of x quantised to e4m3 with
``max|x| / 448``), accumulating in float32 and writing the compute dtype. ``auto`` turns it on only
where the GPU has fp8 and a one-time check of one layer against the dequantise path passes
(:data:`SCALED_MM_TOLERANCE`); elsewhere the dequantise path runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dit import WanDiT
from .errors import MementoError

__all__ = [
    "FP8_COMPUTE_CHOICES",
    "FP8_MAX",
    "Fp8Linear",
    "fp8_compute_supported",
    "is_fp8",
    "quantize_fp8",
    "set_fp8_compute",
    "uses_scaled_mm",
]

#: fp8_compute choices: ``auto`` (scaled_mm where the GPU has fp8 and the check passes), ``dequant``
#: (always dequantise to the compute dtype), ``scaled_mm`` (always fp8 matmuls; CPU too, for tests).
FP8_COMPUTE_CHOICES: tuple[str, ...] = ("auto", "dequant", "scaled_mm")
#: Relative L2 error of one scaled_mm projection against the dequantise path that ``auto`` accepts
#: (per-token e4m3 activations cost ~2-3%).
SCALED_MM_TOLERANCE = 0.06
#: Rows of activations quantised at a time (bounds the float32 transient to 4 x rows x in bytes).
QUANT_CHUNK_ROWS = 4096

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
        self.scaled_mm = False  # True: fp8 x fp8 matmul (torch._scaled_mm) instead of dequantising

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
        if self.scaled_mm:
            return self.forward_scaled_mm(x, bias)
        return F.linear(x.to(self.compute_dtype), self.dequantized(), bias)

    def forward_scaled_mm(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """x [..., in] -> [..., out]: per-token fp8 activations times the fp8 weight (``_scaled_mm``)."""
        rows = x.reshape(-1, self.in_features)
        x_scale = rows.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX  # [M, 1]
        # scaled in float32 (rounding straight to e4m3; a bf16 product would round twice), in row chunks
        # so the float32 transient stays small next to the [M, in] activations
        x_q = torch.empty(rows.shape, dtype=FP8_DTYPE, device=rows.device)
        for i in range(0, rows.shape[0], QUANT_CHUNK_ROWS):
            part = rows[i : i + QUANT_CHUNK_ROWS].float().div_(x_scale[i : i + QUANT_CHUNK_ROWS])
            x_q[i : i + QUANT_CHUNK_ROWS] = part.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        out = torch._scaled_mm(
            x_q,
            self.weight.t(),  # [in, out], column-major as _scaled_mm wants
            scale_a=x_scale,
            scale_b=self.scale.float()[None, :],  # [1, out]
            out_dtype=self.compute_dtype,
        )
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        path = "fp8 matmul" if self.scaled_mm else self.compute_dtype
        return f"in={self.in_features}, out={self.out_features}, fp8 e4m3fn -> {path}"


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


def uses_scaled_mm(model: nn.Module) -> bool:
    """True when ``model``'s fp8 projections run as fp8 matmuls (:func:`set_fp8_compute`)."""
    return any(isinstance(m, Fp8Linear) and m.scaled_mm for m in model.modules())


def fp8_compute_supported(device: torch.device | str) -> bool:
    """True where fp8 matmuls run on tensor cores: a CUDA GPU of compute capability 8.9 or newer."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _check_scaled_mm(layer: Fp8Linear, seed: int = 0) -> float:
    """Relative L2 error of ``layer``'s scaled_mm path against its dequantise path on random input."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(64, layer.in_features, generator=gen).to(layer.weight.device, layer.compute_dtype)
    bias = None if layer.bias is None else layer.bias.to(layer.compute_dtype)
    ref = F.linear(x, layer.dequantized(), bias).float()
    out = layer.forward_scaled_mm(x, bias).float()
    return float((out - ref).norm() / ref.norm())


def set_fp8_compute(
    model: nn.Module, choice: str = "auto", device: torch.device | str | None = None
) -> str | None:
    """Choose how ``model``'s fp8 projections compute; returns a one-line notice when ``auto`` or
    ``scaled_mm`` could not be honoured (None otherwise, and for models without fp8 layers).

    device: where the model will compute (default: where its weights are now; the check runs there).
    ``scaled_mm`` on a device without fp8 tensor cores still runs (slowly; used by CPU tests)."""
    if choice not in FP8_COMPUTE_CHOICES:
        raise MementoError(f"fp8_compute: expected one of {', '.join(FP8_COMPUTE_CHOICES)}, got {choice!r}")
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    if not layers:
        return None
    use, notice = choice == "scaled_mm", None
    if choice == "auto":
        device = torch.device(device) if device is not None else layers[0].weight.device
        if fp8_compute_supported(device):
            first = layers[0]
            probe = Fp8Linear(
                first.weight.detach().to(device),
                first.scale.detach().to(device),
                None if first.bias is None else first.bias.detach().to(device),
                first.compute_dtype,
            )
            try:
                err = _check_scaled_mm(probe)
            except RuntimeError as exc:
                err, notice = float("inf"), f"fp8 compute: scaled_mm failed on {device} ({exc}); dequantising"
            use = err <= SCALED_MM_TOLERANCE
            if not use and notice is None:
                notice = f"fp8 compute: scaled_mm disagrees with dequantise (error {err:.3g}); dequantising"
    for layer in layers:
        layer.scaled_mm = use
    return notice
