"""QuantLinear: the one place a quantized layer's math lives.

    y = Q_a(x_s; rho[bin]) · dequant(W_q)ᵀ + x_s · L2ᵀ · L1ᵀ + b,    x_s = bf16(x · r),  r = 1 / s

``s`` is an optional per-input-channel smoothing vector (already folded into the weight as
``W · diag(s)``; the input is multiplied by its fp32 reciprocal ``r``, :mod:`wanexp.quant.smooth`),
``L1 L2`` an optional 16-bit low-rank branch, ``W_q`` the packed low-bit residual weight and
``rho[bin]`` the activation clip ratio of the current timestep bin, read from a table.

Timestep-aware balancing (ViDiT-Q style) makes the smoothing a table too: ``smooth`` is then
``[bins, in]`` and ``W_q`` holds one quantized ``W · diag(s_bin)`` per bin (``[bins, out, in]``), so
the layer runs ``Q_a(x · r_bin) · dequant(W_q[bin])ᵀ``, the bin read from the timestep context like
the clip ratio. Such layers store their weight once per bin and take the reference path on GPU.
:meth:`QuantLinear.reference_forward` is the plain-torch reference path (and the CPU path);
:meth:`QuantLinear.forward` sends CUDA inputs of MXFP4 W4A4 layers to the fused Triton kernels of
:mod:`wanexp.kernels` (same numerics up to the final bf16 rounding), and of INT4, NVFP4 and HiF4
W4A4 layers to a fused activation quantizer plus the reference GEMMs (equal outputs), unless ``fused`` is off for
the layer or globally (``wanexp.kernels.fused(False)``, ``WANEXP_FUSED=0``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from wanexp.formats import PackedTensor, decode, get_format
from wanexp.quant.context import TimestepContext
from wanexp.quant.smooth import reciprocal, smooth_input


@torch.library.custom_op("wanexp::count_", mutates_args=("counters",))
def _count(counters: torch.Tensor, index: int) -> None:
    """``counters[index] += 1`` at run time: opaque to torch.compile, so a compiled graph neither
    guards on the count nor generates a kernel for the CPU tensor."""
    counters[index] += 1


@_count.register_fake
def _(counters, index):
    return None


class QuantLinear(nn.Module):
    fused: bool = True  # False on an instance keeps that layer on the reference path

    def __init__(self, in_features: int, out_features: int, *, weight: PackedTensor | torch.Tensor,
                 bias: torch.Tensor | None, act_format: dict | None, clip_table: torch.Tensor | None = None,
                 smooth: torch.Tensor | None = None, lowrank: tuple[torch.Tensor, torch.Tensor] | None = None,
                 context: TimestepContext | None = None, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        if isinstance(weight, PackedTensor):
            self.weight_meta: dict | None = weight.meta()
            for key, t in weight.tensors().items():
                self.register_buffer(f"wq_{key}", t)
        else:  # a 16-bit weight (weight-only baselines kept dense, or BF16 layers inside an artifact)
            self.weight_meta = None
            self.register_buffer("weight", weight.to(compute_dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(compute_dtype))
        self.register_buffer("smooth", None if smooth is None else smooth.detach().float())
        # the multiplier every path smooths with, derived from ``smooth`` (not saved: artifacts keep s)
        self.register_buffer("smooth_recip", None if smooth is None else reciprocal(self.smooth), persistent=False)
        self.register_buffer("lowrank_up", None if lowrank is None else lowrank[0].detach().to(compute_dtype))
        self.register_buffer("lowrank_down", None if lowrank is None else lowrank[1].detach().to(compute_dtype))
        self.act_format_spec = act_format
        self.act_format = None if act_format is None else get_format(act_format["name"], **act_format.get("opts", {}))
        home = weight.device  # PackedTensor and Tensor alike: the table lives with the weight
        table = torch.ones(1, device=home) if clip_table is None else clip_table.detach().float().flatten().to(home)
        self.register_buffer("clip_table", table)
        self.context = context
        self._pinned_bin: int | None = None  # at_bin(): a bin fixed for evaluation, whatever the context
        # [activation rows, weight rows] the FP8 fused path recomputed exactly (wanexp.kernels.mxfp4_fp8),
        # then the forwards taken by each path (the fused GPU kernels, the torch reference): the
        # runner's record of which path a run really used. A CPU tensor, not Python ints: the
        # counting op (and the FP8 kernels) add to it at run time, inside a compiled graph too, where
        # an int attribute would be a guard that recompiles the block at every call.
        self.counters = torch.zeros(4, dtype=torch.int64)
        # tensors a kernel derives once from this layer's weight (e.g. the FP8 fold's row exponents);
        # dropped whenever the layer moves
        self.kernel_cache: dict[str, Any] = {}

    @property
    def fallbacks(self) -> dict[str, int]:
        return {"fp8_rows": int(self.counters[0]), "fp8_cols": int(self.counters[1])}

    @property
    def calls(self) -> dict[str, int]:
        """Forwards by path: ``fused`` (the GPU kernels) and ``reference`` (the torch path)."""
        return {"fused": int(self.counters[2]), "reference": int(self.counters[3])}

    def _apply(self, fn, recurse=True):
        """Moves apply, dtype casts do not: ``pipe.to(torch.bfloat16)`` or ``.half()`` on a model holding
        this layer must not re-round its fp32 smoothing and clip table (nor make the 16-bit branch fp32
        under ``.float()``); the layer keeps the precisions it was built with (``compute_dtype``)."""
        self.kernel_cache = {}
        for key, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[key] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self

    # -- weights -------------------------------------------------------------------------------
    def packed_weight(self) -> PackedTensor | None:
        if self.weight_meta is None:
            return None
        tensors = {name[3:]: buf for name, buf in self.named_buffers(recurse=False) if name.startswith("wq_")}
        return PackedTensor.from_tensors(tensors, self.weight_meta)

    @property
    def smooth_bins(self) -> int:
        """Bins of a per-bin smoothing table (0: one smoothing vector or none)."""
        return 0 if self.smooth is None or self.smooth.dim() == 1 else int(self.smooth.shape[0])

    def dequantized_weight(self) -> torch.Tensor:
        """The dense 16-bit weight the GEMM uses (with a per-bin smoothing table: the current bin's)."""
        packed = self.packed_weight()
        if packed is None:
            return self.weight
        if self.smooth_bins:
            packed = _lead_slice(packed, self._table_index(self.smooth_bins))
        return decode(packed).to(self.compute_dtype)

    def smoothing(self) -> torch.Tensor | None:
        """The smoothing divisor of the current bin (the vector itself when it is not per bin)."""
        if not self.smooth_bins:
            return self.smooth
        return self.smooth[self._table_index(self.smooth_bins)]

    def smoothing_reciprocal(self) -> torch.Tensor | None:
        """The multiplier ``r = 1 / s`` (fp32) of the current bin's smoothing."""
        if not self.smooth_bins:
            return self.smooth_recip
        return self.smooth_recip[self._table_index(self.smooth_bins)]

    def set_clip_table(self, ratios) -> None:
        """Replace the per-bin clip ratios (a sequence or tensor), kept on this layer's device."""
        self.clip_table = torch.as_tensor(ratios, dtype=torch.float32, device=self.clip_table.device).flatten()

    def current_bin(self) -> int:
        """The timestep bin this call runs in: the pinned one (:meth:`at_bin`), else the context's, else 0."""
        if self._pinned_bin is not None:
            return self._pinned_bin
        return 0 if self.context is None else int(self.context.bin)

    def _table_index(self, entries: int) -> int:
        return min(self.current_bin(), entries - 1)

    @contextlib.contextmanager
    def at_bin(self, bin_: int) -> Iterator["QuantLinear"]:
        """Run as in timestep bin ``bin_`` (clip ratio and smoothing), e.g. to measure a bin's error."""
        before, self._pinned_bin = self._pinned_bin, int(bin_)
        try:
            yield self
        finally:
            self._pinned_bin = before

    def clip_ratio(self) -> torch.Tensor:
        return self.clip_table[self._table_index(self.clip_table.numel())]

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self.fused and self.weight_meta is not None and self.act_format is not None:
            from wanexp import kernels
            if kernels.can_fuse(self, x):
                torch.ops.wanexp.count_(self.counters, 2)
                return kernels.fused_forward(self, x)
        torch.ops.wanexp.count_(self.counters, 3)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The plain-torch reference path: dequantize, fake-quantize, bf16 GEMMs."""
        xs = self.smoothed(x)
        xq = xs if self.act_format is None else self.act_format.quantize_dequantize(xs, clip_ratio=float(self.clip_ratio()))
        return self.gemms(xq, xs).to(x.dtype)

    def smoothed(self, x: torch.Tensor) -> torch.Tensor:
        """x in the compute dtype, smoothed as in the current bin: bf16(x · r)."""
        return smooth_input(x, self.smoothing_reciprocal(), self.compute_dtype)

    def gemms(self, xq: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """The reference path's products from the (fake-)quantized activations ``xq`` and the smoothed
        input ``xs``: ``xq · deq(W)ᵀ + b``, plus the low-rank branch, which sees ``xs`` unquantized."""
        y = torch.nn.functional.linear(xq, self.dequantized_weight(), self.bias)
        if self.lowrank_up is not None:
            y = y + torch.nn.functional.linear(torch.nn.functional.linear(xs, self.lowrank_down), self.lowrank_up)
        return y

    def nbytes(self) -> int:
        """Bytes this layer actually holds (packed codes, scales, 16-bit factors, tables)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False) if b is not None)

    def describe(self) -> dict[str, Any]:
        """JSON-able description that, with the buffers, rebuilds this layer (artifact header)."""
        return {"in_features": self.in_features, "out_features": self.out_features,
                "weight_meta": self.weight_meta, "act_format": self.act_format_spec,
                "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
                "has_bias": self.bias is not None, "has_smooth": self.smooth is not None, "smooth_bins": self.smooth_bins,
                "lowrank_rank": 0 if self.lowrank_up is None else int(self.lowrank_up.shape[1])}

    @classmethod
    def from_description(cls, desc: dict, tensors: dict[str, torch.Tensor]) -> "QuantLinear":
        dtype = getattr(torch, desc["compute_dtype"])
        if desc["weight_meta"] is not None:
            packed = {k[3:]: v for k, v in tensors.items() if k.startswith("wq_")}
            weight: Any = PackedTensor.from_tensors(packed, desc["weight_meta"])
        else:
            weight = tensors["weight"]
        lowrank = (tensors["lowrank_up"], tensors["lowrank_down"]) if desc["lowrank_rank"] else None
        return cls(desc["in_features"], desc["out_features"], weight=weight, bias=tensors.get("bias"),
                   act_format=desc["act_format"], clip_table=tensors["clip_table"], smooth=tensors.get("smooth"),
                   lowrank=lowrank, compute_dtype=dtype)

    def extra_repr(self) -> str:
        w = self.weight_meta["format"] if self.weight_meta else "bf16"
        a = self.act_format_spec["name"] if self.act_format_spec else "bf16"
        rank = 0 if self.lowrank_up is None else self.lowrank_up.shape[1]
        return (f"in={self.in_features}, out={self.out_features}, W={w}, A={a}, rank={rank}, "
                f"smooth={self.smooth is not None}{f' (per bin: {self.smooth_bins})' if self.smooth_bins else ''}, "
                f"bins={self.clip_table.numel()}")


def _lead_slice(packed: PackedTensor, index: int) -> PackedTensor:
    """Entry ``index`` of a packed tensor stacked along its first dim (``[bins, out, in]``): every
    format keeps the leading dims first in each of its storage tensors; 0-dim ones (NVFP4's
    per-tensor scale) are shared by all entries."""
    data = {k: (v if v.dim() == 0 else v[index]) for k, v in packed.data.items()}
    return PackedTensor(packed.format, packed.options, tuple(packed.shape[1:]), packed.dtype, data)
